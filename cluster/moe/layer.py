"""Mixture-of-Experts layer: expert placement, the dispatch plan, the reference MoE and the local path.

Shape legend (see ops.py): T tokens, H hidden, K experts per token, E experts, R = T*K assignment rows,
S dispatch slots of a layer (one per (worker, local expert) pair; E when no expert has replicas).

Every MoE path computes the same thing:  out[t] = sum_k  w[t,k] * expert_{id[t,k]}(x[t]).
  * ``reference_moe``  - a plain loop over experts: the yardstick every other path is tested against.
  * ``LocalMoE.moe``   - the engine's single-process path: route, group rows by expert (a DispatchPlan),
    run each expert once on its contiguous rows, combine.
  * the cluster path (cluster/moe/dispatch.py) uses the same DispatchPlan but replaces "run each expert"
    with an all-to-all to the expert workers and back. Nothing else changes: an expert with replicas on several
    workers only has its rows split among them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cluster.errors import WorkerFailure
from cluster.model.experts import LocalExperts
from cluster.model.ops import combine, expert_swiglu, route


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


class LocalMoE:
    """MoE backend with every expert in this process (the local engine)."""

    def __init__(self, experts: LocalExperts, num_experts: int, top_k: int) -> None:
        self.experts = experts
        self.top_k = top_k
        self.expert_map = ExpertMap(tuple((ids,) for ids in experts.layer_experts), num_experts)  # one "worker"
        self.stats = RoutingStats(len(experts.w13), num_experts)
        self._expert_seconds = 0.0

    can_recover = False

    def begin_step(self, num_tokens: int) -> None:
        pass

    def micro_batches(self, num_tokens: int, num_seqs: int) -> int:
        return 1  # nothing to overlap: the experts run in this process, on this thread

    def dispatch(self, layer: int, x: Tensor, gate_weight: Tensor) -> Tensor:
        return self.moe(layer, x, gate_weight)

    def collect(self, pending: Tensor) -> Tensor:
        return pending

    def routing_counts(self) -> list[list[int]]:
        return self.stats.counts

    def timings(self) -> dict[str, float]:
        return {"expert": self._expert_seconds}

    def heartbeat(self) -> None:
        pass

    def recover(self, failure: WorkerFailure) -> None:
        raise failure

    def close(self) -> None:
        pass

    def moe(self, layer: int, x: Tensor, gate_weight: Tensor) -> Tensor:
        """x (T, H) -> (T, H): route, group rows by expert, run each expert once, combine."""
        weights, expert_ids = route(x, gate_weight, self.top_k)
        slots = self.expert_map.slots(layer, x.device)
        plan = plan_dispatch(weights, expert_ids, slots)
        self.stats.record(layer, plan.rows_per_slot, slots.slot_expert)
        started = time.perf_counter()
        expert_out = self.experts.run_grouped(layer, x[plan.row_token], plan.rows_per_slot)  # (R, H)
        self._expert_seconds += time.perf_counter() - started
        return combine(expert_out, plan.row_weight, plan.row_token, x.shape[0])


def reference_moe(x: Tensor, gate_weight: Tensor, w1: Sequence[Tensor], w2: Sequence[Tensor],
                  w3: Sequence[Tensor], top_k: int) -> Tensor:
    """The yardstick: out[t] = sum_k w[t,k] * expert_{id[t,k]}(x[t]), one expert at a time.

    x (T, H), gate_weight (E, H), w1[e]/w3[e] (I, H), w2[e] (H, I) -> (T, H).
    """
    weights, expert_ids = route(x, gate_weight, top_k)  # (T, K) each
    out_rows, out_weights, out_tokens = [], [], []
    for expert in range(gate_weight.shape[0]):
        token, slot = torch.where(expert_ids == expert)
        if token.numel() == 0:
            continue
        w13 = torch.cat([w1[expert], w3[expert]], dim=0)  # (2I, H)
        out_rows.append(expert_swiglu(x[token], w13, w2[expert]))
        out_weights.append(weights[token, slot])
        out_tokens.append(token)
    return combine(torch.cat(out_rows), torch.cat(out_weights), torch.cat(out_tokens), x.shape[0])
