"""Backpressure, deadlines, authentication and engine-replica death, through real HTTP and gRPC."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.moe_cluster.v1 import generation_pb2_grpc as pb_grpc
from router_service.client import build_request
from tests.reliability.conftest import MAX_REQUEST_BYTES, Apps

LONG = {"max_tokens": 300, "ignore_eos": True, "temperature": 0}


def auth(apps: Apps) -> dict[str, str]:
    return {"Authorization": f"Bearer {apps.api_key}"}


def grpc_metadata(app: str, key: str | None = None) -> tuple[tuple[str, str], ...]:
    md = (("application", app),)
    return (*md, ("authorization", f"Bearer {key}")) if key else md


def test_http_api_key(apps: Apps) -> None:
    body = {"model": "guarded", "prompt": "hello", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": apps.api_key}):
        r = httpx.post(apps.url("guarded", "/v1/completions"), json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    ok = httpx.post(apps.url("guarded", "/v1/completions"), json=body, headers=auth(apps), timeout=60)
    assert ok.status_code == 200
    assert httpx.get(apps.url("guarded", "/v1/models"), timeout=60).status_code == 401
    assert httpx.get(apps.url("guarded", "/health"), timeout=60).status_code == 200  # probes need no key
    assert httpx.post(apps.url("pair", "/v1/completions"), json=body | {"model": "pair"}, timeout=60).status_code == 200


def test_http_api_key_guards_every_path_but_the_open_ones(apps: Apps) -> None:
    for method, path in (("GET", "/v1/no-such-endpoint"), ("POST", "/tokenize"), ("DELETE", "/v1/models")):
        r = httpx.request(method, apps.url("guarded", path), timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (method, path, r.text)
    assert httpx.get(apps.url("guarded", "/v1/no-such-endpoint"), headers=auth(apps), timeout=60).status_code == 404
    for path in ("/health", "/docs", "/openapi.json", "/redoc"):
        assert httpx.get(apps.url("guarded", path), timeout=60).status_code == 200, path


def test_http_body_over_the_limit_is_413_before_it_is_read(apps: Apps) -> None:
    big = {"model": "guarded", "prompt": "x" * MAX_REQUEST_BYTES, "max_tokens": 2}
    r = httpx.post(apps.url("guarded", "/v1/completions"), json=big, headers=auth(apps), timeout=60)
    assert r.status_code == 413 and str(MAX_REQUEST_BYTES) in r.json()["error"]["message"], r.text
    assert httpx.post(apps.url("guarded", "/v1/completions"), json=big, timeout=60).status_code == 401  # key first
    # Headers announcing a huge body, and no body at all: the answer comes without waiting for it.
    url = urlsplit(apps.url("guarded", "/v1/completions"))
    with socket.create_connection((url.hostname, url.port), timeout=30) as conn:
        conn.sendall(f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {apps.api_key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {100 * MAX_REQUEST_BYTES}\r\n\r\n".encode())
        status_line = conn.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.split()[1] == b"413", status_line


def test_grpc_api_key(apps: Apps) -> None:
    with grpc.insecure_channel(apps.grpc) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        request = build_request("guarded", "hello", max_new_tokens=2)
        for md in (grpc_metadata("guarded"), grpc_metadata("guarded", "wrong")):
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(request, metadata=md, timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Generate(request, metadata=grpc_metadata("guarded", apps.api_key), timeout=60).token_ids
        x_api_key = (*grpc_metadata("guarded"), ("x-api-key", apps.api_key))
        assert stub.Generate(request, metadata=x_api_key, timeout=60).token_ids
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           metadata=grpc_metadata("guarded"), timeout=60)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_full_queue_answers_429_and_nothing_is_lost(apps: Apps) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(apps.url("guarded", "/v1/completions"), headers=auth(apps),
                                                      json={"model": "guarded", "prompt": f"p{i}", **LONG})
                                          for i in range(10)))

    responses = asyncio.run(run())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429}, codes  # 2 running + 2 queued at most; the rest refused, none dropped
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"]
        else:
            assert r.json()["usage"]["completion_tokens"] == 300


def test_grpc_full_queue_is_resource_exhausted(apps: Apps) -> None:
    async def run() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(apps.grpc) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)

            async def one(i: int) -> grpc.StatusCode:
                try:
                    await stub.Generate(build_request("guarded", f"p{i}", max_new_tokens=300, ignore_eos=True),
                                        metadata=grpc_metadata("guarded", apps.api_key), timeout=300)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as err:
                    return err.code()

            return list(await asyncio.gather(*(one(i) for i in range(10))))

    codes = asyncio.run(run())
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes


def test_deadlines_are_honoured(apps: Apps) -> None:
    started = time.monotonic()
    r = httpx.post(apps.url("guarded", "/v1/completions"), headers=auth(apps), timeout=60,
                   json={"model": "guarded", "prompt": "slow", "timeout": 0.5, **LONG | {"max_tokens": 400}})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < 10
    with grpc.insecure_channel(apps.grpc) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(build_request("guarded", "slow", max_new_tokens=400, ignore_eos=True),
                          metadata=grpc_metadata("guarded", apps.api_key), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Neither request kept its slot: two fresh ones run at once again.
    ok = [httpx.post(apps.url("guarded", "/v1/completions"), headers=auth(apps), timeout=60,
                     json={"model": "guarded", "prompt": "x", "max_tokens": 2}).status_code for _ in range(2)]
    assert ok == [200, 200]


def engine_replicas(app: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"{app}#EngineDeployment" in a["name"]]


def test_two_engine_replicas_share_one_expert_pool(apps: Apps) -> None:
    """Experts are loaded once: the app's two engine replicas are two coordinators on one pool of N workers (the
    demo's 8 experts, 4 per worker: 2 ExpertWorker processes, not 4)."""
    from ray import serve

    pool = serve.get_deployment_handle("ExpertPool", app_name="pair").describe.remote().result()
    assert len(pool["coordinators"]) == 2 and len(pool["workers"]) == 2
    # Every live ExpertWorker actor of this Ray (the GCS's actor table; the guarded app runs none).
    alive = [a for a in ray._private.state.actors().values()
             if a["ActorClassName"] == "ExpertWorker" and a["State"] == "ALIVE"]
    assert sorted(a["Pid"] for a in alive) == sorted(w["pid"] for w in pool["workers"])


