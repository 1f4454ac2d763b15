"""The demo checkpoints ``moe-cluster init-demo DIR`` writes, both in the real Hugging Face Mixtral format.

* The trained demo (the default, ``copy_trained_demo``): the checkpoint shipped in ``cluster/demo_model/``, a
  17.4M-parameter Mixtral (8 experts, top-2) trained on the King James Bible by ``training/train_demo.py``;
  its README there names the text's source and licence. It writes English.
* The random demo (``init_demo``, ``init-demo --random``): made offline from a seed: config.json, sharded
  safetensors with an index, a Mistral-style tokenizer (BPE with byte fallback, trained here on a built-in
  text), tokenizer_config.json with a chat template, generation_config.json. The weights are random, so its text
  is word salad, but every byte of the format is real: ``transformers`` loads it as a MixtralForCausalLM, and so
  does this project. Tests, benchmarks of larger sizes and ``--router-skew`` use it.

With ``router_skew`` Z > 0 the routers prefer a different group of experts in each layer (skew_routers), so that
expert load balancing has something to balance; Z = 0 writes exactly the unskewed checkpoint.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from cluster.model.checkpoint import INDEX_FILE, coordinator_shapes, expert_shapes
from cluster.model.config import ModelConfig
from cluster.model.tokenizer import DEFAULT_CHAT_TEMPLATE

TRAINED_DEMO = Path(__file__).parent.parent / "demo_model"  # shipped as package data (pyproject.toml)
TRAINED_DEMO_MARKER = "training.json"  # the trainer's record: only the trained demo has it
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

CORPUS = """\
A mixture of experts replaces the single feed forward block of a transformer layer with several experts and a
small router. For every token the router scores each expert, keeps the best two, and mixes their outputs with
weights that sum to one. Only two experts run for each token, so the model holds many parameters but spends
little compute on each step. The experts of one layer can live on different machines. A coordinator embeds
the tokens, runs attention and the router, and sends each token to the workers that host its experts. The
workers compute and send the results back, and the coordinator adds them up in the order of the experts.
This cluster serves such models. It batches many requests together, keeps their keys and values in a paged
cache, and streams the text back to the client as it is written. When a worker fails the cluster starts a new
one, loads the same experts, and runs the requests again from what they had already written.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. How much wood would a
woodchuck chuck if a woodchuck could chuck wood? Once upon a time there was a small model that wanted to speak.
It read every sentence it could find, counted the words, and learned which ones came together. Then it began to
write stories of its own: about rivers and mountains, about cities at night, about the sound of rain on a roof.
Numbers too: one, two, three, four, five, six, seven, eight, nine, ten. Colors: red, green, blue, yellow, white.
Questions and answers. What is the capital of France? Paris. What is two plus two? Four. Who wrote this? A model.
Café, naïve, résumé, 東京, 世界, emoji like 🙂 and 🚀 fall back to bytes when the vocabulary lacks them.
"""


def demo_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=320, num_layers=4, num_heads=8,
                       num_kv_heads=2, head_dim=16, num_experts=8, experts_per_token=2, rms_norm_eps=1e-5,
                       rope_theta=1e6, sliding_window=None, max_position_embeddings=2048,
                       tie_word_embeddings=False, dtype="float32", bos_token_id=1, eos_token_ids=(2,))


def build_tokenizer(vocab_size: int = 1024, corpus: Iterable[str] | None = None) -> Tokenizer:
    """Mistral-style tokenizer: BPE with byte fallback over "\u2581"-joined text, <s> prepended.

    ``corpus`` (lines of text) is what the merges are learned from; the built-in CORPUS when omitted.
    """
    base = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(BYTE_TOKENS), special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    pre = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre
    draft.train_from_iterator(CORPUS.splitlines() if corpus is None else corpus, trainer=trainer)
    learned = json.loads(draft.to_str())["model"]
    # Final vocabulary: specials, then the 256 byte tokens (as in Mistral), then the learned pieces.
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [(m.split(" ")[0], m.split(" ")[1]) if isinstance(m, str) else (m[0], m[1]) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # As in Mixtral's own tokenizer.json: no pre-tokenizer, "▁" normalisation, strip one space on decode.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2 and len(vocab) > base
    return tok


def random_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Normal(0, 0.02) matrices and unit norms, as a freshly initialised Mixtral."""
    gen = torch.Generator().manual_seed(seed)
    shapes = coordinator_shapes(cfg, include_lm_head=not cfg.tie_word_embeddings)
    shapes |= expert_shapes(cfg, range(cfg.num_experts))
    tensors = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if len(shape) == 1:
            tensors[name] = torch.ones(shape)
        else:
            tensors[name] = torch.randn(shape, generator=gen) * 0.02
    return tensors


