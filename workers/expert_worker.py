"""ExpertWorker: a Ray actor holding some experts' w1/w2/w3 for every layer, pinned to its own GPU when the
pool has GPUs. After ``start`` it is driven only by its links (workers/expert_loop.py): no Ray call per step and
none per layer; Ray calls are for the pool (start, ping, stats) and for setting up process-group links.

Global vs local expert ids: ``expert_ids[j]`` is the global id of local expert slot j; rows arrive grouped by
local slot, with ``counts[j]`` rows for slot j.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from typing import Any

import ray
import torch
import torch.distributed as dist

from cluster.checkpoint import Checkpoint, load_expert_weights
from cluster.config import ModelConfig
from cluster.engine_config import EngineConfig
from cluster.errors import first_line
from cluster.exchange import LinkSpec, PgWorkerEnd, pair_group
from cluster.loader import engine_dtype
from cluster.moe import LocalExperts
from workers.expert_loop import ExpertLoop, pick_address

log = logging.getLogger("moe_cluster.worker")


def actor_device() -> torch.device:
    """The GPU Ray assigned to this actor (visible as cuda:0), else the CPU."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


class ExpertWorker:
    """The weights load on a thread of their own while Ray calls are answered; then the loop runs on a daemon
    thread (a process ending must never wait for it), the only one issuing torch ops from there on."""

    def __init__(self, engine_cfg: EngineConfig, expert_ids: tuple[int, ...], worker_index: int, generation: int,
                 pool_id: str, threads: int, spec: LinkSpec, merge_wait_s: float) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.worker_index = worker_index
        self.generation = generation
        self.expert_ids = tuple(expert_ids)
        self.spec = spec
        self.merge_wait_s = merge_wait_s
        self.threads = threads
        self.address = pick_address(pool_id, worker_index, generation)
        self.loop: ExpertLoop | None = None
        self.loop_error: str | None = None
        loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"expert-worker-{worker_index}-load")
        self._loaded = loader.submit(self._load, engine_cfg, threads)
        loader.shutdown(wait=False)
        self._running: threading.Thread | None = None

    def _load(self, engine_cfg: EngineConfig, threads: int) -> None:
        torch.set_num_threads(threads)
        started = time.perf_counter()
        model_cfg = ModelConfig.from_file(engine_cfg.model)
        self.num_layers = model_cfg.num_layers
        self.device = actor_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        ckpt = Checkpoint(engine_cfg.model)
        self.experts: LocalExperts = load_expert_weights(ckpt, model_cfg, self.expert_ids,
                                                         engine_dtype(model_cfg, engine_cfg), self.device,
                                                         progress=False)
        self.files_opened = list(ckpt.files_opened)
        self.load_seconds = time.perf_counter() - started
        log.info("expert worker %d loaded experts %s on %s in %.1fs", self.worker_index, list(self.expert_ids),
                 self.device, self.load_seconds)

    def _run_experts(self, layer: int, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        rows = rows.to(self.device, non_blocking=True)
        out = self.experts.run_grouped(layer, rows, torch.tensor(counts[: self.experts.n_local_experts]))
        if out.is_cuda:
            torch.cuda.synchronize()
        return out

    # ------------------------------------------------------------------------------------------ Ray methods

    def start(self) -> dict[str, Any]:
        """Wait for the weights (re-raises a failed load), start the loop, and say where it listens."""
        self._loaded.result()
        if self.loop is None:
            self.loop = ExpertLoop(self.address, self.spec, self._run_experts, lambda: 0, self.num_layers,
                                   self.merge_wait_s)
            self._running = threading.Thread(target=self._run_loop, name=f"expert-loop-{self.worker_index}",
                                             daemon=True)
            self._running.start()
        return {"worker_index": self.worker_index, "experts": list(self.expert_ids), "address": self.address,
                "node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "device": str(self.device), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "files_opened": self.files_opened, "load_seconds": self.load_seconds}

    def _run_loop(self) -> None:
        assert self.loop is not None
        torch.set_num_threads(self.threads)  # per thread on some builds: set it where the experts run
        try:
            self.loop.run()
        except Exception as err:  # the pool sees it in ping(); coordinators see their links close
            self.loop_error = f"{type(err).__name__}: {first_line(err)}"
            log.error("expert worker %d: its loop failed: %s", self.worker_index, self.loop_error)

    def open_pg_link(self, host: str, port: int, key: str, backend: str) -> None:
        """Join a coordinator's process group of two (it joins as rank 0 at the same time)."""
        assert self.loop is not None, "start the worker first"
        import datetime

        store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=self.spec.timeout_s))
        group = pair_group(store, key, 1, backend, self.spec.timeout_s)
        self.loop.add_link(PgWorkerEnd(group, self.spec, self.device))

    def ping(self) -> dict[str, Any]:
        alive = self._running is not None and self._running.is_alive()
        return {"loop_alive": alive, "error": self.loop_error, "links": len(self.loop.links) if self.loop else 0}

    def stats(self) -> dict[str, Any]:
        return {"worker_index": self.worker_index, "generation": self.generation,
                **(self.loop.stats.snapshot() if self.loop else {})}

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.stop()
