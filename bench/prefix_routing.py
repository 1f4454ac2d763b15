"""Prefix-aware routing vs power-of-two choices, side by side in one run: two local-engine replicas behind the
Serve app, many tenants each with a long system prompt of its own, real HTTP clients.

    python -m bench.prefix_routing [--size bench] [--tenants 8] [--prefix-len 512] [--requests 64]
                                   [--concurrency 8] [--repeats 1]

Each engine replica has its own prefix cache, so where a request lands decides whether its system prompt is
computed again. Three scenarios, each run with both routings (engine_routing power_of_two and prefix_affinity,
Ray Serve's PrefixCacheAffinityRouter; router_service/prefix_routing.py):

  * ample: each replica's KV cache holds every tenant's system prompt (power-of-two computes each prompt once per
    replica, affinity once in all);
  * tight: each replica's KV cache holds about half of them (power-of-two sends every tenant to both replicas,
    which then evict each other's prefixes; affinity splits the tenants between them);
  * hot: three requests in four are one tenant's (affinity sends them to one replica while the queues stay within
    its imbalance threshold: cached prefixes against load balance).

Requests are completions with token-id prompts (the tenant's system prompt, then a question of their own), greedy,
sent by ``--concurrency`` closed-loop clients over SSE. Reported: mean and median TTFT (the client's), output
tokens/s over the wall time, the share of prompt tokens read from the prefix cache and how the requests split
between the replicas (from the app's /metrics, vLLM's series).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

from bench.common import command_line, free_port, load_average, machine, progress, table, write_section
from bench.models import bench_model, describe
from bench.serve import Sample, http_request, prompt_ids

ROUTINGS = ("power_of_two", "prefix_affinity")
SCENARIOS = ("ample", "tight", "hot")
BLOCK = 16  # tokens per KV block (EngineConfig's default)


@dataclass
class Run:
    samples: list[Sample]
    wall: float
    hits: float
    queries: float
    split: list[float]  # prompt tokens per replica, largest first

    @property
    def ttft_mean(self) -> float:
        return statistics.mean(s.ttft for s in self.samples)

    @property
    def ttft_p50(self) -> float:
        return statistics.median(s.ttft for s in self.samples)

    @property
    def tput(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall


def tenants_of(scenario: str, args: argparse.Namespace) -> list[int]:
    """Which tenant each request belongs to: uniform (ample, tight) or 3 in 4 the first one (hot); seeded."""
    rng = random.Random(0)
    if scenario == "hot":
        return [0 if rng.random() < 0.75 else rng.randrange(1, args.tenants) for _ in range(args.requests)]
    return [rng.randrange(args.tenants) for _ in range(args.requests)]


def kv_blocks(scenario: str, args: argparse.Namespace) -> int:
    """Per replica: every tenant's prefix and each running request's own blocks (ample, hot), or room for half of
    the tenants' prefixes in all (tight: the prefixes of the requests running there included)."""
    prefix_blocks = -(-args.prefix_len // BLOCK)
    own_blocks = -(-(args.prefix_len + args.question_len + args.output_len) // BLOCK) - prefix_blocks
    if scenario == "tight":
        return (args.concurrency // 2) * own_blocks + max(1, args.tenants // 2) * prefix_blocks
    return args.concurrency * own_blocks + args.tenants * prefix_blocks


def prompt(tenant: int, request: int, args: argparse.Namespace, vocab: int) -> list[int]:
    system = prompt_ids(tenant, args.prefix_len, vocab)  # the serve bench's prompts, one per tenant
    question = [3 + (request * 15485863 + j * 32452843) % (vocab - 3) for j in range(args.question_len)]
    return system + question


def app_arguments(model: str, scenario: str, routing: str, args: argparse.Namespace) -> dict[str, Any]:
    max_len = args.prefix_len + args.question_len + args.output_len
    return {"model": model, "served_model_name": "bench", "engine": "local", "num_engines": 2,
            "engine_routing": routing,
            "engine_options": {"max_num_seqs": args.concurrency, "max_num_batched_tokens": 1024,
                               "num_kv_blocks": kv_blocks(scenario, args), "max_model_len": max_len}}


def replica_counters(base: str) -> dict[str, tuple[float, float]]:
    """Each replica's (prefix-cache queries, hits) in tokens, from the app's /metrics (vLLM's series)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=30).text
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
                out.setdefault(s.labels["engine"], [0.0, 0.0])[s.name.endswith("hits_total")] = s.value
    return {engine: (q, h) for engine, (q, h) in out.items()}


def run_one(model: str, scenario: str, routing: str, args: argparse.Namespace, vocab: int, port: int) -> Run:
    import httpx
    from ray import serve

    from router_service.app import build_app

    serve.run(build_app(app_arguments(model, scenario, routing, args)), name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    owners = tenants_of(scenario, args)
    queue = list(range(args.requests))

    async def clients() -> tuple[list[Sample], float]:
        samples: list[Sample] = []
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=256)) as http:
            await http_request(http, base, "bench", [5, 6, 7], 2)  # warm-up (no tenant's prefix)

            async def client() -> None:
                while queue:
                    i = queue.pop(0)
                    samples.append(await http_request(http, base, "bench", prompt(owners[i], i, args, vocab),
                                                      args.output_len))

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(args.concurrency)))
            return samples, time.perf_counter() - started

    samples, wall = asyncio.run(clients())
    time.sleep(2.5)  # replicas report their counters every second
    counters = replica_counters(base)
    serve.delete("bench")
    queries = sum(q for q, _ in counters.values())
    return Run(samples, wall, sum(h for _, h in counters.values()), queries,
               sorted((q for q, _ in counters.values()), reverse=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    import ray
    from ray import serve

    from cluster.model.config import ModelConfig

    model = str(bench_model(args.size))
    vocab = ModelConfig.from_file(model).vocab_size
    port = free_port()
    load_before = load_average()
    progress(f"load average before (1/5/15 min): {load_before}")
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs: dict[tuple[str, str], list[Run]] = {}
    try:
        for repeat in range(args.repeats):
            for scenario in args.scenarios:
                order = ROUTINGS if repeat % 2 == 0 else ROUTINGS[::-1]  # alternate who goes first
                for routing in order:
                    progress(f"repeat {repeat + 1}/{args.repeats}: {scenario}, {routing} "
                             f"({kv_blocks(scenario, args)} KV blocks per replica)")
                    run = run_one(model, scenario, routing, args, vocab, port)
                    runs.setdefault((scenario, routing), []).append(run)
                    progress(f"  mean TTFT {run.ttft_mean * 1e3:.0f} ms, {run.tput:.0f} tok/s, "
                             f"hits {run.hits:.0f}/{run.queries:.0f} prompt tokens, split {run.split}")
    finally:
        serve.shutdown()
        ray.shutdown()
    load_after = load_average()
    quiet = float(load_before.split(" / ")[0]) <= 1.0
    progress(f"load average after: {load_after}")

    def median(scenario: str, routing: str, value: str) -> float:
        return statistics.median(getattr(r, value) for r in runs[(scenario, routing)])

    rows, derived = [], []
    for scenario in args.scenarios:
        for routing in ROUTINGS:
            rs = runs[(scenario, routing)]
            rows.append([scenario, routing, kv_blocks(scenario, args), median(scenario, routing, "ttft_mean") * 1e3,
                         median(scenario, routing, "ttft_p50") * 1e3, median(scenario, routing, "tput"),
                         f"{100 * rs[-1].hits / max(1.0, rs[-1].queries):.0f}%",
                         " / ".join(f"{100 * q / max(1.0, rs[-1].queries):.0f}%" for q in rs[-1].split)])
        ttft = median(scenario, "prefix_affinity", "ttft_mean") / median(scenario, "power_of_two", "ttft_mean")
        tput = median(scenario, "prefix_affinity", "tput") / median(scenario, "power_of_two", "tput")
        verdict = "pays" if ttft < 0.95 and tput > 1.05 else "does not pay" if ttft > 1.05 or tput < 0.95 else \
            "makes no clear difference"
        derived.append(f"- {scenario}: prefix affinity has {ttft:.2f}x the mean TTFT of power-of-two choices and "
                       f"{tput:.2f}x its throughput: it {verdict} here")
    headers = ["scenario", "routing", "KV blocks per replica", "mean TTFT (ms)", "median TTFT (ms)",
               "output tokens/s", "prompt tokens cached", "prompt tokens per replica"]
    command = command_line("bench.prefix_routing", args)
    body = "\n".join([
        f"Machine: {machine()}. Model {describe(args.size)}. Command: `{command}`.",
        f"Load average (1/5/15 min) before {load_before}, after {load_after}: "
        + ("a quiet machine (1-minute load at most 1 before; the load after counts this run's own processes). "
           if quiet else "the machine was shared with other work during this run, so absolute numbers are noisy. ")
        + f"Two local-engine replicas (one core each) behind the Serve app; {args.tenants} tenants, each a "
          f"{args.prefix_len}-token system prompt; {args.requests} requests of {args.question_len} more prompt "
          f"tokens and {args.output_len} output tokens, {args.concurrency} closed-loop SSE clients; a fresh "
          f"app per row (empty caches); TTFT and throughput are medians of {args.repeats} repeat(s), routings "
          "alternating who goes first; the cached share and the split are the last repeat's.",
        "", table(headers, rows), "", *derived])
    print(body)
    if not args.no_write:
        write_section("prefix_routing", "Prefix-aware routing vs power-of-two choices (two engine replicas)", body)


if __name__ == "__main__":
    main()
