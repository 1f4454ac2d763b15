"""Per-step cost of a structured-output token mask at batch 32, for the maintained grammar libraries that are
installed (xgrammar, llguidance): the choice of a backend for response_format / guided_json (issue 25, item 3).

    python -m bench.grammar_mask [--model DIR] [--batch 32] [--steps 48]

Not a dependency of the project yet: run it where the libraries are installed, e.g. a venv that sees the
project's packages (``python -m venv --system-site-packages V && V/bin/pip install --no-deps xgrammar
apache-tvm-ffi llguidance``). Each library compiles one JSON schema once, then ``batch`` matchers walk it in
lock step: every step fills the (batch, vocab) bitmask, then each matcher takes a random allowed token (the
same seeded choice for both libraries' walks is not possible: their masks may differ in detail). Reported: the
compile time, and the median per-step time of the mask fill for the whole batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import machine, progress, table, write_section
from bench.models import bench_model

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]}}, "required": ["name", "age", "tags", "address"]}


def allowed_tokens(row: Any, vocab: int) -> list[int]:
    """Token ids whose bit is set in one row of an int32 bitmask."""
    import torch

    bits = ((row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
    return bits.nonzero().flatten().tolist()


def walk(fill: Any, accept: Any, done: Any, bitmask: Any, batch: int, vocab: int, steps: int, seed: int
         ) -> tuple[list[float], float, float]:
    """Per-step fill times, the mean number of open matchers per step, and the mean allowed tokens per row."""
    rng = random.Random(seed)
    times, open_rows, allowed = [], 0, 0
    for _ in range(steps):
        started = time.perf_counter()
        fill()
        times.append(time.perf_counter() - started)
        for i in range(batch):
            if not done(i):
                choices = allowed_tokens(bitmask[i], vocab)
                open_rows += 1
                allowed += len(choices)
                if choices:
                    accept(i, rng.choice(choices))
    return times, open_rows / steps, allowed / max(open_rows, 1)


def run_xgrammar(hf: Any, vocab: int, batch: int, steps: int) -> dict[str, float]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    started = time.perf_counter()
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - started
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    bitmask = xgr.allocate_token_bitmask(batch, vocab)

    def fill() -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    times, open_rows, allowed = walk(fill, lambda i, t: matchers[i].accept_token(t),
                                     lambda i: matchers[i].is_terminated(), bitmask, batch, vocab, steps, 0)
    return {"compile_ms": 1000 * compile_s, "step_ms": 1000 * statistics.median(times),
            "step_p90_ms": 1000 * sorted(times)[int(0.9 * (len(times) - 1))], "open": open_rows, "allowed": allowed}


def run_llguidance(hf: Any, vocab: int, batch: int, steps: int) -> dict[str, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    matchers = [llguidance.LLMatcher(tok, grammar) for _ in range(batch)]
    compile_s = time.perf_counter() - started
    bitmask = llguidance.torch.allocate_token_bitmask(batch, vocab)
    executor = llguidance.LLExecutor()  # its own Rust thread pool

    def fill() -> None:
        llguidance.torch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    times, open_rows, allowed = walk(fill, lambda i, t: matchers[i].consume_token(t),
                                     lambda i: matchers[i].is_stopped(), bitmask, batch, vocab, steps, 0)
    return {"compile_ms": 1000 * compile_s, "step_ms": 1000 * statistics.median(times),
            "step_p90_ms": 1000 * sorted(times)[int(0.9 * (len(times) - 1))], "open": open_rows, "allowed": allowed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory (its tokenizer)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from transformers import PreTrainedTokenizerFast

    from cluster.model.config import ModelConfig

    model = args.model or bench_model("demo")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(model / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    vocab = ModelConfig.from_file(model).vocab_size
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results: dict[str, dict[str, float]] = {}
    for name, run in (("xgrammar", run_xgrammar), ("llguidance", run_llguidance)):
        try:
            results[name] = run(hf, vocab, args.batch, args.steps)
        except ImportError as err:
            progress(f"{name} is not installed ({err}); skipped")
            continue
        progress(f"{name}: {results[name]}")
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = [[name, r["compile_ms"], r["step_ms"], r["step_p90_ms"], r["open"], round(r["allowed"])]
            for name, r in results.items()]
    body = "\n".join([
        f"Machine: {machine()} (shared: load average {load_before} before, {load_after} after). Tokenizer of "
        f"`{model}` (vocab {vocab}). One JSON schema (an object with strings, an integer, an array and a nested "
        f"object), compiled once; {args.batch} matchers walk it in lock step for {args.steps} steps, each taking a "
        f"random allowed token. Command: `python -m bench.grammar_mask --batch {args.batch} --steps {args.steps}`.",
        "",
        table(["library", "compile ms (schema + matchers)", f"mask fill per step, batch {args.batch}, p50 ms",
               "p90 ms", "open matchers per step (mean)", "allowed tokens per row (mean)"], rows),
    ])
    if len(results) == 2:
        x, ll = results["xgrammar"], results["llguidance"]
        body += (f"\n\n- Per-step mask at batch {args.batch}: xgrammar {x['step_ms']:.2f} ms, llguidance "
                 f"{ll['step_ms']:.2f} ms (xgrammar {ll['step_ms'] / x['step_ms']:.0f}x faster per step).")
    print(body)
    if not args.no_write and results:
        write_section("grammar_mask", "Structured output: per-step token-mask cost of grammar libraries", body)


if __name__ == "__main__":
    main()
