"""What a coordinator knows of the expert pool it attaches to, and the calls it makes on it.

The pool itself (workers/pool.py) owns the ExpertWorker actors; a coordinator never creates or kills a worker.
It asks the pool for a ``PoolView`` (where every worker listens, which experts it hosts: the expert map and its
version), opens one link to each worker, after a failure asks the pool to replace what failed, and after a
rebalance fetches the new view. ``PoolHandle`` hides whether the pool is a named Ray actor (ClusterEngine) or a
Serve deployment (the Serve app).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import ray

from cluster.links.protocol import LinkSpec
from cluster.moe.expert_map import ExpertMap

VERSION_TIMEOUT_S = 5.0  # an idle coordinator's check for a new map must not hold up its heartbeats


@dataclass(frozen=True)
class WorkerEndpoint:
    index: int  # position in the expert map
    generation: int  # bumped each time the pool replaces this worker
    node_id: str  # Ray node id (same node and CPU tensors: a shared-memory link)
    node_ip: str
    address: str  # abstract Unix socket the worker listens on for shared-memory links
    device: str
    pid: int
    actor: Any  # the ExpertWorker actor handle (process-group links are set up through it)

    def describe(self, experts: tuple[int, ...]) -> str:
        return (f"expert worker {self.index} (experts {list(experts)}, generation {self.generation}, "
                f"pid {self.pid} on {self.node_ip})")


@dataclass(frozen=True)
class PoolView:
    pool_id: str
    expert_map: ExpertMap
    workers: tuple[WorkerEndpoint, ...]
    spec: LinkSpec


class PoolHandle(Protocol):
    def attach(self, coordinator_id: str) -> PoolView:
        """Register a coordinator; returns where every worker listens."""
        ...

    def replace(self, worker_index: int, generation: int, reason: str) -> PoolView:
        """Replace that worker if it is still the given generation and dead or stuck; returns the new view."""
        ...

    def detach(self, coordinator_id: str) -> None: ...

    def view(self) -> PoolView:
        """The pool as it is now (after a rebalance: the new expert map)."""
        ...

    def map_version(self) -> int:
        """The version of the pool's expert map (cheap: an idle coordinator asks every heartbeat)."""
        ...


class RayActorPool:
    """A PoolHandle over the pool's Ray actor handle (ClusterEngine, tests)."""

    def __init__(self, actor: Any, timeout_s: float) -> None:
        self.actor = actor
        self.timeout_s = timeout_s

    def attach(self, coordinator_id: str) -> PoolView:
        view: PoolView = ray.get(self.actor.attach.remote(coordinator_id), timeout=self.timeout_s)
        return view

    def replace(self, worker_index: int, generation: int, reason: str) -> PoolView:
        view: PoolView = ray.get(self.actor.replace.remote(worker_index, generation, reason), timeout=self.timeout_s)
        return view

    def detach(self, coordinator_id: str) -> None:
        ray.get(self.actor.detach.remote(coordinator_id), timeout=self.timeout_s)

    def view(self) -> PoolView:
        view: PoolView = ray.get(self.actor.view.remote(), timeout=self.timeout_s)
        return view

    def map_version(self) -> int:
        return int(ray.get(self.actor.map_version.remote(), timeout=VERSION_TIMEOUT_S))
