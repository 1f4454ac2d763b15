"""Links between one coordinator and one expert worker: the M:N exchange is one link per (coordinator, worker)
pair, so coordinators attach and detach at any time without touching anyone else's links.

Every message is a fixed-size header (int64 words: op, layer, tag, map version, rows, where the rows are, slot,
three clock stamps, then one row count per local expert slot) followed, for WORK and RESULT, by its rows. The
stamps (CLOCK_MONOTONIC nanoseconds, one clock for every process of a node) say when a WORK was sent, and when
its worker read it, started and finished it: on one node the time a layer waits for its experts splits exactly
into wake-up, waiting at the worker, expert compute, and the way back. The coordinator numbers
its messages with a ``tag``; a worker answers each WORK with a RESULT carrying the same tag, in order.

Two kinds of link, chosen per pair when the coordinator attaches:
  * ``shm``: coordinator and worker on one node, tensors on CPU. Headers travel over a Unix socket (abstract
    namespace); rows and results are copied into two shared-memory buffers (memfd, handed to the worker over the
    socket with SCM_RIGHTS; nothing to clean up, they vanish with the last process that maps them), ``slots``
    fixed-size slots each, slot = tag % slots. A message larger than a slot travels inline on the socket. One
    wake-up per message, and a closed socket is a dead peer at once.
  * ``pg``: anywhere else - a torch.distributed process group of exactly two members (gloo on CPUs, NCCL on
    GPUs), built directly from a store, a rank and a size. The worker's end receives on a thread of its own and
    signals a pipe, so the worker's loop waits on both kinds of link alike.

Shape legend: R rows of one message, H hidden, L local expert slots of the worker.
"""

from __future__ import annotations

import contextlib
import datetime
import mmap
import os
import queue
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from cluster.config import parse_dtype
from cluster.errors import first_line

# Header ops
OP_NOOP = 0  # heartbeat: keeps an idle link's peers sure of each other
OP_WORK = 1  # coordinator -> worker: a layer's rows, grouped by local expert slot
OP_RESULT = 2  # worker -> coordinator: the expert outputs of one WORK, same order
OP_BYE = 3  # coordinator -> worker: this link is closing
# Where a message's rows are
IN_SLOT, INLINE = 1, 2
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
    slot_bytes: int = 1 << 20  # rows up to this size travel in shared memory, larger ones inline (shm links)
    timeout_s: float = 60.0  # a peer silent this long in the middle of an exchange is dead

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


@dataclass
class Message:
    """A message a worker read: its header, and for WORK its rows (R, H)."""

    header: Header
    rows: Tensor | None = None
    read_ns: int = 0  # when the worker read it

    @property
    def op(self) -> int:
        return self.header.op

    @property
    def layer(self) -> int:
        return self.header.layer

    @property
    def tag(self) -> int:
        return self.header.tag

    @property
    def counts(self) -> list[int]:
        return list(self.header.counts)


@dataclass(frozen=True)
class Result:
    """What came back with a RESULT: the worker's map version and the clock stamps of its message's trip."""

    version: int
    read_ns: int  # the worker read the WORK
    started_ns: int  # the worker started its expert call (after any merge wait or earlier work)
    finished_ns: int  # ... and finished it
    arrived_ns: int  # the coordinator had the results


def as_bytes(t: Tensor) -> memoryview:
    """A contiguous CPU tensor's memory as bytes (any dtype, bfloat16 included)."""
    return t.contiguous().view(-1).view(torch.uint8).numpy().data


# ------------------------------------------------------------------------------------------ shared memory

