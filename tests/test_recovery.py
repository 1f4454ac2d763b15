"""Failures on a real local Ray, with two coordinators sharing one expert pool: an expert worker's death
costs nothing (the pool replaces only that worker, every coordinator recomputes its in-flight requests, none is
lost or answered twice, outputs do not change); a coordinator's death leaves the pool and the other coordinator
serving, and no worker stuck."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray

from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import RequestOutput
from cluster.engine_config import EngineConfig
from tests.conftest import cluster_config, pool_config
from workers.cluster_engine import ClusterEngine, start_pool, stop_pool

pytestmark = pytest.mark.usefixtures("ray_local")


@dataclass
class Pair:
    pool: Any
    engines: list[ClusterEngine]


@pytest.fixture(scope="module")
def pair(demo_dir: Path) -> Iterator[Pair]:
    engine_cfg = EngineConfig(model=str(demo_dir), progress=False, num_kv_blocks=512, block_size=8,
                              max_num_seqs=32, max_model_len=512)
    pool = start_pool(engine_cfg, pool_config(experts_per_worker=2))
    engines = [ClusterEngine.start(engine_cfg, cluster_config(), pool=pool) for _ in range(2)]
    yield Pair(pool, engines)
    for engine in engines:
        engine.shutdown()
    stop_pool(pool)


def workload(n: int = 16) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 870) for _ in range(rng.randrange(2, 30))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randrange(60, 120), temperature=0, ignore_eos=True) for _ in range(n)]
    params[-1] = SamplingParams(max_tokens=100, temperature=0.9, top_p=0.95, seed=77, ignore_eos=True)  # seeded
    return prompts, params


def kill_worker(pool: Any, index: int) -> int:
    pid = int(ray.get(pool.describe.remote())["workers"][index]["pid"])
    os.kill(pid, signal.SIGKILL)
    return pid


def run_streams(engines: list[ClusterEngine], prompts: list[list[int]], params: list[SamplingParams],
                on_progress: Any = None) -> list[list[RequestOutput]]:
    """All requests concurrently, spread over the engines in turn; returns every report each one got.
    ``on_progress(tokens_so_far)`` is called while they run."""
    produced = [0]

    async def one(engine: ClusterEngine, prompt: list[int], p: SamplingParams) -> list[RequestOutput]:
        outs = []
        async for out in engine.stream(prompt, p):
            outs.append(out)
            produced[0] += sum(len(d.token_ids) for d in out.outputs)
        return outs

    async def main() -> list[list[RequestOutput]]:
        tasks = [asyncio.create_task(one(engines[i % len(engines)], pr, p))
                 for i, (pr, p) in enumerate(zip(prompts, params, strict=True))]
        if on_progress is not None:
            while not all(t.done() for t in tasks):
                await asyncio.to_thread(on_progress, produced[0])
                await asyncio.sleep(0.05)
        return list(await asyncio.gather(*tasks))

    return asyncio.run(main())


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for d in o.outputs for t in d.token_ids]


def assert_once_and_equal(got: list[list[RequestOutput]], want: list[list[int]], params: list[SamplingParams]) -> None:
    for i, (outs, expected) in enumerate(zip(got, want, strict=True)):
        assert sum(o.finished for o in outs) == 1 and outs[-1].finished, f"request {i} not answered exactly once"
        assert tokens(outs) == expected, f"request {i} changed"
        assert len(expected) == params[i].max_tokens


def recoveries(engines: list[ClusterEngine]) -> list[int]:
    return [engine.stats().recoveries for engine in engines]


def test_worker_killed_during_16_generations_over_2_coordinators(pair: Pair) -> None:
    prompts, params = workload()
    baseline = [tokens(outs) for outs in run_streams(pair.engines, prompts, params)]
    before = recoveries(pair.engines)
    killed: list[int] = []

    def kill_once_running(produced: int) -> None:
        if not killed and produced > 200:
            killed.append(kill_worker(pair.pool, 1))

    got = run_streams(pair.engines, prompts, params, kill_once_running)
    assert killed and all(after == b + 1 for after, b in zip(recoveries(pair.engines), before, strict=True))
    assert_once_and_equal(got, baseline, params)
    pool = ray.get(pair.pool.describe.remote())
    assert [(r["worker"], r["generation"]) for r in pool["replacements"]][-1:] == [(1, 1)]  # replaced once
    assert len(pool["replacements"]) == 1 and "expert worker 1" in pool["replacements"][0]["reason"]
    print(f"\nexpert worker 1 (pid {killed[0]}) replaced in {pool['replacements'][0]['seconds']:.2f}s; "
          f"coordinators' recovery: {[round(e.stats().last_recovery_seconds, 2) for e in pair.engines]}s")


@pytest.mark.slow
def test_worker_killed_twice_in_a_row(pair: Pair) -> None:
    prompts, params = workload()
    baseline = [tokens(outs) for outs in run_streams(pair.engines, prompts, params)]
    before = sum(recoveries(pair.engines))
    kills: list[int] = []

    def kill_twice(produced: int) -> None:
        if (len(kills) == 0 and produced > 150) or (len(kills) == 1 and sum(recoveries(pair.engines)) > before
                                                     and produced > 400):
            kills.append(kill_worker(pair.pool, 3 if kills else 0))

    got = run_streams(pair.engines, prompts, params, kill_twice)
    assert len(kills) == 2
    assert_once_and_equal(got, baseline, params)


@pytest.mark.slow
def test_worker_killed_while_idle_then_requests_during_recovery(pair: Pair) -> None:
    prompts, params = workload(4)
    engine = pair.engines[0]
    baseline = [r.completions[0].token_ids for r in engine.generate(prompts, params)]
    before = engine.stats().recoveries
    kill_worker(pair.pool, 2)
    results: dict[str, Any] = {}

    def submit_right_away() -> None:  # arrives while the heartbeat notices the death and recovery runs
        results["out"] = engine.generate(prompts, params)

    thread = threading.Thread(target=submit_right_away)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert [r.completions[0].token_ids for r in results["out"]] == baseline
    deadline = time.monotonic() + 30
    while engine.stats().recoveries == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine.stats().recoveries == before + 1 and engine.health()["alive"]


def test_coordinator_killed_leaves_the_pool_and_the_other_coordinator_serving(pair: Pair, demo_dir: Path) -> None:
    """SIGKILL a third coordinator's process while both it and a surviving one generate: the survivor's requests
    all complete correctly, new requests are served, and every worker dropped the dead coordinator's links."""
    prompts, params = workload(8)
    survivor = pair.engines[0]
    baseline = [r.completions[0].token_ids for r in survivor.generate(prompts, params)]
    doomed = ClusterEngine.start(survivor.engine_cfg, cluster_config(), pool=pair.pool)
    doomed_pid = ray.get(doomed.coordinator.describe.remote())["pid"]
    links_before = [s["links_closed"] for s in ray.get(pair.pool.worker_stats.remote())]
    results: dict[str, Any] = {}

    def survivor_runs() -> None:
        results["survivor"] = survivor.generate(prompts, params)

    def doomed_runs() -> None:
        try:
            doomed.generate(prompts, params)
        except Exception as err:
            results["doomed"] = err

    threads = [threading.Thread(target=survivor_runs), threading.Thread(target=doomed_runs)]
    for thread in threads:
        thread.start()
    while survivor.stats().generation_tokens_total == 0 or doomed.stats().generation_tokens_total == 0:
        time.sleep(0.05)
    os.kill(doomed_pid, signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=120)
    assert [r.completions[0].token_ids for r in results["survivor"]] == baseline
    assert "died" in str(results["doomed"])
    assert [r.completions[0].token_ids for r in survivor.generate(prompts, params)] == baseline  # new requests
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        closed = [s["links_closed"] for s in ray.get(pair.pool.worker_stats.remote())]
        if all(c >= b + 1 for c, b in zip(closed, links_before, strict=True)):
            break
        time.sleep(0.2)
    assert all(c >= b + 1 for c, b in zip(closed, links_before, strict=True)), "a worker kept a dead link"
    assert all(ray.get(w.ping.remote())["loop_alive"] for w in ray.get(pair.pool.worker_handles.remote()))
    doomed.shutdown()
