"""The MoE layer as stages: Router -> Dispatch -> Experts -> Combine (the shape of vLLM's
fused_moe/modular_kernel.py), one implementation of the routing, the plan and the combine for every engine.

Shape legend (see cluster/model/ops.py): T tokens, H hidden, K experts per token, E experts, R = T*K assignment
rows, S dispatch slots of a layer (one per (worker, local expert) pair; E when no expert has replicas).

Every MoE path computes the same thing:  out[t] = sum_k  w[t,k] * expert_{id[t,k]}(x[t]).
  * ``reference_moe`` - a plain loop over experts: the yardstick every other path is tested against.
  * ``MoELayer``      - the engine's MoE backend, per layer:
      1. route: top-k softmax gate -> (weights, expert_ids)                                     [ops.route]
      2. plan: group the rows by dispatch slot (worker, then local expert); an expert with replicas has its rows
         cut into even contiguous chunks, one per replica                          [dispatch_plan.plan_dispatch]
      3. dispatch: hand the grouped rows to the experts stage, which returns at once   [ExpertExecutor.submit]
      4. experts: each expert runs once on its contiguous rows; wait for the outputs     [ExpertExecutor.wait]
      5. combine: weight each row, add it to its token                                        [ops.combine]
    Steps 1-3 are ``dispatch`` and 4-5 ``collect``, so that a caller can do other work (another micro-batch's
    attention) while the experts compute.
Only steps 3-4 differ between engines: the ``ExpertExecutor`` stage. ``InProcessExperts`` runs them on expert
weights held in this process (the local engine); ``LinkedExperts`` (cluster/moe/linked_experts.py) sends each
worker of an expert pool its rows over its link and receives the outputs back. A cache of expert weights or a
quantized format is another ``GroupedExperts`` (cluster/model/experts.py) under either; a new kind of link is
another link end under ``LinkedExperts``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from cluster.errors import WorkerFailure
from cluster.model.experts import GroupedExperts
from cluster.model.ops import combine, expert_swiglu, route
from cluster.moe.dispatch_plan import DispatchPlan, RoutingStats, plan_dispatch
from cluster.moe.expert_map import ExpertMap


class ExpertExecutor(Protocol):
    """The Experts stage (with the way there and back): rows grouped by the dispatch slots of ``expert_map``
    in, their expert outputs out, in the same order. ``submit`` returns at once; ``wait`` blocks."""

    @property
    def expert_map(self) -> ExpertMap:
        """Where each layer's experts are now: the slots ``submit``'s rows are grouped by."""
        ...

    @property
    def max_in_flight(self) -> int:
        """Submits that may be outstanding at once (the most micro-batches worth overlapping; 1: none)."""
        ...

    @property
    def can_recover(self) -> bool: ...

    def begin_step(self) -> None:
        """Between two steps, nothing in flight (the place to follow a changed expert map)."""

    def submit(self, layer: int, rows: Tensor, rows_per_slot: Tensor) -> Any:
        """rows (R, H) grouped by slot, rows_per_slot (S,) -> a ticket for ``wait``."""
        ...

    def wait(self, ticket: Any) -> Tensor:
        """The expert outputs (R, H) of a ``submit``, in its row order (on any device)."""
        ...

    def timings(self) -> dict[str, float]:
        """Seconds spent so far per phase of this stage."""
        ...

    def heartbeat(self) -> None: ...

    def recover(self, failure: WorkerFailure) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass
class InProcessTicket:
    layer: int
    rows: Tensor  # (R, H)
    rows_per_slot: Tensor  # (S,)


class InProcessExperts:
    """The Experts stage of the local engine: every expert's weights in this process (one "worker" hosting all
    of them); the experts run when their outputs are waited for."""

    def __init__(self, experts: GroupedExperts, num_experts: int) -> None:
        self.experts = experts
        self._expert_map = ExpertMap(tuple((ids,) for ids in experts.layer_experts), num_experts)
        self._seconds = 0.0

    @property
    def expert_map(self) -> ExpertMap:
        return self._expert_map

    max_in_flight = 1  # the experts run on this thread: nothing to overlap
    can_recover = False

    def begin_step(self) -> None:
        pass

    def submit(self, layer: int, rows: Tensor, rows_per_slot: Tensor) -> InProcessTicket:
        return InProcessTicket(layer, rows, rows_per_slot)

    def wait(self, ticket: InProcessTicket) -> Tensor:
        started = time.perf_counter()
        out = self.experts.run_grouped(ticket.layer, ticket.rows, ticket.rows_per_slot)  # (R, H)
        self._seconds += time.perf_counter() - started
        return out

    def timings(self) -> dict[str, float]:
        return {"expert": self._seconds}

    def heartbeat(self) -> None:
        pass

    def recover(self, failure: WorkerFailure) -> None:
        raise failure

    def describe(self) -> dict[str, Any]:
        return {"experts": "in-process"}

    def close(self) -> None:
        pass


@dataclass
class PendingLayer:
    """One layer's rows handed to the experts stage: what ``collect`` needs to finish the layer."""

    plan: DispatchPlan
    num_tokens: int
    ticket: Any


