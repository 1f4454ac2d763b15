"""ClusterEngine: the expert-parallel engine, seen from the driver (a script, the CLI or a Serve replica).

Same interface as LocalEngine (generate, stream, abort, score, stats, health, shutdown); every call goes to
the cluster's Coordinator actor. ``start`` gang-schedules the coordinator and its expert workers in one
placement group - its own, or bundles of the caller's (a Serve replica's ``placement_group_bundles``).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, remove_placement_group
from torch import Tensor

from cluster.config import ModelConfig
from cluster.coordinator import Coordinator
from cluster.engine_api import EngineStats, Prompt, new_request_id
from cluster.engine_config import ClusterConfig, EngineConfig
from cluster.engine_loop import each_output
from cluster.errors import ClusterStartError, EngineDeadError
from cluster.moe import ExpertMap
from cluster.placement import actor_shape, bundle_strategy, cluster_bundles, ensure_ray, place, use_gpus
from cluster.sampling import SamplingParams
from cluster.sequence import RequestOutput, RequestResult
from cluster.tokenizer import Tokenizer
from cluster.validation import resolve_max_model_len

log = logging.getLogger("moe_cluster.cluster")


def unwrap(err: BaseException) -> BaseException:
    """The exception raised inside the actor (ValueError, ...) instead of Ray's wrapper."""
    if isinstance(err, RayTaskError) and isinstance(err.cause, BaseException):
        return err.cause
    if isinstance(err, RayActorError):
        return EngineDeadError(f"the cluster's coordinator died: {str(err).strip().splitlines()[0]}")
    return err


class ClusterEngine:
    def __init__(self, coordinator: ActorHandle, engine_cfg: EngineConfig, cluster_cfg: ClusterConfig,
                 placement_group: PlacementGroup | None, owns_ray: bool, info: dict[str, Any]) -> None:
        self.coordinator = coordinator
        self.engine_cfg = engine_cfg
        self.cluster_cfg = cluster_cfg
        self.placement_group = placement_group  # removed on shutdown when this engine made it
        self.owns_ray = owns_ray
        self.info = info
        self.model_config = ModelConfig.from_file(engine_cfg.model)
        self.max_model_len = resolve_max_model_len(self.model_config, engine_cfg)
        self.tokenizer = Tokenizer(engine_cfg.model)
        self._closed = False

    @classmethod
    def start(cls, engine_cfg: EngineConfig, cluster_cfg: ClusterConfig,
              placement_group: PlacementGroup | None = None, first_bundle: int = 0) -> ClusterEngine:
        """Place and start a cluster. With ``placement_group``, use its bundles from ``first_bundle`` on
        (coordinator, then one per worker); otherwise create (and later remove) a placement group."""
        model_cfg = ModelConfig.from_file(engine_cfg.model)  # fail fast on a bad checkpoint, before Ray
        expert_map = ExpertMap.contiguous(model_cfg.num_experts, cluster_cfg.experts_per_worker)
        owns_ray = ensure_ray(cluster_cfg.address, (1 + expert_map.num_workers) * cluster_cfg.worker_num_cpus)
        gpus = use_gpus(cluster_cfg)
        own_pg = placement_group is None
        pg = placement_group
        if pg is None:
            pg = place(cluster_bundles(cluster_cfg, expert_map.num_workers, gpus), cluster_cfg.placement_strategy,
                       cluster_cfg.placement_timeout_s, name=f"moe-cluster-{uuid.uuid4().hex[:8]}")
        shape = actor_shape(cluster_cfg, gpus)
        coordinator: Any = ray.remote(Coordinator).options(
            num_cpus=shape.num_cpus, num_gpus=shape.num_gpus, max_restarts=0, max_concurrency=1000,
            scheduling_strategy=bundle_strategy(pg, first_bundle),
        ).remote(engine_cfg, cluster_cfg, pg, first_bundle + 1, shape.num_gpus)
        try:
            info: dict[str, Any] = ray.get(coordinator.start.remote())
        except BaseException as err:
            ray.kill(coordinator, no_restart=True)
            if own_pg:
                remove_placement_group(pg)
            cause = unwrap(err)
            if isinstance(cause, (ValueError, TypeError, ClusterStartError)):
                raise cause from None
            raise ClusterStartError(f"the cluster failed to start: {cause}") from None
        return cls(coordinator, engine_cfg, cluster_cfg, pg if own_pg else None, owns_ray, info)

    # ---------------------------------------------------------------------------------------- calls

    def _call(self, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except (RayTaskError, RayActorError) as err:
            raise unwrap(err) from None

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[RequestResult]:
        return list(self._call(self.coordinator.generate.remote(list(prompts), params)))

    async def stream_batches(self, prompt: Prompt, params: SamplingParams,
                             request_id: str | None = None) -> AsyncGenerator[list[RequestOutput], None]:
        rid = request_id or new_request_id()
        finished = False
        refs: Any = self.coordinator.stream.remote(prompt, params, rid)
        try:
            async for ref in refs:
                try:
                    batch: list[RequestOutput] = await ref
                except (RayTaskError, RayActorError) as err:
                    raise unwrap(err) from None
                finished = batch[-1].finished
                yield batch
        finally:
            if not finished:  # the consumer left early (client disconnect, cancellation): free the request
                with contextlib.suppress(Exception):
                    self.coordinator.abort.remote(rid)
                    ray.cancel(refs)

    def stream(self, prompt: Prompt, params: SamplingParams,
               request_id: str | None = None) -> AsyncGenerator[RequestOutput, None]:
        return each_output(self.stream_batches(prompt, params, request_id))

    def abort(self, request_id: str) -> None:
        self.coordinator.abort.remote(request_id)

    def score(self, token_lists: Sequence[Sequence[int]]) -> list[Tensor]:
        return list(self._call(self.coordinator.score.remote([list(t) for t in token_lists])))

    def stats(self) -> EngineStats:
        stats: EngineStats = self._call(self.coordinator.stats.remote())
        return stats

    def health(self) -> dict[str, Any]:
        try:
            return dict(ray.get(self.coordinator.health.remote(), timeout=10))
        except Exception as err:
            return {"alive": False, "reason": str(unwrap(err)).splitlines()[0]}

    def describe(self) -> dict[str, Any]:
        """The cluster now: workers (pids, nodes, GPUs), backend, rendezvous, recoveries so far."""
        return dict(self._call(self.coordinator.describe_now.remote()))

    def worker_timings(self, reset: bool = False) -> list[dict[str, float]]:
        return list(self._call(self.coordinator.worker_timings.remote(reset)))

    def shutdown(self) -> None:
        """Release every actor and the placement group (and the embedded Ray, if this engine started it)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            ray.get(self.coordinator.shutdown.remote(), timeout=60)
        with contextlib.suppress(Exception):
            ray.kill(self.coordinator, no_restart=True)
        if self.placement_group is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self.placement_group)
        if self.owns_ray:
            ray.shutdown()
        log.info("cluster shut down")
