"""Shared by the benchmarks: workload flags, timing, the machine's description, and writing tables into
docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository, wherever it is cloned
DOCS = ROOT / "docs" / "benchmarks.md"


def load_average() -> str:
    """The 1/5/15-minute load average: printed before and after a benchmark (a busy machine misleads)."""
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")


def time_interleaved(fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 1) -> list[float]:
    """Median wall time of each function, run in turn each repeat so machine noise hits all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples, strict=True):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [statistics.median(s) for s in samples]


def add_workload_flags(parser: argparse.ArgumentParser) -> None:
    """The workload flags of the throughput benchmarks: model size, concurrency levels, prompt and output lengths."""
    parser.add_argument("--size", default="demo")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)


def workload_argv(args: argparse.Namespace) -> list[str]:
    """The workload flags of ``args`` as a command line, for a benchmark's peer subprocess."""
    return ["--size", args.size, "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len),
            "--concurrency", *map(str, args.concurrency)]


def command_line(module: str, args: argparse.Namespace) -> str:
    """How a benchmark was run, for its table: ``python -m module`` with every flag's value (--no-write left out)."""
    return f"python -m {module} " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "no_write")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section ``name`` of docs/benchmarks.md, then refresh the summary at its top."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n## {title}\n\n{body.strip()}\n{end}"
    header = "# Benchmarks\n\nEvery table here is written by a script in `bench/`.\n"
    text = DOCS.read_text() if DOCS.exists() else header
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(with_summary(text))
    print(f"wrote section '{name}' of {DOCS}", file=sys.stderr)


SUMMARY_START, SUMMARY_END = "<!-- bench:summary:start -->", "<!-- bench:summary:end -->"


def with_summary(text: str) -> str:
    """The summary block: each section's conclusions (the '- ' lines its script derived from its table), under the
    section's title, in page order. Nobody types a number into it."""
    sections = re.findall(r"<!-- bench:(\w+):start -->\n## (.*?)\n(.*?)<!-- bench:\1:end -->", text, re.S)
    lines = [SUMMARY_START, "## Summary", "", "Collected from the sections below by `bench/common.py` (each line is "
             "computed from its section's table by the script that wrote it):", ""]
    for name, title, body in sections:
        if name == "summary":
            continue
        derived = [line for line in body.splitlines() if line.startswith("- ")]
        lines += [f"- **{title}**"] + [f"  {line}" for line in derived] if derived else []
    block = "\n".join(lines) + "\n" + SUMMARY_END
    pattern = re.compile(re.escape(SUMMARY_START) + ".*?" + re.escape(SUMMARY_END), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    first = text.find("<!-- bench:")
    return text + "\n" + block + "\n" if first < 0 else text[:first] + block + "\n\n" + text[first:]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
