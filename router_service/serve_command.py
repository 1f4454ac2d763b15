"""``moe-cluster serve``: deploy the Serve app (defaults from configs/serve.yaml, or --config FILE) on an
embedded local Ray or an existing cluster, print where it listens, and shut down cleanly on Ctrl-C/SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from cluster.errors import ClusterStartError
from router_service.serve_config import check_kv_budget, resolve_config

log = logging.getLogger("moe_cluster.serve")


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextlib.contextmanager
def dropped(logger_name: str, *prefixes: str) -> Iterator[None]:
    """Within the block, the logger ``logger_name`` drops the records that start with one of ``prefixes``."""
    log_filter = DropMessages(*prefixes)
    logger = logging.getLogger(logger_name)
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)


def begin_drain(app_name: str, drain_timeout_s: float) -> None:
    """Start the drain deadline on every engine replica now (EngineDeployment.begin_drain). Serve's own shutdown,
    which deleting the app starts, calls nothing on a replica until its running requests are done; without this
    call, a request still running at the engine's grace period is cut by Serve's kill (a 503 all the same)."""
    from ray import serve

    from cluster.errors import describe_failure
    from router_service.engine_deployment import DEPLOYMENT_NAME

    log.info("shutting down: running requests have %gs to finish", drain_timeout_s)
    try:  # (a new handle's router logs "Started <...SharedRouterLongPollClient object at 0x...>": noise here)
        with dropped("ray.serve", "Started <ray.serve._private.router."):
            serve.get_deployment_handle(DEPLOYMENT_NAME, app_name).broadcast("begin_drain").results(timeout_s=10)
    except Exception as err:
        log.warning("could not start the drain on the engine replicas (%s); Serve's grace period still bounds "
                    "the shutdown", describe_failure(err))


def serve_command(args: argparse.Namespace) -> int:
    import os

    import ray
    from ray import serve

    from router_service.app import build_app
    from router_service.client import key_from_env
    from router_service.settings import AppSettings

    config = resolve_config(args)
    app_cfg = config["applications"][0]
    settings = AppSettings.from_args(app_cfg["args"])  # validate before starting anything
    check_kv_budget(app_cfg["args"])  # a KV cache too small for one max_model_len sequence: refuse now
    if args.api_key:
        os.environ["MOE_CLUSTER_API_KEY"] = args.api_key  # inherited by the Ray workers this process starts
    elif args.api_key_env:
        key_from_env(args.api_key_env)  # the replicas read it; fail here, before anything starts
    started_ray = not ray.is_initialized()
    embedded = started_ray and not args.address  # a local Ray of our own, gone when we stop
    if started_ray:
        if args.address:
            ray.init(address=args.address, log_to_driver=False)
        else:
            # Embedded and single-node: Ray's node address is loopback, so what Ray binds to it stays local.
            ray.init(address="local", include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                     num_cpus=max(os.cpu_count() or 1, 16), _metrics_export_port=args.metrics_port)
    app_name = app_cfg.get("name", "moe-cluster")
    deployed = False
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        http, grpc = config["http_options"], config.get("grpc_options", {})
        serve.start(http_options={k: v for k, v in http.items() if k in ("host", "port", "request_timeout_s")},
                    grpc_options=grpc)
        log.info("deploying %s (%s engine, %d engine replica(s))", settings.model_name, settings.engine,
                 settings.num_engines)
        # serve.run connects to the Serve that serve.start just started with our options, and says so in a line
        # ("Connecting to existing Serve app ... New http_options ... will not be applied") that reads as if
        # they were lost: it is about options serve.run was not given, so it is dropped.
        with dropped("ray.serve", "Connecting to existing Serve app"):
            serve.run(build_app(app_cfg["args"]), name=app_name, route_prefix=app_cfg.get("route_prefix", "/"),
                      blocking=False)
        deployed = True
        print(f"HTTP (OpenAI API): http://{http['host']}:{http['port']}/v1  (model {settings.model_name!r})")
        print(f"gRPC (moe_cluster.v1.GenerationService): {http['host']}:{grpc.get('port', 9000)}")
        if embedded:
            print(f"metrics (Prometheus): http://127.0.0.1:{args.metrics_port}/metrics")
        print("moe-cluster ready; Ctrl-C to stop", flush=True)
        while not stop.wait(1.0):
            pass
        print("shutting down", flush=True)
    except ClusterStartError:
        raise
    finally:
        try:
            # Start the one drain deadline on the engine replicas, then delete the app: Serve routes nothing new
            # to its replicas and waits for their running requests (the engines' grace: the deadline plus time
            # to fail what is left; the ingress's: longer), while the proxies still carry the responses; then
            # stop Serve and Ray.
            if deployed:
                begin_drain(app_name, settings.drain_timeout_s)
            serve.delete(app_name)
            if not embedded:
                serve.shutdown()  # an embedded Ray's shutdown below takes Serve with it
        finally:
            if started_ray:
                ray.shutdown()
    return 0
