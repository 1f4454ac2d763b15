"""Quantized experts on expert workers (a real local Ray): the cluster equals the local engine with the same
quantization, the workers hold the quantized bytes, and a rebalance moves quantized experts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from cluster.engine.loop import LocalEngine
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig
from cluster.model.experts import LocalExperts
from cluster.moe.layer import InProcessExperts, MoELayer
from tests.conftest import cluster_config, pool_config
from tests.test_parity_hf import prompt_ids
from workers.cluster_engine import ClusterEngine, start_pool, stop_pool

pytestmark = pytest.mark.usefixtures("ray_local")


def test_int4_cluster_equals_local_engine_before_and_after_a_rebalance(demo_dir: Path) -> None:
    cfg = EngineConfig(model=str(demo_dir), progress=False, num_kv_blocks=128, block_size=8,
                       quantize_experts="int4", quantize_group_size=64)
    local = LocalEngine.from_config(cfg)
    pool = start_pool(cfg, pool_config(experts_per_worker=4))
    cluster = ClusterEngine.start(cfg, cluster_config(), pool=pool)
    try:
        moe = local.engine.moe
        assert isinstance(moe, MoELayer) and isinstance(moe.executor, InProcessExperts)
        experts = moe.executor.experts
        assert isinstance(experts, LocalExperts) and experts.quantization == "int4-g64"
        prompts = [prompt_ids(local.model_config.vocab_size, n, seed=n) for n in (30, 5, 17)]
        greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        want_logits = local.score(prompts)
        want_tokens = [r.completions[0].token_ids for r in local.generate(prompts, greedy)]

        def check() -> None:
            for ours, theirs in zip(cluster.score(prompts), want_logits, strict=True):
                assert (ours - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()
            assert [r.completions[0].token_ids for r in cluster.generate(prompts, greedy)] == want_tokens

        check()
        stats = ray.get(pool.worker_stats.remote())
        assert {s["expert_quantization"] for s in stats} == {"int4-g64"}
        assert sum(s["expert_bytes"] for s in stats) == experts.nbytes  # every expert once, quantized

        layers = local.model_config.num_layers  # swap the two workers' experts in every layer
        report = ray.get(pool.rebalance.remote(placement=[[[4, 5, 6, 7], [0, 1, 2, 3]]] * layers))
        assert report["applied"], report
        deadline = time.monotonic() + 10
        while cluster.describe()["map_version"] != report["map_version"]:
            assert time.monotonic() < deadline, "the coordinator did not move to the new map"
            time.sleep(0.1)
        check()
        stats = ray.get(pool.worker_stats.remote())
        assert {s["expert_quantization"] for s in stats} == {"int4-g64"}
        assert sum(s["expert_bytes"] for s in stats) == experts.nbytes
    finally:
        cluster.shutdown()
        stop_pool(pool)
        local.shutdown()
