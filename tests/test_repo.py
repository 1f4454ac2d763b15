"""The repository's own promises: CI runs the README's test command; the layout the user asked for."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.strip() for block in blocks for line in block.strip().splitlines()]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_commands = [c for c in readme_commands() if "pytest" in c and "pip install" in c]
    assert len(test_commands) == 1, test_commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert test_commands[0] in ci_lines


def test_readme_main_command_serves() -> None:
    assert any(c.endswith("moe-cluster serve") and "pip install" in c for c in readme_commands())


def test_layout() -> None:
    for folder in ("cluster", "workers", "router_service", "protos", "k8s", "tests"):
        assert (ROOT / folder).is_dir(), folder
    assert (ROOT / "pyproject.toml").is_file()


def test_cpu_torch_is_pinned_outside_the_package_requirements() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "torch==" not in pyproject
    assert "torch==" in (ROOT / "constraints-cpu.txt").read_text()
