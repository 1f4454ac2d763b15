"""A standard serving benchmark client, guidellm, against the served app, side by side with the project's own load
generator (bench/serve.py's streamed HTTP client) on the same server in the same run: TTFT, inter-token latency and
output tokens/s at each concurrency.

    python -m bench.guidellm_bench [--model DIR] [--concurrency 1 8 32] [--prompt-len 32] [--output-len 64]
                                   [--guidellm VENV/bin/guidellm]

guidellm is not a dependency of the project (it pins its own versions of shared packages): install it in a venv of
its own (``python -m venv V && V/bin/pip install guidellm``) and pass its executable with ``--guidellm``. It runs out
of the box: its own request bodies (stream_options with continuous_usage_stats, ignore_eos), no overrides. Each
level is a closed loop of N streams (guidellm's ``concurrent`` profile; ours: N clients each sending its next request
when the last ends), with the same number of requests. Use a model whose tokens decode to text (a trained checkpoint):
guidellm measures the text it receives, and a random-weight model's tokens mostly decode to nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.common import free_port, machine, percentile, progress, table, write_section
from bench.models import bench_model
from bench.serve import Sample, closed_loop, http_request, prompt_ids


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def start_server(args: argparse.Namespace, model: Path) -> str:
    """The app (cluster engine) on a local Ray with loopback-only ports; returns its HTTP base URL."""
    import ray
    from ray import serve

    from router_service.app import build_app
    from router_service.serve_config import grpc_servicer_functions

    http_port = free_port()
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": free_port(), "grpc_servicer_functions": grpc_servicer_functions()})
    app_args = {"model": str(model), "served_model_name": args.served_name, "engine": args.engine,
                "engine_options": {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "kv_cache_gib": 0.5},
                "pool_options": {"experts_per_worker": args.experts_per_worker, "threads_per_worker": 1}}
    serve.run(build_app(app_args), name="guidellm-bench", route_prefix="/")
    return f"http://127.0.0.1:{http_port}"


def run_guidellm(args: argparse.Namespace, base: str, model: Path, concurrency: int, requests: int,
                 out_dir: Path) -> dict[str, Any]:
    """One guidellm run at ``concurrency`` streams; returns its benchmark's metrics and request counts."""
    out = out_dir / f"guidellm-c{concurrency}.json"
    cmd = [args.guidellm, "run",
           "--backend", f"kind=openai_http,target={base},model={args.served_name}",
           "--profile", f"kind=concurrent,streams={concurrency}",
           "--constraint", f"kind=max_requests,count={requests}",
           "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_len},output_tokens={args.output_len}",
           "--tokenizer", f"kind=huggingface_auto,model={model}",
           "--output", f"kind=json,path={out}",
           "--disable-console-interactive"]
    progress(f"guidellm c={concurrency}: {' '.join(cmd)}")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=out_dir)
    if done.returncode or not out.exists():
        raise SystemExit(f"guidellm failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def guidellm_summary(report: dict[str, Any]) -> dict[str, float]:
    """TTFT / ITL / output tok/s and the request counts of the one benchmark in a guidellm JSON report."""
    bench = report["benchmarks"][0]
    metrics = bench["metrics"]

    def dist(name: str, status: str = "successful") -> dict[str, Any]:
        values: dict[str, Any] = metrics[name][status]
        return values

    totals = metrics["request_totals"]
    return {"tps": dist("output_token_count")["total_sum"] / bench["duration"],
            "ttft50": dist("time_to_first_token_ms")["median"] / 1000,
            "ttft99": dist("time_to_first_token_ms")["percentiles"]["p99"] / 1000,
            "itl50": dist("inter_token_latency_ms")["median"] / 1000,
            "itl99": dist("inter_token_latency_ms")["percentiles"]["p99"] / 1000,
            "ok": float(totals["successful"]), "errors": float(totals["errored"]),
            "incomplete": float(totals["incomplete"])}


def ours_summary(samples: list[Sample], wall: float) -> dict[str, float]:
    ttfts, itls = [s.ttft for s in samples], [s.tpot for s in samples]
    return {"tps": sum(s.tokens for s in samples) / wall, "ttft50": percentile(ttfts, 50),
            "ttft99": percentile(ttfts, 99), "itl50": percentile(itls, 50), "itl99": percentile(itls, 99),
            "ok": float(len(samples)), "errors": 0.0, "incomplete": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the demo model)")
    parser.add_argument("--served-name", default="demo")
    parser.add_argument("--guidellm", default="guidellm", help="the guidellm executable (in its own venv)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="requests per stream at each level (x4 at 1)")
    parser.add_argument("--engine", default="cluster", choices=["cluster", "local"])
    parser.add_argument("--experts-per-worker", type=int, default=2)
    parser.add_argument("--note", default="", help="a sentence about the model, written under the table")
    parser.add_argument("--reports", type=Path, default=None, help="where guidellm's JSON reports go (default: a "
                        "new temporary directory)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import httpx
    import ray
    from ray import serve

    from cluster.model.config import ModelConfig

    model = args.model or bench_model("demo")
    version = subprocess.run([args.guidellm, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    load_before = load_average()
    progress(f"load average before: {load_before}; {version}; model {model}")
    base = start_server(args, model)
    vocab = ModelConfig.from_file(model).vocab_size
    results: dict[str, dict[int, dict[str, float]]] = {"guidellm": {}, "ours": {}}
    try:
        reports = args.reports or Path(tempfile.mkdtemp(prefix="guidellm-"))
        reports.mkdir(parents=True, exist_ok=True)
        progress(f"guidellm's reports go to {reports}")
        for c in args.concurrency:
            requests = c * max(1, args.rounds if c > 1 else 4 * args.rounds)
            results["guidellm"][c] = guidellm_summary(run_guidellm(args, base, model, c, requests, reports))
            progress(f"guidellm c={c}: {results['guidellm'][c]}")

            async def ours(c: int = c, requests: int = requests) -> dict[str, float]:
                async with httpx.AsyncClient(limits=httpx.Limits(max_connections=256)) as http:
                    async def send(i: int) -> Sample:
                        return await http_request(http, base, args.served_name,
                                                  prompt_ids(i, args.prompt_len, vocab), args.output_len)
                    samples, wall = await closed_loop(c, requests // c, send)
                    return ours_summary(samples, wall)

            results["ours"][c] = asyncio.run(ours())
            progress(f"bench/serve.py client c={c}: {results['ours'][c]}")
    finally:
        serve.shutdown()
        ray.shutdown()
    load_after = load_average()
    progress(f"load average after: {load_after}")

    rows = []
    for c in args.concurrency:
        for name, key in (("guidellm (streamed /v1/chat/completions, its default)", "guidellm"),
                          ("bench/serve.py client (HTTP SSE)", "ours")):
            r = results[key][c]
            rows.append([c, name, f"{int(r['ok'])}/{int(r['ok'] + r['errors'] + r['incomplete'])}",
                         int(r["errors"]), r["tps"], 1000 * r["ttft50"], 1000 * r["ttft99"], 1000 * r["itl50"],
                         1000 * r["itl99"]])
    top = max(args.concurrency)
    g, o = results["guidellm"][top], results["ours"][top]
    errors = sum(int(r["errors"]) for r in results["guidellm"].values())
    body = "\n".join([
        f"Machine: {machine()} (shared with other jobs: load average {load_before} before, {load_after} after). "
        f"Model: `{model}`{' (' + args.note + ')' if args.note else ''}. Server: {args.engine} engine, "
        f"{args.experts_per_worker} experts per worker, on a local Ray; clients on the same machine (loopback).",
        f"{version}, out of the box (its own request bodies: `stream_options` with `continuous_usage_stats`, "
        f"`ignore_eos`), `concurrent` profile, synthetic text of {args.prompt_len} prompt tokens, {args.output_len} "
        f"output tokens; the project's client: token-id prompts of the same length, greedy, EOS ignored. Same number "
        f"of requests per level. Command: `python -m bench.guidellm_bench --guidellm GUIDELLM "
        f"--concurrency {' '.join(map(str, args.concurrency))} --prompt-len {args.prompt_len} "
        f"--output-len {args.output_len}" + (" --model MODEL" if args.model else "") + "`.",
        "",
        table(["concurrency", "client", "completed", "errors", "output tok/s", "TTFT p50 ms", "TTFT p99 ms",
               "ITL p50 ms", "ITL p99 ms"], rows),
        "",
        "ITL: guidellm's own inter-token latency (it counts tokens from the usage sent with every chunk); ours is "
        "(end - first token) / (tokens - 1) per request, as bench/serve.py's TPOT. guidellm's requests go through "
        "the chat template, ours are plain completions.",
        "",
        f"- guidellm: {errors} errors in all levels; at {top} streams it measures {g['tps']:,.0f} output tok/s, "
        f"{g['tps'] / o['tps']:.2f}x the project's own client, TTFT p50 {1000 * g['ttft50']:.0f} ms vs "
        f"{1000 * o['ttft50']:.0f} ms.",
    ])
    print(body)
    if not args.no_write:
        write_section("guidellm", "A standard client: guidellm vs the project's load generator", body)


if __name__ == "__main__":
    main()
