"""Memory of two engine replicas: sharing one expert pool against one private pool each, side by side in one run.

    python -m bench.memory [--size bench] [--experts-per-worker 4] [--engines 2]

Each peer starts its coordinators (and pools) on a local Ray, generates a few tokens so every buffer exists, then
sums the proportional set size (PSS, /proc/PID/smaps_rollup: shared pages split among their users) of its
coordinator and worker processes. PSS, unlike RSS, does not count the torch libraries shared by all processes
once per process. The expert weights' own size is printed beside them for reference.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from bench.common import machine, progress, table, write_section
from bench.models import bench_model, describe
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig
from cluster.model.config import ModelConfig
from workers.cluster_engine import ClusterEngine, start_pool, stop_pool

MIB = 1 << 20


def pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss line for pid {pid}")


@contextmanager
def replicas(engine_cfg: EngineConfig, pool_cfg: PoolConfig, engines: int, shared: bool) -> Iterator[
        list[ClusterEngine]]:
    """``engines`` coordinators on one pool (shared) or each on its own pool."""
    pools = [start_pool(engine_cfg, pool_cfg) for _ in range(1 if shared else engines)]
    started: list[ClusterEngine] = []
    try:
        for i in range(engines):
            started.append(ClusterEngine.start(engine_cfg, ClusterConfig(), pool=pools[0 if shared else i]))
        yield started
    finally:
        for engine in started:
            engine.shutdown()
        for pool in pools:
            stop_pool(pool)


def measure(engines: list[ClusterEngine]) -> dict[str, float]:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for engine in engines:
        engine.generate([[1, 2, 3, 4] * 8] * 4, params)
    coordinators = {engine.describe()["pid"] for engine in engines}
    workers: set[int] = set()
    for engine in engines:
        workers |= {w["pid"] for w in engine.describe()["pool"]["workers"]}
    coordinator_mib = sum(pss_bytes(pid) for pid in coordinators) / MIB
    worker_mib = sum(pss_bytes(pid) for pid in workers) / MIB
    return {"coordinators": len(coordinators), "workers": len(workers), "coordinator_mib": coordinator_mib,
            "worker_mib": worker_mib, "total_mib": coordinator_mib + worker_mib}


def expert_bytes(cfg: ModelConfig) -> int:
    return cfg.num_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--experts-per-worker", type=int, default=4)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    model = str(bench_model(args.size))
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    engine_cfg = EngineConfig(model=model, progress=False, max_num_seqs=32, num_kv_blocks=256)
    pool_cfg = PoolConfig(experts_per_worker=args.experts_per_worker, threads_per_worker=1)
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, shared in ((f"{args.engines} coordinators on one shared pool", True),
                             (f"{args.engines} coordinators, a private pool each", False)):
            progress(f"starting: {name}")
            with replicas(engine_cfg, pool_cfg, args.engines, shared) as engines:
                results[name] = measure(engines)
    finally:
        ray.shutdown()
    print(report(args, ModelConfig.from_file(model), results))


def report(args: argparse.Namespace, cfg: ModelConfig, results: dict[str, dict[str, Any]]) -> str:
    shared, private = results.values()
    rows = [[name, r["coordinators"], r["workers"], r["coordinator_mib"], r["worker_mib"], r["total_mib"]]
            for name, r in results.items()]
    headers = ["peer", "coordinator processes", "worker processes", "coordinators PSS MiB", "workers PSS MiB",
               "total PSS MiB"]
    experts_mib = expert_bytes(cfg) / MIB
    saved = private["total_mib"] - shared["total_mib"]
    body = "\n".join([
        f"Machine: {machine()}. Model {describe(args.size)}; {args.experts_per_worker} experts per worker; the "
        f"experts' weights are {experts_mib:,.0f} MiB in float32. Command: `python -m bench.memory --size "
        f"{args.size} --engines {args.engines} --experts-per-worker {args.experts_per_worker}`.",
        "",
        table(headers, rows),
        "",
        f"- Sharing the pool uses {shared['total_mib'] / private['total_mib']:.2f}x the memory of private pools "
        f"({saved:,.0f} MiB less, {saved / experts_mib:.2f}x the experts' weights).",
    ])
    if not args.no_write:
        write_section(f"memory_{args.size}", f"Memory: one shared expert pool vs a pool per engine replica "
                      f"({args.size} model)", body)
    return body


if __name__ == "__main__":
    main()
