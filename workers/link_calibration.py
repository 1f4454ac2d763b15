"""What one layer's exchange with the workers costs on this machine, beyond the expert calls: measured on the real
code, for ``moe-cluster plan``'s step model (cluster/planning/plan.py reads ``costs["exchange_ms"]``).

W expert loops (workers/expert_loop.py), each in a process of its own as a pool's workers are, serve shared-memory
links (cluster/links/shm.py) with experts that hand their rows back unchanged; one coordinator end per loop sends
a layer's rows to all W and waits for all W results, as a coordinator's layer does. The median round of many is
the exchange time for W workers: packing and unpacking, the sockets, waking W processes and their loops, and the
cores those processes share.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
import uuid
from multiprocessing.synchronize import Event
from typing import Any

import torch
from torch import Tensor

from cluster.links.protocol import OP_WORK, LinkSpec
from cluster.links.shm import ShmCoordinatorEnd
from workers.expert_loop import ExpertLoop

ROUNDS = 200
DECODE_ROWS = 16  # rows per worker in a round: a decode step's share at a few dozen sequences


class _EchoExperts:
    """Experts that return their rows: the loop's own cost, without any expert's."""

    latest = 0

    def holds(self, version: int) -> bool:
        return version == 0

    def run(self, version: int, layer: int, rows: Tensor, counts: list[int]) -> Tensor:
        return rows

    def in_use(self, oldest: int | None) -> None:
        pass

    def hint(self, version: int, layer: int, experts: list[int]) -> None:
        pass


def _serve(address: str, spec: LinkSpec, listening: Event) -> None:
    """A worker process: one expert loop until its links close and it is terminated."""
    torch.set_num_threads(1)
    loop = ExpertLoop(address, spec, _EchoExperts(), num_layers=1, merge_wait_s=0.0)
    listening.set()
    loop.run()


def exchange_ms(hidden: int, dtype: str, workers: tuple[int, ...], rows: int = DECODE_ROWS,
                rounds: int = ROUNDS) -> dict[str, Any]:
    """{"exchange_ms": {W: ms of one layer's round trip to W workers}} for each W in ``workers``."""
    spec = LinkSpec(hidden=hidden, dtype=dtype, max_local=1)
    context = multiprocessing.get_context("spawn")  # as fresh as a Ray worker; fork would copy this process
    run_id = uuid.uuid4().hex[:8]
    addresses = [f"moe-cluster/calibration-{run_id}/worker-{w}/{os.getpid()}" for w in range(max(workers))]
    procs, ends = [], []
    try:
        for address in addresses:
            listening = context.Event()
            proc = context.Process(target=_serve, args=(address, spec, listening), daemon=True)
            proc.start()
            procs.append((proc, listening))
        for (proc, listening), address in zip(procs, addresses, strict=True):
            if not listening.wait(120):
                raise RuntimeError(f"link calibration: worker process {proc.pid} did not start")
            ends.append(ShmCoordinatorEnd(address, spec))
        x = torch.randn(rows, hidden, dtype=spec.torch_dtype)
        outs = [torch.empty_like(x) for _ in ends]
        measured: dict[str, float] = {}
        tag = 0
        for count in workers:
            samples = []
            for _ in range(rounds + rounds // 10):  # the first tenth warms up
                started = time.perf_counter()
                for end, out in zip(ends[:count], outs, strict=False):
                    end.send(OP_WORK, layer=0, tag=tag, counts=[rows], rows=x, out=out)
                for end in ends[:count]:
                    end.recv_result(tag)
                samples.append(time.perf_counter() - started)
                tag += 1
            measured[str(count)] = 1000 * statistics.median(samples[rounds // 10:])
        return {"exchange_ms": measured, "exchange_rows": rows}
    finally:
        for end in ends:
            end.close()
        for proc, _ in procs:
            proc.terminate()
            proc.join(10)
