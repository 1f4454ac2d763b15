"""Models by Hugging Face Hub id: ``org/name[@revision]`` resolved to a local snapshot directory through
huggingface_hub, so its cache (HF_HOME / HF_HUB_CACHE), token (HF_TOKEN) and offline mode (HF_HUB_OFFLINE=1) work
as everywhere else; only the files this project reads are fetched (config, tokenizer files, safetensors). A local
directory is used as it is."""

from __future__ import annotations

import functools
import re
from pathlib import Path

# What cluster/model/ config.py, tokenizer.py and checkpoint.py read; nothing else is downloaded
# (no PyTorch .bin/.pt weights, no consolidated.* duplicates).
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "chat_template.jinja", "model*.safetensors", "model.safetensors.index.json"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(spec: str) -> bool:
    """``org/name`` or ``org/name@revision`` that is not an existing local path."""
    return bool(HUB_ID.match(spec)) and not Path(spec).expanduser().exists()


def served_name(spec: str) -> str:
    """The name a model is served under by default: a Hub id without its revision (as vLLM does), else the
    directory's name."""
    return spec.partition("@")[0] if is_hub_id(spec) else Path(spec).name


@functools.cache  # once per process: later calls (every worker, every map change) ask the Hub nothing
def resolve_model(spec: str) -> str:
    """The local directory of ``spec``: itself when it is a path, else the Hub snapshot (downloaded if missing and
    not offline). Errors name the id and what went wrong."""
    if not is_hub_id(spec):
        return str(Path(spec).expanduser())
    repo_id, _, revision = spec.partition("@")
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_FILES))
    except Exception as err:  # offline and not cached, unknown repo or revision, gated without HF_TOKEN, ...
        raise ValueError(f"model {spec!r} is not a local directory, and the Hugging Face Hub snapshot could not be "
                         f"had: {type(err).__name__}: {err}") from None


def config_file(spec: str) -> str:
    """The ``config.json`` of ``spec``: in the directory, or the Hub repository's own file alone (what a process
    that only plans needs, without the weights)."""
    if not is_hub_id(spec):
        return str(Path(spec).expanduser())
    repo_id, _, revision = spec.partition("@")
    from huggingface_hub import hf_hub_download

    try:
        return str(hf_hub_download(repo_id, "config.json", revision=revision or None))
    except Exception as err:
        raise ValueError(f"model {spec!r} is not a local directory, and its config.json could not be had from the "
                         f"Hugging Face Hub: {type(err).__name__}: {err}") from None
