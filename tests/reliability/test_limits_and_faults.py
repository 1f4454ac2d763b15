"""Backpressure, deadlines, authentication and engine-replica death, through real HTTP and gRPC."""

from __future__ import annotations

import asyncio
import socket
import time
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


def test_engine_replica_killed_while_two_serve(apps: Apps) -> None:
    replicas = engine_replicas("pair")
    assert len(replicas) == 2

    async def run() -> tuple[list[httpx.Response], list[grpc.StatusCode]]:
        async with httpx.AsyncClient(timeout=300) as client, grpc.aio.insecure_channel(apps.grpc) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)

            async def http_one(i: int) -> httpx.Response:
                return await client.post(apps.url("pair", "/v1/completions"),
                                         json={"model": "pair", "prompt": f"request {i}", **LONG})

            async def grpc_one(i: int) -> grpc.StatusCode:
                try:
                    await stub.Generate(build_request("pair", f"grpc {i}", max_new_tokens=300, ignore_eos=True),
                                        metadata=grpc_metadata("pair"), timeout=300)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as err:
                    return err.code()

            http_tasks = [asyncio.create_task(http_one(i)) for i in range(8)]
            grpc_tasks = [asyncio.create_task(grpc_one(i)) for i in range(8)]
            await asyncio.sleep(2.0)  # all are running on one replica or the other
            ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
            return list(await asyncio.gather(*http_tasks)), list(await asyncio.gather(*grpc_tasks))

    responses, grpc_codes = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] and r.json()["error"]["code"] == "engine_unavailable"
    assert set(grpc_codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, grpc_codes
    assert grpc.StatusCode.UNAVAILABLE in grpc_codes
    # New requests succeed right away (the other replica), and Serve brings the engine count back to two.
    ok = httpx.post(apps.url("pair", "/v1/completions"), json={"model": "pair", "prompt": "after", "max_tokens": 3},
                    timeout=120)
    assert ok.status_code == 200
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (len(engine_replicas("pair")) < 2 or replicas[0] in engine_replicas("pair")):
        time.sleep(1)
    assert len(engine_replicas("pair")) == 2 and replicas[0] not in engine_replicas("pair")
