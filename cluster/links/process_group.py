"""The process-group link (see exchange.py): a torch.distributed group of exactly two members (gloo between
CPUs, NCCL between GPUs), for links across nodes or between GPUs."""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from cluster.errors import first_line
from cluster.links.protocol import (
    INLINE,
    OP_BYE,
    OP_HINT,
    OP_RESULT,
    OP_WORK,
    Header,
    LinkClosed,
    LinkSpec,
    Message,
    Result,
    check_result,
    result_of,
)


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

    def send_control(self, op: int, layer: int, version: int, payload: bytes) -> None:
        """Issue 23: a hint's bytes follow its header as a uint8 tensor (rows = their length)."""
        header = Header(op, layer, 0, version, len(payload), INLINE, stamps=(time.monotonic_ns(), 0, 0))
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        try:
            self._sends.append(self.group.send([self._header_tensor(header)], 1, 0))
            self._sends.append(self.group.send([data], 1, 0))
        except Exception as err:
            raise LinkClosed(f"send failed: {first_line(err)}") from None

    def recv_result(self, tag: int) -> Result:
        if tag not in self._expected:
            raise LinkClosed(f"no message {tag} is waiting for results")
        words, header_recv, out, rows_recv = self._expected.pop(tag)
        _wait(header_recv, "receiving a result header")
        header = Header.unpack(self.spec, words.tolist())
        check_result(header, tag, out.shape[0])
        if rows_recv is not None:
            _wait(rows_recv, "receiving results")
        sends, self._sends = self._sends, []
        for work in sends:
            _wait(work, "sending rows")
        return result_of(header)

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
                if header.op == OP_HINT:  # issue 23: its payload follows the header
                    data = torch.empty(header.rows, dtype=torch.uint8, device=self.device)
                    _wait(self.group.recv([data], 0, 0), "receiving a hint")
                    self._inbox.put(Message(header, None, time.monotonic_ns(), bytes(data.cpu().numpy())))
                    os.write(self._notify_w, b"m")
                    continue
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
