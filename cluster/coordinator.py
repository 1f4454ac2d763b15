"""Coordinator: the Ray actor that owns one expert-parallel cluster.

It runs the engine (scheduler, paged KV cache, embeddings, attention, routing, LM head) with the
DistributedMoE backend, creates its ExpertWorker actors in the placement group's bundles, and forms the
process group with them. It owns the workers (they share its fate) and names any member that fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup

from cluster.checkpoint import Checkpoint
from cluster.config import ModelConfig
from cluster.dispatch import DistributedMoE
from cluster.engine_api import EngineStats, Prompt
from cluster.engine_config import ClusterConfig, EngineConfig
from cluster.engine_loop import EngineLoop
from cluster.errors import ClusterStartError, WorkerFailure
from cluster.loader import build_engine
from cluster.moe import ExpertMap
from cluster.placement import bundle_strategy
from cluster.sampling import SamplingParams
from cluster.sequence import RequestOutput, RequestResult
from cluster.transport import (
    OP_REJOIN,
    CoordinatorLink,
    ExchangeError,
    Rendezvous,
    create_store,
    join_group,
    leave_group,
)
from workers.expert_worker import ExpertWorker, row_layout

log = logging.getLogger("moe_cluster.coordinator")
PING_TIMEOUT_S = 10.0


def choose_backend(requested: str, devices: Sequence[str]) -> str:
    all_cuda = all(d.startswith("cuda") for d in devices)
    if requested == "auto":
        return "nccl" if all_cuda else "gloo"
    if requested == "nccl" and not all_cuda:
        raise ValueError(f"backend 'nccl' needs every member on CUDA, but the devices are {list(devices)}")
    return requested


class Coordinator:
    def __init__(self, engine_cfg: EngineConfig, cluster_cfg: ClusterConfig, placement_group: PlacementGroup | None,
                 first_worker_bundle: int, worker_gpus: int) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        torch.set_num_threads(cluster_cfg.actor_threads)
        self.engine_cfg = engine_cfg
        self.cluster_cfg = cluster_cfg
        self.pg = placement_group
        self.first_worker_bundle = first_worker_bundle
        self.worker_gpus = worker_gpus
        self.model_cfg = ModelConfig.from_file(engine_cfg.model)
        self.expert_map = ExpertMap.contiguous(self.model_cfg.num_experts, cluster_cfg.experts_per_worker)
        self.workers: list[Any] = []  # ExpertWorker actor handles
        self.worker_info: list[dict[str, Any]] = []
        self.rdv: Rendezvous | None = None
        self.loop: EngineLoop | None = None
        self._store: Any = None
        self._link_device = torch.device("cpu")
        self._layout: Any = None
        self._link: CoordinatorLink | None = None
        self.recoveries: list[dict[str, Any]] = []  # one entry per rebuilt process group

    # ------------------------------------------------------------------------------------------ start

    async def start(self) -> dict[str, Any]:
        """As a Ray actor (ClusterEngine): start from the actor's event loop."""
        return await asyncio.to_thread(self.start_in_process)

    def start_in_process(self) -> dict[str, Any]:
        """Create the workers, form the process group, build the engine. A Serve engine replica calls this
        directly: the replica is then the coordinator, with no Ray hop between it and its engine."""
        started = time.perf_counter()
        log.info("starting %d expert workers for experts %s", self.expert_map.num_workers,
                 list(self.expert_map.workers))
        self.workers = [self._spawn_worker(i) for i in range(self.expert_map.num_workers)]
        # The workers load their experts while the coordinator loads its own weights (on the loop's thread).
        self.loop = EngineLoop(lambda: build_engine(self.engine_cfg, self._connect_workers),
                               self.cluster_cfg.heartbeat_s)
        log.info("cluster ready in %.1fs: %s", time.perf_counter() - started, self.describe()["summary"])
        return self.describe()

    def _spawn_worker(self, index: int) -> Any:
        options: dict[str, Any] = {"num_cpus": self.cluster_cfg.worker_num_cpus, "num_gpus": self.worker_gpus,
                                   "max_restarts": 0, "max_concurrency": 4}
        if self.pg is not None:
            options["scheduling_strategy"] = bundle_strategy(self.pg, self.first_worker_bundle + index)
        return ray.remote(ExpertWorker).options(**options).remote(
            self.engine_cfg, self.expert_map.workers[index], index, self.cluster_cfg.actor_threads)

    def _get(self, refs: list[Any], what: str) -> list[Any]:
        try:
            return ray.get(refs, timeout=self.cluster_cfg.start_timeout_s)
        except GetTimeoutError:
            raise ClusterStartError(f"{what} did not finish within {self.cluster_cfg.start_timeout_s:g}s") from None
        except RayActorError as err:
            raise ClusterStartError(f"{what} failed: an expert worker died: {_first_line(err)}") from None

    def _connect_workers(self, model_cfg: ModelConfig, ckpt: Checkpoint, dtype: torch.dtype,
                         device: torch.device) -> DistributedMoE:
        """MoE factory for build_engine: wait for the workers, form the process group, start their loops."""
        self.worker_info = self._get([w.info.remote() for w in self.workers], "loading the experts")
        devices = [str(device)] + [info["device"] for info in self.worker_info]
        backend = choose_backend(self.cluster_cfg.backend, devices)
        exchange = self.cluster_cfg.exchange
        if exchange == "auto":
            exchange = "collective" if backend == "nccl" else "sparse"
        host = ray.util.get_node_ip_address()
        world = 1 + len(self.workers)
        self._store = create_store(host, world, self.cluster_cfg.collective_timeout_s)
        self.rdv = Rendezvous(host, self._store.port, world, backend, exchange, self.cluster_cfg.collective_timeout_s,
                              max(len(e) for e in self.expert_map.workers), self.cluster_cfg.inline_message_bytes)
        log.info("forming the process group: %d members, backend %s, %s exchange, rendezvous %s:%d", world,
                 backend, exchange, host, self._store.port)
        self._link_device = device if backend == "nccl" else torch.device("cpu")
        self._layout = row_layout(model_cfg, dtype, self.rdv)
        return DistributedMoE(self._form_group(), self.expert_map, model_cfg.num_layers, model_cfg.experts_per_token,
                              self._diagnose, self._rebuild if self.cluster_cfg.recover_workers else None)

    def _form_group(self) -> CoordinatorLink:
        """Every worker and the coordinator join the group of the current epoch; the workers' loops start."""
        assert self.rdv is not None
        joins = [w.join.remote(self.rdv, i + 1) for i, w in enumerate(self.workers)]
        join_group(self.rdv, 0, self._store)
        self._get(joins, "joining the process group")
        self._get([w.start_loop.remote() for w in self.workers], "starting the worker loops")
        self._link = CoordinatorLink(self.rdv, self._link_device, self._layout)
        return self._link

    def _rebuild(self, failure: WorkerFailure) -> CoordinatorLink:
        """Replace the workers that died or hung (each reloads only its own experts) and rebuild the group.

        1. tell every worker still reachable to leave its loop, then leave the group;
        2. a worker that does not answer a ping, or whose loop does not end, is killed;
        3. replacements start in the same placement-group bundles and load their experts;
        4. every member joins the group of the next epoch (a fresh key prefix on the same store).
        """
        assert self.rdv is not None
        started = time.monotonic()
        log.warning("recovering from: %s", failure)
        if self._link is not None:
            self._link.notify_each(OP_REJOIN, wait_s=2.0)
        leave_group()
        refs: list[Any] = [w.ping.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PING_TIMEOUT_S)
        replace: list[int] = []
        for i, ref in enumerate(refs):
            try:
                if ref not in ready:
                    raise TimeoutError
                ray.get(ref)
            except (RayActorError, TimeoutError):
                replace.append(i)
        survivors = [i for i in range(len(self.workers)) if i not in replace]
        exited = ray.get([self.workers[i].wait_loop_exit.remote(self.cluster_cfg.collective_timeout_s)
                          for i in survivors])
        replace += [i for i, ok in zip(survivors, exited, strict=True) if not ok]  # stuck in a collective
        for i in sorted(replace):
            log.warning("replacing %s", self.member(i))
            ray.kill(self.workers[i], no_restart=True)
            self.workers[i] = self._spawn_worker(i)
        self.worker_info = self._get([w.info.remote() for w in self.workers], "reloading the experts")
        self.rdv = dataclasses.replace(self.rdv, epoch=self.rdv.epoch + 1)
        link = self._form_group()
        seconds = time.monotonic() - started
        self.recoveries.append({"replaced": sorted(replace), "seconds": seconds, "reason": str(failure)})
        log.warning("recovered in %.1fs: replaced expert workers %s, process group epoch %d", seconds,
                    sorted(replace), self.rdv.epoch)
        return link

    # -------------------------------------------------------------------------------------- failures

    def member(self, index: int) -> str:
        info = self.worker_info[index] if index < len(self.worker_info) else {}
        return (f"expert worker {index} (rank {index + 1}, experts {list(self.expert_map.workers[index])}, "
                f"pid {info.get('pid', '?')} on {info.get('node_ip', '?')})")

    def _diagnose(self, err: BaseException) -> WorkerFailure:
        """Which member made a collective fail? Dead first, then a failed loop, then a silent one."""
        refs: list[Any] = [w.ping.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PING_TIMEOUT_S)
        loop_errors: dict[int, str] = {}
        silent = []
        for i, ref in enumerate(refs):
            if ref not in ready:
                silent.append(i)
                continue
            try:
                status: dict[str, Any] = ray.get(ref)
            except RayActorError as dead:
                return WorkerFailure(self.member(i), f"its process died ({_first_line(dead)})")
            if status["error"]:
                loop_errors[i] = status["error"]
        if silent:
            return WorkerFailure(self.member(silent[0]), f"it did not answer a ping within {PING_TIMEOUT_S:g}s")
        peer = getattr(err, "rank", None)
        if isinstance(err, ExchangeError) and peer is not None and peer - 1 not in loop_errors:
            return WorkerFailure(self.member(peer - 1), f"it stopped exchanging rows ({_first_line(err)})")
        for i, message in loop_errors.items():
            if "closed by peer" not in message:
                return WorkerFailure(self.member(i), f"its loop failed: {message}")
        return WorkerFailure("the process group", _first_line(err))

    # ------------------------------------------------------------------------------------ engine API

    def _engine(self) -> EngineLoop:
        if self.loop is None:
            raise RuntimeError("the coordinator has not been started")
        return self.loop

    async def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
                       ) -> list[RequestResult]:
        return await asyncio.to_thread(self._engine().generate, prompts, params)

    async def stream(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None
                     ) -> AsyncIterator[list[RequestOutput]]:
        async for batch in self._engine().stream_batches(prompt, params, request_id):
            yield batch

    def abort(self, request_id: str) -> None:
        self._engine().abort(request_id)

    async def score(self, token_lists: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return await asyncio.to_thread(self._engine().score, token_lists)

    async def stats(self) -> EngineStats:
        return await asyncio.to_thread(self._engine().stats)

    def health(self) -> dict[str, Any]:
        return self._engine().health() if self.loop is not None else {"alive": False, "reason": "not started"}

    def describe(self) -> dict[str, Any]:
        rdv = self.rdv
        summary = (f"{len(self.workers)} expert workers x {self.cluster_cfg.experts_per_worker} experts, "
                   f"backend {rdv.backend if rdv else '?'}, {rdv.exchange if rdv else '?'} exchange")
        return {"summary": summary, "workers": self.worker_info,
                "expert_map": [list(e) for e in self.expert_map.workers],
                "backend": rdv.backend if rdv else None, "exchange": rdv.exchange if rdv else None,
                "rendezvous": f"{rdv.host}:{rdv.port}" if rdv else None, "recoveries": list(self.recoveries),
                "node_ip": ray.util.get_node_ip_address()}

    async def worker_timings(self, reset: bool = False) -> list[dict[str, float]]:
        timings: list[dict[str, float]] = await asyncio.gather(*[w.timings.remote() for w in self.workers])
        if reset:
            await asyncio.gather(*[w.reset_timings.remote() for w in self.workers])
        return list(timings)

    async def worker_pids(self) -> list[int]:
        return [int(info["pid"]) for info in self.worker_info]

    def describe_now(self) -> dict[str, Any]:
        return self.describe()

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop the engine loop, release the workers and leave the process group."""
        if self.loop is not None:
            self.loop.shutdown()
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__
