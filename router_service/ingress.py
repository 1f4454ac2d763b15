"""The ingress deployment: the OpenAI-compatible HTTP API (FastAPI) and, in grpc_service.py, the gRPC API.
It validates and translates requests, then streams from the engine replicas through a DeploymentHandle
(Serve routes each call to the less loaded of two replicas). No generation happens here."""

# No "from __future__ import annotations": FastAPI must see the request models, not strings, on Serve's
# class-based routes.
import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.errors import EngineDeadError, QueueFullError, RequestFailedError
from router_service.engine_api import Accepted, GenerateChunk, GenerateRequest, merge
from router_service.grpc_service import GrpcMethods
from router_service.openai_protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_choice,
    created,
    new_id,
    stream_event,
    usage,
)
from router_service.settings import AppSettings

log = logging.getLogger("moe_cluster.ingress")
app = FastAPI(title="moe-cluster", description="OpenAI-compatible API of an expert-parallel MoE cluster",
              version="1.0")
RETRY_AFTER_S = "5"
SHUTTING_DOWN = "the server is shutting down"  # how the engine words requests failed at the drain deadline


def field_path(loc: Any) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; pydantic's union-member tags are dropped."""
    path = ""
    for part in loc:
        if part == "body" or (isinstance(part, str) and (part in TYPE_TAGS or "[" in part)):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path


TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "union", "tagged-union"}


def bearer_ok(header: str | None, api_key: str) -> bool:
    if not header or not header.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), api_key.encode())


