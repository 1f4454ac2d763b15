"""Structured output and tool calls through a real Serve app (cluster engine), with the official openai client:
``parse(response_format=PydanticModel)`` on the random-weight demo (structure enforced by the grammar: a random
model does not write JSON by luck) and on the trained demo; vLLM's guided_* extras; tools with tool_choice
"required" and named, whole and streamed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from cluster.engine.sampling import SamplingParams
from cluster.engine.structured_output import StructuredOutput
from cluster.model.demo import TRAINED_DEMO
from tests.serving.conftest import Served, app_args


class Verdict(BaseModel):
    answer: Literal["yes", "no", "maybe"]
    confident: bool
    score: int = Field(ge=0, le=9)


# Small schemas: the demo's tokenizer spends about a token per JSON character and its context is 512 tokens.
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}, "days": {"type": "integer",
                                                                                        "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "time", "parameters": {
        "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.http}/v1", api_key="unused", max_retries=0, timeout=120)


def test_parse_pydantic_model_on_the_random_demo(client: openai.OpenAI, served: Served) -> None:
    completion = client.chat.completions.parse(
        model=served.model, messages=[{"role": "user", "content": "Is the sea wet?"}], response_format=Verdict,
        n=3, seed=7, max_tokens=60, temperature=1.0)
    assert len(completion.choices) == 3
    for choice in completion.choices:
        assert isinstance(choice.message.parsed, Verdict), choice.message.content
        assert choice.finish_reason == "stop"
    # Streamed, the same seed gives the same JSON text, piece by piece.
    with client.beta.chat.completions.stream(
            model=served.model, messages=[{"role": "user", "content": "Is the sea wet?"}], response_format=Verdict,
            n=3, seed=7, max_tokens=60, temperature=1.0) as stream:
        final = stream.get_final_completion()
    assert [c.message.content for c in final.choices] == [c.message.content for c in completion.choices]


def test_cluster_engine_equals_the_local_engine(client: openai.OpenAI, served: Served) -> None:
    """The mask is applied where logits are sampled, on the coordinator: the cluster engine's constrained samples
    equal the local engine's, token for token (seeded, n=2)."""
    schema = Verdict.model_json_schema()
    got = client.completions.create(model=served.model, prompt="Verdict:", max_tokens=60, seed=21, n=2,
                                    temperature=1.0, extra_body={"guided_json": schema})
    want = served.reference.generate(["Verdict:"], SamplingParams(
        max_tokens=60, seed=21, n=2, temperature=1.0, structured=StructuredOutput.json_schema(schema)))[0]
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [c.text for c in want.completions]
    for c in want.completions:
        Verdict.model_validate_json(c.text)


def test_guided_extras_and_invalid_constraints(client: openai.OpenAI, served: Served) -> None:
    choice = client.completions.create(model=served.model, prompt="Colour:", max_tokens=10, seed=1,
                                       extra_body={"guided_choice": ["red", "green", "blue"]})
    assert choice.choices[0].text in ("red", "green", "blue")
    regex = client.completions.create(model=served.model, prompt="Code:", max_tokens=12, seed=2,
                                      extra_body={"guided_regex": "[A-F]{3}-[0-9]{2}"})
    assert re.fullmatch("[A-F]{3}-[0-9]{2}", regex.choices[0].text)
    obj = client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "x"}],
                                         max_tokens=40, seed=3, response_format={"type": "json_object"},
                                         extra_body={"stop": None})
    if obj.choices[0].finish_reason == "stop":  # a random model may fill the 40 tokens inside a string
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    else:
        assert (obj.choices[0].message.content or "").startswith("{")
    bad = {"guided_json": {"type": "object", "properties": {"a": {"type": "no-such-type"}}},
           "guided_regex": "([a-z]", "guided_grammar": "root ::= (", "guided_choice": []}
    for param, value in bad.items():
        response = httpx.post(f"{served.http}/v1/completions",
                              json={"model": served.model, "prompt": "x", param: value}, timeout=60)
        assert response.status_code == 400, (param, response.text)
        assert response.json()["error"]["param"] == param
    two = httpx.post(f"{served.http}/v1/chat/completions", timeout=60, json={
        "model": served.model, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_object"}, "guided_regex": "a+"})
    assert two.status_code == 400


def assemble(chunks: Iterator[Any]) -> tuple[dict[int, dict[str, str]], str | None]:
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
    return calls, finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "weather"}}])
