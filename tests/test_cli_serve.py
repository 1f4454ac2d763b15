"""`moe-cluster serve` as a user runs it: a real subprocess, real ports, Ctrl-C / SIGTERM."""

from __future__ import annotations

import importlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from router_service.serve_config import DEFAULT_CONFIG
from tests.serving.conftest import free_port


def start(*args: str, env: dict[str, str] | None = None, ready_timeout_s: float = 300
          ) -> tuple[subprocess.Popen[str], list[str]]:
    stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115  (outlives this call: read if the server fails to start)
    proc = subprocess.Popen([sys.executable, "-m", "router_service.cli", "--log-level", "WARNING", "serve", *args],
                            stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env=None if env is None else os.environ | env)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + ready_timeout_s  # a busy (shared) 2-core machine takes minutes to start Ray
    while not any(line.startswith("moe-cluster ready") for line in lines):
        if proc.poll() is not None:
            stderr.seek(0)
            raise AssertionError(f"serve exited early: {lines}; stderr ends: {stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no ready line: {lines}"
        time.sleep(0.2)
    return proc, lines


def test_serve_with_a_config_file_prints_urls_answers_and_drains_on_sigterm(demo_dir: Path, tmp_path: Path
                                                                            ) -> None:
    """One server (they take a while to start) for the whole life cycle: a serve.yaml of the user's with the flags
    on top, the ready lines, the API key, answers, then SIGTERM drains a running request and frees the ports."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    app_args = config["applications"][0]["args"]
    app_args.update(model=str(demo_dir), served_model_name="from-config", engine="local")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    http, grpc_port, metrics = free_port(), free_port(), free_port()
    key = secrets.token_hex(16)
    proc, lines = start("--config", str(path), "--http-port", str(http), "--grpc-port", str(grpc_port),
                        "--metrics-port", str(metrics), "--api-key-env", "TEST_SERVE_KEY",
                        env={"TEST_SERVE_KEY": key})
    auth = {"Authorization": f"Bearer {key}"}
    try:
        assert f"HTTP (OpenAI API): http://127.0.0.1:{http}/v1  (model 'from-config')" in lines
        assert f"gRPC (moe_cluster.v1.GenerationService): 127.0.0.1:{grpc_port}" in lines
        base = f"http://127.0.0.1:{http}"
        assert httpx.get(f"{base}/v1/models", timeout=60).status_code == 401
        models = httpx.get(f"{base}/v1/models", timeout=60, headers=auth).json()
        assert [m["id"] for m in models["data"]] == ["from-config"]
        quick = httpx.post(f"{base}/v1/completions", timeout=60, headers=auth,
                           json={"model": "from-config", "prompt": "Hello", "max_tokens": 4})
        assert quick.status_code == 200
        # A chat request without max_tokens asks for the rest of the context (as with vLLM): the bundled sizing
        # holds one such sequence, so it is answered, not refused.
        chat = httpx.post(f"{base}/v1/chat/completions", timeout=300, headers=auth,
                          json={"model": "from-config", "messages": [{"role": "user", "content": "Hello"}]})
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert chat.json()["usage"]["completion_tokens"] >= 1
        in_flight: dict[str, httpx.Response] = {}
        body = {"model": "from-config", "prompt": "Hello", "max_tokens": 300, "ignore_eos": True}
        request = threading.Thread(target=lambda: in_flight.setdefault(
            "r", httpx.post(f"{base}/v1/completions", json=body, headers=auth, timeout=120)))
        request.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        request.join(timeout=120)
        assert in_flight["r"].status_code == 200  # drained: the running request finished
        assert in_flight["r"].json()["usage"]["completion_tokens"] == 300
        assert proc.wait(timeout=120) == 0
        assert "shutting down" in lines
    finally:
        if proc.poll() is None:
            proc.kill()
    # The ports are free again: nothing was left behind.
    for port in (http, grpc_port):
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
            raise AssertionError(f"port {port} still answers")
        except httpx.TransportError:
            pass


def test_api_key_env_must_be_set(demo_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "UNSET_SERVE_KEY"}
    done = subprocess.run([sys.executable, "-m", "router_service.cli", "serve", "--model", str(demo_dir),
                           "--api-key-env", "UNSET_SERVE_KEY"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "UNSET_SERVE_KEY" in done.stderr and "Traceback" not in done.stderr


def test_default_serve_config_is_a_valid_serve_deploy_file() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    parsed = ServeDeploySchema.model_validate(config)
    # What the schema does not check, and `serve deploy` only finds out on the cluster: every name Serve will
    # import (the gRPC proxy's servicer functions, each application's builder) resolves to a callable.
    assert parsed.grpc_options is not None and parsed.grpc_options.grpc_servicer_functions
    assert parsed.applications
    for name in [*parsed.grpc_options.grpc_servicer_functions, *(app.import_path for app in parsed.applications)]:
        module, _, attr = name.replace(":", ".").rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr, None)), name
