"""The process group of one expert-parallel cluster and the exchanges that run over it.

Rank 0 is the coordinator, ranks 1..N are the expert workers. Every exchange is coordinator-centric: in the
all-to-all of a layer's MoE rows only rank 0's send and receive splits are non-zero. Two implementations of
the same exchange, chosen once at start-up, identical in result:

  * ``collective``: a broadcast control message per step, then per layer ``all_to_all_single`` (uneven
    splits) for counts, rows and results; every member takes part in every call. NCCL runs these as grouped
    send/recv, so this is the default on GPUs.
  * ``sparse``: the same all-to-all with its empty splits skipped, as point-to-point messages. Each message
    from rank 0 to a worker has a fixed size and says what it is (a layer's counts and rows, a heartbeat,
    shutdown), so only workers that have rows in a layer are sent anything and woken. gloo's
    all_to_all_single sends a message between every pair of ranks even for empty splits (5.4 ms per call at
    9 ranks on a 2-core machine, against under 1 ms for the sparse form), so this is the default on CPUs.

Every receive knows its exact size in advance (no reliance on a transport accepting short messages).
Shape legend: R rows (token, expert) of a layer, H hidden, W world size (1 + workers), L the most experts one
worker hosts, C the rows that fit inline in a sparse message.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# Kinds of control (both modes) and of sparse messages.
OP_NOOP = 0  # heartbeat while idle
OP_FORWARD = 1  # collective: run every layer once (args: layers, tokens); sparse: a layer's work
OP_SHUTDOWN = 2  # leave the loop
OP_REJOIN = 3  # leave the loop and wait to join a rebuilt process group
CONTROL_WIDTH = 4  # collective control message: [op, layers, tokens, 0]
HEADER_FIELDS = 4  # sparse header: [op, layer, rows that follow in a second message, 0], then L counts


@dataclass(frozen=True)
class Rendezvous:
    """Where and how members of one cluster meet: the coordinator node's address and a store port."""

    host: str
    port: int
    world_size: int
    backend: str  # "gloo" | "nccl"
    exchange: str  # "collective" | "sparse"
    timeout_s: float
    max_local_experts: int  # the most experts one worker hosts (counts are padded to it)
    inline_limit_bytes: int  # sparse messages carry up to this many bytes of rows inline
    epoch: int = 0  # bumped each time the group is rebuilt (failure recovery)

    @property
    def prefix(self) -> str:
        return f"moe-cluster/epoch-{self.epoch}"


class ExchangeError(RuntimeError):
    """A collective or point-to-point exchange failed; ``rank`` is the peer when it is known."""

    def __init__(self, message: str, rank: int | None) -> None:
        super().__init__(message)
        self.rank = rank


def _wait_all(works: list[tuple[int, Any]]) -> None:  # (peer rank, dist.Work)
    for rank, work in works:
        try:
            work.wait()
        except Exception as err:
            raise ExchangeError(str(err).splitlines()[0], rank) from err


def create_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The coordinator's TCPStore on a port the OS picks (port 0), so two clusters never collide."""
    return dist.TCPStore(host, 0, world_size=world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s), multi_tenant=True)