STREAMED = {"max_tokens": 160, "ignore_eos": True, "temperature": 0}
SAMPLED = {"max_tokens": 160, "ignore_eos": True, "temperature": 0.8, "top_p": 0.95}


def actor_pid(name: str) -> int:
    """The process of the live actor named ``name`` (the GCS's actor table)."""
    return next(int(a["Pid"]) for a in ray._private.state.actors().values()
                if a["Name"] == name and a["State"] == "ALIVE")


def resumed_total(apps: Apps) -> float:
    """The ingress's moe_cluster_requests_resumed_total of the pair app, as Prometheus scrapes it."""
    lines = httpx.get(apps.metrics, timeout=30).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("ray_moe_cluster_requests_resumed_total{") and 'model="pair"' in line)


async def pair_workload(apps: Apps, kill: str | None) -> dict[str, Any]:
    """8 greedy streams (4 SSE, 4 gRPC) and 8 seeded sampled unary requests (4 HTTP with n=2 and logprobs, 4 gRPC),
    all at once; with ``kill``, that replica is SIGKILLed once every stream is under way. Returns what each got."""
    received = [0] * 8  # stream events so far

    async def sse(client: httpx.AsyncClient, i: int) -> dict[str, Any]:
        body = {"model": "pair", "prompt": f"stream {i}", "stream": True, "stream_options": {"include_usage": True},
                **STREAMED}
        texts, finish, usage_ = [], None, None
        async with client.stream("POST", apps.url("pair", "/v1/completions"), json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                assert "error" not in event, event
                for choice in event["choices"]:
                    texts.append(choice["text"])
                    finish = choice["finish_reason"] or finish
                    received[i] += 1
                usage_ = event.get("usage") or usage_
        return {"text": "".join(texts), "finish": finish, "usage": usage_}

    async def grpc_stream(stub: Any, i: int) -> dict[str, Any]:
        request = build_request("pair", f"grpc stream {i}", max_new_tokens=160, ignore_eos=True, temperature=0)
        tokens, text, last = [], "", None
        async for message in stub.GenerateStream(request, metadata=grpc_metadata("pair"), timeout=300):
            tokens += message.token_ids
            text += message.text
            last = message
            received[4 + i] += 1
        assert last is not None
        return {"tokens": tokens, "text": text, "stop": last.stop_reason, "usage": last.usage.completion_tokens}

    async def http_sampled(client: httpx.AsyncClient, i: int) -> dict[str, Any]:
        r = await client.post(apps.url("pair", "/v1/completions"), json={
            "model": "pair", "prompt": f"sampled {i}", "seed": 100 + i, "n": 2, "logprobs": 2, **SAMPLED})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        return {"usage": r.json()["usage"],
                "choices": [(c["text"], c["finish_reason"], c["logprobs"]["tokens"]) for c in choices],
                "logprobs": [c["logprobs"]["token_logprobs"] for c in choices]}

    async def grpc_sampled(stub: Any, i: int) -> dict[str, Any]:
        request = build_request("pair", f"grpc sampled {i}", max_new_tokens=160, ignore_eos=True, temperature=0.8,
                                top_p=0.95, seed=200 + i)
        response = await stub.Generate(request, metadata=grpc_metadata("pair"), timeout=300)
        return {"tokens": list(response.token_ids), "text": response.text, "usage": response.usage.completion_tokens}

    async with httpx.AsyncClient(timeout=300) as client, grpc.aio.insecure_channel(apps.grpc) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        tasks = [asyncio.create_task(c) for c in (
            *(sse(client, i) for i in range(4)), *(grpc_stream(stub, i) for i in range(4)),
            *(http_sampled(client, i) for i in range(4)), *(grpc_sampled(stub, i) for i in range(4)))]
        if kill is not None:
            while min(received) < 3:  # every stream has had text: all 16 are running on one replica or the other
                await asyncio.sleep(0.05)
            os.kill(actor_pid(kill), signal.SIGKILL)
        results = await asyncio.gather(*tasks)
    return {"sse": results[:4], "grpc_stream": results[4:8], "http_sampled": results[8:12],
            "grpc_sampled": results[12:]}


def test_engine_replica_killed_mid_generation_every_request_resumes_exactly(apps: Apps) -> None:
    """SIGKILL one of two engine replicas while 16 requests run: the ingress resumes each of its requests on the
    other replica, and every request ends as it does without the fault (greedy and seeded alike; a stream's
    text equal to the fault-free one has neither gap nor repeat)."""
    replicas = engine_replicas("pair")
    assert len(replicas) == 2
    before = resumed_total(apps)
    reference = asyncio.run(pair_workload(apps, kill=None))
    assert all(r["usage"] for r in reference["sse"])
    faulted = asyncio.run(pair_workload(apps, kill=replicas[0]))
    for kind, results in reference.items():
        for i, (got, want) in enumerate(zip(faulted[kind], results, strict=True)):
            if "logprobs" in want:  # values to float rounding: a resumed request's prefill recomputes decode steps
                assert got.pop("logprobs") == [pytest.approx(v, abs=1e-3) for v in want.pop("logprobs")], (kind, i)
            assert got == want, (kind, i)
    # The replica did serve some of them: the ingress resumed them (Ray exports the counter every few seconds).
    deadline = time.monotonic() + 60
    while resumed_total(apps) == before and time.monotonic() < deadline:
        time.sleep(1)
    assert resumed_total(apps) > before
    # Serve brings the engine count back to two.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (len(engine_replicas("pair")) < 2 or replicas[0] in engine_replicas("pair")):
        time.sleep(1)
    assert len(engine_replicas("pair")) == 2 and replicas[0] not in engine_replicas("pair")
