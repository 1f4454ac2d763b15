"""An expert worker's weights by expert-map version, for live rebalancing without stopping anyone.

A rebalance (workers/pool.py) has every worker ``add`` the weights of a new map version next to the ones it
serves, then ``commit`` it: results announce the newest committed version, coordinators move to it between steps,
and a version older than the newest is freed once no link may send it any more (``in_use``, from the loop).
Called from the loop's thread (run, in_use) and from Ray calls (add, commit, discard, snapshot): one lock.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import Tensor

from cluster.model.experts import LocalExperts
from workers.expert_cache import CachedExperts

log = logging.getLogger("moe_cluster.worker")


class VersionedExperts:
    def __init__(self, version: int, experts: LocalExperts, num_experts: int, device: torch.device,
                 worker_index: int) -> None:
        self.device = device
        self.worker_index = worker_index
        self._lock = threading.Lock()
        self._held: dict[int, LocalExperts] = {version: experts}
        self._latest = version
        self._oldest_in_use: int | None = version
        # [layer][global expert] rows this worker computed, whatever the version (the pool's load window)
        self._rows = [[0] * num_experts for _ in experts.layer_experts]

    @property
    def latest(self) -> int:
        return self._latest

    def holds(self, version: int) -> bool:
        return version in self._held

    def get(self, version: int) -> LocalExperts:
        with self._lock:
            return self._held[version]

    def run(self, version: int, layer: int, rows: Tensor, counts: list[int]) -> Tensor:
        experts = self.get(version)
        n_local = experts.n_local_experts(layer)
        counts = counts[:n_local]
        out = experts.run_grouped(layer, rows.to(self.device, non_blocking=True), torch.tensor(counts))
        if out.is_cuda:
            torch.cuda.synchronize()
        layer_rows = self._rows[layer]
        for e, n in zip(experts.layer_experts[layer], counts, strict=True):
            layer_rows[e] += n
        return out

    def hint(self, version: int, layer: int, experts: list[int]) -> None:
        """Issue 23: pass a prefetch hint to ``version``'s weights when they are a cache (all-resident: nothing to
        load)."""
        held = self._held.get(version)
        if isinstance(held, CachedExperts):
            held.hint(layer, experts)

    def add(self, version: int, experts: LocalExperts) -> None:
        """Weights of a map version being prepared (held, not announced)."""
        with self._lock:
            if version <= self._latest:
                raise ValueError(f"map version {version} is not newer than the committed {self._latest}")
            self._held[version] = experts

    def commit(self, version: int) -> None:
        """Announce ``version``: coordinators will move to it."""
        with self._lock:
            if version not in self._held:
                raise ValueError(f"map version {version} was never prepared here (holding {sorted(self._held)})")
            self._latest = max(self._latest, version)
            self._release()

    def discard(self, version: int) -> None:
        """Drop a prepared version that will not be used (a rebalance that failed elsewhere)."""
        with self._lock:
            if version > self._latest:
                self._held.pop(version, None)

    def in_use(self, oldest: int | None) -> None:
        with self._lock:
            self._oldest_in_use = oldest
            self._release()

    def _release(self) -> None:
        """Free versions older than the newest committed one that no link may send any more."""
        if self._oldest_in_use is None:
            return
        gone = [v for v in self._held if v < min(self._latest, self._oldest_in_use)]
        for version in gone:
            released = self._held.pop(version)
            if isinstance(released, CachedExperts):  # issue 23: stop its loader thread
                released.close()
        if gone:
            log.info("expert worker %d: freed the weights of map version(s) %s; holding %s", self.worker_index, gone,
                     sorted(self._held))

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            latest = self._held[self._latest]
            return {"map_version": self._latest, "versions_held": sorted(self._held),
                    "expert_bytes": latest.nbytes, "expert_quantization": latest.quantization,
                    "rows_per_expert": [list(layer) for layer in self._rows]}
