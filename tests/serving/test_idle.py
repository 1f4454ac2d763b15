"""An idle served cluster stays healthy indefinitely: no timeouts, no recovery, no phantom preemption,
whatever else wakes the engine loop meanwhile (stats, health checks)."""

from __future__ import annotations

import time

import httpx
from ray import serve

from tests.serving.conftest import LINK_TIMEOUT_S, Served


def test_idle_cluster_outlives_the_link_timeout(served: Served) -> None:
    engine = serve.get_deployment_handle("EngineDeployment", app_name="moe-cluster")
    before = engine.stats.remote().result()
    deadline = time.monotonic() + 2 * LINK_TIMEOUT_S
    while time.monotonic() < deadline:  # wake the engine loop more often than its heartbeat interval
        engine.stats.remote().result()
        time.sleep(0.3)
    answer = httpx.post(f"{served.http}/v1/completions", timeout=60,
                        json={"model": served.model, "prompt": "still there?", "max_tokens": 4, "temperature": 0})
    assert answer.status_code == 200, answer.text
    after = engine.stats.remote().result()
    assert after["recoveries"] == before["recoveries"] == 0
    assert after["num_preemptions"] == before["num_preemptions"]
