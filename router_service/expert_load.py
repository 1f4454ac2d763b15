"""``moe-cluster expert-load URL``: a picture of expert load, read from a running server's Prometheus metrics.

Panels: a layer x expert heatmap of the rows the routers sent to each expert
(``moe_cluster_expert_tokens_total{layer,expert}``, summed over engine replicas) and a bar chart of the rows each
expert worker computed (``moe_cluster_worker_rows_total{worker}``). Counters are cumulative since the server
started, so one scrape shows that; with a window (a scrape a second) the picture is their increase over it, each
worker's share set beside its share before, plus the imbalance gauge (``moe_cluster_worker_load_imbalance``)
through the window with rebalances (``moe_cluster_rebalances_total``) marked: before and after a rebalance.
Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import itertools
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

EXPERT_ROWS = "moe_cluster_expert_tokens_total"
WORKER_ROWS = "moe_cluster_worker_rows_total"
IMBALANCE = "moe_cluster_worker_load_imbalance"
REBALANCES = "moe_cluster_rebalances_total"
CACHE_HITS = "moe_cluster_expert_cache_hits_total"  # issue 23: with --expert-cache-size
CACHE_MISSES = "moe_cluster_expert_cache_misses_total"
RAY_PREFIX = "ray_"  # Ray's exporter prefixes every application metric


@dataclass(frozen=True)
class ExpertLoad:
    """Rows by [layer][expert] and by worker; the imbalance gauge and rebalance count when exported."""

    expert_rows: list[list[float]]
    worker_rows: dict[int, float] = field(default_factory=dict)
    imbalance: float | None = None
    rebalances: float | None = None
    cache_hits: float = 0.0  # the workers' expert caches, summed (0 without a cache)
    cache_misses: float = 0.0

    @property
    def cache_hit_rate(self) -> float | None:
        """Hits over expert lookups of the workers' caches; None without a cache (or a lookup)."""
        total = self.cache_hits + self.cache_misses
        return self.cache_hits / total if total > 0 else None

    def since(self, earlier: ExpertLoad) -> ExpertLoad:
        """The row counters' increase since ``earlier``; the gauge and the rebalance count as they are now."""
        layers = max(len(self.expert_rows), len(earlier.expert_rows))
        experts = max((len(row) for row in self.expert_rows + earlier.expert_rows), default=0)
        now, before = _padded(self.expert_rows, layers, experts), _padded(earlier.expert_rows, layers, experts)
        rows = [[a - b for a, b in zip(row_now, row_before, strict=True)]
                for row_now, row_before in zip(now, before, strict=True)]
        workers = {w: v - earlier.worker_rows.get(w, 0.0) for w, v in self.worker_rows.items()}
        return ExpertLoad(rows, workers, self.imbalance, self.rebalances, self.cache_hits - earlier.cache_hits,
                          self.cache_misses - earlier.cache_misses)

    @property
    def worker_imbalance(self) -> float | None:
        """The most loaded worker's rows over the mean, from the worker counters (None without rows)."""
        values = list(self.worker_rows.values())
        if not values or sum(values) <= 0:
            return None
        return max(values) / (sum(values) / len(values))


def _padded(rows: list[list[float]], layers: int, experts: int) -> list[list[float]]:
    return [[rows[i][e] if i < len(rows) and e < len(rows[i]) else 0.0 for e in range(experts)]
            for i in range(layers)]


def metrics_url(url: str) -> str:
    """``http://host:port`` or ``host:port`` -> ``http://host:port/metrics``; a URL with a path is kept."""
    if "://" not in url:
        url = f"http://{url}"
    scheme, rest = url.split("://", 1)
    if scheme not in ("http", "https"):
        raise ValueError(f"metrics URL must be http(s), got {url!r}")
    return url if "/" in rest.rstrip("/") else f"{url.rstrip('/')}/metrics"


