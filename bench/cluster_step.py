"""Cluster engine vs local engine, same model and batch, side by side in one run: decode step latency and
prefill tokens/s, with a breakdown of where a cluster decode step's time goes.

    python -m bench.cluster_step [--sizes demo mid] [--batch 16] [--decode-tokens 24] [--prefill-len 128]

Decode step = (time for 1 + D tokens - time for 1 token) / D over the whole batch; prefill = batch x
prefill-len prompt tokens with one output token. Each engine is measured in turn, repeatedly (median).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import ray
import torch

from bench.common import machine, progress, table, write_section
from bench.models import bench_model, describe
from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig
from cluster.engine_loop import LocalEngine
from cluster.sampling import SamplingParams
from workers.cluster_engine import ClusterEngine

Engine = Any  # LocalEngine | ClusterEngine


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(batch)]


def timed_generate(engine: Engine, batch: list[list[int]], max_tokens: int) -> float:
    started = time.perf_counter()
    engine.generate(batch, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return time.perf_counter() - started


def moe_timings(engine: Engine) -> dict[str, float]:
    timings = dict(engine.stats().backend)
    if isinstance(engine, ClusterEngine):
        workers = engine.worker_stats()
        timings["expert_compute"] = sum(w["compute_s"] for w in workers) / len(workers)
    return timings


def measure(engines: dict[str, Engine], args: argparse.Namespace, vocab: int) -> dict[str, dict[str, float]]:
    decode_batch = prompts(args.batch, 16, vocab, seed=1)
    prefill_batch = prompts(args.batch, args.prefill_len, vocab, seed=2)
    samples: dict[str, dict[str, list[float]]] = {name: {"decode": [], "prefill": []} for name in engines}
    breakdown: dict[str, dict[str, float]] = {name: {} for name in engines}
    for engine in engines.values():  # warm-up
        timed_generate(engine, decode_batch, 2)
    for rep in range(args.repeats):
        for name, engine in engines.items():
            t0 = moe_timings(engine)
            short = timed_generate(engine, decode_batch, 1)
            t1 = moe_timings(engine)
            long = timed_generate(engine, decode_batch, 1 + args.decode_tokens)
            t2 = moe_timings(engine)
            samples[name]["decode"].append((long - short) / args.decode_tokens)
            # The long run's backend time minus the short run's: what its decode steps alone spent.
            for key in t2:
                value = (t2[key] - t1.get(key, 0.0)) - (t1.get(key, 0.0) - t0.get(key, 0.0))
                breakdown[name][key] = breakdown[name].get(key, 0.0) + value / args.repeats
            samples[name]["prefill"].append(len(prefill_batch) * args.prefill_len /
                                            timed_generate(engine, prefill_batch, 1))
        progress(f"repeat {rep + 1}/{args.repeats} done")
    results: dict[str, dict[str, float]] = {}
    for name in engines:
        r = {"decode_ms": 1000 * statistics.median(samples[name]["decode"]),
             "prefill_tps": statistics.median(samples[name]["prefill"])}
        b = breakdown[name]
        if b.get("steps", 0.0):
            per_step = {k: 1000 * v / args.decode_tokens for k, v in b.items() if k != "steps"}
            moe = sum(per_step.get(k, 0.0) for k in ("route", "control", "exchange", "combine"))
            r |= {"coordinator_ms": r["decode_ms"] - moe, "route_ms": per_step.get("route", 0.0),
                  "control_ms": per_step.get("control", 0.0),
                  "transfer_ms": per_step.get("exchange", 0.0) - per_step.get("expert_compute", 0.0),
                  "experts_ms": per_step.get("expert_compute", 0.0), "combine_ms": per_step.get("combine", 0.0)}
        results[name] = r
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=["demo", "mid"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=24)
    parser.add_argument("--prefill-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    sections = [f"Machine: {machine()}; actors use 1 intra-op thread each, the local engine "
                f"{torch.get_num_threads()}. Command: `python -m bench.cluster_step --sizes {' '.join(args.sizes)}`.",
                f"Batch {args.batch}: decode step = one token for each of the {args.batch} sequences; prefill = "
                f"{args.batch} x {args.prefill_len}-token prompts. Breakdown columns are per decode step (ms).", ""]
    for size in args.sizes:
        model = bench_model(size)
        progress(f"model {describe(size)}")
        engine_cfg = EngineConfig(model=str(model), progress=False, max_num_batched_tokens=4096,
                                  num_kv_blocks=max(256, args.batch * 64))
        engines: dict[str, Engine] = {"local engine": LocalEngine.from_config(engine_cfg)}
        for epw in (1, 2):
            progress(f"starting cluster, {epw} expert(s) per worker")
            engines[f"cluster, {epw} expert/worker"] = ClusterEngine.start(
                engine_cfg, ClusterConfig(), PoolConfig(experts_per_worker=epw, threads_per_worker=1))
        vocab = engines["local engine"].model_config.vocab_size
        try:
            results = measure(engines, args, vocab)
        finally:
            for engine in engines.values():
                engine.shutdown()
        base = results["local engine"]
        rows = []
        for name, r in results.items():
            rows.append([name, r["decode_ms"], base["decode_ms"] / r["decode_ms"], r["prefill_tps"],
                         r["prefill_tps"] / base["prefill_tps"],
                         *(f"{r[k]:.2f}" if k in r else "-" for k in (
                             "coordinator_ms", "route_ms", "control_ms", "transfer_ms", "experts_ms", "combine_ms"))])
        sections += [f"### Model {describe(size)}", "",
                     table(["engine", "decode step ms", "speed vs local", "prefill tok/s", "prefill vs local",
                            "coordinator", "routing", "control", "counts+rows out, results back", "expert compute",
                            "combine"], rows), ""]
    sections += [
        "Columns: *coordinator* = attention, norms, LM head and sampling (the step minus the MoE parts); "
        "*control* = the step's control message; *counts+rows out, results back* = the per-layer exchange "
        "with the workers, minus their expert compute: message latency, including waking each worker process; "
        "*expert compute* = the experts' matmuls, averaged over workers (they run in parallel).",
    ]
    body = "\n".join(sections)
    print(body)
    if not args.no_write:
        write_section("cluster_step", "Cluster decode step and prefill vs the local engine", body)


if __name__ == "__main__":
    main()
