"""ExpertWorker: a Ray actor holding some experts' w1/w2/w3 for every layer, pinned to its own GPU when the
cluster has GPUs. After one ``start_loop`` call it is driven only by the process group: the coordinator's
control messages say what comes next (forward all layers, heartbeat, shutdown, rejoin), so there is no Ray
call per step and none per layer.

Global vs local expert ids: ``expert_ids[j]`` is the global id of local expert j; rows arrive grouped by
local id, with ``counts[j]`` rows for local expert j.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
import torch

from cluster.checkpoint import Checkpoint, load_expert_weights
from cluster.config import ModelConfig
from cluster.engine_config import EngineConfig
from cluster.loader import engine_dtype
from cluster.transport import (
    OP_FORWARD,
    OP_NOOP,
    OP_REJOIN,
    OP_SHUTDOWN,
    Rendezvous,
    RowLayout,
    WorkerLink,
    join_group,
    leave_group,
)

log = logging.getLogger("moe_cluster.worker")


def row_layout(model_cfg: ModelConfig, dtype: torch.dtype, rdv: Rendezvous) -> RowLayout:
    return RowLayout(model_cfg.hidden_size, dtype, rdv.max_local_experts, rdv.inline_limit_bytes)


def actor_device() -> torch.device:
    """The GPU Ray assigned to this actor (visible as cuda:0), else the CPU."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


class ExpertWorker:
    """All torch work of the worker (loading, joining, the loop) runs on one compute thread, fed by a job
    queue: Ray may run actor methods on other threads, and CPU intra-op parallelism issued from two threads
    of one process is several times slower."""

    def __init__(self, engine_cfg: EngineConfig, expert_ids: tuple[int, ...], worker_index: int,
                 threads: int) -> None:
        self.worker_index = worker_index
        self.expert_ids = tuple(expert_ids)
        self.link: WorkerLink | None = None
        self.rank: int | None = None
        self.loop_error: str | None = None
        self.in_loop = False
        self.layers_run = 0
        self.compute_seconds = 0.0
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run_jobs, name=f"expert-worker-{worker_index}", daemon=True)
        self._thread.start()
        self._loaded = self._submit(lambda: self._load(engine_cfg, threads))

    # --------------------------------------------------------------------------------- compute thread

    def _run_jobs(self) -> None:
        while True:
            self._jobs.get()()

    def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def job() -> None:
            try:
                future.set_result(fn())
            except BaseException as err:
                future.set_exception(err)

        self._jobs.put(job)
        return future

    def _load(self, engine_cfg: EngineConfig, threads: int) -> None:
        torch.set_num_threads(threads)
        started = time.perf_counter()
        self.model_cfg = ModelConfig.from_file(engine_cfg.model)
        self.dtype = engine_dtype(self.model_cfg, engine_cfg)
        self.device = actor_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        ckpt = Checkpoint(engine_cfg.model)
        self.experts = load_expert_weights(ckpt, self.model_cfg, self.expert_ids, self.dtype, self.device,
                                           progress=False)
        self.files_opened = list(ckpt.files_opened)
        self.load_seconds = time.perf_counter() - started
        log.info("expert worker %d loaded experts %s on %s in %.1fs", self.worker_index, list(self.expert_ids),
                 self.device, self.load_seconds)

    # ---------------------------------------------------------------------------------- Ray methods

    def info(self) -> dict[str, Any]:
        self._loaded.result()  # waits for the weights; re-raises a failed load
        return {"worker_index": self.worker_index, "experts": list(self.expert_ids),
                "node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "device": str(self.device), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "files_opened": self.files_opened, "load_seconds": self.load_seconds}

    def join(self, rdv: Rendezvous, rank: int) -> None:
        """Join the cluster's process group (blocks until every member has joined). After a failure the
        old loop may still be ending: wait for it first."""
        if not self.wait_loop_exit(rdv.timeout_s):
            raise RuntimeError(f"expert worker {self.worker_index} is still in its loop")

        def do_join() -> None:
            join_group(rdv, rank)
            self.rank = rank
            self.link = WorkerLink(rdv, rank, self.device, row_layout(self.model_cfg, self.dtype, rdv))
            self.loop_error = None

        self._submit(do_join).result()

    def start_loop(self) -> None:
        if self.link is None:
            raise RuntimeError("join the process group before starting the loop")
        self.in_loop = True
        self._submit(self._loop)

    def _loop(self) -> None:
        link = self.link
        assert link is not None
        n_local = self.experts.n_local_experts
        try:
            while True:
                work = link.next_work()
                if work.op == OP_FORWARD:
                    assert work.counts is not None and work.rows is not None
                    started = time.perf_counter()
                    out = self.experts.run_grouped(work.layer, work.rows, torch.tensor(work.counts[:n_local]))
                    if out.is_cuda:
                        torch.cuda.synchronize()
                    self.compute_seconds += time.perf_counter() - started
                    link.send_results(out)
                    self.layers_run += 1
                elif work.op == OP_NOOP:
                    continue
                elif work.op in (OP_SHUTDOWN, OP_REJOIN):
                    break
                else:
                    raise RuntimeError(f"unknown control op {work.op}")
        except Exception as err:  # the coordinator learns of it through ping() and the failed collective
            self.loop_error = f"{type(err).__name__}: {err}".splitlines()[0]
            log.warning("expert worker %d left its loop: %s", self.worker_index, self.loop_error)
        finally:
            self.link = None
            self.in_loop = False
            leave_group()

    def ping(self) -> dict[str, Any]:
        return {"loop_alive": self.in_loop, "error": self.loop_error, "layers_run": self.layers_run}

    def timings(self) -> dict[str, float]:
        return {"compute": self.compute_seconds, "layers_run": float(self.layers_run)}

    def reset_timings(self) -> None:
        self.compute_seconds = 0.0
        self.layers_run = 0

    def wait_loop_exit(self, timeout_s: float) -> bool:
        """Wait for the loop to end (after a shutdown or rejoin control message)."""
        deadline = time.monotonic() + timeout_s
        while self.in_loop and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.in_loop