def engine_error(err: BaseException) -> ApiError:
    """Map what the engine raised (through Ray and Serve) to an HTTP error."""
    cause: BaseException = err
    while isinstance(cause, RayTaskError) and isinstance(cause.cause, BaseException) and cause.cause is not cause:
        cause = cause.cause
    name = type(cause).__name__
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else name
    if isinstance(cause, (ValueError, TypeError)):
        return ApiError(400, message, param=getattr(cause, "param", None))  # RequestError names its field
    if isinstance(cause, QueueFullError) or name == "BackPressureError":
        return ApiError(429, message or "the server is busy; retry later", "rate_limit_error", code="queue_full",
                        headers={"Retry-After": "1"})
    if isinstance(cause, TimeoutError):
        return ApiError(504, message, "timeout_error", code="deadline_exceeded")
    if isinstance(cause, RequestFailedError) and message.startswith(SHUTTING_DOWN):
        return ApiError(503, message, "service_unavailable", code="server_shutting_down",
                        headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(cause, (EngineDeadError, RequestFailedError, RayActorError)) or "ActorDied" in name \
            or "Unavailable" in name:
        return ApiError(503, f"the engine is unavailable, retry: {message}", "service_unavailable",
                        code="engine_unavailable", headers={"Retry-After": RETRY_AFTER_S})
    return ApiError(500, f"internal error: {name}: {message}", "server_error")


@app.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = err.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return JSONResponse(ApiError(400, f"malformed JSON body: {problems[0].get('msg')}").body(), status_code=400)
    first = problems[0] if problems else {}
    param = field_path(first.get("loc", ())) or None
    message = f"{param or 'body'}: {first.get('msg', 'invalid')}"
    if "input" in first and first.get("type") != "missing":
        message += f" (got {json.dumps(first['input'], default=str)[:200]})"
    return JSONResponse(ApiError(400, message, param=param).body(), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Routing errors (unknown path, wrong method) as OpenAI errors naming what was asked for."""
    path = request.url.path
    if err.status_code == 404:
        error = ApiError(404, f"no such endpoint: {request.method} {path}", code="not_found")
    elif err.status_code == 405:
        allowed = err.headers.get("Allow", "") if err.headers else ""
        error = ApiError(405, f"method {request.method} is not allowed on {path}"
                         + (f" (allowed: {allowed})" if allowed else ""), code="method_not_allowed")
    else:
        error = ApiError(err.status_code, str(err.detail))
    return JSONResponse(error.body(), status_code=error.status, headers=dict(err.headers or {}))


OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/redoc")


class HttpGuard:
    """What the HTTP middleware enforces, set by the replica's constructor. Serve pickles the FastAPI app and
    the deployment class by value, so ``app.state`` written in the constructor is not the served app's; this
    class is pickled by reference, so both sides of a replica see the same one."""

    api_key: str | None = None
    max_request_bytes: int | None = None


@app.middleware("http")
async def _guard(request: Request, call_next: Any) -> Response:
    """API key (when configured) and request size, before any work is done."""
    api_key = HttpGuard.api_key
    path = request.url.path.removeprefix(request.scope.get("root_path", ""))
    if api_key and path not in OPEN_PATHS and not bearer_ok(request.headers.get("authorization"), api_key):
        err = ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return JSONResponse(err.body(), status_code=401, headers=err.headers)
    limit = HttpGuard.max_request_bytes
    length = request.headers.get("content-length")
    if limit is not None and length is not None and length.isdigit() and int(length) > limit:
        return JSONResponse(ApiError(413, f"request body of {length} bytes exceeds the limit of {limit}").body(),
                            status_code=413)
    response: Response = await call_next(request)
    return response


@serve.deployment(name="Ingress", max_ongoing_requests=1024)
@serve.ingress(app)
class Ingress(GrpcMethods):
    def __init__(self, engine: DeploymentHandle, settings: AppSettings) -> None:
        self.settings = settings
        self.model_name = settings.model_name
        self.engine = engine
        self.engine_stream = engine.options(stream=True)
        self._model_info: dict[str, Any] | None = None
        self.api_key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        if settings.api_key_env and not self.api_key:
            raise ValueError(f"api_key_env names {settings.api_key_env!r} but that environment variable is empty")
        HttpGuard.api_key = self.api_key
        HttpGuard.max_request_bytes = settings.max_request_bytes

    # ------------------------------------------------------------------------------------ plumbing

    def authorize_grpc(self, context: Any) -> None:
        """gRPC metadata 'authorization: Bearer <key>' (or 'x-api-key: <key>'), when a key is configured."""
        if not self.api_key:
            return
        metadata = dict(context.invocation_metadata())
        key = metadata.get("x-api-key")
        if (key is not None and hmac.compare_digest(key.encode(), self.api_key.encode())) or bearer_ok(
                metadata.get("authorization"), self.api_key):
            return
        raise ApiError(401, "missing or invalid API key (metadata 'authorization: Bearer <key>')",
                       "authentication_error", code="invalid_api_key")

    async def model_info(self) -> dict[str, Any]:
        if self._model_info is None:
            try:
                self._model_info = await self.engine.model_info.remote()
            except Exception as err:
                raise engine_error(err) from None
        return self._model_info

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def deadline(self, timeout: float | None) -> float:
        return time.time() + (timeout if timeout is not None else self.settings.request_timeout_s)

    async def open_stream(self, request: GenerateRequest) -> tuple[Accepted, Any]:
        """Start a generation; errors before the engine accepted it are raised as ApiError."""
        stream: Any = self.engine_stream.generate.remote(request)
        try:
            accepted = await stream.__anext__()
        except Exception as err:
            stream.cancel()
            raise engine_error(err) from None
        return accepted, stream

    async def open_all(self, requests: list[GenerateRequest]) -> list[Any]:
        """Start every generation, or none: the first request error is raised (before any response is sent)."""
        opened = await asyncio.gather(*(self.open_stream(r) for r in requests), return_exceptions=True)
        streams = [o[1] for o in opened if not isinstance(o, BaseException)]
        failure = next((o for o in opened if isinstance(o, BaseException)), None)
        if failure is not None:
            for s in streams:
                s.cancel()
            raise failure
        return streams

    async def iterate(self, streams: list[Any]) -> AsyncIterator[tuple[int, GenerateChunk]]:
        """Chunks of several open generations as they come, tagged with the generation's position."""
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(i: int, stream: Any) -> None:
            try:
                async for batch in stream:
                    for chunk in batch:
                        await queue.put((i, chunk))
                await queue.put((i, None))
            except BaseException as err:
                await queue.put((i, err))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise engine_error(item)
                else:
                    yield i, item
        finally:  # the client left (or an error): stop every generation still running
            for task in tasks:
                task.cancel()
            for s in streams:
                with contextlib.suppress(Exception):
                    s.cancel()

    # -------------------------------------------------------------------------------------- routes

    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            state = await self.engine.health.remote()
        except Exception as err:
            return JSONResponse(engine_error(err).body() | {"status": "unavailable"}, status_code=503,
                                headers={"Retry-After": RETRY_AFTER_S})
        if not state.get("alive"):
            return JSONResponse({"status": "unavailable", "reason": state.get("reason")}, status_code=503,
                                headers={"Retry-After": RETRY_AFTER_S})
        return JSONResponse({"status": "ok", "model": self.model_name})

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        info = await self.model_info()
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": info["created"],
                                            "owned_by": "moe-cluster", "max_model_len": info["max_model_len"]}]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Any:
        self.check_model(body.model)
        params = body.to_params()
        prompts = body.prompts()
        rid = new_id("cmpl")
        deadline = self.deadline(body.timeout)
        requests = [GenerateRequest(f"{rid}-{i}", params, prompt=p, deadline=deadline) for i, p in enumerate(prompts)]
        n = params.n
        with_logprobs = params.logprobs is not None
        streams = await self.open_all(requests)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self.sse(self.completion_events(rid, requests, streams, n, with_logprobs, include_usage))
        per_prompt: dict[int, list[GenerateChunk]] = {}
        async for i, chunk in self.iterate(streams):
            per_prompt.setdefault(i, []).append(chunk)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i in range(len(requests)):
            merged = merge(per_prompt[i])
            prompt_tokens += merged.prompt_tokens
            completion_tokens += merged.completion_tokens
            echo_text = merged.prompt_text if params.echo else None
            for pos, choice in enumerate(merged.choices):
                choices.append(completion_choice(i * n + choice.index, merged, pos, echo_text, with_logprobs))
        return {"id": rid, "object": "text_completion", "created": created(), "model": self.model_name,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    async def completion_events(self, rid: str, requests: list[GenerateRequest], streams: list[Any], n: int,
                                with_logprobs: bool, include_usage: bool) -> AsyncIterator[str]:
        stamp, tokens = created(), {}
        text_offsets: dict[int, int] = {}  # output index -> characters of text sent so far
        async for i, chunk in self.iterate(streams):
            tokens[i] = (chunk.prompt_tokens, chunk.completion_tokens)
            echo = requests[i].params.echo and chunk.prompt_text is not None  # only the first chunk has it
            for pos, choice in enumerate(chunk.choices):
                if not choice.text and not choice.token_ids and choice.finish_reason is None:
                    continue
                index = i * n + choice.index
                data = completion_choice(index, chunk, pos, chunk.prompt_text if echo else None, with_logprobs,
                                         text_offsets.get(index, 0))
                if data["logprobs"] and data["logprobs"]["tokens"]:  # offsets count token texts, as unstreamed
                    text_offsets[index] = data["logprobs"]["text_offset"][-1] + len(data["logprobs"]["tokens"][-1])
                yield stream_event({"id": rid, "object": "text_completion", "created": stamp,
                                    "model": self.model_name, "choices": [data]})
        if include_usage:
            yield stream_event({"id": rid, "object": "text_completion", "created": stamp, "model": self.model_name,
                                "choices": [], "usage": usage(sum(p for p, _ in tokens.values()),
                                                              sum(c for _, c in tokens.values()))})
        yield stream_event("[DONE]")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        self.check_model(body.model)
        params = body.to_params()
        rid = new_id("chatcmpl")
        request = GenerateRequest(rid, params, messages=body.to_messages(), deadline=self.deadline(body.timeout))
        try:
            streams = await self.open_all([request])
        except ApiError as err:
            if err.param == "prompt":  # a chat request's prompt is its rendered messages
                err.param = "messages"
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self.sse(self.chat_events(rid, request, streams, include_usage))
        chunks = [chunk async for _, chunk in self.iterate(streams)]
        merged = merge(chunks)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c.logprobs or []) if params.logprobs is not None else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in merged.choices]
        return {"id": rid, "object": "chat.completion", "created": created(), "model": self.model_name,
                "choices": choices, "usage": usage(merged.prompt_tokens, merged.completion_tokens)}

    async def chat_events(self, rid: str, request: GenerateRequest, streams: list[Any],
                          include_usage: bool) -> AsyncIterator[str]:
        stamp, started, last = created(), set(), None
        base = {"id": rid, "object": "chat.completion.chunk", "created": stamp, "model": self.model_name}
        with_logprobs = request.params.logprobs is not None
        async for _, chunk in self.iterate(streams):
            last = chunk
            for choice in chunk.choices:
                delta: dict[str, Any] = {"content": choice.text}
                if choice.index not in started:
                    started.add(choice.index)
                    delta = {"role": "assistant"} | delta
                elif not choice.text and not choice.token_ids and choice.finish_reason is None:
                    continue  # nothing new (a token without text still carries its logprobs)
                data = {"index": choice.index, "delta": delta, "finish_reason": choice.finish_reason,
                        "stop_reason": choice.stop_reason,
                        "logprobs": chat_logprobs(choice.logprobs or []) if with_logprobs else None}
                yield stream_event(base | {"choices": [data]})
        if include_usage and last is not None:
            yield stream_event(base | {"choices": [], "usage": usage(last.prompt_tokens, last.completion_tokens)})
        yield stream_event("[DONE]")

    @app.post("/tokenize")
    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", param="prompt")
        self.check_model(str(body.get("model", self.model_name)))
        tokens = await self.engine.tokenize.remote(prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": (await self.model_info())["max_model_len"]}

    @staticmethod
    def sse(events: AsyncIterator[str]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            except ApiError as err:  # after the 200 header is out, errors travel inside the stream
                yield stream_event(err.body())
                yield stream_event("[DONE]")

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
