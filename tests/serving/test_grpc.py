"""The gRPC API through Serve's gRPC proxy on the same app as the HTTP tests: standard clients only."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cluster.engine.sampling import SamplingParams
from protos.moe_cluster.v1 import generation_pb2 as pb
from protos.moe_cluster.v1 import generation_pb2_grpc as pb_grpc
from router_service.client import AsyncGenerationClient, GenerationClient, build_request
from tests.serving.conftest import Served
from tests.serving.test_http import PROMPT, metric_values


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[GenerationClient]:
    c = GenerationClient(served.grpc, model=served.model, timeout_s=120)
    yield c
    c.close()


def test_unary_and_stream_equal_the_http_result(served: Served, client: GenerationClient) -> None:
    http = httpx.post(f"{served.http}/v1/completions", json={"model": served.model, "prompt": PROMPT,
                                                              "max_tokens": 12, "temperature": 0}, timeout=60).json()
    unary = client.generate(PROMPT, max_new_tokens=12, temperature=0)
    assert unary.text == http["choices"][0]["text"]
    assert unary.stop_reason == pb.MAX_TOKENS and unary.usage.completion_tokens == 12
    assert unary.usage.prompt_tokens == http["usage"]["prompt_tokens"]
    messages = list(client.generate_stream(PROMPT, max_new_tokens=12, temperature=0))
    assert "".join(m.text for m in messages) == unary.text
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    assert messages[-1].stop_reason == pb.MAX_TOKENS and messages[-1].usage.total_tokens == unary.usage.total_tokens
    assert all(m.stop_reason == pb.STOP_REASON_UNSPECIFIED for m in messages[:-1])


def test_continuous_usage_stats_on_every_stream_message(client: GenerationClient) -> None:
    messages = list(client.generate_stream(PROMPT, max_new_tokens=12, temperature=0, continuous_usage_stats=True))
    counts = [m.usage.completion_tokens for m in messages]
    generated = [len(m.token_ids) for m in messages]
    assert all(m.HasField("usage") for m in messages)
    assert counts == [sum(generated[:i + 1]) for i in range(len(messages))]  # the tokens so far
    assert counts[-1] == 12
    assert all(m.usage.total_tokens == m.usage.prompt_tokens + m.usage.completion_tokens for m in messages)
    plain = list(client.generate_stream(PROMPT, max_new_tokens=4, temperature=0))
    assert [m.HasField("usage") for m in plain] == [False] * (len(plain) - 1) + [True]


def test_vllm_sampling_parameters_equal_the_engine(served: Served, client: GenerationClient) -> None:
    got = client.generate(PROMPT, max_new_tokens=10, temperature=0.7, seed=5, min_p=0.05, repetition_penalty=1.3,
                          presence_penalty=0.5, frequency_penalty=0.3, bad_words=["zz"], min_tokens=4,
                          logit_bias={11: 3.0})
    want = served.reference.generate([PROMPT], SamplingParams(
        max_tokens=10, temperature=0.7, seed=5, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.5,
        frequency_penalty=0.3, bad_words=("zz",), min_tokens=4, logit_bias=((11, 3.0),)))[0].completions[0]
    assert list(got.token_ids) == want.token_ids and got.text == want.text
    forced = client.generate(PROMPT, max_new_tokens=4, temperature=1.0, logit_bias={77: 500.0})  # clamped to 100
    assert list(forced.token_ids) == [77] * 4
    with pytest.raises(grpc.RpcError) as err:
        client.generate(PROMPT, max_new_tokens=4, repetition_penalty=-1.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.repetition_penalty" in (err.value.details() or "")


def test_stop_reasons_logprobs_tokenize_and_model_info(served: Served, client: GenerationClient) -> None:
    base = client.generate(PROMPT, max_new_tokens=16, temperature=0)
    stop = base.text[4:7]
    cut = client.generate(PROMPT, max_new_tokens=16, temperature=0, stop=[stop])
    assert cut.stop_reason == pb.STOP_SEQUENCE and cut.stop_sequence == stop
    assert cut.text == base.text[:base.text.index(stop)]
    by_id = client.generate(PROMPT, max_new_tokens=16, temperature=0, stop_token_ids=[base.token_ids[3]])
    assert by_id.stop_reason == pb.STOP_SEQUENCE and by_id.stop_token_id == base.token_ids[3]
    lp = client.generate(PROMPT, max_new_tokens=3, temperature=0, logprobs=2)
    assert len(lp.logprobs) == 3 and all(len(t.top) == 2 and t.top[0].token_id == t.token_id for t in lp.logprobs)
    tokens = client.tokenize(PROMPT)
    assert list(tokens.token_ids) == served.reference.tokenizer.encode(PROMPT)
    assert len(tokens.tokens) == len(tokens.token_ids)
    info = client.model_info()
    assert (info.model, info.num_experts, info.experts_per_token, info.engine) == (served.model, 8, 2, "cluster")
    assert info.max_model_len == 512


def test_health_check_with_the_standard_client(served: Served) -> None:
    with grpc.insecure_channel(served.grpc) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "moe_cluster.v1.GenerationService"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service(served: Served) -> None:
    with grpc.insecure_channel(served.grpc) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = list(db.get_services())
        assert "moe_cluster.v1.GenerationService" in services and "grpc.health.v1.Health" in services
        method_names = {m.name for m in db.FindFileContainingSymbol("moe_cluster.v1.GenerationService")
                        .service[0].method}
        assert method_names == {"Generate", "GenerateStream", "Tokenize", "ModelInfo"}


@pytest.mark.parametrize(("request_kwargs", "code", "needle"), [
    ({"prompt": "x", "temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    ({"prompt": "x", "top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    ({"prompt": "x", "max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "stopping.max_new_tokens"),
    ({"prompt": "x", "logprobs": 50}, grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
    ({"prompt": list(range(3, 700))}, grpc.StatusCode.INVALID_ARGUMENT, "context length"),
    ({"prompt": [99999]}, grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    ({"prompt": "x", "model": "gpt-9"}, grpc.StatusCode.NOT_FOUND, "gpt-9"),
])
def test_bad_requests_get_real_status_codes(served: Served, request_kwargs: dict, code: grpc.StatusCode,
                                            needle: str) -> None:
    model = request_kwargs.pop("model", served.model)
    request = build_request(model, **request_kwargs)
    with grpc.insecure_channel(served.grpc) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for call in (lambda: stub.Generate(request, timeout=30),
                     lambda: list(stub.GenerateStream(request, timeout=30))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == code and needle in err.value.details()
        missing = pb.GenerateRequest(model=served.model)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(missing, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in err.value.details()


def test_an_empty_model_means_the_served_model(served: Served, client: GenerationClient) -> None:
    named = client.generate(PROMPT, max_new_tokens=5, temperature=0)
    with grpc.insecure_channel(served.grpc) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        request = build_request("", PROMPT, max_new_tokens=5, temperature=0)
        unnamed = stub.Generate(request, timeout=60)
        assert (unnamed.text, unnamed.model) == (named.text, served.model)
        assert "".join(m.text for m in stub.GenerateStream(request, timeout=60)) == named.text
        tokens = stub.Tokenize(pb.TokenizeRequest(model="", text=PROMPT), timeout=60)
        assert list(tokens.token_ids) == served.reference.tokenizer.encode(PROMPT)
        with pytest.raises(grpc.RpcError) as err:
            stub.Tokenize(pb.TokenizeRequest(model="gpt-9", text=PROMPT), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "gpt-9" in err.value.details()


def test_deadline_exceeded(served: Served) -> None:
    slow = GenerationClient(served.grpc, model=served.model, timeout_s=0.3)
    with pytest.raises(grpc.RpcError) as err:
        slow.generate(PROMPT, max_new_tokens=400, ignore_eos=True)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    slow.close()
    wait_until_idle(served)


def wait_until_idle(served: Served, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        used, running = metric_values(served, "ray_moe_cluster_kv_blocks_used"), metric_values(
            served, "ray_moe_cluster_requests_running")
        if used and sum(used) == 0 and sum(running) == 0:
            return
        time.sleep(0.5)
    raise AssertionError("requests kept running (KV blocks not freed)")


def test_32_streams_with_half_cancelled(served: Served) -> None:
    rng = random.Random(7)
    prompts = [PROMPT[: rng.randrange(5, len(PROMPT))] for _ in range(32)]
    expected = [served.reference.generate([p], _greedy(24))[0].completions[0].token_ids for p in prompts]

    async def run() -> list[list[int] | None]:
        client = AsyncGenerationClient(served.grpc, model=served.model, timeout_s=300)

        async def one(i: int) -> list[int] | None:
            tokens: list[int] = []
            async for message in client.generate_stream(prompts[i], max_new_tokens=24 if i % 2 else 400,
                                                        temperature=0, ignore_eos=True):
                tokens.extend(message.token_ids)
                if i % 2 == 0 and len(tokens) >= 3:
                    return None  # leaving the loop cancels the call
            return tokens

        try:
            return list(await asyncio.gather(*(one(i) for i in range(32))))
        finally:
            await client.close()

    results = asyncio.run(run())
    for i, tokens in enumerate(results):
        if i % 2:
            assert tokens == expected[i], f"stream {i}"
    wait_until_idle(served)  # the cancelled half freed their KV blocks


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.mark.slow
def test_cli_generate_over_grpc(served: Served, client: GenerationClient) -> None:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "router_service.cli", "--log-level", "ERROR", "generate", "--grpc",
                          served.grpc, "--prompt", PROMPT, "--max-tokens", "9", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    want = client.generate(PROMPT, max_new_tokens=9, temperature=0)
    assert json.loads(out.stdout) == {"text": want.text, "token_ids": list(want.token_ids),
                                      "finish_reason": "length"}
    streamed = subprocess.run([sys.executable, "-m", "router_service.cli", "--log-level", "ERROR", "generate", "--grpc",
                               served.grpc, "--prompt", PROMPT, "--max-tokens", "9", "--stream"],
                              capture_output=True, text=True, timeout=120)
    assert streamed.returncode == 0 and streamed.stdout.rstrip("\n") == want.text
    bad = subprocess.run([sys.executable, "-m", "router_service.cli", "generate", "--grpc", "127.0.0.1:1",
                          "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "UNAVAILABLE" in bad.stderr
