"""The local engine's behaviour: stopping, seeded sampling, validation, streaming and abort."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import RequestOutput, RequestResult
from cluster.engine_config import EngineConfig
from tests.conftest import HFCheckpoint

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


PROMPT = "The workers compute and send the results back"


def test_stop_token_ids_end_generation_and_stay_out_of_the_text(engine: EngineLoop) -> None:
    base = engine.generate([PROMPT], GREEDY)[0].completions[0]
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    out = engine.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                   stop_token_ids=(stop_id,)))[0].completions[0]
    assert out.token_ids == base.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
    assert out.text == engine.tokenizer.decode(base.token_ids[:first])


def test_stop_string_spanning_tokens_is_cut_and_excluded(engine: EngineLoop) -> None:
    base = engine.generate([PROMPT], GREEDY)[0].completions[0]
    tok = engine.tokenizer
    # A stop string that starts inside one token's text and ends inside the next one's.
    start_text = tok.decode(base.token_ids[:6])
    two_tokens = tok.decode(base.token_ids[:8])[len(start_text) - 1:]
    stop = two_tokens[: max(2, len(two_tokens) - 1)]
    assert len(stop) >= 2
    index = base.text.find(stop)
    out = engine.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                   stop=(stop, "never-appears")))[0].completions[0]
    assert out.text == base.text[:index]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_streamed_text_never_shows_part_of_a_stop_string(engine: EngineLoop) -> None:
    base = engine.generate([PROMPT], GREEDY)[0].completions[0]
    stop = base.text[len(base.text) // 2: len(base.text) // 2 + 4]
    deltas: list[str] = []

    async def run() -> None:
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,))
        async for out in engine.stream(PROMPT, params):
            deltas.extend(d.text for d in out.outputs)

    asyncio.run(run())
    streamed = "".join(deltas)
    assert streamed == base.text[: base.text.find(stop)]
    assert all(stop not in streamed[: i + len(d)] for i, d in enumerate(deltas))


def test_eos_stops_unless_ignored(hf_small: HFCheckpoint, tmp_path: Path) -> None:
    shutil.copytree(hf_small.path, tmp_path / "m")
    probe = EngineLoop.local(EngineConfig(model=str(tmp_path / "m"), progress=False, num_kv_blocks=64))
    prompt = [5, 9, 11, 30, 7]
    base = probe.generate([prompt], GREEDY)[0].completions[0]
    probe.shutdown()
    eos = base.token_ids[3]
    raw = json.loads((tmp_path / "m" / "config.json").read_text()) | {"eos_token_id": eos}
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    eng = EngineLoop.local(EngineConfig(model=str(tmp_path / "m"), progress=False, num_kv_blocks=64))
    try:
        stopped = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0))[0].completions[0]
        assert stopped.token_ids == base.token_ids[: base.token_ids.index(eos) + 1]
        assert (stopped.finish_reason, stopped.stop_reason) == ("stop", None)
        ignored = eng.generate([prompt], GREEDY)[0].completions[0]
        assert ignored.token_ids == base.token_ids and ignored.finish_reason == "length"
    finally:
        eng.shutdown()


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine: EngineLoop) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = engine.generate([PROMPT], params)[0].completions[0].token_ids
    busy = engine.generate(["other words", PROMPT, "a third prompt that is longer than the others"],
                           [SamplingParams(max_tokens=20, temperature=1.0), params, GREEDY])
    assert busy[1].completions[0].token_ids == alone
    other_seed = engine.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.9, seed=99))
    assert other_seed[0].completions[0].token_ids != alone


def test_unseeded_sampling_differs_per_request(engine: EngineLoop) -> None:
    """As in vLLM: without a seed every request draws anew (the demo model's near-uniform distribution over
    hundreds of tokens makes two equal 16-token samples practically impossible)."""
    params = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    first, second = engine.generate([PROMPT, PROMPT], params)
    assert first.completions[0].token_ids != second.completions[0].token_ids


def test_the_seed_drawn_for_an_unseeded_request_is_reported_and_is_the_one_it_samples_with(engine: EngineLoop
                                                                                           ) -> None:
    """The input processor draws the seed of an unseeded request (once: the engine draws none) and the first
    output reports it; a request given that seed samples the same tokens (n=2: both samples)."""
    params = SamplingParams(n=2, max_tokens=12, temperature=1.0, ignore_eos=True)

    async def first_and_all() -> list[RequestOutput]:
        return [out async for out in engine.stream(PROMPT, params)]

    outs = asyncio.run(first_and_all())
    seed = outs[0].seed
    assert seed is not None and all(out.seed is None for out in outs[1:])
    drawn = RequestResult.fold(outs).completions
    again = engine.generate([PROMPT], SamplingParams(n=2, max_tokens=12, temperature=1.0, ignore_eos=True,
                                                     seed=seed))[0].completions
    assert [c.token_ids for c in again] == [c.token_ids for c in drawn]


def test_top_k_one_is_greedy(engine: EngineLoop) -> None:
    greedy = engine.generate([PROMPT], GREEDY)[0].completions[0].token_ids
    top1 = engine.generate([PROMPT], SamplingParams(max_tokens=24, temperature=1.5, top_k=1, seed=3,
                                                    ignore_eos=True))[0].completions[0].token_ids
    assert top1 == greedy


def test_max_tokens_and_usage(engine: EngineLoop) -> None:
    result = engine.generate([PROMPT], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0]
    assert len(result.completions[0].token_ids) == 7 and result.completions[0].finish_reason == "length"
    assert result.num_prompt_tokens == len(engine.tokenizer.encode(PROMPT))
    assert result.num_generated_tokens == 7
    assert result.metrics is not None and result.metrics.ttft is not None and result.metrics.e2e is not None


@pytest.mark.parametrize(("prompt", "params", "message"), [
    ([], GREEDY, "prompt must contain at least one token"),
    ([1, 5000], GREEDY, "prompt token id 5000 at position 1 is outside the vocabulary"),
    ([1] * 256, GREEDY, "the prompt has 256 tokens but the model's context length is 256"),
    ([1] * 200, SamplingParams(max_tokens=100), r"plus max_tokens \(100\) exceeds the model's context length"),
    ([1] * 10, SamplingParams(stop_token_ids=(9999,)), "stop_token_ids holds 9999"),
])
def test_bad_requests_are_rejected_up_front(engine: EngineLoop, prompt: list[int], params: SamplingParams,
                                           message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.generate([prompt], params)
    assert engine.health()["alive"]  # and the engine keeps serving
    assert engine.generate([PROMPT], SamplingParams(max_tokens=2))[0].completions[0].token_ids


def test_request_too_big_for_the_kv_cache(demo_dir: Path) -> None:
    eng = EngineLoop.local(EngineConfig(model=str(demo_dir), progress=False, num_kv_blocks=4,
                                        block_size=8))
    try:
        with pytest.raises(ValueError, match="needs 5 KV cache blocks but the cache holds only 4"):
            eng.generate([[1] * 30], SamplingParams(max_tokens=8))
    finally:
        eng.shutdown()


def test_stream_reports_deltas_then_finishes(engine: EngineLoop) -> None:
    outs: list[RequestOutput] = []

    async def run() -> None:
        async for out in engine.stream(PROMPT, GREEDY):
            outs.append(out)

    asyncio.run(run())
    full = engine.generate([PROMPT], GREEDY)[0].completions[0]
    assert outs[0].prompt_token_ids == engine.tokenizer.encode(PROMPT)
    assert [t for o in outs for d in o.outputs for t in d.token_ids] == full.token_ids
    assert "".join(d.text for o in outs for d in o.outputs) == full.text
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])


def test_paced_stream_batches_tokens_and_sends_the_last_at_once(engine: EngineLoop) -> None:
    """With an interval, batches after the first are that far apart, except the final one, which comes as soon
    as the request finishes (not at the next tick); nothing is lost or reordered."""
    interval = 10.0  # longer than the whole generation: everything after the first batch is one final batch
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def run() -> tuple[list[list[RequestOutput]], float]:
        batches: list[list[RequestOutput]] = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        async for batch in engine.stream_batches(PROMPT, params, interval_s=lambda: interval):
            batches.append(batch)
        return batches, loop.time() - started

    batches, elapsed = asyncio.run(run())
    assert elapsed < interval  # the finished output did not wait for the interval
    assert len(batches) <= 2 and batches[-1][-1].finished  # the first batch (sent at once), then the rest
    full = engine.generate([PROMPT], params)[0].completions[0]
    assert [t for b in batches for o in b for d in o.outputs for t in d.token_ids] == full.token_ids


def test_a_whole_stream_is_the_first_report_then_all_the_rest_at_once(engine: EngineLoop) -> None:
    """``whole=True`` (a consumer that takes the answer whole): the engine delivers the first report at once and
    holds the others until the request finishes, so its consumer gets two batches where a plain stream gets one
    per step; nothing is lost or reordered, and a request that finishes in its first report is one batch."""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def batches(whole: bool, p: SamplingParams = params) -> list[list[RequestOutput]]:
        return [batch async for batch in engine.stream_batches(PROMPT, p, whole=whole)]

    plain, whole = asyncio.run(batches(False)), asyncio.run(batches(True))
    assert len(plain) > 2  # (each step's report reaches a plain stream's consumer on its own)
    assert [len(b) for b in whole[:1]] == [1] and len(whole) == 2
    assert [o.finished for b in whole for o in b] == [False] * (sum(map(len, whole)) - 1) + [True]
    full = engine.generate([PROMPT], params)[0]
    assert RequestResult.fold([o for b in whole for o in b]).completions == full.completions
    one = asyncio.run(batches(True, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)))
    assert len(one) == 1 and one[0][-1].finished
    assert one[0][-1].outputs[0].token_ids == full.completions[0].token_ids[:1]


def test_leaving_a_stream_aborts_and_frees_blocks(engine: EngineLoop) -> None:
    async def run() -> int:
        seen = 0
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        stream_gen = engine.stream(PROMPT, params)
        assert isinstance(stream_gen, AsyncGenerator)  # so that it can be closed
        async with contextlib.aclosing(stream_gen) as stream:
            async for _ in stream:
                seen += 1
                if seen == 3:
                    break
        return seen

    assert asyncio.run(run()) == 3
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


def test_n_samples_and_echo_with_prompt_logprobs(engine: EngineLoop) -> None:
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=5, n=3, logprobs=2, echo=True)
    result = engine.generate([PROMPT], params)[0]
    assert [c.index for c in result.completions] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 and len(c.logprobs or []) == 6 for c in result.completions)
    assert len({tuple(c.token_ids) for c in result.completions}) > 1
    prompt_ids = engine.tokenizer.encode(PROMPT)
    assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == len(prompt_ids)
    assert result.prompt_logprobs[0] is None
    assert [lp.token_id for lp in result.prompt_logprobs[1:]] == prompt_ids[1:]  # type: ignore[union-attr]


def test_a_failing_consumer_does_not_stop_the_engine(engine: EngineLoop) -> None:
    def broken_sink(out: RequestOutput) -> None:
        raise RuntimeError("consumer went away")

    engine.submit([PROMPT], [SamplingParams(max_tokens=50, ignore_eos=True)], [broken_sink]).result()
    assert engine.generate([PROMPT], SamplingParams(max_tokens=3))[0].completions[0].token_ids
    stats = engine.stats()
    assert engine.health()["alive"] and stats.kv_blocks_used == 0 and stats.num_running == 0


def test_drain_refuses_new_requests_and_lets_running_ones_finish(demo_dir: Path) -> None:
    import threading

    from cluster.errors import EngineDeadError

    eng = EngineLoop.local(EngineConfig(model=str(demo_dir), progress=False, num_kv_blocks=64))
    try:
        done: dict[str, object] = {}
        thread = threading.Thread(target=lambda: done.setdefault("out", eng.generate(
            [PROMPT], SamplingParams(max_tokens=150, temperature=0, ignore_eos=True))))
        thread.start()
        while eng.stats().num_running == 0:
            pass
        assert eng.drain(timeout_s=60) is True
        thread.join(timeout=60)
        result = done["out"][0]  # type: ignore[index]
        assert len(result.completions[0].token_ids) == 150  # the running request finished in full
        with pytest.raises(EngineDeadError, match="shutting down"):
            eng.generate([PROMPT], GREEDY)
        assert eng.health() == {"alive": False, "reason": "draining"}
    finally:
        eng.shutdown()
