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

Resizing (``resize``, the elastic pool) is a map change whose new map has another number of workers: the
placement for N workers comes from the same EPLB policy (the measured load when there is any); added workers
are placed (a placement group of their own, so a KubeRay autoscaler may add the nodes) and load only their own
experts, straight into the new version, while the kept workers prepare it next to the one they serve; then the
commit as above. Retired workers (the last indexes) stay, serving the old map, until none of their links is left
(every coordinator has moved to the new map and closed its link to them), and only then are killed. A failure
before the commit (a worker dying, no resources) leaves the old map and kills what was added; one resize at a
time (another is refused with PoolBusyError).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup, remove_placement_group

from cluster.engine.loader import engine_dtype
from cluster.engine_config import EngineConfig, PoolConfig, omp_runtime_env
from cluster.errors import ClusterStartError, PoolBusyError, PoolSizeError, describe_failure, first_line
from cluster.links.protocol import LinkSpec
from cluster.model.config import ModelConfig
from cluster.moe import eplb
from cluster.moe.autoscale import AutoscalePolicy
from cluster.moe.expert_map import ExpertMap
from cluster.moe.pool_api import PoolView, WorkerEndpoint
from workers.expert_worker import ExpertWorker
from workers.placement import bundle_strategy, place, worker_bundle
from workers.rebalance import Decision, LoadTracker

log = logging.getLogger("moe_cluster.pool")
PING_TIMEOUT_S = 10.0
RETIRE_POLL_S = 0.1  # how often a retiring worker is asked whether a link to it is left


