"""Expert load balancing on a skewed model: one coordinator on one expert pool at 32 concurrent sequences, with the
contiguous expert map (before) and with the map the pool's rebalance computed from the load it measured (after),
side by side in one run.

    python -m bench.eplb [--size bench] [--skew 8] [--experts-per-worker 4 2] [--concurrency 32]
                         [--workloads 32:64 256:16] [--repeats 5]

One table per pool shape (``--experts-per-worker``: 4 gives 2 workers, 2 gives 4), each with R = workers / 2
redundant slots, and per workload (PROMPT:GENERATED tokens per sequence): decode-heavy (32:64) and prefill-heavy
(256:16).

The model is the benchmark size with routers skewed by ``--skew`` (cluster/model/demo.py: each layer prefers its own
group of adjacent experts, which the contiguous map puts on one worker). First a run with the contiguous map fills
the pool's load window and ``ExpertPool.rebalance`` decides the new map (its own threshold and gain rules); then the
two maps take turns, each repeat, so that machine noise hits both alike (switching maps is the live path: workers
load the new version's experts, the coordinator moves between steps). Per map and workload: the imbalance the
workers measured (the most loaded worker's rows over the mean, layer by layer), how long each step waited for its
slowest expert worker (the coordinator's ``wait``, summed over layers: what balancing shortens), and tokens per
second (prompt and generated tokens, over the whole run).
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
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig
from cluster.model.config import ModelConfig
from cluster.moe import eplb
from cluster.moe.expert_map import ExpertMap
from workers.cluster_engine import ClusterEngine, start_pool, stop_pool


def worker_layer_rows(pool: Any) -> list[list[int]]:
    """[layer][worker] rows computed so far."""
    stats = sorted(ray.get(pool.worker_stats.remote()), key=lambda s: s["worker_index"])
    return [[sum(s["rows_per_expert"][layer]) for s in stats] for layer in range(len(stats[0]["rows_per_expert"]))]


def use_map(pool: Any, engine: ClusterEngine, placement: list[list[list[int]]]) -> int:
    """Switch the pool to ``placement`` and wait until the (idle) coordinator has moved to it."""
    report = ray.get(pool.rebalance.remote(placement=placement))
    if not report["applied"]:
        raise RuntimeError(f"the pool did not take the placement: {report}")
    deadline = time.monotonic() + 30
    while engine.describe()["map_version"] != report["map_version"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the coordinator did not move to the new map")
        time.sleep(0.1)
    return int(report["map_version"])


def generate(engine: ClusterEngine, batch: list[list[int]], tokens: int) -> float:
    started = time.perf_counter()
    engine.generate(batch, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    return time.perf_counter() - started


def measure(pool: Any, engine: ClusterEngine, batch: list[list[int]], output_len: int) -> dict[str, float]:
    """One run on the current map: the workers' imbalance, the wait for experts per step, tokens/s."""
    rows_before, stats_before = worker_layer_rows(pool), engine.stats().backend
    seconds = generate(engine, batch, output_len)
    rows_after, stats_after = worker_layer_rows(pool), engine.stats().backend
    rows = [[a - b for a, b in zip(la, lb, strict=True)] for la, lb in zip(rows_after, rows_before, strict=True)]
    steps = stats_after["steps"] - stats_before["steps"]
    return {"imbalance": eplb.imbalance(rows), "tok_s": sum(len(p) + output_len for p in batch) / seconds,
            "wait_ms": 1000 * (stats_after["wait"] - stats_before["wait"]) / steps}


