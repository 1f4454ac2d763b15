"""The elastic expert pool: resize time up and down, and the longest pause any stream saw, with 16 greedy streams
running while the pool goes 4 -> 8 -> 2 workers; side by side, the same streams without a resize (their outputs
must be equal, and their longest pause is the yardstick). Also: loading a worker's experts from the checkpoint vs
from a peer worker's memory.

    python -m bench.elastic [--sizes demo bench] [--spares 4 0] [--streams 16] [--output-len 160]

``--spares``: the pool's ``spare_workers`` per run (4: growing takes started spare processes and only loads
experts; 0: growing starts new worker processes). Resize time is the pool's (from the call to the commit); the
coordinator then moves between two steps. A stream's pause is the longest time between two of its outputs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from typing import Any

import ray

from bench.common import machine, progress, table, write_section
from bench.models import bench_model, describe
from cluster.engine.loader import engine_dtype
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig
from cluster.model.checkpoint import Checkpoint, load_layer_experts
from cluster.model.config import ModelConfig
from workers.cluster_engine import ClusterEngine, start_pool, stop_pool

PLAN = (8, 2)  # the sizes the pool goes to, from 4


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def streams(engine: ClusterEngine, prompts: list[list[int]], output_len: int, pool: Any | None,
            ) -> tuple[list[list[int]], float, list[dict[str, Any]]]:
    """All prompts as concurrent greedy streams; with ``pool``, resize it through PLAN while they run (each resize
    once the streams have made progress on the previous map). Returns the tokens, the longest pause of any stream
    and the resize reports."""
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    produced = [0]
    pauses: list[float] = []

    async def one(prompt: list[int]) -> list[int]:
        out: list[int] = []
        last = None
        async for o in engine.stream(prompt, params):
            now = time.perf_counter()
            if last is not None:
                pauses.append(now - last)
            last = now
            new = [t for d in o.outputs for t in d.token_ids]
            out += new
            produced[0] += len(new)
        return out

    reports: list[dict[str, Any]] = []

    async def resizer(pool: Any, tasks: list[asyncio.Task[list[int]]]) -> None:
        mark = 0
        for size in PLAN:
            while produced[0] < mark + len(prompts) * 8 and not all(t.done() for t in tasks):
                await asyncio.sleep(0.02)
            if all(t.done() for t in tasks):
                return
            started = time.perf_counter()
            report: dict[str, Any] = await asyncio.to_thread(ray.get, pool.resize.remote(size))
            reports.append(report | {"client_seconds": time.perf_counter() - started})
            progress(f"resized to {size} workers in {report['seconds']:.2f}s ({report.get('from_spares', 0)} "
                     f"from spares); load average {load_average()}")
            mark = produced[0]

    async def main() -> list[list[int]]:
        tasks = [asyncio.create_task(one(p)) for p in prompts]
        if pool is not None:
            await resizer(pool, tasks)
        return list(await asyncio.gather(*tasks))

    tokens = asyncio.run(main())
    return tokens, max(pauses, default=0.0), reports


def wait_for_spares(pool: Any, count: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while ray.get(pool.describe.remote())["spares"] < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool did not start {count} spare workers in {timeout_s}s")
        time.sleep(0.2)


def load_sources(pool: Any, model: str, engine_cfg: EngineConfig) -> tuple[float, float, int]:
    """Seconds to get worker 0's experts into this process from the checkpoint and from the worker's memory (the
    median of 3 each, in turns), and how many expert-layers that is."""
    cfg = ModelConfig.from_file(model)
    worker = ray.get(pool.worker_handles.remote())[0]
    held = ray.get(worker.export.remote())
    layer_experts = held.layer_experts
    dtype = engine_dtype(cfg, engine_cfg)
    ckpt_s, peer_s = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        load_layer_experts(Checkpoint(model), cfg, layer_experts, dtype, progress=False)
        ckpt_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ray.get(worker.export.remote())
        peer_s.append(time.perf_counter() - t0)
    return sorted(ckpt_s)[1], sorted(peer_s)[1], sum(len(e) for e in layer_experts)


def run(size: str, spares: int, args: argparse.Namespace) -> tuple[list[object], tuple[float, float, int] | None]:
    model = str(bench_model(size))
    engine_cfg = EngineConfig(model=model, progress=False, num_kv_blocks=1024, block_size=16, max_num_seqs=32,
                              max_model_len=512)
    pool_cfg = PoolConfig(experts_per_worker=2, worker_num_cpus=1, threads_per_worker=1, spare_workers=spares,
                          link_timeout_s=30, placement_timeout_s=600, start_timeout_s=600)
    progress(f"{size}: starting a pool of 4 workers ({spares} spares); load average {load_average()}")
    pool = start_pool(engine_cfg, pool_cfg)
    engine = None
    try:
        wait_for_spares(pool, spares)
        engine = ClusterEngine.start(engine_cfg, ClusterConfig(heartbeat_s=1.0, start_timeout_s=600), pool=pool)
        rng = random.Random(7)
        prompts = [[rng.randrange(3, 800) for _ in range(rng.randrange(8, 32))] for _ in range(args.streams)]
        streams(engine, prompts[:2], 4, None)  # warm-up
        sources = load_sources(pool, model, engine_cfg) if spares else None
        progress(f"{size}: {args.streams} streams without a resize")
        want, calm_pause, _ = streams(engine, prompts, args.output_len, None)
        progress(f"{size}: {args.streams} streams while the pool goes 4 -> 8 -> 2")
        got, pause, reports = streams(engine, prompts, args.output_len, pool)
        if len(reports) != len(PLAN):
            raise RuntimeError(f"the streams ended before every resize ran: {reports}")
        equal = sum(g == w for g, w in zip(got, want, strict=True))
        up, down = reports
        return [size, spares, up["seconds"], up["from_spares"], down["seconds"], calm_pause * 1000, pause * 1000,
                f"{equal}/{len(want)}"], sources
    finally:
        if engine is not None:
            engine.shutdown()
        stop_pool(pool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["demo", "bench"])
    parser.add_argument("--spares", type=int, nargs="+", default=[4, 0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=160)
    args = parser.parse_args()
    before = load_average()
    ray.init(address="local", num_cpus=24, include_dashboard=False, log_to_driver=False)
    rows: list[list[object]] = []
    sources: list[list[Any]] = []
    for spares in args.spares:  # every size with spares first: the fast path's numbers come first
        for size in args.sizes:
            row, source = run(size, spares, args)
            rows.append(row)
            if source is not None:
                sources.append([size, source[2], source[0] * 1000, source[1] * 1000, source[1] / source[0]])
            write(args, rows, sources, before)  # after each run: a long run cut short keeps what it measured
    ray.shutdown()


def write(args: argparse.Namespace, rows: list[list[object]], sources: list[list[Any]], before: str) -> None:
    after = load_average()
    command = "python -m bench.elastic " + " ".join(
        ["--sizes", *args.sizes, "--spares", *map(str, args.spares), "--streams", str(args.streams),
         "--output-len", str(args.output_len)])
    body = [f"`{command}` on {machine()}. **The machine was shared with other jobs while this ran** (load average "
            f"{before} at the start, {after} when this table was written, on 2 cores): absolute times are inflated, "
            "the worst by far when new processes must start.", "",
            "Models: " + "; ".join(describe(s) for s in args.sizes) + ".", "",
            f"{args.streams} concurrent greedy streams of {args.output_len} tokens, one coordinator; the pool has 4 "
            "workers x 2 experts and goes to 8 workers, then to 2, while they run. Resize time: the pool's, from "
            "the call to the committed map (the admin endpoint answers then). Pause: the longest time between two "
            "outputs of any stream, without a resize and with the two resizes.", "",
            table(["model", "spare workers", "4 -> 8 s", "of them from spares", "8 -> 2 s",
                   "longest pause, no resize ms", "longest pause, resizing ms", "streams equal to no-resize"], rows)]
    if sources:
        body += ["", "Loading one worker's experts (2 per layer, every layer) into a process on the same node: from "
                 "the checkpoint (safetensors, page cache warm) vs from a peer worker's memory (Ray object store), "
                 "median of 3:", "",
                 table(["model", "expert-layers", "checkpoint ms", "peer memory ms", "peer / checkpoint"], sources)]
    body += [""]
    for row in rows:
        body.append(f"- {row[0]}, {row[1]} spares: 4 -> 8 workers in {row[2]:.2f} s, 8 -> 2 in {row[4]:.2f} s; "
                    f"longest stream pause {row[6]:.0f} ms resizing vs {row[5]:.0f} ms without; streams equal "
                    f"{row[7]} (load average {after})")
    for s in sources:
        verdict = "the checkpoint is faster: new workers load from it" if s[4] > 1 else \
            "a peer's memory is faster here, but new workers still load from the checkpoint (not built)"
        body.append(f"- {s[0]}: a worker's experts from a peer's memory take {s[4]:.2f}x the checkpoint's time: "
                    f"{verdict}")
    write_section("elastic", "Elastic expert pool: resize while 16 streams run", "\n".join(body))


if __name__ == "__main__":
    main()
