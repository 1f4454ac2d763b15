"""One real Serve app (cluster engine on the demo model) for the HTTP and gRPC tests of this package."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pytest

from cluster.engine.loop import EngineLoop
from cluster.engine_config import EngineConfig
from router_service.serve_config import grpc_servicer_functions

MODEL_NAME = "demo"


class EngineOptions(TypedDict):
    """The EngineConfig fields the served app and the reference engine share."""

    max_num_seqs: int
    max_num_batched_tokens: int
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    max_queue_len: int


LINK_TIMEOUT_S = 6.0  # short, so that the idle test can outlast it cheaply

ENGINE_OPTIONS: EngineOptions = {"max_num_seqs": 32, "max_num_batched_tokens": 512, "num_kv_blocks": 160,
                                 "block_size": 16, "max_model_len": 512, "max_queue_len": 256}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    http: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT
    metrics: str  # http://127.0.0.1:PORT/metrics
    model: str
    reference: EngineLoop  # the same checkpoint in a local engine, for expected results


def app_args(model_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"model": str(model_dir), "served_model_name": MODEL_NAME, "engine": "cluster",
            "engine_options": ENGINE_OPTIONS,
            "cluster_options": {"heartbeat_s": 1.0},
            "pool_options": {"experts_per_worker": 4, "threads_per_worker": 1, "worker_num_cpus": 1,
                             "link_timeout_s": LINK_TIMEOUT_S}} | extra


GRPC_SERVICERS = grpc_servicer_functions()


@pytest.fixture(scope="package")
def served(demo_dir: Path) -> Iterator[Served]:
    import ray
    from ray import serve

    from router_service.app import build_app

    if ray.is_initialized():
        ray.shutdown()
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICERS})
    serve.run(build_app(app_args(demo_dir)), name="moe-cluster", route_prefix="/")
    reference = EngineLoop.local(EngineConfig(model=str(demo_dir), progress=False, **ENGINE_OPTIONS))
    yield Served(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}",
                 f"http://127.0.0.1:{metrics_port}/metrics", MODEL_NAME, reference)
    reference.shutdown()
    serve.shutdown()
    ray.shutdown()
