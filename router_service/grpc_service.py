"""The gRPC API on the ingress deployment: moe_cluster.v1.GenerationService and the standard
grpc.health.v1.Health/Check. Serve's gRPC proxy calls these methods by name; they share the HTTP path's
engine handle, so both protocols reach the same engine replicas."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2
from ray.serve.grpc_util import RayServegRPCContext

from cluster.sampling import SamplingParams
from protos.moe_cluster.v1 import generation_pb2 as pb
from router_service.engine_api import ChoiceDelta, GenerateChunk, GenerateRequest, TokenInfo, merge
from router_service.openai_protocol import ApiError, new_id

log = logging.getLogger("moe_cluster.grpc")
SERVICE = "moe_cluster.v1.GenerationService"
STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
          429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
          504: grpc.StatusCode.DEADLINE_EXCEEDED}
# SamplingParams' field names as the proto spells them, for error messages that name the bad field.
PROTO_FIELDS = {"max_tokens": "stopping.max_new_tokens", "temperature": "sampling.temperature",
                "top_p": "sampling.top_p", "top_k": "sampling.top_k", "seed": "sampling.seed",
                "stop": "stopping.stop_sequences", "stop_token_ids": "stopping.stop_token_ids",
                "logprobs": "logprobs"}


def fail(context: RayServegRPCContext, err: ApiError) -> NoReturn:
    """Set the call's status from an API error and end the call."""
    context.set_code(STATUS.get(err.status, grpc.StatusCode.INTERNAL))
    context.set_details(err.message)
    raise err


def stop_fields(choice: ChoiceDelta) -> dict[str, Any]:
    reason = {"length": pb.MAX_TOKENS, "abort": pb.CANCELLED}.get(choice.finish_reason or "",
                                                                  pb.STOP_REASON_UNSPECIFIED)
    fields: dict[str, Any] = {"stop_reason": reason}
    if choice.finish_reason == "stop":
        if choice.stop_reason is None:
            fields["stop_reason"] = pb.EOS_TOKEN
        else:
            fields["stop_reason"] = pb.STOP_SEQUENCE
            if isinstance(choice.stop_reason, str):
                fields["stop_sequence"] = choice.stop_reason
            else:
                fields["stop_token_id"] = choice.stop_reason
    return fields


def logprobs_pb(tokens: list[TokenInfo] | None) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=t.token_id, token=t.text, logprob=t.logprob,
                            top=[pb.TopLogprob(token_id=i, token=s, logprob=v) for i, s, v in t.top])
            for t in tokens or []]


def usage_pb(chunk: GenerateChunk) -> pb.Usage:
    return pb.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                    total_tokens=chunk.prompt_tokens + chunk.completion_tokens)


def sampling_params(request: pb.GenerateRequest) -> SamplingParams:
    s, t = request.sampling, request.stopping
    try:
        return SamplingParams(
            max_tokens=t.max_new_tokens if t.HasField("max_new_tokens") else 16,
            temperature=s.temperature if s.HasField("temperature") else 1.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k if s.HasField("top_k") and s.top_k > 0 else -1,
            seed=s.seed if s.HasField("seed") else None,
            stop=tuple(t.stop_sequences), stop_token_ids=tuple(t.stop_token_ids), ignore_eos=t.ignore_eos,
            logprobs=request.logprobs if request.HasField("logprobs") else None)
    except (ValueError, TypeError) as err:
        message = str(err)
        field = message.split(" ", 1)[0]
        if field in PROTO_FIELDS:
            message = re.sub(rf"^{field}\b", PROTO_FIELDS[field], message)
        raise ApiError(400, message, param=PROTO_FIELDS.get(field)) from None


