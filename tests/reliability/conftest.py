"""A Serve instance with three apps: "guarded" (local engine, API key on, a 16 KiB body limit, a 2-deep queue),
"pair" (two independent cluster-engine replicas) and "affine" (two local-engine replicas behind prefix-aware
routing)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from router_service.serve_config import grpc_servicer_functions
from tests.serving.conftest import app_args, free_port

KEY_ENV = "MOE_CLUSTER_TEST_API_KEY"
MAX_REQUEST_BYTES = 16384  # the guarded app's body limit


@dataclass
class Apps:
    http: str
    grpc: str
    metrics: str
    api_key: str

    def url(self, app: str, path: str) -> str:
        return f"{self.http}/{app}{path}"


@pytest.fixture(scope="package")
def apps(demo_dir: Path) -> Iterator[Apps]:
    import ray
    from ray import serve

    from router_service.app import build_app

    if ray.is_initialized():
        ray.shutdown()
    key = secrets.token_urlsafe(24)
    os.environ[KEY_ENV] = key  # inherited by the Ray workers started below (and nowhere else)
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": grpc_servicer_functions()})
    guarded = app_args(demo_dir, engine="local", api_key_env=KEY_ENV, served_model_name="guarded",
                       max_request_bytes=MAX_REQUEST_BYTES,
                       engine_options={"max_num_seqs": 2, "max_queue_len": 2, "num_kv_blocks": 64,
                                       "max_model_len": 512})
    pair = app_args(demo_dir, served_model_name="pair", num_engines=2)
    serve.run(build_app(guarded), name="guarded", route_prefix="/guarded")
    affine = app_args(demo_dir, engine="local", served_model_name="affine", num_engines=2,
                      engine_routing="prefix_affinity")
    serve.run(build_app(pair), name="pair", route_prefix="/pair")
    serve.run(build_app(affine), name="affine", route_prefix="/affine")
    yield Apps(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics",
               key)
    serve.shutdown()
    ray.shutdown()
    del os.environ[KEY_ENV]
