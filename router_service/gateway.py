"""EngineGateway: what the HTTP and gRPC adapters share to reach the engine replicas through one DeploymentHandle
(Serve routes each call to the less loaded of two replicas) - the API key, the model check, deadlines, opening
generations (all or none), their chunks as they come, model info, health and tokenization. Engine failures come
out as ApiError. No protocol here: the adapters translate to and from HTTP or protobuf.

A generation whose engine replica dies is resumed on another replica (resume.py): the adapters see one
uninterrupted stream of chunks. At most ``max_resumes`` times per request and within its deadline; then, or when
no replica answers within RESUME_PROBE_S, the request ends with the retryable 503 / UNAVAILABLE of before."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from ray.serve.handle import DeploymentHandle

from cluster.engine.sequence import RequestOutput
from cluster.errors import first_line
from router_service.engine_api import GenerateRequest
from router_service.errors import SHUTTING_DOWN, ApiError, engine_error, engine_unavailable, replica_died, shutting_down
from router_service.metrics import IngressMetrics
from router_service.resume import Progress, resumed, with_seed
from router_service.settings import AppSettings
from router_service.vllm_metrics import render

log = logging.getLogger("moe_cluster.serve")
Stream = Any  # a DeploymentResponseGenerator of EngineDeployment.generate: Accepted, then lists of chunks
# Before resuming, some engine replica must answer within this. Shorter than the ingress's margin over the engine
# replicas' grace period (settings.INGRESS_MARGIN_S), so that when Serve deletes the app with requests running
# (no replica left to resume on) each still gets its 503 before the ingress stops.
RESUME_PROBE_S = 2.0


def read_api_key(env: str | None) -> str | None:
    """The API key in the environment variable ``env`` (None: no key required); an empty variable is an error."""
    if not env:
        return None
    key = os.environ.get(env)
    if not key:
        raise ValueError(f"api_key_env names {env!r} but that environment variable is empty")
    return key


def new_id(prefix: str) -> str:
    """A request id: ``prefix`` and 24 random hex digits."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class Generation:
    """A generation in flight: its request, the stream it comes from now and the engine replica behind it, what
    the client has been given, and how often it was resumed."""

    request: GenerateRequest
    stream: Stream = None
    replica: str = ""
    resumes: int = 0
    progress: Progress = field(init=False)

    def __post_init__(self) -> None:
        self.progress = Progress.of(self.request)


