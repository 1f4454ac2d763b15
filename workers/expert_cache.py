"""The experts a worker runs, when they do not all fit in fast memory: a per-layer expert cache (issue 23).

Two tiers per worker:
  * device slots: K experts per layer (``capacity``) in the compute dtype, on the worker's device (GPU memory on a
    GPU; plain memory on a CPU). Allocated once, at start; a load copies into a slot and never allocates.
  * host store: every expert the worker hosts. On a CPU-only machine the checkpoint's safetensors, memory-mapped
    (file-backed pages the OS may drop and read again); on a GPU machine a pinned host copy (what a
    host-to-device copy can read at full PCIe speed, and asynchronously).

Eviction is per layer, least recently used, with pins: an expert that has rows waiting in the current call, or
that a prefetch hint named for the layer's next call, is never evicted before that call has run it (the pitfall
of an expert loaded and evicted again within one forward). Hits run first while the misses load on the loader
thread (copy and compute overlap); a miss that finds every slot pinned waits until an earlier expert has run.

Prefetch: ``hint(layer, experts)`` (from the coordinator's speculative router, cluster/moe/prefetch.py, through
the links) queues loads of experts that are not resident on the same loader thread, into unpinned slots. A wrong
guess costs a load (a ``wasted`` prefetch), never correctness: ``run_grouped`` only ever computes with the weights
of the expert a row was routed to.

``CachedExperts`` is a ``LocalExperts`` (cluster/model/experts.py) whose stacks are the slots: the worker loop,
the versioned weights and ``InProcessExperts`` use it as they use all-resident experts, and ``nbytes`` is what is
resident. Shape legend: R rows of a call, H hidden, I expert intermediate, K slots of a layer.
"""

from __future__ import annotations