class _Socket:
    """Exact-size reads and writes on a stream socket; every failure is LinkClosed."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self.sock = sock
        self.timeout_s = timeout_s

    def send(self, *parts: bytes | memoryview) -> None:
        """Send every part, in order, in as few system calls as the socket allows."""
        views = [memoryview(p).cast("B") for p in parts]
        try:
            while views:
                sent = self.sock.sendmsg(views)
                while views and sent >= len(views[0]):
                    sent -= len(views.pop(0))
                if views:
                    views[0] = views[0][sent:]
        except OSError as err:
            raise LinkClosed(f"send failed: {err}") from None

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly; the socket's timeout bounds each wait."""
        got, n = 0, len(view)
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise LinkClosed(f"no answer within {self.timeout_s:g}s") from None
            except OSError as err:
                raise LinkClosed(f"receive failed: {err}") from None
            if k == 0:
                raise LinkClosed("the peer closed the link")
            got += k

    def recv(self, n: int) -> bytearray:
        buf = bytearray(n)
        self.recv_into(memoryview(buf))
        return buf

    def has_data(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _shared_buffer(fd: int, size: int) -> Tensor:
    """A uint8 tensor over ``size`` bytes of the shared memory behind ``fd`` (closed here: the map keeps it)."""
    mapped = mmap.mmap(fd, size)
    os.close(fd)
    return torch.frombuffer(mapped, dtype=torch.uint8)


class ShmCoordinatorEnd:
    """The coordinator's end of a shared-memory link: it creates both buffers and hands them over."""

    kind = "shm"

    def __init__(self, address: str, spec: LinkSpec) -> None:
        self.spec = spec
        size = spec.slots * spec.slot_bytes
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(spec.timeout_s)
        try:
            sock.connect("\0" + address)
        except OSError as err:
            sock.close()
            raise LinkClosed(f"cannot connect to {address}: {err}") from None
        fds = [os.memfd_create("moe-cluster-rows"), os.memfd_create("moe-cluster-results")]
        for fd in fds:
            os.ftruncate(fd, size)
        self.io = _Socket(sock, spec.timeout_s)
        try:
            socket.send_fds(sock, [struct.pack("<q", size)], fds)
        except OSError as err:
            raise LinkClosed(f"cannot hand over the shared buffers: {err}") from None
        self.rows_buf, self.results_buf = (_shared_buffer(fd, size) for fd in fds)
        self._expected: deque[tuple[int, Tensor]] = deque()  # (tag, where its results go), in send order
        self._arrived: dict[int, Result] = {}  # results read ahead of their recv_result

    def _slot(self, buf: Tensor, tag: int, nbytes: int) -> Tensor:
        start = (tag % self.spec.slots) * self.spec.slot_bytes
        return buf[start:start + nbytes]

    def send(self, op: int, layer: int = 0, tag: int = 0, version: int = 0, counts: Sequence[int] = (),
             rows: Tensor | None = None, out: Tensor | None = None) -> int:
        """Send a message (a WORK's results will be copied into ``out``); returns its sent stamp (ns)."""
        n = 0 if rows is None else rows.shape[0]
        nbytes = self.spec.row_bytes(n)
        header = Header(op, layer, tag, version, n, counts=tuple(counts))
        if rows is not None and n and nbytes <= self.spec.slot_bytes:
            self._slot(self.rows_buf, tag, nbytes).copy_(rows.reshape(-1).view(torch.uint8))
            header = replace(header, where=IN_SLOT, slot=tag % self.spec.slots, stamps=(time.monotonic_ns(), 0, 0))
            self.io.send(header.pack(self.spec))
        elif rows is not None and n:
            # Rows too large for a slot go inline. A worker blocked writing large results to us would then never
            # read them, and we would block writing them: take every result still due first.
            while self._expected:
                self._read_result()
            header = replace(header, where=INLINE, stamps=(time.monotonic_ns(), 0, 0))
            self.io.send(header.pack(self.spec), as_bytes(rows))
        else:
            self.io.send(header.pack(self.spec))
        if op == OP_WORK:
            assert out is not None and out.shape[0] == n, "a WORK needs room for its results"
            self._expected.append((tag, out))
        return header.stamps[0]

    def _read_result(self) -> None:
        """Read the next result due (results come back in the order the work was sent)."""
        tag, out = self._expected.popleft()
        header = Header.unpack(self.spec, self.io.recv(self.spec.header_bytes))
        _check_result(header, tag, out.shape[0])
        if header.where == IN_SLOT:
            out.view(-1).view(torch.uint8).copy_(self._slot(self.results_buf, tag, self.spec.row_bytes(header.rows)))
        elif header.rows:
            self.io.recv_into(as_bytes(out))
        self._arrived[tag] = _result(header)

    def recv_result(self, tag: int) -> Result:
        """Wait until the results of ``tag`` are in the ``out`` given to its send."""
        while tag not in self._arrived:
            if not self._expected:
                raise LinkClosed(f"no message {tag} is waiting for results")
            self._read_result()
        return self._arrived.pop(tag)

    def close(self) -> None:
        with contextlib.suppress(LinkClosed):
            self.io.send(Header(OP_BYE).pack(self.spec))
        self.io.close()


def _check_result(header: Header, tag: int, rows: int) -> None:
    if header.op != OP_RESULT or header.tag != tag or header.rows != rows:
        raise LinkClosed(f"expected the result of message {tag} ({rows} rows), got op {header.op} tag {header.tag} "
                         f"with {header.rows} rows")


def _result(header: Header) -> Result:
    read, started, finished = header.stamps
    return Result(header.version, read, started, finished, time.monotonic_ns())


class ShmWorkerEnd:
    """A worker's end of a shared-memory link, made from a connection its listening socket accepted."""

    kind = "shm"

    def __init__(self, sock: socket.socket, spec: LinkSpec) -> None:
        self.spec = spec
        sock.settimeout(spec.timeout_s)
        msg, fds, _, _ = socket.recv_fds(sock, 8, 2)
        if len(fds) != 2 or len(msg) != 8:
            sock.close()
            raise LinkClosed("a peer connected without handing over its shared buffers")
        size = struct.unpack("<q", msg)[0]
        self.rows_buf, self.results_buf = (_shared_buffer(fd, size) for fd in fds)
        self.io = _Socket(sock, spec.timeout_s)

    def fileno(self) -> int:
        return self.io.sock.fileno()

    def read(self) -> list[Message]:
        """Every whole message available now (at least one: call when the socket is readable)."""
        messages = [self._read_one()]
        while self.io.has_data():
            messages.append(self._read_one())
        return messages

    def _read_one(self) -> Message:
        header = Header.unpack(self.spec, self.io.recv(self.spec.header_bytes))
        read_ns = time.monotonic_ns()
        if header.op != OP_WORK:
            return Message(header, None, read_ns)
        n, nbytes = header.rows, self.spec.row_bytes(header.rows)
        if header.where == IN_SLOT:
            start = header.slot * self.spec.slot_bytes
            rows = self.rows_buf[start:start + nbytes].view(self.spec.torch_dtype).view(n, self.spec.hidden)
        else:
            rows = torch.empty(n, self.spec.hidden, dtype=self.spec.torch_dtype)
            if n:
                self.io.recv_into(as_bytes(rows))
        return Message(header, rows, read_ns)

    def send_result(self, message: Message, version: int, out: Tensor, started_ns: int) -> None:
        n, tag = out.shape[0], message.tag
        nbytes = self.spec.row_bytes(n)
        header = Header(OP_RESULT, message.layer, tag, version, n)
        if nbytes <= self.spec.slot_bytes:
            start = (tag % self.spec.slots) * self.spec.slot_bytes
            if n:
                self.results_buf[start:start + nbytes].copy_(out.contiguous().view(-1).view(torch.uint8))
            stamps = (message.read_ns, started_ns, time.monotonic_ns())
            self.io.send(replace(header, where=IN_SLOT, slot=tag % self.spec.slots, stamps=stamps).pack(self.spec))
        else:
            stamps = (message.read_ns, started_ns, time.monotonic_ns())
            self.io.send(replace(header, where=INLINE, stamps=stamps).pack(self.spec), as_bytes(out))

    def close(self) -> None:
        self.io.close()


def listen(address: str) -> socket.socket:
    """A worker's listening socket for shared-memory links (abstract Unix namespace: nothing on disk)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind("\0" + address)
    sock.listen(64)
    return sock


# ------------------------------------------------------------------------------------ process group of two

def pair_group(store: dist.Store, key: str, rank: int, backend: str, timeout_s: float) -> Any:
    """A process group of exactly two members, built directly (no default group): rank 0 is the coordinator."""
    prefixed = dist.PrefixStore(f"moe-cluster/link/{key}", store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, 2, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(prefixed, rank, 2, timeout)


def _wait(work: Any, what: str) -> None:
    try:
        work.wait()
    except Exception as err:  # a dead or stuck peer
        raise LinkClosed(f"{what} failed: {first_line(err)}") from None


class PgCoordinatorEnd:
    """The coordinator's end of a process-group link: every receive is posted at send time, so results land in
    place while the coordinator does other work."""

    kind = "pg"

    def __init__(self, group: Any, spec: LinkSpec, device: torch.device) -> None:
        self.group = group
        self.spec = spec
        self.device = device
        self._sends: list[Any] = []
        self._expected: dict[int, tuple[Tensor, Any, Tensor, Any]] = {}  # tag -> (header, its recv, out, recv)

    def _header_tensor(self, header: Header) -> Tensor:
        words = struct.unpack(f"<{self.spec.header_words}q", header.pack(self.spec))
        return torch.tensor(words, dtype=torch.long, device=self.device)

    def send(self, op: int, layer: int = 0, tag: int = 0, version: int = 0, counts: Sequence[int] = (),
             rows: Tensor | None = None, out: Tensor | None = None) -> int:
        n = 0 if rows is None else rows.shape[0]
        header = Header(op, layer, tag, version, n, INLINE, stamps=(time.monotonic_ns(), 0, 0),
                        counts=tuple(counts))
        try:
            self._sends.append(self.group.send([self._header_tensor(header)], 1, 0))
            if rows is not None and n:
                self._sends.append(self.group.send([rows.contiguous()], 1, 0))
            if op == OP_WORK:
                assert out is not None and out.shape[0] == n, "a WORK needs room for its results"
                words = torch.empty(self.spec.header_words, dtype=torch.long, device=self.device)
                header_recv = self.group.recv([words], 1, 0)
                rows_recv = self.group.recv([out], 1, 0) if n else None
                self._expected[tag] = (words, header_recv, out, rows_recv)
        except Exception as err:
            raise LinkClosed(f"send failed: {first_line(err)}") from None
        return header.stamps[0]

    def recv_result(self, tag: int) -> Result:
        if tag not in self._expected:
            raise LinkClosed(f"no message {tag} is waiting for results")
        words, header_recv, out, rows_recv = self._expected.pop(tag)
        _wait(header_recv, "receiving a result header")
        header = Header.unpack(self.spec, words.tolist())
        _check_result(header, tag, out.shape[0])
        if rows_recv is not None:
            _wait(rows_recv, "receiving results")
        sends, self._sends = self._sends, []
        for work in sends:
            _wait(work, "sending rows")
        return _result(header)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send(OP_BYE)
            for work in self._sends:
                work.wait()
        _abort(self.group)


def _abort(group: Any) -> None:
    with contextlib.suppress(Exception):
        group.abort()


class PgWorkerEnd:
    """A worker's end of a process-group link: a thread receives, the worker's loop waits on a pipe."""

    kind = "pg"

    def __init__(self, group: Any, spec: LinkSpec, device: torch.device) -> None:
        self.group = group
        self.spec = spec
        self.device = device
        self._inbox: queue.SimpleQueue[Message | LinkClosed] = queue.SimpleQueue()
        self._notify_r, self._notify_w = os.pipe()
        os.set_blocking(self._notify_r, False)
        self._closed = False
        threading.Thread(target=self._receive, name="moe-link-recv", daemon=True).start()

    def _receive(self) -> None:
        try:
            while not self._closed:
                words = torch.empty(self.spec.header_words, dtype=torch.long, device=self.device)
                _wait(self.group.recv([words], 0, 0), "receiving a header")
                header = Header.unpack(self.spec, words.tolist())
                rows = None
                if header.op == OP_WORK:
                    rows = torch.empty(header.rows, self.spec.hidden, dtype=self.spec.torch_dtype, device=self.device)
                    if header.rows:
                        _wait(self.group.recv([rows], 0, 0), "receiving rows")
                self._inbox.put(Message(header, rows, time.monotonic_ns()))
                os.write(self._notify_w, b"m")
                if header.op == OP_BYE:
                    return
        except LinkClosed as err:
            self._inbox.put(err)
            os.write(self._notify_w, b"x")

    def fileno(self) -> int:
        return self._notify_r

    def read(self) -> list[Message]:
        with contextlib.suppress(BlockingIOError):
            os.read(self._notify_r, 4096)
        messages: list[Message] = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return messages
            if isinstance(item, LinkClosed):
                if messages:  # deliver what came before the failure first
                    self._inbox.put(item)
                    os.write(self._notify_w, b"x")
                    return messages
                raise item
            messages.append(item)

    def send_result(self, message: Message, version: int, out: Tensor, started_ns: int) -> None:
        header = Header(OP_RESULT, message.layer, message.tag, version, out.shape[0], INLINE,
                        stamps=(message.read_ns, started_ns, time.monotonic_ns()))
        words = struct.unpack(f"<{self.spec.header_words}q", header.pack(self.spec))
        _wait(self.group.send([torch.tensor(words, dtype=torch.long, device=self.device)], 0, 0),
              "sending a result header")
        if out.shape[0]:
            _wait(self.group.send([out.contiguous()], 0, 0), "sending results")

    def close(self) -> None:
        self._closed = True
        _abort(self.group)
        for fd in (self._notify_r, self._notify_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class CoordinatorEnd(Protocol):
    kind: str

    def send(self, op: int, layer: int = 0, tag: int = 0, version: int = 0, counts: Sequence[int] = (),
             rows: Tensor | None = None, out: Tensor | None = None) -> int: ...

    def recv_result(self, tag: int) -> Result: ...

    def close(self) -> None: ...


class WorkerEnd(Protocol):
    kind: str

    def fileno(self) -> int: ...

    def read(self) -> list[Message]: ...

    def send_result(self, message: Message, version: int, out: Tensor, started_ns: int) -> None: ...

    def close(self) -> None: ...
