"""The GPU check: what a machine with NVIDIA GPUs runs the day one is available, in one command, in minutes.

    bash bench/gpu_check.sh [--no-install] [--out DIR] [--dry-run] [--list] [--steps env tests ...]

Steps, each in a process of its own (a crash, an out-of-memory or a hang fails that step, not the check), each
with a time limit cut from one overall budget:

  env         torch, CUDA, the devices, transformers, whether Ray and pytest are importable, nvidia-smi
  tests       the `gpu` and `multigpu` tests (tests/test_gpu.py; multi-GPU ones skip on one device)
  parity      our local engine's logits against transformers' Mixtral on the device, float32 and bfloat16,
              and greedy tokens against transformers' generate
  throughput  transformers' generate vs the local engine (bfloat16) at 1/32/128 sequences
  cluster     the cluster (one coordinator and two expert workers sharing the device through fractional Ray GPUs,
              shared-memory links): its greedy tokens against the local engine's (float32), then its throughput
              (bfloat16) beside the other two. Skipped, with the reason, where Ray is not importable.

Nothing but the cluster step imports Ray. Without CUDA (or with --dry-run) every step runs its CPU fallback on
the tiny demo model at 1 and 2 sequences, which is how this script is tested on the CPU-only development machine.
It writes one markdown table, OUT/gpu-check.md (and OUT/<step>.log, OUT/<step>.json); exit status 0 when no step
failed, 1 when one did, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("env", "tests", "parity", "throughput", "cluster")
Generate = Callable[[list[list[int]]], list[list[int]]]
STEP_CAP_S = {"env": 60, "tests": 240, "parity": 150, "throughput": 240, "cluster": 240}  # each step's own limit


@dataclass
class StepResult:
    step: str
    status: str  # "ok", "FAIL" or "skipped"
    summary: str  # one line
    rows: list[list[str]] = field(default_factory=list)  # (check, result, status) rows for the table
    seconds: float = 0.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check", help="directory for the table and logs (default: %(default)s)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), metavar="STEP",
                        help=f"which steps, of {', '.join(STEPS)} (default: all)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU, the tiny demo model at 1 and 2 sequences: every step's CPU fallback "
                             "(chosen by itself where CUDA is missing)")
    parser.add_argument("--list", action="store_true", help="print what would run, and how, then exit")
    parser.add_argument("--sizes", type=_positive, nargs="+", default=[1, 32, 128], metavar="N",
                        help="sequences per throughput run (default: %(default)s)")
    parser.add_argument("--prompt-len", type=_positive, default=64, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--output-len", type=_positive, default=64, help="generated tokens (default: %(default)s)")
    parser.add_argument("--model-size", choices=["demo", "bench", "mid"], default="bench",
                        help="model of bench/models.py to run (default: %(default)s, 152M parameters)")
    parser.add_argument("--budget-s", type=_positive, default=420,
                        help="all steps together end within this many seconds (default: %(default)s)")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # internal: run one step here
    args = parser.parse_args(argv)
    if args.step is None and not args.dry_run and not _has_cuda():
        print("gpu_check: no CUDA device here: running the CPU fallback (as --dry-run)", file=sys.stderr)
        args.dry_run = True
    if args.dry_run:
        args.sizes, args.prompt_len, args.output_len, args.model_size = [1, 2], 8, 4, "demo"
    return args


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def has_module(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (Ray must stay out of the non-cluster steps)."""
    return importlib.util.find_spec(name) is not None


def step_argv(args: argparse.Namespace, step: str) -> list[str]:
    argv = [sys.executable, "-m", "bench.gpu_check", "--step", step, "--out", str(args.out),
            "--sizes", *map(str, args.sizes), "--prompt-len", str(args.prompt_len),
            "--output-len", str(args.output_len), "--model-size", args.model_size]
    return argv + (["--dry-run"] if args.dry_run else [])


def describe_step(step: str, args: argparse.Namespace) -> str:
    device = "cpu (fallback)" if args.dry_run else "cuda"
    sizes = "/".join(map(str, args.sizes))
    what = {
        "env": "versions, devices, importable packages, nvidia-smi",
        "tests": "pytest tests/test_gpu.py -m 'gpu or multigpu' (skips where CUDA or a second GPU is missing)",
        "parity": f"local engine vs transformers on {device}: logits in float32 and bfloat16, greedy tokens",
        "throughput": f"transformers generate vs local engine on {device}, {sizes} seqs x {args.prompt_len}+"
                      f"{args.output_len} tokens, model '{args.model_size}'",
        "cluster": f"cluster (2 workers + coordinator sharing one device) vs local engine tokens, then {sizes} seqs"
                   + ("" if has_module("ray") else " -- will be SKIPPED: Ray is not importable"),
    }[step]
    return f"{step:<10} {what}\n           $ {shlex.join(step_argv(args, step))}"


