"""Coordinator: a Ray actor that runs one engine whose MoE backend talks to an expert pool: the server side of
the Ray EngineClient (workers/cluster_engine.py: ClusterEngine), which only forwards to the in-process client it
holds (loop.py: EngineLoop); a Serve engine replica runs the same EngineLoop in-process instead, see
router_service/engine_deployment.py. The engine owns the scheduler, the paged KV cache, embeddings, attention,
routing and the LM head; the experts are the pool's. Stream pacing is the caller's (client.paced)."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import ray
import torch

from cluster.engine.api import EngineStats, Prompt
from cluster.engine.loader import build_engine, distributed_moe
from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import Continuation, RequestOutput, RequestResult
from cluster.engine_config import ClusterConfig, EngineConfig
from cluster.moe.layer import MoELayer
from cluster.moe.pool_api import RayActorPool

log = logging.getLogger("moe_cluster.coordinator")


def new_coordinator_id() -> str:
    return f"coordinator-{uuid.uuid4().hex[:8]}"


class Coordinator:
    def __init__(self, engine_cfg: EngineConfig, cluster_cfg: ClusterConfig, pool_actor: Any) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        torch.set_num_threads(cluster_cfg.coordinator_threads)
        self.coordinator_id = new_coordinator_id()
        self.engine_cfg = engine_cfg
        self.cluster_cfg = cluster_cfg
        self.pool = RayActorPool(pool_actor, cluster_cfg.start_timeout_s)
        self.loop: EngineLoop | None = None

    async def start(self) -> dict[str, Any]:
        def build() -> EngineLoop:
            factory = distributed_moe(self.pool, self.coordinator_id, self.cluster_cfg)
            threads = self.cluster_cfg.coordinator_threads
            return EngineLoop(lambda: build_engine(self.engine_cfg, factory, threads), self.cluster_cfg.heartbeat_s)

        self.loop = await asyncio.to_thread(build)
        return self.describe()

    def _engine(self) -> EngineLoop:
        if self.loop is None:
            raise RuntimeError("the coordinator has not been started")
        return self.loop

    async def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
                       ) -> list[RequestResult]:
        return await asyncio.to_thread(self._engine().generate, prompts, params)

    async def stream(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                     continuation: Continuation | None = None, whole: bool = False
                     ) -> AsyncIterator[list[RequestOutput]]:
        async for batch in self._engine().stream_batches(prompt, params, request_id, continuation=continuation,
                                                         whole=whole):
            yield batch

    def abort(self, request_id: str) -> None:
        self._engine().abort(request_id)

    async def score(self, token_lists: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return await asyncio.to_thread(self._engine().score, token_lists)

    async def stats(self) -> EngineStats:
        return await asyncio.to_thread(self._engine().stats)

    def health(self) -> dict[str, Any]:
        return self._engine().health() if self.loop is not None else {"alive": False, "reason": "not started"}

    async def drain(self, timeout_s: float) -> bool:
        return await asyncio.to_thread(self._engine().drain, timeout_s)

    def describe(self) -> dict[str, Any]:
        moe = self.loop.engine.moe if self.loop is not None else None
        links = moe.describe() if isinstance(moe, MoELayer) else {}
        return {"coordinator_id": self.coordinator_id, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), **links}

    async def shutdown(self) -> None:
        if self.loop is not None:
            await asyncio.to_thread(self.loop.shutdown)
