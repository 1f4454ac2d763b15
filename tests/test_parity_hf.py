"""Exact parity with transformers' MixtralForCausalLM on checkpoints it saved itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig
from tests.conftest import HFCheckpoint, make_hf_checkpoint

# Each config varies what the issue names: experts, top-k, GQA ratio, sliding window, tying, sharding.
PARITY_CONFIGS: dict[str, dict[str, Any]] = {
    "e8-top2-gqa4-nowindow-untied-sharded": dict(shards=True),
    "e4-top1-gqa1-window16-tied-single": dict(num_local_experts=4, num_experts_per_tok=1, num_key_value_heads=4,
                                              sliding_window=16, tie_word_embeddings=True),
    "e8-top2-gqa2-window24-untied-single-classic": dict(num_key_value_heads=2, sliding_window=24, classic=True,
                                                        head_dim=16),
    "e4-top2-gqa4-nowindow-tied-sharded-theta1e4": dict(num_local_experts=4, tie_word_embeddings=True,
                                                        shards=True, rope_theta=1e4),
    "e8-top2-gqa4-window8-untied-sharded": dict(sliding_window=8, shards=True, num_hidden_layers=3),
}
PROMPT_LEN = 40
NEW_TOKENS = 32


def prompt_ids(vocab: int, length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=gen).tolist()


def hf_greedy(ckpt: HFCheckpoint, ids: list[int], new_tokens: int) -> list[int]:
    model = ckpt.model
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=sorted(PARITY_CONFIGS), ids=sorted(PARITY_CONFIGS))
def parity_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[HFCheckpoint, EngineLoop]]:
    ckpt = make_hf_checkpoint(tmp_path_factory.mktemp("parity"), **PARITY_CONFIGS[request.param])
    engine = EngineLoop.local(EngineConfig(model=str(ckpt.path), progress=False, num_kv_blocks=128,
                                           block_size=8))
    yield ckpt, engine
    engine.shutdown()


def test_checkpoint_layout_is_what_the_case_says(parity_case: tuple[HFCheckpoint, EngineLoop]) -> None:
    ckpt, _ = parity_case
    sharded = (ckpt.path / "model.safetensors.index.json").is_file()
    assert sharded == (len(list(ckpt.path.glob("model-*.safetensors"))) > 1)


def test_prefill_logits_match_transformers(parity_case: tuple[HFCheckpoint, EngineLoop]) -> None:
    ckpt, engine = parity_case
    ids = prompt_ids(ckpt.config["vocab_size"], PROMPT_LEN, seed=1)
    with torch.no_grad():
        expected = ckpt.model(torch.tensor([ids])).logits[0]
    ours = engine.score([ids])[0]
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 1e-4
    assert expected.abs().max().item() > 0.1  # the comparison is not between near-zero tensors


def test_greedy_tokens_match_transformers(parity_case: tuple[HFCheckpoint, EngineLoop]) -> None:
    ckpt, engine = parity_case
    ids = prompt_ids(ckpt.config["vocab_size"], PROMPT_LEN, seed=2)
    result = engine.generate([ids], SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))[0]
    assert result.completions[0].token_ids == hf_greedy(ckpt, ids, NEW_TOKENS)
    assert result.completions[0].finish_reason == "length"


def test_cached_decode_equals_full_recompute(parity_case: tuple[HFCheckpoint, EngineLoop]) -> None:
    """Each generated token's logprob (KV-cached decode) equals the logprob from recomputing everything."""
    ckpt, engine = parity_case
    ids = prompt_ids(ckpt.config["vocab_size"], 20, seed=3)
    result = engine.generate([ids], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=3))[0]
    completion = result.completions[0]
    full = ids + completion.token_ids
    recomputed = torch.log_softmax(engine.score([full])[0], dim=-1)  # (len, V)
    for step, lp in enumerate(completion.logprobs or []):
        row = recomputed[len(ids) + step - 1]
        assert lp.token_id == int(row.argmax())
        assert abs(lp.logprob - row[lp.token_id].item()) <= 1e-4
        top_ids = [t for t, _ in lp.top]
        assert top_ids == row.topk(3).indices.tolist()


def test_batched_generation_equals_each_alone(hf_small: HFCheckpoint) -> None:
    engine = EngineLoop.local(EngineConfig(model=str(hf_small.path), progress=False, num_kv_blocks=256,
                                           block_size=4, max_num_batched_tokens=64))
    try:
        prompts = [prompt_ids(96, n, seed=10 + n) for n in (3, 17, 40, 1, 29, 8)]
        params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (20, 5, 12, 30, 1, 9)]
        together = engine.generate(prompts, params)
        alone = [engine.generate([p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
        for a, b, sp in zip(together, alone, params, strict=True):
            assert a.completions[0].token_ids == b.completions[0].token_ids
            assert len(a.completions[0].token_ids) == sp.max_tokens
        # And against transformers, for the longest one.
        assert together[3].completions[0].token_ids == hf_greedy(hf_small, prompts[3], 30)
    finally:
        engine.shutdown()


def test_engine_bfloat16_tracks_float32(hf_small: HFCheckpoint) -> None:
    """dtype is selectable; bf16 logits stay close to the float32 reference."""
    engine = EngineLoop.local(EngineConfig(model=str(hf_small.path), dtype="bfloat16", progress=False,
                                           num_kv_blocks=64))
    try:
        ids = prompt_ids(96, 24, seed=5)
        with torch.no_grad():
            expected = hf_small.model(torch.tensor([ids])).logits[0]
        ours = engine.score([ids])[0]
        assert engine.engine.transformer.dtype == torch.bfloat16
        assert (ours - expected).abs().max().item() < 0.1 * expected.abs().max().item()
    finally:
        engine.shutdown()


def test_classic_and_current_config_forms_agree(tmp_path: Path) -> None:
    from cluster.model.config import ModelConfig

    current = make_hf_checkpoint(tmp_path / "a")
    classic = make_hf_checkpoint(tmp_path / "b", classic=True)
    assert ModelConfig.from_file(current.path) == ModelConfig.from_file(classic.path)