# ------------------------------------------------------------------------------------------------- the driver


def run_all(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    deadline = time.monotonic() + args.budget_s
    results: list[StepResult] = []
    for step in args.steps:
        left = deadline - time.monotonic()
        limit = min(STEP_CAP_S[step], left)
        print(f"[gpu_check] {step}: starting (limit {limit:.0f}s)", file=sys.stderr, flush=True)
        if limit < 10:
            results.append(StepResult(step, "skipped", f"the overall budget of {args.budget_s}s is spent"))
            continue
        results.append(run_step(args, step, limit))
        r = results[-1]
        print(f"[gpu_check] {step}: {r.status} in {r.seconds:.0f}s: {r.summary}", file=sys.stderr, flush=True)
    report = render(args, results, load_before, os.getloadavg())
    (out / "gpu-check.md").write_text(report)
    print(report)
    print(f"[gpu_check] wrote {out / 'gpu-check.md'}", file=sys.stderr)
    return 1 if any(r.status == "FAIL" for r in results) else 0


def run_step(args: argparse.Namespace, step: str, limit_s: float) -> StepResult:
    out = Path(args.out)
    result_file, log_file = out / f"{step}.json", out / f"{step}.log"
    result_file.unlink(missing_ok=True)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    started = time.monotonic()
    with log_file.open("w") as log:
        try:
            done = subprocess.run(step_argv(args, step), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=limit_s, check=False)
            code: int | None = done.returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.monotonic() - started
    if result_file.exists():
        result = StepResult(**json.loads(result_file.read_text()))
    elif code is None:
        result = StepResult(step, "FAIL", f"timed out after {limit_s:.0f}s (see {log_file})")
    else:
        result = StepResult(step, "FAIL", f"exited {code} without a result: {last_line(log_file)}")
    result.seconds = seconds
    return result


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def render(args: argparse.Namespace, results: list[StepResult], before: tuple[float, ...],
           after: tuple[float, ...]) -> str:
    rows = []
    for r in results:
        rows.append([r.step, f"**{r.summary}**", r.status, f"{r.seconds:.0f}s"])
        rows += [[r.step, f"{check}: {value}", status, ""] for check, value, status in r.rows]
    lines = ["| step | check: result | status | time |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    failed = [r.step for r in results if r.status == "FAIL"]
    return "\n".join([
        "# GPU check" + (" (dry run: CPU fallback, demo model)" if args.dry_run else ""),
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; commit "
        f"{git_commit()}. Load average (1/5/15 min) before {_load(before)}, after {_load(after)}.",
        f"Command: `bash bench/gpu_check.sh {shlex.join(sys.argv[1:])}`.",
        "",
        *lines,
        "",
        f"Result: {'FAILED: ' + ', '.join(failed) if failed else 'no step failed'}.",
        "",
    ])


def _load(values: tuple[float, ...]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False)
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# ------------------------------------------------------------------------------------------------- the steps


def step_env(args: argparse.Namespace) -> StepResult:
    import torch

    rows = [["torch", torch.__version__, "ok"], ["python", platform.python_version(), "ok"]]
    cuda = torch.cuda.is_available()
    rows.append(["CUDA", f"{torch.version.cuda} available" if cuda else "not available", "ok"])
    for i in range(torch.cuda.device_count() if cuda else 0):
        props = torch.cuda.get_device_properties(i)
        rows.append([f"cuda:{i}", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                                  f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}", "ok"])
    needs = ("transformers", "tokenizers", "safetensors", "jinja2", "tqdm")  # what the local engine imports
    for name in (*needs, "ray", "pytest", "msgpack"):
        version = _version(name)
        needed = name in needs
        status = "ok" if version or not needed else "FAIL"
        rows.append([name, version or "not importable" + ("" if needed else " (its steps are skipped)"), status])
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20, check=False).stdout
        (Path(args.out) / "nvidia-smi.txt").write_text(smi)
        rows.append(["nvidia-smi", f"written to {args.out}/nvidia-smi.txt", "ok"])
    except (OSError, subprocess.TimeoutExpired):
        rows.append(["nvidia-smi", "not found", "ok"])
    gpus = torch.cuda.device_count() if cuda else 0
    status = "FAIL" if any(r[2] == "FAIL" for r in rows) else "ok"
    return StepResult("env", status, f"{gpus} CUDA device(s), torch {torch.__version__}", rows)


def _version(name: str) -> str | None:
    if not has_module(name):
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "importable"


def step_tests(args: argparse.Namespace) -> StepResult:
    if not has_module("pytest"):
        return StepResult("tests", "skipped", "pytest is not importable (pip install -e '.[test]')")
    argv = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu or multigpu", "-q", "-rs",
            "-p", "no:cacheprovider"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=STEP_CAP_S["tests"] - 10,
                          check=False)
    print(done.stdout, done.stderr, sep="\n")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else "no output"
    skips = [line.removeprefix("SKIPPED ") for line in lines if line.startswith("SKIPPED")]
    rows = [["skipped", s[:160], "skipped"] for s in skips]
    ok = done.returncode in (0, 5)  # 5: nothing collected (cannot happen while tests/test_gpu.py has tests)
    return StepResult("tests", "ok" if ok else "FAIL", f"{summary} ({shlex.join(argv[2:])})", rows)


def _device(args: argparse.Namespace) -> str:
    return "cpu" if args.dry_run else "cuda"


def _model(args: argparse.Namespace) -> Path:
    from bench.models import bench_model

    return bench_model(args.model_size)


def _hf_model(path: Path, device: str, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    model.generation_config.eos_token_id = None  # exactly output_len tokens, as ignore_eos does for ours
    model.generation_config.pad_token_id = 0
    return model.to(device, dtype)


def _local_engine(path: Path, device: str, dtype: str, max_seqs: int, tokens: int) -> Any:
    from cluster.engine.loop import LocalEngine

    return LocalEngine.from_config(_engine_config(path, device, dtype, max_seqs, tokens))


def _engine_config(path: Path, device: str, dtype: str, max_seqs: int, tokens: int) -> Any:
    from cluster.engine_config import EngineConfig

    return EngineConfig(model=str(path), device=device, dtype=dtype, progress=False, max_num_seqs=max_seqs,
                        max_num_batched_tokens=max(2048, max_seqs * 64),
                        num_kv_blocks=max_seqs * (tokens // 16 + 2))


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(n)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def hf_generate(model: Any, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        ids = torch.tensor(batch, device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return [row[len(batch[0]):] for row in out.tolist()]


def engine_generate(engine: Any, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    from cluster.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    return [r.completions[0].token_ids for r in engine.generate(batch, params)]


def generator(engine: Any, new_tokens: int) -> Generate:
    return lambda batch: engine_generate(engine, batch, new_tokens)


def agreement(ours: list[list[int]], reference: list[list[int]]) -> float:
    """The mean fraction of each sequence's tokens, up to its first difference, that equal the reference's."""
    def prefix(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    return sum(prefix(a, b) / max(1, len(b)) for a, b in zip(ours, reference, strict=True)) / max(1, len(reference))


# bf16 parity, as tests/test_gpu.py judges it: two bf16 implementations agree only up to rounding, and a rounding
# difference may flip a token's top-2 experts (a jump in that token's logits, in transformers' bf16 as much as in
# ours: docs/gpu-check-h200.md). So per token, each bf16 run's error against transformers' float32 logits: ours may be
# worse than 2x transformers' + 1% of the largest logit on at most FLIP_SHARE of the tokens (at least 2), and our
# median token error at most 1.5x transformers' + 0.1% of the largest logit.
FLIP_SHARE = 0.05


def bf16_parity(ours: list[Any], theirs: list[Any], exact: list[Any]) -> tuple[bool, str]:
    """Per-token logits (T, V) of each prompt: ours and transformers' in bf16, transformers' in float32."""
    import torch

    ours_err = torch.cat([(o - e).abs().amax(-1) for o, e in zip(ours, exact, strict=True)])  # (tokens,)
    theirs_err = torch.cat([(t - e).abs().amax(-1) for t, e in zip(theirs, exact, strict=True)])
    scale = max(e.abs().max().item() for e in exact)
    worse = int((ours_err > 2 * theirs_err + 0.01 * scale).sum())
    allowed = max(2, int(FLIP_SHARE * ours_err.numel()))
    ours_median, theirs_median = ours_err.median().item(), theirs_err.median().item()
    ok = worse <= allowed and ours_median <= 1.5 * theirs_median + 1e-3 * scale
    return ok, (f"per token vs transformers float32: median error ours {ours_median:.3g}, transformers bf16 "
                f"{theirs_median:.3g} (limit 1.5x + {1e-3 * scale:.2g}); tokens where ours > 2x theirs + 1% of "
                f"the largest logit {scale:.3g}: {worse} of {ours_err.numel()} (limit {allowed}, routing flips); "
                f"largest error ours {ours_err.max().item():.3g}, transformers {theirs_err.max().item():.3g}")


def step_parity(args: argparse.Namespace) -> StepResult:
    import torch

    path, device = _model(args), _device(args)
    rows, failed = [], False
    exact: list[Any] = []  # transformers' float32 logits per prompt: what the bf16 runs are measured against
    for dtype in ("float32", "bfloat16"):
        hf = _hf_model(path, device, getattr(torch, dtype))
        engine = _local_engine(path, device, dtype, 8, args.prompt_len + 32)
        try:
            ids = prompts(4, args.prompt_len, engine.model_config.vocab_size)
            with torch.inference_mode():
                expected = [hf(torch.tensor([p], device=device)).logits[0].double() for p in ids]
            ours = [t.double().to(device) for t in engine.score(ids)]
            if dtype == "float32":
                exact = expected
                scale = max(e.abs().max().item() for e in expected)
                diff = max((o - e).abs().max().item() for o, e in zip(ours, expected, strict=True))
                ok = diff <= 1e-3 * scale
                detail = (f"largest abs(ours - transformers) {diff:.3g}, {diff / scale:.2e} of the largest "
                          f"abs(logit) {scale:.3g} (limit 0.001)")
            else:
                ok, detail = bf16_parity(ours, expected, exact)
            failed |= not ok
            rows.append([f"logits {dtype}", detail, "ok" if ok else "FAIL"])
            new = 32 if not args.dry_run else 8
            share = agreement(engine_generate(engine, ids, new), hf_generate(hf, ids, new))
            exact_tokens = dtype == "float32"  # in bf16 a near-tie may flip, and everything after it differs
            ok = share == 1.0 or not exact_tokens
            failed |= not ok
            rows.append([f"greedy {dtype}", f"{share:.0%} of 4 x {new} tokens equal transformers' generate "
                         f"(up to the first difference)", "ok" if ok else "FAIL"])
        finally:
            engine.shutdown()
            del hf
            if device == "cuda":
                torch.cuda.empty_cache()
    return StepResult("parity", "FAIL" if failed else "ok",
                      f"local engine vs transformers on {device}, model '{args.model_size}'", rows)


def measure(peers: dict[str, Generate], args: argparse.Namespace, vocab: int, repeats: int = 2
            ) -> dict[str, dict[int, float]]:
    """Output tokens/s of each peer at each size: best of ``repeats``, the peers in turn each repeat."""
    tps: dict[str, dict[int, float]] = {name: {} for name in peers}
    for generate in peers.values():
        generate(prompts(2, args.prompt_len, vocab))  # warm-up (CUDA kernels, allocator)
    for n in args.sizes:
        batch = prompts(n, args.prompt_len, vocab)
        for _ in range(repeats):
            for name, generate in peers.items():
                started = time.perf_counter()
                out = generate(batch)
                seconds = time.perf_counter() - started
                assert all(len(o) == args.output_len for o in out), f"{name}: wrong output length"
                tps[name][n] = max(tps[name].get(n, 0.0), n * args.output_len / seconds)
        print(f"{n} sequences: " + ", ".join(f"{k} {v[n]:.0f} tok/s" for k, v in tps.items()), flush=True)
    return tps


def throughput_rows(tps: dict[str, dict[int, float]], reference: str) -> list[list[str]]:
    rows = []
    for name, by_n in tps.items():
        for n, value in by_n.items():
            ratio = "" if name == reference else f" ({value / tps[reference][n]:.2f}x {reference})"
            rows.append([f"{name}, {n} seqs", f"{value:,.0f} tok/s{ratio}", "ok"])
    return rows


def step_throughput(args: argparse.Namespace) -> StepResult:
    import torch

    path, device = _model(args), _device(args)
    dtype = "bfloat16"
    hf = _hf_model(path, device, torch.bfloat16)
    engine = _local_engine(path, device, dtype, max(args.sizes), args.prompt_len + args.output_len)
    try:
        tps = measure({"transformers generate": lambda b: hf_generate(hf, b, args.output_len),
                       "local engine": generator(engine, args.output_len)},
                      args, engine.model_config.vocab_size)
    finally:
        engine.shutdown()
    top = max(args.sizes)
    return StepResult("throughput", "ok", f"{dtype} on {device}, model '{args.model_size}': local engine "
                      f"{tps['local engine'][top] / tps['transformers generate'][top]:.2f}x transformers at {top} "
                      f"seqs", throughput_rows(tps, "transformers generate"))


def step_cluster(args: argparse.Namespace) -> StepResult:
    if not has_module("ray"):
        return StepResult("cluster", "skipped", "Ray is not importable here (pip install 'ray[serve]>=2.40'); "
                          "the other steps do not need it")
    import ray
    import torch

    from cluster.engine_config import ClusterConfig, PoolConfig
    from workers.cluster_engine import ClusterEngine

    path, device = _model(args), _device(args)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 8), num_gpus=gpus, include_dashboard=False,
             log_to_driver=False)
    # One device for all: a coordinator and two workers of 4 experts, a third of the GPU each (NCCL refuses two
    # ranks on one device, so the links are shared memory, staged through host memory).
    share = 1 / 3
    pool_cfg = PoolConfig(experts_per_worker=4, use_gpus=gpus > 0, worker_num_gpus=share, threads_per_worker=1)
    cluster_cfg = ClusterConfig(use_gpus=gpus > 0, coordinator_num_gpus=share, link="shm" if gpus else "auto")
    rows, failed = [], False
    try:
        for dtype in ("float32", "bfloat16"):
            max_seqs = max(args.sizes) if dtype == "bfloat16" else 4
            engine_cfg = _engine_config(path, "auto", dtype, max_seqs, args.prompt_len + args.output_len)
            cluster = ClusterEngine.start(engine_cfg, cluster_cfg, pool_cfg)
            local = _local_engine(path, device, dtype, max_seqs, args.prompt_len + args.output_len)
            try:
                described = cluster.describe()
                rows.append([f"{dtype} layout", f"links {sorted(set(described['links']))}, workers on "
                             f"{sorted({w['device'] for w in described['pool']['workers']})}", "ok"])
                if dtype == "float32":
                    ids = prompts(4, args.prompt_len, local.model_config.vocab_size)
                    share_equal = agreement(engine_generate(cluster, ids, 16), engine_generate(local, ids, 16))
                    failed |= share_equal != 1.0
                    rows.append(["greedy float32", f"{share_equal:.0%} of 4 x 16 tokens equal the local engine's",
                                 "ok" if share_equal == 1.0 else "FAIL"])
                    continue
                tps = measure({"local engine": generator(local, args.output_len),
                               "cluster": generator(cluster, args.output_len)}, args, local.model_config.vocab_size)
                rows += throughput_rows(tps, "local engine")
            finally:
                cluster.shutdown()
                local.shutdown()
    finally:
        ray.shutdown()
    return StepResult("cluster", "FAIL" if failed else "ok",
                      f"coordinator + 2 workers sharing {'one GPU' if gpus else 'the CPU'}", rows)


STEP_FUNCTIONS: dict[str, Callable[[argparse.Namespace], StepResult]] = {
    "env": step_env, "tests": step_tests, "parity": step_parity, "throughput": step_throughput,
    "cluster": step_cluster}


def run_one(args: argparse.Namespace) -> int:
    """The child process of one step: run it and write its result (a failure is a result too)."""
    started = time.monotonic()
    try:
        result = STEP_FUNCTIONS[args.step](args)
    except Exception as err:  # the step failed: say how, in the table
        import traceback

        traceback.print_exc()
        first = str(err).splitlines()[0][:240] if str(err) else ""
        result = StepResult(args.step, "FAIL", f"{type(err).__name__}: {first}")
    result.seconds = time.monotonic() - started
    (Path(args.out) / f"{args.step}.json").write_text(json.dumps(asdict(result)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step:
        return run_one(args)
    if args.list:
        print("gpu_check would run (in this order, each in its own process):")
        for step in args.steps:
            print(describe_step(step, args))
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
