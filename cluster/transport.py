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
OP_FORWARD = 1  # run the MoE of every layer once; arg0 = layers, arg1 = step id
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
    max_local_experts: int  # counts messages are padded to the most experts one worker hosts
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


class CoordinatorLink:
    """Rank 0's side of the exchanges."""

    def __init__(self, rdv: Rendezvous, device: torch.device) -> None:
        self.rdv = rdv
        self.device = device
        self.max_local = rdv.max_local_experts
        self.workers = list(range(1, rdv.world_size))
        self.sparse = rdv.exchange == "sparse"

    def send_control(self, op: int, *args: int) -> None:
        msg = torch.tensor([op, *args, *[0] * (CONTROL_WIDTH - 1 - len(args))], dtype=torch.long,
                           device=self.device)
        if self.sparse:
            _wait_all([(w, dist.isend(msg, w)) for w in self.workers])
        else:
            dist.broadcast(msg, 0)

    def send_counts(self, counts: Sequence[Sequence[int]]) -> None:
        """counts[w][j]: rows for local expert j of worker w+1 (padded to L_max)."""
        table = torch.zeros(len(self.workers), self.max_local, dtype=torch.long)
        for w, row in enumerate(counts):
            table[w, : len(row)] = torch.tensor(row, dtype=torch.long)
        table = table.to(self.device)
        if self.sparse:
            _wait_all([(w + 1, dist.isend(table[w], w + 1)) for w in range(len(self.workers))])
        else:
            send = torch.cat([torch.zeros(1, self.max_local, dtype=torch.long, device=self.device), table])  # (W, L)
            dist.all_to_all_single(torch.empty_like(send), send)

    def exchange_rows(self, rows: Tensor, rows_per_worker: Sequence[int]) -> Tensor:
        """Send rows (R, H), grouped by worker, and receive each worker's results (R, H) in the same order."""
        model_device = rows.device
        rows = rows.to(self.device)  # gloo moves CPU tensors only
        out = torch.empty_like(rows)
        if self.sparse:
            sends, recvs, start = [], [], 0
            for w, n in enumerate(rows_per_worker):
                if n:
                    sends.append((w + 1, dist.isend(rows[start:start + n], w + 1)))
                    recvs.append((w + 1, dist.irecv(out[start:start + n], w + 1)))
                start += n
            _wait_all(sends + recvs)
        else:
            splits = [0, *rows_per_worker]
            empty = rows.new_empty((0, rows.shape[1]))
            dist.all_to_all_single(empty, rows, output_split_sizes=[0] * len(splits), input_split_sizes=splits)
            dist.all_to_all_single(out, empty, output_split_sizes=splits, input_split_sizes=[0] * len(splits))
        return out.to(model_device)


class WorkerLink:
    """A worker's side of the exchanges (rank >= 1)."""

    def __init__(self, rdv: Rendezvous, rank: int, device: torch.device) -> None:
        self.rdv = rdv
        self.rank = rank
        self.device = device
        self.max_local = rdv.max_local_experts
        self.sparse = rdv.exchange == "sparse"
        self.world = rdv.world_size

    def recv_control(self) -> list[int]:
        msg = torch.empty(CONTROL_WIDTH, dtype=torch.long, device=self.device)
        if self.sparse:
            dist.recv(msg, 0)
        else:
            dist.broadcast(msg, 0)
        return [int(v) for v in msg.tolist()]

    def recv_counts(self) -> list[int]:
        if self.sparse:
            counts = torch.empty(self.max_local, dtype=torch.long, device=self.device)
            dist.recv(counts, 0)
            return [int(v) for v in counts.tolist()]
        recv = torch.empty(self.world, self.max_local, dtype=torch.long, device=self.device)  # (W, L)
        dist.all_to_all_single(recv, torch.zeros_like(recv))
        return [int(v) for v in recv[0].tolist()]

    def recv_rows(self, n: int, hidden: int, dtype: torch.dtype) -> Tensor:
        rows = torch.empty(n, hidden, dtype=dtype, device=self.device)
        if self.sparse:
            if n:
                dist.recv(rows, 0)
        else:
            zeros = [0] * self.world
            dist.all_to_all_single(rows, rows.new_empty((0, hidden)), output_split_sizes=[n, *zeros[1:]],
                                   input_split_sizes=zeros)
        return rows

    def send_results(self, out: Tensor) -> None:
        if self.sparse:
            if out.shape[0]:
                dist.send(out.contiguous(), 0)
        else:
            zeros = [0] * self.world
            dist.all_to_all_single(out.new_empty((0, out.shape[1])), out.contiguous(), output_split_sizes=zeros,
                                   input_split_sizes=[out.shape[0], *zeros[1:]])
