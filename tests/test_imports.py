"""The import graph of the project's own packages, read from the source with ``ast`` (nothing is imported, except
where a test says so): no module imports itself in a circle, dependencies point one way, and the light modules
stay light. Imports inside functions count as much as those at the top of a module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cluster", "workers", "router_service", "protos", "bench")

# (importing package, imported package): no module of the first may import a module of the second.
ONE_WAY = [
    ("cluster", "router_service"),
    ("workers", "router_service"),
    ("cluster", "workers"),  # the pool and its workers build on cluster/, never the other way round
    # cluster/'s layers: the model (config, checkpoint, math, forward pass) knows no engine, MoE stage or link
    ("cluster.model", "cluster.engine"),
    ("cluster.model", "cluster.moe"),
    ("cluster.model", "cluster.links"),
    ("cluster.model", "cluster.planning"),
    ("cluster.moe", "cluster.engine"),  # the MoE stages serve an engine, never the other way round
    ("cluster.moe", "cluster.planning"),
    ("cluster.engine", "cluster.links"),  # an engine reaches its experts through the MoE stage only
    ("cluster.planning", "cluster.engine"),  # sizing is pure: from a ModelConfig and measured costs
    ("cluster.planning", "cluster.moe"),
    ("cluster.planning", "cluster.links"),
]
# package -> the only project modules (or packages) outside itself it may import.
ONLY = {
    "cluster.links": ("cluster.errors", "cluster.model.config"),  # the wire: no engine, no MoE, no model math
}
# (module, third-party package): neither the module nor any project module it imports, directly or not, imports it.
NEVER_REACHES = [
    ("router_service.errors", "torch"),
    ("router_service.gateway", "fastapi"),
    ("router_service.gateway", "starlette"),
    ("router_service.gateway", "grpc"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_names(name: str) -> Iterator[str]:
    """What module ``name`` imports, anywhere in it, as absolute dotted names (``from a import b`` gives both
    "a.b" and "a": b may be a module or a name defined in a)."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up level - 1
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


@cache
def graph() -> dict[str, frozenset[str]]:
    """Module -> the project modules it imports (an import names its most specific project module)."""
    known = modules()

    def resolve(dotted: str) -> str | None:
        parts = dotted.split(".")
        return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in known), None)

    edges = {}
    for name in known:
        targets = {resolve(dotted) for dotted in imported_names(name)}
        edges[name] = frozenset(t for t in targets if t is not None and t != name)
    return edges


def third_party(name: str) -> set[str]:
    """The top-level packages outside the project that module ``name`` imports itself."""
    return {dotted.split(".")[0] for dotted in imported_names(name)} - set(PACKAGES) - {""}


def reachable(start: str) -> set[str]:
    """``start`` and every project module it imports, directly or through others."""
    seen, todo = {start}, [start]
    while todo:
        for target in graph()[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph()[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph()):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_packages() -> None:
    assert {name.split(".")[0] for name in modules()} >= {"cluster", "router_service", "protos", "bench"}
    assert "router_service.errors" in graph()["router_service.gateway"]  # a top-level import
    assert "router_service.app" in graph()["bench.serve"]  # an import inside a function
    assert "protos.moe_cluster.v1.generation_pb2" in graph()["router_service.grpc_service"]  # from a import module


def test_no_import_cycles() -> None:
    assert cycles() == [], "modules that import each other in a circle"


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize(("importer", "imported"), ONE_WAY)
def test_dependencies_point_one_way(importer: str, imported: str) -> None:
    assert any(within(name, importer) for name in modules()) and any(within(name, imported) for name in modules())
    wrong = sorted(f"{name} imports {target}" for name, targets in graph().items() for target in targets
                   if within(name, importer) and within(target, imported))
    assert wrong == []


@pytest.mark.parametrize(("package", "allowed"), ONLY.items())
def test_packages_import_only_what_they_may(package: str, allowed: tuple[str, ...]) -> None:
    wrong = sorted(f"{name} imports {target}" for name, targets in graph().items() for target in targets
                   if within(name, package) and not within(target, package)
                   and not any(within(target, a) for a in allowed))
    assert wrong == []


@pytest.mark.parametrize(("module", "package"), NEVER_REACHES)
def test_light_modules_stay_light(module: str, package: str) -> None:
    assert module in modules(), f"no module {module}"
    culprits = sorted(name for name in reachable(module) if package in third_party(name))
    assert culprits == [], f"{module} reaches {package} through {culprits}"


def test_errors_import_no_torch_at_run_time() -> None:
    """The third-party packages it imports must not pull torch in either (ray.exceptions does not)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = "import sys, router_service.errors; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
