"""docs/architecture.md's walk of a decode step names real code: every `path/file.py:function` or
`path/file.py:Class.method` in its section "## A decode step" is a file of the repository that defines that name
(read with ``ast``, nothing imported), and the walk's hops are numbered 1, 2, 3, ... in order."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
SECTION = "## A decode step"
REFERENCE = re.compile(r"`([\w./-]+\.py):([A-Za-z_][\w.]*)`")
HOP = re.compile(r"^(\d+)\. ")


def section() -> str:
    text = DOC.read_text()
    assert SECTION in text, f"docs/architecture.md has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1]
    return body.split("\n## ", 1)[0]


def hops() -> list[tuple[int, str]]:
    """(number, text) of each numbered item, continuation lines joined."""
    items: list[tuple[int, str]] = []
    for line in section().splitlines():
        match = HOP.match(line)
        if match:
            items.append((int(match.group(1)), line))
        elif items and line.startswith("   "):
            items[-1] = (items[-1][0], items[-1][1] + " " + line.strip())
    return items


@cache
def tree(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text(), path)


def defines(path: str, qualname: str) -> bool:
    """Whether ``path`` defines ``qualname`` (a function or class, or a method/nested name of a class)."""
    scope: list[ast.stmt] = tree(path).body
    for part in qualname.split("."):
        found = next((node for node in scope if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and node.name == part), None)
        if found is None:
            return False
        scope = found.body
    return True


def references() -> list[tuple[str, str]]:
    return REFERENCE.findall(section())


def test_the_walk_is_a_numbered_list_of_hops_from_the_http_request_and_back() -> None:
    items = hops()
    assert [n for n, _ in items] == list(range(1, len(items) + 1)), "hops are not numbered 1, 2, 3, ..."
    assert len(items) >= 15
    firsts = [REFERENCE.search(text) for _, text in items]
    assert all(firsts), [text for (_, text), m in zip(items, firsts, strict=True) if m is None]
    paths = [m.group(1) for m in firsts if m is not None]
    assert paths[0] == paths[-1] == "router_service/ingress.py"  # from the HTTP request back to the wire
    for step in ("cluster/engine/client.py", "cluster/engine/input_processor.py", "cluster/engine/scheduler.py",
                 "cluster/model/forward.py", "cluster/engine/sampling.py", "cluster/engine/output_processor.py"):
        assert step in paths, f"the walk skips {step}"


@pytest.mark.parametrize(("path", "qualname"), references(), ids=[f"{p}:{q}" for p, q in references()])
def test_each_named_function_exists_where_it_is_named(path: str, qualname: str) -> None:
    assert (ROOT / path).is_file(), f"{path} does not exist"
    assert defines(path, qualname), f"{path} defines no {qualname}"


def test_the_check_fails_for_a_name_that_is_not_there() -> None:
    assert defines("cluster/engine/loop.py", "EngineLoop.submit")
    assert not defines("cluster/engine/loop.py", "EngineLoop.no_such_method")
    assert not defines("cluster/engine/loop.py", "submit")  # a method is not a module-level function