SKEW_SEED_OFFSET = 2**32  # the skew's own random stream: the base weights stay those of the unskewed model
SKEW_SHIFT = 1.0  # the embeddings' component along u, in norms of a random embedding row
SKEW_GAIN = 0.02  # per unit of router_skew: one std of the random logits, in the first layer (see skew_routers)


def skew_routers(tensors: dict[str, torch.Tensor], cfg: ModelConfig, router_skew: float,
                 seed: int) -> dict[str, torch.Tensor]:
    """The same model with routers that prefer one group of ``experts_per_token`` adjacent experts per layer.

    Random routers see no direction shared by all tokens, so they spread rows evenly. This adds one: a private
    routing channel along a fixed unit direction u (H,). Every token embedding gets exactly ``SKEW_SHIFT`` times
    a random embedding row's norm along u; every other matrix is made blind to u (those that read the hidden state
    lose their component along u, those that write it stop writing along u), so the residual stream carries u
    unchanged to every layer and nothing but the routers reads it. Each layer's hot group of gate rows then gains
    ``router_skew * SKEW_GAIN * u``: it raises those experts' logits for every token, by about ``router_skew``
    standard deviations of the random logits in the first layer (later layers, whose hidden states have grown,
    see less of u). Hot groups are adjacent experts (under a contiguous placement they share a worker: the case
    balancing must fix) and differ from layer to layer. Returns a new dict; ``tensors`` is left as it was.
    """
    if not router_skew >= 0:  # also refuses nan
        raise ValueError(f"router_skew must be a number >= 0, got {router_skew}")
    if router_skew == 0:
        return dict(tensors)
    u, hot = _skew_plan(cfg, seed)
    out = dict(tensors)
    for name, weight in tensors.items():
        if weight.ndim != 2:
            continue  # norms: ones, they keep u where it is
        if name.endswith(("o_proj.weight", "w2.weight")):  # (H, in): writes the residual stream
            out[name] = weight - torch.outer(u, u @ weight)
        else:  # (out, H): reads the hidden state
            out[name] = weight - torch.outer(weight @ u, u)
    row_norm = 0.02 * cfg.hidden_size**0.5  # of a random embedding row
    out["model.embed_tokens.weight"] = out["model.embed_tokens.weight"] + SKEW_SHIFT * row_norm * u  # (V, H)
    for layer in range(cfg.num_layers):
        out[f"model.layers.{layer}.block_sparse_moe.gate.weight"][hot[layer]] += router_skew * SKEW_GAIN * u
    return out


