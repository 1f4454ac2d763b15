"""Schema-driven fuzzing of the live HTTP API from its own OpenAPI document: whatever schemathesis generates
(valid requests, and invalid ones in negative mode), the server never answers 5xx and keeps serving."""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err, Ok

from tests.serving.conftest import Served

T = TypeVar("T")
E = TypeVar("E", bound=Exception)


def unwrap(result: Ok[T] | Err[E]) -> T:
    """The value of an Ok; an Err (a part of the schema schemathesis cannot use) raises its error."""
    if isinstance(result, Err):
        raise result.err()
    return result.ok()


def bounded(case: Any) -> None:
    """Keep each generated request cheap to serve (types and values stay as generated otherwise)."""
    body = case.body
    if isinstance(body, dict):
        for key, cap in (("max_tokens", 8), ("max_completion_tokens", 8), ("n", 2)):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                body[key] = cap


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(served: Served, mode: GenerationMode) -> None:
    api = schemathesis.openapi.from_url(f"{served.http}/openapi.json")
    operations = [unwrap(result) for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to invert in a parameter-less GET
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: Any) -> None:
            bounded(case)
            case.call_and_validate(base_url=served.http, checks=[not_a_server_error], timeout=120)

        fuzz()
    r = httpx.post(f"{served.http}/v1/completions", json={"model": served.model, "prompt": "x", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200  # and it still serves
