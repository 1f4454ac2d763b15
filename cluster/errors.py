"""Errors shared by the engines and the serving layer (torch-free, so the ingress imports it cheaply), and a
one-line description of any failure for users. router_service/errors.py maps each to an HTTP / gRPC status."""

from __future__ import annotations


class WorkerFailure(RuntimeError):
    """An expert worker died or stopped answering; ``member`` names it, ``worker`` and ``generation`` identify it
    in its pool (None when the failure cannot be pinned on one worker)."""

    def __init__(self, member: str, reason: str, worker: int | None = None, generation: int | None = None) -> None:
        super().__init__(f"{member} failed: {reason}")
        self.member = member
        self.reason = reason
        self.worker = worker
        self.generation = generation

    def __reduce__(self) -> tuple[object, ...]:  # crosses Ray processes with its fields
        return (WorkerFailure, (self.member, self.reason, self.worker, self.generation))


class RequestError(ValueError):
    """A request the engine refuses; ``param`` names the request field at fault (as the OpenAI API spells it:
    "prompt", "max_tokens", ...), or is None."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[object, ...]:  # crosses Ray processes with its param
        return (RequestError, (str(self), self.param))


class ClusterStartError(RuntimeError):
    """The cluster could not be placed or started (missing resources, unreachable Ray, ...)."""


class PoolSizeError(ValueError):
    """A resize of the expert pool to a size it cannot take (more workers than expert slots, fewer than one);
    nothing changed (HTTP 400, ``param`` num_workers)."""

    param = "num_workers"


class PoolBusyError(RuntimeError):
    """Another resize of the expert pool is running; nothing changed (HTTP 409): ask again when it has ended."""


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full; retry later (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""


class EngineDeadError(RuntimeError):
    """The engine failed, or is shutting down, and takes no requests (HTTP 503, gRPC UNAVAILABLE)."""


class RequestFailedError(RuntimeError):
    """The engine failed while the request was running; the message says why (HTTP 503, gRPC UNAVAILABLE)."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (Ray wraps causes in multi-line tracebacks)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(err).__name__


def root_cause(err: BaseException) -> BaseException:
    """The exception raised inside a Ray task or actor, not Ray's wrapper around it."""
    cause = getattr(err, "cause", None)
    while isinstance(cause, BaseException) and cause is not err:
        err, cause = cause, getattr(cause, "cause", None)
    return err


def describe_failure(err: BaseException) -> str:
    """One line for users: the root exception's type and first line, without a traceback or Ray's wrapping."""
    cause = root_cause(err)
    text = first_line(cause)
    return f"{type(cause).__name__}: {text}" if text != type(cause).__name__ else text
