"""ClusterEngine: the expert-parallel engine seen from a driver (a script, the CLI, a benchmark, a test): the
EngineClient (cluster/engine/client.py) through Ray, the same interface as the in-process EngineLoop.

It runs a Coordinator actor (scheduler, KV cache, attention, routing, LM head) attached to an ExpertPool (the
expert workers). ``start`` creates a pool of its own, or attaches to a pool someone else started
(``start_pool``, or ``find_pool`` by name): several ClusterEngines then share one set of experts, which is the
M attention : N experts shape of the Serve app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from torch import Tensor

from cluster.engine.api import EngineStats, Prompt, new_request_id
from cluster.engine.client import EngineClient, IntervalS, paced
from cluster.engine.coordinator import Coordinator
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import Continuation, RequestOutput, RequestResult
from cluster.engine.validation import resolve_max_model_len
from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig, omp_runtime_env
from cluster.errors import ClusterStartError, EngineDeadError, first_line, root_cause
from cluster.model.config import ModelConfig
from cluster.model.tokenizer import Tokenizer
from workers.placement import ensure_ray, use_gpus
from workers.pool import ExpertPool

log = logging.getLogger("moe_cluster.cluster")
NAMESPACE = "moe-cluster"


def unwrap(err: BaseException) -> BaseException:
    """The exception raised inside the actor (ValueError, ...) instead of Ray's wrapper."""
    if isinstance(err, RayActorError):
        return EngineDeadError(f"the cluster's coordinator died: {first_line(err)}")
    return root_cause(err)


def start_pool(engine_cfg: EngineConfig, pool_cfg: PoolConfig, name: str | None = None) -> Any:
    """Start an ExpertPool actor (named ``name`` in the moe-cluster namespace, if given) and its workers."""
    ModelConfig.from_file(engine_cfg.model_dir())  # fail fast on a bad checkpoint, before any actor starts
    gpus = use_gpus(pool_cfg.use_gpus)
    options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "max_concurrency": 64, "namespace": NAMESPACE}
    if name:
        options["name"] = name
    pool: Any = ray.remote(ExpertPool).options(**options).remote(engine_cfg, pool_cfg, name, gpus=gpus)
    try:
        ray.get(pool.start.remote())
    except BaseException as err:
        with contextlib.suppress(Exception):
            ray.get(pool.shutdown.remote(), timeout=30)
        ray.kill(pool, no_restart=True)
        cause = unwrap(err)
        if isinstance(cause, (ValueError, TypeError, ClusterStartError)):
            raise cause from None
        raise ClusterStartError(f"the expert pool failed to start: {cause}") from None
    return pool


def find_pool(name: str) -> Any:
    """The running ExpertPool actor called ``name``."""
    return ray.get_actor(name, namespace=NAMESPACE)


def stop_pool(pool: Any) -> None:
    with contextlib.suppress(Exception):
        ray.get(pool.shutdown.remote(), timeout=60)
    with contextlib.suppress(Exception):
        ray.kill(pool, no_restart=True)


