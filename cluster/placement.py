"""Ray start-up and gang scheduling: one placement group per cluster, one bundle per actor
(bundle 0: the coordinator; bundles 1..N: expert workers). Placement either succeeds within a bounded time
or fails with a message naming what the Ray cluster lacks."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.engine_config import ClusterConfig
from cluster.errors import ClusterStartError

log = logging.getLogger("moe_cluster.placement")


def ensure_ray(address: str | None, min_cpus: float) -> bool:
    """Connect to ``address``, or start a local embedded Ray. Returns True if this call started Ray.

    A local Ray is given at least ``min_cpus`` logical CPUs: idle expert actors cost little, and one bundle
    per actor must fit even on a 2-core machine.
    """
    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as err:
            raise ClusterStartError(f"cannot connect to the Ray cluster at {address!r}: {err}") from None
        return True
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(min_cpus + 0.999)), include_dashboard=False,
             log_to_driver=False)
    return True


def use_gpus(cluster_cfg: ClusterConfig) -> bool:
    if cluster_cfg.use_gpus is not None:
        return cluster_cfg.use_gpus
    return ray.cluster_resources().get("GPU", 0) > 0


@dataclass(frozen=True)
class ActorShape:
    num_cpus: float
    num_gpus: int

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.num_cpus, "GPU": self.num_gpus} if self.num_gpus else {"CPU": self.num_cpus}


def actor_shape(cluster_cfg: ClusterConfig, gpus: bool) -> ActorShape:
    return ActorShape(cluster_cfg.worker_num_cpus, 1 if gpus else 0)


def cluster_bundles(cluster_cfg: ClusterConfig, num_workers: int, gpus: bool) -> list[dict[str, float]]:
    """One bundle for the coordinator, then one per expert worker."""
    shape = actor_shape(cluster_cfg, gpus)
    return [shape.bundle() for _ in range(1 + num_workers)]


def place(bundles: list[dict[str, float]], strategy: str, timeout_s: float, name: str) -> PlacementGroup:
    """Reserve all bundles at once, or fail within ``timeout_s`` saying what is missing."""
    log.info("placing %d actors (%s) with strategy %s", len(bundles), _total(bundles), strategy)
    pg = placement_group(bundles, strategy=strategy, name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if ready:
        return pg
    remove_placement_group(pg)
    need = _total(bundles)
    total, free = ray.cluster_resources(), ray.available_resources()
    missing = {k: v - free.get(k, 0.0) for k, v in need.items() if v > free.get(k, 0.0)}
    detail = ", ".join(f"{k} {v:g}" for k, v in missing.items()) or "a node that can hold one bundle"
    raise ClusterStartError(
        f"could not place the cluster's {len(bundles)} actors within {timeout_s:g}s: they need "
        f"{_fmt(need)} ({len(bundles)} bundles of {_fmt(bundles[0])}), the Ray cluster has {_fmt(total)} "
        f"in total and {_fmt(free)} free; missing: {detail}")


def bundle_strategy(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=False)


def _total(bundles: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def _fmt(resources: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU") if k in resources] or sorted(resources)[:3]
    return "{" + ", ".join(f"{k}: {resources.get(k, 0):g}" for k in keys) + "}"
