"""The elastic pool through the package's real server: ``moe-cluster scale-pool`` and ``POST /scale_expert_pool``
resize the expert pool while 16 greedy HTTP streams run (each equal to the local engine's), refuse sizes that do
not fit with nothing changed, and /metrics shows the map version and the worker count."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import pytest

from router_service.cli import main
from tests.serving.conftest import Served


def pool_state() -> dict[str, Any]:
    from ray import serve

    described: dict[str, Any] = serve.get_deployment_handle("ExpertPool", "moe-cluster").describe.remote().result(
        timeout_s=60)
    return described


def gauge(served: Served, name: str) -> float | None:
    text = httpx.get(served.metrics, timeout=30).text
    found = re.findall(rf"^(?:ray_)?{name}{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)
    return float(found[-1]) if found else None


def wait_for_gauges(served: Served, version: int, workers: int) -> None:
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while (gauge(served, "moe_cluster_expert_map_version"), gauge(served, "moe_cluster_expert_workers")) != \
            (version, workers):
        assert time.monotonic() < deadline, (gauge(served, "moe_cluster_expert_map_version"),
                                             gauge(served, "moe_cluster_expert_workers"), version, workers)
        time.sleep(1)


@pytest.mark.slow
def test_scale_pool_while_16_http_streams_run(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.engine.sampling import SamplingParams

    start = pool_state()
    prompts = [f"Stream number {i} says" for i in range(16)]
    max_tokens = 48
    want = [r.completions[0].text for r in served.reference.generate(
        prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))]
    host = served.http.removeprefix("http://")
    answers: list[dict[str, Any]] = []

    async def stream(client: httpx.AsyncClient, prompt: str, counter: list[int]) -> str:
        body = {"model": served.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        text = ""
        async with client.stream("POST", f"{served.http}/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    import json

                    event = json.loads(line.removeprefix("data: "))
                    assert "error" not in event, event
                    text += event["choices"][0]["text"]
                    counter[0] += 1
        return text

    async def scale(counter: list[int]) -> None:
        for size, after in ((start["num_workers"] * 2, 16 * 2), (1, 16 * 4)):
            while counter[0] < after:
                await asyncio.sleep(0.05)
            async with httpx.AsyncClient(timeout=600) as client:
                r = await client.post(f"{served.http}/scale_expert_pool", json={"num_workers": size})
            assert r.status_code == 200, r.text
            answers.append(r.json())

    async def run() -> list[str]:
        counter = [0]
        async with httpx.AsyncClient(timeout=600) as client:
            tasks = [asyncio.create_task(stream(client, p, counter)) for p in prompts]
            await scale(counter)
            return list(await asyncio.gather(*tasks))

    got = asyncio.run(run())
    assert got == want
    assert [a["num_workers"] for a in answers] == [start["num_workers"] * 2, 1] and all(a["changed"] for a in answers)
    assert answers[1]["map_version"] > answers[0]["map_version"] > start["map_version"]
    assert all(a["seconds"] >= a["pool_seconds"] > 0 for a in answers)
    wait_for_gauges(served, answers[1]["map_version"], 1)
    # The CLI, back to the start; a size that does not fit changes nothing.
    assert main(["scale-pool", host, str(start["num_workers"])]) == 0
    assert f"to {start['num_workers']} workers" in capsys.readouterr().out
    state = pool_state()
    assert state["num_workers"] == start["num_workers"] == len(state["workers"])
    bad = httpx.post(f"{served.http}/scale_expert_pool", json={"num_workers": 99}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "num_workers"
    assert "from 1 to 8" in bad.json()["error"]["message"]
    for body in ({"num_workers": 0}, {"num_workers": "2"}, {"workers": 2}):
        r = httpx.post(f"{served.http}/scale_expert_pool", json=body, timeout=60)
        assert r.status_code == 400, (body, r.text)
    assert main(["scale-pool", host, "99"]) == 1
    assert "answered 400" in capsys.readouterr().err
    assert pool_state()["map_version"] == state["map_version"]
    wait_for_gauges(served, state["map_version"], start["num_workers"])
