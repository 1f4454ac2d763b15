"""Bounded load test: N requests at concurrency C through HTTP and through gRPC against a server whose
queue is deliberately small, so backpressure is exercised. Every request must end in a success or an
explicit refusal (HTTP 429 / gRPC RESOURCE_EXHAUSTED); anything else is counted as lost. Loopback only;
it stops by itself.

    python -m bench.load [--requests 1000] [--concurrency 64] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from typing import Any

from bench.common import free_port, machine, percentile, progress, table, write_section
from bench.models import bench_model, describe

Outcome = tuple[Counter[str], list[float]]  # counts by outcome, latencies of the successes (s)


async def http_load(base: str, model: str, n: int, concurrency: int, max_tokens: int) -> Outcome:
    import httpx

    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        async with sem:
            started = time.perf_counter()
            try:
                r = await client.post(f"{base}/v1/completions", timeout=600, json={
                    "model": model, "prompt": f"request {i} of the load test", "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True})
                if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens:
                    outcomes["ok"] += 1
                    latencies.append(time.perf_counter() - started)
                elif r.status_code == 429 and r.json()["error"]["code"] == "queue_full":
                    outcomes["refused (429)"] += 1
                else:
                    outcomes[f"lost (HTTP {r.status_code})"] += 1
            except Exception as err:
                outcomes[f"lost ({type(err).__name__})"] += 1

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 8)) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    return outcomes, latencies


async def grpc_load(target: str, model: str, n: int, concurrency: int, max_tokens: int) -> Outcome:
    import grpc

    from protos.moe_cluster.v1 import generation_pb2_grpc as pb_grpc
    from router_service.client import build_request

    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def one(i: int) -> None:
            async with sem:
                started = time.perf_counter()
                try:
                    reply = await stub.Generate(build_request(model, f"request {i} of the load test", temperature=0,
                                                              max_new_tokens=max_tokens, ignore_eos=True), timeout=600)
                    if len(reply.token_ids) == max_tokens:
                        outcomes["ok"] += 1
                        latencies.append(time.perf_counter() - started)
                    else:
                        outcomes["lost (short reply)"] += 1
                except grpc.aio.AioRpcError as err:
                    key = "refused (RESOURCE_EXHAUSTED)" if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else \
                        f"lost ({err.code().name})"
                    outcomes[key] += 1

        await asyncio.gather(*(one(i) for i in range(n)))
    return outcomes, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="demo")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-queue-len", type=int, default=16)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import ray
    from ray import serve

    from router_service.app import build_app
    from router_service.serve_config import grpc_servicer_functions

    model = bench_model(args.size)
    http_port, grpc_port = free_port(), free_port()
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": grpc_servicer_functions()})
    app_args: dict[str, Any] = {
        "model": str(model), "served_model_name": args.size, "engine": "cluster",
        "engine_options": {"max_num_seqs": args.max_num_seqs, "max_queue_len": args.max_queue_len,
                           "kv_cache_gib": 0.25},
        "pool_options": {"experts_per_worker": 2, "threads_per_worker": 1}}
    serve.run(build_app(app_args), name="load", route_prefix="/")
    results = {}
    try:
        for proto in ("HTTP", "gRPC"):
            progress(f"{proto}: {args.requests} requests at concurrency {args.concurrency}")
            started = time.perf_counter()
            if proto == "HTTP":
                run = http_load(f"http://127.0.0.1:{http_port}", args.size, args.requests, args.concurrency,
                                args.max_tokens)
            else:
                run = grpc_load(f"127.0.0.1:{grpc_port}", args.size, args.requests, args.concurrency, args.max_tokens)
            outcomes, latencies = asyncio.run(run)
            results[proto] = (outcomes, latencies, time.perf_counter() - started)
            progress(f"{proto}: {dict(outcomes)}")
    finally:
        serve.shutdown()
        ray.shutdown()

    rows = []
    for proto, (outcomes, latencies, wall) in results.items():
        refused = sum(v for k, v in outcomes.items() if k.startswith("refused"))
        lost = sum(v for k, v in outcomes.items() if k.startswith("lost"))
        rows.append([proto, args.requests, outcomes["ok"], refused, lost, 1000 * percentile(latencies, 50),
                     1000 * percentile(latencies, 99), outcomes["ok"] / wall, wall])
    body = "\n".join([
        f"Machine: {machine()}. Model {describe(args.size)}; cluster engine, 2 experts per worker, "
        f"max_num_seqs {args.max_num_seqs}, queue limit {args.max_queue_len} (so the queue fills up: refusals are "
        f"expected and explicit). {args.requests} requests of {args.max_tokens} tokens each at concurrency "
        f"{args.concurrency}, loopback only. Command: `python -m bench.load`.",
        "",
        table(["protocol", "requests", "succeeded", "refused (429 / RESOURCE_EXHAUSTED)", "lost",
               "latency p50 ms", "latency p99 ms", "successes/s", "wall s"], rows),
        "",
        "Latency is over successful requests, from send to the complete reply. 'Lost' counts anything that is "
        "neither a full success nor an explicit refusal (other status codes, transport errors, short replies).",
    ])
    print(body)
    for proto, (outcomes, _, _) in results.items():
        lost_by_kind = {k: v for k, v in outcomes.items() if k.startswith("lost")}
        if lost_by_kind:
            raise SystemExit(f"{proto}: requests lost: {lost_by_kind}")
    if not args.no_write:
        write_section("load", "Bounded load: every request answered (HTTP and gRPC)", body)


if __name__ == "__main__":
    main()
