"""A decode step of the cluster against the local engine, same model and batch, side by side in one run, with
where every millisecond of a cluster step goes.

    python -m bench.cluster_step [--sizes bench demo] [--batch 32] [--decode-tokens 16] [--experts-per-worker 4]

Peers: the local engine (1 and 2 intra-op threads), and coordinators on one expert pool: serial (1 micro-batch;
also over process-group (gloo) links instead of shared memory), ping-pong (2 micro-batches), and two coordinators
running the batch at the same time (the pool merges their rows). Decode step = (time for 1 + D tokens - time for
1 token) / D over the whole batch; median of repeats.

Breakdown of a cluster step (ms per step, summed over layers): *coordinator* = everything but the MoE phases
(embeddings, attention, norms, LM head, sampling, scheduling); *route+send* = routing, the dispatch plan and
the sends, wall time, with in brackets the coordinator thread's CPU time (the rest is waiting for a core: a worker
woken by a send may take the sender's core); then the wait for the last worker of each layer, split by clock stamps
(one node, one clock): *wake* (sent -> the worker read it), *hold* (read -> its expert call started: merge window,
earlier work), *expert* (the call, wall; in brackets the worker thread's CPU time: the rest is waiting for a core),
*back* (finished -> the coordinator had the results); *combine* = weighting rows back onto tokens. The fixed cost
of one layer's exchange is route+send CPU + wake + back + combine, per layer.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import threading
import time
from typing import Any

import ray
import torch

from bench.common import machine, progress, table, write_section
from bench.models import bench_model, describe
from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig
from cluster.model.config import ModelConfig
from workers.cluster_engine import ClusterEngine, start_pool, stop_pool


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(batch)]


class Peer:
    """One or more engines that run the batch at the same time; a decode step is measured across all of them."""

    def __init__(self, name: str, engines: list[Any], pool: Any = None, threads: int | None = None) -> None:
        self.name, self.engines, self.pool, self.threads = name, engines, pool, threads

    def generate(self, batch: list[list[int]], tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        if self.threads is not None:
            torch.set_num_threads(self.threads)
            for engine in self.engines:  # a local engine runs on its own thread, where the count must be set
                if isinstance(engine, EngineLoop):
                    engine.call(functools.partial(torch.set_num_threads, self.threads)).result()
        started = time.perf_counter()
        threads = [threading.Thread(target=e.generate, args=(batch, params)) for e in self.engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started

    def counters(self) -> dict[str, float]:
        """Phase seconds of the first engine, and the pool's worker compute (wall and CPU, mean over workers)."""
        stats = self.engines[0].stats()
        out = {k: float(v) for k, v in (stats.backend | stats.step_seconds).items()}
        if self.pool is not None:
            workers = ray.get(self.pool.worker_stats.remote())
            out["worker_compute"] = sum(w["compute_s"] for w in workers) / len(workers)
            out["worker_cpu"] = sum(w["compute_cpu_s"] for w in workers) / len(workers)
            out["worker_rows"] = sum(w["rows"] for w in workers)
            out["worker_calls"] = sum(w["calls"] for w in workers)
        return out


def measure(peers: list[Peer], batch: list[list[int]], decode_tokens: int, repeats: int) -> dict[str, dict[str, float]]:
    for peer in peers:  # warm-up
        peer.generate(batch, 2)
    steps: dict[str, list[float]] = {p.name: [] for p in peers}
    phases: dict[str, dict[str, float]] = {p.name: {} for p in peers}
    for rep in range(repeats):
        for peer in peers:
            c0 = peer.counters()
            short = peer.generate(batch, 1)
            c1 = peer.counters()
            long = peer.generate(batch, 1 + decode_tokens)
            c2 = peer.counters()
            steps[peer.name].append((long - short) / decode_tokens)
            for key in c2:  # the long run's counters minus the short run's: its decode steps alone
                value = (c2[key] - c1.get(key, 0.0)) - (c1.get(key, 0.0) - c0.get(key, 0.0))
                phases[peer.name][key] = phases[peer.name].get(key, 0.0) + value / repeats / decode_tokens
        progress(f"repeat {rep + 1}/{repeats} done")
    counts = ("worker_rows", "worker_calls", "timed_layers")  # per step, not seconds
    return {p.name: {"step_ms": 1000 * statistics.median(steps[p.name]),
                     **{k: v if k in counts else 1000 * v for k, v in phases[p.name].items()}} for p in peers}


