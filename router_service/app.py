"""The Serve application: ``build_app`` is the import path of the Serve config (``router_service.app:build_app``),
used by ``serve deploy``, ``moe-cluster serve`` and the KubeRay RayService alike."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from router_service.engine_deployment import SHUTDOWN_WAIT_LOOP_S, build_engine_deployment
from router_service.ingress import Ingress
from router_service.pool_deployment import build_pool_deployment
from router_service.settings import AppSettings


def build_app(args: dict[str, Any]) -> Application:
    settings = AppSettings.from_args(args)
    # The cluster engine: one expert pool for the app, every engine replica a coordinator attached to it.
    pool = build_pool_deployment(settings).bind(settings) if settings.engine == "cluster" else None
    engine = build_engine_deployment(settings).bind(settings, pool)
    # The ingress outlives the engine replicas' grace period, so every request ends as an answer or a clean error.
    ingress_options: dict[str, Any] = {"max_queued_requests": settings.max_queued_requests,
                                       "graceful_shutdown_timeout_s": settings.ingress_grace_s,
                                       "graceful_shutdown_wait_loop_s": SHUTDOWN_WAIT_LOOP_S}
    if settings.ingress_autoscaling:
        ingress_options["autoscaling_config"] = settings.ingress_autoscaling
    else:
        ingress_options["num_replicas"] = settings.ingress_replicas
    ingress: Any = Ingress  # a Serve Deployment (the decorator's type is not visible to mypy)
    return ingress.options(**ingress_options).bind(engine, settings)
