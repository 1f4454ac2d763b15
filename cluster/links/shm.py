"""The shared-memory link (see protocol.py): one node, CPU tensors; headers over an abstract Unix socket, rows
and results in two memfd buffers with one slot per message in flight. The coordinator's end and what both ends
share; the worker's end is workers/link_ends.py."""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from cluster.links.protocol import (
    IN_BUFFER,
    IN_SLOT,
    INLINE,
    OP_BYE,
    OP_WORK,
    Header,
    LinkClosed,
    LinkSpec,
    Result,
    check_result,
    result_of,
)


class FramedSocket:
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

    def send_fd(self, data: bytes, fd: int) -> None:
        """Send ``data`` with a file descriptor attached (SCM_RIGHTS)."""
        try:
            sent = socket.send_fds(self.sock, [data], [fd])
        except OSError as err:
            raise LinkClosed(f"send failed: {err}") from None
        if sent < len(data):
            self.send(data[sent:])

    def recv_with_fds(self, n: int) -> tuple[bytearray, list[int]]:
        """Exactly ``n`` bytes, and any file descriptors that came with them."""
        buf, fds = bytearray(), []
        while len(buf) < n:
            try:
                data, got, _, _ = socket.recv_fds(self.sock, n - len(buf), 1)
            except TimeoutError:
                raise LinkClosed(f"no answer within {self.timeout_s:g}s") from None
            except OSError as err:
                raise LinkClosed(f"receive failed: {err}") from None
            if not data:
                raise LinkClosed("the peer closed the link")
            buf += data
            fds += got
        return buf, fds

    def has_data(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def shared_buffer(fd: int, size: int) -> Tensor:
    """A uint8 tensor over ``size`` bytes of the shared memory behind ``fd`` (closed here: the map keeps it)."""
    mapped = mmap.mmap(fd, size)
    os.close(fd)
    return torch.frombuffer(mapped, dtype=torch.uint8)


def _message_buffer(rows: Tensor) -> tuple[int, Tensor]:
    """A fresh shared buffer holding ``rows``: (its file descriptor, to hand over and close, and its bytes)."""
    nbytes = rows.numel() * rows.element_size()
    fd = os.memfd_create("moe-cluster-message")
    os.ftruncate(fd, nbytes)
    buffer = torch.frombuffer(mmap.mmap(fd, nbytes), dtype=torch.uint8)
    buffer.copy_(rows.reshape(-1).view(torch.uint8))
    return fd, buffer


class ShmCoordinatorEnd:
    """The coordinator's end of a shared-memory link: it creates both buffers and hands them over."""

    kind = "shm"
    backend = "shm"

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
        self.io = FramedSocket(sock, spec.timeout_s)
        try:
            socket.send_fds(sock, [struct.pack("<q", size)], fds)
        except OSError as err:
            raise LinkClosed(f"cannot hand over the shared buffers: {err}") from None
        self.rows_buf, self.results_buf = (shared_buffer(fd, size) for fd in fds)
        # (tag, where its results go, the message's own buffer if it has one), in send order
        self._expected: deque[tuple[int, Tensor, Tensor | None]] = deque()
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
        buffer = None
        if rows is not None and n and nbytes <= self.spec.slot_bytes:
            self._slot(self.rows_buf, tag, nbytes).copy_(rows.reshape(-1).view(torch.uint8))
            header = replace(header, where=IN_SLOT, slot=tag % self.spec.slots, stamps=(time.monotonic_ns(), 0, 0))
            self.io.send(header.pack(self.spec))
        elif rows is not None and n:  # too large for a slot: a buffer of its own, for the rows and the results
            fd, buffer = _message_buffer(rows)
            try:
                header = replace(header, where=IN_BUFFER, stamps=(time.monotonic_ns(), 0, 0))
                self.io.send_fd(header.pack(self.spec), fd)
            finally:
                os.close(fd)
        else:
            self.io.send(header.pack(self.spec))
        if op == OP_WORK:
            assert out is not None and out.shape[0] == n, "a WORK needs room for its results"
            self._expected.append((tag, out, buffer))
        return header.stamps[0]

    def send_control(self, op: int, layer: int, version: int, payload: bytes) -> None:
        """Issue 23: a hint's few bytes go on the socket right after its header (rows = their length)."""
        header = Header(op, layer, 0, version, len(payload), INLINE, stamps=(time.monotonic_ns(), 0, 0))
        self.io.send(header.pack(self.spec), payload)

    def _read_result(self) -> None:
        """Read the next result due (results come back in the order the work was sent)."""
        tag, out, buffer = self._expected.popleft()
        header = Header.unpack(self.spec, self.io.recv(self.spec.header_bytes))
        check_result(header, tag, out.shape[0])
        if header.where == IN_SLOT:
            out.view(-1).view(torch.uint8).copy_(self._slot(self.results_buf, tag, self.spec.row_bytes(header.rows)))
        elif header.where == IN_BUFFER and buffer is not None:
            out.view(-1).view(torch.uint8).copy_(buffer)
        elif header.rows:
            raise LinkClosed(f"the results of message {tag} came in no buffer it has (where={header.where})")
        self._arrived[tag] = result_of(header)

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
