"""Links between one coordinator and one expert worker: the M:N exchange is one link per (coordinator, worker)
pair, so coordinators attach and detach at any time without touching anyone else's links.

Every message is a fixed-size header (int64 words: op, layer, tag, map version, rows, where the rows are, slot,
three clock stamps, then one row count per local expert slot) followed, for WORK and RESULT, by its rows. The
stamps (CLOCK_MONOTONIC nanoseconds, one clock for every process of a node) say when a WORK was sent, and when
its worker read it, started and finished it: on one node the time a layer waits for its experts splits exactly
into wake-up, waiting at the worker, expert compute, and the way back. The coordinator numbers
its messages with a ``tag``; a worker answers each WORK with a RESULT carrying the same tag, in order.

Two kinds of link, chosen per pair when the coordinator attaches (this module holds what they share: the
header, the message types, the ends' protocols):
  * ``shm`` (shm.py): coordinator and worker on one node, tensors on CPU. Headers travel over a Unix
    socket (abstract namespace); rows and results are copied into two shared-memory buffers (memfd, handed to
    the worker over the socket with SCM_RIGHTS; nothing to clean up, they vanish with the last process that maps
    them), ``slots`` fixed-size slots each, slot = tag % slots. A message larger than a slot gets a buffer of its
    own (a fresh memfd handed over with its header; the results come back in it). Only headers ever travel on
    the socket, so no end ever blocks on a full socket buffer: with several coordinators and workers, blocked
    writes could otherwise wait on each other in a cycle. One wake-up per message, and a closed socket is a dead
    peer at once.
  * ``pg`` (process_group.py): anywhere else - a torch.distributed process group of exactly two members (gloo on
    CPUs, NCCL on GPUs), built directly from a store, a rank and a size. The worker's end receives on a thread
    of its own and signals a pipe, so the worker's loop waits on both kinds of link alike.

Shape legend: R rows of one message, H hidden, L local expert slots of the worker.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from cluster.model.config import parse_dtype

# Header ops
OP_NOOP = 0  # heartbeat: keeps an idle link's peers sure of each other
OP_WORK = 1  # coordinator -> worker: a layer's rows, grouped by local expert slot
OP_RESULT = 2  # worker -> coordinator: the expert outputs of one WORK, same order
OP_BYE = 3  # coordinator -> worker: this link is closing
OP_HINT = 4  # coordinator -> worker: a prefetch hint (issue 23), ``rows`` bytes of msgpack after the header, no answer
# Where a message's rows are
IN_SLOT, INLINE, IN_BUFFER = 1, 2, 3  # a slot of the link's buffers; after the header; a buffer of its own
HEADER_FIELDS = 10  # op, layer, tag, version, rows, where, slot, 3 clock stamps; then L counts


class LinkClosed(RuntimeError):
    """The peer closed the link, died, or did not answer within the timeout."""


@dataclass(frozen=True)
class LinkSpec:
    """What both ends of a link agree on."""

    hidden: int
    dtype: str
    max_local: int  # L: counts per message (the most expert slots a worker of the pool hosts)
    slots: int = 4  # messages a coordinator may have outstanding on one link (pipeline depth)
    slot_bytes: int = 1 << 20  # shm links: rows up to this size travel in a slot, larger ones in a buffer of their own
    timeout_s: float = 60.0  # a peer silent this long in the middle of an exchange is dead
    prefetch_lookahead: int = 0  # issue 23: coordinators send OP_HINTs this many layers ahead (0: none)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def header_words(self) -> int:
        return HEADER_FIELDS + self.max_local

    @property
    def header_bytes(self) -> int:
        return 8 * self.header_words

    def row_bytes(self, rows: int) -> int:
        return rows * self.hidden * self.torch_dtype.itemsize


@dataclass(frozen=True)
class Header:
    op: int
    layer: int = 0
    tag: int = 0
    version: int = 0
    rows: int = 0
    where: int = 0
    slot: int = 0
    stamps: tuple[int, int, int] = (0, 0, 0)  # WORK: (sent, 0, 0); RESULT: (read, started, finished)
    counts: tuple[int, ...] = ()  # WORK: rows per local expert slot

    def pack(self, spec: LinkSpec) -> bytes:
        words = [self.op, self.layer, self.tag, self.version, self.rows, self.where, self.slot, *self.stamps,
                 *self.counts]
        return struct.pack(f"<{spec.header_words}q", *words, *[0] * (spec.header_words - len(words)))

    @classmethod
    def unpack(cls, spec: LinkSpec, data: bytes | bytearray | Sequence[int]) -> Header:
        w = struct.unpack(f"<{spec.header_words}q", data) if isinstance(data, (bytes, bytearray)) else tuple(data)
        return cls(op=w[0], layer=w[1], tag=w[2], version=w[3], rows=w[4], where=w[5], slot=w[6],
                   stamps=(w[7], w[8], w[9]), counts=tuple(w[HEADER_FIELDS:]))


@dataclass(frozen=True)
class Result:
    """What came back with a RESULT: the worker's map version and the clock stamps of its message's trip."""

    version: int
    read_ns: int  # the worker read the WORK
    started_ns: int  # the worker started its expert call (after any merge wait or earlier work)
    finished_ns: int  # ... and finished it
    arrived_ns: int  # the coordinator had the results


def check_result(header: Header, tag: int, rows: int) -> None:
    if header.op != OP_RESULT or header.tag != tag or header.rows != rows:
        raise LinkClosed(f"expected the result of message {tag} ({rows} rows), got op {header.op} tag {header.tag} "
                         f"with {header.rows} rows")


def result_of(header: Header) -> Result:
    read, started, finished = header.stamps
    return Result(header.version, read, started, finished, time.monotonic_ns())


class CoordinatorEnd(Protocol):
    """The coordinator's end of a link (shm.py, process_group.py; the worker's end is workers/link_ends.py)."""

    kind: str  # "shm" or "pg"
    backend: str  # what moves the rows: "shm", "gloo" or "nccl"

    def send(self, op: int, layer: int = 0, tag: int = 0, version: int = 0, counts: Sequence[int] = (),
             rows: Tensor | None = None, out: Tensor | None = None) -> int: ...

    def recv_result(self, tag: int) -> Result: ...

    def send_control(self, op: int, layer: int, version: int, payload: bytes) -> None:
        """A message with a byte payload and no answer (OP_HINT)."""

    def close(self) -> None: ...