def _skew_plan(cfg: ModelConfig, seed: int) -> tuple[torch.Tensor, list[list[int]]]:
    """The skew's direction u (H,) and each layer's hot experts (a group of experts_per_token adjacent ids)."""
    gen = torch.Generator().manual_seed(seed + SKEW_SEED_OFFSET)
    u = torch.randn(cfg.hidden_size, generator=gen)
    group = cfg.experts_per_token
    order = torch.randperm(cfg.num_experts // group, generator=gen).tolist()  # hot group of each layer, cycled
    hot = [list(range(order[layer % len(order)] * group, (order[layer % len(order)] + 1) * group))
           for layer in range(cfg.num_layers)]
    return u / u.norm(), hot


def hot_experts(cfg: ModelConfig, seed: int) -> list[list[int]]:
    """[layer] -> the experts skew_routers makes hot in that layer."""
    return _skew_plan(cfg, seed)[1]


def write_checkpoint(directory: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], shards: int,
                     storage_dtype: torch.dtype | None = None) -> None:
    """Safetensors shards split by layer (non-expert tensors in the first shard) and their index.

    Tensors are stored in ``storage_dtype`` (the config's dtype when None).
    """
    if not 1 <= shards <= cfg.num_layers + 1:
        raise ValueError(f"shards must be in [1, {cfg.num_layers + 1}], got {shards}")
    dtype = cfg.torch_dtype if storage_dtype is None else storage_dtype
    if shards == 1:
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name, tensor in tensors.items():
        shard = 0
        if ".experts." in name:
            layer = int(name.split(".")[2])
            shard = 1 + layer * (shards - 1) // cfg.num_layers
        groups[shard][name] = tensor.to(dtype).contiguous()
    weight_map = {}
    total = 0
    for i, group in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(group, str(directory / filename), metadata={"format": "pt"})
        for name, tensor in group.items():
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_tokenizer_files(directory: Path, tok: Tokenizer, model_max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json (Llama-style special tokens, the demo's chat template) of a demo
    checkpoint: ``init-demo`` and training/train_demo.py write the same ones."""
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "model_max_length": model_max_length,
        "tokenizer_class": "LlamaTokenizerFast", "clean_up_tokenization_spaces": False,
        "chat_template": DEFAULT_CHAT_TEMPLATE}, indent=2) + "\n")


def init_demo(directory: str | Path, seed: int = 0, shards: int = 3, overwrite: bool = False,
              router_skew: float = 0.0, **architecture: Any) -> Path:
    """Write the random demo checkpoint (seeded random weights) into ``directory`` (created if needed); returns
    its path. (The trained demo is ``copy_trained_demo``.)

    ``router_skew`` > 0 makes the routers prefer a group of experts per layer (skew_routers); 0 is the plain demo.
    ``architecture`` overrides ModelConfig fields (benchmarks use it for larger models of the same format).
    """
    directory = Path(directory)
    if (directory / "config.json").exists() and not overwrite:
        raise ValueError(f"{directory} already holds a checkpoint (config.json); pass overwrite to replace it")
    directory.mkdir(parents=True, exist_ok=True)
    _clear_demo_files(directory)
    tok = build_tokenizer()
    cfg = replace(demo_config(tok.get_vocab_size(with_added_tokens=True)), **architecture)
    write_tokenizer_files(directory, tok, cfg.max_position_embeddings)
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0]}, indent=2) + "\n")
    write_checkpoint(directory, cfg, skew_routers(random_weights(cfg, seed), cfg, router_skew, seed), shards)
    return directory



def copy_trained_demo(directory: str | Path, overwrite: bool = False) -> Path:
    """Copy the trained demo checkpoint (``TRAINED_DEMO``) into ``directory`` (created if needed); returns its path."""
    directory = Path(directory)
    if (directory / "config.json").exists() and not overwrite:
        raise ValueError(f"{directory} already holds a checkpoint (config.json); pass overwrite to replace it")
    if not (TRAINED_DEMO / "config.json").is_file():
        raise FileNotFoundError(f"the trained demo checkpoint is missing from this installation ({TRAINED_DEMO})")
    directory.mkdir(parents=True, exist_ok=True)
    _clear_demo_files(directory)
    for src in sorted(TRAINED_DEMO.iterdir()):
        if src.is_file():
            shutil.copyfile(src, directory / src.name)
    return directory


def is_trained_demo(directory: Path) -> bool:
    """Whether ``directory`` holds this installation's trained demo (its training record is the same)."""
    mine, theirs = TRAINED_DEMO / TRAINED_DEMO_MARKER, directory / TRAINED_DEMO_MARKER
    return theirs.is_file() and mine.is_file() and theirs.read_bytes() == mine.read_bytes()


def _clear_demo_files(directory: Path) -> None:
    """Remove what a previous demo left that the next one may not overwrite: shards (their number differs) and
    the trained demo's own files (training record, README), which would otherwise describe the wrong model."""
    stale = [*directory.glob("model*.safetensors*"), directory / TRAINED_DEMO_MARKER]
    if (directory / TRAINED_DEMO_MARKER).is_file():
        stale.append(directory / "README.md")
    for path in stale:
        path.unlink(missing_ok=True)
