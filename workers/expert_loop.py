"""The expert worker's persistent loop: wait on every link at once, take whatever work has arrived, run it,
send each result back on the link it came from. No Ray call per step or per layer.

Rows of one layer that are waiting from several coordinators (or from several micro-batches of one) are merged
into one grouped expert call and the results split back to their senders: every expert then runs once on the
rows of all of them, which is the point of sharing one pool between many coordinators.

Expert-map versions (live rebalancing, workers/pool.py): every message names the map its sender uses, and rows
run on that map's weights (only rows of one version merge). The loop tells its ``Experts`` the oldest version any
link may still send, so that older weights are freed once every link has moved on.

Shape legend: R rows of one message, H hidden, L local expert slots, M messages merged into one call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from cluster.links.protocol import OP_BYE, OP_HINT, OP_WORK, LinkClosed, LinkSpec
from cluster.moe.prefetch import decode_hint
from workers.link_ends import Message, ShmWorkerEnd, WorkerEnd, listen

log = logging.getLogger("moe_cluster.worker")


class Experts(Protocol):
    """The weights the loop runs rows on, by expert-map version (workers/versioned_experts.py's VersionedExperts)."""

    @property
    def latest(self) -> int:
        """The newest map version these weights are ready for (announced in every result)."""
        ...

    def holds(self, version: int) -> bool: ...

    def run(self, version: int, layer: int, rows: Tensor, counts: list[int]) -> Tensor:
        """rows (R, H) grouped by local slot of ``version``'s map, rows per slot (L,) -> expert outputs (R, H)."""
        ...

    def in_use(self, oldest: int | None) -> None:
        """The oldest version a link may still send (None: a link has not said yet)."""

    def hint(self, version: int, layer: int, experts: list[int]) -> None:
        """Issue 23: ``layer``'s next rows will probably need these global experts (a cache may load them)."""


@dataclass
class LoopStats:
    """What the loop did since it started (read by the pool for metrics; merged calls are the M:N payoff)."""

    messages: int = 0  # WORK messages answered
    calls: int = 0  # grouped expert calls (fewer than messages when rows were merged)
    rows: int = 0  # rows computed
    compute_s: float = 0.0  # wall time in expert calls
    compute_cpu_s: float = 0.0  # ... of which this thread was on a core (the rest: waiting for one)
    service_s: float = 0.0  # summed over messages: from read to computed (waiting here, then the expert call)
    links_opened: int = 0
    links_closed: int = 0
    hints: int = 0  # prefetch hints received (issue 23)

    def snapshot(self) -> dict[str, object]:
        return {"messages": self.messages, "calls": self.calls, "rows": self.rows, "compute_s": self.compute_s,
                "compute_cpu_s": self.compute_cpu_s,
                "service_s": self.service_s,
                "links_opened": self.links_opened, "links_closed": self.links_closed, "hints": self.hints}


def merge_messages(messages: list[Message]) -> tuple[Tensor, list[int], Tensor]:
    """Rows of several messages of one layer as one call: -> rows (sum R, H) grouped by local slot, rows per
    slot (L,), and ``order`` such that merged row i came from concatenated row order[i]."""
    counts = torch.tensor([m.counts for m in messages], dtype=torch.long)  # (M, L)
    sizes = counts.sum(dim=1)  # (M,)
    starts = torch.cumsum(sizes, 0) - sizes  # first row of each message in the concatenation
    slot_starts = torch.cumsum(counts, 1) - counts  # (M, L) first row of each slot inside its message
    pieces = [torch.arange(int(n)) + int(starts[i] + slot_starts[i, j])
              for j in range(counts.shape[1]) for i, n in enumerate(counts[:, j].tolist()) if n]
    order = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    rows = torch.cat([m.rows for m in messages if m.rows is not None])  # (sum R, H)
    return rows[order], counts.sum(dim=0).tolist(), order


class ExpertLoop:
    """Owns the links of one worker. ``run`` blocks until ``stop`` (called from another thread)."""

    def __init__(self, address: str, spec: LinkSpec, experts: Experts, num_layers: int, merge_wait_s: float) -> None:
        self.spec = spec
        self.experts = experts
        self.num_layers = num_layers
        self.merge_wait_s = merge_wait_s
        self._last_layer: dict[WorkerEnd, tuple[int, float]] = {}  # link -> (layer of its last work, when)
        self._link_version: dict[WorkerEnd, int] = {}  # link -> map version of its last message
        self.stats = LoopStats()
        self.links: dict[int, WorkerEnd] = {}  # by file descriptor
        self._selector = selectors.DefaultSelector()
        self._listener = listen(address)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._pending_links: list[WorkerEnd] = []
        self._stopping = False
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")

    # --------------------------------------------------------------------------- called from other threads

    def add_link(self, end: WorkerEnd) -> None:
        """Hand over a link built elsewhere (a process-group link); the loop starts waiting on it."""
        self._pending_links.append(end)
        os.write(self._wake_w, b"l")

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"s")

    # ---------------------------------------------------------------------------------------------- loop

    def run(self) -> None:
        work: list[tuple[WorkerEnd, Message]] = []  # arrived, not served yet
        serve_by = 0.0  # when the oldest waiting work must be served, merged or not
        try:
            while not self._stopping:
                timeout = None if not work else max(0.0, serve_by - time.monotonic())
                ready: list[WorkerEnd] = []
                for key, _ in self._selector.select(timeout):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._take_pending()
                    else:
                        ready.append(key.data)
                now = time.monotonic()
                for end in ready:
                    for message in self._read(end):
                        if not work:
                            serve_by = now + self.merge_wait_s
                        work.append((end, message))
                        self._last_layer[end] = (message.layer, now)
                if work and (now >= serve_by or not self._worth_waiting(work, now)):
                    self._serve(work)
                    work = []
        finally:
            for end in list(self.links.values()):
                self._drop(end, "the worker is stopping")
            self._selector.close()
            self._listener.close()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)

    def _worth_waiting(self, work: list[tuple[WorkerEnd, Message]], now: float) -> bool:
        """Whether another coordinator's rows of the oldest waiting layer are probably on their way: a link that
        was busy a moment ago, whose last work was the layer before, and that has sent nothing for this layer.
        Coordinators that are waited for get their results together with the others, so they fall into step
        and keep arriving together: every expert then runs once on the rows of all of them."""
        layer = work[0][1].layer
        previous = (layer - 1) % self.num_layers
        have = {end for end, message in work if message.layer == layer}
        busy = 0.05 + 10 * self.merge_wait_s  # a link quiet for longer is idle, not on its way
        return any(end not in have and last == previous and now - at < busy
                   for end, (last, at) in self._last_layer.items())

    def _accept(self) -> None:
        conn, _ = self._listener.accept()
        try:
            end = ShmWorkerEnd(conn, self.spec)
        except (LinkClosed, OSError) as err:
            log.warning("refused a link: %s", err)
            conn.close()
            return
        self._register(end)

    def _take_pending(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        while self._pending_links:
            self._register(self._pending_links.pop())

    def _register(self, end: WorkerEnd) -> None:
        self.links[end.fileno()] = end
        self._selector.register(end.fileno(), selectors.EVENT_READ, end)
        self.stats.links_opened += 1
        log.info("link opened (%s); %d links", end.kind, len(self.links))

    def _drop(self, end: WorkerEnd, why: str) -> None:
        fd = end.fileno()
        self._last_layer.pop(end, None)
        if self.links.pop(fd, None) is None:
            return
        self._link_version.pop(end, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)
        self.stats.links_closed += 1  # before the close: a coordinator waiting for the close then reads it counted
        end.close()
        log.info("link closed (%s): %s; %d links", end.kind, why, len(self.links))
        self._report_versions()

    def _read(self, end: WorkerEnd) -> list[Message]:
        try:
            messages = end.read()
        except LinkClosed as err:
            self._drop(end, str(err))
            return []
        for m in messages:  # issue 23: prefetch hints act at once, ahead of the work they are for
            if m.op == OP_HINT:
                self._hint(end, m)
        if any(m.op == OP_BYE for m in messages):
            self._drop(end, "the coordinator detached")
        elif messages and self._link_version.get(end) != messages[-1].header.version:
            self._link_version[end] = messages[-1].header.version  # work and heartbeats both say it
            self._report_versions()
        return [m for m in messages if m.op == OP_WORK]

    def _hint(self, end: WorkerEnd, message: Message) -> None:
        try:
            layer, experts = decode_hint(message.payload)
        except ValueError as err:  # a guess only: log it, drop it, keep the link
            log.warning("ignored a prefetch hint on a %s link: %s", end.kind, err)
            return
        self.stats.hints += 1
        if 0 <= layer < self.num_layers and self.experts.holds(message.header.version):
            self.experts.hint(message.header.version, layer, experts)

    def _report_versions(self) -> None:
        """Tell the experts the oldest map version a link may still send: None while a link has sent nothing yet
        (it might send any), the newest when there are no links."""
        known = [self._link_version[end] for end in self.links.values() if end in self._link_version]
        if len(known) < len(self.links):
            self.experts.in_use(None)
        else:
            self.experts.in_use(min(known, default=self.experts.latest))

    def _serve(self, work: list[tuple[WorkerEnd, Message]]) -> None:
        """Run the waiting work layer by layer (oldest layer group first), merging each layer's messages of one
        map version."""
        groups: dict[tuple[int, int], list[tuple[WorkerEnd, Message]]] = {}  # (layer, version) -> work
        for item in work:
            groups.setdefault((item[1].layer, item[1].header.version), []).append(item)
        latest = self.experts.latest
        for (layer, version), items in groups.items():
            if not self.experts.holds(version):  # cannot happen by the pool's protocol; never guess weights
                for end, _ in items:
                    self._drop(end, f"its work uses expert map version {version}, which this worker does not "
                                    f"hold (newest: {latest})")
                continue
            messages = [m for _, m in items]
            started_ns, cpu_started = time.monotonic_ns(), time.thread_time()
            if len(messages) == 1:
                counts = messages[0].counts
                assert messages[0].rows is not None
                outs = [self.experts.run(version, layer, messages[0].rows, counts)]
                slot_rows = counts
            else:
                rows, slot_rows, order = merge_messages(messages)
                merged = self.experts.run(version, layer, rows, slot_rows)
                unmerged = torch.empty_like(merged)
                unmerged[order] = merged
                outs = list(unmerged.split([sum(m.counts) for m in messages]))
            finished_ns = time.monotonic_ns()
            self.stats.compute_s += (finished_ns - started_ns) / 1e9
            self.stats.service_s += sum(finished_ns - (m.read_ns or started_ns) for m in messages) / 1e9
            self.stats.compute_cpu_s += time.thread_time() - cpu_started
            self.stats.calls += 1
            self.stats.messages += len(messages)
            self.stats.rows += sum(slot_rows)
            for (end, message), out in zip(items, outs, strict=True):
                if end.fileno() not in self.links:
                    continue  # the link closed meanwhile
                try:
                    end.send_result(message, latest, out, started_ns)
                except LinkClosed as err:
                    self._drop(end, str(err))


def pick_address(pool_id: str, worker_index: int, generation: int) -> str:
    """The abstract socket name a worker listens on (unique per pool, worker and replacement)."""
    return f"moe-cluster/{pool_id}/worker-{worker_index}.{generation}/{os.getpid()}"
