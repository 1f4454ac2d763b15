"""LinkedExperts: the Experts stage (cluster/moe/layer.py) of a coordinator whose experts live in an expert pool
(workers/pool.py). The router, the plan and the combine are the layer's, shared with the local engine: this
replaces only steps 3-4 of its plan, dispatch and the way back, with the pool's workers behind one link each.

Per layer, in ``submit`` and ``wait``:
  3. send each worker that has rows one message on its link: the expert map version, its row counts per local
     slot and its rows (workers with no rows in this layer are sent nothing, nor woken)           [_send_work]
  4. each worker runs its experts on its rows, merged with any other coordinator's rows of the same layer that
     are waiting (workers/expert_loop.py); receive each worker's outputs, in the order the rows were sent, into
     one (R, H) tensor; on one node, time where the wait went (wake, hold, expert, back)         [wait]
Shape legend: R rows of one layer, H hidden.

The expert map changes when the pool rebalances (workers/pool.py). Results carry the newest map version their
worker is ready for (an idle coordinator asks the pool instead, at each heartbeat); a newer one is fetched and
switched to in ``begin_step``, between two steps, when no message of the old map is in flight.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
import torch
import torch.distributed as dist
from torch import Tensor

from cluster.engine_config import ClusterConfig
from cluster.errors import WorkerFailure, first_line
from cluster.links.process_group import PgCoordinatorEnd, pair_group
from cluster.links.protocol import OP_HINT, OP_NOOP, OP_WORK, CoordinatorEnd, LinkClosed, Result
from cluster.links.shm import ShmCoordinatorEnd
from cluster.moe.expert_map import ExpertMap
from cluster.moe.pool_api import PoolHandle, PoolView, WorkerEndpoint
from cluster.moe.prefetch import encode_hint

log = logging.getLogger("moe_cluster.dispatch")


@dataclass
class Sent:
    """One layer's rows out at the workers: what ``wait`` needs to finish the layer."""

    messages: list[tuple[int, int, int]]  # (worker, tag, sent at ns) per message, in row order
    out: Tensor  # (R, H) the outputs land here, in the order the rows were sent


