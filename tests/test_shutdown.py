"""Shutdown with requests running: one drain deadline (``drain_timeout_s``); what cannot finish by then ends with
a clean, retryable error (HTTP 503 OpenAI error JSON, an error event inside an SSE stream, gRPC UNAVAILABLE),
never a cut connection or a plain-text 500, and ``moe-cluster serve`` exits within a bound."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig
from cluster.errors import RequestFailedError
from protos.moe_cluster.v1 import generation_pb2_grpc as pb_grpc
from router_service.client import build_request
from router_service.engine_deployment import engine_deployment_options
from router_service.listeners import check_ports_free
from router_service.settings import AppSettings
from tests.serving.conftest import free_port
from tests.test_cli_serve import start

DRAIN_S = 2.0
LONG = 1500  # tokens: several times DRAIN_S on the demo model (about 10 s on the 2-core CI machine)
SHUTTING_DOWN = "the server is shutting down"


def test_grace_periods_follow_the_one_drain_deadline(demo_dir: Path) -> None:
    settings = AppSettings.from_args({"model": str(demo_dir), "engine": "local", "drain_timeout_s": 7})
    assert settings.drain_timeout_s < settings.engine_grace_s < settings.ingress_grace_s
    assert engine_deployment_options(settings)["graceful_shutdown_timeout_s"] == settings.engine_grace_s
    for bad in (-1, True, "10", 10_000):
        with pytest.raises(ValueError, match=rf"drain_timeout_s .*{bad!r}"):
            AppSettings.from_args({"model": str(demo_dir), "drain_timeout_s": bad})


def test_drain_fails_what_is_still_running_at_the_deadline(demo_dir: Path) -> None:
    engine = EngineLoop.local(EngineConfig(model=str(demo_dir), progress=False, num_kv_blocks=160))
    try:
        outcome: dict[str, BaseException] = {}

        def run() -> None:
            try:
                engine.generate(["Hello"], SamplingParams(max_tokens=LONG, temperature=0, ignore_eos=True))
            except RequestFailedError as err:
                outcome["error"] = err

        thread = threading.Thread(target=run)
        thread.start()
        while engine.stats().num_running == 0:
            time.sleep(0.01)
        started = time.monotonic()
        assert engine.drain(timeout_s=0.5) is False
        assert 0.5 <= time.monotonic() - started < 5
        thread.join(timeout=30)
        assert str(outcome["error"]).startswith(f"{SHUTTING_DOWN}: the request did not finish within the drain "
                                                "deadline (0.5 s)")
        assert engine.call(engine.engine.stats).result().kv_blocks_used == 0  # stats() refuses while draining
    finally:
        engine.shutdown()


def http_completion(base: str, model: str, out: dict[str, Any]) -> None:
    body = {"model": model, "prompt": "Hello", "max_tokens": LONG, "ignore_eos": True}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    out["http"] = (response.status_code, response.headers.get("content-type"), response.text)


def http_stream(base: str, model: str, out: dict[str, Any], first_token: threading.Event) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": LONG,
            "ignore_eos": True, "stream": True}
    events: list[str] = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                first_token.set()
    out["sse"] = (response.status_code, response.headers.get("content-type"), events)


def grpc_generate(target: str, model: str, out: dict[str, Any]) -> None:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = pb_grpc.GenerationServiceStub(channel).Generate(
                build_request(model, "Hello", max_new_tokens=LONG, ignore_eos=True), timeout=120)
            out["grpc"] = (grpc.StatusCode.OK, reply.usage.completion_tokens)
        except grpc.RpcError as err:
            out["grpc"] = (err.code(), err.details())


def test_ctrl_c_with_requests_longer_than_the_drain_deadline(demo_dir: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    proc, lines = start("--model", str(demo_dir), "--engine", "local", "--drain-timeout", str(DRAIN_S),
                        "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port",
                        str(free_port()))
    model, base = demo_dir.name, f"http://127.0.0.1:{http_port}"
    out: dict[str, Any] = {}
    first_token = threading.Event()
    clients = [threading.Thread(target=http_completion, args=(base, model, out)),
               threading.Thread(target=http_stream, args=(base, model, out, first_token)),
               threading.Thread(target=grpc_generate, args=(f"127.0.0.1:{grpc_port}", model, out))]
    try:
        for client in clients:
            client.start()
        assert first_token.wait(timeout=60), "the stream never started"
        time.sleep(0.5)  # the other two are running too by now
        proc.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        for client in clients:
            client.join(timeout=60)
        answered = time.monotonic() - interrupted
        assert proc.wait(timeout=45) == 0
        exited = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "shutting down" in lines

    cut = 0
    status, content_type, text = out["http"]  # non-streamed: the completion, or a 503 OpenAI error JSON
    assert content_type == "application/json", text
    if status == 200:
        assert json.loads(text)["usage"]["completion_tokens"] == LONG
    else:
        cut += 1
        assert status == 503, text
        error = json.loads(text)["error"]
        assert error["message"].startswith(SHUTTING_DOWN) and error["code"] == "server_shutting_down"
        assert error["type"] == "service_unavailable"

    status, content_type, events = out["sse"]  # streamed: 200 and events, the last two an error and [DONE]
    assert status == 200 and content_type.startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    if "error" in last:
        cut += 1
        assert last["error"]["message"].startswith(SHUTTING_DOWN), last
        assert last["error"]["code"] == "server_shutting_down"
        tokens = sum(1 for event in events[:-2] if json.loads(event)["choices"][0]["delta"].get("content"))
        assert 0 < tokens < LONG
    else:
        assert last["choices"][0]["finish_reason"] == "length"

    code, detail = out["grpc"]  # gRPC: the reply, or UNAVAILABLE
    if code == grpc.StatusCode.OK:
        assert detail == LONG
    else:
        cut += 1
        assert code == grpc.StatusCode.UNAVAILABLE and detail.startswith(SHUTTING_DOWN), (code, detail)

    # The requests did outlast the drain deadline (else this test shows nothing), and were answered soon after.
    assert cut >= 1, f"every request finished within {DRAIN_S} s; make them longer"
    assert DRAIN_S <= answered < DRAIN_S + 10, answered
    assert exited < DRAIN_S + 30, exited


@pytest.mark.slow
def test_without_the_drain_call_a_killed_engine_is_still_a_clean_503(demo_dir: Path) -> None:
    """Shutdown started by Serve alone (``serve.delete``, a redeploy): nothing tells the engines to drain, and
    Serve kills an engine replica at its grace period with requests running; the ingress outlives it and
    answers them with a retryable 503 (a JSON error, or an error event in the stream)."""
    import ray
    from ray import serve

    from router_service.app import build_app

    if ray.is_initialized():
        ray.shutdown()
    http_port = free_port()
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        settings = {"model": str(demo_dir), "served_model_name": "m", "engine": "local", "drain_timeout_s": 1}
        serve.run(build_app(settings), name="drain-test", route_prefix="/")
        base, first_token = f"http://127.0.0.1:{http_port}", threading.Event()
        out: dict[str, Any] = {}
        clients = [threading.Thread(target=http_completion, args=(base, "m", out)),
                   threading.Thread(target=http_stream, args=(base, "m", out, first_token))]
        for client in clients:
            client.start()
        assert first_token.wait(timeout=60), "the stream never started"
        time.sleep(0.5)
        started = time.monotonic()
        serve.delete("drain-test")
        for client in clients:
            client.join(timeout=60)
        grace = AppSettings.from_args(settings).engine_grace_s
        assert time.monotonic() - started < grace + 10
    finally:
        serve.shutdown()
        ray.shutdown()
    status, content_type, text = out["http"]
    assert (status, content_type) == (503, "application/json"), text
    assert json.loads(text)["error"]["code"] == "engine_unavailable"
    status, content_type, events = out["sse"]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "engine_unavailable"


# ------------------------------------------------------------------ Ctrl-C on the cluster engine (a shared expert pool)

FULL = 300  # tokens per request: several seconds each on the demo model with four running (more on a busy machine)
ROOMY_DRAIN_S = 120.0  # the drain deadline: long enough for every request to finish, however busy the machine


def listeners_of(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP listener of the processes ``pids``."""
    import psutil

    found = []
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            with contextlib.suppress(psutil.Error):
                found.append((conn.laddr.ip, conn.laddr.port, psutil.Process(conn.pid).name()))
    return found


