"""Where `moe-cluster serve` listens (router_service/listeners.py) and what its console prints (console.py), without
a server: a real socket in the way, a real gRPC server, the stats line from real engine counters."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from router_service.console import Sample, stats_line
from router_service.listeners import check_ports_free, is_loopback
from tests.serving.conftest import free_port


@pytest.mark.parametrize("reuse_port", [False, True])
def test_a_port_in_use_is_an_error_naming_it_even_with_so_reuseport(reuse_port: bool) -> None:
    """Serve's proxies bind with SO_REUSEPORT: the check must not share the port with such a listener either."""
    with socket.socket() as other:
        if reuse_port:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("0.0.0.0", 0))
        other.listen()
        port = other.getsockname()[1]
        free = free_port()
        with pytest.raises(ValueError, match=rf"^gRPC \(--grpc-port\) port {port} on 127.0.0.1 is in use"):
            check_ports_free("127.0.0.1", {"HTTP (--http-port)": free, "gRPC (--grpc-port)": port})
    check_ports_free("127.0.0.1", {"HTTP (--http-port)": free, "gRPC (--grpc-port)": port})  # free again


def test_serve_refuses_a_port_in_use_before_it_starts_anything(demo_dir: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "router_service.cli", "serve", "--model", str(demo_dir),
                               "--metrics-port", str(port), "--http-port", str(free_port()),
                               "--grpc-port", str(free_port())], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().endswith(f"metrics (--metrics-port) port {port} on 127.0.0.1 is in use (Address "
                                        "already in use); is another server running? Stop it or choose another port")
    assert "Traceback" not in done.stderr and "Started a local Ray" not in done.stderr


def test_loopback_hosts() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com"]))


def test_the_ray_worker_hook_binds_wildcard_grpc_servers_to_the_host() -> None:
    """In a fresh interpreter (the hook patches grpc for the whole process, as in a Ray worker): a server asking
    for [::] listens on the host, one asking for an address keeps it."""
    code = """
import asyncio, json, os, psutil
os.environ["MOE_CLUSTER_GRPC_HOST"] = "127.0.0.1"
from router_service.listeners import bind_serve_grpc_to_host
bind_serve_grpc_to_host()
import grpc.aio
async def main():
    server = grpc.aio.server()
    ports = [server.add_insecure_port("[::]:0"), server.add_insecure_port("0.0.0.0:0")]
    await server.start()
    me = os.getpid()
    print(json.dumps(sorted(c.laddr.ip for c in psutil.net_connections("tcp") if c.pid == me
                            and c.laddr.port in ports and c.status == psutil.CONN_LISTEN)))
    await server.stop(None)
asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listening = json.loads(done.stdout)
    assert len(listening) == 2 and all(is_loopback(a.removeprefix("::ffff:")) for a in listening), listening


def test_the_stats_line_reports_throughput_over_the_interval_and_kv_usage() -> None:
    stats = {"num_running": 4, "num_waiting": 1, "kv_blocks_total": 200, "kv_blocks_used": 50,
             "num_preemptions": 0}
    line = stats_line("coordinator-1a2b3c4d", stats, Sample(10.0, 100, 1000), Sample(20.0, 300, 1500))
    assert line == ("coordinator-1a2b3c4d: running 4 reqs, waiting 1 reqs, prompt throughput 20.0 tokens/s, "
                    "generation throughput 50.0 tokens/s, KV cache usage 25.0%, preemptions 0")
    assert "prompt throughput 0.0 tokens/s" in stats_line("e", stats, None, Sample(1.0, 5, 5))