class GrpcMethods:
    """Mixed into the Ingress deployment, which provides what is declared here."""

    engine: Any  # DeploymentHandle of the engine deployment
    model_name: str

    def check_model(self, model: str) -> None:
        raise NotImplementedError

    def deadline(self, timeout: float | None) -> float:
        raise NotImplementedError

    def authorize_grpc(self, context: Any) -> None:
        raise NotImplementedError

    async def model_info(self) -> dict[str, Any]:
        raise NotImplementedError

    async def open_all(self, requests: list[GenerateRequest]) -> list[Any]:
        raise NotImplementedError

    def iterate(self, streams: list[Any]) -> AsyncIterator[tuple[int, GenerateChunk]]:
        raise NotImplementedError

    def grpc_request(self, request: pb.GenerateRequest) -> GenerateRequest:
        if request.model:  # empty: the one model this server serves
            self.check_model(request.model)
        params = sampling_params(request)
        which = request.WhichOneof("input")
        if which is None:
            raise ApiError(400, "prompt or prompt_token_ids is required", param="prompt")
        prompt: str | list[int] = request.prompt if which == "prompt" else list(request.prompt_token_ids.ids)
        if not prompt:
            raise ApiError(400, f"{which} must not be empty", param=which)
        rid = request.request_id or new_id("grpc")
        return GenerateRequest(rid, params, prompt=prompt, deadline=self.deadline(None))

    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        try:
            self.authorize_grpc(grpc_context)
            streams = await self.open_all([self.grpc_request(request)])
            merged = merge([chunk async for _, chunk in self.iterate(streams)])
        except ApiError as err:
            fail(grpc_context, err)
        choice = merged.choices[0]
        return pb.GenerateResponse(request_id=merged.request_id, model=self.model_name, text=choice.text,
                                   token_ids=choice.token_ids, usage=usage_pb(merged),
                                   logprobs=logprobs_pb(choice.logprobs), **stop_fields(choice))

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: RayServegRPCContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            self.authorize_grpc(grpc_context)
            gen_request = self.grpc_request(request)
            streams = await self.open_all([gen_request])
            async for _, chunk in self.iterate(streams):
                for choice in chunk.choices:
                    message = pb.GenerateStreamResponse(request_id=gen_request.request_id, text=choice.text,
                                                        token_ids=choice.token_ids,
                                                        logprobs=logprobs_pb(choice.logprobs))
                    if chunk.finished:
                        message.MergeFrom(pb.GenerateStreamResponse(usage=usage_pb(chunk), **stop_fields(choice)))
                    yield message
        except ApiError as err:
            fail(grpc_context, err)

    async def Tokenize(self, request: pb.TokenizeRequest,
                       grpc_context: RayServegRPCContext) -> pb.TokenizeResponse:
        try:
            self.authorize_grpc(grpc_context)
            if request.model:  # empty: the one model this server serves
                self.check_model(request.model)
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids, texts = await self.engine.tokenize_with_text.remote(request.text, add_special)
        except ApiError as err:
            fail(grpc_context, err)
        except Exception as err:
            from router_service.ingress import engine_error

            fail(grpc_context, engine_error(err))
        return pb.TokenizeResponse(token_ids=ids, tokens=texts)

    async def ModelInfo(self, request: pb.ModelInfoRequest,
                        grpc_context: RayServegRPCContext) -> pb.ModelInfoResponse:
        try:
            self.authorize_grpc(grpc_context)
            info = await self.model_info()
        except ApiError as err:
            fail(grpc_context, err)
        return pb.ModelInfoResponse(model=self.model_name, max_model_len=info["max_model_len"],
                                    vocab_size=info["vocab_size"], num_layers=info["num_layers"],
                                    num_experts=info["num_experts"], experts_per_token=info["experts_per_token"],
                                    hidden_size=info["hidden_size"], engine=info["engine"])

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1: SERVING when an engine answers and is alive, for "" and our service."""
        if request.service not in ("", SERVICE):
            fail(grpc_context, ApiError(404, f"unknown service {request.service!r}"))
        try:
            alive = bool((await self.engine.health.remote()).get("alive"))
        except Exception:
            alive = False
        status = health_pb2.HealthCheckResponse.SERVING if alive else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)
