"""Expert-worker failures on a real local Ray: the engine replaces the worker, rebuilds the process group and
recomputes every in-flight request; nothing is lost, nothing is answered twice, outputs do not change."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.cluster_engine import ClusterEngine
from cluster.engine_config import EngineConfig
from cluster.sampling import SamplingParams
from cluster.sequence import RequestOutput
from tests.conftest import cluster_config

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def cluster(demo_dir: Path) -> Iterator[ClusterEngine]:
    engine_cfg = EngineConfig(model=str(demo_dir), progress=False, num_kv_blocks=512, block_size=8,
                              max_num_seqs=32, max_model_len=512)
    engine = ClusterEngine.start(engine_cfg, cluster_config(experts_per_worker=2))
    yield engine
    engine.shutdown()


def workload(n: int = 16) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 870) for _ in range(rng.randrange(2, 30))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randrange(60, 120), temperature=0, ignore_eos=True) for _ in range(n)]
    params[-1] = SamplingParams(max_tokens=100, temperature=0.9, top_p=0.95, seed=77, ignore_eos=True)  # seeded
    return prompts, params


def kill_worker(cluster: ClusterEngine, index: int) -> int:
    pid = int(cluster.describe()["workers"][index]["pid"])
    os.kill(pid, signal.SIGKILL)
    return pid


def run_streams(cluster: ClusterEngine, prompts: list[list[int]], params: list[SamplingParams],
                on_progress: Any = None) -> list[list[RequestOutput]]:
    """All requests concurrently; returns every report each one got. ``on_progress(tokens_so_far)``."""
    produced = [0]

    async def one(prompt: list[int], p: SamplingParams) -> list[RequestOutput]:
        outs = []
        async for out in cluster.stream(prompt, p):
            outs.append(out)
            produced[0] += sum(len(d.token_ids) for d in out.outputs)
        return outs

    async def main() -> list[list[RequestOutput]]:
        tasks = [asyncio.create_task(one(pr, p)) for pr, p in zip(prompts, params, strict=True)]
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


def test_worker_killed_during_16_generations(cluster: ClusterEngine) -> None:
    prompts, params = workload()
    baseline = [tokens(outs) for outs in run_streams(cluster, prompts, params)]
    before = cluster.stats().recoveries
    killed: list[int] = []

    def kill_once_running(produced: int) -> None:
        if not killed and produced > 200:
            killed.append(kill_worker(cluster, 1))

    got = run_streams(cluster, prompts, params, kill_once_running)
    stats = cluster.stats()
    assert killed and stats.recoveries == before + 1
    assert_once_and_equal(got, baseline, params)
    recovery = cluster.describe()["recoveries"][-1]
    assert recovery["replaced"] == [1] and "expert worker 1" in recovery["reason"]
    print(f"\nrecovery after killing expert worker 1 (pid {killed[0]}): {recovery['seconds']:.2f}s "
          f"(engine view, incl. re-forming the group: {stats.last_recovery_seconds:.2f}s)")


def test_worker_killed_twice_in_a_row(cluster: ClusterEngine) -> None:
    prompts, params = workload()
    baseline = [tokens(outs) for outs in run_streams(cluster, prompts, params)]
    before = cluster.stats().recoveries
    kills: list[int] = []

    def kill_twice(produced: int) -> None:
        if (len(kills) == 0 and produced > 150) or (len(kills) == 1 and cluster.stats().recoveries > before
                                                     and produced > 400):
            kills.append(kill_worker(cluster, 3 if kills else 0))

    got = run_streams(cluster, prompts, params, kill_twice)
    assert len(kills) == 2 and cluster.stats().recoveries == before + 2
    assert_once_and_equal(got, baseline, params)
    print(f"\nrecoveries: {[round(r['seconds'], 2) for r in cluster.describe()['recoveries'][-2:]]}s")


def test_worker_killed_while_idle_then_requests_during_recovery(cluster: ClusterEngine) -> None:
    prompts, params = workload(4)
    baseline = [r.completions[0].token_ids for r in cluster.generate(prompts, params)]
    before = cluster.stats().recoveries
    kill_worker(cluster, 2)
    results: dict[str, Any] = {}

    def submit_right_away() -> None:  # arrives while the heartbeat notices the death and recovery runs
        results["out"] = cluster.generate(prompts, params)

    thread = threading.Thread(target=submit_right_away)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert [r.completions[0].token_ids for r in results["out"]] == baseline
    deadline = time.monotonic() + 30
    while cluster.stats().recoveries == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.stats().recoveries == before + 1 and cluster.health()["alive"]