import json
import mmap
import queue
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from cluster.engine.llm_engine import LLMEngine
from cluster.engine.loader import MoEFactory
from cluster.model.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, expert_tensor_name
from cluster.model.config import ModelConfig
from cluster.model.experts import LocalExperts, grouped_mm_supported
from cluster.model.forward import MoEBackend
from cluster.model.ops import expert_swiglu, grouped_expert_swiglu
from cluster.moe.layer import InProcessExperts, MoELayer
from cluster.moe.prefetch import Prefetcher

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class MappedSafetensors:
    """The tensors of a safetensors checkpoint as views of its memory-mapped files (nothing read until used).

    Private copy-on-write maps: pages stay the file's (the OS may drop and re-read them) as long as nobody writes,
    and nobody does."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_FILE
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else [SINGLE_FILE]
        self._maps: list[mmap.mmap] = []
        self._where: dict[str, tuple[mmap.mmap, torch.dtype, tuple[int, ...], int]] = {}
        for name in files:
            with open(self.model_dir / name, "rb") as f:
                header_len = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(header_len))
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps.append(mapped)
            for tensor, info in header.items():
                if tensor == "__metadata__":
                    continue
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    continue  # not an expert weight this cache can serve (a quantized checkpoint is refused earlier)
                start = 8 + header_len + info["data_offsets"][0]
                self._where[tensor] = (mapped, _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), start)

    def tensor(self, name: str) -> Tensor:
        if name not in self._where:
            raise ValueError(f"tensor {name!r} is not a plain float tensor of checkpoint {self.model_dir}")
        mapped, dtype, shape, start = self._where[name]
        count = 1
        for d in shape:
            count *= d
        return torch.frombuffer(mapped, dtype=dtype, count=count, offset=start).view(shape)


class HostStore:
    """Every hosted expert's w13 (2I, H) and w2 (H, I), in the slower tier.

    ``pinned`` (a GPU worker): copied once into page-locked host memory in the compute dtype, so that a load is one
    asynchronous host-to-device copy. Otherwise: views of the memory-mapped checkpoint (w1 and w3 are copied into
    the slot's halves, with any dtype conversion, by the load itself)."""

    def __init__(self, model_dir: str | Path, layer_experts: tuple[tuple[int, ...], ...], dtype: torch.dtype,
                 pinned: bool) -> None:
        self.mapped = MappedSafetensors(model_dir)
        self.pinned = pinned
        self._pinned: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        if pinned:
            for layer, ids in enumerate(layer_experts):
                for e in ids:
                    w1, w3, w2 = (self.mapped.tensor(expert_tensor_name(layer, e, p)) for p in ("w1", "w3", "w2"))
                    w13 = torch.empty((w1.shape[0] + w3.shape[0], w1.shape[1]), dtype=dtype).pin_memory()
                    w13[: w1.shape[0]].copy_(w1)
                    w13[w1.shape[0]:].copy_(w3)
                    self._pinned[layer, e] = (w13, torch.empty(w2.shape, dtype=dtype).pin_memory().copy_(w2))

    @property
    def nbytes(self) -> int:
        """Bytes held in pinned memory (0 when memory-mapped: those pages belong to the page cache)."""
        return sum(t.numel() * t.element_size() for pair in self._pinned.values() for t in pair)

    def copy_into(self, layer: int, expert: int, w13: Tensor, w2: Tensor) -> int:
        """Copy one expert into a slot (w13 (2I, H), w2 (H, I)); returns the bytes copied."""
        if self.pinned:
            src13, src2 = self._pinned[layer, expert]
            w13.copy_(src13, non_blocking=True)
            w2.copy_(src2, non_blocking=True)
        else:
            w1, w3, src2 = (self.mapped.tensor(expert_tensor_name(layer, expert, p)) for p in ("w1", "w3", "w2"))
            w13[: w1.shape[0]].copy_(w1)
            w13[w1.shape[0]:].copy_(w3)
            w2.copy_(src2)
        return w13.numel() * w13.element_size() + w2.numel() * w2.element_size()


@dataclass
class CacheStats:
    """Counters since the worker started, over every map version it served (a rebalance's cache starts cold but
    counts on here)."""

    hits: int = 0  # (call, expert) pairs whose expert was resident or already loading when its rows came
    misses: int = 0  # ... that had to start a load
    prefetch_issued: int = 0  # loads started by a hint
    prefetch_used: int = 0  # hinted loads whose expert the layer's next call used
    prefetch_wasted: int = 0  # hinted loads the next call did not use (or evicted before it)
    hint_named: int = 0  # (call, expert) pairs a hint named, scored when the call comes: the guess's precision
    hint_named_used: int = 0  # ... that the call used
    hint_needed: int = 0  # experts used by calls a hint was for: hint_named_used / this is the guess's recall
    loads: int = 0  # loads finished (misses and prefetches)
    bytes_loaded: int = 0
    stall_s: float = 0.0  # seconds calls waited for a load to finish
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return {f"expert_cache_{f.name}": getattr(self, f.name) for f in fields(self) if f.name != "lock"}


@dataclass
class _Layer:
    """One layer's slots. ``resident``: global id -> slot, least recently used first (a loading expert is in it
    too, with an event in ``loading``)."""

    slot_expert: list[int | None]
    resident: OrderedDict[int, int] = field(default_factory=OrderedDict)
    loading: dict[int, threading.Event] = field(default_factory=dict)
    pins: dict[int, int] = field(default_factory=dict)  # global id -> rows' calls and hints holding it
    hinted: set[int] = field(default_factory=set)  # named by a hint for the layer's next call (pinned once)
    named: set[int] = field(default_factory=set)  # named by a hint, pinned or not (every slot may have been)
    prefetched: set[int] = field(default_factory=set)  # loaded for a hint, not yet used or wasted


class CachedExperts(LocalExperts):
    """``LocalExperts`` with ``capacity`` slots per layer (at most the experts the layer hosts) over a host store.

    Local ids are those of ``layer_experts`` (the expert map's, as for all-resident experts); slots are internal.
    Thread-safe: calls (the worker loop), hints (the loop) and loads (the loader thread) share one condition."""

    def __init__(self, store: HostStore, layer_experts: tuple[tuple[int, ...], ...], capacity: int,
                 cfg: ModelConfig, dtype: torch.dtype, device: torch.device, stats: CacheStats | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"expert cache size must be at least 1 expert per layer, got {capacity}")
        i, h = cfg.intermediate_size, cfg.hidden_size
        sizes = [min(capacity, len(ids)) for ids in layer_experts]
        w13: list[Tensor] = [torch.zeros(k, 2 * i, h, dtype=dtype, device=device) for k in sizes]  # (K, 2I, H)
        w2: list[Tensor] = [torch.zeros(k, h, i, dtype=dtype, device=device) for k in sizes]  # (K, H, I)
        super().__init__(layer_experts=layer_experts, w13=list(w13), w2=list(w2))
        self._slots13, self._slots2 = w13, w2
        self.capacity = capacity
        self.store = store
        self.device = device
        self.stats = stats or CacheStats()
        self._layers = [_Layer(slot_expert=[None] * k) for k in sizes]
        self._local_of = [{e: j for j, e in enumerate(ids)} for ids in layer_experts]
        self._cond = threading.Condition()
        self._queue: queue.Queue[tuple[int, int, int] | None] = queue.Queue()
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._loader = threading.Thread(target=self._load_forever, name="expert-cache-loader", daemon=True)
        self._loader.start()

    @property
    def quantization(self) -> str | None:
        return None

    def close(self) -> None:
        self._queue.put(None)

    def resident_experts(self, layer: int) -> list[int]:
        """Global ids resident (or loading) in ``layer``, least recently used first."""
        with self._cond:
            return list(self._layers[layer].resident)

    # ------------------------------------------------------------------------------------------- loading

    def _load_forever(self) -> None:
        while (job := self._queue.get()) is not None:
            layer, expert, slot = job
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    nbytes = self.store.copy_into(layer, expert, self._slots13[layer][slot], self._slots2[layer][slot])
                self._stream.synchronize()
            else:
                nbytes = self.store.copy_into(layer, expert, self._slots13[layer][slot], self._slots2[layer][slot])
            with self._cond:
                done = self._layers[layer].loading.pop(expert)
                done.set()
                self._cond.notify_all()
            with self.stats.lock:
                self.stats.loads += 1
                self.stats.bytes_loaded += nbytes

    def _claim_slot(self, state: _Layer, steal_hints: bool) -> int | None:
        """A free slot, else the least recently used unpinned resident expert's (evicted); else, for a call's miss
        (``steal_hints``), the slot of an expert only a hint pins; None if all are pinned. Condition held."""
        for slot, held in enumerate(state.slot_expert):
            if held is None:
                return slot
        for expert, slot in state.resident.items():
            if not state.pins.get(expert) and expert not in state.loading:
                del state.resident[expert]
                state.slot_expert[slot] = None
                if expert in state.prefetched:  # loaded for a hint, evicted unused
                    state.prefetched.discard(expert)
                    with self.stats.lock:
                        self.stats.prefetch_wasted += 1
                return slot
        if not steal_hints:
            return None
        for expert in state.resident:  # a call's misses come before guesses for a later one
            if expert in state.hinted and state.pins.get(expert) == 1 and expert not in state.loading:
                state.hinted.discard(expert)
                del state.pins[expert]
                return self._claim_slot(state, steal_hints=False)
        return None

    def _start_load(self, layer: int, state: _Layer, expert: int, prefetch: bool) -> bool:
        """Queue a load of ``expert`` into a claimed slot; False when every slot is pinned. Condition held."""
        slot = self._claim_slot(state, steal_hints=not prefetch)
        if slot is None:
            return False
        state.slot_expert[slot] = expert
        state.resident[expert] = slot
        state.loading[expert] = threading.Event()
        self._queue.put((layer, expert, slot))
        return True

    def hint(self, layer: int, experts: list[int]) -> None:
        """The layer's next call will probably need ``experts`` (global ids; those not hosted here are ignored):
        pin them until that call and load those not resident, in the background."""
        with self._cond:
            state = self._layers[layer]
            for expert in experts:
                if expert not in self._local_of[layer] or expert in state.hinted:
                    continue
                state.named.add(expert)
                if expert not in state.resident:
                    if not self._start_load(layer, state, expert, prefetch=True):
                        continue  # every slot pinned: a guess is not worth a wait
                    state.prefetched.add(expert)
                    with self.stats.lock:
                        self.stats.prefetch_issued += 1
                state.hinted.add(expert)
                state.pins[expert] = state.pins.get(expert, 0) + 1

    # ------------------------------------------------------------------------------------------- running

    def run_grouped(self, layer: int, rows: Tensor, rows_per_local_expert: Tensor) -> Tensor:
        """rows (R, H) grouped by local expert, rows_per_local_expert (n_local,) -> outputs (R, H), exactly as
        all-resident experts compute them."""
        counts = [int(n) for n in rows_per_local_expert.tolist()]
        ids = self.layer_experts[layer]
        needed: dict[int, tuple[int, int]] = {}  # global id -> (first row, rows), in local-id order
        start = 0
        for local, n in enumerate(counts):
            if n:
                needed[ids[local]] = (start, n)
            start += n
        out = torch.empty_like(rows)
        state = self._layers[layer]
        with self._cond:
            self._consume_hints(state, needed)
            hits = misses = 0
            for expert in needed:
                state.pins[expert] = state.pins.get(expert, 0) + 1
                if expert in state.resident:
                    state.resident.move_to_end(expert)
                    hits += 1
                else:
                    misses += 1
            with self.stats.lock:
                self.stats.hits += hits
                self.stats.misses += misses
            waiting = [e for e in needed if e not in state.resident]  # misses without a slot yet
            waiting = [e for e in waiting if not self._start_load(layer, state, e, prefetch=False)]
        pending = list(needed)
        while pending:
            with self._cond:
                ready = [e for e in pending if e in state.resident and e not in state.loading]
                if not ready:
                    stalled = time.perf_counter()
                    while not ready:
                        self._cond.wait()  # a load finished: its expert may be ours, or its slot free for one
                        waiting = [e for e in waiting if not self._start_load(layer, state, e, prefetch=False)]
                        ready = [e for e in pending if e in state.resident and e not in state.loading]
                    with self.stats.lock:
                        self.stats.stall_s += time.perf_counter() - stalled
                group = [(state.resident[e], *needed[e]) for e in ready]
            self._run_slots(layer, rows, out, group)  # hits first: the misses load meanwhile
            with self._cond:
                for e in ready:
                    pending.remove(e)
                    state.pins[e] -= 1
                    if not state.pins[e]:
                        del state.pins[e]
                # slots freed by the experts just run take the misses still without one
                waiting = [e for e in waiting if not self._start_load(layer, state, e, prefetch=False)]
        return out

    def _consume_hints(self, state: _Layer, needed: dict[int, tuple[int, int]]) -> None:
        """The call a hint was for has come: release its pins and score its prefetches. Condition held."""
        for expert in state.hinted:
            state.pins[expert] -= 1
            if not state.pins[expert]:
                del state.pins[expert]
        used = sum(1 for e in state.prefetched if e in needed)
        with self.stats.lock:
            self.stats.prefetch_used += used
            self.stats.prefetch_wasted += len(state.prefetched) - used
            if state.named:
                self.stats.hint_named += len(state.named)
                self.stats.hint_named_used += sum(1 for e in state.named if e in needed)
                self.stats.hint_needed += len(needed)
        state.hinted.clear()
        state.named.clear()
        state.prefetched.clear()

    def _run_slots(self, layer: int, rows: Tensor, out: Tensor, group: list[tuple[int, int, int]]) -> None:
        """Run experts resident in slots on their rows: group = (slot, first row, rows) each; out[rows] = result.
        The same kernels as all-resident experts (cluster/model/experts.py), so the results are the same bits."""
        w13, w2 = self._slots13[layer], self._slots2[layer]
        if grouped_mm_supported(rows):
            group = sorted(group)  # slot order: the grouped matmul takes groups in the order of its weights
            index = torch.cat([torch.arange(first, first + n, device=rows.device) for _, first, n in group])
            per_slot = torch.zeros(w13.shape[0], dtype=torch.long)
            for slot, _, n in group:
                per_slot[slot] = n
            offsets = per_slot.cumsum(0).to(device=rows.device, dtype=torch.int32)
            out[index] = grouped_expert_swiglu(rows[index], w13, w2, offsets)
            return
        for slot, first, n in group:
            out[first:first + n] = expert_swiglu(rows[first:first + n], w13[slot], w2[slot])


def load_cached_experts(model_dir: str | Path, cfg: ModelConfig, layer_experts: tuple[tuple[int, ...], ...],
                        capacity: int, dtype: torch.dtype, device: torch.device,
                        stats: CacheStats | None = None) -> CachedExperts:
    """A cold cache over the checkpoint in ``model_dir``: slots allocated, nothing loaded until a call or a hint.
    Refuses a quantized checkpoint (its experts are not plain tensors to map)."""
    if Checkpoint(model_dir).quantization is not None:
        raise ValueError(f"expert_cache_size needs a full-precision checkpoint; {model_dir} is quantized")
    store = HostStore(model_dir, layer_experts, dtype, pinned=device.type == "cuda")
    return CachedExperts(store, layer_experts, capacity, cfg, dtype, device, stats)


def cached_local_moe(capacity: int, stats: CacheStats | None = None) -> MoEFactory:
    """The local engine's MoE backend with its experts behind a cache of ``capacity`` experts per layer (an
    in-process stand-in for one worker holding every expert: tests and bench/expert_cache.py)."""

    def make(model_cfg: ModelConfig, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> MoEBackend:
        every = (tuple(range(model_cfg.num_experts)),) * model_cfg.num_layers
        experts = load_cached_experts(ckpt.model_dir, model_cfg, every, capacity, dtype, device, stats)
        return MoELayer(InProcessExperts(experts, model_cfg.num_experts), model_cfg.num_layers, model_cfg.num_experts,
                        model_cfg.experts_per_token)

    return make


def install_prefetcher(engine: LLMEngine, lookahead: int, guess_per_token: int | None = None) -> Prefetcher:
    """Have ``engine`` (whose MoE backend is a ``cached_local_moe``) hint its cache ``lookahead`` layers ahead,
    guessing ``guess_per_token`` experts per token (default: top-k + 1)."""
    cache, transformer = engine_cache(engine), engine.transformer
    executor = engine.moe.executor  # type: ignore[attr-defined]
    cfg = engine.model_cfg
    prefetcher = Prefetcher([lw.moe_norm for lw in transformer.w.layers], [lw.gate for lw in transformer.w.layers],
                            cfg.rms_norm_eps, guess_per_token or cfg.experts_per_token + 1, lookahead,
                            lambda: executor.expert_map,
                            lambda worker, layer, experts: cache.hint(layer, experts))
    transformer.on_moe_input = prefetcher
    return prefetcher


def engine_cache(engine: LLMEngine) -> CachedExperts:
    """The cache of an engine built with ``cached_local_moe``."""
    moe = engine.moe
    assert isinstance(moe, MoELayer) and isinstance(moe.executor, InProcessExperts)
    assert isinstance(moe.executor.experts, CachedExperts)
    return moe.executor.experts
