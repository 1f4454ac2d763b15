"""The repository's own promises: CI runs the README's test command, the packages import, and a clone works
anywhere (nothing generated is tracked, nothing points outside the repository)."""

from __future__ import annotations

import fnmatch
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CHECKED_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".cfg", ".sh"}
# Paths that only exist on the machine the project was developed on (spelled in pieces so this file passes too).
OUTSIDE_PATHS = re.compile("|".join([
    r"(?<![\w.~-])/" + "work/",  # an absolute path into the development machine's workspace
    r"\.\./" + "shared\\b",  # the folder beside the checkout there
    "k8s-" + "schemas",  # its KubeRay schemas, now tests/data/kuberay/
]))


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.strip() for block in blocks for line in block.strip().splitlines()]


def find_packages(include: list[str]) -> list[str]:
    """What setuptools' packages.find lists: packages (folders with __init__.py, inside packages) whose dotted
    name matches an include pattern."""
    found: list[str] = []

    def walk(folder: Path, prefix: str) -> None:
        for sub in sorted(folder.iterdir()):
            if sub.is_dir() and (sub / "__init__.py").is_file():
                name = prefix + sub.name
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
                    found.append(name)
                walk(sub, name + ".")

    walk(ROOT, "")
    return found


def git_files(*options: str) -> list[str]:
    """Files git lists in this checkout (skips the test where this is not a git checkout)."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run([git, "-C", str(ROOT), "ls-files", "-z", *options], capture_output=True, text=True,
                         check=True, timeout=60)
    return [name for name in out.stdout.split("\0") if name]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_commands = [c for c in readme_commands() if "pytest" in c and "pip install" in c]
    assert len(test_commands) == 1, test_commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert test_commands[0] in ci_lines
    assert ci_lines[-1] == test_commands[0], "CI's exit status must be the test command's"


def test_readme_main_command_serves() -> None:
    assert any(c.endswith("moe-cluster serve") and "pip install" in c for c in readme_commands())


def test_every_package_the_distribution_includes_imports_from_this_checkout() -> None:
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(include)
    for pattern in include:
        matched = [p for p in packages if fnmatch.fnmatchcase(p, pattern)]
        assert matched, f"pyproject includes {pattern!r}, which matches no package"
    for name in packages:
        module = importlib.import_module(name)
        assert module.__file__ is not None and Path(module.__file__).resolve().is_relative_to(ROOT), \
            f"{name} imports from {module.__file__}, not from this checkout"


def test_nothing_generated_by_pip_install_is_tracked() -> None:
    tracked = git_files()
    assert tracked
    assert [f for f in tracked if any(part.endswith(".egg-info") for part in Path(f).parts[:-1])] == []


def test_gitignore_ignores_egg_info() -> None:
    lines = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert "*.egg-info/" in lines
    git = shutil.which("git")
    if git is not None and (ROOT / ".git").exists():
        for path in ("moe_cluster.egg-info/PKG-INFO", "sub/dir/other.egg-info/SOURCES.txt"):
            ignored = subprocess.run([git, "-C", str(ROOT), "check-ignore", "-q", "--no-index", path], timeout=60)
            assert ignored.returncode == 0, f"git does not ignore {path}"


def test_no_file_points_outside_the_repository() -> None:
    """A clone works anywhere: no absolute path into the development machine, no folder beside the checkout."""
    files = git_files("--cached", "--others", "--exclude-standard")  # tracked, and new files not ignored
    checked = [f for f in files if Path(f).suffix in CHECKED_SUFFIXES or f == ".ci/run"]
    assert "pyproject.toml" in checked and "tests/test_repo.py" in checked
    offenders = []
    for name in checked:
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree, not yet in the index
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE_PATHS.search(line):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert offenders == []


def test_test_data_is_not_ignored_and_not_collected() -> None:
    data = [p for p in (ROOT / "tests" / "data").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    names = {p.relative_to(ROOT).as_posix() for p in data}
    assert {"tests/data/kuberay/README.md", "tests/data/kuberay/raycluster.ray.io_v1.schema.json",
            "tests/data/kuberay/rayservice.ray.io_v1.schema.json"} <= names
    patterns = PYPROJECT["tool"]["pytest"]["ini_options"].get("python_files", ["test_*.py", "*_test.py"])
    collectable = [p.name for p in data if p.name == "conftest.py" or any(fnmatch.fnmatch(p.name, g) for g in patterns)]
    assert collectable == [], "tests/data holds data, not tests or conftest files"
    git = shutil.which("git")
    if git is not None and (ROOT / ".git").exists():
        out = subprocess.run([git, "-C", str(ROOT), "check-ignore", "--no-index", *sorted(names)],
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.split() == [], "ignored by .gitignore, so a commit would leave them out"


def test_cpu_torch_is_pinned_outside_the_package_requirements() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "torch==" not in pyproject
    assert "torch==" in (ROOT / "constraints-cpu.txt").read_text()
