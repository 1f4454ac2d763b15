"""The expert pool's admin call behind ``POST /scale_expert_pool`` (the elastic pool, workers/pool.py ``resize``):
the body checked, the pool deployment asked, its refusals mapped to HTTP errors. The ingress only routes here."""

from __future__ import annotations

import time
from typing import Any

from ray import serve
from ray.exceptions import RayTaskError

from cluster.errors import ClusterStartError, PoolBusyError, PoolSizeError, first_line
from router_service.errors import RETRY_AFTER_S, ApiError
from router_service.pool_deployment import POOL_DEPLOYMENT


def requested_size(body: Any) -> int:
    """``{"num_workers": N}`` -> N, or a 400 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object like {{\"num_workers\": 4}}, got {body!r:.100}")
    unknown = sorted(set(body) - {"num_workers"})
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}; the body takes only num_workers", param=unknown[0])
    size = body.get("num_workers")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ApiError(400, f"num_workers must be an integer >= 1, got {size!r}", param="num_workers")
    return size


def resize_error(err: BaseException) -> ApiError:
    """What the pool refused or what failed, as an HTTP error; in every case the pool kept its map."""
    cause: BaseException = err
    while isinstance(cause, RayTaskError) and isinstance(cause.cause, BaseException) and cause.cause is not cause:
        cause = cause.cause
    message = first_line(cause)
    if isinstance(cause, PoolSizeError):
        return ApiError(400, message, param="num_workers", code="pool_size_unsupported")
    if isinstance(cause, PoolBusyError):
        return ApiError(409, message, code="resize_in_progress", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(cause, ClusterStartError):
        return ApiError(503, f"not enough resources for the new workers, the pool is unchanged: {message}",
                        "service_unavailable", code="insufficient_resources", headers={"Retry-After": RETRY_AFTER_S})
    return ApiError(503, f"the resize failed, the pool is unchanged: {message}", "service_unavailable",
                    code="resize_failed", headers={"Retry-After": RETRY_AFTER_S})


async def scale_expert_pool(body: Any, engine: str) -> dict[str, Any]:
    """Resize the app's expert pool; answers once the new map is committed, with the time it took and the map
    version (retired workers leave afterwards, once no coordinator links to them)."""
    size = requested_size(body)
    if engine != "cluster":
        raise ApiError(400, f"this app serves the {engine!r} engine, which has no expert pool to scale",
                       param="num_workers", code="no_expert_pool")
    pool = serve.get_deployment_handle(POOL_DEPLOYMENT, serve.get_replica_context().app_name)
    started = time.monotonic()
    try:
        report: dict[str, Any] = await pool.resize.remote(size)
    except Exception as err:
        raise resize_error(err) from None
    return {"object": "expert_pool.resize", "num_workers": report["num_workers"], "changed": report["changed"],
            "map_version": report["map_version"], "seconds": round(time.monotonic() - started, 3),
            "pool_seconds": round(report["seconds"], 3)} | \
        {k: report[k] for k in ("previous_workers", "added", "retired") if k in report}
