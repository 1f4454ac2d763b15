"""The gRPC API: moe_cluster.v1.GenerationService and the standard grpc.health.v1.Health/Check, translated
between protobuf and the gateway that the HTTP API shares, so both protocols reach the same engine replicas.
Serve's gRPC proxy calls the ingress deployment's methods by name; each hands its call to GrpcApi."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncGenerator
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2
from ray.serve.grpc_util import RayServegRPCContext

from cluster.engine.sampling import SamplingParams, TokenLogprob
from cluster.engine.sequence import CompletionOutput, RequestOutput, merge_outputs
from cluster.engine.structured_output import StructuredOutput
from protos.moe_cluster.v1 import generation_pb2 as pb
from router_service.engine_api import GenerateRequest
from router_service.errors import ApiError
from router_service.gateway import EngineGateway, new_id

SERVICE = "moe_cluster.v1.GenerationService"
# SamplingParams' field names as the proto spells them, for error messages that name the bad field.
PROTO_FIELDS = {"max_tokens": "stopping.max_new_tokens", "temperature": "sampling.temperature",
                "top_p": "sampling.top_p", "top_k": "sampling.top_k", "seed": "sampling.seed",
                "stop": "stopping.stop_sequences", "stop_token_ids": "stopping.stop_token_ids",
                "logprobs": "logprobs", "min_p": "sampling.min_p", "repetition_penalty": "sampling.repetition_penalty",
                "presence_penalty": "sampling.presence_penalty", "frequency_penalty": "sampling.frequency_penalty",
                "logit_bias": "sampling.logit_bias", "bad_words": "sampling.bad_words",
                "min_tokens": "stopping.min_tokens"}


def fail(context: RayServegRPCContext, err: ApiError) -> NoReturn:
    """Set the call's status from an API error and end the call."""
    context.set_code(grpc.StatusCode[err.grpc_status])
    context.set_details(err.message)
    raise err


def stop_fields(choice: CompletionOutput) -> dict[str, Any]:
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


def logprobs_pb(tokens: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=t.token_id, token=t.text, logprob=t.logprob,
                            top=[pb.TopLogprob(token_id=i, token=s, logprob=v)
                                 for s, (i, v) in zip(t.top_texts, t.top, strict=True)])
            for t in tokens or []]


def usage_pb(chunk: RequestOutput) -> pb.Usage:
    return pb.Usage(prompt_tokens=chunk.num_prompt_tokens, completion_tokens=chunk.num_generated_tokens,
                    total_tokens=chunk.num_prompt_tokens + chunk.num_generated_tokens)


def structured_output(request: pb.GenerateRequest) -> StructuredOutput | None:
    """The request's structured_output as the engine's StructuredOutput (errors name the proto field)."""
    if not request.HasField("structured_output"):
        return None
    spec = request.structured_output
    kind = spec.WhichOneof("kind")
    param = f"structured_output.{kind}"
    try:
        if kind == "json_schema":
            return StructuredOutput.json_schema(spec.json_schema, param)
        if kind == "json_object":
            return StructuredOutput("json_object", "", param)
        if kind == "choice":
            return StructuredOutput.choice(list(spec.choice.options), param)
        if kind in ("regex", "grammar"):
            value = getattr(spec, kind)
            if not value:
                raise ValueError(f"{param} must not be empty")
            return StructuredOutput(kind, value, param)
    except ValueError as err:
        raise ApiError(400, str(err), param=param) from None
    raise ApiError(400, "structured_output needs one of json_schema, json_object, regex, choice, grammar",
                   param="structured_output")


def sampling_params(request: pb.GenerateRequest) -> SamplingParams:
    s, t = request.sampling, request.stopping
    structured = structured_output(request)
    try:
        return SamplingParams(
            max_tokens=t.max_new_tokens if t.HasField("max_new_tokens") else 16,
            temperature=s.temperature if s.HasField("temperature") else 1.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k if s.HasField("top_k") and s.top_k > 0 else -1,
            seed=s.seed if s.HasField("seed") else None,
            stop=tuple(t.stop_sequences), stop_token_ids=tuple(t.stop_token_ids), ignore_eos=t.ignore_eos,
            logprobs=request.logprobs if request.HasField("logprobs") else None,
            min_p=s.min_p if s.HasField("min_p") else 0.0,
            repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
            presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else 0.0,
            frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else 0.0,
            logit_bias=tuple((token, min(100.0, max(-100.0, bias))) for token, bias in sorted(s.logit_bias.items())),
            bad_words=tuple(s.bad_words), min_tokens=t.min_tokens if t.HasField("min_tokens") else 0,
            include_stop_str_in_output=t.include_stop_str_in_output,
            skip_special_tokens=request.skip_special_tokens if request.HasField("skip_special_tokens") else True,
            structured=structured)
    except (ValueError, TypeError) as err:
        message = str(err)
        field = message.split(" ", 1)[0]
        if field in PROTO_FIELDS:
            message = re.sub(rf"^{field}\b", PROTO_FIELDS[field], message)
        raise ApiError(400, message, param=PROTO_FIELDS.get(field)) from None


