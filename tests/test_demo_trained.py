"""The trained demo checkpoint (cluster/demo_model): what init-demo and the default serve install, and parity of the
local engine with transformers on it: logits, greedy tokens, and the held-out perplexity (bench/perplexity.py's
windows, on a slice of Jonah long enough to cross the 256-token sliding window)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.perplexity import (
    DEFAULT_TEXT,
    document_windows,
    engine_logprobs,
    read_documents,
    total,
    transformers_logprobs,
)
from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig
from cluster.model.demo import TRAINED_DEMO, copy_trained_demo, init_demo, is_trained_demo
from router_service.cli import main
from router_service.serve_config import ensure_trained_demo

HELD_OUT_PROMPT = "Then Jonah prayed unto the LORD his God out of the fish's belly,"  # Jonah 2:1, never trained on
NEW_TOKENS = 24
SLICE_CHARS = 1400  # per chapter: windows of about 300 tokens, past the sliding window (256)
MAX_LENGTH = 300


@pytest.fixture(scope="module")
def engine() -> Iterator[EngineLoop]:
    eng = EngineLoop.local(EngineConfig(model=str(TRAINED_DEMO), progress=False, num_kv_blocks=160,
                                        block_size=16, max_model_len=1024))
    yield eng
    eng.shutdown()


def test_init_demo_copies_the_trained_demo_and_random_needs_the_flag(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--log-level", "ERROR", "init-demo", str(tmp_path / "t")]) == 0
    assert is_trained_demo(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == sorted(p.name for p in TRAINED_DEMO.iterdir())
    assert main(["--log-level", "ERROR", "init-demo", str(tmp_path / "r"), "--seed", "3"]) == 1
    assert "--seed 3 applies to the random demo only: add --random" in capsys.readouterr().err
    assert main(["--log-level", "ERROR", "init-demo", str(tmp_path / "t"), "--random", "--force"]) == 0
    assert not is_trained_demo(tmp_path / "t") and not (tmp_path / "t" / "README.md").exists()


def test_default_serve_model_replaces_a_random_demo_with_the_trained_one(tmp_path: Path) -> None:
    stale = init_demo(tmp_path / "demo")  # what earlier versions wrote to ~/.cache/moe-cluster/demo
    ensure_trained_demo(stale)
    assert is_trained_demo(stale)
    for src in TRAINED_DEMO.iterdir():
        assert (stale / src.name).read_bytes() == src.read_bytes(), src.name
    assert sorted(p.name for p in stale.glob("model*")) == sorted(p.name for p in TRAINED_DEMO.glob("model*"))
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        copy_trained_demo(stale)


def test_prefill_logits_and_greedy_tokens_match_transformers(engine: EngineLoop, trained_hf: Any) -> None:
    ids = engine.tokenizer.encode(HELD_OUT_PROMPT)
    with torch.no_grad():
        expected = trained_hf(torch.tensor([ids])).logits[0]
    ours = engine.score([ids])[0]
    assert (ours - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    result = engine.generate([ids], SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))[0]
    trained_hf.generation_config.eos_token_id = None
    trained_hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        want = trained_hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):]
    assert result.completions[0].token_ids == want.tolist()


def test_held_out_perplexity_local_engine_equals_transformers(engine: EngineLoop, trained_hf: Any) -> None:
    docs = read_documents(DEFAULT_TEXT, SLICE_CHARS)
    windows = document_windows(TRAINED_DEMO, docs, MAX_LENGTH)
    assert max(len(w.tokens) for w in windows) > 256  # the sliding window is in play
    ours, reference = total(engine_logprobs(engine, windows), docs), total(transformers_logprobs(trained_hf, windows),
                                                                          docs)
    assert ours.tokens == reference.tokens == sum(len(w.continuation) for w in windows)
    assert abs(ours.nll - reference.nll) <= 1e-4 * reference.nll
    assert reference.perplexity < 200  # a trained model (random weights: about the vocabulary size, 8192)
