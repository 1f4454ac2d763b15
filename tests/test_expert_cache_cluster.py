"""The expert cache in a real pool (issue 23): workers holding K of their experts per layer, prefetch hints over the
shared-memory links as msgpack, and the same greedy tokens as the local engine with every expert resident."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig, PoolConfig
from cluster.model.demo import TRAINED_DEMO
from router_service.cli import build_parser
from router_service.serve_config import resolve_config
from tests.conftest import cluster_config, pool_config

PROMPTS = ["And the word of the LORD came unto Jonah", "So the shipmen were afraid, and cried",
           "Then Jonah prayed unto the LORD his God out of the fish's belly"]
PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def test_serve_flags_reach_the_pool_options() -> None:
    args = build_parser().parse_args(["serve", "--model", str(TRAINED_DEMO), "--expert-cache-size", "2",
                                      "--expert-prefetch-lookahead", "2"])
    pool = resolve_config(args)["applications"][0]["args"]["pool_options"]
    assert pool["expert_cache_size"] == 2 and pool["expert_prefetch_lookahead"] == 2
    with pytest.raises(ValueError, match="expert_cache_size must be an integer >= 0 .* got -1"):
        PoolConfig(expert_cache_size=-1)
    with pytest.raises(ValueError, match="expert_prefetch_lookahead must be 0 .* got 3"):
        PoolConfig(expert_prefetch_lookahead=3)


@pytest.fixture(scope="module")
def engine_cfg() -> EngineConfig:
    return EngineConfig(model=str(TRAINED_DEMO), progress=False, block_size=8, max_model_len=256, max_num_seqs=8)


@pytest.fixture(scope="module")
def expected(engine_cfg: EngineConfig) -> Iterator[list[list[int]]]:
    from cluster.engine.loop import EngineLoop

    local = EngineLoop.local(engine_cfg)
    try:
        yield [r.completions[0].token_ids for r in local.generate(PROMPTS, PARAMS)]
    finally:
        local.shutdown()


@pytest.mark.parametrize(("lookahead", "link"), [(1, "shm"), pytest.param(0, "shm", marks=pytest.mark.slow),
                                                 pytest.param(2, "pg", marks=pytest.mark.slow)])
def test_a_pool_with_expert_caches_generates_the_all_resident_tokens(lookahead: int, link: str,
                                                                    engine_cfg: EngineConfig,
                                                                    expected: list[list[int]],
                                                                    ray_local: None) -> None:
    """Two workers of 4 experts per layer, 2 resident: every expert call goes through the cache; hints travel on
    both kinds of link."""
    from workers.cluster_engine import ClusterEngine, start_pool, stop_pool

    pool = start_pool(engine_cfg, pool_config(experts_per_worker=4, expert_cache_size=2,
                                              expert_prefetch_lookahead=lookahead))
    try:
        engine = ClusterEngine.start(engine_cfg, cluster_config(link=link), pool=pool)
        try:
            got = [r.completions[0].token_ids for r in engine.generate(PROMPTS, PARAMS)]
            stats: list[dict[str, Any]] = engine.worker_stats()
            links = engine.describe()["links"]
        finally:
            engine.shutdown()
    finally:
        stop_pool(pool)
    assert got == expected
    assert links == [link, link] and len(stats) == 2
    all_resident = 4 * 4 * 3 * 256 * 512 * 4  # 4 experts x 4 layers x w1/w2/w3 of 256 x 512 float32
    for s in stats:
        assert s["expert_bytes"] * 2 == all_resident  # half of the hosted experts resident
        assert s["expert_cache_misses"] > 0 and s["expert_cache_loads"] >= s["expert_cache_misses"]
        assert (s["hints"] > 0) == bool(lookahead) and (s["expert_cache_prefetch_issued"] > 0) == bool(lookahead)


@pytest.mark.slow
def test_a_rebalance_and_a_replaced_worker_start_cold_and_stay_exact(engine_cfg: EngineConfig,
                                                                     expected: list[list[int]],
                                                                     ray_local: None) -> None:
    """Replicas count against the cache (3 experts per layer per worker, 2 resident); a new map's weights are a
    cold cache; a killed worker's replacement too; every output equals the all-resident one."""
    import ray

    from tests.test_recovery import kill_worker
    from workers.cluster_engine import ClusterEngine, start_pool, stop_pool

    pool = start_pool(engine_cfg, pool_config(experts_per_worker=4, redundant_experts=2, expert_cache_size=2))
    try:
        engine = ClusterEngine.start(engine_cfg, cluster_config(), pool=pool)
        try:
            placement = [[[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]] for _ in range(4)]  # experts 0 and 4 replicated
            report = ray.get(pool.rebalance.remote(placement=placement))
            assert report["applied"], report
            while engine.describe()["map_version"] != report["map_version"]:
                time.sleep(0.1)
            assert [r.completions[0].token_ids for r in engine.generate(PROMPTS, PARAMS)] == expected
            stats = sorted(engine.worker_stats(), key=lambda s: s["worker_index"])
            assert all(s["expert_bytes"] == 2 * 4 * 3 * 256 * 512 * 4 for s in stats)  # K=2 of 5 hosted, 4 layers
            kill_worker(pool, 1)
            assert [r.completions[0].token_ids for r in engine.generate(PROMPTS, PARAMS)] == expected
            replaced = sorted(engine.worker_stats(), key=lambda s: s["worker_index"])[1]
            assert replaced["generation"] > stats[1]["generation"]
            assert replaced["expert_cache_misses"] > 0 and replaced["expert_bytes"] == stats[1]["expert_bytes"]
        finally:
            engine.shutdown()
    finally:
        stop_pool(pool)


def test_the_expert_load_picture_reads_the_cache_hit_rate() -> None:
    from router_service.expert_load import parse_load

    def page(hits: tuple[int, int], misses: tuple[int, int]) -> str:
        lines = ['ray_moe_cluster_expert_tokens_total{layer="0",expert="0",model="m"} 5.0']
        for w in (0, 1):
            lines += [f'ray_moe_cluster_expert_cache_hits_total{{worker="{w}",model="m"}} {hits[w]}.0',
                      f'ray_moe_cluster_expert_cache_misses_total{{worker="{w}",model="m"}} {misses[w]}.0']
        return "\n".join(lines) + "\n"

    before, after = parse_load(page((3, 5), (2, 0))), parse_load(page((13, 9), (4, 2)))
    assert before.cache_hit_rate == 8 / 10 and after.since(before).cache_hit_rate == 14 / 18
    assert parse_load('ray_moe_cluster_expert_tokens_total{layer="0",expert="0"} 1.0\n').cache_hit_rate is None
