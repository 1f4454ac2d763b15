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
from router_service.console import ConsoleStats
from router_service.listeners import check_ports_free, embedded_ray_options
from router_service.serve_config import check_kv_budget, resolve_config
from router_service.settings import AppSettings

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


def drain(app_name: str, settings: AppSettings) -> None:
    """The ordered shutdown of a running app, before it is deleted: the ingress refuses new requests (a 503
    ``server_shutting_down``, not the proxy's 404 of a deleted app), the engine replicas let their running requests
    finish (up to the one drain deadline, then fail them with the same retryable error) and close, detaching from
    the expert pool, which is still there for them all along. Deleting the app then stops replicas with nothing to
    do, and the pool last (ExpertPoolDeployment waits for attached engines). Without this sequence Serve stops the
    deployments at once and side by side: the pool, which has no request of its own running, first."""
    from ray import serve

    from cluster.errors import describe_failure
    from router_service.engine_deployment import DEPLOYMENT_NAME
    from router_service.ingress import INGRESS_NAME

    log.info("shutting down: running requests have %gs to finish", settings.drain_timeout_s)
    steps = ((INGRESS_NAME, "begin_drain", 10.0),  # new requests: 503 from now on
             (DEPLOYMENT_NAME, "begin_drain", 10.0),  # one drain deadline for every engine replica, now
             (DEPLOYMENT_NAME, "close", settings.engine_grace_s + 10))  # drained, then detached from the pool
    # (a new handle's router logs "Started <...SharedRouterLongPollClient object at 0x...>": noise here)
    with dropped("ray.serve", "Started <ray.serve._private.router."):
        for deployment, method, timeout_s in steps:
            try:
                serve.get_deployment_handle(deployment, app_name).broadcast(method).results(timeout_s=timeout_s)
            except Exception as err:
                log.warning("shutdown: %s.%s failed (%s); Serve's grace periods still bound the shutdown",
                            deployment, method, describe_failure(err))
    log.info("drained; stopping the app")


def serve_command(args: argparse.Namespace) -> int:
    import os

    config = resolve_config(args)
    # Before ray is imported: an embedded Ray reads where to bind its servers from the environment.
    ray_options = embedded_ray_options(args.host) if not args.address else {}

    import ray
    from ray import serve

    from router_service.app import build_app
    from router_service.client import key_from_env

    app_cfg = config["applications"][0]
    settings = AppSettings.from_args(app_cfg["args"])  # validate before starting anything
    check_kv_budget(app_cfg["args"])  # a KV cache too small for one max_model_len sequence: refuse now
    if args.api_key:
        os.environ["MOE_CLUSTER_API_KEY"] = args.api_key  # inherited by the Ray workers this process starts
    elif args.api_key_env:
        key_from_env(args.api_key_env)  # the replicas read it; fail here, before anything starts
    started_ray = not ray.is_initialized()
    embedded = started_ray and not args.address  # a local Ray of our own, gone when we stop
    if embedded:  # every port this start opens, free before anything starts
        check_ports_free(args.host, {"HTTP (--http-port)": args.http_port, "gRPC (--grpc-port)": args.grpc_port,
                                     "metrics (--metrics-port)": args.metrics_port})
    if started_ray:
        if args.address:
            ray.init(address=args.address, log_to_driver=False)
        else:
            # Embedded and single-node: Ray's node address and every listener (Ray's own, Serve's gRPC proxy,
            # the metrics exporter) on --host: loopback unless the user opens it.
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     num_cpus=max(os.cpu_count() or 1, 16), _metrics_export_port=args.metrics_port,
                     **ray_options)
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
            print(f"metrics (Prometheus): http://{args.host}:{args.metrics_port}/metrics")
        print("moe-cluster ready; Ctrl-C to stop", flush=True)
        ConsoleStats(app_name, args.stats_interval, settings.log_requests, stop).start()
        while not stop.wait(1.0):
            pass
        print("shutting down", flush=True)
    except ClusterStartError:
        raise
    finally:
        try:
            # Drain (above), then delete the app: Serve waits for what the ingress still sends (its grace period
            # outlasts the engines'), while the proxies carry the responses; then stop Serve and Ray.
            if deployed:
                drain(app_name, settings)
            serve.delete(app_name)
            if not embedded:
                serve.shutdown()  # an embedded Ray's shutdown below takes Serve with it
        finally:
            if started_ray:
                ray.shutdown()
    return 0