class GrpcApi:
    """The gRPC methods of one ingress replica, on its gateway."""

    def __init__(self, gateway: EngineGateway) -> None:
        self.gateway = gateway

    def authorize(self, context: RayServegRPCContext) -> None:
        """Metadata 'authorization: Bearer <key>' (or 'x-api-key: <key>'), when a key is configured."""
        metadata = dict(context.invocation_metadata())
        if not self.gateway.authorized(metadata.get("authorization"), metadata.get("x-api-key")):
            raise ApiError(401, "missing or invalid API key (metadata 'authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key")

    def generate_request(self, request: pb.GenerateRequest, stream: bool) -> GenerateRequest:
        if request.model:  # empty: the one model this server serves
            self.gateway.check_model(request.model)
        params = sampling_params(request)
        which = request.WhichOneof("input")
        if which is None:
            raise ApiError(400, "prompt or prompt_token_ids is required", param="prompt")
        prompt: str | list[int] = request.prompt if which == "prompt" else list(request.prompt_token_ids.ids)
        if not prompt:
            raise ApiError(400, f"{which} must not be empty", param=which)
        rid = request.request_id or new_id("grpc")
        return GenerateRequest(rid, params, prompt=prompt, deadline=self.gateway.deadline(None), stream=stream)

    async def generate(self, request: pb.GenerateRequest, context: RayServegRPCContext) -> pb.GenerateResponse:
        try:
            self.authorize(context)
            streams = await self.gateway.open_all([self.generate_request(request, stream=False)])
            merged = merge_outputs([chunk async for _, chunk in self.gateway.iterate(streams)])
        except ApiError as err:
            fail(context, err)
        choice = merged.outputs[0]
        return pb.GenerateResponse(request_id=merged.request_id, model=self.gateway.model_name, text=choice.text,
                                   token_ids=choice.token_ids, usage=usage_pb(merged),
                                   logprobs=logprobs_pb(choice.logprobs), **stop_fields(choice))

    async def generate_stream(self, request: pb.GenerateRequest,
                              context: RayServegRPCContext) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        try:
            self.authorize(context)
            gen_request = self.generate_request(request, stream=True)
            streams = await self.gateway.open_all([gen_request])
            async with contextlib.aclosing(self.gateway.iterate(streams)) as chunks:
                async for _, chunk in chunks:
                    for choice in chunk.outputs:
                        message = pb.GenerateStreamResponse(request_id=gen_request.request_id, text=choice.text,
                                                            token_ids=choice.token_ids,
                                                            logprobs=logprobs_pb(choice.logprobs))
                        if chunk.finished:
                            message.MergeFrom(pb.GenerateStreamResponse(usage=usage_pb(chunk),
                                                                        **stop_fields(choice)))
                        elif request.continuous_usage_stats:
                            message.usage.CopyFrom(usage_pb(chunk))
                        yield message
        except ApiError as err:
            fail(context, err)

    async def tokenize(self, request: pb.TokenizeRequest, context: RayServegRPCContext) -> pb.TokenizeResponse:
        try:
            self.authorize(context)
            if request.model:  # empty: the one model this server serves
                self.gateway.check_model(request.model)
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids, texts = await self.gateway.tokenize_with_text(request.text, add_special)
        except ApiError as err:
            fail(context, err)
        return pb.TokenizeResponse(token_ids=ids, tokens=texts)

    async def model_info(self, request: pb.ModelInfoRequest, context: RayServegRPCContext) -> pb.ModelInfoResponse:
        try:
            self.authorize(context)
            info = await self.gateway.model_info()
        except ApiError as err:
            fail(context, err)
        return pb.ModelInfoResponse(model=self.gateway.model_name, max_model_len=info["max_model_len"],
                                    vocab_size=info["vocab_size"], num_layers=info["num_layers"],
                                    num_experts=info["num_experts"], experts_per_token=info["experts_per_token"],
                                    hidden_size=info["hidden_size"], engine=info["engine"])

    async def check(self, request: health_pb2.HealthCheckRequest,
                    context: RayServegRPCContext) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1: SERVING when an engine answers and is alive, for "" and our service."""
        if request.service not in ("", SERVICE):
            fail(context, ApiError(404, f"unknown service {request.service!r}"))
        try:
            alive = bool((await self.gateway.health()).get("alive"))
        except ApiError:
            alive = False
        status = health_pb2.HealthCheckResponse.SERVING if alive else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)
