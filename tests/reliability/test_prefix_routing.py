"""Prefix-aware routing (router_service/prefix_routing.py): requests sharing a system prompt go to the engine
replica whose prefix cache holds it, through real HTTP to two local-engine replicas behind Ray Serve's
PrefixCacheAffinityRouter."""

from __future__ import annotations

import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cluster.engine.sampling import SamplingParams
from router_service.engine_api import GenerateRequest
from router_service.prefix_routing import prompt_text
from tests.reliability.conftest import Apps

SYSTEM = ("You are a careful assistant for a small shop that sells tea, cups and kettles. Answer in one short "
          "sentence, name the product, and never invent a price or a delivery date that the customer did not give.")


def test_prompt_text_keeps_what_a_shared_prefix_shares() -> None:
    params = SamplingParams(max_tokens=1)
    chat: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert prompt_text(GenerateRequest("a", params, messages=chat)) == f"<system>{SYSTEM}<user>hi"
    assert prompt_text(GenerateRequest("b", params, prompt="tea")) == "tea"
    # Token ids: a shared token prefix is a shared text prefix, and 1 2 is not a prefix of 12.
    assert prompt_text(GenerateRequest("c", params, prompt=[1, 2, 3])).startswith(
        prompt_text(GenerateRequest("d", params, prompt=[1, 2])))
    assert not prompt_text(GenerateRequest("e", params, prompt=[12])).startswith(
        prompt_text(GenerateRequest("f", params, prompt=[1])))


def prefix_cache_queries(apps: Apps) -> dict[str, float]:
    """Each engine replica's vllm:prefix_cache_queries_total, from the affine app's own /metrics."""
    text = httpx.get(apps.url("affine", "/metrics"), timeout=30).text
    return {s.labels["engine"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "vllm:prefix_cache_queries_total"}


def test_requests_sharing_a_system_prompt_go_to_the_replica_that_cached_it(apps: Apps) -> None:
    """Six chats one after another, one system prompt, six questions: every prompt is counted on one replica (power
    of two choices would spread them: all six on one replica by chance 1 time in 32), and all but the first hit
    the cache for the whole system prompt."""
    questions = ["Which kettle boils fastest?", "Do you sell green tea?", "Is the blue cup dishwasher safe?",
                 "What is oolong?", "Can I return a kettle?", "Which tea has the least caffeine?"]
    for question in questions:
        body = {"model": "affine", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}
        r = httpx.post(apps.url("affine", "/v1/chat/completions"), json=body, timeout=120)
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30  # replicas report their stats every second
    while (queries := prefix_cache_queries(apps)) and sum(queries.values()) == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(queries) == 2, queries
    assert sorted(queries.values())[0] == 0 and sorted(queries.values())[1] > 0, queries
