"""Predicted vs measured decode step time: ``moe-cluster plan``'s cost model (op costs calibrated on this machine,
cluster/planning/calibrate.py) against the cluster's measured step, for the shapes given, side by side in one run.

    python -m bench.plan_check [--size bench] [--workers 1 2 8] [--micro-batches 1 2] [--batch 8 32]

Decode step = (time for 1 + D tokens - time for 1 token) / D over the batch (bench/cluster_step.py's measure),
median of repeats; prediction = planning/plan.py's step_ms for the same shape (workers, micro-batches, batch) with
the calibrated costs at 1 thread. Also the local engine (all experts in-process, 1 thread) against its own
prediction (every layer: the coordinator's part plus every expert that has rows, no link).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import ray
import torch

from bench.cluster_step import Peer, measure, prompts
from bench.common import machine, progress, table, write_section
from bench.models import bench_model, describe
from cluster.engine.loop import EngineLoop
from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig
from cluster.model.config import ModelConfig
from cluster.planning.calibrate import calibrate
from cluster.planning.plan import Hardware, Plan, interpolate, plan_cpus, split_experts, step_ms, worker_layer_ms
from workers.cluster_engine import ClusterEngine, start_pool, stop_pool

PROMPT_LEN = 16


def shaped(plan: Plan, workers: int, cores: int) -> Plan:
    experts = split_experts(plan.sizes.num_experts, workers)
    return dataclasses.replace(plan, workers=experts, overlaps=cores >= 1 + len(experts))


def local_step_ms(plan: Plan, costs: dict[str, object], batch: int) -> float:
    coord = interpolate(costs["coordinator_layer"], batch)  # type: ignore[arg-type]
    experts = worker_layer_ms(costs, plan.sizes.num_experts, plan.sizes.num_experts, plan.top_k, batch)
    return plan.sizes.num_layers * (coord + experts) + interpolate(costs["lm_head"], batch)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()
    model = bench_model(args.size)
    cfg = ModelConfig.from_file(model)
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)
    costs = calibrate(cfg, cfg.dtype, "cpu", context=PROMPT_LEN + args.decode_tokens)
    base = plan_cpus(cfg, Hardware("cpu", cores, 24))
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    engine_cfg = EngineConfig(model=str(model), progress=False, max_num_batched_tokens=4096, max_num_seqs=128,
                              num_kv_blocks=max(512, max(args.batch) * 4))
    rows: list[list[object]] = []
    local = EngineLoop.local(engine_cfg)
    try:
        for batch_size in args.batch:
            batch = prompts(batch_size, PROMPT_LEN, cfg.vocab_size, seed=1)
            measured = measure([Peer("local", [local], threads=1)], batch, args.decode_tokens, args.repeats)
            predicted = local_step_ms(base, costs, batch_size)
            rows.append(_row("local engine, 1 thread", "-", batch_size, predicted, measured["local"]["step_ms"]))
    finally:
        local.shutdown()
    for workers in args.workers:
        epw = -(-cfg.num_experts // workers)
        progress(f"pool of {workers} worker(s) x {epw} experts")
        pool = start_pool(engine_cfg, PoolConfig(experts_per_worker=epw, threads_per_worker=1))
        try:
            plan = shaped(base, workers, cores)
            for micro in args.micro_batches:
                engine = ClusterEngine.start(engine_cfg, ClusterConfig(micro_batches=micro), pool=pool)
                try:
                    for batch_size in args.batch:
                        batch = prompts(batch_size, PROMPT_LEN, cfg.vocab_size, seed=1)
                        got = measure([Peer("c", [engine], pool=pool)], batch, args.decode_tokens, args.repeats)
                        predicted = step_ms(plan, costs, batch_size, micro, prefill=False)
                        rows.append(_row(f"cluster, {len(plan.workers)} worker(s) x {epw}", micro, batch_size,
                                         predicted, got["c"]["step_ms"]))
                        progress(f"{rows[-1]}")
                finally:
                    engine.shutdown()
        finally:
            stop_pool(pool)
    ray.shutdown()
    load_after = os.getloadavg()
    within = sum(1 for r in rows if abs(float(str(r[5]).rstrip("%"))) <= 15)
    body = "\n".join([
        f"Machine: {machine()}. Model {describe(args.size)}. Load average (1/5/15 min) before "
        f"{'/'.join(f'{v:.1f}' for v in load_before)}, after {'/'.join(f'{v:.1f}' for v in load_after)} on "
        f"{cores} cores: the machine was shared with other jobs while this ran, so the measured times carry "
        "their noise. Command: `python -m bench.plan_check --size "
        f"{args.size} --workers {' '.join(map(str, args.workers))} --micro-batches "
        f"{' '.join(map(str, args.micro_batches))} --batch {' '.join(map(str, args.batch))}`.",
        f"Op costs: {costs.get('cached', 'measured in this run')} ({costs['device']}, {costs['threads']} thread).",
        "",
        table(["engine", "micro-batches", "sequences", "predicted ms/step", "measured ms/step", "error"], rows),
        "",
        f"- {within} of {len(rows)} shapes predicted within 15% of the measured decode step.",
    ])
    print(body)
    if not args.no_write:
        write_section("plan_check", "Predicted vs measured decode step (moe-cluster plan's cost model)", body)


def _row(name: str, micro: object, batch: int, predicted: float, measured: float) -> list[object]:
    return [name, micro, batch, round(predicted, 2), round(measured, 2), f"{(predicted - measured) / measured:+.0%}"]


if __name__ == "__main__":
    main()
