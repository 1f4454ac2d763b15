"""Offline throughput: transformers' batched ``generate``, our local engine, and the cluster (coordinators on one
expert pool of the shape, threads and wait policy `moe-cluster plan` picks for this machine: its default, serial,
ping-pong micro-batches, two coordinators sharing the pool; ``--also-experts-per-worker``: pools of 1-thread
processes), with the same weights, prompts and output lengths, at several concurrencies, side by side in one run.

    python -m bench.engine [--size bench] [--concurrency 1 8 32] [--prompt-len 64] [--output-len 64]

All peers live in one process (the cluster's workers in their own) and every repeat runs each peer in turn, so
a machine that drifts slows all alike; single-process peers are run at 1 and at 2 intra-op threads and the
better one is their baseline. Output tokens/s = concurrency x output-len / wall time (median of repeats). The two
coordinators split the N sequences between them (N/2 each, at once).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
import torch

from bench.common import add_workload_flags, load_average, machine, progress, table, write_section
from bench.models import bench_model, describe
from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig
from workers.cluster_engine import ClusterEngine, start_pool, stop_pool

Generate = Callable[[list[list[int]]], None]


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def transformers_peer(model: str, output_len: int) -> Generate:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0

    def generate(batch: list[list[int]]) -> None:
        with torch.inference_mode():
            mask = torch.ones(len(batch), len(batch[0]), dtype=torch.long)
            out = hf.generate(torch.tensor(batch), attention_mask=mask,
                              max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False)
        assert out.shape[1] == len(batch[0]) + output_len

    return generate


def engines_peer(engines: list[Any], output_len: int) -> Generate:
    """The batch split over ``engines``, all at once."""
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)

    def run(engine: Any, part: list[list[int]]) -> None:
        out = engine.generate(part, params)
        assert all(len(r.completions[0].token_ids) == output_len for r in out)

    def generate(batch: list[list[int]]) -> None:
        parts = [batch[i::len(engines)] for i in range(len(engines))]
        threads = [threading.Thread(target=run, args=(e, p)) for e, p in zip(engines, parts, strict=True) if p]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return generate


def with_threads(threads: int, generate: Generate, loops: Sequence[EngineLoop] = ()) -> Generate:
    """``generate`` with ``threads`` intra-op threads: on this thread, and on each of ``loops``' own engine threads
    (the count is per thread on some builds: OpenMP's is)."""
    def run(batch: list[list[int]]) -> None:
        torch.set_num_threads(threads)
        for loop in loops:
            loop.call(functools.partial(torch.set_num_threads, threads)).result()
        generate(batch)

    return run


def shape_text(pool_options: dict[str, Any], coordinator_options: dict[str, Any]) -> str:
    """The pool and coordinator options the bench runs, in words."""
    policy = pool_options.get("worker_omp_wait_policy")
    return (f"{pool_options['experts_per_worker']} experts per worker on {pool_options.get('threads_per_worker', 1)}"
            f" thread(s), coordinators on {coordinator_options.get('coordinator_threads', 1)}"
            + (f", OpenMP wait policy {policy}" if policy else "")
            + (f", {coordinator_options['micro_batches']} micro-batch(es) by default"
               if coordinator_options.get("micro_batches") else ", auto micro-batches"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_flags(parser)
    parser.set_defaults(size="bench", prompt_len=64)
    parser.add_argument("--experts-per-worker", type=int, default=None,
                        help="default: the shape `moe-cluster plan` picks for this machine (what `serve` deploys)")
    parser.add_argument("--also-experts-per-worker", type=int, nargs="*", default=[],
                        help="one more row per value: the default coordinator on a pool of that shape")
    parser.add_argument("--also-every-core", action="store_true",
                        help="one more row: one worker of every expert and a coordinator, both on every core's "
                             "threads, idle threads passive (the CPU plan's rule before the current one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    model = str(bench_model(args.size))
    from cluster.model.config import ModelConfig
    from cluster.planning.hardware import local_hardware
    from cluster.planning.plan import plan_cpus

    model_cfg = ModelConfig.from_file(model)
    hardware = local_hardware()
    plan = plan_cpus(model_cfg, hardware)
    if args.experts_per_worker is None:  # the plan's shape, threads and wait policy: what `serve` deploys
        args.experts_per_worker = plan.pool_options["experts_per_worker"]
        pool_options, coordinator_options = dict(plan.pool_options), dict(plan.cluster_options)
    else:
        pool_options, coordinator_options = {"experts_per_worker": args.experts_per_worker, "threads_per_worker": 1}, {}
    args.shape = shape_text(pool_options, coordinator_options)
    args.load_before = load_average()
    progress(f"load average before (1/5/15 min): {args.load_before}")
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    engine_cfg = EngineConfig(model=model, progress=False, enable_prefix_caching=False,
                              max_num_seqs=64, max_num_batched_tokens=2048,
                              num_kv_blocks=64 * ((args.prompt_len + args.output_len) // 16 + 2))
    progress(f"loading transformers, the local engine, an expert pool ({args.shape}) and its coordinators")
    pool = start_pool(engine_cfg, PoolConfig(**pool_options))
    other_pools = {epw: start_pool(engine_cfg, PoolConfig(experts_per_worker=epw, threads_per_worker=1))
                   for epw in args.also_experts_per_worker}
    every_core_pool = None  # --also-every-core: both sides on every core, taking turns; their idle threads sleep
    if args.also_every_core:
        every_core_pool = start_pool(engine_cfg, PoolConfig(
            experts_per_worker=model_cfg.num_experts, threads_per_worker=hardware.devices,
            worker_num_cpus=hardware.devices, worker_omp_wait_policy="passive"))
    local = EngineLoop.local(engine_cfg)

    def coordinator(micro_batches: int | None = None, on: Any = pool,
                    options: dict[str, Any] = coordinator_options) -> ClusterEngine:
        chosen = options | ({} if micro_batches is None else {"micro_batches": micro_batches})
        return ClusterEngine.start(engine_cfg, ClusterConfig(**chosen), pool=on)

    coordinators: dict[str, list[ClusterEngine]] = {
        "default": [coordinator()], "serial": [coordinator(1)], "ping-pong": [coordinator(2)],
        "pair": [coordinator(), coordinator()]}
    for epw, other in other_pools.items():  # 1-thread processes, auto micro-batches
        coordinators[f"{epw} per worker"] = [coordinator(0, on=other, options={})]
    if every_core_pool is not None:
        coordinators["every core"] = [coordinator(1, on=every_core_pool, options={
            "coordinator_threads": hardware.devices, "coordinator_omp_wait_policy": "passive"})]
    hf = transformers_peer(model, args.output_len)
    peers: dict[str, Generate] = {
        "transformers generate, 1 thread": with_threads(1, hf),
        "transformers generate, 2 threads": with_threads(2, hf),
        "local engine, 1 thread": with_threads(1, engines_peer([local], args.output_len), [local]),
        "local engine, 2 threads": with_threads(2, engines_peer([local], args.output_len), [local]),
        "cluster, default (the plan's shape)": engines_peer(coordinators["default"], args.output_len),
        "cluster, serial (1 micro-batch)": engines_peer(coordinators["serial"], args.output_len),
        "cluster, ping-pong (2 micro-batches)": engines_peer(coordinators["ping-pong"], args.output_len),
        "cluster, 2 coordinators on one pool": engines_peer(coordinators["pair"], args.output_len),
        **{f"cluster, {epw} experts per worker, 1 thread each": engines_peer(coordinators[f"{epw} per worker"],
                                                                             args.output_len)
           for epw in other_pools},
        **({"cluster, every core: 1 worker of all experts and the coordinator on all threads, passive":
            engines_peer(coordinators["every core"], args.output_len)} if every_core_pool is not None else {}),
    }
    vocab = local.model_config.vocab_size
    samples: dict[str, dict[int, list[float]]] = {name: {c: [] for c in args.concurrency} for name in peers}
    try:
        for generate in peers.values():  # warm-up
            generate(prompts(2, args.prompt_len, vocab))
        for rep in range(args.repeats):
            for c in args.concurrency:
                batch = prompts(c, args.prompt_len, vocab)
                for name, generate in peers.items():
                    torch.set_num_threads(1)  # the coordinators' client threads; the peers set their own
                    started = time.perf_counter()
                    generate(batch)
                    samples[name][c].append(c * args.output_len / (time.perf_counter() - started))
            progress(f"repeat {rep + 1}/{args.repeats} done")
    finally:
        local.shutdown()
        for group in coordinators.values():
            for engine in group:
                engine.shutdown()
        for each in (pool, *other_pools.values(), *([every_core_pool] if every_core_pool is not None else [])):
            stop_pool(each)
    args.load_after = load_average()
    progress(f"load average after: {args.load_after}")
    print(report(args, {name: {c: statistics.median(v) for c, v in by_c.items()} for name, by_c in samples.items()}))


def report(args: argparse.Namespace, tps: dict[str, dict[int, float]]) -> str:
    def best(prefix: str, c: int) -> float:
        return max(v[c] for name, v in tps.items() if name.startswith(prefix))

    rows = []
    for name, by_c in tps.items():
        row: list[object] = [name]
        for c in args.concurrency:
            row += [by_c[c], f"{by_c[c] / best('transformers', c):.2f}x", f"{by_c[c] / best('local', c):.2f}x"]
        rows.append(row)
    headers = ["engine"] + [h for c in args.concurrency
                            for h in (f"{c} seqs tok/s", f"{c}: vs transformers", f"{c}: vs local")]
    top = max(args.concurrency)
    summary = [f"- At {top} sequences, best of each kind: " + "; ".join(
        f"{kind} {best(kind, top):,.0f} tok/s ({best(kind, top) / best('transformers', top):.2f}x transformers, "
        f"{best(kind, top) / best('local', top):.2f}x local)"
        for kind in ("local", "cluster, default", "cluster, serial", "cluster, ping-pong", "cluster, 2 coordinators",
                     *(f"cluster, {epw} experts per worker" for epw in args.also_experts_per_worker),
                     *(["cluster, every core"] if args.also_every_core else []))
    ) + "."]
    body = "\n".join([
        f"Machine: {machine()}. Model {describe(args.size)}; the pool: {args.shape}. Load "
        f"average (1/5/15 min) before {args.load_before}, after {args.load_after}.",
        f"Each of N sequences: {args.prompt_len}-token prompt, exactly {args.output_len} greedy output tokens "
        f"(EOS ignored), all N submitted at once; output tokens/s, median of {args.repeats}; the ratios compare "
        "with the better thread count of transformers and of the local engine. Command: `python -m bench.engine "
        f"--size {args.size} --concurrency {' '.join(map(str, args.concurrency))} --prompt-len {args.prompt_len} "
        f"--output-len {args.output_len} --experts-per-worker {args.experts_per_worker}"
        + "".join(f" --also-experts-per-worker {e}" for e in args.also_experts_per_worker)
        + (" --also-every-core" if args.also_every_core else "") + "`.",
        "",
        table(headers, rows),
        "",
        *summary,
    ])
    if not args.no_write:
        write_section(f"engine_{args.size}", f"Offline throughput vs transformers generate ({args.size} model)",
                      body)
    return body


if __name__ == "__main__":
    main()