class MoELayer:
    """The engine's MoE backend (cluster/model/forward.py's ``MoEBackend``): the shared router, plan and combine
    around one experts stage. ``micro_batches``: 0 = auto (2 once a step has ``micro_batch_min_tokens``), or a
    fixed count; never more than the stage can have in flight."""

    def __init__(self, executor: ExpertExecutor, num_layers: int, num_experts: int, top_k: int,
                 micro_batches: int = 1, micro_batch_min_tokens: int = 512) -> None:
        self.executor = executor
        self.top_k = top_k
        self.stats = RoutingStats(num_layers, num_experts)
        self.wanted_micro_batches = micro_batches
        self.micro_batch_min_tokens = micro_batch_min_tokens
        self._timings: dict[str, float] = defaultdict(float)  # seconds, accumulated

    @property
    def can_recover(self) -> bool:
        return self.executor.can_recover

    def begin_step(self, num_tokens: int) -> None:
        self._timings["steps"] += 1
        self.executor.begin_step()

    def micro_batches(self, num_tokens: int, num_seqs: int) -> int:
        wanted = self.wanted_micro_batches
        if wanted == 0:
            wanted = 2 if num_tokens >= self.micro_batch_min_tokens else 1
        return max(1, min(wanted, num_seqs, self.executor.max_in_flight))

    def dispatch(self, layer: int, x: Tensor, gate_weight: Tensor) -> PendingLayer:
        """Steps 1-3: x (T, H) -> rows on their way to the experts; returns at once."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        slots = self.executor.expert_map.slots(layer, x.device)
        weights, expert_ids = route(x, gate_weight, self.top_k)  # 1
        plan = plan_dispatch(weights, expert_ids, slots)  # 2
        self.stats.record(layer, plan.rows_per_slot, slots.slot_expert)
        ticket = self.executor.submit(layer, x[plan.row_token], plan.rows_per_slot)  # 3: (R, H) grouped by slot
        self._timings["route_and_send"] += time.perf_counter() - started
        # On a busy CPU a woken worker may take this thread's core in the middle of a send: that is waiting for
        # a core, not work; the thread's CPU time says which is which.
        self._timings["route_and_send_cpu"] += time.thread_time() - cpu_started
        return PendingLayer(plan, x.shape[0], ticket)

    def collect(self, pending: PendingLayer) -> Tensor:
        """Steps 4-5: wait for the experts' outputs and combine them onto the tokens -> (T, H)."""
        started = time.perf_counter()
        expert_out = self.executor.wait(pending.ticket)  # 4: (R, H)
        waited = time.perf_counter()
        plan = pending.plan
        out = combine(expert_out.to(plan.row_weight.device), plan.row_weight, plan.row_token, pending.num_tokens)  # 5
        self._timings["wait"] += waited - started
        self._timings["combine"] += time.perf_counter() - waited
        return out

    def routing_counts(self) -> list[list[int]]:
        return self.stats.counts

    def timings(self) -> dict[str, float]:
        return dict(self._timings) | self.executor.timings()

    def heartbeat(self) -> None:
        self.executor.heartbeat()

    def recover(self, failure: WorkerFailure) -> None:
        self.executor.recover(failure)

    def describe(self) -> dict[str, Any]:
        return self.executor.describe()

    def close(self) -> None:
        self.executor.close()


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
