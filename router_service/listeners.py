"""Where ``moe-cluster serve`` listens: every port it opens is checked free before anything starts (a port in use
is a start-up error naming it, never a port silently shared through SO_REUSEPORT), and an embedded start binds
every listener to ``--host`` - the HTTP API, Serve's gRPC proxy, the metrics exporter and the embedded Ray's own
servers (GCS, raylet, agents, every worker's gRPC server) - loopback by default. Ray has no authentication of its
own (CVE-2023-48022): its ports must not be reachable unless the user opens them (``--host 0.0.0.0``, or a Ray
cluster started with ``ray start --node-ip-address``, as the KubeRay manifests do)."""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

# Read by bind_serve_grpc_to_host in Ray's worker processes (set through the embedded Ray's runtime_env).
GRPC_HOST_ENV = "MOE_CLUSTER_GRPC_HOST"
# Ray resolves a loopback node address to the machine's outside address unless this is "0" (then
# services.get_node_ip_address() is loopback and Ray's C++ servers bind it). Read when ray is first imported.
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "[::]")


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Raise ValueError naming the first of ``ports`` ({what: port}) that something already listens on at
    ``host`` (a listener on the same port of any address counts). The probe sets SO_REUSEADDR, as the servers do,
    so a port whose last connections are in TIME_WAIT is free; it never sets SO_REUSEPORT, so another server's
    listener, with or without it, is a conflict."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    for what, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host.strip("[]"), port))
            except OSError as err:
                raise ValueError(f"{what} port {port} on {host} is in use ({err.strerror}); is another server "
                                 f"running? Stop it or choose another port") from None


def embedded_ray_options(host: str) -> dict[str, Any]:
    """ray.init options (and the environment variable set before ray is imported) that bind the embedded Ray's
    listeners and Serve's gRPC proxy to ``host``; must be called before ``import ray``."""
    # Serve's proxies bind with SO_REUSEPORT by default: a second server on the same port would share it (the
    # kernel splitting connections between the two) instead of failing.
    env_vars = {GRPC_HOST_ENV: host, "SERVE_SOCKET_REUSE_PORT_ENABLED": "0"}
    options: dict[str, Any] = {"runtime_env": {"env_vars": env_vars,
                                               "worker_process_setup_hook": f"{__name__}.bind_serve_grpc_to_host"}}
    if is_loopback(host):
        os.environ[RAY_LOOPBACK_ENV] = "0"  # inherited by Ray's processes
        options["_node_ip_address"] = "127.0.0.1"
    elif not is_wildcard(host):
        options["_node_ip_address"] = host
    # (a wildcard host: Ray's default, the machine's outside address, and every interface for its servers)
    return options


def bind_serve_grpc_to_host() -> None:
    """Ray worker process setup hook: Serve's gRPC servers listen on ``[::]:<port>`` (hard-coded in Ray 2.x: the
    proxy's gRPC API, each replica's inter-deployment server); in this process, every gRPC server that asks for
    the wildcard address gets the host of ``moe-cluster serve --host`` instead. (Patching grpc itself keeps this
    cheap: Serve's modules are not imported into processes that do not use them.)"""
    host = os.environ.get(GRPC_HOST_ENV)
    if not host or is_wildcard(host):
        return
    from grpc import _server as sync_server
    from grpc.aio import _server as aio_server

    bound = f"[{host.strip('[]')}]" if ":" in host.strip("[]") else host
    for server_class in (aio_server.Server, sync_server._Server):
        for method in ("add_insecure_port", "add_secure_port"):
            setattr(server_class, method, _on_host(getattr(server_class, method), bound))


def _on_host(add_port: Any, bound: str) -> Any:
    def add_port_on_host(self: Any, address: str, *args: Any) -> Any:
        where, _, port = address.rpartition(":")
        return add_port(self, f"{bound}:{port}" if is_wildcard(where) else address, *args)

    return add_port_on_host