class ExpertPool:
    def __init__(self, engine_cfg: EngineConfig, pool_cfg: PoolConfig, pool_id: str | None = None,
                 placement_group: PlacementGroup | None = None, first_bundle: int = 0, gpus: bool = False) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.engine_cfg = engine_cfg
        self.pool_cfg = pool_cfg
        self.pool_id = pool_id or uuid.uuid4().hex[:8]
        self.model_cfg = cfg = ModelConfig.from_file(engine_cfg.model_dir())
        self.expert_map = ExpertMap.contiguous(cfg.num_experts, pool_cfg.experts_per_worker, cfg.num_layers)
        # Every worker has room for this many experts per layer, whatever the map (until a resize).
        self.capacity = eplb.slots_per_worker(cfg.num_experts, self.expert_map.num_workers,
                                              pool_cfg.experts_per_worker, pool_cfg.redundant_experts)
        dtype = str(engine_dtype(cfg, engine_cfg)).removeprefix("torch.")
        # Links carry one count per local slot: sized for the most a worker can ever host (every expert once), so
        # that a resize never has to rebuild a link.
        self.spec = LinkSpec(hidden=cfg.hidden_size, dtype=dtype, max_local=cfg.num_experts, slots=pool_cfg.link_slots,
                             slot_bytes=pool_cfg.link_slot_bytes, timeout_s=pool_cfg.link_timeout_s,
                             prefetch_lookahead=pool_cfg.expert_prefetch_lookahead if pool_cfg.expert_cache_size
                             else 0)  # issue 23: hints only help a cache
        self.pg = placement_group
        self.own_pg = placement_group is None
        self.first_bundle = first_bundle
        self.gpus = gpus
        self.workers: list[Any] = []  # ExpertWorker actor handles, by index
        # Where each worker index is placed: (placement group, bundle); workers added by a resize get groups of
        # their own, removed with their last worker.
        self.bundles: list[tuple[PlacementGroup | None, int]] = []
        self._generations: dict[int, int] = {}  # worker index -> the newest generation it has had (never reused)
        self.resizes: list[dict[str, Any]] = []  # every applied resize
        self.retiring: dict[int, dict[str, Any]] = {}  # pid -> a retired worker waiting for its links to close
        self._retirements: set[asyncio.Task[None]] = set()
        self._resizing: int | None = None  # the size a running resize is going to
        # Started workers holding no experts, for fast growth: (actor, what its start said, its placement group).
        self.spares: list[tuple[Any, dict[str, Any], PlacementGroup | None]] = []
        self._spares_made = 0
        self._refilling: asyncio.Task[None] | None = None
        self._autoscaler: asyncio.Task[None] | None = None
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
        self.bundles = [(self.pg, self.first_bundle + i) for i in range(n)]
        self.workers = [self._spawn(i, 0) for i in range(n)]
        self.infos = [{} for _ in range(n)]
        self.endpoints = list(await asyncio.gather(*(self._ready(i, 0) for i in range(n))))
        self._generations = dict.fromkeys(range(n), 0)
        log.info("pool %s ready in %.1fs: %s", self.pool_id, time.perf_counter() - started, self.summary())
        if self.pool_cfg.rebalance_interval_s > 0:
            self._rebalancer = asyncio.get_running_loop().create_task(self._rebalance_periodically())
        self._refill_spares()
        if self.pool_cfg.autoscale is not None:
            policy = AutoscalePolicy.from_dict(self.pool_cfg.autoscale)
            for size in (policy.min_workers, policy.max_workers):
                self.check_size(size)
            self._autoscaler = asyncio.get_running_loop().create_task(self._autoscale_periodically(policy))
        return await self.describe()

    def _worker_actor_options(self) -> dict[str, Any]:
        """Ray options of an ExpertWorker actor (a worker or a spare), less its placement: what its bundle reserves
        (worker_bundle), so that it fits there; a GPU share only where the pool uses GPUs."""
        num_gpus = self.pool_cfg.worker_num_gpus if self.gpus else 0
        return {"num_cpus": self.pool_cfg.worker_num_cpus, "num_gpus": num_gpus,
                "resources": dict(self.pool_cfg.worker_resources), "max_restarts": 0, "max_concurrency": 8,
                "runtime_env": omp_runtime_env(self.pool_cfg.worker_omp_wait_policy)}

    def _spawn(self, index: int, generation: int, expert_map: ExpertMap | None = None,
               bundle: tuple[PlacementGroup | None, int] | None = None) -> Any:
        """A worker for ``index`` of ``expert_map`` (default: the current map), in its bundle."""
        expert_map = expert_map or self.expert_map
        pg, bundle_index = bundle or self.bundles[index]
        options = self._worker_actor_options()
        if pg is not None:
            options["scheduling_strategy"] = bundle_strategy(pg, bundle_index)
        return ray.remote(ExpertWorker).options(**options).remote(
            self.engine_cfg, expert_map.version, expert_map.worker_experts(index), index, generation,
            self.pool_id, self.pool_cfg.actor_threads, self.spec, self.pool_cfg.merge_wait_ms / 1000,
            self.pool_cfg.expert_cache_size)

    async def _ready(self, index: int, generation: int) -> WorkerEndpoint:
        """Wait for worker ``index`` to load its experts and start its loop."""
        endpoint, self.infos[index] = await self._started(self.workers[index], index, generation)
        return endpoint

    async def _started(self, worker: Any, index: int, generation: int) -> tuple[WorkerEndpoint, dict[str, Any]]:
        try:
            info: dict[str, Any] = await asyncio.wait_for(worker.start.remote(), self.pool_cfg.start_timeout_s)
        except asyncio.TimeoutError:
            raise ClusterStartError(f"expert worker {index} did not load its experts within "
                                    f"{self.pool_cfg.start_timeout_s:g}s") from None
        except RayActorError as err:
            raise ClusterStartError(f"expert worker {index} died while starting: {first_line(err)}") from None
        return (WorkerEndpoint(index, generation, info["node_id"], info["node_ip"], info["address"], info["device"],
                               info["pid"], worker), info | {"generation": generation})

    # ------------------------------------------------------------------------------------- coordinators

    async def attach(self, coordinator_id: str) -> PoolView:
        self.coordinators[coordinator_id] = time.time()
        log.info("pool %s: coordinator %s attached (%d attached)", self.pool_id, coordinator_id,
                 len(self.coordinators))
        return self.view()

    async def detach(self, coordinator_id: str, settle_s: float = 5.0) -> None:
        """Forget a coordinator that closed its links, and return once the workers dropped them: no worker then
        holds more links than coordinators are attached (each has one link per worker), so what a caller reads
        of the workers afterwards (stats, a resize's retirements) no longer counts the detached coordinator. A
        worker that does not answer in ``settle_s`` seconds is not waited for (its failure is handled elsewhere)."""
        if self.coordinators.pop(coordinator_id, None) is None:
            return
        log.info("pool %s: coordinator %s detached (%d attached)", self.pool_id, coordinator_id,
                 len(self.coordinators))
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            stats = await self.worker_stats()
            if all("error" in s or s["links_opened"] - s["links_closed"] <= len(self.coordinators) for s in stats):
                return
            await asyncio.sleep(0.02)

    def view(self) -> PoolView:
        return PoolView(self.pool_id, self.expert_map, tuple(self.endpoints), self.spec)

    def map_version(self) -> int:
        return self.expert_map.version

    # ------------------------------------------------------------------------------------------ failures

    async def replace(self, index: int, generation: int, reason: str) -> PoolView:
        """A coordinator lost its link to worker ``index``: if that worker is still ``generation`` and does not
        answer (dead, or alive with a failed loop), replace it. Several coordinators reporting the same failure
        share one replacement."""
        if index < 0:
            raise ValueError(f"no expert worker {index} in pool {self.pool_id}")
        if index >= len(self.endpoints):  # retired by a resize: the coordinator only has to follow the new view
            log.info("pool %s: expert worker %d was retired by a resize (%s)", self.pool_id, index, reason)
            return self.view()
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
        if index >= len(self.workers) or self.endpoints[index].generation != generation:
            return  # a resize retired it or replaced it meanwhile
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
        successor = self._next_generation(index)
        self.workers[index] = self._spawn(index, successor)
        self.endpoints[index] = await self._ready(index, successor)
        seconds = time.monotonic() - started
        self.replacements.append({"worker": index, "generation": successor, "seconds": seconds,
                                  "reason": reason})
        log.warning("pool %s: expert worker %d replaced in %.1fs", self.pool_id, index, seconds)

    def _next_generation(self, index: int) -> int:
        """A generation worker ``index`` has never had (a replaced, or retired and re-added, worker is new)."""
        self._generations[index] = self._generations.get(index, -1) + 1
        return self._generations[index]

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

    # -------------------------------------------------------------------------------------------- resizing

    def check_size(self, num_workers: int) -> None:
        """Refuse (PoolSizeError, nothing changes) a size the pool cannot take."""
        most = eplb.max_workers(self.expert_map.num_experts, self.pool_cfg.redundant_experts)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or not 1 <= num_workers <= most:
            raise PoolSizeError(f"num_workers must be an integer from 1 to {most} (the pool's "
                                f"{self.expert_map.num_experts} experts + {self.pool_cfg.redundant_experts} "
                                f"redundant slots: a worker beyond that would host nothing), got {num_workers!r}")

    async def resize(self, num_workers: int) -> dict[str, Any]:
        """Grow or shrink the pool to ``num_workers`` workers while serving; returns once the new map is committed
        (retired workers leave later, when no link to them is left). Refused at once, with nothing changed, for a
        size that does not fit (PoolSizeError) or while another resize runs (PoolBusyError); a failure before the
        commit (no resources, a worker dying) keeps the old map and raises."""
        self.check_size(num_workers)
        if self._resizing is not None:
            raise PoolBusyError(f"the expert pool is already being resized to {self._resizing} workers; ask again "
                                f"when that has ended")
        self._resizing = num_workers
        try:
            async with self._map_lock:
                return await self._resize_locked(num_workers)
        finally:
            self._resizing = None

    async def _resize_locked(self, num_workers: int) -> dict[str, Any]:
        started = time.monotonic()
        current = self.expert_map
        before = current.num_workers
        if num_workers == before:
            return {"changed": False, "num_workers": before, "map_version": current.version, "seconds": 0.0}
        self.loads.observe(await self.worker_stats())
        loads, measured = self.loads.expert_loads()
        layers, capacity = eplb.plan_for_workers(loads, num_workers, self.pool_cfg.redundant_experts, current.layers)
        new_map = ExpertMap(layers, current.num_experts, self._next_version)
        self._next_version += 1
        log.info("pool %s: resizing from %d to %d expert workers (map version %d, placed on %s load)", self.pool_id,
                 before, num_workers, new_map.version, "the measured" if measured else "no measured (even)")
        kept = range(min(before, num_workers))
        added = list(range(before, num_workers))
        generations = [self._generations.get(i, -1) + 1 for i in added]
        taken, self.spares = self.spares[:len(added)], self.spares[len(added):]  # started spares first
        fresh = list(zip(added, generations, strict=True))[len(taken):]
        pg: PlacementGroup | None = None
        new_workers: list[Any] = []
        try:
            if fresh:  # reserve the new workers' resources (all or none) before anything else changes
                pg = await asyncio.to_thread(
                    place, [worker_bundle(self.pool_cfg, self.gpus) for _ in fresh], self.pool_cfg.placement_strategy,
                    self.pool_cfg.placement_timeout_s, f"moe-pool-{self.pool_id}-v{new_map.version}",
                    f"{len(fresh)} more expert workers for pool {self.pool_id}")
            new_workers = [self._spawn(i, g, new_map, (pg, j)) for j, (i, g) in enumerate(fresh)]
            # Kept workers (and spares taken) load the new version next to what they hold; fresh ones load only
            # their experts, straight into it.
            results = await asyncio.gather(
                *(asyncio.wait_for(self.workers[i].prepare.remote(new_map.version, new_map.worker_experts(i)),
                                   self.pool_cfg.start_timeout_s) for i in kept),
                *(self._take_spare(spare, i, g, new_map)
                  for spare, i, g in zip(taken, added, generations, strict=False)),
                *(self._started(w, i, g) for w, (i, g) in zip(new_workers, fresh, strict=True)),
                return_exceptions=True)
            failed = [f"expert worker {i}: {describe_failure(r)}" for i, r in zip([*kept, *added], results, strict=True)
                      if isinstance(r, BaseException)]
            if failed:
                raise RuntimeError(f"resizing to {num_workers} workers failed, keeping {before}: {'; '.join(failed)}")
        except BaseException:
            await asyncio.gather(*(self.workers[i].discard.remote(new_map.version) for i in kept),
                                 return_exceptions=True)
            for worker in [*new_workers, *(spare[0] for spare in taken)]:
                ray.kill(worker, no_restart=True)
            for group in [pg, *(spare[2] for spare in taken)]:
                if group is not None:
                    remove_placement_group(group)
            self._refill_spares()
            raise
        loaded = time.monotonic()
        started_new = [r for r in results[len(kept):] if isinstance(r, tuple)]
        new_workers = [spare[0] for spare in taken] + new_workers
        retired = list(zip(self.workers[num_workers:], self.endpoints[num_workers:], self.bundles[num_workers:],
                           strict=True))
        # The commit: from here on attach/view give the new map; nothing awaits between these lines.
        self.expert_map = new_map
        self.capacity = capacity
        self.workers = self.workers[:num_workers] + new_workers
        self.endpoints = self.endpoints[:num_workers] + [endpoint for endpoint, _ in started_new]
        self.infos = self.infos[:num_workers] + [info for _, info in started_new]
        self.bundles = self.bundles[:num_workers] + [(spare[2], 0) for spare in taken] + \
            [(pg, j) for j in range(len(fresh))]
        for i, g in zip(added, generations, strict=True):
            self._generations[i] = g
        self.loads.resize(num_workers)
        prepared = [*kept, *added[:len(taken)]]
        committed = await asyncio.gather(*(self.workers[i].commit.remote(new_map.version, new_map.worker_experts(i))
                                           for i in prepared), return_exceptions=True)
        for i, result in zip(prepared, committed, strict=True):  # one that died meanwhile is replaced with the new map
            if isinstance(result, BaseException):
                log.warning("pool %s: expert worker %d did not take map version %d: %s", self.pool_id, i,
                            new_map.version, first_line(result))
        for worker, endpoint, bundle in retired:
            self.retiring[endpoint.pid] = {"worker": endpoint.index, "actor": worker, "placement_group": bundle[0]}
            task = asyncio.get_running_loop().create_task(self._retire(worker, endpoint, bundle))
            self._retirements.add(task)
            task.add_done_callback(self._retirements.discard)
        seconds = time.monotonic() - started
        report = {"changed": True, "num_workers": num_workers, "previous_workers": before,
                  "map_version": new_map.version, "seconds": seconds, "load_seconds": loaded - started,
                  "placed_on_measured_load": measured, "slots_per_worker": capacity,
                  "added": added, "from_spares": len(taken), "retired": [endpoint.index for _, endpoint, _ in retired],
                  "experts_read": sum(len(e) for i in added for e in new_map.worker_experts(i))}
        self.resizes.append(report)
        self._refill_spares()
        log.info("pool %s: resized from %d to %d expert workers in %.2fs (map version %d%s)", self.pool_id, before,
                 num_workers, seconds, new_map.version,
                 f"; workers {report['retired']} leave once no link to them is left" if retired else "")
        return report

    async def _autoscale_periodically(self, policy: AutoscalePolicy) -> None:
        """Every interval: the workers' rows per second and mean wait per layer message since the last look, the
        policy's wanted size, and a resize when it differs and the cool-down has passed."""
        last: tuple[float, int, float, int] | None = None  # (when, rows, service seconds, messages), all workers
        last_resize = -math.inf
        while True:
            await asyncio.sleep(policy.interval_s)
            try:
                stats = await self.worker_stats()
                now = (time.monotonic(), sum(s.get("rows", 0) for s in stats),
                       sum(s.get("service_s", 0.0) for s in stats), sum(s.get("messages", 0) for s in stats))
                if last is not None and len(stats) == self.expert_map.num_workers and now[1] >= last[1]:
                    rows_per_s = (now[1] - last[1]) / (now[0] - last[0])
                    messages = now[3] - last[3]
                    wait_ms = 1000 * (now[2] - last[2]) / messages if messages > 0 else None
                    size = policy.wanted(self.expert_map.num_workers, rows_per_s, wait_ms)
                    if size != self.expert_map.num_workers and time.monotonic() - last_resize >= policy.cooldown_s:
                        log.info("pool %s: autoscaling from %d to %d workers (%.0f rows/s, wait %s ms per message)",
                                 self.pool_id, self.expert_map.num_workers, size, rows_per_s,
                                 "-" if wait_ms is None else f"{wait_ms:.2f}")
                        await self.resize(size)
                        last_resize = time.monotonic()
                        stats = await self.worker_stats()  # counts from here (retired workers' rows are gone)
                        now = (time.monotonic(), sum(s.get("rows", 0) for s in stats),
                               sum(s.get("service_s", 0.0) for s in stats), sum(s.get("messages", 0) for s in stats))
                last = now
            except Exception as err:  # a refused or failed resize: the next interval asks again
                log.error("pool %s: autoscaling: %s", self.pool_id, first_line(err))
                last = None

    async def _take_spare(self, spare: tuple[Any, dict[str, Any], PlacementGroup | None], index: int,
                          generation: int, new_map: ExpertMap) -> tuple[WorkerEndpoint, dict[str, Any]]:
        """A started spare becomes worker ``index`` and loads its experts of ``new_map`` (committed with the kept
        workers)."""
        worker, info, _ = spare
        await worker.adopt.remote(index, generation)
        await asyncio.wait_for(worker.prepare.remote(new_map.version, new_map.worker_experts(index)),
                               self.pool_cfg.start_timeout_s)
        info = info | {"worker_index": index, "experts": list(new_map.hosted(index)), "generation": generation}
        return (WorkerEndpoint(index, generation, info["node_id"], info["node_ip"], info["address"], info["device"],
                               info["pid"], worker), info)

    def _refill_spares(self) -> None:
        """Start spares in the background until there are ``spare_workers`` (one refill at a time)."""
        if self.pool_cfg.spare_workers <= len(self.spares) or (self._refilling and not self._refilling.done()):
            return
        self._refilling = asyncio.get_running_loop().create_task(self._start_spares())

    async def _start_spares(self) -> None:
        while len(self.spares) < self.pool_cfg.spare_workers:
            self._spares_made += 1
            label = self._spares_made
            try:
                pg = await asyncio.to_thread(
                    place, [worker_bundle(self.pool_cfg, self.gpus)], self.pool_cfg.placement_strategy,
                    self.pool_cfg.placement_timeout_s, f"moe-pool-{self.pool_id}-spare{label}",
                    f"a spare expert worker for pool {self.pool_id}")
                worker = self._spawn_spare(label, self.expert_map.version, pg)
                _, info = await self._started(worker, -1, label)
            except Exception as err:
                log.warning("pool %s: could not start a spare expert worker: %s", self.pool_id, first_line(err))
                return
            self.spares.append((worker, info, pg))
            log.info("pool %s: spare expert worker ready (pid %s; %d spares)", self.pool_id, info["pid"],
                     len(self.spares))

    def _spawn_spare(self, label: int, version: int, pg: PlacementGroup | None) -> Any:
        """A worker holding no experts (index -1 until taken; ``label`` keeps its address unique)."""
        options = self._worker_actor_options()
        if pg is not None:
            options["scheduling_strategy"] = bundle_strategy(pg, 0)
        nothing = tuple(() for _ in range(self.expert_map.num_layers))
        return ray.remote(ExpertWorker).options(**options).remote(
            self.engine_cfg, version, nothing, -1, label, self.pool_id, self.pool_cfg.actor_threads, self.spec,
            self.pool_cfg.merge_wait_ms / 1000, self.pool_cfg.expert_cache_size)

    async def _retire(self, worker: Any, endpoint: WorkerEndpoint,
                      bundle: tuple[PlacementGroup | None, int]) -> None:
        """A retired worker leaves once no link may send it rows: every coordinator has moved to a map without it
        and closed its link (a dead coordinator's link closes too), or after link_timeout_s in any case (a
        coordinator that has not moved by then finds the link closed and follows the pool's view)."""
        deadline = time.monotonic() + self.pool_cfg.link_timeout_s
        while time.monotonic() < deadline:
            try:
                links = (await asyncio.wait_for(worker.ping.remote(), PING_TIMEOUT_S))["links"]
            except Exception:
                break  # dead already
            if links == 0:
                break
            await asyncio.sleep(RETIRE_POLL_S)
        else:
            log.warning("pool %s: retired expert worker %d (pid %d) still has links after %gs; stopping it anyway",
                        self.pool_id, endpoint.index, endpoint.pid, self.pool_cfg.link_timeout_s)
        ray.kill(worker, no_restart=True)
        self.retiring.pop(endpoint.pid, None)
        pg = bundle[0]
        if pg is not None and pg is not self.pg and all(b[0] is not pg for b in self.bundles) \
                and not any(info["placement_group"] is pg for info in self.retiring.values()):
            remove_placement_group(pg)  # its last worker is gone
        log.info("pool %s: retired expert worker %d (pid %d) stopped", self.pool_id, endpoint.index, endpoint.pid)

    # -------------------------------------------------------------------------------------------- report

    def summary(self) -> str:
        extra = f", {self.pool_cfg.redundant_experts} redundant slots" if self.pool_cfg.redundant_experts else ""
        share = f"{self.pool_cfg.worker_num_gpus:g} GPU" if self.gpus else f"{self.pool_cfg.worker_num_cpus:g} CPU"
        return (f"{self.expert_map.num_workers} expert workers x up to {self.capacity} experts{extra}, "
                f"{share} each")

    async def describe(self) -> dict[str, Any]:
        return {"pool_id": self.pool_id, "summary": self.summary(),
                "expert_map": [list(self.expert_map.hosted(w)) for w in range(self.expert_map.num_workers)],
                "map_version": self.expert_map.version,
                "placement": [[list(experts) for experts in layer] for layer in self.expert_map.layers],
                "slots_per_worker": self.capacity, "rebalances": list(self.rebalances),
                "num_workers": self.expert_map.num_workers, "resizes": list(self.resizes),
                "resizing_to": self._resizing, "retiring": sorted(self.retiring), "spares": len(self.spares),
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
        for task in list(self._retirements):
            task.cancel()
        for background in (self._refilling, self._autoscaler):
            if background is not None:
                background.cancel()
        for worker, _, spare_pg in self.spares:
            ray.kill(worker, no_restart=True)
            if spare_pg is not None:
                with contextlib.suppress(Exception):
                    remove_placement_group(spare_pg)
        self.spares = []
        for info in self.retiring.values():
            ray.kill(info["actor"], no_restart=True)
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        extra = {id(pg): pg for pg, _ in self.bundles if pg is not None and pg is not self.pg}
        extra |= {id(pg): pg for pg in (info["placement_group"] for info in self.retiring.values())
                  if pg is not None and pg is not self.pg}
        for pg in extra.values():
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
        self.workers = []
        if self.own_pg and self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
