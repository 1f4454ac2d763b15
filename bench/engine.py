"""Offline throughput: our engine (local, and the cluster) against transformers' batched ``generate``, with the
same weights, prompts and output lengths, at several concurrencies, side by side in one run.

    python -m bench.engine [--size demo] [--concurrency 1 8 32] [--prompt-len 32] [--output-len 64]

Each peer runs in its own fresh subprocess (same machine, one after the other), so no peer's thread pools
interfere with another's. Output tokens/s = concurrency x output-len / wall time (median of repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from bench.common import add_workload_flags, machine, progress, table, workload_argv, write_section
from bench.models import bench_model, describe

PEERS = ["transformers", "local", "cluster-1", "cluster-2", "cluster-4"]


def label(peer: str) -> str:
    if peer == "transformers":
        return "transformers generate"
    if peer == "local":
        return "ours, local engine"
    k = int(peer.split("-")[1])
    return f"ours, cluster ({k} expert{'s' if k > 1 else ''}/worker)"


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def run_peer(peer: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """Inside the peer's subprocess: tokens/s for each concurrency."""
    model = bench_model(args.size)
    results: dict[str, list[float]] = {}
    if peer == "transformers":
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model).eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0

        def generate(batch: list[list[int]]) -> None:
            with torch.inference_mode():
                out = hf.generate(torch.tensor(batch), attention_mask=torch.ones(len(batch), len(batch[0]),
                                                                                 dtype=torch.long),
                                  max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False)
            assert out.shape[1] == len(batch[0]) + args.output_len
        vocab = hf.config.vocab_size
        shutdown = None
    else:
        from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig
        from cluster.sampling import SamplingParams

        engine_cfg = EngineConfig(model=str(model), progress=False, max_num_seqs=64, max_num_batched_tokens=2048,
                                  num_kv_blocks=64 * ((args.prompt_len + args.output_len) // 16 + 2))
        engine: Any
        if peer == "local":
            from cluster.engine_loop import LocalEngine

            engine = LocalEngine.from_config(engine_cfg)
        else:
            import ray

            from workers.cluster_engine import ClusterEngine

            ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
            engine = ClusterEngine.start(engine_cfg, ClusterConfig(), PoolConfig(
                experts_per_worker=int(peer.split("-")[1]), threads_per_worker=1))
        params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)

        def generate(batch: list[list[int]]) -> None:
            out = engine.generate(batch, params)
            assert all(len(r.completions[0].token_ids) == args.output_len for r in out)
        vocab = engine.model_config.vocab_size
        shutdown = engine.shutdown
    generate(prompts(2, args.prompt_len, vocab))  # warm-up
    for c in args.concurrency:
        batch = prompts(c, args.prompt_len, vocab)
        samples = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            generate(batch)
            samples.append(c * args.output_len / (time.perf_counter() - started))
        results[str(c)] = samples
        print(f"[bench] {peer}: concurrency {c}: {statistics.median(samples):,.0f} tok/s", file=sys.stderr, flush=True)
    if shutdown is not None:
        shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workload_flags(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", nargs="+", default=PEERS)
    parser.add_argument("--peer", help=argparse.SUPPRESS)  # internal: run one peer and print JSON
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.peer:
        print(json.dumps(run_peer(args.peer, args)))
        return

    bench_model(args.size)  # create the checkpoint once, before the peers start
    results: dict[str, dict[str, list[float]]] = {}
    for peer in args.peers:
        progress(f"running {label(peer)} in its own process")
        cmd = [sys.executable, "-m", "bench.engine", "--peer", peer, "--repeats", str(args.repeats),
               *workload_argv(args)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"peer {peer} failed:\n{done.stderr[-3000:]}")
        results[peer] = json.loads(done.stdout.strip().splitlines()[-1])

    base = {c: statistics.median(results["transformers"][c]) for c in map(str, args.concurrency)} \
        if "transformers" in results else None
    rows = []
    for peer in args.peers:
        row: list[object] = [label(peer)]
        for c in map(str, args.concurrency):
            tps = statistics.median(results[peer][c])
            row += [tps, f"{tps / base[c]:.2f}x" if base else "-"]
        rows.append(row)
    headers = ["engine"] + [h for c in args.concurrency for h in (f"{c} seqs tok/s", f"{c} seqs vs transformers")]
    body = "\n".join([
        f"Machine: {machine()}. Model {describe(args.size)}.",
        f"Each of N sequences: {args.prompt_len}-token prompt, exactly {args.output_len} greedy output tokens "
        f"(EOS ignored), all N submitted at once; output tokens/s, median of {args.repeats}. transformers runs "
        "`generate` on the whole batch (its static batching); ours batches continuously. Each peer runs in a "
        "fresh process. Command: `python -m bench.engine " + " ".join(sys.argv[1:]) + "`.",
        "",
        table(headers, rows),
    ])
    print(body)
    if not args.no_write:
        write_section(f"engine_{args.size}", f"Offline throughput vs transformers generate ({args.size} model)",
                      body)


if __name__ == "__main__":
    main()
