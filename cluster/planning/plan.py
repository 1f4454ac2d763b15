"""Fit the cluster to the hardware: from a ModelConfig alone (no weights) and a hardware description, the shape
of the cluster (coordinators, expert workers, experts per worker, who shares a device), the memory of every
device by kind, threads and micro-batches, and predicted step times from a cost model (cluster/engine/calibrate.py).

Pure: no Ray, no I/O, no torch calls. ``plan_gpus`` / ``plan_cpus`` build a ``Plan``; ``Plan.overlay`` is the
serve.yaml overlay (the ``applications: {name: {args: ...}}`` form of k8s/*/serve-overrides.yaml).

Sizes (bytes) follow the checkpoint's tensors: per layer, attention q/k/v/o, the router (E x H) and two norms
on the coordinator, w1/w3/w2 (3 x H x I) per expert on the workers; embeddings and the LM head on the
coordinator; the KV cache 2 x L x KV x D values per token.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cluster.model.config import ModelConfig
from cluster.model.quant import DEFAULT_INT4_GROUP_SIZE

GIB = 2**30
GB = 10**9
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
# Quantized expert weights as moe-cluster holds them (`serve --quantize-experts`, cluster/model/quant.py): bytes per
# parameter. int8: a byte and a float32 scale per output channel (a row of 4096 inputs in Mixtral-8x7B's smallest
# expert matrix); int4: half a byte and a float32 scale per group of the default size.
QUANTIZED_BYTES = {"int8": 1.0 + 4 / 4096, "int4": 0.5 + 4 / DEFAULT_INT4_GROUP_SIZE}
GPU_RUNTIME_BYTES = int(1.5 * GIB)  # per process on a GPU: CUDA context, allocator slack, activations at 4k tokens
CPU_RUNTIME_BYTES = int(0.6 * GIB)  # per process on a CPU node: Python, torch, Ray worker
# Cores per expert worker on a CPU node: its intra-op threads. One: on 2 cores, two 1-thread workers and a 1-thread
# coordinator taking turns with them, against one 2-thread worker and a 2-thread coordinator, reached 1.03-1.13x
# the local engine against 0.79-0.82x on an AMD EPYC VM, and 0.82x against 0.88x on an Intel Xeon VM: a 5% loss on
# one host rather than 30% on the other. On the EPYC a second thread of one process gained streamed expert matmuls
# what a second process gained (1.4x, memory bandwidth; a probe, not a bench), but idle threads must sleep (passive
# wait) or spin on the cores the other side needs, and waking them costs every parallel region. Workers get a
# second thread only where cores outnumber experts.
CPU_WORKER_CORES = 1
# Tokens per step from which a CPU node's plan (1-thread processes) splits a step into two micro-batches without a
# calibration: ClusterConfig.micro_batch_min_tokens' default, the measured crossover on 2 cores (a twin, since this
# module imports no engine config; tests/test_plan.py keeps them equal).
CPU_MICRO_BATCH_MIN_TOKENS = 512
# A streamed chunk costs the Serve tier (the engine replica's stream, the ingress, the proxy) about 1.7 ms of CPU,
# measured on 2 cores at 32 streams (docs/observability.md "Streaming cadence"); on a CPU node that CPU is the
# engine's. 25 chunks/s per core keeps streaming to ~4% of the node: on 2 cores 50/s gave 1.16x the output
# tokens/s of 200/s at 32 SSE clients (side by side in one Ray session), each stream still sending a chunk every
# 50 ms (stream_interval_ms) up to 2-3 open streams per core.
CPU_STREAM_CHUNKS_PER_CORE = 25
GPU_MEMORY_UTILIZATION = 0.92  # of a GPU's memory the plan hands out (as vLLM's default 0.9)
HOST_LINK_GBS = 25.0  # host-to-GPU copy bandwidth the expert cache estimate assumes (PCIe 4 x16, effective)


@dataclass(frozen=True)
class Hardware:
    kind: str  # "gpu" or "cpu"
    devices: int  # GPUs in all (gpu) or CPU cores (cpu)
    memory_gib: float  # per GPU (gpu) or the node's memory (cpu)
    nodes: int = 1
    source: str = "flags"  # "flags" or "ray" (read from the running Ray cluster) or "local"

    def __post_init__(self) -> None:
        if self.kind not in ("gpu", "cpu"):
            raise ValueError(f"hardware kind must be 'gpu' or 'cpu', got {self.kind!r}")
        for name in ("devices", "nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{'--gpus' if name == 'devices' and self.kind == 'gpu' else '--' + name} must "
                                 f"be a positive integer, got {value!r}")
        if not self.memory_gib > 0:
            raise ValueError(f"--{self.kind}-memory-gib must be > 0, got {self.memory_gib!r}"
                             if self.kind == "gpu" else f"--memory-gib must be > 0, got {self.memory_gib!r}")
        if self.kind == "gpu" and self.devices % self.nodes:
            raise ValueError(f"--gpus {self.devices} is not a multiple of --nodes {self.nodes}")

    def describe(self) -> str:
        if self.kind == "gpu":
            per_node = f" on {self.nodes} nodes" if self.nodes > 1 else ""
            return f"{self.devices} GPU(s) of {self.memory_gib:g} GiB{per_node}"
        return f"{self.devices} CPU core(s), {self.memory_gib:g} GiB of memory"


@dataclass(frozen=True)
class ModelSizes:
    dtype: str
    coordinator_bytes: int  # embeddings, attention, routers, norms, LM head
    expert_bytes: int  # one expert's w1/w2/w3 in every layer
    kv_bytes_per_token: int
    num_experts: int
    num_layers: int
    params: int

    @classmethod
    def of(cls, cfg: ModelConfig, dtype: str | None = None) -> ModelSizes:
        dtype = dtype or cfg.dtype
        width = DTYPE_BYTES[dtype]
        h, d = cfg.hidden_size, cfg.head_dim
        attention = h * cfg.num_heads * d * 2 + h * cfg.num_kv_heads * d * 2  # q, o; k, v
        per_layer = attention + cfg.num_experts * h + 2 * h  # + router, two norms
        embeddings = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h  # + final norm
        coordinator = embeddings + cfg.num_layers * per_layer
        expert = 3 * h * cfg.intermediate_size * cfg.num_layers
        kv = 2 * cfg.num_layers * cfg.num_kv_heads * d * int(width)
        return cls(dtype, int(coordinator * width), int(expert * width), kv, cfg.num_experts, cfg.num_layers,
                   coordinator + expert * cfg.num_experts)

    def expert_bytes_as(self, kind: str) -> int:
        """One expert's weights stored as ``kind`` (a dtype or a quantization)."""
        per_param = QUANTIZED_BYTES.get(kind) or DTYPE_BYTES[kind]
        return int(self.expert_bytes / DTYPE_BYTES[self.dtype] * per_param)

    @property
    def total_bytes(self) -> int:
        return self.coordinator_bytes + self.num_experts * self.expert_bytes


