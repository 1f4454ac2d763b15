"""EngineDeployment: a Serve deployment whose replica runs one engine. With the cluster engine the replica is a
coordinator (scheduler, KV cache, attention, routing, LM head) attached to the app's one expert pool
(pool_deployment.py): R replicas are R coordinators on the same experts, and Serve may scale them. With the local
engine each replica holds every expert itself. The ingress reaches the replicas through a DeploymentHandle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from cluster.engine.api import Prompt
from cluster.engine.client import EngineClient
from cluster.engine.coordinator import new_coordinator_id
from cluster.engine.loader import build_engine, distributed_moe
from cluster.engine.loop import EngineLoop
from cluster.engine.sequence import RequestOutput, merge_outputs
from cluster.engine_config import omp_runtime_env
from cluster.errors import EngineDeadError, QueueFullError, RequestError, first_line
from router_service.engine_api import Accepted, GenerateRequest
from router_service.metrics import EngineMetrics
from router_service.pool_deployment import ServePool
from router_service.prefix_routing import ROUTER_CLASS
from router_service.settings import AppSettings
from router_service.tool_calls import with_tools
from workers.placement import use_gpus

log = logging.getLogger("moe_cluster.serve")
DEPLOYMENT_NAME = "EngineDeployment"
STATS_INTERVAL_S = 1.0
MAX_REQUEST_LINES = 10_000  # request lines kept for the console between two reports
SHUTDOWN_WAIT_LOOP_S = 0.5  # how often a stopping replica checks whether its requests are done (Serve: 2 s)


class EngineDeployment:
    def __init__(self, settings: AppSettings, pool: DeploymentHandle | None) -> None:
        self.settings = settings
        self.pool = pool
        engine_cfg = settings.engine_config()
        if pool is None:
            self.engine_id = f"engine-{uuid.uuid4().hex[:6]}"
            self.engine: EngineClient = EngineLoop.local(engine_cfg)
        else:
            # This replica is a coordinator: the engine runs here, in-process, so tokens reach the ingress with one
            # Ray hop; its MoE layers go to the pool's workers over links of its own.
            self.engine_id = new_coordinator_id()
            cluster_cfg = settings.cluster_config()
            # (the pool learns this replica's actor too, to tell at shutdown whether it is still there)
            serve_pool = ServePool(pool, cluster_cfg.start_timeout_s, ray.get_runtime_context().current_actor)
            moe = distributed_moe(serve_pool, self.engine_id, cluster_cfg)
            threads = cluster_cfg.coordinator_threads
            self.engine = EngineLoop(lambda: build_engine(engine_cfg, moe, threads), cluster_cfg.heartbeat_s)
        self.tokenizer = self.engine.tokenizer
        self.metrics = EngineMetrics(settings.model_name, self.engine_id)
        self._sampler: asyncio.Task[None] | None = None  # started by the first async call, on Serve's loop
        self._open_streams = 0  # generate() calls past their first token, for stream pacing
        self._drainer: threading.Thread | None = None  # started by begin_drain()
        self._closed = False  # close() shut the engine down (detached from the pool)
        self._request_lines: list[str] = []  # with log_requests: one per request, until console_report() takes them
        self._dropped_lines = 0
        log.info("%s ready: %s engine for %s", self.engine_id, settings.engine, settings.model)

    def _ensure_sampler(self) -> None:
        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample_stats())

    async def _sample_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            with contextlib.suppress(Exception):
                self.metrics.sample(await asyncio.to_thread(self.engine.stats))

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[Accepted | list[RequestOutput], None]:
        """Accepted first (or an exception: a bad request, a full queue, a dead engine), then outputs."""
        self._ensure_sampler()
        prompt: Prompt  # text, or the token ids of the rendered chat; the engine's input processor does the rest
        if request.messages is not None:
            messages, options = with_tools(request.messages, request.chat_options, self.tokenizer.chat_template)
            prompt = self.tokenizer.encode_chat(messages, **options)
        else:
            assert request.prompt is not None
            prompt = request.prompt
        remaining = request.remaining()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"request {request.request_id} reached its deadline before it started")
        resumed_at = 0 if request.continuation is None else sum(len(s.token_ids) for s in request.continuation.samples)
        stream = self.engine.stream_batches(prompt, request.params, request.request_id,
                                            interval_s=self._stream_interval_s if request.stream else None,
                                            continuation=request.continuation, whole=not request.stream)
        async with contextlib.aclosing(stream):
            try:
                batch: list[RequestOutput] | None = await self._next(stream, remaining)  # raises request errors
            except (ValueError, TypeError, QueueFullError, TimeoutError) as err:
                self._refused(request.request_id, err)
                raise
            assert batch is not None
            first = batch[0]
            yield Accepted(request.request_id, first.num_prompt_tokens, self.engine_id,
                           first.seed if first.seed is not None else request.params.seed)
            if not request.stream:  # the answer whole: the first report and the rest (whole=True), as one item
                if not batch[-1].finished:
                    rest = await self._next(stream, request.remaining())
                    assert rest is not None and rest[-1].finished, "a whole stream ends with its finished report"
                    batch += rest
                last = merge_outputs(batch)
                yield [last]
                self._finished(request.request_id, last, last.num_generated_tokens - resumed_at)
                return
            self._open_streams += 1
            try:
                while batch is not None:
                    # One output per batch, not one per engine step: every output is a Ray item to the ingress
                    # and then an SSE event / gRPC message through the proxy, each with a fixed CPU cost.
                    last = merge_outputs(batch) if len(batch) > 1 else batch[0]
                    yield [last]
                    if last.finished:  # (a continuation's latencies count from the resume, so do its tokens)
                        self._finished(request.request_id, last, last.num_generated_tokens - resumed_at)
                        return
                    # The engine paces the stream (interval_s): what it produced meanwhile is one batch.
                    batch = await self._next(stream, request.remaining())
            finally:
                self._open_streams -= 1

    def _finished(self, request_id: str, last: RequestOutput, new_tokens: int) -> None:
        ttft, e2e = (last.metrics.ttft, last.metrics.e2e) if last.metrics is not None else (None, None)
        self.metrics.observe_request(ttft, e2e, new_tokens, [c.finish_reason or "" for c in last.outputs],
                                     last.metrics)
        if self.settings.log_requests:
            reasons = ", ".join(c.finish_reason or "?" for c in last.outputs)
            self._request_line(f"{request_id}: prompt {last.num_prompt_tokens} tokens, completion "
                               f"{last.num_generated_tokens} tokens ({reasons}), "
                               f"time to first token {ttft or 0.0:.2f} s, total {e2e or 0.0:.2f} s")

    def _refused(self, request_id: str, err: BaseException) -> None:
        """A client's mistake (or a full queue, a passed deadline): one INFO line, no traceback; the ingress
        answers it (400 / 429 / 504)."""
        line = f"{request_id}: refused: {type(err).__name__}: {first_line(err)}"
        log.info("%s", line)
        if self.settings.log_requests:
            self._request_line(line)

    def _request_line(self, line: str) -> None:
        if len(self._request_lines) < MAX_REQUEST_LINES:
            self._request_lines.append(line)
        else:
            self._dropped_lines += 1

    async def console_report(self) -> dict[str, Any]:
        """For the console of ``moe-cluster serve`` (console.py): the engine's counters (None while it drains or
        is down) and the request lines since the last call."""
        try:
            stats: dict[str, Any] | None = (await asyncio.to_thread(self.engine.stats)).as_dict()
        except Exception:
            stats = None
        lines, self._request_lines = self._request_lines, []
        if self._dropped_lines:
            lines.append(f"{self.engine_id}: {self._dropped_lines} more request lines dropped (console too slow)")
            self._dropped_lines = 0
        return {"engine_id": self.engine_id, "stats": stats, "requests": lines}

    def _stream_interval_s(self) -> float:
        """Seconds between a stream's chunks: stream_interval_ms, stretched so that the replica's open streams
        together send at most stream_chunks_per_s chunks per second."""
        interval = self.settings.stream_interval_ms / 1000
        if self.settings.stream_chunks_per_s > 0:
            interval = max(interval, self._open_streams / self.settings.stream_chunks_per_s)
        return interval

    @staticmethod
    async def _next(stream: Any, timeout: float | None) -> list[RequestOutput] | None:
        try:
            batch: list[RequestOutput] = await asyncio.wait_for(anext(stream), timeout=timeout)
            return batch
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            raise TimeoutError("the request's deadline passed") from None

    async def vllm_metrics(self) -> dict[str, Any]:
        """This replica's vLLM series (router_service/vllm_metrics.py), fresh, for the ingress's /metrics."""
        self.metrics.sample(await asyncio.to_thread(self.engine.stats))
        return self.metrics.vllm.snapshot()

    def model_info(self) -> dict[str, Any]:
        cfg = self.engine.model_config
        return {"model": self.settings.model_name, "engine_id": self.engine_id, "engine": self.settings.engine,
                "max_model_len": self.engine.max_model_len, "vocab_size": cfg.vocab_size,
                "num_layers": cfg.num_layers, "num_experts": cfg.num_experts,
                "experts_per_token": cfg.experts_per_token, "hidden_size": cfg.hidden_size,
                "created": int(time.time())}

    async def tokenize_chat(self, messages: list[dict[str, Any]], options: dict[str, Any]) -> list[int]:
        """The prompt token ids of a chat, as a chat completion would make them."""
        messages, options = with_tools(messages, options, self.tokenizer.chat_template)
        return self.tokenizer.encode_chat(messages, **options)

    async def detokenize(self, token_ids: list[int]) -> str:
        vocab = self.engine.model_config.vocab_size
        bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]!r} is outside the vocabulary [0, {vocab})", "tokens")
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def tokenize_with_text(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[str]]:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return ids, [self.tokenizer.token_text(i) for i in ids]

    async def stats(self) -> dict[str, Any]:
        stats = (await asyncio.to_thread(self.engine.stats)).as_dict() | {"engine_id": self.engine_id}
        if self.pool is not None:  # the workers this coordinator shares with the others
            stats["pool_workers"] = await self.pool.worker_stats.remote()
        return stats

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and Serve replaces it."""
        self._ensure_sampler()
        health = await asyncio.to_thread(self.engine.health)
        if not health["alive"] and health["reason"] != "draining":  # draining: on its way out, not broken
            raise EngineDeadError(f"{self.engine_id} is down: {health.get('reason')}")

    async def health(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.engine.health) | {"engine_id": self.engine_id, "pid": os.getpid()}

    async def begin_drain(self) -> None:
        """Shutdown starts now: refuse new requests, let the running ones finish for drain_timeout_s, then end
        those still running with a "the server is shutting down" error, which the ingress (alive for longer,
        see AppSettings.ingress_grace_s) answers as 503 / UNAVAILABLE. ``moe-cluster serve`` broadcasts this to
        every engine replica before it deletes the app: Serve itself calls nothing on a replica before the
        replica's requests are done (it waits for them up to graceful_shutdown_timeout_s, calls ``__del__``,
        then kills the replica), so without this call a request that outlives the grace period is cut by that
        kill instead, which the ingress answers with the same 503 / UNAVAILABLE."""
        if self._drainer is None:
            self._drainer = threading.Thread(target=self._drain, name="moe-drain", daemon=True)
            self._drainer.start()

    async def wait_drained(self) -> None:
        """Return once the drain begin_drain() started is over (every request finished or failed)."""
        await self.begin_drain()
        assert self._drainer is not None
        await asyncio.to_thread(self._drainer.join)

    async def close(self) -> None:
        """After the drain: shut the engine down now, while the expert pool is still there to detach from.
        ``moe-cluster serve`` calls this before deleting the app, so the pool stops with no coordinator left."""
        await self.wait_drained()
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sampler is not None:
            self._sampler.cancel()
        self.engine.shutdown()  # a coordinator detaches from the pool; the pool and its workers stay

    def _drain(self) -> None:
        drained = self.engine.drain(self.settings.drain_timeout_s)
        log.info("%s drained (%s)", self.engine_id,
                 "all requests finished" if drained else "requests still running were failed at the deadline")

    def __del__(self) -> None:
        """Serve's graceful shutdown, once no request is ongoing here: close the engine (after the drain, when
        one was started; else a drain ends what is left, such as requests being aborted)."""
        with contextlib.suppress(Exception):
            if self._drainer is None:
                self._drain()
            else:
                self._drainer.join(timeout=self.settings.drain_timeout_s + 1)
        with contextlib.suppress(Exception):
            self._close()