def row(name: str, r: dict[str, float], base_ms: float, layers: int, sequences: int) -> list[object]:
    step = r["step_ms"]
    cells: list[object] = [name, step, f"{base_ms / step:.2f}x", f"{1000 * sequences / step:,.0f}"]
    if "wait" not in r:
        return cells + ["-"] * 9
    moe = r.get("route_and_send", 0.0) + r.get("wait", 0.0) + r.get("combine", 0.0)
    fixed = (r.get("route_and_send_cpu", 0.0) + r.get("wake", 0.0) + r.get("back", 0.0) + r.get("combine", 0.0))
    calls = r.get("worker_calls", 0.0)
    on_core = r.get("worker_cpu", 0.0) / r["worker_compute"] if r.get("worker_compute") else 1.0
    cells += [f"{step - moe:.1f}", f"{r.get('route_and_send', 0.0):.1f} [{r.get('route_and_send_cpu', 0.0):.1f}]",
              f"{r.get('wake', 0.0):.1f}", f"{r.get('hold', 0.0):.1f}",
              f"{r.get('expert', 0.0):.1f} [{on_core * r.get('expert', 0.0):.1f}]",
              f"{r.get('back', 0.0):.1f}", f"{r.get('combine', 0.0):.1f}", f"{fixed / layers:.2f}",
              f"{r.get('worker_rows', 0.0) / calls:.1f}" if calls else "-"]
    return cells


def run_size(size: str, args: argparse.Namespace) -> str:
    model = bench_model(size)
    cfg = ModelConfig.from_file(model)
    progress(f"model {describe(size)}")
    engine_cfg = EngineConfig(model=str(model), progress=False, enable_prefix_caching=False,
                              max_num_batched_tokens=4096, max_num_seqs=128,
                              num_kv_blocks=max(512, args.batch * 16))
    batch = prompts(args.batch, 16, cfg.vocab_size, seed=1)
    peers = [Peer("local engine, 1 thread", [EngineLoop.local(engine_cfg)], threads=1),
             Peer("local engine, 2 threads", [EngineLoop.local(engine_cfg)], threads=2)]
    progress(f"starting an expert pool ({args.experts_per_worker} experts per worker) and its coordinators")
    pool = start_pool(engine_cfg, PoolConfig(experts_per_worker=args.experts_per_worker, threads_per_worker=1,
                                             merge_wait_ms=args.merge_wait_ms))
    try:
        def coordinator(micro_batches: int, link: str = "auto") -> ClusterEngine:
            return ClusterEngine.start(engine_cfg, ClusterConfig(micro_batches=micro_batches, link=link), pool=pool)

        peers += [Peer("cluster, serial (1 micro-batch)", [coordinator(1)], pool, threads=1),
                  Peer("cluster, serial, gloo links", [coordinator(1, "pg")], pool, threads=1),
                  Peer("cluster, ping-pong (2 micro-batches)", [coordinator(2)], pool, threads=1),
                  Peer("cluster, 2 coordinators on one pool", [coordinator(1), coordinator(1)], pool, threads=1)]
        results = measure(peers, batch, args.decode_tokens, args.repeats)
    finally:
        for peer in peers:
            for engine in peer.engines:
                engine.shutdown()
        stop_pool(pool)
    base = min(results[p.name]["step_ms"] for p in peers[:2])  # the local engine at its best thread count
    rows = [row(p.name, results[p.name], base, cfg.num_layers, args.batch * len(p.engines)) for p in peers]
    step = {p.name.split(" (")[0]: results[p.name]["step_ms"] for p in peers}
    serial = step["cluster, serial"]
    derived = [
        f"- Decode step at {args.batch} sequences: the serial cluster takes {serial / base:.2f}x the best local "
        f"engine's time; ping-pong {step['cluster, ping-pong'] / serial:.2f}x the serial cluster's; the same serial "
        f"schedule over gloo links {step['cluster, serial, gloo links'] / serial:.2f}x over shared memory.",
    ]
    return "\n".join([
        f"### Model {describe(size)}; {args.batch} sequences per engine, {args.experts_per_worker} experts per worker",
        "",
        table(["engine", "decode step ms", "vs best local", "tokens/s", "coordinator", "route+send [cpu]", "wake",
               "hold", "expert [cpu]", "back", "combine", "fixed cost per layer", "rows per expert call"], rows),
        "", *derived, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["bench"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--experts-per-worker", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--merge-wait-ms", type=float, default=PoolConfig.merge_wait_ms)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    sections = [f"Machine: {machine()}; coordinators and expert workers use 1 intra-op thread each. Command: "
                f"`python -m bench.cluster_step --sizes {' '.join(args.sizes)} --batch {args.batch} "
                f"--experts-per-worker {args.experts_per_worker}`.", ""]
    for size in args.sizes:
        sections.append(run_size(size, args))
    sections.append("Times in ms per decode step; *tokens/s* counts every engine of the row (the 2-coordinator row "
                    "runs two batches at once). The columns are explained in `bench/cluster_step.py`'s docstring.")
    body = "\n".join(sections)
    print(body)
    if not args.no_write:
        write_section("cluster_step", "Cluster decode step vs the local engine, and where its time goes", body)


if __name__ == "__main__":
    main()
