"""The GPU check (bench/gpu_check.sh) on a machine without CUDA: its argument handling, its listing, and the
fallbacks that must work the first time on a GPU machine: no Ray (the cluster step is skipped with the reason,
and nothing else imports Ray). The whole CPU dry run is under ``-m slow``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
NO_RAY = "import sys; sys.modules['ray'] = None  # as on a machine without Ray: importing it fails\n"


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)


def python_without_ray(code: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-c", NO_RAY + code], timeout)


@pytest.mark.parametrize(("argv", "message"), [
    (["--sizes", "0"], "expected a positive integer, got 0"),
    (["--sizes", "x"], "expected a positive integer, got 'x'"),
    (["--steps", "warp"], "invalid choice: 'warp'"),
    (["--budget-s"], "expected one argument"),
])
def test_bad_arguments_exit_2_naming_the_value(argv: list[str], message: str) -> None:
    done = run(["bash", "bench/gpu_check.sh", "--no-install", *argv])
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_list_names_every_step_and_its_command_without_running_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run(["bash", "bench/gpu_check.sh", "--no-install", "--list", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    for step in ("env", "tests", "parity", "throughput", "cluster"):
        assert f"--step {step} --out {out}" in done.stdout
    assert "no CUDA device here: running the CPU fallback" in done.stderr  # this machine has no GPU
    assert "--dry-run" in done.stdout and not out.exists()


def test_local_engine_and_the_non_cluster_steps_import_no_ray() -> None:
    done = python_without_ray("import cluster.engine.loop, cluster.engine.loader, bench.gpu_check, bench.models, "
                              "tests.test_gpu, tests.test_parity_hf\nprint('imported')")
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]


def test_without_ray_the_cluster_step_is_skipped_with_the_reason_and_env_still_runs(tmp_path: Path) -> None:
    code = ("from bench.gpu_check import main\n"
            f"for step in ('env', 'cluster'): main(['--step', step, '--out', {str(tmp_path)!r}, '--dry-run'])")
    done = python_without_ray(code)
    assert done.returncode == 0, done.stderr[-2000:]
    cluster = json.loads((tmp_path / "cluster.json").read_text())
    assert cluster["status"] == "skipped" and "Ray is not importable" in cluster["summary"]
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["status"] == "ok"
    assert ["ray", "not importable (its steps are skipped)", "ok"] in env["rows"]


def test_a_step_that_raises_is_a_failed_row_and_the_check_exits_1(tmp_path: Path) -> None:
    # A step that raises writes a FAIL result naming the error, in its own process; the driver reads it.
    code = ("import sys, bench.gpu_check as g\n"
            "g.STEP_FUNCTIONS['env'] = lambda args: 1 / 0\n"
            f"sys.exit(g.main(['--step', 'env', '--out', {str(tmp_path)!r}, '--dry-run']))")
    done = python_without_ray(code)
    assert done.returncode == 0, done.stderr[-2000:]  # the child reports; the driver decides the exit status
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["status"] == "FAIL" and env["summary"].startswith("ZeroDivisionError")


@pytest.mark.slow
def test_the_whole_dry_run_passes_on_the_cpu(tmp_path: Path) -> None:
    done = run(["bash", "bench/gpu_check.sh", "--no-install", "--out", str(tmp_path)], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "gpu-check.md").read_text()
    for step in ("env", "tests", "parity", "throughput", "cluster"):
        assert f"| {step} | **" in table
    assert "Result: no step failed." in table


def test_bf16_parity_allows_a_routing_flip_but_not_a_systematic_error() -> None:
    """The parity step's bf16 criterion (as tests/test_gpu.py's): one token whose top-2 experts flipped is allowed,
    the same error on every token is not."""
    import torch

    from bench.gpu_check import bf16_parity

    gen = torch.Generator().manual_seed(0)
    exact = [torch.randn(40, 96, generator=gen, dtype=torch.float64) for _ in range(2)]
    theirs = [e + 0.01 * torch.randn(e.shape, generator=gen, dtype=torch.float64) for e in exact]
    ours = [e + 0.01 * torch.randn(e.shape, generator=gen, dtype=torch.float64) for e in exact]
    ours[1][7] += 0.6  # one routing flip: a jump in one token's logits, like the first H200 run's
    ok, detail = bf16_parity(ours, theirs, exact)
    assert ok, detail
    assert "1 of 80" in detail
    drifted = [o + 0.05 for o in ours]  # a systematic error on every token: the median says so
    ok, detail = bf16_parity(drifted, theirs, exact)
    assert not ok, detail
    ok, detail = bf16_parity([o + 0.3 for o in ours], theirs, exact)  # and a large one every token's error too
    assert not ok and "80 of 80" in detail
