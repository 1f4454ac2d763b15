"""The dispatch plan: a layer's (token, expert) rows grouped by dispatch slot, and the routing statistics.
Shared by every MoE path (cluster/moe/layer.py): the plan is made once, whichever stage runs the experts.

Shape legend (see cluster/model/ops.py): T tokens, K experts per token, E experts, R = T*K assignment rows,
S dispatch slots of a layer (cluster/moe/expert_map.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cluster.moe.expert_map import LayerSlots


@dataclass(frozen=True)
class DispatchPlan:
    """Assignment rows grouped by dispatch slot (worker, then local expert), tokens ascending within a slot."""

    row_token: Tensor  # (R,) token index of each row
    row_weight: Tensor  # (R,) float32 routing weight of each row
    rows_per_slot: Tensor  # (S,) int64 row count of each slot, in dispatch order


def plan_dispatch(weights: Tensor, expert_ids: Tensor, slots: LayerSlots) -> DispatchPlan:
    """weights/expert_ids (T, K), one layer's slots -> DispatchPlan.

    An expert with r replicas has its rows (in token order) cut into r contiguous chunks of sizes differing by at
    most one: balanced by rows, and the same split for the same batch every time. Chunk i goes to replica
    (i + s) mod r, s = the expert's first token mod r, so that the larger chunks of a small decode step do not always
    land on the same replica.
    """
    top_k = expert_ids.shape[1]
    device = expert_ids.device
    experts = expert_ids.reshape(-1)  # (R,) expert of each row, rows in token order
    replica_slots = slots.replica_slots.to(device)
    if slots.replicated:
        num_experts = replica_slots.shape[0]
        by_expert = torch.argsort(experts, stable=True)  # (R,) rows grouped by expert, token order kept
        rows_of = torch.bincount(experts, minlength=num_experts)  # (E,)
        first = torch.cumsum(rows_of, 0) - rows_of  # (E,) where each expert's rows start in by_expert
        rank = torch.empty_like(experts)  # (R,) position of each row among its expert's rows
        rank[by_expert] = torch.arange(experts.numel(), device=device) - first[experts[by_expert]]
        replicas = slots.replicas.to(device)[experts]  # (R,) r_e of each row's expert
        chunk = rank * replicas // rows_of[experts]  # (R,) in [0, r_e)
        shift = by_expert[first.clamp(max=experts.numel() - 1)] // top_k  # (E,) first token of each expert
        slot = replica_slots[experts, (chunk + shift[experts]) % replicas]  # (R,)
    else:
        slot = replica_slots[experts, 0]  # (R,) the expert's only slot
    order = torch.argsort(slot, stable=True)  # (R,) rows grouped by slot, token order kept
    counts = torch.bincount(slot, minlength=slots.slot_expert.numel())
    return DispatchPlan(row_token=order // top_k, row_weight=weights.reshape(-1)[order], rows_per_slot=counts)


class RoutingStats:
    """Rows routed to each global expert of each layer, accumulated (for the engine's statistics)."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self._counts = torch.zeros(num_layers, num_experts, dtype=torch.long)

    def record(self, layer: int, rows_per_slot: Tensor, slot_expert: Tensor) -> None:
        """rows_per_slot (S,) in dispatch order, slot_expert (S,) the expert of each slot (replicas add up);
        stays on its device until read (no sync per layer)."""
        if self._counts.device != rows_per_slot.device:
            self._counts = self._counts.to(rows_per_slot.device)
        self._counts[layer].index_add_(0, slot_expert.to(rows_per_slot.device), rows_per_slot)

    @property
    def counts(self) -> list[list[int]]:
        """[layer][global expert] rows routed so far."""
        return [[int(v) for v in row] for row in self._counts.tolist()]
