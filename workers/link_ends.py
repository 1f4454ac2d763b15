"""The worker's ends of its links (the coordinator's ends and the wire protocol: cluster/links/). The expert loop
(workers/expert_loop.py) waits on every end's ``fileno`` at once and reads whole messages.

Shape legend: R rows of one message, H hidden.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from cluster.links.process_group import abort_group, wait_work
from cluster.links.protocol import (
    IN_BUFFER,
    IN_SLOT,
    INLINE,
    OP_BYE,
    OP_HINT,
    OP_RESULT,
    OP_WORK,
    Header,
    LinkClosed,
    LinkSpec,
)
from cluster.links.shm import FramedSocket, shared_buffer


@dataclass
class Message:
    """A message a worker read: its header, and for WORK its rows (R, H)."""

    header: Header
    rows: Tensor | None = None
    read_ns: int = 0  # when the worker read it
    payload: bytes = b""  # OP_HINT (issue 23): its msgpack bytes

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


class WorkerEnd(Protocol):
    """A worker's end of a link: the loop waits on ``fileno`` and reads every whole message there is."""

    kind: str

    def fileno(self) -> int: ...

    def read(self) -> list[Message]: ...

    def send_result(self, message: Message, version: int, out: Tensor, started_ns: int) -> None: ...

    def close(self) -> None: ...


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
        self.rows_buf, self.results_buf = (shared_buffer(fd, size) for fd in fds)
        self.io = FramedSocket(sock, spec.timeout_s)

    def fileno(self) -> int:
        return self.io.sock.fileno()

    def read(self) -> list[Message]:
        """Every whole message available now (at least one: call when the socket is readable)."""
        messages = [self._read_one()]
        while self.io.has_data():
            messages.append(self._read_one())
        return messages

    def _read_one(self) -> Message:
        data, fds = self.io.recv_with_fds(self.spec.header_bytes)
        header = Header.unpack(self.spec, data)
        read_ns = time.monotonic_ns()
        if header.where != IN_BUFFER or header.op != OP_WORK or len(fds) != 1:
            for fd in fds:
                os.close(fd)
        if header.op == OP_HINT:  # issue 23: its payload follows the header
            return Message(header, None, read_ns, bytes(self.io.recv(header.rows)))
        if header.op != OP_WORK:
            return Message(header, None, read_ns)
        n, nbytes = header.rows, self.spec.row_bytes(header.rows)
        if header.where == IN_SLOT:
            start = header.slot * self.spec.slot_bytes
            rows = self.rows_buf[start:start + nbytes].view(self.spec.torch_dtype).view(n, self.spec.hidden)
        elif header.where == IN_BUFFER and len(fds) == 1:  # the message's own buffer: its results go back in it
            rows = shared_buffer(fds[0], nbytes).view(self.spec.torch_dtype).view(n, self.spec.hidden)
        elif n:
            raise LinkClosed(f"message {header.tag} has {n} rows in no buffer this link has (where={header.where})")
        else:
            rows = torch.empty(0, self.spec.hidden, dtype=self.spec.torch_dtype)
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
        else:  # the message came in a buffer of its own (nothing larger than a slot ever travels on the socket)
            assert message.header.where == IN_BUFFER and message.rows is not None
            message.rows.copy_(out)  # its rows are no longer needed: the expert call has read them
            stamps = (message.read_ns, started_ns, time.monotonic_ns())
            self.io.send(replace(header, where=IN_BUFFER, stamps=stamps).pack(self.spec))

    def close(self) -> None:
        self.io.close()


def listen(address: str) -> socket.socket:
    """A worker's listening socket for shared-memory links (abstract Unix namespace: nothing on disk)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind("\0" + address)
    sock.listen(64)
    return sock


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
                wait_work(self.group.recv([words], 0, 0), "receiving a header")
                header = Header.unpack(self.spec, words.tolist())
                rows = None
                payload = b""
                if header.op == OP_HINT:  # issue 23: its payload follows the header
                    data = torch.empty(header.rows, dtype=torch.uint8, device=self.device)
                    wait_work(self.group.recv([data], 0, 0), "receiving a hint")
                    payload = bytes(data.cpu().numpy())
                if header.op == OP_WORK:
                    rows = torch.empty(header.rows, self.spec.hidden, dtype=self.spec.torch_dtype, device=self.device)
                    if header.rows:
                        wait_work(self.group.recv([rows], 0, 0), "receiving rows")
                self._inbox.put(Message(header, rows, time.monotonic_ns(), payload))
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
        wait_work(self.group.send([torch.tensor(words, dtype=torch.long, device=self.device)], 0, 0),
              "sending a result header")
        if out.shape[0]:
            wait_work(self.group.send([out.contiguous()], 0, 0), "sending results")

    def close(self) -> None:
        self._closed = True
        abort_group(self.group)
        for fd in (self._notify_r, self._notify_w):
            with contextlib.suppress(OSError):
                os.close(fd)
