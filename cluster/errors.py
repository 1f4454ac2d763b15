"""Errors shared by the engines, and a one-line description of any failure for users."""

from __future__ import annotations


class WorkerFailure(RuntimeError):
    """An expert worker died or stopped answering; ``member`` names it."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"{member} failed: {reason}")
        self.member = member
        self.reason = reason


class ClusterStartError(RuntimeError):
    """The cluster could not be placed or started (missing resources, unreachable Ray, ...)."""


def describe_failure(err: BaseException) -> str:
    """One line: the exception's own message, without a traceback or Ray's wrapping."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and cause is not err:
        return describe_failure(cause)
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