def run_shape(model: Any, cfg: ModelConfig, experts_per_worker: int, args: argparse.Namespace) -> str:
    workers = -(-cfg.num_experts // experts_per_worker)
    redundant = max(1, workers // 2)
    progress(f"{workers} workers x {experts_per_worker} experts, {redundant} redundant slot(s)")
    longest = max(p + o for p, o in args.workloads)
    engine_cfg = EngineConfig(model=str(model), progress=False, max_num_seqs=args.concurrency,
                              max_num_batched_tokens=4096, num_kv_blocks=args.concurrency * (longest // 16 + 2))
    gen = torch.Generator().manual_seed(1)
    batches = {(p, o): [torch.randint(3, cfg.vocab_size, (p,), generator=gen).tolist()
                        for _ in range(args.concurrency)] for p, o in args.workloads}
    pool = start_pool(engine_cfg, PoolConfig(experts_per_worker=experts_per_worker, threads_per_worker=1,
                                             redundant_experts=redundant))
    engine = ClusterEngine.start(engine_cfg, ClusterConfig(coordinator_threads=1), pool=pool)
    try:
        contiguous = [[list(e) for e in layer] for layer in
                      ExpertMap.contiguous(cfg.num_experts, experts_per_worker, cfg.num_layers).layers]
        progress("measuring the load with the contiguous map")
        for (_, output_len), batch in batches.items():
            generate(engine, batch, output_len)
        decision = ray.get(pool.rebalance.remote())
        if not decision["applied"]:
            raise RuntimeError(f"the pool found nothing worth rebalancing: {decision}")
        balanced = ray.get(pool.describe.remote())["placement"]
        progress(f"rebalanced: expected imbalance {decision['before']:.2f} -> {decision['after']:.2f}, "
                 f"{len(decision['moved'])} expert copies moved")
        maps = {"contiguous (before)": contiguous, "rebalanced (after)": balanced}
        results: dict[tuple[str, tuple[int, int]], list[dict[str, float]]] = {}
        switch_s: list[float] = []
        for rep in range(args.repeats):
            for name, placement in maps.items():
                started = time.perf_counter()
                use_map(pool, engine, placement)
                switch_s.append(time.perf_counter() - started)
                generate(engine, batches[args.workloads[0]], 2)  # warm-up on this map
                for workload, batch in batches.items():
                    results.setdefault((name, workload), []).append(measure(pool, engine, batch, workload[1]))
            progress(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(
                f"{n} {w[0]}:{w[1]} {r[-1]['tok_s']:.0f} tok/s" for (n, w), r in results.items()))
    finally:
        engine.shutdown()
        stop_pool(pool)
    med = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in results.items()}
    rows = []
    for (name, workload), m in med.items():
        base = med[("contiguous (before)", workload)]
        rows.append([f"{workload[0]}:{workload[1]}", name, f"{m['imbalance']:.2f}", f"{m['wait_ms']:.1f}",
                     f"{m['tok_s']:,.0f}", f"{m['tok_s'] / base['tok_s']:.2f}x"])
    rows.sort(key=lambda r: (str(r[0]), str(r[1])))
    return "\n".join([
        f"### {workers} expert workers x {experts_per_worker} experts, {redundant} redundant slot(s)",
        "",
        table(["prompt:generated", "expert map", "measured imbalance", "wait for experts, ms per step",
               "tokens/s", "throughput ratio"], rows),
        "",
        f"The rebalance's own estimate from the first runs' load: {decision['before']:.2f} -> "
        f"{decision['after']:.2f}, {len(decision['moved'])} expert copies moved; a live switch between the two maps "
        f"took {statistics.median(switch_s):.1f} s (median: workers load the experts they lack, the idle coordinator "
        f"moves at its next heartbeat).",
        ""])


def workload(text: str) -> tuple[int, int]:
    prompt, _, output = text.partition(":")
    return int(prompt), int(output)


NOTE = ("How to read it: *wait for experts* is the time each step's layers waited for their slowest expert worker, "
        "which is what balancing shortens. On the 2-core development machine the coordinator and every worker share "
        "two cores, so tokens/s is bounded by the total CPU work, which balancing does not reduce (replicas even add "
        "some: at decode sizes an expert call costs mostly the reading of its weights, once per hosted expert and "
        "layer, not its rows); with a core or a GPU per worker, the most loaded worker sets every layer's pace and "
        "the wait is most of the step. The placement is computed from the load of both workloads together, so it "
        "fits the prefill-heavy one (most of the rows) better than the decode-heavy one.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--skew", type=float, default=8.0)
    parser.add_argument("--experts-per-worker", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workloads", type=workload, nargs="+", default=[(32, 64), (256, 16)],
                        metavar="PROMPT:GENERATED")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    model = bench_model(args.size, args.skew)
    cfg = ModelConfig.from_file(model)
    progress(f"model {describe(args.size)}, router skew {args.skew:g}")
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    try:
        tables = [run_shape(model, cfg, k, args) for k in args.experts_per_worker]
    finally:
        ray.shutdown()
    body = "\n".join([
        f"Machine: {machine()}; coordinator and expert workers 1 intra-op thread each. Model {describe(args.size)}, "
        f"routers skewed with Z = {args.skew:g}; {args.concurrency} concurrent sequences of random prompt tokens, "
        f"greedy; medians of {args.repeats} rounds, the two maps in turn. Command: `python -m bench.eplb --size "
        f"{args.size} --skew {args.skew:g} --experts-per-worker {' '.join(map(str, args.experts_per_worker))} "
        f"--concurrency {args.concurrency} --workloads {' '.join(f'{p}:{o}' for p, o in args.workloads)}`.",
        "",
        *tables,
        NOTE])
    print(body)
    if not args.no_write:
        write_section("eplb", "Expert load balancing: before and after a rebalance on a skewed model", body)


if __name__ == "__main__":
    main()
