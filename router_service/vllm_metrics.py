"""The HTTP server's own ``/metrics``: each engine replica's series under vLLM's names and meanings, in the
Prometheus text format, so that dashboards, alerts, KEDA/HPA rules and routers written for vLLM read them as they
are. Ray's metrics port exports the same quantities as ``ray_moe_cluster_*`` (router_service/metrics.py); here they
keep vLLM's ``vllm:`` names (documented aliases, docs/observability.md), with vLLM's labels ``model_name`` and
``engine``. Pure Python: an engine replica keeps its series in a ``VllmSeries`` and the ingress renders the
snapshots of every replica (``render``)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so that histogram_quantile over them reads the same.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]

# name -> (kind, help, buckets for histograms)
SERIES: dict[str, tuple[str, str, list[float] | None]] = {
    "vllm:num_requests_running": ("gauge", "Number of requests in model execution batches.", None),
    "vllm:num_requests_waiting": ("gauge", "Number of requests waiting to be processed.", None),
    "vllm:kv_cache_usage_perc": ("gauge", "KV-cache usage. 1 means 100 percent usage.", None),
    "vllm:prefix_cache_queries": ("counter", "Prefix cache queries, in terms of number of queried tokens.", None),
    "vllm:prefix_cache_hits": ("counter", "Prefix cache hits, in terms of number of cached tokens.", None),
    "vllm:num_preemptions": ("counter", "Cumulative number of preemptions from the engine.", None),
    "vllm:prompt_tokens": ("counter", "Number of prefill tokens processed.", None),
    "vllm:generation_tokens": ("counter", "Number of generation tokens processed.", None),
    "vllm:request_success": ("counter", "Count of successfully processed requests.", None),
    "vllm:time_to_first_token_seconds": ("histogram", "Histogram of time to first token in seconds.", TTFT_BUCKETS),
    "vllm:inter_token_latency_seconds": ("histogram", "Histogram of inter-token latency in seconds.", ITL_BUCKETS),
    "vllm:e2e_request_latency_seconds": ("histogram", "Histogram of e2e request latency in seconds.",
                                         REQUEST_BUCKETS),
    "vllm:request_queue_time_seconds": ("histogram", "Histogram of time spent in WAITING phase for request.",
                                        REQUEST_BUCKETS),
    "vllm:request_prefill_time_seconds": ("histogram", "Histogram of time spent in PREFILL phase for request.",
                                          REQUEST_BUCKETS),
    "vllm:request_decode_time_seconds": ("histogram", "Histogram of time spent in DECODE phase for request.",
                                         REQUEST_BUCKETS),
}


@dataclass
class HistogramState:
    bounds: list[float]
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), the last one is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


class VllmSeries:
    """One engine replica's vLLM series: histograms observed per request, counters and gauges set from the
    engine's stats. ``snapshot`` is what the ingress renders."""

    def __init__(self, model: str, engine_id: str) -> None:
        self.labels = {"model_name": model, "engine": engine_id}
        self.values: dict[str, float] = {}
        self.by_reason: dict[str, int] = {}  # vllm:request_success by finished_reason
        self.histograms = {name: HistogramState(list(buckets)) for name, (kind, _, buckets) in SERIES.items()
                           if kind == "histogram" and buckets is not None}

    def observe(self, name: str, value: float) -> None:
        self.histograms[name].observe(value)

    def finished(self, reason: str) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1

    def set(self, name: str, value: float) -> None:
        assert name in SERIES and SERIES[name][0] != "histogram", name
        self.values[name] = value

    def snapshot(self) -> dict[str, Any]:
        return {"labels": dict(self.labels), "values": dict(self.values), "by_reason": dict(self.by_reason),
                "histograms": {name: {"bounds": h.bounds, "counts": list(h.counts), "sum": h.total,
                                      "count": h.count} for name, h in self.histograms.items()}}


def _labels(labels: dict[str, str]) -> str:
    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(str(v))}"' for k, v in labels.items()) + "}"


def render(snapshots: list[dict[str, Any]]) -> str:
    """Prometheus text format (0.0.4) of every replica's series, one family at a time."""
    lines: list[str] = []
    for name, (kind, help_text, _) in SERIES.items():
        family = f"{name}_total" if kind == "counter" else name  # as prometheus_client writes counters (format 0.0.4)
        lines += [f"# HELP {family} {help_text}", f"# TYPE {family} {kind}"]
        for snap in snapshots:
            labels = snap["labels"]
            if kind == "histogram":
                h = snap["histograms"].get(name)
                if h is None:
                    continue
                cumulative = 0
                for bound, count in zip([*h["bounds"], float("inf")], h["counts"], strict=True):
                    cumulative += count
                    le = "+Inf" if bound == float("inf") else repr(float(bound))
                    lines.append(f"{name}_bucket{_labels(labels | {'le': le})} {cumulative}")
                lines.append(f"{name}_sum{_labels(labels)} {float(h['sum'])!r}")
                lines.append(f"{name}_count{_labels(labels)} {h['count']}")
            elif name == "vllm:request_success":
                for reason, count in sorted(snap["by_reason"].items()):
                    lines.append(f"{name}_total{_labels(labels | {'finished_reason': reason})} {count}")
            elif name in snap["values"]:
                suffix = "_total" if kind == "counter" else ""
                lines.append(f"{name}{suffix}{_labels(labels)} {float(snap['values'][name])!r}")
    return "\n".join(lines) + "\n"


def series_names() -> set[str]:
    """Every sample name ``render`` can write (what a dashboard may query)."""
    names = set()
    for name, (kind, _, _) in SERIES.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(f"{name}_total" if kind == "counter" else name)
    return names
