"""Continuous batching through the cluster engine: many concurrent streams on a tight KV cache."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig
from tests.conftest import cluster_config, pool_config
from workers.cluster_engine import ClusterEngine

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]
NUM_BLOCKS = 24  # 24 blocks of 8 tokens: far less than 64 requests need at once


@pytest.fixture(scope="module")
def tight_cluster(demo_dir: Path) -> Iterator[ClusterEngine]:
    engine_cfg = EngineConfig(model=str(demo_dir), progress=False, num_kv_blocks=NUM_BLOCKS, block_size=8,
                              max_num_seqs=32, max_num_batched_tokens=128, max_model_len=256)
    cluster = ClusterEngine.start(engine_cfg, cluster_config(), pool_config(experts_per_worker=4))
    yield cluster
    cluster.shutdown()


async def run_concurrently(cluster: ClusterEngine, prompts: list[list[int]],
                           params: list[SamplingParams]) -> tuple[list[list[int]], int]:
    peak_waiting = 0

    async def one(prompt: list[int], p: SamplingParams) -> list[int]:
        tokens: list[int] = []
        async for out in cluster.stream(prompt, p):
            tokens.extend(t for d in out.outputs for t in d.token_ids)
        return tokens

    async def watch() -> None:
        nonlocal peak_waiting
        while True:
            peak_waiting = max(peak_waiting, (await asyncio.to_thread(cluster.stats)).num_waiting)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(one(pr, p) for pr, p in zip(prompts, params, strict=True)))
    finally:
        watcher.cancel()
    return list(results), peak_waiting


def test_64_concurrent_greedy_requests_equal_their_results_alone(tight_cluster: ClusterEngine) -> None:
    rng = random.Random(42)
    prompts = [[rng.randrange(3, 870) for _ in range(rng.randrange(1, 40))] for _ in range(64)]
    params = [SamplingParams(max_tokens=rng.randrange(1, 30), temperature=0, ignore_eos=True) for _ in prompts]
    preemptions_before = tight_cluster.stats().num_preemptions
    together, peak_waiting = asyncio.run(run_concurrently(tight_cluster, prompts, params))
    stats = tight_cluster.stats()
    assert peak_waiting > 0, "requests never had to wait"
    assert stats.num_preemptions > preemptions_before, "the KV budget never forced a preemption"
    assert stats.kv_blocks_used == 0 and stats.num_running == 0  # everything was freed
    alone = [r.completions[0].token_ids for r in (tight_cluster.generate([p], [sp])[0] for p, sp in
                                                  zip(prompts, params, strict=True))]
    for i, (a, b) in enumerate(zip(together, alone, strict=True)):
        assert a == b, f"request {i} differs"
        assert len(a) == params[i].max_tokens


def test_seeded_sampling_alone_and_in_a_busy_batch(tight_cluster: ClusterEngine) -> None:
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=2024, ignore_eos=True)
    alone = tight_cluster.generate([[11, 12, 13]], seeded)[0].completions[0].token_ids
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 870) for _ in range(rng.randrange(1, 30))] for _ in range(15)] + [[11, 12, 13]]
    params = [SamplingParams(max_tokens=25, temperature=1.0, ignore_eos=True) for _ in range(15)] + [seeded]
    busy, _ = asyncio.run(run_concurrently(tight_cluster, prompts, params))
    assert busy[-1] == alone


def test_n4_samples_share_prompt_blocks_through_the_cluster(tight_cluster: ClusterEngine) -> None:
    prompt = list(range(3, 43))  # 40 tokens = 5 blocks of 8
    peak = 0

    async def run() -> list[int]:
        nonlocal peak
        indices: list[int] = []
        params = SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
        async for out in tight_cluster.stream(prompt, params):
            indices.extend(d.index for d in out.outputs if d.token_ids)
            peak = max(peak, (await asyncio.to_thread(tight_cluster.stats)).kv_blocks_used)
        return indices

    indices = asyncio.run(run())
    assert sorted(set(indices)) == [0, 1, 2, 3]
    # 4 unshared copies of 52 tokens would need 4 * 7 = 28 blocks (more than the whole cache holds).
    assert 5 <= peak <= 5 + 4 * 2
    time.sleep(0.1)
    assert tight_cluster.stats().kv_blocks_used == 0