@dataclass
class Device:
    index: int
    node: int
    kind: str  # "gpu" or "cpu"
    capacity_bytes: int
    roles: list[str] = field(default_factory=list)  # "coordinator 0", "worker 3"
    experts: list[int] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)  # bytes by kind: coordinator_weights, expert_weights,
    #                                                       runtime, kv_cache, (expert_cache)
    gpu_share: dict[str, float] = field(default_factory=dict)  # role -> share of this GPU

    @property
    def used_bytes(self) -> int:
        return sum(self.memory.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"used_bytes": self.used_bytes,
                               "memory_gib": {k: round(v / GIB, 3) for k, v in self.memory.items()}}


@dataclass
class Prediction:
    phase: str  # "decode" or "prefill"
    batch: int  # sequences (decode) or prompt tokens (prefill)
    micro_batches: int
    step_ms: float
    tokens_per_s: float


@dataclass
class Plan:
    model: str
    hardware: Hardware
    sizes: ModelSizes
    fits: bool
    coordinators: int
    workers: list[list[int]]  # experts of each worker
    devices: list[Device]
    kv_cache_tokens: int
    max_model_len: int
    threads: dict[str, int]  # coordinator / worker: torch intra-op threads
    micro_batches: int  # 0 auto (the predictions pick), 1 serial, 2 ping-pong
    notes: list[str] = field(default_factory=list)  # what does not fit, what would, caveats
    alternatives: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    cost_source: str = ""
    cluster_options: dict[str, Any] = field(default_factory=dict)
    pool_options: dict[str, Any] = field(default_factory=dict)
    engine_options: dict[str, Any] = field(default_factory=dict)
    app_options: dict[str, Any] = field(default_factory=dict)  # the Serve app's own (router_service AppSettings)
    top_k: int = 2
    # coordinator and workers can compute at once (micro-batches can overlap them): a GPU each, or several cores
    overlaps: bool = True

    @property
    def gpus_used(self) -> int:
        return sum(1 for d in self.devices if d.kind == "gpu" and d.roles)

    def overlay(self, app_name: str = "moe-cluster") -> dict[str, Any]:
        """The serve.yaml overlay of this plan (merged over router_service/configs/serve.yaml)."""
        return {"applications": {app_name: {"args": {
            **self.app_options, "engine": "cluster", "num_engines": self.coordinators,
            "engine_options": dict(self.engine_options),
            "cluster_options": dict(self.cluster_options),
            "pool_options": dict(self.pool_options)}}}}

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "hardware": asdict(self.hardware), "fits": self.fits, "gpus_used": self.gpus_used,
            "coordinators": self.coordinators, "workers": [{"experts": w} for w in self.workers],
            "experts_per_worker": [len(w) for w in self.workers],
            "devices": [d.to_json() for d in self.devices if d.roles],
            "kv_cache_tokens": self.kv_cache_tokens, "max_model_len": self.max_model_len,
            "threads": self.threads, "micro_batches": self.micro_batches,
            "weights_gib": {"coordinator": round(self.sizes.coordinator_bytes / GIB, 3),
                            "per_expert": round(self.sizes.expert_bytes / GIB, 3),
                            "total": round(self.sizes.total_bytes / GIB, 3)},
            "kv_bytes_per_token": self.sizes.kv_bytes_per_token,
            "notes": self.notes, "alternatives": self.alternatives,
            "predictions": [asdict(p) for p in self.predictions], "cost_source": self.cost_source,
            "overlay": self.overlay(),
        }


def split_experts(num_experts: int, workers: int) -> list[list[int]]:
    """Contiguous expert ids per worker, as the pool's default map lays them out: ceil(E / W) each, the last
    worker(s) fewer (uneven when W does not divide E)."""
    per = math.ceil(num_experts / workers)
    return [list(range(s, min(s + per, num_experts))) for s in range(0, num_experts, per)]


