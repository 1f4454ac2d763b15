"""Property-based fuzzing of request validation: any input becomes valid parameters or a clean 4xx-style
error (ValueError/TypeError, ApiError, or a pydantic ValidationError) - never another exception."""

from __future__ import annotations

from typing import Any

import pydantic
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.engine.sampling import SamplingParams
from protos.moe_cluster.v1 import generation_pb2 as pb
from router_service.errors import ApiError
from router_service.grpc_service import sampling_params
from router_service.openai_protocol import ChatCompletionRequest, CompletionRequest

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True)
                    | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "n", "logprobs", "echo",
          "ignore_eos", "stream", "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "timeout",
          "best_of", "suffix", "top_logprobs", "max_completion_tokens", "tools", "response_format"]
BODIES = st.fixed_dictionaries({"model": st.sampled_from(["m", 3, None])},
                               optional={f: JSON for f in FIELDS} | {
                                   "prompt": JSON | st.text(min_size=1), "messages": JSON | st.lists(
                                       st.fixed_dictionaries({"role": st.sampled_from(["user", "x", 5]),
                                                              "content": JSON | st.text()}), max_size=3)})


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                                        "stop_token_ids", "n", "logprobs", "echo", "ignore_eos"]), JSON))
def test_sampling_params_accept_or_explain(kwargs: dict[str, Any]) -> None:
    try:
        params = SamplingParams(**kwargs)
    except (ValueError, TypeError) as err:
        assert str(err)
        return
    assert params.max_tokens is None or params.max_tokens >= 1
    assert params.temperature >= 0 and 0 < params.top_p <= 1


@settings(max_examples=300, deadline=None)
@given(BODIES)
def test_openai_requests_accept_or_explain(body: dict[str, Any]) -> None:
    for model in (CompletionRequest, ChatCompletionRequest):
        try:
            request = model.model_validate(body)
        except pydantic.ValidationError:
            continue  # FastAPI answers these with 422
        try:
            params = request.to_params()
            if isinstance(request, CompletionRequest):
                request.prompts()
            else:
                request.to_messages()
        except ApiError as err:
            assert 400 <= err.status < 500 and err.message
            continue
        assert isinstance(params, SamplingParams)


@settings(max_examples=300, deadline=None)
@given(temperature=st.none() | st.floats(width=32), top_p=st.none() | st.floats(width=32),
       top_k=st.none() | st.integers(0, 2**32 - 1), max_new_tokens=st.none() | st.integers(0, 2**32 - 1),
       stops=st.lists(st.text(max_size=5), max_size=20), logprobs=st.none() | st.integers(0, 2**32 - 1))
def test_grpc_requests_accept_or_explain(temperature: float | None, top_p: float | None, top_k: int | None,
                                         max_new_tokens: int | None, stops: list[str], logprobs: int | None) -> None:
    request = pb.GenerateRequest(model="m", prompt="x")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)):
        if value is not None:
            setattr(request.sampling, name, value)
    if max_new_tokens is not None:
        request.stopping.max_new_tokens = max_new_tokens
    request.stopping.stop_sequences.extend(stops)
    if logprobs is not None:
        request.logprobs = logprobs
    try:
        params = sampling_params(request)
    except ApiError as err:
        assert err.status == 400 and err.message
        field = err.message.split(" ", 1)[0]
        assert field.startswith(("sampling.", "stopping.", "logprobs")), err.message  # named as the proto names it
        return
    assert isinstance(params, SamplingParams)
