"""Where each layer's experts live (the expert map) and its dispatch slots.

Shape legend: E experts, S dispatch slots of a layer (one per (worker, local expert) pair; E when no expert has
replicas).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class LayerSlots:
    """One layer's dispatch slots: every (worker, local slot) pair of the layer, worker-major, local id minor.

    S slots, E experts; an expert hosted on r workers (r replicas) has r slots.
    """

    slot_expert: Tensor  # (S,) global expert id of each slot
    replica_slots: Tensor  # (E, max r) the slots of each expert, padded with its last one
    replicas: Tensor  # (E,) slots of each expert
    worker_slots: tuple[int, ...]  # slots of each worker (its local experts in this layer)
    replicated: bool  # some expert has more than one slot


@dataclass(frozen=True)
class ExpertMap:
    """Where each layer's experts live: ``layers[l][w]`` lists the global expert ids worker w hosts in layer l, in
    local-id order (index = local id). Every expert of every layer is hosted at least once; one hosted by several
    workers has replicas, and a layer's rows of it are split among them (plan_dispatch). ``version`` numbers the
    maps an expert pool has had (0: its first), so that coordinators and workers agree on the one a message uses.
    """

    layers: tuple[tuple[tuple[int, ...], ...], ...]
    num_experts: int
    version: int = 0
    _slots: dict[tuple[int, str], LayerSlots] = field(init=False, repr=False, compare=False)  # (layer, device)

    def __post_init__(self) -> None:
        if not self.layers or not self.layers[0]:
            raise ValueError(f"expert map {self.layers} needs at least one layer and one worker")
        workers = len(self.layers[0])
        for layer, placement in enumerate(self.layers):
            if len(placement) != workers:
                raise ValueError(f"expert map layer {layer} has {len(placement)} workers, layer 0 has {workers}")
            if any(len(set(experts)) != len(experts) for experts in placement):
                raise ValueError(f"expert map layer {layer} {placement} hosts an expert twice on one worker")
            if sorted(set(e for experts in placement for e in experts)) != list(range(self.num_experts)):
                raise ValueError(f"expert map layer {layer} {placement} must host each of the {self.num_experts} "
                                 f"experts (ids 0..{self.num_experts - 1}) at least once")
        object.__setattr__(self, "_slots", {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (ExpertMap, (self.layers, self.num_experts, self.version))  # without the cached tensors

    @classmethod
    def contiguous(cls, num_experts: int, experts_per_worker: int, num_layers: int) -> ExpertMap:
        """The default map, no replicas: worker w hosts experts [w*k, (w+1)*k) in every layer; the last may host
        fewer."""
        if not isinstance(experts_per_worker, int) or not 1 <= experts_per_worker <= num_experts:
            raise ValueError(f"experts_per_worker must be an integer in [1, {num_experts}], "
                             f"got {experts_per_worker!r}")
        starts = range(0, num_experts, experts_per_worker)
        placement = tuple(tuple(range(s, min(s + experts_per_worker, num_experts))) for s in starts)
        return cls((placement,) * num_layers, num_experts)

    @property
    def num_workers(self) -> int:
        return len(self.layers[0])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def max_local(self) -> int:
        """The most local experts any worker hosts in any layer."""
        return max(len(experts) for placement in self.layers for experts in placement)

    def n_local_experts(self, layer: int, worker: int) -> int:
        return len(self.layers[layer][worker])

    def worker_experts(self, worker: int) -> tuple[tuple[int, ...], ...]:
        """Worker ``worker``'s global expert ids of each layer, in local-id order."""
        return tuple(placement[worker] for placement in self.layers)

    def hosted(self, worker: int) -> tuple[int, ...]:
        """Every expert the worker hosts in some layer (for messages and reports)."""
        return tuple(sorted({e for experts in self.worker_experts(worker) for e in experts}))

    def slots(self, layer: int, device: torch.device | None = None) -> LayerSlots:
        """The dispatch slots of ``layer`` as tensors on ``device`` (made once per layer and device)."""
        key = (layer, str(device or "cpu"))
        if key not in self._slots:
            placement = self.layers[layer]
            slot_expert = [e for experts in placement for e in experts]
            slots_of: list[list[int]] = [[] for _ in range(self.num_experts)]
            for slot, e in enumerate(slot_expert):
                slots_of[e].append(slot)
            widest = max(len(s) for s in slots_of)
            padded = [s + [s[-1]] * (widest - len(s)) for s in slots_of]
            self._slots[key] = LayerSlots(
                slot_expert=torch.tensor(slot_expert, dtype=torch.long, device=device),
                replica_slots=torch.tensor(padded, dtype=torch.long, device=device),
                replicas=torch.tensor([len(s) for s in slots_of], dtype=torch.long, device=device),
                worker_slots=tuple(len(experts) for experts in placement), replicated=widest > 1)
        return self._slots[key]