def plan_gpus(cfg: ModelConfig, hw: Hardware, *, name: str = "model", dtype: str | None = None,
              max_model_len: int | None = None, max_num_seqs: int = 64, alternatives: bool = True) -> Plan:
    """One worker per GPU (experts split contiguously); the coordinator on a GPU of its own when one is left, else
    beside the worker with the fewest experts (a fractional GPU each); the KV cache is what is left on its GPU."""
    assert hw.kind == "gpu"
    sizes = ModelSizes.of(cfg, dtype)
    max_len = max_model_len or cfg.max_position_embeddings
    capacity = int(hw.memory_gib * GIB * GPU_MEMORY_UTILIZATION)
    per_node = hw.devices // hw.nodes
    workers = split_experts(cfg.num_experts, min(cfg.num_experts, hw.devices))
    devices = [Device(i, i // per_node, "gpu", capacity) for i in range(hw.devices)]
    for w, experts in enumerate(workers):  # spread over nodes round-robin, so that every node has work
        dev = devices[_spread_index(w, len(workers), hw)]
        dev.roles.append(f"worker {w}")
        dev.experts = experts
        dev.memory["expert_weights"] = len(experts) * sizes.expert_bytes
        dev.memory["runtime"] = GPU_RUNTIME_BYTES
    spare = [d for d in devices if not d.roles]
    shares = bool(not spare)
    coordinators = max(1, len(spare))
    homes = spare or [min(devices, key=lambda d: (d.used_bytes, d.index))]
    for c, dev in enumerate(homes):
        dev.roles.append(f"coordinator {c}")
        dev.memory["coordinator_weights"] = sizes.coordinator_bytes
        dev.memory["runtime"] = dev.memory.get("runtime", 0) + GPU_RUNTIME_BYTES
    # A worker beside the coordinator takes 0.75 of its GPU and the coordinator 0.25: no two workers can then share
    # a GPU (0.75 + 0.75 > 1), which two halves would let Ray do.
    worker_share, coordinator_share = (0.75, 0.25) if shares else (1.0, 1.0)
    for dev in devices:
        dev.gpu_share = {role: worker_share if role.startswith("worker") else coordinator_share for role in dev.roles}
    kv_free = min(dev.capacity_bytes - dev.used_bytes for dev in homes)
    kv_tokens = max(0, kv_free) // sizes.kv_bytes_per_token
    need_tokens = max_len  # at least one sequence of the full length, as vLLM requires at start-up
    for dev in homes:
        dev.memory["kv_cache"] = max(0, kv_free)
    over = [d for d in devices if d.used_bytes > d.capacity_bytes]
    fits = not over and kv_tokens >= need_tokens
    plan = Plan(name, hw, sizes, fits, coordinators, workers, devices, int(kv_tokens), max_len,
                {"coordinator": 1, "worker": 1}, 0,
                cluster_options={"use_gpus": True, "coordinator_num_gpus": coordinator_share,
                                 **({"link": "shm"} if shares else {})},
                pool_options={"experts_per_worker": len(workers[0]), "use_gpus": True,
                              "worker_num_gpus": worker_share},
                engine_options={"dtype": sizes.dtype, "max_num_seqs": max_num_seqs,
                                "kv_cache_gib": round(max(0, kv_free) / GIB * 0.98, 2),
                                "max_model_len": max_len}, top_k=cfg.experts_per_token)
    if shares:
        plan.notes.append(f"coordinator 0 shares GPU {homes[0].index} with {homes[0].roles[0]} (Ray fractional "
                          f"GPUs: {worker_share:g} and {coordinator_share:g}, so that no two workers share one); "
                          "NCCL refuses two ranks on one device, so links are shared memory "
                          "(cluster_options.link: shm)")
    if fits:
        plan.notes.append(f"KV cache: {max(0, kv_free) / GIB:.1f} GiB left on the coordinator's GPU = "
                          f"{kv_tokens:,} tokens ({kv_tokens / max_len:.1f} sequences of {max_len:,} tokens, "
                          f"{sizes.kv_bytes_per_token // 1024} KiB per token)")
        return plan
    total_need = sizes.total_bytes + GPU_RUNTIME_BYTES * (len(workers) + coordinators)
    plan.notes.append(
        f"does not fit: {sizes.dtype} weights are {sizes.total_bytes / GB:.1f} GB ({sizes.total_bytes / GIB:.1f} "
        f"GiB: {sizes.num_experts} experts x {sizes.expert_bytes / GIB:.2f} GiB + coordinator "
        f"{sizes.coordinator_bytes / GIB:.2f} GiB), {total_need / GIB:.1f} GiB with runtimes, against "
        f"{hw.devices} x {capacity / GIB:.1f} GiB usable ({GPU_MEMORY_UTILIZATION:.0%} of {hw.memory_gib:g} GiB)")
    for dev in over:
        plan.notes.append(f"GPU {dev.index} ({', '.join(dev.roles)}) needs {dev.used_bytes / GIB:.1f} GiB of "
                          f"{dev.capacity_bytes / GIB:.1f}")
    if not over and kv_tokens < need_tokens:
        plan.notes.append(f"the weights fit but the KV cache left ({kv_tokens:,} tokens) is less than one sequence "
                          f"of max_model_len {max_len:,}; lower max_model_len")
    if not alternatives:
        return plan
    plan.alternatives = gpu_alternatives(cfg, hw, sizes, max_len)
    for alt in plan.alternatives:
        plan.notes.append("would fit: " + alt["summary"] if alt["fits"] else "would not fit either: " + alt["summary"])
    return plan


def _spread_index(worker: int, workers: int, hw: Hardware) -> int:
    per_node = hw.devices // hw.nodes
    node, slot = worker % hw.nodes, worker // hw.nodes
    return node * per_node + slot


def gpu_alternatives(cfg: ModelConfig, hw: Hardware, sizes: ModelSizes, max_len: int) -> list[dict[str, Any]]:
    """What would fit on this hardware, with numbers and the serve flag that does it: quantized experts, and an
    expert cache (some experts resident per layer, the others streamed from host memory)."""
    capacity = int(hw.memory_gib * GIB * GPU_MEMORY_UTILIZATION)
    workers = min(cfg.num_experts, hw.devices)
    kv_min = max_len * sizes.kv_bytes_per_token
    out = []
    for quant in ("int8", "int4"):
        expert = sizes.expert_bytes_as(quant)
        plan = _fit_with_expert_bytes(cfg, hw, sizes, expert)
        free = plan["kv_free"]
        out.append({"kind": f"experts {quant}", "fits": free >= kv_min, "expert_gib": round(expert / GIB, 2),
                    "kv_cache_gib": round(max(0, free) / GIB, 2),
                    "kv_cache_tokens": max(0, free) // sizes.kv_bytes_per_token,
                    "summary": f"experts in {quant} ({expert / GIB:.2f} GiB each, {cfg.num_experts * expert / GB:.1f} "
                               f"GB in all; moe-cluster serve --quantize-experts {quant}): "
                               + (f"{max(0, free) / GIB:.1f} GiB = {max(0, free) // sizes.kv_bytes_per_token:,} "
                                  f"tokens of KV cache left" if free >= kv_min else
                                  f"still {(kv_min - free) / GIB:.1f} GiB short")})
    # Expert cache (`serve --expert-cache-size K`): each worker keeps K of its experts per layer on its GPU, the
    # rest in host memory. The coordinator and a KV cache of one full sequence come first on its GPU; K is what
    # the fullest GPU holds, an expert (every layer) taking one expert's bytes.
    fewest = min(len(w) for w in split_experts(cfg.num_experts, workers))  # experts of the smallest worker
    fullest_free = capacity - 2 * GPU_RUNTIME_BYTES - sizes.coordinator_bytes - kv_min  # a worker + the coordinator
    k = max(0, min(fewest - 1, int(fullest_free // sizes.expert_bytes)))
    total = cfg.num_experts * cfg.num_layers
    resident = k * workers * cfg.num_layers
    streamed = (total - resident) * sizes.expert_bytes / cfg.num_layers
    step_ms = streamed / (HOST_LINK_GBS * GB) * 1e3
    out.append({"kind": "expert cache", "fits": k > 0, "expert_cache_size": k, "resident_expert_layers": resident,
                "of": total, "host_gib": round(streamed / GIB, 1), "decode_stream_ms": round(step_ms, 1),
                "summary": (f"an expert cache ({sizes.dtype}; moe-cluster serve --expert-cache-size {k}): {k} of "
                            f"each worker's {fewest} experts per layer resident on its GPU, "
                            f"{resident} of {total} expert-layers ({resident / total:.0%}), "
                            f"{streamed / GIB:.1f} GiB in host memory; a decode step whose batch touches every "
                            f"expert streams that much, about {step_ms:,.0f} ms at {HOST_LINK_GBS:g} GB/s (batches "
                            "that touch fewer stream less; not with --quantize-experts yet)") if k > 0
                else "an expert cache: not even one expert per worker fits beside the coordinator"})
    gpus_needed = _gpus_needed(cfg, sizes, hw.memory_gib, max_len)
    out.append({"kind": f"{gpus_needed} GPUs", "fits": True, "gpus": gpus_needed,
                "summary": f"{gpus_needed} GPUs of {hw.memory_gib:g} GiB in {sizes.dtype} (moe-cluster plan --gpus "
                           f"{gpus_needed} --gpu-memory-gib {hw.memory_gib:g})"})
    return out


def _fit_with_expert_bytes(cfg: ModelConfig, hw: Hardware, sizes: ModelSizes, expert: int) -> dict[str, int]:
    """The KV bytes left on the coordinator's GPU if every expert took ``expert`` bytes (same layout rule)."""
    capacity = int(hw.memory_gib * GIB * GPU_MEMORY_UTILIZATION)
    workers = split_experts(cfg.num_experts, min(cfg.num_experts, hw.devices))
    loads = [len(w) * expert + GPU_RUNTIME_BYTES for w in workers] + [0] * (hw.devices - len(workers))
    worst = max(loads)
    home = min(range(hw.devices), key=lambda i: loads[i])
    if worst > capacity:
        return {"kv_free": capacity - worst}
    return {"kv_free": capacity - loads[home] - sizes.coordinator_bytes - GPU_RUNTIME_BYTES}


def _gpus_needed(cfg: ModelConfig, sizes: ModelSizes, memory_gib: float, max_len: int) -> int:
    for n in range(1, 4 * cfg.num_experts + 1):
        hw = Hardware("gpu", n, memory_gib)
        if plan_gpus(cfg, hw, dtype=sizes.dtype, max_model_len=max_len, alternatives=False).fits:
            return n
    return 4 * cfg.num_experts


def cpu_wait_policy(threads: int) -> str | None:
    """The OpenMP wait policy of a process of ``threads`` intra-op threads on a CPU node where the coordinator and
    the workers take turns on the same cores: "passive" (idle threads sleep instead of spinning on the cores the
    other side needs; docs/architecture.md "Threads") where it has several, else OpenMP's default."""
    return "passive" if threads > 1 else None


def plan_cpus(cfg: ModelConfig, hw: Hardware, *, name: str = "model", dtype: str | None = None,
              max_model_len: int | None = None, max_num_seqs: int = 64) -> Plan:
    """Within a layer the coordinator and the workers take turns (attention, then the experts): a worker per
    CPU_WORKER_CORES core (at most one per expert, experts split contiguously), so the experts' calls of a layer run
    on every core at once, each process on one thread; where cores outnumber the experts a worker gets several and
    the coordinator as many. Processes of one thread leave no idle OpenMP thread to spin on the cores the other
    side needs; those of several sleep at once (the passive wait policy: docs/architecture.md "Threads").

    Micro-batches: with 1-thread processes the coordinator's attention on one micro-batch can run while the workers
    compute the other's, on the cores the coordinator leaves them: from CPU_MICRO_BATCH_MIN_TOKENS tokens a step
    (prefills; a decode step's expert calls are too small to split), where ``predict`` does not say otherwise. Where
    every side has every core, they would only share the same cores: serial.

    Measured on 2 cores, side by side (docs/benchmarks.md, docs/architecture.md "Threads"), two 1-thread workers of
    4 experts and a 1-thread coordinator against one 2-thread worker of 8 and a 2-thread coordinator (passive),
    at 32 sequences: on an AMD EPYC VM 1.03-1.13x the local engine against 0.79-0.82x; on an Intel Xeon VM, where
    a second thread speeds the local engine up 1.7x, 0.82x against 0.88x."""
    assert hw.kind == "cpu"
    sizes = ModelSizes.of(cfg, dtype)
    max_len = max_model_len or cfg.max_position_embeddings
    cores = hw.devices
    workers = split_experts(cfg.num_experts, max(1, min(cfg.num_experts, cores // CPU_WORKER_CORES)))
    worker_threads = max(1, cores // len(workers))
    # Ping-pong overlaps the coordinator's thread with the workers' where it leaves them cores of their own: 1-thread
    # processes on more than one core. Workers of several threads (and the coordinator as many) use every core at
    # prefill sizes, so they start serial. Either way the two sides can run at once on a node of several cores, as
    # far as the cores hold what their calls keep busy (step_ms): a decode-size call of several threads keeps
    # about one core busy (workers/link_calibration.py cores_busy).
    ping_pong = worker_threads == 1 and cores > 1
    wait_policy = cpu_wait_policy(worker_threads)
    micro_batches = {"micro_batches": 0, "micro_batch_min_tokens": CPU_MICRO_BATCH_MIN_TOKENS} if ping_pong \
        else {"micro_batches": 1}
    node = Device(0, 0, "cpu", int(hw.memory_gib * GIB))
    node.roles = ["coordinator 0"] + [f"worker {w}" for w in range(len(workers))]
    node.experts = list(range(cfg.num_experts))
    node.memory = {"coordinator_weights": sizes.coordinator_bytes,
                   "expert_weights": cfg.num_experts * sizes.expert_bytes,
                   "runtime": CPU_RUNTIME_BYTES * (1 + len(workers))}
    free = node.capacity_bytes - node.used_bytes
    need_tokens = max_num_seqs * min(max_len, 2048)
    kv_bytes = max(0, min(free // 2, need_tokens * sizes.kv_bytes_per_token))  # half the rest: the OS, others
    node.memory["kv_cache"] = kv_bytes
    kv_tokens = kv_bytes // sizes.kv_bytes_per_token
    fits = free > 0 and kv_tokens >= min(max_len, 2048)
    plan = Plan(name, hw, sizes, fits, 1, workers, [node], int(kv_tokens), max_len,
                {"coordinator": worker_threads, "worker": worker_threads}, micro_batches["micro_batches"],
                cluster_options={"use_gpus": False, "coordinator_num_cpus": 1, "coordinator_threads": worker_threads,
                                 "coordinator_omp_wait_policy": wait_policy, **micro_batches},
                pool_options={"experts_per_worker": len(workers[0]), "use_gpus": False,
                              "worker_num_cpus": worker_threads, "threads_per_worker": worker_threads,
                              "worker_omp_wait_policy": wait_policy},
                engine_options={"max_num_seqs": max_num_seqs, "kv_cache_gib": round(kv_bytes / GIB, 3)},
                app_options={"stream_chunks_per_s": CPU_STREAM_CHUNKS_PER_CORE * cores},
                top_k=cfg.experts_per_token, overlaps=cores > 1)
    schedule = (f"serial, 2 micro-batches from {CPU_MICRO_BATCH_MIN_TOKENS} tokens a step (prefills)" if ping_pong
                else "serial")
    plan.notes.append(f"1 coordinator + {len(workers)} worker(s) of {'/'.join(str(len(w)) for w in workers)} "
                      f"experts on {cores} core(s), {worker_threads} thread(s) each; {schedule}: the workers compute "
                      "while the coordinator waits for them"
                      + ("; idle threads sleep (OpenMP passive wait policy)" if wait_policy else ""))
    plan.notes.append(f"streams: at most {plan.app_options['stream_chunks_per_s']} chunks/s per engine replica "
                      f"({CPU_STREAM_CHUNKS_PER_CORE} per core: each costs the Serve tier ~1.7 ms of CPU)")
    if cores < 2:
        plan.notes.append("one core: the coordinator and the worker take turns; the local engine (--engine local) "
                          "is the better choice here")
    if not fits:
        plan.notes.append(f"does not fit: weights {sizes.total_bytes / GIB:.2f} GiB + runtimes "
                          f"{node.memory['runtime'] / GIB:.1f} GiB + a KV cache for one {min(max_len, 2048)}-token "
                          f"sequence against {hw.memory_gib:g} GiB")
    else:
        plan.notes.append(f"KV cache: {kv_bytes / GIB:.2f} GiB = {kv_tokens:,} tokens")
    return plan


# --------------------------------------------------------------------------------------------- step times


LINK_MS_PER_WORKER = 0.1  # a layer's round trip to one worker on top of the ops, where none was measured (GPUs)
DECODE_BATCHES = (1, 8, 32, 64)
PREFILL_TOKENS = 256


def interpolate(points: dict[str, float], rows: float) -> float:
    """Cost at ``rows`` from measured (rows -> ms) points: linear between them, flat below the first, extended
    along the last two above the last."""
    xs = sorted((int(k), float(v)) for k, v in points.items())
    if rows <= xs[0][0] or len(xs) == 1:
        return xs[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(xs):
        if rows <= x1:
            return y0 + (y1 - y0) * (rows - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = xs[-2], xs[-1]
    return max(y1, y1 + (y1 - y0) * (rows - x1) / (x1 - x0))


def interpolate_flat(points: dict[str, float], rows: float) -> float:
    """``interpolate``, but flat past the last point instead of extended: for residuals (a phase less a model of
    it, a resumed turn less a back-to-back one), whose trend between two points says nothing beyond them."""
    return interpolate(points, min(rows, max(map(int, points))))


def worker_layer_ms(costs: dict[str, Any], experts: int, num_experts: int, top_k: int, tokens: float) -> float:
    """Expected time of one worker's expert calls in one layer under uniform routing: each of the ``tokens``
    picks a given expert with probability top_k / num_experts, so an expert's rows are Binomial(tokens, that); an
    expert with none is not called. The expectation is taken over that distribution, not at its mean: a CPU's
    matmul cost steps with the row count (kernels change at a few rows), so f(mean) misjudges E[f]."""
    return experts * expected_call_ms(costs["expert"], round(tokens), top_k / num_experts)


def expected_call_ms(points: dict[str, float], trials: int, p: float) -> float:
    """E[cost(n) if n > 0] for n ~ Binomial(trials, p), cost interpolated from ``points`` (rows -> ms). Summed over
    mean +- 10 standard deviations (the rest weighs nothing)."""
    if trials <= 0 or p <= 0:
        return 0.0
    if p >= 1:
        return interpolate(points, trials)
    mean, spread = trials * p, 10 * math.sqrt(trials * p * (1 - p)) + 1
    total = 0.0
    for n in range(max(1, math.floor(mean - spread)), min(trials, math.ceil(mean + spread)) + 1):
        log_pmf = (math.lgamma(trials + 1) - math.lgamma(n + 1) - math.lgamma(trials - n + 1)
                   + n * math.log(p) + (trials - n) * math.log1p(-p))
        total += math.exp(log_pmf) * interpolate(points, n)
    return total


def workers_ms(plan: Plan, costs: dict[str, Any], tokens: float) -> tuple[float, list[float]]:
    """One layer's expert calls at ``tokens`` (one micro-batch's) under uniform routing: the time the coordinator
    waits for the slowest worker, expected over routings, and each worker's own expected time. On a CPU node the
    workers share its cores: when they are more than the cores they take turns, so the wait is at least their sum
    over the cores.

    The wait is the expectation of the slowest, not the slowest expectation: with a few tokens the rows fall
    unevenly (one token's two experts on one worker, or on two that run at once), and the slowest of several
    uneven workers waits longer on average than the slowest average worker (``slowest_excess_ms``)."""
    per_worker = [worker_layer_ms(costs, len(w), plan.sizes.num_experts, plan.top_k, tokens) for w in plan.workers]
    return _slowest(plan, per_worker) + slowest_excess_ms(plan, costs["expert"], round(tokens)), per_worker


# Routings drawn to find the slowest worker's expected excess (``slowest_excess_ms``), from a fixed seed so that a
# plan is reproducible and every estimate uses the same draws; and the step size above which the workers' rows are
# even enough (a few percent apart) that the excess is left out.
EXCESS_DRAWS = 400
EXCESS_MAX_TOKENS = 256


def slowest_excess_ms(plan: Plan, points: dict[str, float], tokens: int) -> float:
    """E[wait for the slowest worker] less the wait for the slowest expected worker, at ``tokens`` routed
    uniformly, from EXCESS_DRAWS routings: each expert's rows drawn Binomial(tokens, top_k / E) independently of
    the others' (a top-k router ties them a little: a token's k experts are distinct), each worker's time the sum
    of its experts' calls. 0 with one worker (the wait is its time) and past EXCESS_MAX_TOKENS tokens."""
    if len(plan.workers) < 2 or tokens <= 0 or tokens > EXCESS_MAX_TOKENS:
        return 0.0
    return _slowest_excess(tuple(tuple(w) for w in plan.workers), _cpu_at_once(plan),
                           tuple(sorted((int(k), float(v)) for k, v in points.items())), tokens,
                           plan.top_k / plan.sizes.num_experts)


@functools.lru_cache(maxsize=4096)
def _slowest_excess(workers: tuple[tuple[int, ...], ...], at_once: float | None,
                    points: tuple[tuple[int, float], ...], tokens: int, p: float) -> float:
    table = {str(rows): ms for rows, ms in points}
    # every expert alike: the cumulative chance of each row count, and that count's call cost (none for 0 rows)
    cumulative, cost, total = [], [], 0.0
    for n in range(tokens + 1):
        total += math.comb(tokens, n) * p ** n * (1 - p) ** (tokens - n)
        cumulative.append(total)
        cost.append(interpolate(table, n) if n else 0.0)
    rng = random.Random(0)
    waits, sums = 0.0, [0.0] * len(workers)
    for _ in range(EXCESS_DRAWS):
        times = [sum(cost[min(tokens, bisect.bisect_left(cumulative, rng.random() * total))] for _ in w)
                 for w in workers]
        waits += _wait(times, at_once)
        sums = [a + b for a, b in zip(sums, times, strict=True)]
    # the draws' own mean worker stands in for the exact one, so that their sampling error cancels
    return max(0.0, waits / EXCESS_DRAWS - _wait([t / EXCESS_DRAWS for t in sums], at_once))


def _slowest(plan: Plan, per_worker: list[float]) -> float:
    """The wait for the last worker; on a CPU node at least their sum over the cores they share (a worker's
    cost measured on its threads: as many workers at once as the cores hold their threads)."""
    return _wait(per_worker, _cpu_at_once(plan))


def _cpu_at_once(plan: Plan) -> float | None:
    """How many workers a CPU node runs at once (its cores over a worker's threads); None on GPUs."""
    if plan.hardware.kind == "cpu":
        return max(1.0, plan.hardware.devices / plan.threads.get("worker", 1))
    return None


def _wait(per_worker: list[float], at_once: float | None) -> float:
    if at_once is not None:
        return max(max(per_worker), sum(per_worker) / at_once)
    return max(per_worker)


def parallel_share(cores_busy: float, threads: int) -> float:
    """The share of a call's time spent on all its ``threads`` at once rather than on one, from the cores it kept
    busy on average (``call_cores``, ``expert_calls_cores``): 1 core is none of it, ``threads`` cores all."""
    if threads <= 1:
        return 0.0
    return min(1.0, max(0.0, (cores_busy - 1) / (threads - 1)))


def call_cores(costs: dict[str, Any], key: str, rows: float) -> float:
    """The cores one ``key`` call (coordinator_layer, expert) kept busy at ``rows`` rows, where the calibration
    measured them (workers/link_calibration.py ``cores_busy``: processes of several threads), else 1."""
    cores = costs.get(f"{key}_cores")
    return interpolate(cores, rows) if cores else 1.0


def expert_calls_cores(plan: Plan, costs: dict[str, Any], tokens: float) -> float:
    """``call_cores`` of a worker's expert calls at ``tokens`` a layer, over the rows its experts get under uniform
    routing (as ``worker_layer_ms``), each call weighted by its time."""
    if not costs.get("expert_cores"):
        return 1.0
    trials, p = round(tokens), plan.top_k / plan.sizes.num_experts
    busy_ms = {r: ms * call_cores(costs, "expert", int(r)) for r, ms in costs["expert"].items()}
    wall = expected_call_ms(costs["expert"], trials, p)
    return expected_call_ms(busy_ms, trials, p) / wall if wall > 0 else 1.0


def exchange_cost_ms(plan: Plan, costs: dict[str, Any], tokens: float) -> float:
    """One layer's exchange with the plan's workers at ``tokens``, beyond what ``workers_ms`` says their calls cost.

    Where the calibration timed whole expert phases with real expert shapes in W worker processes
    (workers/link_calibration.py ``expert_phase_ms``: tokens routed at random, the coordinator computing between
    phases), this is that phase less what this model says the calls cost at those tokens (``workers_ms``, the
    same uniform routing): the links, waking workers that slept, the wait for the slowest worker, the worker's
    grouped call around the matmuls, W processes sharing the cores, caches and memory bandwidth. Interpolated over the
    tokens timed (flat beyond), then over W. Else the echo exchange (``exchange_ms``), else LINK_MS_PER_WORKER
    per worker (GPUs described by flags)."""
    workers = len(plan.workers)
    phase = costs.get("expert_phase_ms")
    if phase:
        residual: dict[str, float] = {}
        for count, by_tokens in phase.items():
            shaped = replace(plan, workers=split_experts(plan.sizes.num_experts, int(count)))
            over = {t: ms - workers_ms(shaped, costs, int(t))[0] for t, ms in by_tokens.items()}
            residual[count] = max(0.0, interpolate_flat(over, tokens))
        return interpolate_flat(residual, workers)
    if costs.get("exchange_ms"):
        return interpolate(costs["exchange_ms"], workers)
    return LINK_MS_PER_WORKER * workers


def coordinator_resume_ms(plan: Plan, costs: dict[str, Any], tokens: float) -> float:
    """What the coordinator's turn of a layer costs more in the cluster than in the local engine: the turn follows
    a wait for the workers, during which its core slept (workers/link_calibration.py ``_phase``: a turn timed right
    after an expert phase less the same turn right after the same tokens' expert calls in-process, as the local
    engine's turn follows them). Interpolated over the tokens timed (flat beyond), then over W; 0 where the
    calibration did not time it."""
    resume = costs.get("coordinator_resume_ms")
    if not resume:
        return 0.0
    by_workers = {count: interpolate_flat(by_tokens, tokens) for count, by_tokens in resume.items()}
    return max(0.0, interpolate_flat(by_workers, len(plan.workers)))


def step_ms(plan: Plan, costs: dict[str, Any], tokens: int, micro_batches: int, prefill: bool,
            link_ms: float | None = None, resume_ms: float | None = None) -> float:
    """Predicted step time: per layer, the coordinator's part (attention, router, the MoE bookkeeping around the
    expert calls), then the slowest worker's, then the link; with two micro-batches one's attention runs while the
    workers compute the other's (where both can compute at once: ``plan.overlaps``), so a layer costs the larger of
    the two halves' sums, and a step the smaller once more (filling the pipeline).

    On a CPU node the processes share its cores: workers that are more than the cores take turns (``workers_ms``),
    and everything busy at once (both halves of ping-pong) is at least its sum over the cores. Processes of several
    threads overlap only their one-thread stretches (``parallel_share``): at decode sizes most of their time (a
    small matmul runs on one thread), at prefill sizes little.

    A decode step splits between sequences, never within one: ``tokens`` sequences take at most that many
    micro-batches, as the engine does.

    Where the calibration measured the local engine's own steps (engine_layer, engine_step; engine_prefill_layer,
    engine_prefill_step), a step's coordinator part is that layer less the experts it ran (at least the ops'
    sum), and the per-step rest is measured too. Those are measured back to back; a coordinator's turn comes after
    a wait for the workers and costs ``resume_ms`` more (None: ``coordinator_resume_ms``; 0 for the local
    engine, which never waits)."""
    cfg_layers, top_k = plan.sizes.num_layers, plan.top_k
    if not prefill:  # a step splits between sequences, never within one (cluster/moe/layer.py micro_batches)
        micro_batches = max(1, min(micro_batches, tokens))
    coord_points = costs["coordinator_layer"]
    part = tokens / micro_batches
    if prefill:  # one prompt: attention over its own tokens, measured at PREFILL_TOKENS, scaled by rows
        coord = interpolate(coord_points, part)
    else:
        decode_points = {k: v for k, v in coord_points.items() if int(k) <= max(DECODE_BATCHES)}
        coord = interpolate(decode_points or coord_points, part)
    if costs.get("moe_overhead"):
        coord += interpolate(costs["moe_overhead"], part)
    engine_layer = costs.get("engine_prefill_layer" if prefill else "engine_layer")
    if engine_layer:  # a real step's layer, less the experts it ran in-process
        all_experts = worker_layer_ms(costs, plan.sizes.num_experts, plan.sizes.num_experts, top_k, part)
        coord = max(coord, interpolate(engine_layer, part) - all_experts)
    coord += coordinator_resume_ms(plan, costs, part) if resume_ms is None else resume_ms
    worker, per_worker = workers_ms(plan, costs, part)
    cores = plan.hardware.devices if plan.hardware.kind == "cpu" else 0
    if link_ms is None:  # one layer's exchange with the workers, measured where it could be
        link_ms = exchange_cost_ms(plan, costs, part)
    fill = 0.0  # once per step: the pipeline's start (and end), where one side waits for the other's first half
    if micro_batches == 1:
        layer = coord + worker + link_ms
    elif plan.overlaps:
        # The pipeline runs on across layers (micro-batch 0's next layer is ready before the busier side is free),
        # so a layer costs the busier side's turns; the fill is paid once a step, not once a layer.
        # On a CPU, a call's stretches on several threads run alone: each needs all its threads at once, and a
        # thread the other side holds a core from keeps the rest at its barrier. What runs on one thread overlaps.
        coord_share = parallel_share(call_cores(costs, "coordinator_layer", part), plan.threads.get("coordinator", 1))
        worker_share = parallel_share(expert_calls_cores(plan, costs, part), plan.threads.get("worker", 1))
        alone = coord * coord_share + worker * worker_share
        coord_1, worker_1 = coord * (1 - coord_share), worker * (1 - worker_share)  # their one-thread stretches
        layer = micro_batches * (alone + max(coord_1, worker_1) + link_ms)
        fill = min(coord_1, worker_1)
        if cores:  # the one-thread stretches at once are at least their sum over the cores
            workers_1 = sum(per_worker) * (1 - worker_share)
            layer = max(layer, micro_batches * (alone + (coord_1 + workers_1) / cores + link_ms))
    else:  # no core of its own for each side: the halves take turns
        layer = micro_batches * (coord + worker + link_ms)
    engine_step = costs.get("engine_prefill_step" if prefill else "engine_step")
    if engine_step:  # embeddings, LM head, sampling, scheduling: measured in a real step
        return cfg_layers * layer + fill + interpolate(engine_step, tokens)
    head_rows = 1 if prefill else tokens
    return cfg_layers * layer + fill + interpolate(costs["lm_head"], head_rows)


def predict(plan: Plan, costs: dict[str, Any], source: str) -> None:
    """Fill ``plan.predictions`` (decode at a few batch sizes, a prefill), and pick micro-batches: 2 where they
    are predicted faster than serial, from the smallest batch where that holds."""
    plan.predictions, plan.cost_source = [], source
    wins: list[int] = []
    for batch in DECODE_BATCHES:
        serial = step_ms(plan, costs, batch, 1, prefill=False)
        plan.predictions.append(Prediction("decode", batch, 1, round(serial, 3), round(batch / serial * 1e3, 1)))
        if batch >= 2:
            two = step_ms(plan, costs, batch, 2, prefill=False)
            plan.predictions.append(Prediction("decode", batch, 2, round(two, 3), round(batch / two * 1e3, 1)))
            if two < serial:
                wins.append(batch)
    for micro in (1, 2):
        t = step_ms(plan, costs, PREFILL_TOKENS, micro, prefill=True)
        plan.predictions.append(Prediction("prefill", PREFILL_TOKENS, micro, round(t, 3),
                                           round(PREFILL_TOKENS / t * 1e3, 1)))
    prefill_wins = step_ms(plan, costs, PREFILL_TOKENS, 2, True) < step_ms(plan, costs, PREFILL_TOKENS, 1, True)
    if not wins and not prefill_wins:
        plan.micro_batches = 1
        plan.cluster_options["micro_batches"] = 1
        plan.cluster_options.pop("micro_batch_min_tokens", None)
        chosen = "serial at every batch and prefill predicted (micro-batches 1)"
    else:
        plan.micro_batches = 0
        first = min(wins) if wins else PREFILL_TOKENS
        plan.cluster_options["micro_batches"] = 0
        plan.cluster_options["micro_batch_min_tokens"] = first
        chosen = f"2 micro-batches from {first} tokens a step, where they are predicted faster"
    plan.notes.append(f"schedule from the predicted step times: {chosen}")


def roofline_costs(cfg: ModelConfig, dtype: str, bandwidth_gbs: float, tflops: float, context: int = 128,
                   launch_ms: float = 0.02, layer_overhead_ms: float = 0.15) -> dict[str, Any]:
    """Op costs of a GPU from its datasheet (memory bandwidth, dense TFLOPS) where none is here to measure: each op
    takes the longer of reading its weights (and keys) and doing its math, plus a fixed launch cost."""
    width = DTYPE_BYTES[dtype]
    h, d = cfg.hidden_size, cfg.head_dim
    attn_params = h * cfg.num_heads * d * 2 + h * cfg.num_kv_heads * d * 2 + cfg.num_experts * h
    expert_params = 3 * h * cfg.intermediate_size
    kv_token = 2 * cfg.num_kv_heads * d * width

    def op(bytes_read: float, flops: float) -> float:
        return max(bytes_read / (bandwidth_gbs * GB), flops / (tflops * 1e12)) * 1e3 + launch_ms

    out: dict[str, Any] = {"coordinator_layer": {}, "expert": {}, "lm_head": {}}
    for r in (1, 4, 16, 64, 256, 1024):
        keys = r * context if r <= 64 else r * r / 2
        out["coordinator_layer"][str(r)] = op(attn_params * width + keys * kv_token,
                                              2 * r * attn_params + 4 * keys * cfg.num_heads * d) + layer_overhead_ms
        out["expert"][str(r)] = op(expert_params * width, 2 * r * expert_params)
        out["lm_head"][str(r)] = op(cfg.vocab_size * h * width, 2 * r * cfg.vocab_size * h)
    return out
