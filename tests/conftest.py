"""Shared fixtures: Hugging Face reference checkpoints built locally, the demo checkpoint, engines."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from cluster.engine.loop import EngineLoop

# Keep the 2-core CI machine responsive: one intra-op thread per process unless told otherwise.
torch.set_num_threads(int(os.environ.get("MOE_TEST_THREADS", "1")))

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
             rope_theta=1e6, sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@dataclass
class HFCheckpoint:
    path: Path
    model: Any  # transformers.MixtralForCausalLM
    config: dict[str, Any]


def _tokenizer_files(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over synthetic words (the parity tests feed token ids directly)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def make_hf_checkpoint(directory: Path, shards: bool = False, classic: bool = False, seed: int = 0,
                       **overrides: Any) -> HFCheckpoint:
    """Build a random transformers Mixtral, save it with save_pretrained (sharded or one file)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    fields = SMALL | overrides
    torch.manual_seed(seed)
    config = MixtralConfig(**fields)
    model = MixtralForCausalLM(config).eval()
    # Random norms and a wider init, so routing and logits are far from uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(directory, max_shard_size="40KB" if shards else "1GB")
    if classic:  # rewrite config.json as the Mixtral-8x7B release had it: top-level rope_theta, torch_dtype
        raw = json.loads((directory / "config.json").read_text())
        raw["rope_theta"] = raw.pop("rope_parameters")["rope_theta"]
        raw["torch_dtype"] = raw.pop("dtype", "float32")
        (directory / "config.json").write_text(json.dumps(raw))
    _tokenizer_files(directory, fields["vocab_size"])
    return HFCheckpoint(directory, model, fields)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cluster.model.demo import init_demo

    return init_demo(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def engine(demo_dir: Path) -> Iterator[EngineLoop]:
    """The random-weight demo in a local engine, shared by a module's tests (a small KV cache, 256 tokens)."""
    from cluster.engine.loop import EngineLoop
    from cluster.engine_config import EngineConfig

    eng = EngineLoop.local(EngineConfig(model=str(demo_dir), progress=False, num_kv_blocks=96,
                                        block_size=8, max_model_len=256))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def trained_hf() -> Any:
    """transformers' MixtralForCausalLM on the trained demo checkpoint shipped in cluster/demo_model (float32)."""
    from transformers import AutoModelForCausalLM

    from cluster.model.demo import TRAINED_DEMO

    return AutoModelForCausalLM.from_pretrained(TRAINED_DEMO, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_small(tmp_path_factory: pytest.TempPathFactory) -> HFCheckpoint:
    """The default small reference model (8 experts, top-2, GQA 4, sharded)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf-small"), shards=True)


@pytest.fixture()
def fresh_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray for one test module (16 logical CPUs: idle expert actors are cheap)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def process_environ(pid: int) -> dict[str, str]:
    """The environment process ``pid`` (on this machine) started with."""
    items = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


def cluster_config(**overrides: Any) -> Any:
    """Test coordinator defaults: short timeouts so failures surface fast, one thread."""
    from cluster.engine_config import ClusterConfig

    return ClusterConfig(**({"heartbeat_s": 1.0, "start_timeout_s": 120} | overrides))


def pool_config(**overrides: Any) -> Any:
    """Test pool defaults: one CPU and one thread per worker, short timeouts."""
    from cluster.engine_config import PoolConfig

    base: dict[str, Any] = {"worker_num_cpus": 1, "threads_per_worker": 1, "placement_timeout_s": 20,
                            "link_timeout_s": 20, "start_timeout_s": 120}
    return PoolConfig(**(base | overrides))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run only where CUDA is; multi-GPU tests only where two or more devices are."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs 2+ CUDA devices, found {gpus}"))
