"""The continuation form of a request, on the local engine: a request cut after any report and continued (from
what its consumer had received) ends exactly as the uninterrupted request - tokens, text, stop strings, finish
reasons, logprobs and usage - and its reports carry only what comes after the cut."""

from __future__ import annotations

import asyncio

import pytest

from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import Continuation, RequestOutput, RequestResult, SampleSoFar
from cluster.errors import RequestError
from cluster.model.tokenizer import IncrementalDetokenizer

PROMPT = "The workers compute and send the results back"


def run(engine: EngineLoop, params: SamplingParams, continuation: Continuation | None = None
       ) -> list[RequestOutput]:
    async def reports() -> list[RequestOutput]:
        return [out async for out in engine.stream(PROMPT, params, continuation=continuation)]

    return asyncio.run(reports())


def received(outputs: list[RequestOutput], n: int) -> Continuation:
    """What a consumer holds after ``outputs``: per sample, the tokens, the characters of text, finished or not."""
    tokens: list[list[int]] = [[] for _ in range(n)]
    chars, finished = [0] * n, [False] * n
    for out in outputs:
        for d in out.outputs:
            tokens[d.index] += d.token_ids
            chars[d.index] += len(d.text)
            finished[d.index] = finished[d.index] or d.finish_reason is not None
    return Continuation(tuple(SampleSoFar(tuple(t), c, f) for t, c, f in zip(tokens, chars, finished, strict=True)))


def assert_same(joined: RequestResult, whole: RequestResult) -> None:
    assert joined.prompt_token_ids == whole.prompt_token_ids
    assert (joined.num_prompt_tokens, joined.num_generated_tokens) == (whole.num_prompt_tokens,
                                                                       whole.num_generated_tokens)
    for got, want in zip(joined.completions, whole.completions, strict=True):
        assert (got.index, got.token_ids, got.text) == (want.index, want.token_ids, want.text)
        assert (got.finish_reason, got.stop_reason) == (want.finish_reason, want.stop_reason)
        if want.logprobs is None:
            assert got.logprobs is None
            continue
        assert got.logprobs is not None and len(got.logprobs) == len(want.logprobs)
        for g, w in zip(got.logprobs, want.logprobs, strict=True):  # a prefill computes what decode steps did
            assert g.token_id == w.token_id and g.logprob == pytest.approx(w.logprob, abs=1e-4)
            assert [t for t, _ in g.top] == [t for t, _ in w.top]


def cut_and_continue(engine: EngineLoop, params: SamplingParams, whole: list[RequestOutput], k: int
                    ) -> tuple[Continuation, list[RequestOutput]]:
    """Cut ``whole`` after its k-th report, continue it, and check the joined result equals ``whole``."""
    before = received(whole[:k], params.n)
    after = run(engine, params, before)
    assert after and all(out.prompt_token_ids is None for out in after)  # the prompt went out before the cut
    assert all(not d.token_ids or d.index not in {i for i, s in enumerate(before.samples) if s.finished}
               for out in after for d in out.outputs), "a finished sample was generated again"
    assert_same(RequestResult.fold(whole[:k] + after), RequestResult.fold(whole))
    return before, after


def test_greedy_request_cut_anywhere_continues_exactly(engine: EngineLoop) -> None:
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    whole = run(engine, params)
    assert len(whole) == 20  # one report per token: every cut point is tried
    hits_before = engine.stats().prefix_cache_hits_total
    for k in range(1, len(whole)):
        cut_and_continue(engine, params, whole, k)
    stats = engine.stats()
    assert stats.kv_blocks_used == 0
    # Prefix caching (on, as by default): a continuation's prefill (prompt + tokens received) found the blocks the
    # whole request left, and still ended exactly as it did.
    assert stats.prefix_cache_hits_total > hits_before


def test_seeded_sampled_n2_with_stop_strings_and_logprobs_continues_exactly(engine: EngineLoop) -> None:
    base = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, n=2, logprobs=2, ignore_eos=True)
    free = RequestResult.fold(run(engine, base)).completions
    # A stop string from the middle of sample 1's text: sample 1 stops early, sample 0 runs on.
    text = free[1].text
    middle = len(text) // 3
    stop = text[middle:middle + 3]
    assert stop.strip() and stop not in free[0].text, "pick another seed: the stop string must end sample 1 only"
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, n=2, logprobs=2,
                            ignore_eos=True, stop=(stop, "never appears"))
    whole = run(engine, params)
    final = RequestResult.fold(whole).completions
    assert (final[1].finish_reason, final[1].stop_reason) == ("stop", stop)
    assert final[0].finish_reason == "length"
    finished_before_cut = held_back = 0
    for k in range(1, len(whole)):
        before, _ = cut_and_continue(engine, params, whole, k)
        finished_before_cut += before.samples[1].finished
        detok = IncrementalDetokenizer(engine.tokenizer, RequestResult.fold(whole).prompt_token_ids)
        full_text = "".join(detok.add(t) for t in before.samples[1].token_ids)
        held_back += not before.samples[1].finished and before.samples[1].text_chars < len(full_text)
    assert finished_before_cut > 0, "no cut came after sample 1 had finished"
    assert held_back > 0, "no cut came while text was held back for a possible stop string"
    assert engine.stats().kv_blocks_used == 0


def test_unseeded_request_resumes_exactly_with_the_seed_its_engine_reported(engine: EngineLoop) -> None:
    """The gateway's resume bookkeeping (router_service/resume.py) with a real engine: an unseeded sampled n=2
    request gets its seed from the engine's input processor (reported in the first output, pinned with
    ``with_seed``, as the gateway does on Accepted); cut after its 3rd report and resumed from what the client had
    (Progress), it ends exactly as the uninterrupted request."""
    from router_service.engine_api import GenerateRequest
    from router_service.resume import Progress, resumed, with_seed

    request = GenerateRequest("r", SamplingParams(max_tokens=16, temperature=1.0, n=2, ignore_eos=True),
                              prompt=PROMPT)
    whole = run(engine, request.params)
    assert request.params.seed is None and whole[0].seed is not None
    pinned = with_seed(request, whole[0].seed)
    progress = Progress.of(pinned)
    for out in whole[:3]:
        progress.record(out)
    again = resumed(pinned, progress)
    assert again.params.seed == whole[0].seed and again.continuation is not None
    after = run(engine, again.params, again.continuation)
    assert_same(RequestResult.fold(whole[:3] + after), RequestResult.fold(whole))


def test_continuation_is_validated(engine: EngineLoop) -> None:
    one = Continuation((SampleSoFar((5, 6), 3),))
    cases = [(SamplingParams(max_tokens=8, temperature=0.7), one, "seed"),
             (SamplingParams(max_tokens=8, temperature=0, n=2), one, "continuation"),
             (SamplingParams(max_tokens=2, temperature=0), one, "continuation"),
             (SamplingParams(max_tokens=8, temperature=0), Continuation((SampleSoFar((5,), 0, True),)), "continuation"),
             (SamplingParams(max_tokens=8, temperature=0), Continuation((SampleSoFar((10**6,), 0),)), "continuation"),
             (SamplingParams(max_tokens=8, temperature=0), Continuation((SampleSoFar((5,), 10**4),)), "continuation")]
    for params, continuation, param in cases:
        with pytest.raises(RequestError) as err:
            run(engine, params, continuation)
        assert err.value.param == param, (params, continuation, err.value)
