"""ExpertWorker: a Ray actor holding some experts' w1/w2/w3 in each layer, pinned to its own GPU when the
pool has GPUs. After ``start`` it is driven only by its links (workers/expert_loop.py): no Ray call per step and
none per layer; Ray calls are for the pool (start, ping, stats, rebalancing) and for setting up process-group links.

Global vs local expert ids: ``layer_experts[layer][j]`` is the global id of local expert slot j of that layer (of
the expert map version the worker started with; ``prepare`` loads another version's next to it); rows arrive
grouped by local slot, with ``counts[j]`` rows for slot j.
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

from cluster.engine.loader import engine_dtype
from cluster.engine_config import EngineConfig
from cluster.errors import first_line
from cluster.links.process_group import pair_group
from cluster.links.protocol import LinkSpec
from cluster.model.checkpoint import Checkpoint, load_layer_experts
from cluster.model.config import ModelConfig
from cluster.model.experts import LocalExperts
from workers.expert_cache import CacheStats, load_cached_experts
from workers.expert_loop import ExpertLoop, pick_address
from workers.link_ends import PgWorkerEnd
from workers.versioned_experts import VersionedExperts

log = logging.getLogger("moe_cluster.worker")


def actor_device() -> torch.device:
    """The GPU Ray assigned to this actor (visible as cuda:0), else the CPU."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


class ExpertWorker:
    """The weights load on a thread of their own while Ray calls are answered; then the loop runs on a daemon
    thread (a process ending must never wait for it), the only one running experts; a rebalance's weights load on
    the Ray call's thread meanwhile (``prepare``)."""

    def __init__(self, engine_cfg: EngineConfig, map_version: int, layer_experts: tuple[tuple[int, ...], ...],
                 worker_index: int, generation: int, pool_id: str, threads: int, spec: LinkSpec,
                 merge_wait_s: float, expert_cache_size: int = 0) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.worker_index = worker_index
        self.generation = generation
        self.engine_cfg = engine_cfg
        self.map_version = map_version
        self.layer_experts = tuple(tuple(ids) for ids in layer_experts)
        self.spec = spec
        self.merge_wait_s = merge_wait_s
        self.threads = threads
        # issue 23: experts per layer resident in device slots, the rest in a host store (0: all resident)
        self.expert_cache_size = expert_cache_size
        self.cache_stats = CacheStats()
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
        model_cfg = ModelConfig.from_file(engine_cfg.model_dir())
        self.model_cfg = model_cfg
        self.num_layers = model_cfg.num_layers
        self.device = actor_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        ckpt = Checkpoint(engine_cfg.model_dir())
        experts = self._load_experts(ckpt, self.layer_experts)
        self.experts = VersionedExperts(self.map_version, experts, model_cfg.num_experts, self.device,
                                        self.worker_index)
        self.files_opened = list(ckpt.files_opened)
        self.load_seconds = time.perf_counter() - started
        log.info("expert worker %d loaded experts %s (map version %d) on %s in %.1fs: %.1f MiB resident (%s)",
                 self.worker_index, self.hosted(), self.map_version, self.device, self.load_seconds,
                 experts.nbytes / 2**20, experts.quantization or "not quantized")

    def _load_experts(self, ckpt: Checkpoint, layer_experts: tuple[tuple[int, ...], ...],
                      have: LocalExperts | None = None) -> LocalExperts:
        """All-resident experts (reusing those ``have`` holds), or (issue 23) a cold cache over the checkpoint."""
        dtype = engine_dtype(self.model_cfg, self.engine_cfg)
        if self.expert_cache_size:
            if self.engine_cfg.expert_quantization is not None:
                raise ValueError("expert_cache_size and quantize_experts cannot be combined yet: the cache's host "
                                 "store is the full-precision checkpoint")
            return load_cached_experts(ckpt.model_dir, self.model_cfg, layer_experts, self.expert_cache_size, dtype,
                                       self.device, self.cache_stats)
        return load_layer_experts(ckpt, self.model_cfg, layer_experts, dtype, self.device, progress=False,
                                  have=have, quantize=self.engine_cfg.expert_quantization)

    def hosted(self) -> list[int]:
        return sorted({e for ids in self.layer_experts for e in ids})

    # ------------------------------------------------------------------------------------------ Ray methods

    def start(self) -> dict[str, Any]:
        """Wait for the weights (re-raises a failed load), start the loop, and say where it listens."""
        self._loaded.result()
        if self.loop is None:
            self.loop = ExpertLoop(self.address, self.spec, self.experts, self.num_layers, self.merge_wait_s)
            self._running = threading.Thread(target=self._run_loop, name=f"expert-loop-{self.worker_index}",
                                             daemon=True)
            self._running.start()
        return {"worker_index": self.worker_index, "experts": self.hosted(), "address": self.address,
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
        """Loop statistics, the map versions held, and the rows computed per [layer][global expert]."""
        if self.loop is None:
            return {"worker_index": self.worker_index, "generation": self.generation}
        cache = self.cache_stats.snapshot() if self.expert_cache_size else {}  # issue 23
        return {"worker_index": self.worker_index, "generation": self.generation, **self.loop.stats.snapshot(),
                **self.experts.snapshot(), **cache}

    # ----------------------------------------------------------------------------------------- rebalancing

    def prepare(self, version: int, layer_experts: tuple[tuple[int, ...], ...]) -> dict[str, Any]:
        """Load map ``version``'s experts next to the ones being served: what this worker already holds is
        reused, only the rest is read from the checkpoint (only its shards). Serving goes on meanwhile."""
        self._loaded.result()
        started = time.perf_counter()
        ckpt = Checkpoint(self.engine_cfg.model_dir())
        current = self.experts.get(self.experts.latest)
        experts = self._load_experts(ckpt, tuple(tuple(ids) for ids in layer_experts), have=current)
        self.experts.add(version, experts)
        held = {(layer, e) for layer, ids in enumerate(current.layer_experts) for e in ids}
        read = sum(1 for layer, ids in enumerate(layer_experts) for e in ids if (layer, e) not in held)
        seconds = time.perf_counter() - started
        log.info("expert worker %d: map version %d ready in %.2fs (%d expert-layers read from %s, the rest "
                 "reused)", self.worker_index, version, seconds, read, sorted(set(ckpt.files_opened)) or "no file")
        return {"worker_index": self.worker_index, "read": read, "files_opened": list(ckpt.files_opened),
                "seconds": seconds}

    def commit(self, version: int, layer_experts: tuple[tuple[int, ...], ...]) -> None:
        """Serve ``version`` from now on (announced in results); older weights go once no link uses them."""
        self.experts.commit(version)
        self.map_version, self.layer_experts = version, tuple(tuple(ids) for ids in layer_experts)

    def export(self) -> LocalExperts:
        """The weights this worker serves (a copy through Ray's object store): how fast a new worker could take
        its experts from a peer's memory instead of the checkpoint (bench/elastic.py measures both)."""
        self._loaded.result()
        if self.expert_cache_size:
            raise ValueError("a worker with an expert cache holds only some experts in memory: nothing to export")
        return self.experts.get(self.experts.latest)

    def adopt(self, worker_index: int, generation: int) -> None:
        """A spare (started with no experts) becomes worker ``worker_index`` of the pool; its experts come next,
        with ``prepare``."""
        self._loaded.result()
        self.worker_index, self.generation = worker_index, generation
        self.experts.worker_index = worker_index
        log.info("spare expert worker taken into the pool as worker %d (generation %d)", worker_index, generation)

    def discard(self, version: int) -> None:
        self.experts.discard(version)

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.stop()