def test_tool_calls_validate_and_stream_the_same(client: openai.OpenAI, served: Served, tool_choice: Any) -> None:
    request: dict[str, Any] = {
        "model": served.model, "messages": [{"role": "user", "content": "Weather in Oslo for 3 days?"}],
        "tools": TOOLS, "tool_choice": tool_choice, "parallel_tool_calls": False, "seed": 11, "max_tokens": 120,
        "temperature": 1.0}
    whole = client.chat.completions.create(**request)
    message = whole.choices[0].message
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert whole.choices[0].finish_reason == ("tool_calls" if tool_choice == "required" else "stop")
    streamed, finish = assemble(client.chat.completions.create(**request, stream=True))
    assert [(c["name"], c["arguments"]) for _, c in sorted(streamed.items())] == \
        [(c.function.name, c.function.arguments) for c in message.tool_calls]
    assert all(c["id"].startswith("call_") for c in streamed.values())
    assert finish == whole.choices[0].finish_reason


def test_tool_history_renders_on_a_template_without_tools(client: openai.OpenAI, served: Served) -> None:
    """The demo's template knows no tools: the tool turns are folded into plain turns (tool_calls.with_tools)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "weather",
                                                             "arguments": '{"city": "Oslo", "days": 2}'}}
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo?"},
                           {"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = client.chat.completions.create(model=served.model, messages=messages, tools=TOOLS[1:], tool_choice="auto",
                                           max_tokens=5, seed=1)
    assert reply.choices[0].message.role == "assistant"
    tokens = httpx.post(f"{served.http}/tokenize", timeout=60,
                        json={"model": served.model, "messages": messages}).json()
    text = httpx.post(f"{served.http}/detokenize", timeout=60, json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert '[TOOL_CALLS] [{"name": "weather", "arguments": {"city": "Oslo", "days": 2}}]' in text
    assert '[TOOL_RESULTS] {"call_id": "call_1", "content": "sunny"} [/TOOL_RESULTS]' in text


def test_structured_output_over_grpc(served: Served) -> None:
    import grpc

    from protos.moe_cluster.v1 import generation_pb2 as pb
    from router_service.client import GenerationClient

    client = GenerationClient(served.grpc, served.model, timeout_s=60)

    def generate(spec: pb.StructuredOutput) -> Any:
        return client.generate("Answer:", temperature=1.0, seed=4, max_new_tokens=80, structured_output=spec)

    try:
        reply = generate(pb.StructuredOutput(json_schema=json.dumps(Verdict.model_json_schema())))
        Verdict.model_validate_json(reply.text)
        assert generate(pb.StructuredOutput(choice=pb.Choices(options=["up", "down"]))).text in ("up", "down")
        with pytest.raises(grpc.RpcError) as err:
            generate(pb.StructuredOutput(regex="(["))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "structured_output.regex" in (err.value.details() or "")
    finally:
        client.close()


# Last in this file: while the trained app is deployed, gRPC calls need the app's name (two apps).
@pytest.fixture(scope="module")
def trained_url(served: Served) -> Iterator[str]:
    from ray import serve

    from router_service.app import build_app

    serve.run(build_app(app_args(TRAINED_DEMO, served_model_name="trained-demo")), name="trained-so",
              route_prefix="/trained-so")
    yield served.http + "/trained-so"
    serve.delete("trained-so")


@pytest.mark.slow
def test_parse_pydantic_model_on_the_trained_demo(trained_url: str) -> None:
    client = openai.OpenAI(base_url=f"{trained_url}/v1", api_key="unused", max_retries=0, timeout=300)
    completion = client.chat.completions.parse(
        model="trained-demo", messages=[{"role": "user", "content": "Did Jonah leave the fish?"}],
        response_format=Verdict, seed=5, max_tokens=60, temperature=0.7)
    assert isinstance(completion.choices[0].message.parsed, Verdict), completion.choices[0].message.content