def loopback(address: str) -> bool:
    return ipaddress.ip_address(address.removeprefix("::ffff:")).is_loopback


def late_request(base: str, model: str, deadline_s: float) -> httpx.Response:
    """After Ctrl-C: tiny requests until one is refused (those before the drain starts are answered)."""
    deadline = time.monotonic() + deadline_s
    while True:
        response = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1},
                              timeout=60)
        if response.status_code != 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def full_stream(base: str, model: str, out: dict[str, Any], key: str, started: threading.Event) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": FULL,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
                started.set()
    out[key] = (response.status_code, events)


def full_completion(base: str, model: str, out: dict[str, Any], key: str) -> None:
    body = {"model": model, "prompt": "Hello", "max_tokens": FULL, "ignore_eos": True}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=300)
    out[key] = (response.status_code, response.json() if response.headers.get("content-type") ==
                "application/json" else response.text)


def ctrl_c_drains_a_shared_pool(demo_dir: Path, num_engines: int) -> None:
    import psutil

    ports = {"HTTP (--http-port)": free_port(), "gRPC (--grpc-port)": free_port(),
             "metrics (--metrics-port)": free_port()}
    http_port, grpc_port, metrics_port = ports.values()
    proc, lines = start("--model", str(demo_dir), "--num-engines", str(num_engines), "--drain-timeout",
                        str(ROOMY_DRAIN_S), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                        "--metrics-port", str(metrics_port), ready_timeout_s=480)  # the cluster engine, one pool
    model, base = demo_dir.name, f"http://127.0.0.1:{http_port}"
    out: dict[str, Any] = {}
    streams_started = [threading.Event(), threading.Event()]
    clients = [threading.Thread(target=full_completion, args=(base, model, out, f"unary{i}")) for i in range(2)]
    clients += [threading.Thread(target=full_stream, args=(base, model, out, f"stream{i}", streams_started[i]))
                for i in range(2)]
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        # A default start listens on loopback only: the API, gRPC, metrics and every one of Ray's own servers.
        listeners = listeners_of({p.pid for p in tree})
        assert {http_port, grpc_port, metrics_port} <= {port for _, port, _ in listeners}, listeners
        assert all(loopback(address) for address, _, _ in listeners), [x for x in listeners if not loopback(x[0])]
        # A second server on any of these ports refuses to start, naming it (before it starts anything); the
        # three tries run at once (each is a fresh interpreter importing torch and Ray).
        seconds = {}
        for what, port in ports.items():
            others = {name: free_port() for name in ports} | {what: port}
            seconds[what] = subprocess.Popen([sys.executable, "-m", "router_service.cli", "serve", "--model",
                                              str(demo_dir), "--http-port", str(others["HTTP (--http-port)"]),
                                              "--grpc-port", str(others["gRPC (--grpc-port)"]),
                                              "--metrics-port", str(others["metrics (--metrics-port)"])],
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for what, second in seconds.items():
            _, stderr = second.communicate(timeout=120)
            assert second.returncode == 1, stderr
            assert f"{what} port {ports[what]} on 127.0.0.1 is in use" in stderr, stderr

        for client in clients:
            client.start()
        assert all(started.wait(timeout=120) for started in streams_started), "the streams never started"
        time.sleep(0.5)  # the two unary requests are running too by now
        assert all(client.is_alive() for client in clients), f"a request finished before Ctrl-C: {out}"
        proc.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        refused = late_request(base, model, deadline_s=30)  # a request that arrives during the drain
        for client in clients:
            client.join(timeout=ROOMY_DRAIN_S + 30)
        answered = time.monotonic() - interrupted
        assert proc.wait(timeout=ROOMY_DRAIN_S + 30) == 0
        exited = time.monotonic() - interrupted
        _, alive = psutil.wait_procs(tree, timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not alive, f"left behind: {[p.pid for p in alive]}"
    assert "shutting down" in lines

    assert (refused.status_code, refused.headers.get("content-type")) == (503, "application/json"), refused.text
    assert refused.headers.get("retry-after")
    error = refused.json()["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "service_unavailable", error
    assert error["message"].startswith(SHUTTING_DOWN)

    for i in range(2):  # every running request finished with its whole output
        status, body = out[f"unary{i}"]
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == FULL and body["choices"][0]["finish_reason"] == "length"
        status, events = out[f"stream{i}"]
        assert status == 200 and not any("error" in e for e in events), events[-3:]
        assert events[-1]["usage"]["completion_tokens"] == FULL
        assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "length"
        assert sum(len(e["choices"][0]["delta"].get("content") or "") > 0 for e in events[:-1]) > 0

    # Exit soon after the last answer (not at the drain deadline), every port free again.
    assert answered < ROOMY_DRAIN_S, answered
    assert exited < answered + 20, (answered, exited)
    check_ports_free("127.0.0.1", ports)


@pytest.mark.timeout(900)  # a shared, busy machine: starting the cluster engine alone can take minutes
def test_ctrl_c_with_two_engines_on_one_pool_finishes_every_request_then_stops_the_pool(demo_dir: Path) -> None:
    ctrl_c_drains_a_shared_pool(demo_dir, num_engines=2)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_with_one_engine_on_the_pool_finishes_every_request(demo_dir: Path) -> None:
    ctrl_c_drains_a_shared_pool(demo_dir, num_engines=1)
