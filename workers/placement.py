"""Ray start-up and gang scheduling of an expert pool: one bundle per worker (``worker_num_gpus`` of a GPU each
when the Ray cluster has GPUs), reserved all at once in a placement group. Placement either succeeds within a
bounded time or fails with a message naming what the Ray cluster lacks."""

from __future__ import annotations

import logging
import os

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.engine_config import PoolConfig
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


def use_gpus(flag: bool | None) -> bool:
    """An explicit choice, or (None) whether the Ray cluster has GPUs."""
    if flag is not None:
        return flag
    return ray.cluster_resources().get("GPU", 0) > 0


def worker_bundle(pool_cfg: PoolConfig, gpus: bool) -> dict[str, float]:
    """What one expert worker reserves."""
    bundle = {"CPU": pool_cfg.worker_num_cpus, **pool_cfg.worker_resources}
    return bundle | {"GPU": float(pool_cfg.worker_num_gpus)} if gpus else bundle


def place(bundles: list[dict[str, float]], strategy: str, timeout_s: float, name: str, what: str) -> PlacementGroup:
    """Reserve all bundles at once, or fail within ``timeout_s`` saying what is missing. ``what`` names the
    actors for messages ("the pool's 8 expert workers")."""
    log.info("placing %s (%s) with strategy %s", what, _total(bundles), strategy)
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
        f"could not place {what} within {timeout_s:g}s: they need "
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
