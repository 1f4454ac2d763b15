"""Load against the running Serve app, over HTTP (OpenAI API, SSE) and gRPC, side by side with transformers'
batched ``generate`` on the same weights: output tokens/s, TTFT and TPOT p50/p99, ratios.

    python -m bench.serve [--size demo] [--concurrency 1 8 32] [--prompt-len 32] [--output-len 64]

The app (cluster engine) is started on a local Ray with loopback-only ports. Each concurrency level is a
closed loop: that many clients, each sending its next request when the previous one ends, ``--rounds``
requests per client. transformers runs in a fresh subprocess before the server starts and again after it
stops (the ratios are to the mean of the two): one batched ``generate`` of the same size, its TTFT being the
time of a 1-token ``generate`` (prefill) on the same batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench.common import (
    add_workload_flags,
    free_port,
    load_average,
    machine,
    percentile,
    progress,
    table,
    workload_argv,
    write_section,
)
from bench.models import bench_model, describe

PROTOCOLS = ("http", "http-unary", "grpc")  # SSE stream, one JSON answer, gRPC stream


@dataclass
class Sample:
    ttft: float
    e2e: float
    tokens: int

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / max(1, self.tokens - 1)


def prompt_ids(i: int, length: int, vocab: int) -> list[int]:
    return [3 + (i * 7919 + j * 104729) % (vocab - 3) for j in range(length)]


async def http_request(client: Any, base: str, model: str, prompt: list[int], output_len: int) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and ttft is None:
                ttft = time.perf_counter() - started
            if chunk.get("usage"):  # an event may carry several tokens: count them from the usage event
                tokens = chunk["usage"]["completion_tokens"]
    e2e = time.perf_counter() - started
    return Sample(ttft or e2e, e2e, tokens)


async def http_unary(client: Any, base: str, model: str, prompt: list[int], output_len: int) -> Sample:
    """A non-streamed completion: the whole answer at once, so its TTFT is its latency."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    r = await client.post(f"{base}/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    e2e = time.perf_counter() - started
    return Sample(e2e, e2e, r.json()["usage"]["completion_tokens"])


async def grpc_request(client: Any, model: str, prompt: list[int], output_len: int) -> Sample:
    started = time.perf_counter()
    ttft, tokens = None, 0
    async for message in client.generate_stream(prompt, max_new_tokens=output_len, temperature=0, ignore_eos=True):
        if ttft is None:
            ttft = time.perf_counter() - started
        tokens += len(message.token_ids)
    e2e = time.perf_counter() - started
    return Sample(ttft or e2e, e2e, tokens)


async def closed_loop(concurrency: int, rounds: int, send: Any) -> tuple[list[Sample], float]:
    samples: list[Sample] = []

    async def client_loop(c: int) -> None:
        for r in range(rounds):
            samples.append(await send(c * rounds + r))

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(c) for c in range(concurrency)))
    return samples, time.perf_counter() - started


def summarize(samples: list[Sample], wall: float) -> dict[str, float]:
    ttfts, tpots = [s.ttft for s in samples], [s.tpot for s in samples]
    return {"tps": sum(s.tokens for s in samples) / wall, "ttft50": percentile(ttfts, 50),
            "ttft99": percentile(ttfts, 99), "tpot50": percentile(tpots, 50), "tpot99": percentile(tpots, 99)}