def fetch(url: str, timeout_s: float = 10.0) -> str:
    """The metrics page's text; an unreachable or failing URL is a ValueError naming it."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return str(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read metrics from {url}: {err}") from None


def parse_load(text: str, model: str | None = None) -> ExpertLoad:
    """Sum the series of each (layer, expert) and each worker over every other label (engines, pools, nodes).

    ``model`` keeps only the series of that served model. Raises ValueError when there is no expert series.
    """
    experts: dict[tuple[int, int], float] = defaultdict(float)
    workers: dict[int, float] = defaultdict(float)
    imbalance: list[float] = []
    rebalances: float | None = None
    cache = {CACHE_HITS: 0.0, CACHE_MISSES: 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix(RAY_PREFIX)
            labels = sample.labels
            if model is not None and labels.get("model", model) != model:
                continue
            if name == EXPERT_ROWS:
                experts[int(labels["layer"]), int(labels["expert"])] += sample.value
            elif name == WORKER_ROWS:
                workers[int(labels["worker"])] += sample.value
            elif name == IMBALANCE:
                imbalance.append(sample.value)
            elif name == REBALANCES:
                rebalances = (rebalances or 0.0) + sample.value
            elif name in cache:
                cache[name] += sample.value
    if not experts:
        which = f" for model {model!r}" if model is not None else ""
        raise ValueError(f"no {EXPERT_ROWS} series{which} in the metrics: is this a moe-cluster server's metrics "
                         f"port (serve --metrics-port), and has it served a request yet?")
    layers = 1 + max(layer for layer, _ in experts)
    num_experts = 1 + max(expert for _, expert in experts)
    rows = [[experts.get((layer, e), 0.0) for e in range(num_experts)] for layer in range(layers)]
    return ExpertLoad(rows, dict(sorted(workers.items())), max(imbalance) if imbalance else None, rebalances,
                      cache[CACHE_HITS], cache[CACHE_MISSES])


@dataclass(frozen=True)
class Reading:
    """What expert-load read: the load since the server started (the first scrape) and, with a window, the
    increase over it and each scrape's (seconds into the window, imbalance gauge, rebalance count)."""

    cumulative: ExpertLoad
    window_s: float = 0.0
    window: ExpertLoad | None = None
    timeline: list[tuple[float, float | None, float | None]] = field(default_factory=list)


def read_load(url: str, window_s: float = 0.0, model: str | None = None, every_s: float = 1.0) -> Reading:
    """Scrape once, or (window_s > 0) every ``every_s`` seconds for ``window_s`` seconds."""
    if not window_s >= 0:
        raise ValueError(f"window must be a number of seconds >= 0, got {window_s}")
    first = parse_load(fetch(url), model)
    if window_s == 0:
        return Reading(first)
    started = time.monotonic()
    timeline = [(0.0, first.imbalance, first.rebalances)]
    last = first
    while (elapsed := time.monotonic() - started) < window_s:
        time.sleep(min(every_s, window_s - elapsed))
        last = parse_load(fetch(url), model)
        timeline.append((time.monotonic() - started, last.imbalance, last.rebalances))
    return Reading(first, window_s, last.since(first), timeline)


