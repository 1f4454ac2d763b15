"""The process-group link (see protocol.py): a torch.distributed group of exactly two members (gloo between
CPUs, NCCL between GPUs), for links across nodes or between GPUs. The coordinator's end and what both ends share;
the worker's end is workers/link_ends.py."""

from __future__ import annotations

import contextlib
import datetime
import struct
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
    OP_WORK,
    Header,
    LinkClosed,
    LinkSpec,
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


def wait_work(work: Any, what: str) -> None:
    try:
        work.wait()
    except Exception as err:  # a dead or stuck peer
        raise LinkClosed(f"{what} failed: {first_line(err)}") from None


class PgCoordinatorEnd:
    """The coordinator's end of a process-group link: every receive is posted at send time, so results land in
    place while the coordinator does other work."""

    kind = "pg"

    def __init__(self, group: Any, spec: LinkSpec, device: torch.device, backend: str) -> None:
        self.backend = backend  # "gloo" or "nccl"
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
        wait_work(header_recv, "receiving a result header")
        header = Header.unpack(self.spec, words.tolist())
        check_result(header, tag, out.shape[0])
        if rows_recv is not None:
            wait_work(rows_recv, "receiving results")
        sends, self._sends = self._sends, []
        for work in sends:
            wait_work(work, "sending rows")
        return result_of(header)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send(OP_BYE)
            for work in self._sends:
                work.wait()
        abort_group(self.group)


def abort_group(group: Any) -> None:
    with contextlib.suppress(Exception):
        group.abort()
