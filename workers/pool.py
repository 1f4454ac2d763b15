"""ExpertPool: the N ExpertWorker actors of one model, created once and shared by every coordinator.

The pool owns its workers (spawning, health, replacement); coordinators only attach to it. It is independent of
any coordinator and findable by name: a named Ray actor for ClusterEngine, a one-replica Serve deployment in the
Serve app (router_service/pool_deployment.py wraps this same class). A coordinator that attaches gets a
``PoolView`` and opens one link to each worker; the workers never learn who attached except through links.

Placement: one bundle per worker (one GPU each when the Ray cluster has GPUs), in a placement group of the pool's
own or in bundles the caller reserved (a Serve replica's ``placement_group_bundles``).

Expert load balancing: the pool's expert map (which worker hosts which experts, per layer) starts contiguous and
changes only in ``rebalance`` (every ``rebalance_interval_s``, or when asked), in two phases so that nobody stops:
  1. every worker loads the new map version's experts next to the ones it serves (``prepare``: it reads only the
     tensors it lacks); if any fails, the others drop theirs and the old map stays;
  2. the pool's view moves to the new version and every worker announces it (``commit``) in its results; each
     coordinator, seeing that (or asking while idle), fetches the view between two steps and sends the new version
     from its next message on; a worker frees the old weights once none of its links may send them any more.
Replacing a failed worker and changing the map never interleave (one lock): a replacement loads the current map.
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

from cluster import eplb
from cluster.config import ModelConfig
from cluster.engine_config import EngineConfig, PoolConfig
from cluster.errors import ClusterStartError, describe_failure, first_line
from cluster.exchange import LinkSpec
from cluster.loader import engine_dtype
from cluster.moe import ExpertMap
from cluster.pool_api import PoolView, WorkerEndpoint
from workers.expert_worker import ExpertWorker
from workers.placement import bundle_strategy, place, worker_bundle
from workers.rebalance import Decision, LoadTracker

log = logging.getLogger("moe_cluster.pool")
PING_TIMEOUT_S = 10.0


class ExpertPool:
    def __init__(self, engine_cfg: EngineConfig, pool_cfg: PoolConfig, pool_id: str | None = None,
                 placement_group: PlacementGroup | None = None, first_bundle: int = 0, gpus: bool = False) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.engine_cfg = engine_cfg
        self.pool_cfg = pool_cfg
        self.pool_id = pool_id or uuid.uuid4().hex[:8]
        self.model_cfg = cfg = ModelConfig.from_file(engine_cfg.model)
        self.expert_map = ExpertMap.contiguous(cfg.num_experts, pool_cfg.experts_per_worker, cfg.num_layers)
        # Every worker has room for this many experts per layer, whatever the map (links are sized for it).
        self.capacity = eplb.slots_per_worker(cfg.num_experts, self.expert_map.num_workers,
                                              pool_cfg.experts_per_worker, pool_cfg.redundant_experts)
        dtype = str(engine_dtype(cfg, engine_cfg)).removeprefix("torch.")
        self.spec = LinkSpec(hidden=cfg.hidden_size, dtype=dtype, max_local=self.capacity, slots=pool_cfg.link_slots,
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
        self.loads = LoadTracker(cfg.num_layers, cfg.num_experts, self.expert_map.num_workers,
                                 pool_cfg.rebalance_window)
        self.rebalances: list[dict[str, Any]] = []  # every applied rebalance
        self._map_lock = asyncio.Lock()  # map changes and worker replacements, one at a time
        self._next_version = 1
        self._rebalancer: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------------------------------------- start

    async def start(self) -> dict[str, Any]:
        started = time.perf_counter()
        n = self.expert_map.num_workers
        if self.pg is None:
            self.pg = await asyncio.to_thread(
                place, [worker_bundle(self.pool_cfg, self.gpus) for _ in range(n)], self.pool_cfg.placement_strategy,
                self.pool_cfg.placement_timeout_s, f"moe-pool-{self.pool_id}", f"the pool's {n} expert workers")
        log.info("pool %s: starting %d expert workers for experts %s", self.pool_id, n,
                 [list(self.expert_map.hosted(w)) for w in range(n)])
        self.workers = [self._spawn(i, 0) for i in range(n)]
        self.infos = [{} for _ in range(n)]
        self.endpoints = list(await asyncio.gather(*(self._ready(i, 0) for i in range(n))))
        log.info("pool %s ready in %.1fs: %s", self.pool_id, time.perf_counter() - started, self.summary())
        if self.pool_cfg.rebalance_interval_s > 0:
            self._rebalancer = asyncio.get_running_loop().create_task(self._rebalance_periodically())
        return await self.describe()

    def _spawn(self, index: int, generation: int) -> Any:
        options: dict[str, Any] = {"num_cpus": self.pool_cfg.worker_num_cpus,
                                   "num_gpus": self.pool_cfg.worker_num_gpus if self.gpus else 0,
                                   "resources": dict(self.pool_cfg.worker_resources), "max_restarts": 0,
                                   "max_concurrency": 8}
        if self.pg is not None:
            options["scheduling_strategy"] = bundle_strategy(self.pg, self.first_bundle + index)
        return ray.remote(ExpertWorker).options(**options).remote(
            self.engine_cfg, self.expert_map.version, self.expert_map.worker_experts(index), index, generation,
            self.pool_id, self.pool_cfg.actor_threads, self.spec, self.pool_cfg.merge_wait_ms / 1000)

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

    def map_version(self) -> int:
        return self.expert_map.version

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
        async with self._map_lock:  # a replacement loads the current map's experts: not one being switched
            await self._replace_locked(index, generation, reason)

    async def _replace_locked(self, index: int, generation: int, reason: str) -> None:
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

    # ---------------------------------------------------------------------------------------- rebalancing

    async def _rebalance_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.pool_cfg.rebalance_interval_s)
            try:
                await self.rebalance()
            except Exception as err:  # never let one bad round end the rebalancing
                log.error("pool %s: rebalancing failed: %s", self.pool_id, first_line(err))

    async def rebalance(self, force: bool = False, placement: list[list[list[int]]] | None = None) -> dict[str, Any]:
        """Sample the workers' load, and move to a better expert map if it is worth it (``force``: whenever the
        placement changes; ``placement``: exactly this one, [layer][worker] -> experts). Returns what happened."""
        async with self._map_lock:
            self.loads.observe(await self.worker_stats())
            current = self.expert_map
            if placement is not None:
                layers = self._check_placement(placement)
                decision = Decision(True, "placement given", 0.0, 0.0, layers)
            else:
                decision = self.loads.decide(current, self.capacity, self.pool_cfg.redundant_experts,
                                             self.pool_cfg.rebalance_threshold, force)
            report: dict[str, Any] = {"applied": False, "map_version": current.version, "reason": decision.reason,
                                      "measured_imbalance": self.loads.measured_imbalance(),
                                      "before": decision.before, "after": decision.after}
            if not decision.apply or decision.layers is None:
                log.info("pool %s: no rebalance: %s", self.pool_id, decision.reason)
                return report
            new_map = ExpertMap(decision.layers, current.num_experts, self._next_version)
            self._next_version += 1
            started = time.monotonic()
            try:
                await self._switch_map(new_map)
            except Exception as err:
                log.error("pool %s: rebalance to map version %d failed, keeping version %d: %s", self.pool_id,
                          new_map.version, current.version, first_line(err))
                return report | {"error": first_line(err)}
            moved = eplb.moves(current.layers, new_map.layers)
            seconds = time.monotonic() - started
            self.rebalances.append({"map_version": new_map.version, "before": decision.before,
                                    "after": decision.after, "moved": len(moved), "seconds": seconds})
            log.info("pool %s: rebalanced to map version %d in %.1fs (%s): expected imbalance %.2f -> %.2f "
                     "(measured %.2f); %d expert copies changed: %s%s", self.pool_id, new_map.version, seconds,
                     decision.reason, decision.before, decision.after, report["measured_imbalance"], len(moved),
                     ", ".join(moved[:12]), f" ... ({len(moved) - 12} more)" if len(moved) > 12 else "")
            return report | {"applied": True, "map_version": new_map.version, "moved": moved}

    def _check_placement(self, placement: list[list[list[int]]]) -> tuple[eplb.Placement, ...]:
        layers = tuple(tuple(tuple(int(e) for e in experts) for experts in layer) for layer in placement)
        expected = (self.expert_map.num_layers, self.expert_map.num_workers)
        if len(layers) != expected[0] or any(len(layer) != expected[1] for layer in layers):
            raise ValueError(f"a placement needs {expected[0]} layers of {expected[1]} workers each")
        if any(len(experts) > self.capacity for layer in layers for experts in layer):
            raise ValueError(f"placement {placement} puts more than {self.capacity} experts on a worker")
        ExpertMap(layers, self.expert_map.num_experts)  # every expert at least once, no duplicate on a worker
        return layers

    async def _switch_map(self, new_map: ExpertMap) -> None:
        """Phase 1: every worker loads the new version next to the old one (all or none keep it); phase 2: the
        view moves to it and the workers announce it."""
        version = new_map.version
        prepared = await asyncio.gather(*(asyncio.wait_for(w.prepare.remote(version, new_map.worker_experts(i)),
                                                           self.pool_cfg.start_timeout_s)
                                          for i, w in enumerate(self.workers)), return_exceptions=True)
        failed = [f"expert worker {i}: {describe_failure(r)}" for i, r in enumerate(prepared)
                  if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(w.discard.remote(version) for w in self.workers), return_exceptions=True)
            raise RuntimeError(f"loading the new experts failed: {'; '.join(failed)}")
        self.expert_map = new_map
        committed = await asyncio.gather(*(w.commit.remote(version, new_map.worker_experts(i))
                                           for i, w in enumerate(self.workers)), return_exceptions=True)
        for i, result in enumerate(committed):  # a worker that died meanwhile is replaced with the new map
            if isinstance(result, BaseException):
                log.warning("pool %s: expert worker %d did not take map version %d: %s", self.pool_id, i, version,
                            first_line(result))

    # -------------------------------------------------------------------------------------------- report

    def summary(self) -> str:
        extra = f", {self.pool_cfg.redundant_experts} redundant slots" if self.pool_cfg.redundant_experts else ""
        share = f"{self.pool_cfg.worker_num_gpus:g} GPU" if self.gpus else f"{self.pool_cfg.worker_num_cpus:g} CPU"
        return (f"{self.expert_map.num_workers} expert workers x {self.pool_cfg.experts_per_worker} experts{extra}, "
                f"{share} each")

    async def describe(self) -> dict[str, Any]:
        return {"pool_id": self.pool_id, "summary": self.summary(),
                "expert_map": [list(self.expert_map.hosted(w)) for w in range(self.expert_map.num_workers)],
                "map_version": self.expert_map.version,
                "placement": [[list(experts) for experts in layer] for layer in self.expert_map.layers],
                "slots_per_worker": self.capacity, "rebalances": list(self.rebalances),
                "workers": list(self.infos),
                "coordinators": sorted(self.coordinators), "replacements": list(self.replacements)}

    async def worker_handles(self) -> list[Any]:
        return list(self.workers)

    async def worker_stats(self) -> list[dict[str, Any]]:
        """Each worker's loop statistics (rows, expert calls, merged messages, compute time), the map versions it
        holds and its rows per [layer][global expert]."""
        results = await asyncio.gather(*(w.stats.remote() for w in self.workers), return_exceptions=True)
        return [r if isinstance(r, dict) else {"error": first_line(r)} for r in results]

    async def shutdown(self) -> None:
        if self._rebalancer is not None:
            self._rebalancer.cancel()
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
        if self.own_pg and self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
