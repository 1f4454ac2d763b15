"""The expert pool's autoscaling policy (pure): from the load the workers measured over the last interval, the
number of workers the pool should have. The pool (workers/pool.py) applies it with ``resize``; on Kubernetes the
new workers' placement group is what makes KubeRay's autoscaler add pods to the expert worker group.

Two targets, one per policy:
  * ``target_rows_per_worker_s``: rows each worker computes per second; the pool wants rows/s / target workers;
  * ``target_expert_wait_ms``: the mean time a layer message spends at a worker (waiting for it, then computing;
    the workers' stamps), which falls about as 1/workers while the workers are the bottleneck: the pool wants
    workers x wait / target.
The wanted size is kept within [min_workers, max_workers]; a change smaller than ``tolerance`` of the current load
is no change (no flapping), and after a resize nothing changes for ``cooldown_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cluster.config_fields import known_fields


@dataclass(frozen=True)
class AutoscalePolicy:
    min_workers: int
    max_workers: int
    target_rows_per_worker_s: float | None = None
    target_expert_wait_ms: float | None = None
    cooldown_s: float = 60.0  # no resize within this long of the last one
    interval_s: float = 10.0  # how often the load is measured and the policy asked
    tolerance: float = 0.1  # a load within this fraction of the target keeps the size

    def __post_init__(self) -> None:
        for name in ("min_workers", "max_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"autoscale.{name} must be an integer >= 1, got {value!r}")
        if self.max_workers < self.min_workers:
            raise ValueError(f"autoscale.max_workers ({self.max_workers}) is below min_workers ({self.min_workers})")
        targets = [t for t in (self.target_rows_per_worker_s, self.target_expert_wait_ms) if t is not None]
        if len(targets) != 1:
            raise ValueError("autoscale needs exactly one target: target_rows_per_worker_s or target_expert_wait_ms")
        for name in ("target_rows_per_worker_s", "target_expert_wait_ms", "cooldown_s", "interval_s", "tolerance"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value < math.inf or (name.startswith("target") and value == 0)):
                raise ValueError(f"autoscale.{name} must be a positive number, got {value!r}")
        if self.interval_s <= 0:
            raise ValueError(f"autoscale.interval_s must be a positive number, got {self.interval_s!r}")

    @classmethod
    def from_dict(cls, raw: Any) -> AutoscalePolicy:
        raw = known_fields(cls, raw, "pool autoscale")
        missing = sorted({"min_workers", "max_workers"} - set(raw))
        if missing:
            raise ValueError(f"pool autoscale needs {missing}")
        return cls(**raw)

    def wanted(self, workers: int, rows_per_s: float, wait_ms: float | None) -> int:
        """The size the pool should have, given ``workers`` now and the last interval's total rows per second and
        mean wait per layer message (None: no message, so no wait measured)."""
        if self.target_rows_per_worker_s is not None:
            load = rows_per_s / (workers * self.target_rows_per_worker_s)  # 1.0: exactly on target
        elif wait_ms is None:
            load = 0.0  # idle
        else:
            assert self.target_expert_wait_ms is not None
            load = wait_ms / self.target_expert_wait_ms
        if abs(load - 1.0) <= self.tolerance:
            size = workers
        elif load > 1.0:
            size = math.ceil(workers * load)
        else:
            size = max(1, math.ceil(workers * load))
        return min(self.max_workers, max(self.min_workers, size))