def run_transformers(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Inside a fresh subprocess: one batched generate per concurrency level."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(bench_model(args.size)).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    vocab = hf.config.vocab_size

    def generate(batch: torch.Tensor, n: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            hf.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False)
        return time.perf_counter() - started

    out = {}
    for c in args.concurrency:
        batch = torch.tensor([prompt_ids(i, args.prompt_len, vocab) for i in range(c)])
        generate(batch, 2)
        ttft = statistics.median(generate(batch, 1) for _ in range(3))
        total = statistics.median(generate(batch, args.output_len) for _ in range(2))
        tpot = (total - ttft) / (args.output_len - 1)
        out[str(c)] = {"tps": c * args.output_len / total, "ttft50": ttft, "ttft99": ttft, "tpot50": tpot,
                       "tpot99": tpot}
        print(f"[bench] transformers c={c}: {out[str(c)]['tps']:,.0f} tok/s", file=sys.stderr, flush=True)
    return out


def run_transformers_process(args: argparse.Namespace, when: str) -> dict[str, dict[str, float]]:
    """``run_transformers`` in a fresh process (no Ray, no server beside it)."""
    progress(f"transformers batched generate, in its own process ({when} the server)")
    cmd = [sys.executable, "-m", "bench.serve", "--hf-peer", *workload_argv(args)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"transformers peer failed:\n{done.stderr[-3000:]}")
    result: dict[str, dict[str, float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def offline_summary(ours: dict[str, dict[str, dict[str, float]]], hf: dict[str, dict[str, float]], c: str) -> str:
    """Where the gap to transformers lies: in the engine (offline) or in the server (served over offline)."""
    if "offline" not in ours:
        return ""
    offline = ours["offline"][c]["tps"]
    return (f" The same engine offline, in the same Ray session: {offline / hf[c]['tps']:.2f}x transformers; the "
            f"server reaches {ours['http-unary'][c]['tps'] / offline:.2f}x of it non-streamed, "
            f"{ours['http'][c]['tps'] / offline:.2f}x streamed over HTTP and {ours['grpc'][c]['tps'] / offline:.2f}x "
            "over gRPC.")


def app_arguments(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """The app's arguments: with ``--defaults`` exactly what ``moe-cluster serve --model M`` deploys (the bundled
    serve.yaml with the shape ``moe-cluster plan`` picks for this machine), else the shape the flags give."""
    if args.defaults:
        from router_service.cli import build_parser
        from router_service.serve_config import resolve_config

        cli = build_parser().parse_args(["serve", "--model", str(model), "--served-model-name", args.size])
        return dict(resolve_config(cli)["applications"][0]["args"])
    return {"model": str(model), "served_model_name": args.size, "engine": args.engine,
            "num_engines": args.num_engines,
            "engine_options": {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "kv_cache_gib": 0.5},
            "pool_options": {"experts_per_worker": args.experts_per_worker, "threads_per_worker": 1}}


def describe_server(app_args: dict[str, Any]) -> str:
    pool, cluster = app_args.get("pool_options") or {}, app_args.get("cluster_options") or {}
    return (f"{app_args.get('engine', 'cluster')} engine, {app_args.get('num_engines', 1)} engine replica(s), "
            f"{pool.get('experts_per_worker', 1)} experts per worker, {pool.get('threads_per_worker', 1)} thread(s) "
            f"per worker, {cluster.get('coordinator_threads', 1)} per coordinator"
            + (f", OpenMP wait policy {pool['worker_omp_wait_policy']}" if pool.get("worker_omp_wait_policy") else "")
            + f", micro-batches {cluster.get('micro_batches') or 'auto'}"
            + (f", streams at most {app_args['stream_chunks_per_s']:g} chunks/s per engine replica"
               if "stream_chunks_per_s" in app_args else ""))


def run_server(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    import httpx
    import ray
    from ray import serve

    from cluster.model.config import ModelConfig
    from router_service.app import build_app
    from router_service.client import AsyncGenerationClient
    from router_service.serve_config import grpc_servicer_functions

    model = bench_model(args.size)
    http_port, grpc_port = free_port(), free_port()
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": grpc_servicer_functions()})
    serve.run(build_app(app_arguments(args, model)), name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{http_port}"
    results: dict[str, dict[str, dict[str, float]]] = {proto: {} for proto in PROTOCOLS}
    vocab = ModelConfig.from_file(model).vocab_size

    async def levels() -> None:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=256)) as http:
            grpc_client = AsyncGenerationClient(f"127.0.0.1:{grpc_port}", model=args.size, timeout_s=600)
            await http_request(http, base, args.size, prompt_ids(0, args.prompt_len, vocab), 4)  # warm-up
            for c in args.concurrency:
                rounds = max(1, args.rounds if c > 1 else 4 * args.rounds)
                for proto in PROTOCOLS:
                    if proto == "http":
                        async def send(i: int) -> Sample:
                            return await http_request(http, base, args.size, prompt_ids(i, args.prompt_len, vocab),
                                                      args.output_len)
                    elif proto == "http-unary":
                        async def send(i: int) -> Sample:
                            return await http_unary(http, base, args.size, prompt_ids(i, args.prompt_len, vocab),
                                                    args.output_len)
                    else:
                        async def send(i: int) -> Sample:
                            return await grpc_request(grpc_client, args.size, prompt_ids(i, args.prompt_len, vocab),
                                                      args.output_len)
                    samples, wall = await closed_loop(c, rounds, send)
                    results[proto][str(c)] = summarize(samples, wall)
                    progress(f"{proto} c={c}: {results[proto][str(c)]['tps']:,.0f} tok/s")
            await grpc_client.close()

    try:
        asyncio.run(levels())
        serve.delete("bench")  # its pool's workers go; the Ray session and Serve's own processes stay
        if args.engine == "cluster":
            results["offline"] = run_offline(args, model, vocab)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def run_offline(args: argparse.Namespace, model: Any, vocab: int) -> dict[str, dict[str, float]]:
    """The server's engine without the server: a ClusterEngine of the app's shape in the same Ray session (Serve
    still up, idle), all N prompts submitted at once, ``--rounds`` times per level. What the server adds to it is
    the Serve tier's cost; what it lacks against transformers is the engine's."""
    from cluster.engine.sampling import SamplingParams
    from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig
    from workers.cluster_engine import ClusterEngine, start_pool, stop_pool

    app_args = app_arguments(args, model)
    engine_cfg = EngineConfig.from_dict({"model": str(model), "progress": False} | app_args["engine_options"])
    pool = start_pool(engine_cfg, PoolConfig.from_dict(app_args.get("pool_options") or {}))
    engine = ClusterEngine.start(engine_cfg, ClusterConfig.from_dict(app_args.get("cluster_options") or {}),
                                 pool=pool)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    out: dict[str, dict[str, float]] = {}
    try:
        engine.generate([prompt_ids(0, args.prompt_len, vocab)], params)  # warm-up
        for c in args.concurrency:
            batch = [prompt_ids(i, args.prompt_len, vocab) for i in range(c)]
            runs = []
            for _ in range(max(1, args.rounds)):
                started = time.perf_counter()
                engine.generate(batch, params)
                runs.append(c * args.output_len / (time.perf_counter() - started))
            out[str(c)] = {"tps": statistics.median(runs)}
            progress(f"offline c={c}: {out[str(c)]['tps']:,.0f} tok/s")
    finally:
        engine.shutdown()
        stop_pool(pool)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workload_flags(parser)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each level (x4 at 1)")
    parser.add_argument("--engine", default="cluster", choices=["cluster", "local"])
    parser.add_argument("--experts-per-worker", type=int, default=2)
    parser.add_argument("--num-engines", type=int, default=1, help="engine replicas (coordinators) on the pool")
    parser.add_argument("--defaults", action="store_true",
                        help="serve what `moe-cluster serve --model M` deploys (bundled config, planned shape); "
                             "--engine/--num-engines/--experts-per-worker are then ignored")
    parser.add_argument("--hf-peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.hf_peer:
        print(json.dumps(run_transformers(args)))
        return
    bench_model(args.size)
    load_before = load_average()
    progress(f"load average before (1/5/15 min): {load_before}")
    hf_before = run_transformers_process(args, "before")
    server = describe_server(app_arguments(args, bench_model(args.size)))
    progress(f"server ({server}): HTTP and gRPC")
    ours = run_server(args)
    hf_after = run_transformers_process(args, "after")
    load_after = load_average()
    progress(f"load average after: {load_after}")
    # The peer's throughput: the mean of its runs before and after the server's, so that a machine whose speed
    # drifts during the run (this one does) is charged to both sides alike.
    hf = {c: {k: (hf_before[c][k] + hf_after[c][k]) / 2 for k in hf_before[c]} for c in hf_before}

    rows = []
    top = max(args.concurrency)
    for c in map(str, args.concurrency):
        for name, r in (("transformers generate (batched), before the server", hf_before[c]),
                        ("transformers generate (batched), after the server", hf_after[c]),
                        ("ours, HTTP (SSE)", ours["http"][c]), ("ours, HTTP (non-streamed)", ours["http-unary"][c]),
                        ("ours, gRPC (stream)", ours["grpc"][c])):
            rows.append([c, name, r["tps"], f"{r['tps'] / hf[c]['tps']:.2f}x", 1000 * r["ttft50"], 1000 * r["ttft99"],
                         1000 * r["tpot50"], 1000 * r["tpot99"]])
        if "offline" in ours:
            rows.append([c, "ours, the same engine offline (no server)", ours["offline"][c]["tps"],
                         f"{ours['offline'][c]['tps'] / hf[c]['tps']:.2f}x", "-", "-", "-", "-"])
    body = "\n".join([
        f"Machine: {machine()}. Model {describe(args.size)}. Server: "
        + ("`moe-cluster serve`'s defaults (the bundled serve.yaml, shape from `moe-cluster plan`): " if args.defaults
           else "") + f"{server}, on a local Ray; clients on the same machine (loopback). Load average (1/5/15 min) "
        f"before {load_before}, after {load_after}.",
        f"Each request: {args.prompt_len}-token prompt, {args.output_len} greedy output tokens (EOS ignored), "
        f"streamed or not. Closed loop: N clients, each sending its next request when the last ends. "
        f"Command: `python -m bench.serve --size {args.size} --concurrency {' '.join(map(str, args.concurrency))} "
        f"--prompt-len {args.prompt_len} --output-len {args.output_len} "
        + ("--defaults`." if args.defaults else f"--engine {args.engine} --num-engines {args.num_engines} "
           f"--experts-per-worker {args.experts_per_worker}`."),
        "",
        table(["concurrency", "peer", "output tok/s", "vs transformers", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
               "TPOT p99 ms"], rows),
        "",
        "transformers runs in a fresh process before the server starts and again after it stops; every ratio is "
        "to the mean of its two runs. The offline row is the server's engine (a ClusterEngine of the same shape) "
        "without the server, after it, in the same Ray session: N prompts at once, median of the rounds. "
        "transformers' TTFT is its prefill of the whole batch and its TPOT the batch's mean "
        "step, the same for every sequence (it has no per-request streaming server); ours are measured per "
        "request at the client; a non-streamed request's TTFT is its whole latency.",
        "",
        f"- At {top} concurrent requests: " + "; ".join(
            f"{name} {ours[proto][str(top)]['tps'] / hf[str(top)]['tps']:.2f}x transformers' offline throughput"
            for name, proto in (("HTTP streamed", "http"), ("HTTP non-streamed", "http-unary"),
                                ("gRPC streamed", "grpc"))) + "."
        + offline_summary(ours, hf, str(top)),
    ])
    print(body)
    if not args.no_write:
        write_section(f"serve_{args.size}" + ("_defaults" if args.defaults else ""),
                      f"Serving under load: HTTP and gRPC vs transformers ({args.size} model"
                      + (", `moe-cluster serve` defaults)" if args.defaults else ")"), body)


if __name__ == "__main__":
    main()
