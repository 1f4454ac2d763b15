"""A served run with the expert cache (issue 23): `moe-cluster serve --experts-per-worker 8 --expert-cache-size 4`
(one worker holding every expert, half of them resident) under 32 concurrent streams; every request completes
with the all-resident engine's text, and the metrics port shows hits, misses and prefetches."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import httpx
import pytest

from bench.expert_cache import prompts
from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig
from cluster.model.demo import TRAINED_DEMO
from tests.serving.conftest import free_port
from tests.test_cli_serve import start


async def stream(client: httpx.AsyncClient, url: str, prompt: str) -> tuple[str, str | None]:
    text, finish = "", None
    body = {"model": "demo_model", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line.removeprefix("data: "))["choices"][0]
                text += choice.get("text", "")
                finish = choice.get("finish_reason") or finish
    return text, finish


def series(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(f"ray_{name}") and not line.startswith("#"))


@pytest.mark.slow
def test_32_streams_with_half_the_experts_resident_equal_all_resident() -> None:
    texts = prompts(32)
    local = EngineLoop.local(EngineConfig(model=str(TRAINED_DEMO), progress=False, max_model_len=512,
                                                 max_num_seqs=32))
    try:
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        expected = [r.completions[0].text for r in local.generate(texts, params)]
    finally:
        local.shutdown()
    http, grpc_port, metrics_port = free_port(), free_port(), free_port()
    proc, _ = start("--model", str(TRAINED_DEMO), "--experts-per-worker", "8", "--expert-cache-size", "4",
                    "--http-port", str(http),
                    "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port))
    try:
        async def run() -> list[tuple[str, str | None]]:
            async with httpx.AsyncClient(timeout=300) as client:
                url = f"http://127.0.0.1:{http}/v1/completions"
                return await asyncio.gather(*(stream(client, url, p) for p in texts))

        served = asyncio.run(run())
        assert [finish for _, finish in served] == ["length"] * 32
        assert [text for text, _ in served] == expected
        deadline, metrics = time.monotonic() + 90, ""
        while time.monotonic() < deadline:  # the pool samples its workers every 2 s; Ray exports a while later
            metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            if series(metrics, "moe_cluster_expert_prefetch_total") > 0:
                break
            time.sleep(3)
        for name in ("moe_cluster_expert_cache_hits_total", "moe_cluster_expert_cache_misses_total",
                     "moe_cluster_expert_prefetch_total", "moe_cluster_expert_cache_loaded_bytes_total"):
            assert series(metrics, name) > 0, name
        resident = [line for line in metrics.splitlines() if line.startswith("ray_moe_cluster_worker_expert_resident")]
        assert resident and re.search(r" 2\.5165824e\+07$", resident[0])  # 4 of 8 experts x 4 layers, float32
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except Exception:
            proc.kill()
