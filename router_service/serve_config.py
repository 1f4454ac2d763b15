"""The Serve config file (``configs/serve.yaml``, or --config FILE) that ``moe-cluster serve``, ``serve deploy`` and
the Kubernetes manifests share, and the command-line flags applied on top of it."""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("moe_cluster.serve")
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "serve.yaml"
DEMO_DIR = Path("~/.cache/moe-cluster/demo").expanduser()


def load_serve_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read Serve config {path}: {err}") from None
    if not isinstance(config, dict) or not config.get("applications"):
        raise ValueError(f"Serve config {path} has no applications")
    return config


def grpc_servicer_functions() -> list[str]:
    """The gRPC services the app registers with Serve's gRPC proxy (from the shared Serve config)."""
    return list(load_serve_config(DEFAULT_CONFIG)["grpc_options"]["grpc_servicer_functions"])


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The Serve config to deploy: the file's, with the command-line flags applied on top."""
    config = copy.deepcopy(load_serve_config(Path(args.config) if args.config else DEFAULT_CONFIG))
    app = config["applications"][0]
    app_args = app.setdefault("args", {})
    if args.model:
        app_args["model"] = str(Path(args.model).expanduser().resolve())
        if not args.config:
            app_args["served_model_name"] = Path(args.model).name
    model_dir = Path(str(app_args.get("model", DEMO_DIR))).expanduser()
    if not (model_dir / "config.json").exists():
        if args.model or (args.config and model_dir != DEMO_DIR):
            raise ValueError(f"model directory {str(model_dir)!r} has no config.json")
        from cluster.demo import init_demo

        log.info("no model given: writing the demo checkpoint to %s", model_dir)
        init_demo(model_dir)
    app_args["model"] = str(model_dir)
    if args.engine:
        app_args["engine"] = args.engine
    if args.num_engines:
        app_args["num_engines"] = args.num_engines
    if args.drain_timeout is not None:
        app_args["drain_timeout_s"] = args.drain_timeout
    if args.experts_per_worker:
        app_args.setdefault("pool_options", {})["experts_per_worker"] = args.experts_per_worker
    if args.redundant_experts is not None:
        app_args.setdefault("pool_options", {})["redundant_experts"] = args.redundant_experts
    if args.rebalance_interval_s is not None:
        app_args.setdefault("pool_options", {})["rebalance_interval_s"] = args.rebalance_interval_s
    if getattr(args, "chat_template", None):  # its text travels with the config: replicas need no copy of the file
        path = Path(args.chat_template).expanduser()
        if not path.is_file():
            raise ValueError(f"--chat-template {args.chat_template!r}: no such file")
        app_args.setdefault("engine_options", {})["chat_template"] = path.read_text()
    if args.api_key:
        app_args["api_key_env"] = "MOE_CLUSTER_API_KEY"
    elif args.api_key_env:
        app_args["api_key_env"] = args.api_key_env
    config.setdefault("http_options", {}).update({"host": args.host, "port": args.http_port})
    config.setdefault("grpc_options", {})["port"] = args.grpc_port
    return config