def engine_deployment_options(settings: AppSettings) -> dict[str, Any]:
    """Serve options of the engine replicas: each one CPU (the local engine) or a coordinator's resources."""
    options: dict[str, Any] = {
        "max_ongoing_requests": settings.max_ongoing_requests,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": settings.engine_grace_s,
        "graceful_shutdown_wait_loop_s": SHUTDOWN_WAIT_LOOP_S,
    }
    if settings.engine_autoscaling:
        options["autoscaling_config"] = settings.engine_autoscaling
    else:
        options["num_replicas"] = settings.num_engines
    if settings.engine_routing == "prefix_affinity":
        router_config: Any = RequestRouterConfig  # a pydantic model (its str-or-class field confuses mypy)
        options["request_router_config"] = router_config(request_router_class=ROUTER_CLASS,
                                                         request_router_kwargs=settings.engine_routing_options)
    if settings.engine == "local":
        options["ray_actor_options"] = {"num_cpus": 1}
        return options
    cluster_cfg = settings.cluster_config()
    gpus = use_gpus(cluster_cfg.use_gpus) if ray.is_initialized() else bool(cluster_cfg.use_gpus)
    options["ray_actor_options"] = {"num_cpus": cluster_cfg.coordinator_num_cpus,
                                    "num_gpus": cluster_cfg.coordinator_num_gpus if gpus else 0,
                                    "resources": dict(cluster_cfg.coordinator_resources),
                                    "runtime_env": omp_runtime_env(cluster_cfg.coordinator_omp_wait_policy)}
    return options


def build_engine_deployment(settings: AppSettings) -> Any:
    return serve.deployment(EngineDeployment, name=DEPLOYMENT_NAME, **engine_deployment_options(settings))