def plot_load(reading: Reading, out: str | Path, source: str) -> Path:
    """Write the picture of ``reading`` to ``out`` (PNG); returns its path. ``source`` (the URL) heads it.

    Panels: the expert heatmap and the worker bars of the window (else since start); with a window, the bars set
    each worker's share since start beside its share in the window, and a third panel follows the imbalance gauge
    through the window, rebalances marked, when the server exports it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("expert-load needs matplotlib: pip install 'moe-cluster[plot]'") from None
    load = reading.window or reading.cumulative
    gauge = [(t, value) for t, value, _ in reading.timeline if value is not None]
    layers, experts = len(load.expert_rows), len(load.expert_rows[0])
    ratios = [1.6, 1.0, 1.0] if gauge else [1.6, 1.0]
    fig, axes = plt.subplots(1, len(ratios), figsize=(5.5 * sum(ratios) / 1.6 + 1.5, 0.35 * layers + 3.2),
                             width_ratios=ratios, layout="constrained")
    heat, bars = axes[0], axes[1]
    image = heat.imshow(load.expert_rows, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=heat, label="rows routed")
    heat.set(xlabel="expert", ylabel="layer", title="Rows routed to each expert (% of the layer's)")
    heat.set_xticks(range(experts))
    heat.set_yticks(range(layers))
    if layers * experts <= 256:  # small enough to print each cell's share
        peak = max(max(row) for row in load.expert_rows) or 1.0
        for layer, row in enumerate(load.expert_rows):
            total = sum(row) or 1.0
            for expert, value in enumerate(row):
                heat.text(expert, layer, f"{100 * value / total:.0f}", ha="center", va="center", fontsize=7,
                          color="black" if value > 0.6 * peak else "white")
    span = f"the {reading.window_s:g} s window"
    if reading.window is None:
        _worker_bars(bars, load, None, ("", ""))
    else:
        _worker_bars(bars, load, reading.cumulative, ("since start, before the window", span))
    if gauge:
        _imbalance_timeline(axes[2], gauge, reading.timeline)
    extra = []
    if load.imbalance is not None:
        extra.append(f"load imbalance, layer by layer (last sample): {load.imbalance:.2f}")
    if load.rebalances is not None:
        extra.append(f"rebalances: {load.rebalances:.0f}")
    if load.cache_hit_rate is not None:
        extra.append(f"expert cache hit rate: {100 * load.cache_hit_rate:.1f}%")
    heading = f"{source}, {span}" if reading.window is not None else f"{source}, since the server started"
    fig.suptitle(" | ".join([heading, *extra]), fontsize=10)
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _imbalance_timeline(axis: Any, gauge: list[tuple[float, float]],
                        timeline: list[tuple[float, float | None, float | None]]) -> None:
    """The imbalance gauge at each scrape of the window; a dotted line where the rebalance count went up."""
    axis.step([t for t, _ in gauge], [v for _, v in gauge], where="post", color="tab:purple", marker=".")
    axis.axhline(1.0, color="tab:red", linestyle="--", label="even")
    marked = False
    for (_, _, before), (t, _, after) in itertools.pairwise(timeline):
        if after is not None and after > (before or 0.0):  # Ray exports a counter from its first increase
            axis.axvline(t, color="black", linestyle=":", label=None if marked else "rebalance")
            marked = True
    axis.set(xlabel="seconds into the window", ylabel="most loaded worker / mean", ylim=(0, None),
             title="Load imbalance, layer by layer")
    axis.legend(loc="lower right", fontsize=8)


def _worker_bars(bars: Any, load: ExpertLoad, earlier: ExpertLoad | None, labels: tuple[str, str]) -> None:
    """Rows per worker (all layers together); beside an earlier load's, as shares of each one's rows."""
    bars.set(xlabel="worker", title="Rows per expert worker (all layers)")
    if not load.worker_rows:
        bars.text(0.5, 0.5, f"no {WORKER_ROWS} series\n(local engine?)", ha="center", va="center",
                  transform=bars.transAxes)
        return
    workers = list(load.worker_rows)
    positions = list(range(len(workers)))
    if earlier is None or not earlier.worker_rows:
        values = [load.worker_rows[w] for w in workers]
        bars.bar(positions, values, color="tab:blue")
        bars.axhline(sum(values) / len(values), color="tab:red", linestyle="--",
                     label=f"mean; max/mean {load.worker_imbalance or 0:.2f}")
        bars.set(ylabel="rows computed")
    else:
        for offset, (what, label, color) in enumerate(((earlier, labels[0], "tab:gray"),
                                                       (load, labels[1], "tab:blue"))):
            total = sum(what.worker_rows.values()) or 1.0
            shares = [100 * what.worker_rows.get(w, 0.0) / total for w in workers]
            bars.bar([p + 0.4 * offset - 0.2 for p in positions], shares, width=0.4, color=color,
                     label=f"{label}: max/mean {what.worker_imbalance or 0:.2f}")
        bars.axhline(100 / len(workers), color="tab:red", linestyle="--", label="even share")
        bars.set(ylabel="% of the rows")
    bars.set_xticks(positions, [str(w) for w in workers])
    bars.set_ylim(0, 1.4 * (max((p.get_height() for p in bars.patches), default=0.0) or 1.0))  # legend room
    bars.legend(loc="upper left", fontsize=7)
