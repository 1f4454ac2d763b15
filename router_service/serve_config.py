"""The Serve config file (``configs/serve.yaml``, or --config FILE) that ``moe-cluster serve``, ``serve deploy`` and
the Kubernetes manifests share, and the command-line flags applied on top of it."""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
from typing import Any

import yaml

from router_service.engine_flags import apply_engine_flags

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


def ensure_trained_demo(model_dir: Path) -> None:
    """The default model: the trained demo, copied to ``model_dir`` when it is missing there or is another one (a
    random demo an earlier version wrote, or an older training run)."""
    from cluster.model.demo import copy_trained_demo, is_trained_demo

    if is_trained_demo(model_dir):
        return
    if (model_dir / "config.json").exists():
        log.info("no model given: replacing the checkpoint in %s (not this version's trained demo) with the "
                 "trained demo", model_dir)
    else:
        log.info("no model given: copying the trained demo checkpoint to %s", model_dir)
    copy_trained_demo(model_dir, overwrite=True)


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The Serve config to deploy: the file's, with the command-line flags applied on top."""
    config = copy.deepcopy(load_serve_config(Path(args.config) if args.config else DEFAULT_CONFIG))
    app = config["applications"][0]
    app_args = app.setdefault("args", {})
    from cluster.model.hub import is_hub_id, resolve_model, served_name

    if args.model:
        app_args["model"] = str(Path(resolve_model(args.model)).resolve())
        if not args.config:  # a Hub id serves under its id (as vLLM does), a directory under its name
            app_args["served_model_name"] = served_name(args.model)
    if not args.model and is_hub_id(str(app_args.get("model", ""))):
        # A Hub id in the config file stays an id: every process of the app resolves it in its own cache (as on a
        # KubeRay cluster, which deploys this same file); fetched here first, so that a bad id fails at start.
        model_dir = Path(resolve_model(str(app_args["model"])))
    else:
        model_dir = Path(str(app_args.get("model", DEMO_DIR))).expanduser()
        if model_dir == DEMO_DIR and not args.model:
            ensure_trained_demo(model_dir)
        elif not (model_dir / "config.json").exists():
            raise ValueError(f"model directory {str(model_dir)!r} has no config.json")
        app_args["model"] = str(model_dir)
    if args.engine:
        app_args["engine"] = args.engine
    if args.num_engines:
        app_args["num_engines"] = args.num_engines
    if getattr(args, "engine_routing", None):
        app_args["engine_routing"] = args.engine_routing
    if args.drain_timeout is not None:
        app_args["drain_timeout_s"] = args.drain_timeout
    if args.experts_per_worker:
        app_args.setdefault("pool_options", {})["experts_per_worker"] = args.experts_per_worker
    elif not args.config and app_args.get("engine", "cluster") == "cluster" and getattr(args, "auto_shape", True) \
            and not args.address:
        apply_planned_shape(app_args, model_dir)
    if args.redundant_experts is not None:
        app_args.setdefault("pool_options", {})["redundant_experts"] = args.redundant_experts
    if args.rebalance_interval_s is not None:
        app_args.setdefault("pool_options", {})["rebalance_interval_s"] = args.rebalance_interval_s
    for flag in ("expert_cache_size", "expert_prefetch_lookahead"):  # issue 23
        if getattr(args, flag, None) is not None:
            app_args.setdefault("pool_options", {})[flag] = getattr(args, flag)
    apply_engine_flags(args, app_args)
    if args.quantize_experts:
        app_args.setdefault("engine_options", {})["quantize_experts"] = args.quantize_experts
    if args.quantize_group_size:
        app_args.setdefault("engine_options", {})["quantize_group_size"] = args.quantize_group_size
    if args.log_requests:
        app_args["log_requests"] = True
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


def check_kv_budget(app_args: dict[str, Any]) -> None:
    """Refuse, before anything starts, engine options whose KV cache (given in GiB) cannot hold one max_model_len
    sequence, with the numbers and the flags that fix it. An engine sized from a fraction of free memory is
    checked by the engine itself once its weights are loaded (cluster.engine.loader.kv_cache_blocks)."""
    from cluster.engine.loader import engine_dtype, kv_cache_blocks
    from cluster.engine.validation import resolve_max_model_len
    from cluster.engine_config import EngineConfig
    from cluster.model.config import ModelConfig

    cfg = EngineConfig.from_dict({"model": app_args["model"]} | (app_args.get("engine_options") or {}))
    if cfg.kv_cache_gib is None or cfg.num_kv_blocks is not None:
        return
    model_cfg = ModelConfig.from_file(cfg.model_dir())
    kv_cache_blocks(model_cfg, cfg, engine_dtype(model_cfg, cfg), None, resolve_max_model_len(model_cfg, cfg))
# The pool and coordinator fields a plan sets when ``serve`` runs the bundled config without shape flags.
PLANNED_POOL_FIELDS = ("experts_per_worker", "worker_num_cpus", "threads_per_worker", "worker_omp_wait_policy",
                       "use_gpus", "worker_num_gpus")
PLANNED_CLUSTER_FIELDS = ("coordinator_threads", "coordinator_omp_wait_policy", "micro_batches", "use_gpus",
                          "coordinator_num_gpus", "link")
PLANNED_APP_FIELDS = ("stream_chunks_per_s",)


def apply_planned_shape(app_args: dict[str, Any], model_dir: Path) -> None:
    """The bundled config's shape (one expert per worker) replaced by ``moe-cluster plan``'s for this machine: on
    a CPU node no more busy processes than cores; on GPUs one worker per GPU, the coordinator beside one."""
    from cluster.model.config import ModelConfig
    from cluster.planning.hardware import local_hardware
    from cluster.planning.plan import plan_cpus, plan_gpus

    hardware = local_hardware()
    cfg = ModelConfig.from_file(model_dir)
    plan = (plan_gpus if hardware.kind == "gpu" else plan_cpus)(cfg, hardware)
    pool = app_args.setdefault("pool_options", {})
    cluster = app_args.setdefault("cluster_options", {})
    pool.update({k: v for k, v in plan.pool_options.items() if k in PLANNED_POOL_FIELDS})
    cluster.update({k: v for k, v in plan.cluster_options.items() if k in PLANNED_CLUSTER_FIELDS})
    for key, value in plan.app_options.items():
        if key in PLANNED_APP_FIELDS:
            app_args.setdefault(key, value)
    log.info("shape from moe-cluster plan for %s: %d expert worker(s) x %s experts, %s thread(s) each, a "
             "coordinator of %s thread(s)%s%s (--experts-per-worker or --config to choose another; --no-auto-shape "
             "for the config's own)", hardware.describe(), len(plan.workers), pool["experts_per_worker"],
             plan.threads["worker"], plan.threads["coordinator"],
             ", idle threads passive" if pool.get("worker_omp_wait_policy") == "passive" else "",
             f", streams at most {app_args['stream_chunks_per_s']:g} chunks/s" if "stream_chunks_per_s" in app_args
             else "")