def join_group(rdv: Rendezvous, rank: int, store: dist.Store | None = None) -> None:
    """Join the cluster's default process group as ``rank`` (blocks until every member has joined)."""
    timeout = datetime.timedelta(seconds=rdv.timeout_s)
    if store is None:
        store = dist.TCPStore(rdv.host, rdv.port, is_master=False, timeout=timeout)
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group(rdv.backend, store=dist.PrefixStore(rdv.prefix, store), rank=rank,
                            world_size=rdv.world_size, timeout=timeout)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class RowLayout:
    """What both ends know about messages, so that every receive has its exact size in advance."""

    hidden: int
    dtype: torch.dtype
    max_local_experts: int
    inline_limit_bytes: int

    @property
    def header_bytes(self) -> int:
        return 8 * (HEADER_FIELDS + self.max_local_experts)

    @property
    def inline_rows(self) -> int:  # C
        return self.inline_limit_bytes // (self.hidden * self.dtype.itemsize)

    @property
    def message_bytes(self) -> int:
        return self.header_bytes + self.inline_rows * self.hidden * self.dtype.itemsize

    def pack(self, op: int, layer: int, counts: Sequence[int], rows: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """A sparse message (uint8, fixed size), and the rows to send after it when they do not fit inline."""
        msg = torch.zeros(self.message_bytes, dtype=torch.uint8)
        n = 0 if rows is None else rows.shape[0]
        inline = n <= self.inline_rows
        header = [op, layer, 0 if inline else n, 0, *counts, *[0] * (self.max_local_experts - len(counts))]
        msg[: self.header_bytes] = torch.tensor(header, dtype=torch.long).view(torch.uint8)
        if rows is not None and n and inline:
            msg[self.header_bytes:self.header_bytes + rows.numel() * rows.element_size()] = \
                rows.contiguous().view(-1).view(torch.uint8)
        return msg, (None if inline else rows)


@dataclass
class Work:
    """What a worker is told to do next: ``op``; for OP_FORWARD, a layer with its counts and rows."""

    op: int
    layer: int = 0
    counts: list[int] | None = None
    rows: Tensor | None = None  # (R_w, H), grouped by local expert


class CoordinatorLink:
    """Rank 0's side of the exchanges."""

    def __init__(self, rdv: Rendezvous, device: torch.device, layout: RowLayout) -> None:
        self.rdv = rdv
        self.device = device  # where the link's tensors live (CPU for gloo)
        self.layout = layout
        self.workers = list(range(1, rdv.world_size))
        self.sparse = rdv.exchange == "sparse"

    def send_control(self, op: int, *args: int) -> None:
        """To every worker: heartbeat, shutdown, rejoin (and, collective only, the start of a step)."""
        if self.sparse:
            msg, _ = self.layout.pack(op, 0, [], None)
            _wait_all([(w, dist.isend(msg, w)) for w in self.workers])
        else:
            dist.broadcast(torch.tensor([op, *args, *[0] * (CONTROL_WIDTH - 1 - len(args))], dtype=torch.long,
                                        device=self.device), 0)

    def notify_each(self, op: int, wait_s: float) -> list[int]:
        """Send a control message to each worker on its own, waiting at most ``wait_s`` for each; returns
        the ranks that took it (after a failure: the others are dead or stuck). Sparse exchange only."""
        if not self.sparse:
            return []
        msg, _ = self.layout.pack(op, 0, [], None)
        reached = []
        for w in self.workers:
            try:
                work: Any = dist.isend(msg, w)
                work.wait(datetime.timedelta(seconds=wait_s))
                reached.append(w)
            except Exception:  # that member is gone; the rest still get theirs
                continue
        return reached

    def begin_step(self, num_layers: int, num_tokens: int) -> None:
        if not self.sparse:  # sparse messages describe themselves: no step announcement needed
            self.send_control(OP_FORWARD, num_layers, num_tokens)

    def exchange(self, layer: int, counts: Sequence[Sequence[int]], rows: Tensor) -> Tensor:
        """Steps 3-6 of a layer: give worker w+1 its counts[w] (rows per local expert) and its rows (R, H),
        grouped by worker; receive each worker's results (R, H) in the same order."""
        model_device = rows.device
        rows = rows.to(self.device)
        rows_per_worker = [sum(c) for c in counts]
        out = torch.empty_like(rows)
        if self.sparse:
            sends: list[tuple[int, Any]] = []
            recvs: list[tuple[int, Any]] = []
            start = 0
            for w, n in enumerate(rows_per_worker):
                if n:  # a worker with no rows in this layer is not sent anything, nor woken
                    msg, extra = self.layout.pack(OP_FORWARD, layer, counts[w], rows[start:start + n])
                    sends.append((w + 1, dist.isend(msg, w + 1)))
                    if extra is not None:
                        sends.append((w + 1, dist.isend(extra.contiguous(), w + 1)))
                    recvs.append((w + 1, dist.irecv(out[start:start + n], w + 1)))
                start += n
            _wait_all(sends + recvs)
        else:
            table = torch.zeros(len(self.workers) + 1, self.layout.max_local_experts, dtype=torch.long)  # (W, L)
            for w, row in enumerate(counts):
                table[w + 1, : len(row)] = torch.tensor(row, dtype=torch.long)
            table = table.to(self.device)
            dist.all_to_all_single(torch.empty_like(table), table)
            splits = [0, *rows_per_worker]
            empty = rows.new_empty((0, rows.shape[1]))
            dist.all_to_all_single(empty, rows, output_split_sizes=[0] * len(splits), input_split_sizes=splits)
            dist.all_to_all_single(out, empty, output_split_sizes=splits, input_split_sizes=[0] * len(splits))
        return out.to(model_device)


class WorkerLink:
    """A worker's side (rank >= 1): ``next_work`` hides which protocol is in use."""

    def __init__(self, rdv: Rendezvous, rank: int, device: torch.device, layout: RowLayout) -> None:
        self.rdv = rdv
        self.rank = rank
        self.device = device
        self.layout = layout
        self.sparse = rdv.exchange == "sparse"
        self.world = rdv.world_size
        self._layers_left = 0  # collective: layers of the current step still to run
        self._next_layer = 0

    def next_work(self) -> Work:
        return self._next_sparse() if self.sparse else self._next_collective()

    def _next_sparse(self) -> Work:
        layout = self.layout
        msg = torch.empty(layout.message_bytes, dtype=torch.uint8)
        dist.recv(msg, 0)
        header = [int(v) for v in msg[: layout.header_bytes].view(torch.long).tolist()]
        op, layer, extra = header[0], header[1], header[2]
        if op != OP_FORWARD:
            return Work(op)
        counts = header[HEADER_FIELDS:]
        n = sum(counts)
        if extra:
            rows = torch.empty(n, layout.hidden, dtype=layout.dtype)
            dist.recv(rows, 0)
        else:
            rows = msg[layout.header_bytes:].view(layout.dtype).view(layout.inline_rows, layout.hidden)[:n]
        return Work(OP_FORWARD, layer, counts, rows)

    def _next_collective(self) -> Work:
        while self._layers_left == 0:
            control = torch.empty(CONTROL_WIDTH, dtype=torch.long, device=self.device)
            dist.broadcast(control, 0)
            op, layers = (int(v) for v in control[:2].tolist())
            if op != OP_FORWARD:
                return Work(op)
            self._layers_left, self._next_layer = layers, 0
        hidden, max_local = self.layout.hidden, self.layout.max_local_experts
        table = torch.empty(self.world, max_local, dtype=torch.long, device=self.device)  # (W, L)
        dist.all_to_all_single(table, torch.zeros_like(table))
        counts = [int(v) for v in table[0].tolist()]
        zeros = [0] * self.world
        rows = torch.empty(sum(counts), hidden, dtype=self.layout.dtype, device=self.device)
        dist.all_to_all_single(rows, rows.new_empty((0, hidden)), output_split_sizes=[rows.shape[0], *zeros[1:]],
                               input_split_sizes=zeros)
        layer = self._next_layer
        self._layers_left -= 1
        self._next_layer += 1
        return Work(OP_FORWARD, layer, counts, rows)

    def send_results(self, out: Tensor) -> None:
        if self.sparse:
            if out.shape[0]:
                dist.send(out.contiguous(), 0)
        else:
            zeros = [0] * self.world
            dist.all_to_all_single(out.new_empty((0, out.shape[1])), out.contiguous(), output_split_sizes=zeros,
                                   input_split_sizes=[out.shape[0], *zeros[1:]])
