"""The Grafana dashboard in k8s/grafana: valid JSON that queries only series the project exports, by the labels
they carry, and that covers what an operator needs (requests, latency, KV cache, expert load, rebalancing)."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray.util.metrics import Histogram, Metric

from router_service import metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "k8s" / "grafana" / "moe-cluster-dashboard.json"
RAY_LABELS = {"NodeAddress", "SessionName", "WorkerId", "Component", "Version", "JobId"}  # Ray adds these
SELECTOR = re.compile(r"\bray_(moe_cluster_\w+)(\{[^}]*\})?")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# What the dashboard must show, whatever else it has.
REQUIRED = {"moe_cluster_requests_total", "moe_cluster_time_to_first_token_seconds",
            "moe_cluster_time_per_output_token_seconds", "moe_cluster_e2e_request_latency_seconds",
            "moe_cluster_kv_blocks_used", "moe_cluster_kv_blocks_total", "moe_cluster_expert_tokens_total",
            "moe_cluster_worker_rows_total", "moe_cluster_worker_load_imbalance", "moe_cluster_rebalances_total",
            "moe_cluster_prefix_cache_hits_total", "moe_cluster_prefix_cache_queries_total",
            "moe_cluster_kv_cache_usage_perc", "moe_cluster_inter_token_latency_seconds",
            "moe_cluster_request_queue_time_seconds", "moe_cluster_request_prefill_time_seconds",
            "moe_cluster_request_decode_time_seconds"}


def exported() -> dict[str, Metric]:
    """Every metric router_service/metrics.py defines, by name: its *Metrics classes, built (no Ray needed)."""
    found: dict[str, Metric] = {}
    for _, cls in inspect.getmembers(metrics, inspect.isclass):
        if cls.__module__ != metrics.__name__ or not cls.__name__.endswith("Metrics"):
            continue
        params = [p for p in inspect.signature(cls).parameters.values() if p.default is inspect.Parameter.empty]
        instance = cls(*(f"test-{p.name}" for p in params))
        for value in vars(instance).values():
            if isinstance(value, Metric):
                found[value._name] = value
    return found


def queries(node: Any) -> Iterator[str]:
    """Every PromQL string of the dashboard: panel targets, template variables, annotations."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from queries(item)


def metric_of(name: str, known: dict[str, Metric]) -> Metric:
    """A queried series' metric: histograms are queried through their _bucket/_sum/_count series."""
    if name in known:
        assert not isinstance(known[name], Histogram), f"{name} is a histogram: Prometheus has only its _bucket, " \
                                                       f"_sum and _count series"
        return known[name]
    base, _, suffix = name.rpartition("_")
    assert suffix in ("bucket", "sum", "count") and isinstance(known.get(base), Histogram), \
        f"the dashboard queries {name}, which router_service/metrics.py does not export"
    return known[base]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_every_queried_series_is_exported_with_those_labels(dashboard: dict[str, Any]) -> None:
    known = exported()
    assert {"moe_cluster_worker_load_imbalance", "moe_cluster_rebalances_total"} <= known.keys()
    queried: set[str] = set()
    for expr in queries(dashboard):
        used = [(metric_of(name, known), selector or "") for name, selector in SELECTOR.findall(expr)]
        if not used:
            continue
        queried.update(m._name for m, _ in used)
        labels = set().union(*(set(m._tag_keys) for m, _ in used)) | RAY_LABELS
        if any(isinstance(m, Histogram) for m, _ in used):
            labels.add("le")
        for metric, selector in used:
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
                assert label in metric._tag_keys, f"{expr}: {metric._name} has no label {label!r}"
        for group in GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in group.split(","))):
                assert label in labels, f"{expr}: groups by {label!r}, which no metric in it has"
        for label in re.findall(r"label_values\([^,]+,\s*(\w+)\)", expr):
            assert label in labels, f"{expr}: no label {label!r}"
    assert queried >= REQUIRED, f"not on the dashboard: {sorted(REQUIRED - queried)}"


def test_panels_are_laid_out_and_use_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
        taken = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & taken, f"panel {p['title']!r} overlaps another"
        cells |= taken
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "model"}
