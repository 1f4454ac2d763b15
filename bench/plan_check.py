"""Predicted vs measured decode step time: ``moe-cluster plan``'s cost model (op costs calibrated on this machine,
cluster/engine/calibrate.py) against the cluster's measured step, for the shapes given, side by side in one run.

    python -m bench.plan_check [--size bench] [--workers 1 2 8] [--micro-batches 1 2] [--batch 8 32]

Decode step = the D decode steps' own times (the engine's stats) while the batch generates 1 + D tokens, over
every repeat, their least disturbed (calibrate.py least_disturbed_ms: the 20th percentile); prefill step = the
prefill step's own time, the same way. The median of the same steps is shown beside it.
One pool is up at a time, with its coordinators (one per micro-batch count), as a deployment runs; the local
engine takes turns with each pool's shapes, its steps pooled over the whole run (a shared host's speed drifts over
minutes, and between a fast and a slow state within seconds). The
calibration of op costs runs at the start and at the end, each cost the least disturbed of the two; each pool's
expert phases (workers/link_calibration.py: the exchange and the coordinator's resume) are timed before its shapes
run and after each repeat, and kept at the same 20th percentile as its steps: both sides describe the machine at
its least disturbed, over the same minutes. Each repeat runs the shapes in the reverse order of the one before.
Prediction = planning/plan.py's step_ms for the same shape (workers,
micro-batches, batch) with the costs calibrated at the run's thread count (1 unless ``--threads``). Also the local
engine (all experts in-process, the same threads) against its own prediction (every layer: the coordinator's part
plus every expert that has rows, no link).

``--threads T`` (T > 1): every process - calibration, local engine, coordinators, workers - on T intra-op
threads, idle threads passive, as `moe-cluster plan` deploys workers of several threads (where a node's cores
outnumber the experts; on 2 cores ``--threads 2 --workers 1 --micro-batches 1`` is the plan's rule before the
current one); its table is a section of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import ray
import torch

from bench.cluster_step import Peer, prompts
from bench.common import machine, progress, table, write_section
from bench.models import bench_model, describe
from cluster.engine.calibrate import calibrate, least_disturbed, least_disturbed_ms, step_times_ms
from cluster.engine.loop import EngineLoop
from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig
from cluster.model.config import ModelConfig
from cluster.planning.plan import Hardware, Plan, cpu_wait_policy, plan_cpus, split_experts, step_ms
from workers.cluster_engine import ClusterEngine, start_pool, stop_pool
from workers.link_calibration import cores_busy, exchange_ms, expert_phase_ms

PROMPT_LEN = 16


def shaped(plan: Plan, workers: int) -> Plan:
    return dataclasses.replace(plan, workers=split_experts(plan.sizes.num_experts, workers))


def local_step_ms(plan: Plan, costs: dict[str, Any], tokens: int, prefill: bool = False) -> float:
    """The local engine: every layer the coordinator's part and every expert that has rows, in one thread."""
    local = dataclasses.replace(plan, workers=[list(range(plan.sizes.num_experts))], overlaps=False)
    return step_ms(local, costs, tokens, 1, prefill=prefill, link_ms=0.0, resume_ms=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--prefill-prompts", type=int, default=8,
                        help="prefill check: this many prompts of --prefill-len tokens in one step")
    parser.add_argument("--prefill-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every process (see above)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    policy = cpu_wait_policy(args.threads)
    load_before = os.getloadavg()
    model = bench_model(args.size)
    cfg = ModelConfig.from_file(model)
    cores = os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    # Calibrated again in this run, at its start and at its end, and every shape measured in turns with others:
    # this machine's speed drifts over minutes (a shared host), and each side keeps its least disturbed time, so
    # that both describe the same machine.
    context = PROMPT_LEN + args.decode_tokens
    calibrate_now = functools.partial(
        calibrate, cfg, cfg.dtype, "cpu", context=context, cache=None,
        also=functools.partial(exchange_ms, cfg.hidden_size, cfg.dtype, tuple(sorted(set(args.workers)))))
    first_costs = calibrate_now()
    # measured once: disturbance lowers a ratio of CPU time to time, so the least of two would be the most disturbed
    busy = cores_busy(cfg, cfg.dtype, args.threads, context=context)
    # The plan for this machine, its processes on --threads threads: with 1 each side has a core of its own and two
    # micro-batches overlap them; with more, only their one-thread stretches overlap (plan.py parallel_share).
    base = dataclasses.replace(plan_cpus(cfg, Hardware("cpu", cores, 24)),
                               threads={"coordinator": args.threads, "worker": args.threads})
    ray.init(address="local", num_cpus=64, include_dashboard=False, log_to_driver=False)
    engine_cfg = EngineConfig(model=str(model), progress=False, enable_prefix_caching=False,
                              max_num_batched_tokens=4096, max_num_seqs=128,
                              num_kv_blocks=max(512, max(args.batch) * 4))
    prefill_batch = prompts(args.prefill_prompts, args.prefill_len, cfg.vocab_size, seed=2)
    prefill_tokens = args.prefill_prompts * args.prefill_len
    prefill_label = f"prefill {args.prefill_prompts} x {args.prefill_len}"
    local = EngineLoop.local(engine_cfg)
    # (name, micro-batches, plan or None for the local engine, peer)
    shapes: list[tuple[str, int, Plan | None, Peer]] = [(f"local engine, {args.threads} thread(s)", 1, None,
                                                         Peer("local", [local], threads=args.threads))]
    batches = {b: prompts(b, PROMPT_LEN, cfg.vocab_size, seed=1) for b in args.batch}
    runs: dict[tuple[int, object], list[float]] = defaultdict(list)  # (shape, batch or "prefill") -> step ms
    # Each pool's expert phases (workers/link_calibration.py) timed before its shapes run and after each of their
    # repeats, and kept as its steps are (least_disturbed_ms of the samples): the phases its predictions use saw the
    # machine over the same minutes, and at the same quantile, as its measured steps did.
    phase_samples: dict[tuple[str, str, str], list[float]] = defaultdict(list)  # (key, W, tokens) -> ms

    def measure(indices: list[int], label: str, between: Callable[[], None]) -> None:
        """Every shape of ``indices`` once per repeat, taking turns (warmed up first); ``between`` before the first
        repeat and after each."""
        for i in indices:
            for batch in batches.values():
                shapes[i][3].generate(batch, 2)
            shapes[i][3].generate(prefill_batch, 1)
        between()
        for rep in range(args.repeats):
            for i in (indices if rep % 2 == 0 else indices[::-1]):  # no shape always right after the same one
                peer = shapes[i][3]
                for b, batch in batches.items():
                    runs[i, b] += step_times_ms(peer.engines[0], functools.partial(
                        peer.generate, batch, 1 + args.decode_tokens), b)
                runs[i, "prefill"] += step_times_ms(peer.engines[0], functools.partial(
                    peer.generate, prefill_batch, 1), prefill_tokens)
            between()
            progress(f"{label}: repeat {rep + 1}/{args.repeats} done")

    try:
        # One deployment up at a time, as the model predicts it (idle pools and coordinators beside it are other
        # processes on the same 2 cores); the local engine takes turns with each, its steps pooled over all.
        for workers in args.workers:
            epw = -(-cfg.num_experts // workers)
            progress(f"pool of {workers} worker(s) x {epw} experts")
            pool = start_pool(engine_cfg, PoolConfig(experts_per_worker=epw, threads_per_worker=args.threads,
                                                     worker_omp_wait_policy=policy))
            engines: list[Any] = []
            try:
                for micro in args.micro_batches:
                    engine = ClusterEngine.start(engine_cfg, ClusterConfig(
                        micro_batches=micro, coordinator_threads=args.threads, coordinator_omp_wait_policy=policy),
                        pool=pool)
                    engines.append(engine)
                    shapes.append((f"cluster, {workers} worker(s) x {epw}", micro, shaped(base, workers),
                                   Peer("c", [engine], pool=pool)))
                def time_phases(workers: int = workers) -> None:
                    timed = expert_phase_ms(cfg, cfg.dtype, (workers,), threads=args.threads, context=context)
                    for key, by_workers in timed.items():
                        for tokens, ms in by_workers[str(workers)].items():
                            phase_samples[key, str(workers), tokens].append(ms)

                measure([0, *range(len(shapes) - len(engines), len(shapes))], f"pool of {workers}", time_phases)
            finally:
                for engine in engines:
                    engine.shutdown()
                stop_pool(pool)
    finally:
        local.shutdown()
    ray.shutdown()
    costs = least_disturbed(first_costs, calibrate_now()) | busy
    for (key, workers, tokens), samples in phase_samples.items():
        costs.setdefault(key, {}).setdefault(workers, {})[tokens] = least_disturbed_ms(samples)
    rows: list[list[object]] = []
    for i, (name, micro, plan, _) in enumerate(shapes):
        def predicted(tokens: int, prefill: bool, plan: Plan | None = plan, micro: int = micro) -> float:
            if plan is None:
                return local_step_ms(base, costs, tokens, prefill=prefill)
            return step_ms(plan, costs, tokens, micro, prefill=prefill)

        shown = "-" if plan is None else micro
        for key, label, tokens in [*((b, b, b) for b in args.batch), ("prefill", prefill_label, prefill_tokens)]:
            rows.append(_row(name, shown, label, predicted(tokens, key == "prefill"),
                             least_disturbed_ms(runs[i, key]), statistics.median(runs[i, key])))
    load_after = os.getloadavg()
    # counted on the unrounded error (the table shows it rounded: -15.5% reads "-15%")
    within = sum(1 for r in rows if abs(float(str(r[3])) - float(str(r[4]))) <= 0.15 * float(str(r[4])))
    body = "\n".join([
        f"Machine: {machine()}. Model {describe(args.size)}. Load average (1/5/15 min) before "
        f"{'/'.join(f'{v:.1f}' for v in load_before)}, after {'/'.join(f'{v:.1f}' for v in load_after)} on "
        f"{cores} cores"
        + (": a quiet machine (1-minute load at most 1 before; the load after counts this run's own processes). "
           if load_before[0] <= 1.0 else
           ": the machine was shared with other jobs while this ran, so the measured times carry their noise. ")
        + "Command: `python -m bench.plan_check --size "
        f"{args.size} --workers {' '.join(map(str, args.workers))} --micro-batches "
        f"{' '.join(map(str, args.micro_batches))} --batch {' '.join(map(str, args.batch))}"
        + (f" --threads {args.threads}" if args.threads > 1 else "") + "`.",
        f"Op costs: calibrated in this run at its start and at its end, each the least disturbed of the two "
        f"({costs['device']}, {costs['threads']} thread(s)"
        + (", idle threads of the deployed processes passive" if policy else "")
        + "); each pool's expert phases timed before its shapes and after each repeat, their 20th percentile "
        f"kept; one pool up at a time with its coordinators, each of its shapes and the local engine measured once "
        f"per repeat ({args.repeats}), in reverse order every other repeat; measured = the 20th percentile of every "
        "repeat's steps (a step's own time from the engine's stats): this machine switches between a fast and a "
        "slow state within seconds.",
        "",
        table(["engine", "micro-batches", "sequences (decode) or prompts", "predicted ms/step", "measured ms/step",
               "error", "median step ms"], rows),
        "",
        f"- {within} of {len(rows)} shapes (decode steps and the prefill step) predicted within 15% of the measured "
        "time.",
    ])
    print(body)
    print(json.dumps({"costs": costs}))  # what the predictions used, for a closer look (not in the docs)
    if not args.no_write:
        if args.threads == 1:
            write_section("plan_check", "Predicted vs measured decode step (moe-cluster plan's cost model)", body)
        else:
            write_section(f"plan_check_threads{args.threads}", "Predicted vs measured decode step, every process "
                          f"on {args.threads} threads (passive; the CPU plan's shape where cores outnumber experts)",
                          body)


def _row(name: str, micro: object, batch: object, predicted: float, measured: float, median: float) -> list[object]:
    return [name, micro, batch, round(predicted, 2), round(measured, 2), f"{(predicted - measured) / measured:+.0%}",
            round(median, 2)]


if __name__ == "__main__":
    main()
