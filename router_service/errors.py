"""The serving layer's errors: ApiError (an HTTP status with OpenAI's error fields), what the engine raised mapped
to one (``engine_error``), and the gRPC status of each HTTP status. Torch-free, grpc-free and FastAPI-free, so
both protocols' adapters and the gateway share it cheaply."""

from __future__ import annotations

from typing import Any

from ray.exceptions import RayActorError, RayTaskError

from cluster.errors import EngineDeadError, QueueFullError, RequestFailedError, first_line

RETRY_AFTER_S = "5"  # Retry-After of the 503s: an engine replica restarting, the server shutting down
SHUTTING_DOWN = "the server is shutting down"  # how the engine words requests failed at the drain deadline
# gRPC status code names (grpc.StatusCode members) of the HTTP statuses the API answers; anything else: INTERNAL.
GRPC_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT",
               429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class ApiError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray processes intact (Serve re-raises it in the proxy)
        return (ApiError, (self.status, self.message, self.type, self.param, self.code, self.headers))

    def body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @property
    def grpc_status(self) -> str:
        """The name of this error's grpc.StatusCode."""
        return GRPC_STATUS.get(self.status, "INTERNAL")


def engine_unavailable(message: str) -> ApiError:
    """The retryable 503 of an engine that failed or is gone (gRPC UNAVAILABLE)."""
    return ApiError(503, f"the engine is unavailable, retry: {message}", "service_unavailable",
                    code="engine_unavailable", headers={"Retry-After": RETRY_AFTER_S})


def shutting_down(message: str) -> ApiError:
    """The retryable 503 of a server that is shutting down (gRPC UNAVAILABLE): a request failed at the drain
    deadline, or one that arrived during the drain."""
    return ApiError(503, message, "service_unavailable", code="server_shutting_down",
                    headers={"Retry-After": RETRY_AFTER_S})


def replica_died(err: BaseException) -> bool:
    """Whether ``err`` is the death of the engine replica serving a call (its actor died or cannot be reached), as
    opposed to an error the engine answered: only then may the ingress resume the request on another replica. An
    actor error raised inside the replica (by something it called) comes wrapped in a RayTaskError: not its death."""
    if isinstance(err, RayTaskError):
        return False
    return isinstance(err, RayActorError) or type(err).__name__ == "ReplicaUnavailableError"


def engine_error(err: BaseException) -> ApiError:
    """Map what the engine raised (through Ray and Serve) to an API error: a bad request (400, naming the field
    when the engine did), a full queue (429), a passed deadline (504), the server shutting down or an engine
    replica gone (503, retryable), anything else 500."""
    cause: BaseException = err
    while isinstance(cause, RayTaskError) and isinstance(cause.cause, BaseException) and cause.cause is not cause:
        cause = cause.cause
    # Serve's own errors are matched by name: importing ray.serve here would pull in its HTTP stack.
    name = type(cause).__name__
    message = first_line(cause)
    if isinstance(cause, (ValueError, TypeError)):
        return ApiError(400, message, param=getattr(cause, "param", None))  # RequestError names its field
    if isinstance(cause, QueueFullError) or name == "BackPressureError":
        return ApiError(429, message, "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(cause, TimeoutError):
        return ApiError(504, message, "timeout_error", code="deadline_exceeded")
    if isinstance(cause, RequestFailedError) and message.startswith(SHUTTING_DOWN):
        return shutting_down(message)
    if isinstance(cause, (EngineDeadError, RequestFailedError, RayActorError)) or "Unavailable" in name:
        return engine_unavailable(message)
    return ApiError(500, f"internal error: {name}: {message}", "server_error")
