"""The ingress deployment: the OpenAI-compatible HTTP API (FastAPI routes, JSON and SSE rendering) and the gRPC
API's entry points, both on one EngineGateway to the engine replicas. No generation happens here."""

# No "from __future__ import annotations": FastAPI must see the request models, not strings, on Serve's
# class-based routes.
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2
from pydantic import ValidationError
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.engine.sequence import RequestOutput, merge_outputs
from protos.moe_cluster.v1 import generation_pb2 as pb
from router_service import tool_calls
from router_service.engine_api import GenerateRequest
from router_service.errors import RETRY_AFTER_S, ApiError
from router_service.gateway import EngineGateway, Generation, new_id
from router_service.grpc_service import GrpcApi
from router_service.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_choice,
    created,
    stream_event,
    usage,
)
from router_service.pool_admin import scale_expert_pool
from router_service.settings import AppSettings

app = FastAPI(title="moe-cluster", description="OpenAI-compatible API of an expert-parallel MoE cluster",
              version="1.0")


def field_path(loc: Any) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; pydantic's union-member tags are dropped."""
    path = ""
    for part in loc:
        if part == "body" or (isinstance(part, str) and (part in TYPE_TAGS or "[" in part)):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path


TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "union", "tagged-union"}


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


# Need no API key: as in vLLM, /metrics is open to Prometheus scrapers (it shows counts and latencies only).
OPEN_PATHS = ("/health", "/metrics", "/docs", "/openapi.json", "/redoc")


@dataclass(frozen=True)
class HttpGuard:
    """What one ingress replica refuses before any work is done: a request without the API key (when the gateway
    has one) on any path but OPEN_PATHS, unknown paths included; a body above the size limit, by its
    Content-Length, before it is read."""

    gateway: EngineGateway
    max_request_bytes: int

    def refusal(self, request: Request) -> JSONResponse | None:
        path = request.url.path.removeprefix(request.scope.get("root_path", ""))
        if path not in OPEN_PATHS and not self.gateway.authorized(request.headers.get("authorization")):
            err = ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return JSONResponse(err.body(), status_code=401, headers=err.headers)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            err = ApiError(413, f"request body of {length} bytes exceeds the limit of {self.max_request_bytes}")
            return JSONResponse(err.body(), status_code=413)
        return None


@app.middleware("http")
async def _guard(request: Request, call_next: Any) -> Response:
    """The serving replica's HttpGuard. Serve serves a copy of ``app`` made when Ingress was decorated, so the app
    holds no per-replica state; the replica's Ingress instance does, found as Serve finds the ``self`` of the
    class-based routes below: the replica context's servable object."""
    ingress = cast("Ingress", serve.get_replica_context().servable_object)
    refusal = ingress.http_guard.refusal(request)
    if refusal is not None:
        return refusal
    response: Response = await call_next(request)
    return response


INGRESS_NAME = "Ingress"


