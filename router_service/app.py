"""The Serve application: ``build_app`` is the import path of the Serve config (``router_service.app:build_app``),
used by ``serve deploy``, ``moe-cluster serve`` and the KubeRay RayService alike."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from router_service.engine_deployment import build_engine_deployment
from router_service.ingress import Ingress
from router_service.settings import AppSettings


def build_app(args: dict[str, Any]) -> Application:
    settings = AppSettings.from_args(args)
    engine = build_engine_deployment(settings).bind(settings)
    ingress_options: dict[str, Any] = {"max_queued_requests": settings.max_queued_requests}
    if settings.ingress_autoscaling:
        ingress_options["autoscaling_config"] = settings.ingress_autoscaling
    else:
        ingress_options["num_replicas"] = settings.ingress_replicas
    ingress: Any = Ingress  # a Serve Deployment (the decorator's type is not visible to mypy)
    return ingress.options(**ingress_options).bind(engine, settings)
