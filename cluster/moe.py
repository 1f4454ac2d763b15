"""Mixture-of-Experts layer: expert placement, the dispatch plan, the reference MoE and the local path.

Shape legend (see ops.py): T tokens, H hidden, K experts per token, E experts, R = T*K assignment rows.

Every MoE path computes the same thing:  out[t] = sum_k  w[t,k] * expert_{id[t,k]}(x[t]).
  * ``reference_moe``  - a plain loop over experts: the yardstick every other path is tested against.
  * ``LocalMoE.moe``   - the engine's single-process path: route, group rows by expert (a DispatchPlan),
    run each expert once on its contiguous rows, combine.
  * the cluster path (cluster/dispatch.py) uses the same DispatchPlan but replaces "run each expert"
    with an all-to-all to the expert workers and back. Nothing else changes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.errors import WorkerFailure
from cluster.ops import combine, expert_swiglu, grouped_expert_swiglu, route


@dataclass(frozen=True)
class ExpertMap:
    """Which global expert ids each worker hosts. ``workers[w]`` lists worker w's experts in local-id order."""

    workers: tuple[tuple[int, ...], ...]
    num_experts: int
    dispatch_rank: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        hosted = sorted(e for experts in self.workers for e in experts)
        if hosted != list(range(self.num_experts)):
            raise ValueError(f"expert map {self.workers} must host each of the {self.num_experts} experts "
                             f"exactly once")
        if any(len(experts) == 0 for experts in self.workers):
            raise ValueError(f"expert map {self.workers} has a worker with no experts")
        rank = torch.empty(self.num_experts, dtype=torch.long)
        rank[torch.tensor(self.dispatch_order)] = torch.arange(self.num_experts)
        object.__setattr__(self, "dispatch_rank", rank)

    @classmethod
    def contiguous(cls, num_experts: int, experts_per_worker: int) -> ExpertMap:
        """Worker w hosts experts [w*k, (w+1)*k); the last worker may host fewer."""
        if not isinstance(experts_per_worker, int) or not 1 <= experts_per_worker <= num_experts:
            raise ValueError(f"experts_per_worker must be an integer in [1, {num_experts}], "
                             f"got {experts_per_worker!r}")
        starts = range(0, num_experts, experts_per_worker)
        return cls(tuple(tuple(range(s, min(s + experts_per_worker, num_experts))) for s in starts),
                   num_experts)

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def dispatch_order(self) -> tuple[int, ...]:
        """Global expert ids in the order their rows are laid out: worker-major, local id minor."""
        return tuple(e for experts in self.workers for e in experts)

    def n_local_experts(self, worker: int) -> int:
        return len(self.workers[worker])


@dataclass(frozen=True)
class DispatchPlan:
    """Assignment rows grouped by expert, experts in dispatch order, tokens ascending within an expert."""

    row_token: Tensor  # (R,) token index of each row
    row_weight: Tensor  # (R,) float32 routing weight of each row
    rows_per_expert: Tensor  # (E,) int64 row count of each expert, in dispatch order


def plan_dispatch(weights: Tensor, expert_ids: Tensor, dispatch_rank: Tensor) -> DispatchPlan:
    """weights/expert_ids (T, K), dispatch_rank (E,) slot of each global expert -> DispatchPlan."""
    top_k = expert_ids.shape[1]
    slot = dispatch_rank.to(expert_ids.device)[expert_ids.reshape(-1)]  # (R,) dispatch slot per row
    order = torch.argsort(slot, stable=True)  # (R,) rows grouped by slot, token order kept
    counts = torch.bincount(slot, minlength=dispatch_rank.numel())
    return DispatchPlan(row_token=order // top_k, row_weight=weights.reshape(-1)[order], rows_per_expert=counts)


@dataclass
class LocalExperts:
    """Weights of the experts one process holds, stacked per layer in local-id order.

    w13[layer]: (n_local, 2I, H) with w1 and w3 fused; w2[layer]: (n_local, H, I).
    """

    expert_ids: tuple[int, ...]  # global ids, index = local id
    w13: list[Tensor]
    w2: list[Tensor]

    @property
    def n_local_experts(self) -> int:
        return len(self.expert_ids)

    def run_grouped(self, layer: int, rows: Tensor, rows_per_local_expert: Tensor) -> Tensor:
        """rows (R_w, H) grouped by local expert, rows_per_local_expert (n_local,) -> outputs (R_w, H)."""
        if grouped_mm_supported(rows):
            offsets = rows_per_local_expert.cumsum(0).to(device=rows.device, dtype=torch.int32)
            return grouped_expert_swiglu(rows, self.w13[layer], self.w2[layer], offsets)
        out = torch.empty_like(rows)
        start = 0
        for local_id, count in enumerate(rows_per_local_expert.tolist()):
            if count:
                end = start + count
                out[start:end] = expert_swiglu(rows[start:end], self.w13[layer][local_id],
                                               self.w2[layer][local_id])
                start = end
        return out


def grouped_mm_supported(x: Tensor) -> bool:
    """torch's grouped matmul: on CPUs for every dtype; on CUDA for bfloat16 on Hopper and newer."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


class RoutingStats:
    """Rows routed to each global expert of each layer, accumulated (for the engine's statistics)."""

    def __init__(self, num_layers: int, expert_map: ExpertMap) -> None:
        self.dispatch_order = torch.tensor(expert_map.dispatch_order)
        self._counts = torch.zeros(num_layers, expert_map.num_experts, dtype=torch.long)

    def record(self, layer: int, rows_per_expert: Tensor) -> None:
        """rows_per_expert (E,) in dispatch order; stays on its device until read (no sync per layer)."""
        if self._counts.device != rows_per_expert.device:
            self._counts = self._counts.to(rows_per_expert.device)
            self.dispatch_order = self.dispatch_order.to(rows_per_expert.device)
        self._counts[layer].index_add_(0, self.dispatch_order, rows_per_expert)

    @property
    def counts(self) -> list[list[int]]:
        """[layer][global expert] rows routed so far."""
        return [[int(v) for v in row] for row in self._counts.tolist()]


class LocalMoE:
    """MoE backend with every expert in this process (the local engine)."""

    def __init__(self, experts: LocalExperts, num_experts: int, top_k: int) -> None:
        self.experts = experts
        self.top_k = top_k
        self.expert_map = ExpertMap((experts.expert_ids,), num_experts)
        self.stats = RoutingStats(len(experts.w13), self.expert_map)
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
        plan = plan_dispatch(weights, expert_ids, self.expert_map.dispatch_rank)
        self.stats.record(layer, plan.rows_per_expert)
        started = time.perf_counter()
        expert_out = self.experts.run_grouped(layer, x[plan.row_token], plan.rows_per_expert)  # (R, H)
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
