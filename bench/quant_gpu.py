"""One MoE layer's expert time with quantized experts on a GPU, side by side in one run: full precision (fp32 and
bf16 weights) vs FP8, int8 and int4 experts, each through torch's kernel (cluster/model/quant_kernels.py) and
through the dequantize-per-call path, at 1 and 32 tokens (top-2: 2 and 64 rows).

    python -m bench.quant_gpu [--shapes mixtral bench] [--tokens 1 32] [--out FILE.md] [--write-docs]

Synthetic weights (random, the shape of one layer's 8 experts: no checkpoint and no network needed); the time is
LocalExperts.run_grouped on rows already grouped by expert (what a worker or the local engine runs per layer),
median of interleaved repeats, CUDA-synchronized. tok/s = tokens / layer time (one layer's experts only). The error
column is each peer's output against fp32 weights on the same rows, relative to the output's largest value
(quantization error included). Without CUDA it runs the CPU fallback (demo shape, few repeats): every peer then
takes the dequantize path, and the table says so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.common import machine, progress, table, write_section
from cluster.model.experts import LocalExperts
from cluster.model.quant import (
    ExpertQuantization,
    QuantizedWeight,
    fp8_weight,
    quantize_weight,
    stack_weights,
    weight_nbytes,
)
from cluster.model.quant_kernels import FP8_MAX, kernel_report, layer_kernels

SHAPES = {  # (hidden H, expert intermediate I): 8 experts each
    "mixtral": (4096, 14336),  # Mixtral-8x7B
    "mid": (1024, 3584),  # bench/models.py sizes
    "bench": (512, 1408),
    "demo": (256, 512),
}
NUM_EXPERTS, TOP_K = 8, 2


@dataclass
class Peer:
    name: str
    experts: LocalExperts
    dtype: torch.dtype  # of the rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None,
                        help="layer shapes (default: mixtral bench on a GPU, demo on a CPU)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 32], help="tokens per call (top-2 rows each)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (default 30 GPU, 3 CPU)")
    parser.add_argument("--cell-budget-s", type=float, default=3.0,
                        help="stop repeating a cell after this many seconds (a slow kernel still gets a number)")
    parser.add_argument("--group-size", type=int, default=64, help="int4 group size (default: %(default)s)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--engine-model", choices=["bench", "demo", "none"], default=None,
                        help="also the local engine's tok/s with bf16 / int8 / int4 experts on this bench/models.py "
                             "model (default: bench on a GPU, demo on a CPU; none: skip)")
    parser.add_argument("--out", default=None, help="also write the markdown (table and notes) to this file")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device.startswith("cuda")
    args.shapes = args.shapes or (["mixtral", "bench"] if gpu else ["demo"])
    args.repeats = args.repeats or (30 if gpu else 3)
    args.engine_model = args.engine_model or ("bench" if gpu else "demo")
    if any(t < 1 for t in args.tokens):
        parser.error(f"--tokens must be positive, got {args.tokens}")
    return args


def synthetic_layer(hidden: int, inter: int, device: str, seed: int) -> tuple[Tensor, Tensor]:
    """w13 (E, 2I, H) and w2 (E, H, I) in float32, scaled like trained weights (std ~ 1/sqrt(fan-in))."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(NUM_EXPERTS, 2 * inter, hidden, generator=gen, device=device) / hidden ** 0.5
    w2 = torch.randn(NUM_EXPERTS, hidden, inter, generator=gen, device=device) / inter ** 0.5
    return w13, w2


