"""DistributedMoE: the MoE backend of the cluster engine. Experts live on ExpertWorker actors.

This computes exactly what ``reference_moe`` computes - route, run the chosen experts, combine with the routing
weights - and shares its routing, dispatch plan and combine with the local path (cluster/moe.py). Only the
middle differs: instead of running the experts in-process, the rows travel to the workers and back.

Per layer, on the coordinator (rank 0):
  1. route: top-k softmax gate -> (weights, expert_ids)                          [ops.route]
  2. group the token rows by destination worker, then local expert             [moe.plan_dispatch]
  3. exchange counts: each worker learns how many rows each of its experts gets
  4. send the rows (one uneven all-to-all; only rank 0's splits are non-zero; in the sparse form the
     counts and the rows travel in one message, to the workers that have rows only)
  5. each worker runs its experts on its rows (workers/expert_worker.py)
  6. receive the results (the reverse all-to-all), in the order the rows were sent
  7. combine: weight each row, add it to its token                             [ops.combine]

Shape legend: T tokens, H hidden, K top-k, R = T*K rows.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable

from torch import Tensor

from cluster.errors import WorkerFailure
from cluster.moe import ExpertMap, RoutingStats, plan_dispatch
from cluster.ops import combine, route
from cluster.transport import OP_NOOP, OP_SHUTDOWN, CoordinatorLink, leave_group

# Turns an exception raised by a collective into a WorkerFailure naming the member at fault.
Diagnose = Callable[[BaseException], WorkerFailure]
# Replaces failed members and rebuilds the process group; returns the new link.
Rebuild = Callable[[WorkerFailure], CoordinatorLink]


class DistributedMoE:
    def __init__(self, link: CoordinatorLink, expert_map: ExpertMap, num_layers: int, top_k: int,
                 diagnose: Diagnose, rebuild: Rebuild | None) -> None:
        self.link = link
        self.rebuild = rebuild
        self.expert_map = expert_map
        self.num_layers = num_layers
        self.top_k = top_k
        self.diagnose = diagnose
        self.stats = RoutingStats(num_layers, expert_map)
        self._timings: dict[str, float] = defaultdict(float)  # seconds, accumulated
        self._step = 0
        self._closed = False

    def _guarded(self, what: str, fn: Callable[[], Tensor | None]) -> Tensor | None:
        started = time.perf_counter()
        try:
            return fn()
        except WorkerFailure:
            raise
        except Exception as err:  # a collective failed: find out which member, and say so
            raise self.diagnose(err) from err
        finally:
            self._timings[what] += time.perf_counter() - started

    def begin_step(self, num_tokens: int) -> None:
        self._step += 1
        self._timings["steps"] += 1
        self._guarded("control", lambda: self.link.begin_step(self.num_layers, num_tokens))

    def moe(self, layer: int, x: Tensor, gate_weight: Tensor) -> Tensor:
        started = time.perf_counter()
        weights, expert_ids = route(x, gate_weight, self.top_k)  # 1
        plan = plan_dispatch(weights, expert_ids, self.expert_map.dispatch_rank)  # 2
        self.stats.record(layer, plan.rows_per_expert)
        rows = x[plan.row_token]  # (R, H), grouped by worker, then local expert
        rows_per_expert = plan.rows_per_expert.tolist()
        counts, start = [], 0
        for experts in self.expert_map.workers:
            counts.append(rows_per_expert[start:start + len(experts)])
            start += len(experts)
        self._timings["route"] += time.perf_counter() - started
        out_rows = self._guarded("exchange", lambda: self.link.exchange(layer, counts, rows))  # 3, 4, 5, 6
        assert out_rows is not None
        started = time.perf_counter()
        out = combine(out_rows, plan.row_weight, plan.row_token, x.shape[0])  # 7
        self._timings["combine"] += time.perf_counter() - started
        return out

    @property
    def can_recover(self) -> bool:
        return self.rebuild is not None

    def routing_counts(self) -> list[list[int]]:
        return self.stats.counts

    def timings(self) -> dict[str, float]:
        return dict(self._timings)

    def recover(self, failure: WorkerFailure) -> None:
        assert self.rebuild is not None
        started = time.perf_counter()
        self.link = self.rebuild(failure)
        self._timings["recovery"] += time.perf_counter() - started

    def heartbeat(self) -> None:
        self._guarded("control", lambda: self.link.send_control(OP_NOOP))

    def close(self) -> None:
        """Tell the workers to leave their loops (best effort) and leave the group."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):  # a dead member: the group is going away anyway
            self.link.send_control(OP_SHUTDOWN)
        leave_group()
