"""The sampler: distributions, top-k/top-p cuts, per-request seeds; SamplingParams validation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cluster.engine.sampling import (
    SamplingParams,
    apply_top_k_top_p,
    new_request_seed,
    sample,
    sample_seed,
    token_logprobs,
    token_seed,
)

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


def draw(params: SamplingParams, n: int = 20000) -> torch.Tensor:
    logits = LOGITS.repeat(n, 1)
    return sample(logits, [params] * n, [token_seed(row, 0) for row in range(n)])


def frequencies(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=5).float() / tokens.numel()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_follows_softmax_of_scaled_logits(temperature: float) -> None:
    expected = torch.softmax(LOGITS / temperature, -1)
    assert (frequencies(draw(SamplingParams(temperature=temperature))) - expected).abs().max() < 0.015


def test_top_k_keeps_the_k_best_renormalised() -> None:
    freq = frequencies(draw(SamplingParams(top_k=2)))
    expected = torch.softmax(LOGITS[:2], -1)
    assert freq[2:].sum() == 0 and (freq[:2] - expected).abs().max() < 0.015


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.softmax(LOGITS, -1)  # [0.61, 0.22, 0.14, ...]: top_p=0.7 keeps the first two
    freq = frequencies(draw(SamplingParams(top_p=0.7)))
    assert freq[2:].sum() == 0
    assert (freq[:2] - probs[:2] / probs[:2].sum()).abs().max() < 0.015


def test_cut_never_removes_the_best_token() -> None:
    cut = apply_top_k_top_p(LOGITS[None], torch.tensor([0]), torch.tensor([1e-9]))
    assert torch.isfinite(cut).sum() == 1 and cut.argmax() == 0


def test_greedy_rows_take_the_argmax_and_seeds_are_per_row() -> None:
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=0), SamplingParams(seed=7), SamplingParams(seed=7), SamplingParams(seed=8)]
    seeds = [0, token_seed(7, 0), token_seed(7, 0), token_seed(8, 0)]
    tokens = sample(logits, params, seeds)
    assert tokens[0] == logits[0].argmax()
    alone = sample(logits[1:2], params[1:2], seeds[1:2])
    assert tokens[1] == alone[0]
    flat = torch.zeros(1, 50)  # uniform: with 50 tokens, distinct seeds almost never draw alike 20 times
    draws = [int(sample(flat, [SamplingParams()], [token_seed(7, position)])[0]) for position in range(20)]
    assert len(set(draws)) > 5, "successive positions of one sample must draw independently"


def test_token_seeds_are_counter_based_and_distinct() -> None:
    assert token_seed(7, 3) == token_seed(7, 3)  # the same (seed, position) draws alike in any process
    seeds = {token_seed(s, p) for s in range(50) for p in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(7, 0) == 7 and len({sample_seed(7, i) for i in range(64)}) == 64
    assert new_request_seed() != new_request_seed()


def test_logprobs_are_log_softmax_with_top_n() -> None:
    logits = torch.randn(2, 30)
    chosen = torch.tensor([3, 4])
    out = token_logprobs(logits, chosen, [2, 0])
    ref = torch.log_softmax(logits, -1)
    assert out[0].token_id == 3 and abs(out[0].logprob - ref[0, 3].item()) < 1e-6
    assert [t for t, _ in out[0].top] == ref[0].topk(2).indices.tolist()
    assert out[1].top == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
    ({"max_tokens": -5}, "max_tokens must be an integer >= 1, got -5"),
    ({"max_tokens": 2.5}, "max_tokens must be an integer >= 1, got 2.5"),
    ({"temperature": -0.1}, "temperature must be >= 0, got -0.1"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\], got 0"),
    ({"top_k": -2}, "top_k must be an integer >= -1"),
    ({"seed": -1}, "seed must be an integer in"),
    ({"n": 0}, "n must be an integer in"),
    ({"logprobs": 21}, "logprobs must be an integer in"),
    ({"stop": [""]}, "stop must be a non-empty string"),
    ({"stop": ["a"] * 17}, "stop may hold at most 16 strings"),
    ({"stop_token_ids": [-1]}, "stop_token_ids must be a list of non-negative integers"),
    ({"temperature": "hot"}, "temperature must be a finite number, got 'hot'"),
])
def test_bad_params_name_the_field_and_value(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_stop_accepts_a_single_string() -> None:
    assert SamplingParams(stop="END").stop == ("END",)  # type: ignore[arg-type]  # a lone string is accepted
    with pytest.raises(TypeError, match="echo must be a boolean"):
        SamplingParams(echo="yes")  # type: ignore[arg-type]