def fp8_stack(w: Tensor, block: int | None = None) -> QuantizedWeight:
    """(E, N, K) float32 -> FP8 with a scale per output channel (the published Mixtral FP8 checkpoints' scheme), or
    per [block, block] (transformers' fp8 format, DeepSeek-style)."""
    parts = []
    for e in range(w.shape[0]):
        if block is None:
            scale = w[e].abs().amax(dim=1, keepdim=True) / FP8_MAX
            parts.append(fp8_weight((w[e] / scale).to(torch.float8_e4m3fn), scale))
            continue
        n, k = w[e].shape
        blocks = w[e].abs().reshape(n // block, block, k // block, block).amax(dim=(1, 3)) / FP8_MAX
        full = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
        parts.append(fp8_weight((w[e] / full).to(torch.float8_e4m3fn), blocks, (block, block)))
    return stack_weights(parts)  # type: ignore[return-value]


def peers(w13: Tensor, w2: Tensor, group_size: int) -> list[Peer]:
    ids = (tuple(range(NUM_EXPERTS)),)
    out = [Peer("fp32", LocalExperts(ids, [w13], [w2]), torch.float32),
           Peer("bf16", LocalExperts(ids, [w13.bfloat16()], [w2.bfloat16()]), torch.bfloat16)]
    held = {"fp8": (fp8_stack(w13), fp8_stack(w2)),
            "fp8-b128": (fp8_stack(w13, 128), fp8_stack(w2, 128)),
            "int8": (quantize_weight(w13, ExpertQuantization(8)), quantize_weight(w2, ExpertQuantization(8))),
            f"int4-g{group_size}": (quantize_weight(w13, ExpertQuantization(4, group_size)),
                                    quantize_weight(w2, ExpertQuantization(4, group_size)))}
    for name, (q13, q2) in held.items():
        out.append(Peer(f"{name} kernel", LocalExperts(ids, [q13], [q2]), torch.bfloat16))
        out.append(Peer(f"{name} dequantize", LocalExperts(ids, [q13], [q2], use_kernels=False), torch.bfloat16))
    return out


def routed_counts(tokens: int, seed: int) -> list[int]:
    """Rows per expert for ``tokens`` tokens, each to TOP_K distinct random experts."""
    gen = torch.Generator().manual_seed(seed)
    counts = [0] * NUM_EXPERTS
    for _ in range(tokens):
        for e in torch.randperm(NUM_EXPERTS, generator=gen)[:TOP_K].tolist():
            counts[e] += 1
    return counts


def timed(fn: Callable[[], Tensor], repeats: int, budget_s: float, device: str) -> float:
    """Median seconds of ``fn`` (after one warm-up), synchronized; stops early past ``budget_s``."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    samples: list[float] = []
    started = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
        if time.perf_counter() - started > budget_s:
            break
    return statistics.median(samples)


def layer_bytes(peer: Peer) -> int:
    return weight_nbytes(peer.experts.w13[0]) + weight_nbytes(peer.experts.w2[0])


def kernel_names(peer: Peer, rows: Tensor) -> str:
    experts = peer.experts
    if not any(isinstance(w, QuantizedWeight) for w in (experts.w13[0], experts.w2[0])):
        return "grouped_mm" if rows.dtype == torch.bfloat16 and rows.is_cuda else "matmul"
    chosen = layer_kernels(experts.w13[0], experts.w2[0], rows) if experts.use_kernels and rows.is_cuda else None
    if chosen is None:
        return "dequantize + matmul"
    return "/".join(k or "dequantize" for k in chosen) + " (w13/w2)"


def run_shape(args: argparse.Namespace, shape: str) -> tuple[list[list[object]], list[str]]:
    hidden, inter = SHAPES[shape]
    progress(f"{shape}: H {hidden}, I {inter}, {NUM_EXPERTS} experts: building the peers on {args.device}")
    w13, w2 = synthetic_layer(hidden, inter, args.device, seed=0)
    all_peers = peers(w13, w2, args.group_size)
    cells: dict[tuple[str, int], float] = {}
    errors: dict[str, float] = {}
    kernels: dict[str, str] = {}
    failures: dict[str, str] = {}
    for tokens in args.tokens:
        counts = routed_counts(tokens, seed=tokens)
        gen = torch.Generator().manual_seed(tokens)
        rows32 = torch.randn(sum(counts), hidden, generator=gen).to(args.device)
        count_t = torch.tensor(counts, device=args.device)
        reference = all_peers[0].experts.run_grouped(0, rows32, count_t).double()
        for peer in all_peers:  # one peer after the other; each cell is a median of its repeats
            rows = rows32.to(peer.dtype)
            def call(p: Peer = peer, r: Tensor = rows, c: Tensor = count_t) -> Tensor:
                return p.experts.run_grouped(0, r, c)

            kernels[peer.name] = kernel_names(peer, rows)
            try:
                out = call().double()
                err = ((out - reference).abs().max() / reference.abs().max()).item()
                errors[peer.name] = max(errors.get(peer.name, 0.0), err)
                cells[peer.name, tokens] = timed(call, args.repeats, args.cell_budget_s, args.device)
            except Exception as exc:  # one peer failing (a kernel refusing this shape) leaves the others' numbers
                failures[peer.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                progress(f"{shape}, {tokens} tokens, {peer.name}: FAILED: {failures[peer.name]}")
                continue
            progress(f"{shape}, {tokens} tokens, {peer.name}: {cells[peer.name, tokens] * 1e3:.3f} ms "
                     f"({kernels[peer.name]}, error {err:.2g})")
    base = "bf16"
    rows_out: list[list[object]] = []
    fp32_bytes = layer_bytes(all_peers[0])
    for peer in all_peers:
        nbytes = layer_bytes(peer)
        row: list[object] = [shape, peer.name, kernels[peer.name], f"{nbytes / 2**20:,.1f}",
                             f"{nbytes / fp32_bytes:.3f}x"]
        for tokens in args.tokens:
            seconds = cells.get((peer.name, tokens), float("nan"))
            base_s = cells.get((base, tokens), float("nan"))
            row += [f"{seconds * 1e3:,.3f}", f"{tokens / seconds:,.0f}", f"{base_s / seconds:.2f}x"]
        row.append(f"{errors[peer.name]:.2g}" if peer.name in errors else f"FAILED: {failures.get(peer.name, '?')}")
        rows_out.append(row)
    notes = []
    for tokens in args.tokens:
        best = {name: cells[name, tokens] for name in (p.name for p in all_peers) if (name, tokens) in cells}
        if base not in best:
            notes.append(f"- {shape}, {tokens} token(s): no bf16 baseline ({failures.get(base, 'failed')})")
            continue
        fastest = min(best, key=lambda n: best[n])
        notes.append(f"- {shape}, {tokens} token(s): fastest {fastest} ({best[fastest] * 1e3:.3f} ms per layer); "
                     + ", ".join(f"{n} {cells[base, tokens] / best[n]:.2f}x bf16" for n in best if "kernel" in n))
    del all_peers, w13, w2
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows_out, notes


def engine_table(args: argparse.Namespace) -> list[str]:
    """The local engine's greedy tok/s on a bench/models.py model with full-precision, int8 and int4 experts, side
    by side (each engine built, timed at each batch size best of 2, shut down), as markdown lines."""
    from bench.gpu_check import _engine_config, engine_generate, prompts
    from bench.models import bench_model
    from cluster.engine.loop import LocalEngine

    gpu = args.device.startswith("cuda")
    dtype = "bfloat16" if gpu else "float32"
    sizes, prompt_len, output_len = ([1, 32], 64, 64) if gpu else ([1, 2], 8, 4)
    path = bench_model(args.engine_model)
    peers = {dtype: {}, "int8": {"quantize_experts": "int8"},
             f"int4-g{args.group_size}": {"quantize_experts": "int4", "quantize_group_size": args.group_size}}
    tps: dict[str, dict[int, float]] = {}
    described: dict[str, str] = {}
    for name, options in peers.items():
        cfg = _engine_config(path, args.device, dtype, max(sizes), prompt_len + output_len).with_(**options)
        engine = LocalEngine.from_config(cfg)
        try:
            experts = engine.engine.moe.experts  # type: ignore[attr-defined]
            described[name] = f"{experts.nbytes / 2**20:,.0f} MiB of experts"
            vocab = engine.model_config.vocab_size
            engine_generate(engine, prompts(2, prompt_len, vocab), output_len)  # warm-up (kernels, packing)
            for n in sizes:
                batch = prompts(n, prompt_len, vocab)
                best = 0.0
                for _ in range(2):
                    t0 = time.perf_counter()
                    engine_generate(engine, batch, output_len)
                    best = max(best, n * output_len / (time.perf_counter() - t0))
                tps.setdefault(name, {})[n] = best
                progress(f"engine '{args.engine_model}', {name}, {n} seqs: {best:,.0f} tok/s")
        finally:
            engine.shutdown()
    headers = ["experts", "resident"] + [f"{n} seqs: tok/s" for n in sizes] + [f"{n} seqs: vs {dtype}" for n in sizes]
    rows = [[name, described[name], *(f"{tps[name][n]:,.0f}" for n in sizes),
             *(f"{tps[name][n] / tps[dtype][n]:.2f}x" for n in sizes)] for name in tps]
    return [f"Local engine, model '{args.engine_model}' on {args.device}, {dtype} compute, greedy, {prompt_len} "
            f"prompt + {output_len} generated tokens per sequence, best of 2 (quantized experts through the kernels "
            "above where they fit):", "", table(headers, rows)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    started = time.monotonic()
    report = kernel_report(args.device, torch.bfloat16) if args.device.startswith("cuda") else {}
    for kernel, status in report.items():
        progress(f"kernel {kernel}: {status}")
    headers = ["shape", "experts", "kernel", "MiB per layer", "vs fp32"]
    for tokens in args.tokens:
        headers += [f"{tokens} tok: ms/layer", f"{tokens} tok: tok/s", f"{tokens} tok: vs bf16"]
    headers.append("max error vs fp32")
    rows: list[list[object]] = []
    notes: list[str] = []
    with torch.inference_mode():
        for shape in args.shapes:
            try:
                shape_rows, shape_notes = run_shape(args, shape)
            except Exception as exc:  # (a CUDA error poisons the rest of the process: say so, keep the rest)
                progress(f"{shape}: FAILED: {type(exc).__name__}: {exc}")
                notes.append(f"- {shape}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            rows += shape_rows
            notes += shape_notes
    if args.out:  # the layer table now, in case the engine part below does not finish in a caller's time limit
        with open(args.out, "w") as f:
            f.write("# Quantized experts on a GPU: one layer's expert time\n\n" + table(headers, rows) + "\n\n"
                    + "\n".join(notes) + "\n\n(the engine part did not finish)\n")
    engine_part: list[str] = []
    if args.engine_model != "none":
        try:
            engine_part = engine_table(args)
        except Exception as exc:  # the layer table above still counts
            progress(f"engine: FAILED: {type(exc).__name__}: {exc}")
            engine_part = [f"Local engine: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"]
    load_after = os.getloadavg()
    kernels_line = ("Kernels on this device (bf16 rows): " + "; ".join(f"{k}: {v}" for k, v in report.items())
                    if report else "No CUDA: every peer took the dequantize path (the CPU fallback).")
    body = "\n".join([
        f"Machine: {machine()}. Load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
        f"({time.monotonic() - started:.0f} s).",
        f"Command: `python -m bench.quant_gpu {' '.join(sys.argv[1:])}`. One MoE layer's 8 experts (synthetic "
        "weights), rows grouped by expert (top-2), median of interleaved repeats; tok/s is tokens per second through "
        "this one layer's experts. 'kernel' rows use torch's kernel for held weights, 'dequantize' rows dequantize "
        "the active experts per call (the CPU path).",
        kernels_line,
        "",
        table(headers, rows),
        "",
        *notes,
        "",
        *engine_part,
    ])
    print(body)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Quantized experts on a GPU: one layer's expert time\n\n" + body + "\n")
        progress(f"wrote {args.out}")
    if args.write_docs:
        write_section("quant_gpu", "Quantized experts on a GPU: kernels vs dequantize, one layer", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
