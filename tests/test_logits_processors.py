"""The logits processors (vLLM's sampling parameters) against a reference implementation of each, written
token by token in float64 from vLLM's definitions, on fixed logits; then their effect through the local engine:
logit_bias forces a token, min_tokens holds EOS and stop tokens back, bad words never appear, a resumed request
with penalties ends exactly as the uninterrupted one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import (
    RowHistory,
    SamplingParams,
    apply_min_p,
    bad_words_token_ids,
    banned_tokens,
    process_logits,
    sample,
    token_seed,
)
from cluster.engine.sequence import RequestResult
from cluster.engine_config import EngineConfig
from tests.test_continuation import cut_and_continue, run

VOCAB = 12


def reference_row(logits: list[float], p: SamplingParams, h: RowHistory) -> list[float]:
    """One row, token by token, in float64: bans, then bias, then repetition, frequency, presence penalties."""
    out = [float(x) for x in logits]
    for t in h.banned:
        out[t] = float("-inf")
    for t, v in p.logit_bias:
        out[t] += v
    for t in range(len(out)):
        if t in h.prompt_ids or t in h.output_ids:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        count = list(h.output_ids).count(t)
        out[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


ROWS: list[tuple[SamplingParams, RowHistory]] = [
    (SamplingParams(), RowHistory([1, 2], [3])),  # nothing to do
    (SamplingParams(repetition_penalty=1.7), RowHistory([1, 2, 2], [5, 5, 9])),
    (SamplingParams(frequency_penalty=0.8), RowHistory([1], [4, 4, 4, 7])),
    (SamplingParams(presence_penalty=-1.25), RowHistory([0], [4, 4, 6])),
    (SamplingParams(logit_bias=((3, 100.0), (8, -7.5))), RowHistory([1], [])),
    (SamplingParams(repetition_penalty=0.6, frequency_penalty=0.3, presence_penalty=1.1,
                    logit_bias=((2, 1.5),)), RowHistory([2, 11], [2, 3, 3, 10])),
    (SamplingParams(min_tokens=4, stop_token_ids=(6,)), RowHistory([1], [1, 2], banned=[6, 0])),
]


def test_processors_equal_their_reference_on_fixed_logits() -> None:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(len(ROWS), VOCAB, generator=gen) * 3
    got = process_logits(logits, [p for p, _ in ROWS], [h for _, h in ROWS]).double()
    for row, (p, h) in enumerate(ROWS):
        want = torch.tensor(reference_row(logits[row].tolist(), p, h), dtype=torch.float64)
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got[row])), f"row {row}: banned tokens differ"
        scale = want[finite].abs().max()
        assert (got[row][finite] - want[finite]).abs().max() <= 1e-6 * scale, f"row {row}: {p}"
    assert torch.equal(got[0], logits[0].double())  # a row without processors is untouched


def test_min_p_keeps_tokens_at_least_min_p_times_the_best() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    cut = apply_min_p(logits, torch.tensor([0.3, 0.9]))
    probs = torch.softmax(logits.double(), -1)
    for row, min_p in enumerate([0.3, 0.9]):
        keep = [bool(probs[row, t] >= min_p * probs[row].max()) for t in range(5)]
        assert torch.isfinite(cut[row]).tolist() == keep
    draws = sample(logits[:1].repeat(4000, 1), [SamplingParams(min_p=0.3)] * 4000,
                   [token_seed(i, 0) for i in range(4000)])
    kept = torch.softmax(logits[0, :2].double(), -1)  # min_p 0.3 keeps tokens 0 and 1 only
    freq = torch.bincount(draws, minlength=5).double() / 4000
    assert freq[2:].sum() == 0 and (freq[:2] - kept).abs().max() < 0.03


def test_banned_tokens_follow_min_tokens_and_bad_words() -> None:
    p = SamplingParams(min_tokens=3, stop_token_ids=(9,))
    assert sorted(banned_tokens(p, [1, 2], eos_ids={0}, bad_words_ids=[])) == [0, 9]
    assert banned_tokens(p, [1, 2, 3], eos_ids={0}, bad_words_ids=[]) == []
    ignoring = SamplingParams(min_tokens=3, ignore_eos=True)
    assert banned_tokens(ignoring, [], eos_ids={0}, bad_words_ids=[]) == []
    words = [[5], [7, 8, 4]]
    assert banned_tokens(SamplingParams(), [1, 7, 8], eos_ids={0}, bad_words_ids=words) == [5, 4]
    assert banned_tokens(SamplingParams(), [7, 1], eos_ids={0}, bad_words_ids=words) == [5]
    encode = {"cat": [3], " cat": [4], "big dog": [5, 6], " big dog": [7, 6]}.__getitem__
    assert bad_words_token_ids(["cat", " big dog"], encode) == [[3], [4], [5, 6], [7, 6]]


@pytest.mark.parametrize("kwargs, message", [
    ({"min_p": 1.5}, "min_p must be in [0, 1]"), ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty must be a finite number"),
    ({"logit_bias": {3: 101}}, "logit_bias must map"), ({"logit_bias": {-1: 1}}, "logit_bias must map"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens must be <= max_tokens"),
    ({"bad_words": [""]}, "bad_words must be a list of non-empty strings"),
])
def test_bad_processor_params_name_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- through the engine

PROMPT = "The workers compute and send the results back"


def one(engine: EngineLoop, params: SamplingParams, prompt: str | Sequence[int] = PROMPT) -> RequestResult:
    return engine.generate([prompt], params)[0]


def test_logit_bias_of_100_forces_its_token_and_logprobs_are_processed(engine: EngineLoop) -> None:
    base = one(engine, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)).completions[0]
    forced = next(t for t in range(50, 500) if t not in base.token_ids)
    for temperature in (0, 1.0):
        out = one(engine, SamplingParams(max_tokens=8, temperature=temperature, seed=3, ignore_eos=True,
                                         logit_bias=((forced, 100.0),), logprobs=1)).completions[0]
        assert out.token_ids == [forced] * 8
        assert out.logprobs is not None and all(lp.logprob > -1e-3 for lp in out.logprobs)  # after the bias
    banned = one(engine, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                        logit_bias=tuple((t, -100.0) for t in set(base.token_ids)))).completions[0]
    assert not set(banned.token_ids) & set(base.token_ids)


def test_min_tokens_holds_back_eos_and_stop_tokens(engine: EngineLoop, demo_dir: Path, tmp_path: Path) -> None:
    base = one(engine, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)).completions[0]
    stop = base.token_ids[2]
    first = base.token_ids.index(stop)
    early = one(engine, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=(stop,), ignore_eos=True))
    assert early.completions[0].token_ids == base.token_ids[:first + 1]
    held = one(engine, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=(stop,), ignore_eos=True,
                                      min_tokens=6)).completions[0]
    assert stop not in held.token_ids[:6] and len(held.token_ids) >= 6
    # EOS: make that token the model's EOS; min_tokens keeps it from being drawn before 6 tokens.
    shutil.copytree(demo_dir, tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text()) | {"eos_token_id": stop}
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    eng = EngineLoop.local(EngineConfig(model=str(tmp_path / "m"), progress=False, num_kv_blocks=64))
    try:
        ended = one(eng, SamplingParams(max_tokens=16, temperature=0)).completions[0]
        assert ended.token_ids == base.token_ids[:first + 1] and ended.finish_reason == "stop"
        held = one(eng, SamplingParams(max_tokens=16, temperature=0, min_tokens=6)).completions[0]
        assert stop not in held.token_ids[:6] and len(held.token_ids) >= 6
    finally:
        eng.shutdown()


def test_penalties_bad_words_and_stop_string_kept(engine: EngineLoop) -> None:
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    base = one(engine, greedy).completions[0]
    repeated = one(engine, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                          frequency_penalty=2.0, presence_penalty=2.0)).completions[0]
    assert repeated.token_ids != base.token_ids
    assert len(set(repeated.token_ids)) >= len(set(base.token_ids))  # penalised repeats: at least as varied
    words = [engine.tokenizer.decode([t]) for t in base.token_ids[:4]]
    words = [w for w in words if w.strip()]
    if words:
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, bad_words=tuple(words))
        out = one(engine, params).completions[0].token_ids
        ids = bad_words_token_ids(words, lambda s: engine.tokenizer.encode(s, add_special_tokens=False))
        for word in ids:
            assert not any(out[i:i + len(word)] == word for i in range(len(out))), f"bad word {word} generated"
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if stop.strip():
        cut = one(engine, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,),
                                         include_stop_str_in_output=True)).completions[0]
        assert cut.text == text[:text.index(stop) + len(stop)] and cut.stop_reason == stop


def test_resumed_request_with_processors_continues_exactly(engine: EngineLoop) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=99, n=2, logprobs=2, ignore_eos=True,
                            repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4, min_p=0.05,
                            min_tokens=5, logit_bias=((7, 2.0),))
    whole = run(engine, params)
    for k in (1, len(whole) // 2, len(whole) - 1):
        cut_and_continue(engine, params, whole, k)
    again = RequestResult.fold(run(engine, params))
    assert [c.token_ids for c in again.completions] == [c.token_ids for c in RequestResult.fold(whole).completions]
    assert engine.stats().kv_blocks_used == 0
