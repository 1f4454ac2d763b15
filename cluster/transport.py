"""The process group of one expert-parallel cluster and the exchanges that run over it.

Rank 0 is the coordinator, ranks 1..N are the expert workers. Every exchange is coordinator-centric: in an
all-to-all of MoE rows only rank 0's send and receive splits are non-zero. Two implementations of the same
exchange, chosen once at start-up and identical in result:

  * ``collective``: ``broadcast`` for control, ``all_to_all_single`` (uneven splits) for counts, rows and
    results. NCCL runs these as grouped send/recv, so this is the default on GPUs.
  * ``sparse``: the same all-to-all with its empty splits skipped - point-to-point isend/irecv between rank 0
    and each worker. gloo's all_to_all_single exchanges a message between every pair of ranks even for
    empty splits (5.4 ms per call at 9 ranks on a 2-core machine, against 0.9 ms for the sparse form),
    so this is the default on CPUs.

Shape legend: R rows (token, expert) sent to all workers, H hidden, W world size (1 + workers),
L_max the most experts one worker hosts.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# Control messages: [op, arg0, arg1, arg2] as int64.
OP_NOOP = 0  # heartbeat while idle
OP_FORWARD = 1  # run the MoE of every layer once; arg0 = layers, arg1 = step id, arg2 = tokens in the step
OP_SHUTDOWN = 2  # leave the loop
OP_REJOIN = 3  # leave the loop and wait to join a rebuilt process group
CONTROL_WIDTH = 4


@dataclass(frozen=True)
class Rendezvous:
    """Where and how members of one cluster meet: the coordinator node's address and a store port."""

    host: str
    port: int
    world_size: int
    backend: str  # "gloo" | "nccl"
    exchange: str  # "collective" | "sparse"
    timeout_s: float
    max_local_experts: int  # the most experts one worker hosts (counts messages are padded to it)
    inline_limit_bytes: int  # see RowLayout
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
    """What both ends know about a layer's messages, so every receive has its exact size in advance."""

    hidden: int
    dtype: torch.dtype
    top_k: int
    max_local_experts: int
    inline_limit_bytes: int

    @property
    def header_bytes(self) -> int:
        return 8 * self.max_local_experts  # int64 counts

    def inline_rows(self, num_tokens: int) -> int:
        """Rows a worker can receive in a step of ``num_tokens`` tokens, if small enough to pad every message
        to that capacity (counts and rows then travel as one message); 0 means two messages."""
        capacity = num_tokens * min(self.top_k, self.max_local_experts)
        size = self.header_bytes + capacity * self.hidden * self.dtype.itemsize
        return capacity if size <= self.inline_limit_bytes else 0