@serve.deployment(name=INGRESS_NAME, max_ongoing_requests=1024)
@serve.ingress(app)
class Ingress:
    def __init__(self, engine: DeploymentHandle, settings: AppSettings) -> None:
        self.gateway = EngineGateway(engine, settings)
        self.http_guard = HttpGuard(self.gateway, settings.max_request_bytes)
        self.grpc_api = GrpcApi(self.gateway)
        self.engine_kind = settings.engine

    async def begin_drain(self) -> None:
        """``moe-cluster serve`` calls this on Ctrl-C, before the engines drain: new requests get the 503
        ``server_shutting_down`` here (not the proxy's plain 404 of a deleted app), running ones go on."""
        self.gateway.begin_drain()

    # -------------------------------------------------------------------------------------- routes

    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            self.gateway.check_open()
            state = await self.gateway.health()
        except ApiError as err:
            return JSONResponse(err.body() | {"status": "unavailable"}, status_code=503,
                                headers={"Retry-After": RETRY_AFTER_S})
        if not state.get("alive"):
            return JSONResponse({"status": "unavailable", "reason": state.get("reason")}, status_code=503,
                                headers={"Retry-After": RETRY_AFTER_S})
        return JSONResponse({"status": "ok", "model": self.gateway.model_name})

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """Every engine replica's series under vLLM's names (router_service/vllm_metrics.py), Prometheus text."""
        return Response(await self.gateway.vllm_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [await self.model_object()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict[str, Any]:
        """OpenAI's retrieve-model: the served model, or a 404 naming the id asked for."""
        self.gateway.check_model(model_id)
        return await self.model_object()

    async def model_object(self) -> dict[str, Any]:
        info = await self.gateway.model_info()
        return {"id": self.gateway.model_name, "object": "model", "created": info["created"],
                "owned_by": "moe-cluster", "max_model_len": info["max_model_len"]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Any:
        self.gateway.check_model(body.model)
        params = body.to_params()
        prompts = body.prompts()
        rid = new_id("cmpl")
        deadline = self.gateway.deadline(body.timeout)
        requests = [GenerateRequest(f"{rid}-{i}", params, prompt=p, deadline=deadline, stream=body.stream)
                    for i, p in enumerate(prompts)]
        n = params.n
        with_logprobs = params.logprobs is not None
        streams = await self.gateway.open_all(requests)
        if body.stream:
            return self.sse(self.completion_events(rid, requests, streams, n, with_logprobs, body.include_usage,
                                                   body.continuous_usage))
        per_prompt: dict[int, list[RequestOutput]] = {}
        async for i, chunk in self.gateway.iterate(streams):
            per_prompt.setdefault(i, []).append(chunk)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i in range(len(requests)):
            merged = merge_outputs(per_prompt[i])
            prompt_tokens += merged.num_prompt_tokens
            completion_tokens += merged.num_generated_tokens
            echo_text = merged.prompt_text if params.echo else None
            for pos, choice in enumerate(merged.outputs):
                choices.append(completion_choice(i * n + choice.index, merged, pos, echo_text, with_logprobs))
        return {"id": rid, "object": "text_completion", "created": created(), "model": self.gateway.model_name,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    async def completion_events(self, rid: str, requests: list[GenerateRequest], streams: list[Generation], n: int,
                                with_logprobs: bool, include_usage: bool,
                                continuous_usage: bool = False) -> AsyncGenerator[str, None]:
        """SSE events of a completion; with ``continuous_usage`` (vLLM's stream_options.continuous_usage_stats)
        each event also carries its prompt's usage so far."""
        tokens: dict[int, tuple[int, int]] = {}  # prompt position -> (prompt tokens, completion tokens)
        text_offsets: dict[int, int] = {}  # output index -> characters of text sent so far
        base = {"id": rid, "object": "text_completion", "created": created(), "model": self.gateway.model_name}
        async with contextlib.aclosing(self.gateway.iterate(streams)) as chunks:
            async for i, chunk in chunks:
                tokens[i] = (chunk.num_prompt_tokens, chunk.num_generated_tokens)
                echo = requests[i].params.echo and chunk.prompt_text is not None  # only the first chunk has it
                for pos, choice in enumerate(chunk.outputs):
                    if not choice.text and not choice.token_ids and choice.finish_reason is None:
                        continue
                    index = i * n + choice.index
                    data = completion_choice(index, chunk, pos, chunk.prompt_text if echo else None, with_logprobs,
                                             text_offsets.get(index, 0))
                    if data["logprobs"] and data["logprobs"]["tokens"]:  # offsets count token texts, as unstreamed
                        offsets, texts = data["logprobs"]["text_offset"], data["logprobs"]["tokens"]
                        text_offsets[index] = offsets[-1] + len(texts[-1])
                    event = base | {"choices": [data]}
                    if continuous_usage:
                        event["usage"] = usage(chunk.num_prompt_tokens, chunk.num_generated_tokens)
                    yield stream_event(event)
        if include_usage:
            yield stream_event(base | {"choices": [], "usage": usage(sum(p for p, _ in tokens.values()),
                                                                     sum(c for _, c in tokens.values()))})
        yield stream_event("[DONE]")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        self.gateway.check_model(body.model)
        params = body.to_params()
        rid = new_id("chatcmpl")
        deadline = self.gateway.deadline(body.timeout)
        request = GenerateRequest(rid, params, messages=body.to_messages(), chat_options=body.chat_options(),
                                  deadline=deadline, stream=body.stream)
        try:
            streams = await self.gateway.open_all([request])
        except ApiError as err:
            if err.param == "prompt":  # a chat request's prompt is its rendered messages
                err.param = "messages"
            raise
        if body.stream:
            return self.sse(self.chat_events(rid, request, streams, body.include_usage, body.continuous_usage,
                                             body.tool_plan()))
        chunks = [chunk async for _, chunk in self.gateway.iterate(streams)]
        merged = merge_outputs(chunks)
        plan = body.tool_plan()
        choices = []
        for c in merged.outputs:
            message, finish_reason = tool_calls.message(plan, c.text, c.finish_reason)
            choices.append({"index": c.index, "message": message,
                            "logprobs": chat_logprobs(c.logprobs or []) if params.logprobs is not None else None,
                            "finish_reason": finish_reason, "stop_reason": c.stop_reason})
        return {"id": rid, "object": "chat.completion", "created": created(), "model": self.gateway.model_name,
                "choices": choices, "usage": usage(merged.num_prompt_tokens, merged.num_generated_tokens)}

    async def chat_events(self, rid: str, request: GenerateRequest, streams: list[Generation],
                          include_usage: bool, continuous_usage: bool = False,
                          plan: tool_calls.ToolPlan | None = None) -> AsyncGenerator[str, None]:
        """SSE events of a chat completion; with ``continuous_usage`` each also carries the usage so far; with
        tools offered (``plan``), tool calls as tool_calls deltas."""
        stamp, started, last = created(), set(), None
        base = {"id": rid, "object": "chat.completion.chunk", "created": stamp, "model": self.gateway.model_name}
        with_logprobs = request.params.logprobs is not None
        tool_streams: dict[int, tool_calls.ToolStream] = {}
        async with contextlib.aclosing(self.gateway.iterate(streams)) as chunks:
            async for _, chunk in chunks:
                last = chunk
                for choice in chunk.outputs:
                    finish_reason = choice.finish_reason
                    deltas: list[dict[str, Any]] = [{"content": choice.text}]
                    if plan is not None and plan.offered:
                        tools = tool_streams.setdefault(choice.index, tool_calls.ToolStream(plan))
                        deltas, finish_reason = tools.feed(choice.text, choice.finish_reason)
                        if choice.index in started and not deltas and finish_reason is None:
                            continue  # held back: it may be the start of a tool call
                        deltas = deltas or [{}]
                    if choice.index not in started:
                        started.add(choice.index)
                        deltas[0] = {"role": "assistant"} | deltas[0]
                    elif not choice.text and not choice.token_ids and choice.finish_reason is None:
                        continue  # nothing new (a token without text still carries its logprobs)
                    for k, delta in enumerate(deltas):
                        last_delta = k == len(deltas) - 1
                        data = {"index": choice.index, "delta": delta,
                                "finish_reason": finish_reason if last_delta else None,
                                "stop_reason": choice.stop_reason if last_delta else None,
                                "logprobs": chat_logprobs(choice.logprobs or []) if with_logprobs and k == 0
                                else None}
                        event = base | {"choices": [data]}
                        if continuous_usage:
                            event["usage"] = usage(chunk.num_prompt_tokens, chunk.num_generated_tokens)
                        yield stream_event(event)
        if include_usage and last is not None:
            yield stream_event(base | {"choices": [],
                                       "usage": usage(last.num_prompt_tokens, last.num_generated_tokens)})
        yield stream_event("[DONE]")

    @app.post("/scale_expert_pool")
    async def scale_expert_pool(self, body: dict[str, Any]) -> dict[str, Any]:
        """Admin (behind the API key when one is set): grow or shrink the expert pool to num_workers workers."""
        return await scale_expert_pool(body, self.engine_kind)

    @app.post("/tokenize")
    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's /tokenize: a ``prompt`` (add_special_tokens, default true), or chat ``messages`` rendered as a
        chat completion renders them (add_generation_prompt, continue_final_message, chat_template_kwargs)."""
        self.gateway.check_model(str(body.get("model", self.gateway.model_name)))
        if "messages" in body:
            try:
                chat = ChatCompletionRequest.model_validate({"model": self.gateway.model_name} | body)
                chat.check_unsupported()
                tokens = await self.gateway.ask("tokenize_chat", chat.to_messages(), chat.chat_options())
            except ValidationError as err:
                first = err.errors()[0]
                param = field_path(first.get("loc", ()))
                raise ApiError(400, f"{param}: {first.get('msg')}", param=param or None) from None
        else:
            prompt, add_special = body.get("prompt"), body.get("add_special_tokens", True)
            if not isinstance(prompt, str):
                raise ApiError(400, "prompt (a string) or messages is required", param="prompt")
            if not isinstance(add_special, bool):
                raise ApiError(400, "add_special_tokens must be a boolean", param="add_special_tokens")
            tokens, _ = await self.gateway.tokenize_with_text(prompt, add_special)
        info = await self.gateway.model_info()
        return {"tokens": tokens, "count": len(tokens), "max_model_len": info["max_model_len"]}

    @app.post("/detokenize")
    async def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's /detokenize: token ids to text (special tokens kept)."""
        self.gateway.check_model(str(body.get("model", self.gateway.model_name)))
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ApiError(400, "tokens must be a list of token ids", param="tokens")
        return {"prompt": await self.gateway.ask("detokenize", tokens)}

    @app.get("/version")
    async def version(self) -> dict[str, str]:
        """The server's version (vLLM's /version): the installed distribution's, as ``moe-cluster --version``
        (not imported from the CLI, which imports the app)."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"version": version("moe-cluster")}
        except PackageNotFoundError:
            return {"version": "unknown (not installed)"}

    @staticmethod
    def sse(events: AsyncGenerator[str, None]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[str]:
            try:
                async with contextlib.aclosing(events):
                    async for event in events:
                        yield event
            except ApiError as err:  # after the 200 header is out, errors travel inside the stream
                yield stream_event(err.body())
                yield stream_event("[DONE]")

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------- gRPC (Serve's proxy calls these by name)

    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        return await self.grpc_api.generate(request, grpc_context)

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: RayServegRPCContext) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        async with contextlib.aclosing(self.grpc_api.generate_stream(request, grpc_context)) as messages:
            async for message in messages:
                yield message

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context: RayServegRPCContext) -> pb.TokenizeResponse:
        return await self.grpc_api.tokenize(request, grpc_context)

    async def ModelInfo(self, request: pb.ModelInfoRequest,
                        grpc_context: RayServegRPCContext) -> pb.ModelInfoResponse:
        return await self.grpc_api.model_info(request, grpc_context)

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext) -> health_pb2.HealthCheckResponse:
        return await self.grpc_api.check(request, grpc_context)
