"""The app's expert pool as a one-replica Serve deployment, and the PoolHandle coordinators use to reach it.

Its replica *is* the pool (workers/pool.py): the expert workers take the other bundles of the replica's
placement group (bundle 0 is the replica itself), so Serve gang-schedules them with it and removes them with
the app. Every engine replica attaches to it through a DeploymentHandle; scaling the engine deployment (or a
replica restarting) only attaches or detaches coordinators, and never reloads an expert.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.moe.pool_api import VERSION_TIMEOUT_S, PoolView
from router_service.metrics import PoolMetrics
from router_service.settings import AppSettings
from workers.placement import use_gpus, worker_bundle
from workers.pool import ExpertPool

log = logging.getLogger("moe_cluster.serve")
POOL_DEPLOYMENT = "ExpertPool"
POOL_MANAGER_CPUS = 0.1  # the replica only manages the workers (Ray calls, no tensors)
STATS_INTERVAL_S = 2.0
COORDINATOR_POLL_S = 0.5  # at shutdown, how often the pool checks whether its engine replicas are gone
REPLICA_PROBE_S = 2.0


class ExpertPoolDeployment:
    async def __init__(self, settings: AppSettings) -> None:  # type: ignore[misc]  # Serve awaits it
        pool_cfg = settings.pool_config()
        pg = ray.util.get_current_placement_group()
        gpus = pg is not None and any("GPU" in bundle for bundle in pg.bundle_specs[1:])
        self.pool = ExpertPool(settings.engine_config(), pool_cfg, f"{settings.model_name}-{uuid.uuid4().hex[:6]}",
                               placement_group=pg, first_bundle=1, gpus=gpus)
        await self.pool.start()
        self.metrics = PoolMetrics(settings.model_name, self.pool.pool_id)
        self.settings = settings
        self.replicas: dict[str, Any] = {}  # coordinator id -> the engine replica's actor handle
        self._sample_shape()
        self._sampler = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            self._sample_shape()
            with contextlib.suppress(Exception):
                self.metrics.sample(await self.pool.worker_stats(), len(self.pool.rebalances))

    def _sample_shape(self) -> None:
        self.metrics.sample_pool(self.pool.map_version(), self.pool.expert_map.num_workers, len(self.pool.resizes))

    async def attach(self, coordinator_id: str, replica: Any = None) -> PoolView:
        """``replica``: the engine replica's actor, so that shutdown can tell whether it is still there."""
        if replica is not None:
            self.replicas[coordinator_id] = replica
        return await self.pool.attach(coordinator_id)

    async def replace(self, worker_index: int, generation: int, reason: str) -> PoolView:
        return await self.pool.replace(worker_index, generation, reason)

    async def detach(self, coordinator_id: str) -> None:
        self.replicas.pop(coordinator_id, None)
        await self.pool.detach(coordinator_id)

    async def view(self) -> PoolView:
        return self.pool.view()

    async def map_version(self) -> int:
        return self.pool.map_version()

    async def rebalance(self, force: bool = False, placement: list[list[list[int]]] | None = None
                        ) -> dict[str, Any]:
        return await self.pool.rebalance(force, placement)

    async def resize(self, num_workers: int) -> dict[str, Any]:
        """The elastic pool: grow or shrink to ``num_workers`` workers (answers once the new map is committed)."""
        try:
            return await self.pool.resize(num_workers)
        finally:
            self._sample_shape()  # /metrics shows the new shape at once, not at the next sample

    async def describe(self) -> dict[str, Any]:
        return await self.pool.describe()

    async def worker_stats(self) -> list[dict[str, Any]]:
        return await self.pool.worker_stats()

    async def _replica_alive(self, coordinator_id: str) -> bool:
        replica = self.replicas.get(coordinator_id)
        if replica is None:
            return True  # attached without its actor: assume it is there until it detaches
        try:
            await asyncio.wait_for(replica.__ray_ready__.remote(), timeout=REPLICA_PROBE_S)
        except ray.exceptions.RayActorError:
            return False
        except Exception:  # no answer in time (a busy replica): still there
            return True
        return True

    async def wait_for_coordinators(self) -> None:
        """The pool goes last: while an engine replica attached to it is still there (finishing its requests
        when Serve deletes the app), the experts stay; at most the engines' grace period (after which Serve
        has killed them)."""
        deadline = time.monotonic() + self.settings.engine_grace_s
        logged = False
        while time.monotonic() < deadline:
            attached = list(self.pool.coordinators)
            alive = [c for c in attached if await self._replica_alive(c)]
            if not alive:
                return
            if not logged:
                log.info("pool %s: stopping once its %d engine replica(s) have stopped", self.pool.pool_id,
                         len(alive))
                logged = True
            await asyncio.sleep(COORDINATOR_POLL_S)
        log.warning("pool %s: engine replicas still attached after %gs; stopping anyway", self.pool.pool_id,
                    self.settings.engine_grace_s)

    async def __del__(self) -> None:
        self._sampler.cancel()
        await self.wait_for_coordinators()
        await self.pool.shutdown()


class ServePool:
    """A PoolHandle over the pool deployment's handle, for the coordinator in an engine replica (called from the
    engine loop's thread, never from the replica's event loop)."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float, replica: Any = None) -> None:
        self.handle = handle
        self.timeout_s = timeout_s
        self.replica = replica  # the engine replica's actor handle (None outside Serve)

    def attach(self, coordinator_id: str) -> PoolView:
        view: PoolView = self.handle.attach.remote(coordinator_id, self.replica).result(timeout_s=self.timeout_s)
        return view

    def replace(self, worker_index: int, generation: int, reason: str) -> PoolView:
        view: PoolView = self.handle.replace.remote(worker_index, generation, reason).result(timeout_s=self.timeout_s)
        return view

    def detach(self, coordinator_id: str) -> None:
        self.handle.detach.remote(coordinator_id).result(timeout_s=self.timeout_s)

    def view(self) -> PoolView:
        view: PoolView = self.handle.view.remote().result(timeout_s=self.timeout_s)
        return view

    def map_version(self) -> int:
        return int(self.handle.map_version.remote().result(timeout_s=VERSION_TIMEOUT_S))


def pool_deployment_options(settings: AppSettings) -> dict[str, Any]:
    """One replica; its placement group: the replica, then one bundle per expert worker."""
    from cluster.model.config import ModelConfig
    from cluster.model.hub import config_file

    pool_cfg = settings.pool_config()
    workers = -(-ModelConfig.from_file(config_file(settings.model)).num_experts // pool_cfg.experts_per_worker)
    gpus = use_gpus(pool_cfg.use_gpus) if ray.is_initialized() else bool(pool_cfg.use_gpus)
    # Its graceful shutdown outlasts the engine replicas' (wait_for_coordinators): the pool is the last to go.
    return {"num_replicas": 1, "max_ongoing_requests": 1000, "health_check_period_s": 10.0,
            "graceful_shutdown_timeout_s": settings.ingress_grace_s,
            "ray_actor_options": {"num_cpus": POOL_MANAGER_CPUS},
            "placement_group_bundles": [{"CPU": POOL_MANAGER_CPUS}] + [worker_bundle(pool_cfg, gpus)] * workers,
            "placement_group_strategy": pool_cfg.placement_strategy}


def build_pool_deployment(settings: AppSettings) -> Any:
    return serve.deployment(ExpertPoolDeployment, name=POOL_DEPLOYMENT, **pool_deployment_options(settings))