class EngineGateway:
    def __init__(self, engine: DeploymentHandle, settings: AppSettings) -> None:
        self.engine = engine
        self.engine_stream = engine.options(stream=True)
        self.model_name = settings.model_name
        self.request_timeout_s = settings.request_timeout_s
        self.max_resumes = settings.max_resumes
        self.api_key = read_api_key(settings.api_key_env)
        self.metrics = IngressMetrics(settings.model_name)
        self._model_info: dict[str, Any] | None = None
        self.draining = False  # set by begin_drain(): the server is shutting down, new generations are refused

    def begin_drain(self) -> None:
        """Shutdown started: from now on a new generation is answered with the retryable 503 / UNAVAILABLE
        ``server_shutting_down`` at once; those already running go on (the engines' drain deadline bounds them)."""
        self.draining = True

    def check_open(self) -> None:
        if self.draining:
            raise shutting_down(f"{SHUTTING_DOWN} and takes no new requests; retry on another server or later")

    def authorized(self, authorization: str | None, api_key: str | None = None) -> bool:
        """Whether a caller may go on: no key is configured, or it sends the key, as ``authorization``
        ('Bearer <key>') or as ``api_key`` (the bare key)."""
        if not self.api_key:
            return True
        expected = self.api_key.encode()
        if api_key is not None and hmac.compare_digest(api_key.encode(), expected):
            return True
        if not authorization or not authorization.lower().startswith("bearer "):
            return False
        return hmac.compare_digest(authorization[7:].strip().encode(), expected)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def deadline(self, timeout: float | None) -> float:
        """Wall-clock deadline of a request: ``timeout`` seconds from now, or the server's default."""
        return time.time() + (timeout if timeout is not None else self.request_timeout_s)

    async def open(self, request: GenerateRequest) -> Generation:
        """Start a generation; errors before the engine accepted it are raised as ApiError."""
        generation = Generation(request)
        await self._attach(generation, None)
        return generation

    async def _attach(self, generation: Generation, died: BaseException | None) -> None:
        """Put ``generation`` on an engine replica: its request, or after ``died`` (the death of the replica that
        served it) what is left of it; a replica that dies before accepting is resumed from in turn."""
        while True:
            request = generation.request if died is None else await self._plan_resume(generation, died)
            stream: Stream = self.engine_stream.generate.remote(request)
            try:
                accepted = await stream.__anext__()
            except Exception as err:
                stream.cancel()
                if not replica_died(err):
                    raise engine_error(err) from None
                died = err
                continue
            if generation.resumes:
                self.metrics.resumed.inc(1, self.metrics.tags)
                log.warning("request %s resumed on engine replica %s after %s died (%s); the client had %d tokens "
                            "(resume %d of at most %d)", request.request_id, accepted.engine_id,
                            generation.replica or "its replica", first_line(died) if died else "",
                            generation.progress.num_tokens, generation.resumes, self.max_resumes)
            generation.stream, generation.replica = stream, accepted.engine_id
            generation.request = with_seed(generation.request, accepted.seed)  # to resume with the same draws
            return

    async def _plan_resume(self, generation: Generation, died: BaseException) -> GenerateRequest:
        """The request that resumes ``generation`` after its replica ``died``, once another replica answers; the
        503 instead when the request is out of resumes or time, or no replica answers."""
        rid = generation.request.request_id
        if generation.resumes >= self.max_resumes:
            raise engine_unavailable(f"the engine replica serving request {rid} died ({first_line(died)}), "
                                     f"{generation.resumes} resume(s) were allowed (max_resumes) and are used up")
        remaining = generation.request.remaining()
        if remaining is not None and remaining <= 0:
            raise engine_unavailable(f"the engine replica serving request {rid} died ({first_line(died)}) and "
                                     "the request's deadline has passed")
        try:  # is any replica there? (none while Serve deletes the app: do not wait for one until the deadline)
            await asyncio.wait_for(self.engine.health.remote(), min(RESUME_PROBE_S, remaining or RESUME_PROBE_S))
        except Exception as err:
            raise engine_unavailable(f"the engine replica serving request {rid} died ({first_line(died)}) and no "
                                     f"other replica answered within {RESUME_PROBE_S:g} s "
                                     f"({type(err).__name__})") from None
        generation.resumes += 1
        return resumed(generation.request, generation.progress)

    async def open_all(self, requests: list[GenerateRequest]) -> list[Generation]:
        """Start every generation, or none: the first request error is raised (before any response is sent)."""
        self.check_open()
        opened = await asyncio.gather(*(self.open(r) for r in requests), return_exceptions=True)
        generations = [o for o in opened if isinstance(o, Generation)]
        failure = next((o for o in opened if isinstance(o, BaseException)), None)
        if failure is not None:
            for g in generations:
                g.stream.cancel()
            raise failure
        return generations

    async def _chunks(self, generation: Generation) -> AsyncGenerator[RequestOutput, None]:
        """The chunks of one generation, each recorded in its progress before it is handed on; when its replica
        dies, the rest of them from another replica."""
        while True:
            try:
                async for batch in generation.stream:
                    for chunk in batch:
                        generation.progress.record(chunk)
                        yield chunk
                return
            except Exception as err:
                if generation.progress.done:  # the replica died after its last chunk: nothing is missing
                    return
                if not replica_died(err):
                    raise
                with contextlib.suppress(Exception):
                    generation.stream.cancel()
                await self._attach(generation, err)

    async def iterate(self, generations: list[Generation]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """Chunks of several open generations as they come, tagged with the generation's position. An error, or
        closing this generator early (a caller that may stop before the end closes it with contextlib.aclosing,
        so as not to wait for garbage collection), stops every generation still running."""
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(i: int, generation: Generation) -> None:
            try:
                async with contextlib.aclosing(self._chunks(generation)) as chunks:
                    async for chunk in chunks:
                        await queue.put((i, chunk))
                await queue.put((i, None))
            except BaseException as err:
                await queue.put((i, err))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item if isinstance(item, ApiError) else engine_error(item)
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            for g in generations:
                with contextlib.suppress(Exception):
                    g.stream.cancel()

    async def model_info(self) -> dict[str, Any]:
        """The engine's description of the model (asked once, then cached)."""
        if self._model_info is None:
            self._model_info = await self._ask("model_info")
        return self._model_info

    async def health(self) -> dict[str, Any]:
        """An engine replica's health: {"alive": bool, "reason": ...}; an engine that does not answer raises."""
        state: dict[str, Any] = await self._ask("health")
        return state

    async def tokenize(self, text: str) -> list[int]:
        ids: list[int] = await self._ask("tokenize", text)
        return ids

    async def tokenize_with_text(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[str]]:
        """Token ids and each token's text."""
        ids, texts = await self._ask("tokenize_with_text", text, add_special_tokens)
        return ids, texts

    async def ask(self, method: str, *args: Any) -> Any:
        """One call of the engine deployment's ``method`` (tokenize_chat, detokenize, ...), errors as ApiError."""
        return await self._ask(method, *args)
    async def vllm_metrics(self) -> str:
        """The vLLM series of every engine replica (each answers with a snapshot), rendered for /metrics."""
        try:
            response = self.engine.broadcast("vllm_metrics")
            snapshots = await asyncio.to_thread(response.results, timeout_s=10)
        except Exception as err:
            raise engine_error(err) from None
        return render(snapshots)

    async def _ask(self, method: str, *args: Any) -> Any:
        """One call of the engine deployment's ``method``; a failure is raised as ApiError."""
        try:
            return await getattr(self.engine, method).remote(*args)
        except Exception as err:
            raise engine_error(err) from None
