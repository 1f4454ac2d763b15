"""A small typed client of moe_cluster.v1.GenerationService, sync and asyncio.

Every call has a deadline; only UNAVAILABLE (the engine restarting, a replica moving) is retried, with
exponential backoff - a bad argument, an unknown model or a full queue is the caller's to handle.

    client = GenerationClient("127.0.0.1:9000", model="moe-cluster-demo")
    print(client.generate("Once upon a time", max_new_tokens=16).text)
    for delta in client.generate_stream("Once upon a time"):
        print(delta.text, end="")
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from protos.moe_cluster.v1 import generation_pb2 as pb
from protos.moe_cluster.v1 import generation_pb2_grpc as pb_grpc

T = TypeVar("T")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # in all, the first call included
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 5.0

    def backoffs(self) -> Iterator[float]:
        delay = self.initial_backoff_s
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(delay * 2, self.max_backoff_s)


def build_request(model: str, prompt: str | Sequence[int], *, max_new_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                  seed: int | None = None, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                  ignore_eos: bool = False, logprobs: int | None = None, request_id: str = "",
                  continuous_usage_stats: bool = False, min_p: float | None = None,
                  repetition_penalty: float | None = None, presence_penalty: float | None = None,
                  frequency_penalty: float | None = None, logit_bias: dict[int, float] | None = None,
                  bad_words: Sequence[str] = (), min_tokens: int | None = None,
                  include_stop_str_in_output: bool = False, skip_special_tokens: bool | None = None,
                  structured_output: pb.StructuredOutput | None = None) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=model, request_id=request_id, continuous_usage_stats=continuous_usage_stats)
    if structured_output is not None:  # e.g. pb.StructuredOutput(json_schema=json.dumps(schema))
        request.structured_output.CopyFrom(structured_output)
    for name, value in (("min_p", min_p), ("repetition_penalty", repetition_penalty),
                        ("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if value is not None:
            setattr(request.sampling, name, value)
    request.sampling.logit_bias.update(logit_bias or {})
    request.sampling.bad_words.extend(bad_words)
    if skip_special_tokens is not None:
        request.skip_special_tokens = skip_special_tokens
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(prompt)
    if temperature is not None:
        request.sampling.temperature = temperature
    if top_p is not None:
        request.sampling.top_p = top_p
    if top_k is not None:
        request.sampling.top_k = top_k
    if seed is not None:
        request.sampling.seed = seed
    stopping = pb.StoppingCriteria(stop_sequences=list(stop), stop_token_ids=list(stop_token_ids),
                                   ignore_eos=ignore_eos, include_stop_str_in_output=include_stop_str_in_output)
    if min_tokens is not None:
        stopping.min_tokens = min_tokens
    if max_new_tokens is not None:
        stopping.max_new_tokens = max_new_tokens
    request.stopping.CopyFrom(stopping)
    if logprobs is not None:
        request.logprobs = logprobs
    return request


class GenerationClient:
    """Blocking client. ``timeout_s`` is the deadline of each call (a stream's, for the whole stream)."""

    def __init__(self, target: str, model: str, timeout_s: float = 60.0, api_key: str | None = None,
                 retry: RetryPolicy = RetryPolicy(), channel: grpc.Channel | None = None) -> None:
        self.model = model
        self.timeout_s = timeout_s
        self.retry = retry
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.channel = channel or grpc.insecure_channel(target)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)

    def _call(self, fn: Callable[[], T]) -> T:
        for delay in [*self.retry.backoffs(), None]:
            try:
                return fn()
            except grpc.RpcError as err:
                if delay is None or err.code() not in RETRYABLE:
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    def generate(self, prompt: str | Sequence[int], **options: Any) -> pb.GenerateResponse:
        request = build_request(self.model, prompt, **options)
        return self._call(lambda: self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata))

    def generate_stream(self, prompt: str | Sequence[int], **options: Any) -> Iterator[pb.GenerateStreamResponse]:
        """Messages as they come. Retried only if UNAVAILABLE comes before the first message."""
        request = build_request(self.model, prompt, **options)
        stream = self._call(lambda: _first_then_rest(
            self.stub.GenerateStream(request, timeout=self.timeout_s, metadata=self.metadata)))
        yield from stream

    def tokenize(self, text: str, add_special_tokens: bool = True) -> pb.TokenizeResponse:
        request = pb.TokenizeRequest(model=self.model, text=text, add_special_tokens=add_special_tokens)
        return self._call(lambda: self.stub.Tokenize(request, timeout=self.timeout_s, metadata=self.metadata))

    def model_info(self) -> pb.ModelInfoResponse:
        return self._call(lambda: self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout_s,
                                                      metadata=self.metadata))

    def close(self) -> None:
        self.channel.close()