class ClusterEngine(EngineClient):
    """The EngineClient through Ray: its engine runs in a Coordinator actor."""

    def __init__(self, coordinator: Any, pool: Any, owns_pool: bool, engine_cfg: EngineConfig,
                 cluster_cfg: ClusterConfig, owns_ray: bool, info: dict[str, Any]) -> None:
        self.coordinator = coordinator
        self.pool = pool
        self.owns_pool = owns_pool
        self.engine_cfg = engine_cfg
        self.cluster_cfg = cluster_cfg
        self.owns_ray = owns_ray
        self.info = info
        model_dir = engine_cfg.model_dir()
        self.model_config = ModelConfig.from_file(model_dir)
        self.max_model_len = resolve_max_model_len(self.model_config, engine_cfg)
        self.tokenizer = Tokenizer(model_dir)
        self._closed = False

    @classmethod
    def start(cls, engine_cfg: EngineConfig, cluster_cfg: ClusterConfig | None = None,
              pool_cfg: PoolConfig | None = None, pool: Any | None = None) -> ClusterEngine:
        """Start a coordinator attached to ``pool`` (an ExpertPool actor), or to a new pool of its own."""
        cluster_cfg = cluster_cfg or ClusterConfig()
        pool_cfg = pool_cfg or PoolConfig()
        model_cfg = ModelConfig.from_file(engine_cfg.model_dir())  # fail fast on a bad checkpoint, before Ray
        workers = -(-model_cfg.num_experts // pool_cfg.experts_per_worker)
        owns_ray = ensure_ray(cluster_cfg.address, (1 + workers) * pool_cfg.worker_num_cpus)
        owns_pool = pool is None
        if pool is None:
            pool = start_pool(engine_cfg, pool_cfg)
        gpus = use_gpus(cluster_cfg.use_gpus)
        coordinator: Any = ray.remote(Coordinator).options(
            num_cpus=cluster_cfg.coordinator_num_cpus, num_gpus=cluster_cfg.coordinator_num_gpus if gpus else 0,
            resources=dict(cluster_cfg.coordinator_resources), max_restarts=0, max_concurrency=1000,
            runtime_env=omp_runtime_env(cluster_cfg.coordinator_omp_wait_policy),
        ).remote(engine_cfg, cluster_cfg, pool)
        try:
            info: dict[str, Any] = ray.get(coordinator.start.remote())
        except BaseException as err:
            ray.kill(coordinator, no_restart=True)
            if owns_pool:
                stop_pool(pool)
            cause = unwrap(err)
            if isinstance(cause, (ValueError, TypeError, ClusterStartError)):
                raise cause from None
            raise ClusterStartError(f"the cluster failed to start: {cause}") from None
        return cls(coordinator, pool, owns_pool, engine_cfg, cluster_cfg, owns_ray, info)

    # ---------------------------------------------------------------------------------------- calls

    def _call(self, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except (RayTaskError, RayActorError) as err:
            raise unwrap(err) from None

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[RequestResult]:
        return list(self._call(self.coordinator.generate.remote(list(prompts), params)))

    async def stream_batches(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                             interval_s: IntervalS | None = None, continuation: Continuation | None = None,
                             whole: bool = False) -> AsyncGenerator[list[RequestOutput], None]:
        rid = request_id or new_request_id()
        refs: Any = self.coordinator.stream.remote(prompt, params, rid, continuation, whole)
        reports: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        pump = asyncio.get_running_loop().create_task(self._pump(refs, reports))
        finished = False
        try:  # the coordinator's batches are paced here, where the caller is
            async with contextlib.aclosing(paced(reports, interval_s)) as batches:
                async for batch in batches:
                    finished = batch[-1].finished
                    yield batch
        finally:
            pump.cancel()
            if not finished:  # the consumer left early (client disconnect, cancellation): free the request
                with contextlib.suppress(Exception):
                    self.coordinator.abort.remote(rid)
                    ray.cancel(refs)

    @staticmethod
    async def _pump(refs: Any, reports: asyncio.Queue[RequestOutput | BaseException]) -> None:
        """The coordinator's stream, one report at a time, into ``reports``; a failure as its last item."""
        try:
            last: RequestOutput | None = None
            async for ref in refs:
                batch: list[RequestOutput] = await ref
                for last in batch:
                    reports.put_nowait(last)
            if last is None or not last.finished:
                reports.put_nowait(EngineDeadError("the coordinator's stream ended before the request finished"))
        except (RayTaskError, RayActorError) as err:
            reports.put_nowait(unwrap(err))
        except Exception as err:
            reports.put_nowait(err)

    def abort(self, request_id: str) -> None:
        self.coordinator.abort.remote(request_id)

    def score(self, token_lists: Sequence[Sequence[int]]) -> list[Tensor]:
        return list(self._call(self.coordinator.score.remote([list(t) for t in token_lists])))

    def stats(self) -> EngineStats:
        stats: EngineStats = self._call(self.coordinator.stats.remote())
        return stats

    def drain(self, timeout_s: float) -> bool:
        return bool(self._call(self.coordinator.drain.remote(timeout_s)))

    def health(self) -> dict[str, Any]:
        try:
            return dict(ray.get(self.coordinator.health.remote(), timeout=10))
        except Exception as err:
            return {"alive": False, "reason": first_line(unwrap(err))}

    def describe(self) -> dict[str, Any]:
        """This coordinator's links and the pool now: workers (pids, nodes, generations), replacements so far."""
        return {**self._call(self.coordinator.describe.remote()), "pool": self._call(self.pool.describe.remote())}

    def worker_stats(self) -> list[dict[str, Any]]:
        return list(self._call(self.pool.worker_stats.remote()))

    def shutdown(self) -> None:
        """Detach and stop the coordinator; stop the pool if this engine started it (and Ray, likewise)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            ray.get(self.coordinator.shutdown.remote(), timeout=60)
        with contextlib.suppress(Exception):
            ray.kill(self.coordinator, no_restart=True)
        if self.owns_pool:
            stop_pool(self.pool)
        if self.owns_ray:
            ray.shutdown()
        log.info("cluster engine shut down")
