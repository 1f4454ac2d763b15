"""ExpertPool: the N ExpertWorker actors of one model, created once and shared by every coordinator.

The pool owns its workers (spawning, health, replacement); coordinators only attach to it. It is independent of
any coordinator and findable by name: a named Ray actor for ClusterEngine, a one-replica Serve deployment in the
Serve app (router_service/pool_deployment.py wraps this same class). A coordinator that attaches gets a
``PoolView`` and opens one link to each worker; the workers never learn who attached except through links.

Placement: one bundle per worker (one GPU each when the Ray cluster has GPUs), in a placement group of the pool's
own or in bundles the caller reserved (a Serve replica's ``placement_group_bundles``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup, remove_placement_group

from cluster.config import ModelConfig
from cluster.engine_config import EngineConfig, PoolConfig
from cluster.errors import ClusterStartError, first_line
from cluster.exchange import LinkSpec
from cluster.loader import engine_dtype
from cluster.moe import ExpertMap
from cluster.pool_api import PoolView, WorkerEndpoint
from workers.expert_worker import ExpertWorker
from workers.placement import bundle_strategy, place, worker_bundle

log = logging.getLogger("moe_cluster.pool")
PING_TIMEOUT_S = 10.0


class ExpertPool:
    def __init__(self, engine_cfg: EngineConfig, pool_cfg: PoolConfig, pool_id: str | None = None,
                 placement_group: PlacementGroup | None = None, first_bundle: int = 0, gpus: bool = False) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.engine_cfg = engine_cfg
        self.pool_cfg = pool_cfg
        self.pool_id = pool_id or uuid.uuid4().hex[:8]
        self.model_cfg = ModelConfig.from_file(engine_cfg.model)
        self.expert_map = ExpertMap.contiguous(self.model_cfg.num_experts, pool_cfg.experts_per_worker)
        dtype = str(engine_dtype(self.model_cfg, engine_cfg)).removeprefix("torch.")
        self.spec = LinkSpec(hidden=self.model_cfg.hidden_size, dtype=dtype,
                             max_local=max(len(e) for e in self.expert_map.workers), slots=pool_cfg.link_slots,
                             slot_bytes=pool_cfg.link_slot_bytes, timeout_s=pool_cfg.link_timeout_s)
        self.pg = placement_group
        self.own_pg = placement_group is None
        self.first_bundle = first_bundle
        self.gpus = gpus
        self.workers: list[Any] = []  # ExpertWorker actor handles, by index
        self.endpoints: list[WorkerEndpoint] = []
        self.infos: list[dict[str, Any]] = []  # what each worker reported when it started
        self.coordinators: dict[str, float] = {}  # attached coordinator id -> attach time
        self.replacements: list[dict[str, Any]] = []
        self._replacing: dict[int, asyncio.Task[None]] = {}

    # ----------------------------------------------------------------------------------------------- start

    async def start(self) -> dict[str, Any]:
        started = time.perf_counter()
        n = self.expert_map.num_workers
        if self.pg is None:
            self.pg = await asyncio.to_thread(
                place, [worker_bundle(self.pool_cfg, self.gpus) for _ in range(n)], self.pool_cfg.placement_strategy,
                self.pool_cfg.placement_timeout_s, f"moe-pool-{self.pool_id}", f"the pool's {n} expert workers")
        log.info("pool %s: starting %d expert workers for experts %s", self.pool_id, n, list(self.expert_map.workers))
        self.workers = [self._spawn(i, 0) for i in range(n)]
        self.infos = [{} for _ in range(n)]
        self.endpoints = list(await asyncio.gather(*(self._ready(i, 0) for i in range(n))))
        log.info("pool %s ready in %.1fs: %s", self.pool_id, time.perf_counter() - started, self.summary())
        return await self.describe()

    def _spawn(self, index: int, generation: int) -> Any:
        options: dict[str, Any] = {"num_cpus": self.pool_cfg.worker_num_cpus, "num_gpus": int(self.gpus),
                                   "resources": dict(self.pool_cfg.worker_resources), "max_restarts": 0,
                                   "max_concurrency": 8}
        if self.pg is not None:
            options["scheduling_strategy"] = bundle_strategy(self.pg, self.first_bundle + index)
        return ray.remote(ExpertWorker).options(**options).remote(
            self.engine_cfg, self.expert_map.workers[index], index, generation, self.pool_id,
            self.pool_cfg.actor_threads, self.spec, self.pool_cfg.merge_wait_ms / 1000)

    async def _ready(self, index: int, generation: int) -> WorkerEndpoint:
        """Wait for a worker to load its experts and start its loop."""
        worker = self.workers[index]
        try:
            info: dict[str, Any] = await asyncio.wait_for(worker.start.remote(), self.pool_cfg.start_timeout_s)
        except asyncio.TimeoutError:
            raise ClusterStartError(f"expert worker {index} did not load its experts within "
                                    f"{self.pool_cfg.start_timeout_s:g}s") from None
        except RayActorError as err:
            raise ClusterStartError(f"expert worker {index} died while starting: {first_line(err)}") from None
        self.infos[index] = info | {"generation": generation}
        return WorkerEndpoint(index, generation, info["node_id"], info["node_ip"], info["address"], info["device"],
                              info["pid"], worker)

    # ------------------------------------------------------------------------------------- coordinators

    async def attach(self, coordinator_id: str) -> PoolView:
        self.coordinators[coordinator_id] = time.time()
        log.info("pool %s: coordinator %s attached (%d attached)", self.pool_id, coordinator_id,
                 len(self.coordinators))
        return self.view()

    async def detach(self, coordinator_id: str) -> None:
        if self.coordinators.pop(coordinator_id, None) is not None:
            log.info("pool %s: coordinator %s detached (%d attached)", self.pool_id, coordinator_id,
                     len(self.coordinators))

    def view(self) -> PoolView:
        return PoolView(self.pool_id, self.expert_map, tuple(self.endpoints), self.spec)

    # ------------------------------------------------------------------------------------------ failures

    async def replace(self, index: int, generation: int, reason: str) -> PoolView:
        """A coordinator lost its link to worker ``index``: if that worker is still ``generation`` and does not
        answer (dead, or alive with a failed loop), replace it. Several coordinators reporting the same failure
        share one replacement."""
        if not 0 <= index < len(self.endpoints):
            raise ValueError(f"no expert worker {index} in pool {self.pool_id}")
        if self.endpoints[index].generation == generation:
            task = self._replacing.get(index)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._replace_if_failed(index, generation, reason))
                self._replacing[index] = task
            try:
                await task
            finally:
                if self._replacing.get(index) is task:
                    del self._replacing[index]
        return self.view()

    async def _replace_if_failed(self, index: int, generation: int, reason: str) -> None:
        worker = self.workers[index]
        healthy = False
        try:
            status = await asyncio.wait_for(worker.ping.remote(), PING_TIMEOUT_S)
            healthy = bool(status["loop_alive"])
        except (asyncio.TimeoutError, RayActorError):
            pass
        if healthy:
            log.info("pool %s: expert worker %d is healthy; a coordinator's link failed (%s)", self.pool_id, index,
                     reason)
            return
        started = time.monotonic()
        log.warning("pool %s: replacing expert worker %d (generation %d): %s", self.pool_id, index, generation,
                    reason)
        ray.kill(worker, no_restart=True)
        self.workers[index] = self._spawn(index, generation + 1)
        self.endpoints[index] = await self._ready(index, generation + 1)
        seconds = time.monotonic() - started
        self.replacements.append({"worker": index, "generation": generation + 1, "seconds": seconds,
                                  "reason": reason})
        log.warning("pool %s: expert worker %d replaced in %.1fs", self.pool_id, index, seconds)

    # -------------------------------------------------------------------------------------------- report

    def summary(self) -> str:
        return (f"{self.expert_map.num_workers} expert workers x {self.pool_cfg.experts_per_worker} experts, "
                f"{'1 GPU' if self.gpus else f'{self.pool_cfg.worker_num_cpus:g} CPU'} each")

    async def describe(self) -> dict[str, Any]:
        return {"pool_id": self.pool_id, "summary": self.summary(),
                "expert_map": [list(e) for e in self.expert_map.workers],
                "workers": list(self.infos),
                "coordinators": sorted(self.coordinators), "replacements": list(self.replacements)}

    async def worker_handles(self) -> list[Any]:
        return list(self.workers)

    async def worker_stats(self) -> list[dict[str, Any]]:
        """Each worker's loop statistics (rows, expert calls, merged messages, compute time)."""
        results = await asyncio.gather(*(w.stats.remote() for w in self.workers), return_exceptions=True)
        return [r if isinstance(r, dict) else {"error": first_line(r)} for r in results]

    async def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
        if self.own_pg and self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
