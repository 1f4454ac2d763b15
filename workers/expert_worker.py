"""ExpertWorker: a Ray actor holding some experts' w1/w2/w3 for every layer, pinned to its own GPU when the
cluster has GPUs. After one ``start_loop`` call it is driven only by the process group: the coordinator's
control messages say what comes next (forward all layers, heartbeat, shutdown, rejoin), so there is no Ray
call per step and none per layer.

Global vs local expert ids: ``expert_ids[j]`` is the global id of local expert j; rows arrive grouped by
local id, with ``counts[j]`` rows for local expert j.
"""

from __future__ import annotations

import logging
import os
import threading
import time
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
    WorkerLink,
    join_group,
    leave_group,
)

log = logging.getLogger("moe_cluster.worker")


def actor_device() -> torch.device:
    """The GPU Ray assigned to this actor (visible as cuda:0), else the CPU."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


class ExpertWorker:
    def __init__(self, engine_cfg: EngineConfig, expert_ids: tuple[int, ...], worker_index: int,
                 threads: int) -> None:
        torch.set_num_threads(threads)
        started = time.perf_counter()
        self.worker_index = worker_index
        self.model_cfg = ModelConfig.from_file(engine_cfg.model)
        self.dtype = engine_dtype(self.model_cfg, engine_cfg)
        self.device = actor_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        ckpt = Checkpoint(engine_cfg.model)
        self.experts = load_expert_weights(ckpt, self.model_cfg, expert_ids, self.dtype, self.device,
                                           progress=False)
        self.files_opened = list(ckpt.files_opened)
        self.load_seconds = time.perf_counter() - started
        self.link: WorkerLink | None = None
        self.rank: int | None = None
        self._thread: threading.Thread | None = None
        self.loop_error: str | None = None
        self.steps = 0
        self.compute_seconds = 0.0
        log.info("expert worker %d loaded experts %s on %s in %.1fs", worker_index, list(expert_ids),
                 self.device, self.load_seconds)

    def info(self) -> dict[str, Any]:
        return {"worker_index": self.worker_index, "experts": list(self.experts.expert_ids),
                "node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "device": str(self.device), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "files_opened": self.files_opened, "load_seconds": self.load_seconds}

    def join(self, rdv: Rendezvous, rank: int) -> None:
        """Join the cluster's process group (blocks until every member has joined)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"expert worker {self.worker_index} is still in its loop; stop it first")
        join_group(rdv, rank)
        self.rank = rank
        self.link = WorkerLink(rdv, rank, self.device)
        self.loop_error = None

    def start_loop(self) -> None:
        if self.link is None:
            raise RuntimeError("join the process group before starting the loop")
        self._thread = threading.Thread(target=self._loop, name=f"expert-worker-{self.worker_index}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        link = self.link
        assert link is not None
        hidden, n_local = self.model_cfg.hidden_size, self.experts.n_local_experts
        try:
            while True:
                op, layers, _, _ = link.recv_control()
                if op == OP_FORWARD:
                    for layer in range(layers):
                        counts = link.recv_counts()[:n_local]
                        rows = link.recv_rows(sum(counts), hidden, self.dtype)
                        started = time.perf_counter()
                        out = self.experts.run_grouped(layer, rows, counts)
                        if out.is_cuda:
                            torch.cuda.synchronize()
                        self.compute_seconds += time.perf_counter() - started
                        link.send_results(out)
                    self.steps += 1
                elif op == OP_NOOP:
                    continue
                elif op in (OP_SHUTDOWN, OP_REJOIN):
                    break
                else:
                    raise RuntimeError(f"unknown control op {op}")
        except Exception as err:  # the coordinator learns of it through ping() and the failed collective
            self.loop_error = f"{type(err).__name__}: {err}".splitlines()[0]
            log.warning("expert worker %d left its loop: %s", self.worker_index, self.loop_error)
        finally:
            self.link = None
            leave_group()

    def ping(self) -> dict[str, Any]:
        loop_alive = self._thread is not None and self._thread.is_alive()
        return {"loop_alive": loop_alive, "error": self.loop_error, "steps": self.steps}

    def timings(self) -> dict[str, float]:
        return {"compute": self.compute_seconds, "steps": float(self.steps)}

    def reset_timings(self) -> None:
        self.compute_seconds = 0.0
        self.steps = 0

    def wait_loop_exit(self, timeout_s: float) -> bool:
        """Wait for the loop to end (after a shutdown or rejoin control message)."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self._thread is None or not self._thread.is_alive()

