"""The expert pool's load window and its rebalancing decision (no Ray here: the pool applies what is decided).

Each sample is what the workers computed since the previous one, per [layer][global expert] (every replica's
rows add up to its expert's) and per [layer][worker]; the window is the last few samples. A placement is
computed from the window's expert loads (cluster/moe/eplb.py) and applied only when it is worth it: the current map's
imbalance on those loads is above the threshold and the new one lowers it by at least MIN_GAIN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.moe import eplb
from cluster.moe.expert_map import ExpertMap

MIN_GAIN = 1.05  # a new placement must cut the imbalance by this factor: moving weights is not free


@dataclass(frozen=True)
class Decision:
    apply: bool
    reason: str
    before: float  # imbalance of the current map on the window's loads
    after: float  # ... of the new map (= before when there is none)
    layers: tuple[eplb.Placement, ...] | None = None  # the new placement


class LoadTracker:
    def __init__(self, num_layers: int, num_experts: int, num_workers: int, window: int) -> None:
        self.num_layers, self.num_experts, self.num_workers = num_layers, num_experts, num_workers
        self.expert_rows = eplb.LoadWindow(window)  # [layer][expert]
        self.worker_rows = eplb.LoadWindow(window)  # [layer][worker]
        self._last: dict[int, tuple[int, list[list[int]]]] = {}  # worker -> (generation, cumulative rows)

    def observe(self, workers: list[dict[str, Any]]) -> None:
        """One sample from every worker's stats (a worker that did not answer adds nothing this time)."""
        experts = [[0] * self.num_experts for _ in range(self.num_layers)]
        per_worker = [[0] * self.num_workers for _ in range(self.num_layers)]
        for stats in workers:
            if "rows_per_expert" not in stats:
                continue
            index, now = stats["worker_index"], stats["rows_per_expert"]
            generation, before = self._last.get(index, (stats["generation"], None))
            if before is None or generation != stats["generation"]:  # new, or a replacement counting from zero
                before = [[0] * self.num_experts for _ in range(self.num_layers)]
            for layer in range(self.num_layers):
                for e in range(self.num_experts):
                    rows = now[layer][e] - before[layer][e]
                    experts[layer][e] += rows
                    per_worker[layer][index] += rows
            self._last[index] = (stats["generation"], now)
        self.expert_rows.add(experts)
        self.worker_rows.add(per_worker)

    def resize(self, num_workers: int) -> None:
        """The pool now has ``num_workers`` workers: the expert window stays (the load does not depend on who
        serves it), the per-worker window starts again, retired workers are forgotten."""
        self.num_workers = num_workers
        self.worker_rows = eplb.LoadWindow(self.worker_rows.intervals)
        self._last = {w: last for w, last in self._last.items() if w < num_workers}

    def expert_loads(self) -> tuple[list[list[int]], bool]:
        """[layer][expert] rows of the window, and whether any was measured (else all zero: an even placement)."""
        if self.expert_rows.rows() == 0:
            return [[0] * self.num_experts for _ in range(self.num_layers)], False
        return self.expert_rows.total(), True

    def measured_imbalance(self) -> float:
        """The workers' actual rows in the window: the most loaded one's over the mean, layer by layer."""
        return eplb.imbalance(self.worker_rows.total())

    def decide(self, current: ExpertMap, capacity: int, redundant: int, threshold: float, force: bool) -> Decision:
        loads = self.expert_rows.total()
        if self.expert_rows.rows() == 0:
            if not force:
                return Decision(False, "no rows in the load window", 1.0, 1.0)
            loads = [[0] * self.num_experts for _ in range(self.num_layers)]
        before = eplb.expected_imbalance(current.layers, loads)
        if not force and before <= threshold:
            return Decision(False, f"imbalance {before:.2f} is within the threshold {threshold:g}", before, before)
        layers = eplb.plan(loads, current.num_workers, capacity, redundant, current.layers)
        after = eplb.expected_imbalance(layers, loads)
        if layers == current.layers:
            return Decision(False, "the placement from these loads is the current one", before, after)
        if not force and after * MIN_GAIN > before:
            return Decision(False, f"a new placement would only reach {after:.2f} from {before:.2f}", before, after)
        return Decision(True, "forced" if force else f"imbalance {before:.2f} > {threshold:g}", before, after, layers)
