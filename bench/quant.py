"""Quantized experts: held-out perplexity, resident expert bytes and throughput of int8 / int4 experts against full
precision, side by side in one run.

    python -m bench.quant [--model cluster/demo_model] [--text tests/data/kjv_jonah.txt] [--sizes demo bench]

* Perplexity: the held-out text (one document a line) scored through the engine's echo + logprobs path (what
  `/v1/completions` with ``echo: true, logprobs: 0`` returns, the lm-evaluation-harness way): each line is one
  sequence, BOS first, every later token's log-probability counted; perplexity = exp(mean negative log-likelihood).
* Expert bytes: what a worker keeps resident for its experts (integers and scales), the same as
  ``LocalExperts.nbytes`` that expert workers report in their stats, against fp32.
* Throughput: the local engine decoding N sequences, each peer in turn every repeat (bench/common.py).
* Kernel choice on this CPU: one expert matmul at decode and prefill shapes, fp32 F.linear vs dequantize-then-linear
  vs torch's int8 weight-only kernel ``torch._weight_int8pack_mm``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import ROOT, machine, progress, table, time_interleaved, write_section
from bench.models import bench_model, describe
from cluster.engine.loop import LocalEngine
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig
from cluster.model.quant import ExpertQuantization, dequantize, quantize_weight
from cluster.moe.layer import InProcessExperts, MoELayer

DEFAULT_MODEL = ROOT / "cluster" / "demo_model"  # the trained demo checkpoint
DEFAULT_TEXT = ROOT / "tests" / "data" / "kjv_jonah.txt"  # its held-out text
# (label, quantize_experts, group size)
VARIANTS: list[tuple[str, str | None, int | None]] = [
    ("fp32", None, None), ("int8", "int8", None), ("int4 g128", "int4", 128), ("int4 g64", "int4", 64),
    ("int4 g32", "int4", 32)]


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def shown(path: Path, default: Path) -> str:
    """``path`` as the command line in docs/benchmarks.md shows it: relative to the repository (a copy of the
    default file elsewhere, e.g. another checkout, is shown as the default)."""
    path = path.resolve()
    if path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    relative = default.relative_to(ROOT)
    return str(relative) if path.parts[-len(relative.parts):] == relative.parts else path.name


def make_engine(model: Path, quantize: str | None, group: int | None, **options: Any) -> LocalEngine:
    return LocalEngine.from_config(EngineConfig(model=str(model), progress=False, quantize_experts=quantize,
                                                quantize_group_size=group, **options))


def expert_bytes(engine: LocalEngine) -> int:
    moe = engine.engine.moe
    assert isinstance(moe, MoELayer) and isinstance(moe.executor, InProcessExperts)
    return moe.executor.experts.nbytes


def echo_logprobs(engine: LocalEngine, text: str) -> list[float]:
    """Log-probabilities of every token of ``text`` after the first (BOS), as echo + logprobs=0 returns them."""
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=0, echo=True)
    result = engine.generate([text], params)[0]
    entries = result.prompt_logprobs or []
    return [e.logprob for e in entries if e is not None]


def perplexity(engine: LocalEngine, documents: list[str]) -> tuple[float, int]:
    logprobs = [lp for doc in documents for lp in echo_logprobs(engine, doc)]
    return math.exp(-sum(logprobs) / len(logprobs)), len(logprobs)


def quality(model: Path, text: Path) -> tuple[str, list[str]]:
    documents = [line.strip() for line in text.read_text().splitlines() if line.strip()]
    rows, derived, base = [], [], None
    for label, quantize, group in VARIANTS:
        progress(f"perplexity: {label}")
        engine = make_engine(model, quantize, group, num_kv_blocks=512)
        try:
            ppl, tokens = perplexity(engine, documents)
            nbytes = expert_bytes(engine)
        finally:
            engine.shutdown()
        if base is None:
            base = (ppl, nbytes)
        rows.append([label, ppl, f"{100 * (ppl / base[0] - 1):+.2f}%", f"{nbytes / 2**20:.2f}",
                     f"{nbytes / base[1]:.3f}x", tokens])
        if quantize:
            derived.append(f"{label}: perplexity {ppl:.3f} ({100 * (ppl / base[0] - 1):+.2f}% vs fp32 {base[0]:.3f}), "
                           f"experts {nbytes / base[1]:.3f}x of fp32")
    body = table(["experts", "perplexity", "vs fp32", "expert MiB", "expert bytes vs fp32", "tokens scored"], rows)
    return body, derived


def throughput(size: str, concurrency: int, prompt_len: int, output_len: int, repeats: int
               ) -> tuple[str, list[str]]:
    model = bench_model(size)
    engines = [(label, make_engine(model, q, g, num_kv_blocks=4096, max_num_seqs=concurrency, block_size=16))
               for label, q, g in VARIANTS if label != "int4 g32"]
    try:
        vocab = engines[0][1].model_config.vocab_size
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, vocab, (prompt_len,), generator=gen).tolist() for _ in range(concurrency)]
        params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        fns = [lambda e=e: e.generate(prompts, params) for _, e in engines]
        progress(f"throughput on '{size}' at {concurrency} sequences")
        seconds = time_interleaved(fns, repeats)
        sizes = [expert_bytes(e) for _, e in engines]
    finally:
        for _, e in engines:
            e.shutdown()
    tokens = concurrency * output_len
    rows = [[label, tokens / s, f"{seconds[0] / s:.2f}x", f"{b / 2**20:.1f}"]
            for (label, _), s, b in zip(engines, seconds, sizes, strict=True)]
    derived = [f"'{size}' at {concurrency} sequences: " + "; ".join(
        f"{label} {tokens / s:.0f} tok/s ({seconds[0] / s:.2f}x fp32)"
        for (label, _), s in zip(engines[1:], seconds[1:], strict=True))]
    return table(["experts", "output tok/s", "vs fp32", "expert MiB"], rows), derived


def kernels(n: int, k: int, repeats: int) -> str:
    """One expert matmul (N x K weight) at decode (4 rows) and prefill (256 rows)."""
    w = torch.randn(n, k) * 0.02
    q8 = quantize_weight(w, ExpertQuantization(8))
    q4 = quantize_weight(w, ExpertQuantization(4, 64))
    int8_weight, int8_scale = q8.data.reshape(n, k), q8.scale.reshape(n)
    rows = []
    for m in (4, 256):
        x = torch.randn(m, k)
        fns = [lambda x=x: F.linear(x, w),
               lambda x=x: F.linear(x, dequantize(q8, torch.float32)),
               lambda x=x: F.linear(x, dequantize(q4, torch.float32)),
               lambda x=x: torch._weight_int8pack_mm(x, int8_weight, int8_scale)]
        times = time_interleaved(fns, repeats, warmup=2)
        rows.append([f"{m} x {k} @ {k} x {n}", *(f"{1e3 * t:.3f} ({t / times[0]:.2f}x)" for t in times)])
    return table(["rows x K @ K x N", "fp32 F.linear ms", "int8 dequantize + linear", "int4 g64 dequantize + linear",
                  "torch._weight_int8pack_mm"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="the trained demo checkpoint (perplexity)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT,
                        help="held-out text, one document a line")
    parser.add_argument("--sizes", nargs="+", default=["demo", "bench"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernel-repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    before = load_average()
    progress(f"{before} before (this machine is shared with other jobs right now)")
    quality_table, derived = quality(args.model, args.text)
    parts = [quality_table]
    for size in args.sizes:
        body, lines = throughput(size, args.concurrency, args.prompt_len, args.output_len, args.repeats)
        parts.append(f"Throughput, model {describe(size)}; {args.concurrency} sequences, prompt {args.prompt_len}, "
                     f"output {args.output_len} tokens, local engine:\n\n{body}")
        derived += lines
    parts.append("One expert matmul at the 'bench' size's w13 (N = 2 x 1408, K = 512), median ms (ratio to fp32):\n\n"
                 + kernels(2 * 1408, 512, args.kernel_repeats))
    after = load_average()
    progress(f"{after} after")
    command = (f"python -m bench.quant --model {shown(args.model, DEFAULT_MODEL)} --text "
               f"{shown(args.text, DEFAULT_TEXT)} --sizes {' '.join(args.sizes)} --concurrency {args.concurrency} "
               f"--prompt-len {args.prompt_len} --output-len {args.output_len} --repeats {args.repeats} "
               f"--kernel-repeats {args.kernel_repeats}")
    header = (f"`{command}`\n\nMachine: {machine()}. **Shared with other jobs during this run**: {before} before, "
              f"{after} after; read ratios, not absolute numbers.\n\nPerplexity of the trained demo model "
              f"({args.model.name}) on the held-out text ({args.text.name}), every token after BOS scored through the "
              "engine's echo + logprobs path; expert bytes are what the experts keep resident (integers + float32 "
              "scales):")
    notes = ("Experts are dequantized per call (only those with rows) to the compute dtype and run through the same "
             "grouped matmul as full precision: on this CPU torch's int8 weight-only kernel is far slower than "
             "fp32 (last table), so the integers save memory, not time. On a GPU the expected kernels are torch's "
             "weight-only mixed-precision ones (`torch._weight_int4pack_mm` / `_weight_int8pack_mm` on CUDA, or "
             "vLLM's Marlin WNA16 MoE kernels for the compressed-tensors checkpoint); not measured here (no GPU).")
    write_section("quant", "Quantized experts: perplexity, expert memory and throughput",
                  "\n\n".join([header, *parts, notes, "\n".join(f"- {line}" for line in derived)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