class CoordinatorLink:
    """Rank 0's side of the exchanges."""

    def __init__(self, rdv: Rendezvous, device: torch.device, layout: RowLayout) -> None:
        self.rdv = rdv
        self.device = device
        self.layout = layout
        self.workers = list(range(1, rdv.world_size))
        self.sparse = rdv.exchange == "sparse"

    def send_control(self, op: int, *args: int) -> None:
        msg = torch.tensor([op, *args, *[0] * (CONTROL_WIDTH - 1 - len(args))], dtype=torch.long,
                           device=self.device)
        if self.sparse:
            _wait_all([(w, dist.isend(msg, w)) for w in self.workers])
        else:
            dist.broadcast(msg, 0)

    def exchange(self, counts: Sequence[Sequence[int]], rows: Tensor, num_tokens: int) -> Tensor:
        """Steps 3-6 of a layer: send counts[w] (rows per local expert of worker w+1) and the rows (R, H),
        grouped by worker; receive each worker's results (R, H) in the same order."""
        model_device = rows.device
        rows = rows.to(self.device)  # gloo moves CPU tensors only
        rows_per_worker = [sum(c) for c in counts]
        table = torch.zeros(len(self.workers), self.layout.max_local_experts, dtype=torch.long)  # (W-1, L_max)
        for w, row in enumerate(counts):
            table[w, : len(row)] = torch.tensor(row, dtype=torch.long)
        out = torch.empty_like(rows)
        if self.sparse:
            self._exchange_sparse(table, rows, rows_per_worker, out, num_tokens)
        else:
            table = table.to(self.device)
            send = torch.cat([torch.zeros_like(table[:1]), table])  # (W, L_max): nothing for rank 0 itself
            dist.all_to_all_single(torch.empty_like(send), send)
            splits = [0, *rows_per_worker]
            empty = rows.new_empty((0, rows.shape[1]))
            dist.all_to_all_single(empty, rows, output_split_sizes=[0] * len(splits), input_split_sizes=splits)
            dist.all_to_all_single(out, empty, output_split_sizes=splits, input_split_sizes=[0] * len(splits))
        return out.to(model_device)

    def _exchange_sparse(self, table: Tensor, rows: Tensor, rows_per_worker: list[int], out: Tensor,
                         num_tokens: int) -> None:
        capacity = self.layout.inline_rows(num_tokens)
        header = self.layout.header_bytes
        sends: list[tuple[int, Any]] = []
        recvs: list[tuple[int, Any]] = []
        start = 0
        for w, n in enumerate(rows_per_worker):
            chunk = rows[start:start + n]
            if capacity:  # one message: counts header, then the rows padded to capacity
                msg = torch.empty(header + capacity * rows.shape[1] * rows.element_size(), dtype=torch.uint8)
                msg[:header] = table[w].view(torch.uint8)
                msg[header:header + chunk.numel() * chunk.element_size()] = chunk.reshape(-1).view(torch.uint8)
                sends.append((w + 1, dist.isend(msg, w + 1)))
            else:  # two messages: counts, then exactly the rows
                sends.append((w + 1, dist.isend(table[w].contiguous(), w + 1)))
                if n:
                    sends.append((w + 1, dist.isend(chunk, w + 1)))
            if n:
                recvs.append((w + 1, dist.irecv(out[start:start + n], w + 1)))
            start += n
        _wait_all(sends + recvs)


class WorkerLink:
    """A worker's side of the exchanges (rank >= 1)."""

    def __init__(self, rdv: Rendezvous, rank: int, device: torch.device, layout: RowLayout) -> None:
        self.rdv = rdv
        self.rank = rank
        self.device = device
        self.layout = layout
        self.sparse = rdv.exchange == "sparse"
        self.world = rdv.world_size

    def recv_control(self) -> list[int]:
        msg = torch.empty(CONTROL_WIDTH, dtype=torch.long, device=self.device)
        if self.sparse:
            dist.recv(msg, 0)
        else:
            dist.broadcast(msg, 0)
        return [int(v) for v in msg.tolist()]

    def recv_layer(self, num_tokens: int) -> tuple[list[int], Tensor]:
        """This worker's counts (rows per local expert) and its rows (R_w, H) for one layer."""
        hidden, dtype, max_local = self.layout.hidden, self.layout.dtype, self.layout.max_local_experts
        if self.sparse:
            capacity = self.layout.inline_rows(num_tokens)
            if capacity:
                header = self.layout.header_bytes
                msg = torch.empty(header + capacity * hidden * dtype.itemsize, dtype=torch.uint8)
                dist.recv(msg, 0)
                counts = [int(v) for v in msg[:header].view(torch.long).tolist()]
                rows = msg[header:].view(dtype).view(capacity, hidden)[: sum(counts)]
                return counts, rows
            table = torch.empty(max_local, dtype=torch.long)
            dist.recv(table, 0)
            counts = [int(v) for v in table.tolist()]
            rows = torch.empty(sum(counts), hidden, dtype=dtype)
            if rows.shape[0]:
                dist.recv(rows, 0)
            return counts, rows
        recv = torch.empty(self.world, max_local, dtype=torch.long, device=self.device)  # (W, L_max)
        dist.all_to_all_single(recv, torch.zeros_like(recv))
        counts = [int(v) for v in recv[0].tolist()]
        zeros = [0] * self.world
        rows = torch.empty(sum(counts), hidden, dtype=dtype, device=self.device)
        dist.all_to_all_single(rows, rows.new_empty((0, hidden)), output_split_sizes=[rows.shape[0], *zeros[1:]],
                               input_split_sizes=zeros)
        return counts, rows

    def send_results(self, out: Tensor) -> None:
        if self.sparse:
            if out.shape[0]:
                dist.send(out.contiguous(), 0)
        else:
            zeros = [0] * self.world
            dist.all_to_all_single(out.new_empty((0, out.shape[1])), out.contiguous(), output_split_sizes=zeros,
                                   input_split_sizes=[out.shape[0], *zeros[1:]])