class LinkedExperts:
    """An ``ExpertExecutor`` over the workers of an expert pool: one link to each (cluster/links/), opened when
    it attaches, kept through the pool's map changes, rebuilt after a worker is replaced."""

    def __init__(self, pool: PoolHandle, coordinator_id: str, cluster_cfg: ClusterConfig,
                 device: torch.device) -> None:
        self.pool = pool
        self.coordinator_id = coordinator_id
        self.cluster_cfg = cluster_cfg
        self.device = device
        self.node_id = ray.get_runtime_context().get_node_id()
        self._store: Any = None  # TCPStore for process-group links, made on first need
        self._links_made = 0
        self._timings: dict[str, float] = defaultdict(float)  # seconds, accumulated
        self._tags: list[int] = []
        self.links: list[CoordinatorEnd] = []
        self._announced = 0  # the newest expert map version a worker or the pool has mentioned
        self._retry_view_at = 0.0  # after a failed fetch of the new view, not before this (monotonic s)
        self._connect(pool.attach(coordinator_id))

    # ------------------------------------------------------------------------------------------- links

    def _connect(self, view: PoolView) -> None:
        if self.cluster_cfg.heartbeat_s >= view.spec.timeout_s:
            raise ValueError(f"heartbeat_s={self.cluster_cfg.heartbeat_s} must be shorter than the pool's "
                             f"link_timeout_s={view.spec.timeout_s}")
        self.view = view
        self._announced = max(self._announced, view.expert_map.version)
        self.links = [self._open(endpoint) for endpoint in view.workers]
        self._tags = [0] * len(self.links)
        kinds = sorted({link.kind for link in self.links})
        log.info("coordinator %s: linked to %d expert workers of pool %s (%s)", self.coordinator_id,
                 len(self.links), view.pool_id, ", ".join(kinds))

    def _open(self, endpoint: WorkerEndpoint) -> CoordinatorEnd:
        spec = self.view.spec
        kind = self.cluster_cfg.link
        if kind == "auto":
            kind = "shm" if endpoint.node_id == self.node_id and self.device.type == "cpu" \
                and endpoint.device == "cpu" else "pg"
        try:
            if kind == "shm":
                return ShmCoordinatorEnd(endpoint.address, spec)
            return self._open_pg(endpoint)
        except LinkClosed as err:
            raise self._failure(endpoint.index, f"cannot link to it: {err}") from None

    def _open_pg(self, endpoint: WorkerEndpoint) -> CoordinatorEnd:
        backend = self.cluster_cfg.backend
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" and endpoint.device.startswith("cuda") else "gloo"
        if self._store is None:
            self._store = dist.TCPStore(ray.util.get_node_ip_address(), 0, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=self.view.spec.timeout_s),
                                        multi_tenant=True)
        self._links_made += 1
        key = f"{self.coordinator_id}/{endpoint.index}.{endpoint.generation}/{self._links_made}"
        joined = endpoint.actor.open_pg_link.remote(ray.util.get_node_ip_address(), self._store.port, key, backend)
        try:
            group = pair_group(self._store, key, 0, backend, self.view.spec.timeout_s)
            ray.get(joined, timeout=self.view.spec.timeout_s)
        except Exception as err:
            raise LinkClosed(f"process group with it failed: {first_line(err)}") from None
        link_device = self.device if backend == "nccl" else torch.device("cpu")
        return PgCoordinatorEnd(group, self.view.spec, link_device, backend)

    def _failure(self, worker: int, reason: str) -> WorkerFailure:
        endpoint = self.view.workers[worker]
        return WorkerFailure(endpoint.describe(self.view.expert_map.hosted(worker)), reason, worker,
                             endpoint.generation)

    @contextlib.contextmanager
    def _link_of(self, worker: int) -> Iterator[CoordinatorEnd]:
        """The link to ``worker``; a LinkClosed inside becomes a WorkerFailure naming it."""
        try:
            yield self.links[worker]
        except LinkClosed as err:
            raise self._failure(worker, str(err)) from None

    # ----------------------------------------------------------------------------------- ExpertExecutor

    @property
    def expert_map(self) -> ExpertMap:
        return self.view.expert_map

    @property
    def max_in_flight(self) -> int:
        return self.view.spec.slots

    @property
    def can_recover(self) -> bool:
        return self.cluster_cfg.recover_workers

    def begin_step(self) -> None:
        self._follow_pool()

    def _follow_pool(self) -> None:
        """Between steps: move to the pool's current expert map. The links stay (the same workers), unless the pool
        replaced a worker meanwhile. A failed fetch is tried again a second later: the workers keep the old map's
        weights until this coordinator moves."""
        if self._announced <= self.view.expert_map.version or time.monotonic() < self._retry_view_at:
            return
        try:
            view = self.pool.view()
        except Exception as err:
            self._retry_view_at = time.monotonic() + 1.0
            log.warning("coordinator %s: cannot fetch the pool's expert map version %d yet: %s", self.coordinator_id,
                        self._announced, first_line(err))
            return
        before, workers_before = self.view.expert_map.version, len(self.view.workers)
        if [(e.index, e.generation, e.address) for e in view.workers] == \
                [(e.index, e.generation, e.address) for e in self.view.workers]:
            self.view = view
            self._announced = max(self._announced, view.expert_map.version)
        else:
            self._relink(view)
        log.info("coordinator %s: expert map version %d -> %d (%d -> %d expert workers)", self.coordinator_id,
                 before, view.expert_map.version, workers_before, len(view.workers))

    def _relink(self, view: PoolView) -> None:
        """Move to a view whose workers changed (a resize, a replacement): keep the links to workers that stay,
        open links to the new ones, close those to workers that left (a retired worker leaves once every
        coordinator has closed its link). Called between steps: nothing is in flight on any link."""
        old = {(e.index, e.generation, e.address): (link, tag)
               for e, link, tag in zip(self.view.workers, self.links, self._tags, strict=True)}
        wanted = {(e.index, e.generation, e.address) for e in view.workers}
        for key in [k for k in old if k not in wanted]:
            with contextlib.suppress(Exception):
                old.pop(key)[0].close()
        self.view = view
        self._announced = max(self._announced, view.expert_map.version)
        links: list[CoordinatorEnd] = []
        tags: list[int] = []
        try:
            for endpoint in view.workers:
                link, tag = old.pop((endpoint.index, endpoint.generation, endpoint.address), (None, 0))
                links.append(link if link is not None else self._open(endpoint))
                tags.append(tag)
        except BaseException:
            for link in [*links, *(link for link, _ in old.values())]:
                with contextlib.suppress(Exception):
                    link.close()
            self.links, self._tags = [], []
            raise
        self.links, self._tags = links, tags

    def submit(self, layer: int, rows: Tensor, rows_per_slot: Tensor) -> Sent:
        """Step 3: send each worker its share of rows (R, H), grouped by slot; returns at once."""
        expert_map = self.view.expert_map
        counts_per_slot = rows_per_slot.tolist()
        link_rows = rows if self.links and self.links[0].kind == "pg" and self.device.type == "cuda" else rows.cpu()
        out = torch.empty_like(link_rows)  # (R, H) results land here, in the order the rows were sent
        messages, slot, first = [], 0, 0
        for w, n_local in enumerate(expert_map.slots(layer).worker_slots):
            counts = counts_per_slot[slot:slot + n_local]
            slot += n_local
            n = sum(counts)
            if n:
                tag, sent_ns = self._send_work(w, layer, counts, link_rows[first:first + n], out[first:first + n])
                messages.append((w, tag, sent_ns))
                first += n
        return Sent(messages, out)

    def _send_work(self, worker: int, layer: int, counts: list[int], rows: Tensor, out: Tensor) -> tuple[int, int]:
        """The one place a layer's message to one worker is made: whatever that worker must know of this layer
        travels here, ahead of its rows. Returns (tag, sent at ns)."""
        tag = self._tags[worker]
        self._tags[worker] += 1
        with self._link_of(worker) as link:
            sent_ns = link.send(OP_WORK, layer, tag, self.view.expert_map.version, counts, rows, out)
        return tag, sent_ns

    def wait(self, sent: Sent) -> Tensor:
        """Step 4: every worker's outputs, in the order the rows were sent -> (R, H) on the link's device."""
        last: tuple[int, Result] | None = None  # the message whose worker finished last: the critical path
        for w, tag, sent_ns in sent.messages:
            with self._link_of(w) as link:
                result = link.recv_result(tag)
            self._announced = max(self._announced, result.version)
            if link.kind == "shm" and (last is None or result.finished_ns > last[1].finished_ns):
                last = (sent_ns, result)
        if last is not None:  # one node, one clock: where the wait for this layer's experts went
            self._time_trip(*last)
        return sent.out

    def _time_trip(self, sent_ns: int, r: Result) -> None:
        for key, ns in (("wake", r.read_ns - sent_ns), ("hold", r.started_ns - r.read_ns),
                        ("expert", r.finished_ns - r.started_ns), ("back", time.monotonic_ns() - r.finished_ns)):
            self._timings[key] += ns / 1e9
        self._timings["timed_layers"] += 1

    # ------------------------------------------------------------------ issue 23: prefetch hints (HintSink)

    @property
    def prefetch_lookahead(self) -> int:
        return self.view.spec.prefetch_lookahead

    def current_map(self) -> ExpertMap:
        return self.view.expert_map

    def send_hint(self, worker: int, layer: int, experts: list[int]) -> None:
        """Tell ``worker`` the experts of ``layer`` it will probably get rows for (no answer comes back)."""
        with self._link_of(worker) as link:
            link.send_control(OP_HINT, layer, self.view.expert_map.version, encode_hint(layer, experts))
        self._timings["hints"] += 1

    def timings(self) -> dict[str, float]:
        return dict(self._timings)

    def heartbeat(self) -> None:
        """Tell every worker this coordinator is alive and which expert map version it uses (and find out whether
        each still is alive). Idle, it sees no results: it asks the pool whether the map changed, and follows."""
        try:
            self._announced = max(self._announced, self.pool.map_version())
        except Exception as err:  # the pool is busy or away: the heartbeat itself must go on
            log.debug("coordinator %s: no map version from the pool: %s", self.coordinator_id, first_line(err))
        self._follow_pool()
        for w in range(len(self.links)):
            with self._link_of(w) as link:
                link.send(OP_NOOP, version=self.view.expert_map.version)

    def recover(self, failure: WorkerFailure) -> None:
        """Drop every link (results still in flight on the others included), have the pool replace the failed
        worker (once, whichever coordinators report it), and link to the pool as it is now."""
        started = time.perf_counter()
        self._close_links()
        if failure.worker is not None and failure.generation is not None:
            view = self.pool.replace(failure.worker, failure.generation, str(failure))
        else:
            view = self.pool.attach(self.coordinator_id)
        self._connect(view)
        self._timings["recovery"] += time.perf_counter() - started

    def _close_links(self) -> None:
        for link in self.links:
            with contextlib.suppress(Exception):
                link.close()
        self.links = []

    def describe(self) -> dict[str, Any]:
        return {"pool_id": self.view.pool_id, "links": [link.kind for link in self.links],
                "link_backends": [link.backend for link in self.links],
                "map_version": self.view.expert_map.version,
                "workers": [e.describe(self.view.expert_map.hosted(e.index)) for e in self.view.workers]}

    def close(self) -> None:
        self._close_links()
        with contextlib.suppress(Exception):
            self.pool.detach(self.coordinator_id)
