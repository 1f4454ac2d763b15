"""Two simulated Ray nodes with fake GPUs: an expert pool with one worker per GPU bundle spread over both nodes,
and a coordinator on each node; each links to the workers of its own node through shared memory and to the
others through a process group of two, and both give the local engine's outputs.

The GPUs are Ray resources only (no CUDA here), so every actor computes on the CPU; placement, GPU assignment
and the cross-node links are real.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.engine.loop import EngineLoop
from cluster.engine_config import EngineConfig
from tests.conftest import HFCheckpoint, cluster_config, pool_config
from tests.test_cluster import assert_same_outputs
from workers.cluster_engine import ClusterEngine, start_pool, stop_pool


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 6, "num_gpus": 5})
    cluster.add_node(num_cpus=6, num_gpus=5)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_workers_and_coordinators_spread_over_nodes(two_nodes: Cluster, hf_small: HFCheckpoint) -> None:
    engine_cfg = EngineConfig(model=str(hf_small.path), progress=False, num_kv_blocks=128, block_size=8)
    pool = start_pool(engine_cfg, pool_config(experts_per_worker=1, use_gpus=True, placement_strategy="SPREAD"))
    local = EngineLoop.local(engine_cfg)
    engines: list[ClusterEngine] = []
    try:
        workers = ray.get(pool.describe.remote())["workers"]
        assert len(workers) == 8 and all(len(w["gpu_ids"]) == 1 for w in workers)
        assert len({(w["node_id"], w["gpu_ids"][0]) for w in workers}) == 8  # no two workers share a GPU
        worker_nodes = [w["node_id"] for w in workers]
        assert sorted(worker_nodes.count(n) for n in set(worker_nodes)) == [4, 4]
        engines = [ClusterEngine.start(engine_cfg, cluster_config(use_gpus=True), pool=pool) for _ in range(2)]
        coordinator_nodes = [e.describe()["node_id"] for e in engines]
        assert len(set(coordinator_nodes)) == 2  # one coordinator on each node (each took a node's last GPU)
        for engine, node in zip(engines, coordinator_nodes, strict=True):
            kinds = engine.describe()["links"]
            assert kinds == ["shm" if n == node else "pg" for n in worker_nodes]
            assert_same_outputs(engine, local, hf_small.config["vocab_size"])
    finally:
        for engine in engines:
            engine.shutdown()
        stop_pool(pool)
        local.shutdown()