def _first_then_rest(call: Any) -> Iterator[pb.GenerateStreamResponse]:
    """Pull the first message now (so errors before it surface inside the retry loop)."""
    first = next(call, None)
    messages = [] if first is None else [first]

    def rest() -> Iterator[pb.GenerateStreamResponse]:
        yield from messages
        yield from call

    return rest()


class AsyncGenerationClient:
    """asyncio client with the same behaviour."""

    def __init__(self, target: str, model: str, timeout_s: float = 60.0, api_key: str | None = None,
                 retry: RetryPolicy = RetryPolicy()) -> None:
        self.model = model
        self.timeout_s = timeout_s
        self.retry = retry
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        for delay in [*self.retry.backoffs(), None]:
            try:
                return await fn()
            except grpc.aio.AioRpcError as err:
                if delay is None or err.code() not in RETRYABLE:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def generate(self, prompt: str | Sequence[int], **options: Any) -> pb.GenerateResponse:
        request = build_request(self.model, prompt, **options)
        return await self._call(lambda: self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata))

    async def generate_stream(self, prompt: str | Sequence[int], **options: Any
                              ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Messages as they come; leaving the loop early cancels the call (and the generation)."""
        request = build_request(self.model, prompt, **options)
        for delay in [*self.retry.backoffs(), None]:
            call = self.stub.GenerateStream(request, timeout=self.timeout_s, metadata=self.metadata)
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as err:
                if delay is None or err.code() not in RETRYABLE:
                    raise
                await asyncio.sleep(delay)
                continue
            try:
                message = first
                while message is not grpc.aio.EOF:
                    yield message
                    message = await call.read()
            finally:
                call.cancel()
            return

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> pb.TokenizeResponse:
        request = pb.TokenizeRequest(model=self.model, text=text, add_special_tokens=add_special_tokens)
        return await self._call(lambda: self.stub.Tokenize(request, timeout=self.timeout_s, metadata=self.metadata))

    async def model_info(self) -> pb.ModelInfoResponse:
        return await self._call(lambda: self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout_s,
                                                            metadata=self.metadata))

    async def close(self) -> None:
        await self.channel.close()


def key_from_env(var: str) -> str:
    """The API key that ``--api-key-env VAR`` names; an unset or empty variable is a user error."""
    key = os.environ.get(var)
    if not key:
        raise ValueError(f"--api-key-env {var}: that environment variable is not set or empty")
    return key


def grpc_generate_command(args: argparse.Namespace, params: Any) -> int:
    """``moe-cluster generate --grpc HOST:PORT --prompt TEXT [--stream] [--json]``."""
    import json

    api_key = key_from_env(args.api_key_env) if args.api_key_env else None
    probe = GenerationClient(args.grpc, model="", timeout_s=30, api_key=api_key)
    try:
        model = probe.model_info().model  # whatever the server serves
    except grpc.RpcError as err:
        raise ValueError(f"cannot reach {args.grpc}: {err.code().name}: {err.details()}") from None
    finally:
        probe.close()
    client = GenerationClient(args.grpc, model=model, timeout_s=300, api_key=api_key)
    options = dict(max_new_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                   top_k=params.top_k if params.top_k > 0 else None, seed=params.seed, stop=params.stop)
    try:
        if args.stream:
            for message in client.generate_stream(args.prompt, **options):
                print(message.text, end="", flush=True)
            print()
            return 0
        response = client.generate(args.prompt, **options)
    except grpc.RpcError as err:
        raise ValueError(f"{err.code().name}: {err.details()}") from None
    finally:
        client.close()
    if args.json:
        reason = {pb.MAX_TOKENS: "length", pb.CANCELLED: "abort"}.get(response.stop_reason, "stop")
        print(json.dumps({"text": response.text, "token_ids": list(response.token_ids), "finish_reason": reason}))
    else:
        print(response.text)
    return 0


if __name__ == "__main__":  # python -m router_service.client HOST:PORT "prompt"
    c = GenerationClient(sys.argv[1], model=GenerationClient(sys.argv[1], "").model_info().model)
    print(c.generate(" ".join(sys.argv[2:]) or "Hello").text)
