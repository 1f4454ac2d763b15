"""Two simulated Ray nodes with fake GPUs: one expert worker per GPU bundle, spread over nodes, same outputs.

The GPUs are Ray resources only (no CUDA here), so every actor computes on the CPU over gloo; placement,
GPU assignment and the cross-node process group are real.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.cluster_engine import ClusterEngine
from cluster.engine_config import EngineConfig
from cluster.engine_loop import LocalEngine
from tests.conftest import HFCheckpoint, cluster_config
from tests.test_cluster import _assert_released, assert_same_outputs


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


def test_one_worker_per_gpu_bundle_spread_over_nodes(two_nodes: Cluster, hf_small: HFCheckpoint) -> None:
    engine_cfg = EngineConfig(model=str(hf_small.path), progress=False, num_kv_blocks=128, block_size=8)
    cluster = ClusterEngine.start(engine_cfg, cluster_config(experts_per_worker=1))
    local = LocalEngine.from_config(engine_cfg)
    try:
        workers = cluster.info["workers"]
        assert len(workers) == 8
        assert all(len(w["gpu_ids"]) == 1 for w in workers)
        placed = {(w["node_id"], w["gpu_ids"][0]) for w in workers}
        assert len(placed) == 8  # no two workers share a GPU
        assert len({w["node_id"] for w in workers}) == 2  # spread over both nodes
        bundles = ray.util.placement_group_table(cluster.placement_group)["bundles_to_node_id"]
        assert len(bundles) == 9  # the coordinator's bundle, then one per worker
        for i, worker in enumerate(workers):
            assert bundles[1 + i] == worker["node_id"]
        assert_same_outputs(cluster, local, hf_small.config["vocab_size"])
    finally:
        cluster.shutdown()
        local.shutdown()
    _assert_released(cluster)
