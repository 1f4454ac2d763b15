"""Serving-side configuration, separate from the model's architecture (ModelConfig).

``EngineConfig`` says how one engine runs (device, dtype, batching limits, KV cache budget); ``ClusterConfig``
how a coordinator runs and talks to its expert pool; ``PoolConfig`` the expert pool's shape and placement.
All are frozen and checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cluster.config_fields import known_fields
from cluster.model.config import parse_dtype
from cluster.model.quant import ExpertQuantization, expert_quantization
from cluster.moe.autoscale import AutoscalePolicy


def _check_positive(name: str, value: Any, integer: bool = True) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value <= 0:
        kind = "integer" if integer else "number"
        raise ValueError(f"{name} must be a positive {kind}, got {value!r}")


# OpenMP's wait policy for a process's torch intra-op threads (OMP_WAIT_POLICY, read once as torch loads, so it is
# set in the process's environment through its Ray runtime_env). By default an idle thread spins for a while
# before it sleeps: harmless in a process alone on its cores, but a coordinator and workers taking turns on the same
# cores then spin on the cores the other needs (measured on 2 cores, docs/architecture.md "Threads").
# "passive" makes them sleep at once; None leaves OpenMP's default.
OMP_WAIT_POLICIES = (None, "active", "passive")


def _check_omp_wait_policy(name: str, value: Any) -> None:
    if value not in OMP_WAIT_POLICIES:
        raise ValueError(f"{name} must be 'passive', 'active' or null (OpenMP's default), got {value!r}")


def omp_runtime_env(policy: str | None) -> dict[str, Any]:
    """The Ray runtime_env that sets a process's OpenMP wait policy ({} for OpenMP's default); Ray merges its
    env_vars with the job's."""
    return {"env_vars": {"OMP_WAIT_POLICY": policy.upper()}} if policy else {}


@dataclass(frozen=True)
class EngineConfig:
    model: str  # checkpoint directory, or a Hugging Face Hub id org/name[@revision] (see model_dir)
    dtype: str | None = None  # None: the checkpoint's own dtype
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:N"
    max_num_seqs: int = 64  # sequences in one forward step
    max_num_batched_tokens: int = 1024  # tokens in one forward step (prefill is chunked to fit)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16  # tokens per KV cache block
    kv_cache_gib: float | None = None  # KV cache budget in GiB ...
    kv_cache_fraction: float = 0.25  # ... or this fraction of the device's free memory
    num_kv_blocks: int | None = None  # exact block count (overrides the budget; for tests)
    enable_prefix_caching: bool = True  # reuse the KV blocks of a cached context prefix (kv_cache.py)
    max_queue_len: int = 1024  # waiting requests beyond which new ones are refused
    progress: bool = True  # progress bars while loading weights
    # Expert weights held quantized (weight-only; attention, routers, embeddings untouched): "int8" (per output
    # channel) or "int4" (group-wise scales, quantize_group_size input features per scale; default
    # cluster/model/quant.py DEFAULT_INT4_GROUP_SIZE), dequantized per call to the compute dtype. None: as stored.
    quantize_experts: str | None = None
    quantize_group_size: int | None = None
    # The chat template, replacing the checkpoint's: a Jinja template, or the path of a file holding one (as
    # vLLM's --chat-template). None: chat_template.jinja beside the tokenizer, else tokenizer_config's.
    chat_template: str | None = None

    def __post_init__(self) -> None:
        expert_quantization(self.quantize_experts, self.quantize_group_size)  # checks both
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a checkpoint directory or a Hub id, got {self.model!r}")
        if self.chat_template is not None and (not isinstance(self.chat_template, str) or not self.chat_template):
            raise ValueError(f"chat_template must be a template or a file path, got {self.chat_template!r}")
        if self.dtype is not None:
            parse_dtype(self.dtype)
        if not isinstance(self.device, str) or not (
                self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_queue_len"):
            _check_positive(name, getattr(self, name))
        for name in ("max_model_len", "num_kv_blocks"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}")
        if self.kv_cache_gib is not None:
            _check_positive("kv_cache_gib", self.kv_cache_gib, integer=False)
        if not isinstance(self.kv_cache_fraction, (int, float)) or not 0 < self.kv_cache_fraction <= 0.95:
            raise ValueError(f"kv_cache_fraction must be in (0, 0.95], got {self.kv_cache_fraction!r}")

    def model_dir(self) -> str:
        """The checkpoint directory in this process: ``model`` itself, or a Hub id's snapshot, resolved by each
        process that reads the checkpoint (an expert worker on another node has a Hugging Face cache of its own;
        an id travels between processes as it is, never as one machine's path)."""
        from cluster.model.hub import resolve_model

        return resolve_model(self.model)

    @property
    def expert_quantization(self) -> ExpertQuantization | None:
        return expert_quantization(self.quantize_experts, self.quantize_group_size)

    def chat_template_text(self) -> str | None:
        """The chat_template option's template: the file's text when it names a file."""
        if self.chat_template is None:
            return None
        if "{" not in self.chat_template:  # no Jinja tag: a file name
            path = Path(self.chat_template).expanduser()
            if not path.is_file():
                raise ValueError(f"chat_template file {self.chat_template!r} does not exist")
            return path.read_text()
        return self.chat_template

    def with_(self, **changes: Any) -> EngineConfig:
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EngineConfig:
        return cls(**known_fields(cls, raw, "engine"))


@dataclass(frozen=True)
class ClusterConfig:
    """A coordinator of the expert-parallel cluster: where it runs and how it talks to the expert pool."""

    address: str | None = None  # Ray address; None starts (or joins) a local embedded Ray
    use_gpus: bool | None = None  # the coordinator on a GPU; None: when the Ray cluster has GPUs
    coordinator_num_cpus: float = 1.0  # CPUs reserved for a coordinator (a ClusterEngine actor, a Serve replica)
    # Share of a GPU a coordinator reserves when it runs on one: 1 a device of its own; below 1 it may share a
    # device with expert workers (Ray fractional GPUs; NCCL refuses two ranks on one device, so such a pair
    # needs link "shm", which stages rows through host memory).
    coordinator_num_gpus: float = 1.0
    coordinator_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources it needs too
    coordinator_threads: int = 1  # torch intra-op threads of the coordinator's engine
    coordinator_omp_wait_policy: str | None = None  # its threads' OpenMP wait policy (OMP_WAIT_POLICIES)
    link: str = "auto"  # "auto" (shared memory with workers on its node when tensors are on CPU, else "pg"),
    #                     "shm", or "pg" (a process group of two per worker)
    backend: str = "auto"  # pg links: "auto" (nccl when both ends use CUDA, else gloo), "gloo", "nccl"
    heartbeat_s: float = 2.0  # an idle coordinator tells its workers it is alive this often
    # Micro-batches per step (ping-pong: one's attention runs while the experts work on another's rows):
    # 0 = auto (2 once a step has micro_batch_min_tokens tokens, else 1), or a fixed count (1 = serial). Splitting
    # halves the rows of every expert call, which costs more than it overlaps until calls are large: on the
    # 2-core CPU of docs/benchmarks.md the crossover is about 512 tokens per step.
    micro_batches: int = 0
    micro_batch_min_tokens: int = 512
    start_timeout_s: float = 300.0  # loading weights and attaching to the pool must end within this
    recover_workers: bool = True  # have the pool replace a failed expert worker and recompute (False: fail)

    def __post_init__(self) -> None:
        for name in ("coordinator_num_cpus", "heartbeat_s", "start_timeout_s"):
            _check_positive(name, getattr(self, name), integer=False)
        _check_positive("coordinator_threads", self.coordinator_threads)
        _check_omp_wait_policy("coordinator_omp_wait_policy", self.coordinator_omp_wait_policy)
        _check_gpu_share("coordinator_num_gpus", self.coordinator_num_gpus)
        _check_positive("micro_batch_min_tokens", self.micro_batch_min_tokens)
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) \
                or not 0 <= self.micro_batches <= 8:
            raise ValueError(f"micro_batches must be an integer in [0, 8] (0: auto), got {self.micro_batches!r}")
        _check_resources("coordinator_resources", self.coordinator_resources)
        if self.link not in ("auto", "shm", "pg"):
            raise ValueError(f"link must be 'auto', 'shm' or 'pg', got {self.link!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {self.backend!r}")

    def with_(self, **changes: Any) -> ClusterConfig:
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ClusterConfig:
        return cls(**known_fields(cls, raw, "cluster"))


@dataclass(frozen=True)
class PoolConfig:
    """The expert pool of one model: its workers' shape and placement, apart from any coordinator."""

    experts_per_worker: int = 1  # experts hosted by one ExpertWorker actor
    use_gpus: bool | None = None  # one GPU per worker; None: when the Ray cluster has GPUs
    worker_num_cpus: float = 1.0  # CPUs reserved per worker
    worker_num_gpus: float = 1.0  # share of a GPU per worker when the pool uses GPUs (below 1: workers share one)
    worker_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources each worker needs too
    threads_per_worker: int | None = None  # torch intra-op threads per worker; None: max(1, worker_num_cpus)
    worker_omp_wait_policy: str | None = None  # their threads' OpenMP wait policy (OMP_WAIT_POLICIES)
    placement_strategy: str = "PACK"  # Ray placement group strategy for the workers' bundles
    placement_timeout_s: float = 60.0  # give up gang scheduling after this long
    start_timeout_s: float = 300.0  # a worker must load its experts within this
    link_timeout_s: float = 60.0  # a link silent this long in the middle of an exchange is dead
    link_slots: int = 4  # messages one coordinator may have in flight to one worker
    link_slot_bytes: int = 1 << 20  # shared-memory links: rows up to this size per message go through memory
    # A worker holding one coordinator's rows of a layer waits up to this long for another busy coordinator's
    # rows of the same layer, to run each expert once on both (0: never wait). It must cover how far apart
    # coordinators' layers may drift (about one layer of attention) for them to fall into step.
    merge_wait_ms: float = 10.0
    # Expert load balancing (cluster/moe/eplb.py): this many extra expert slots across the pool (per layer) hold
    # replicas of the hottest experts once a rebalance has placed them; every rebalance_interval_s seconds
    # (0: never by itself) the pool measures the load of the last rebalance_window intervals and, when its
    # imbalance (the most loaded worker's rows over the mean) exceeds rebalance_threshold, moves to a better map.
    redundant_experts: int = 0
    # The elastic pool (ExpertPool.resize): this many started ExpertWorker processes holding no experts wait, each
    # with its resources reserved, so that growing the pool only loads experts (a new worker process takes seconds
    # to start, far more on a busy node); a grow takes them first and starts new spares afterwards.
    spare_workers: int = 0
    # An autoscaling policy for the pool's size (cluster/moe/autoscale.py): {min_workers, max_workers, and
    # target_rows_per_worker_s or target_expert_wait_ms, optional cooldown_s, interval_s, tolerance}; None: the
    # size changes only when asked (POST /scale_expert_pool).
    autoscale: dict[str, Any] | None = None
    rebalance_interval_s: float = 0.0
    rebalance_threshold: float = 1.1
    rebalance_window: int = 4
    # Issue 23, the expert cache (workers/expert_cache.py): experts per layer each worker keeps in device memory
    # (GPU memory, or memory in the compute dtype on a CPU), the rest read from a host store on demand, least
    # recently used evicted first; replicas count against it. 0 = every hosted expert resident.
    expert_cache_size: int = 0
    # With a cache: coordinators guess the experts this many layers ahead (1 or 2) and tell the workers, which
    # load them in the background (0 = no prefetch).
    expert_prefetch_lookahead: int = 1

    def __post_init__(self) -> None:
        _check_positive("experts_per_worker", self.experts_per_worker)
        if isinstance(self.redundant_experts, bool) or not isinstance(self.redundant_experts, int) \
                or self.redundant_experts < 0:
            raise ValueError(f"redundant_experts must be an integer >= 0, got {self.redundant_experts!r}")
        if isinstance(self.rebalance_interval_s, bool) or not isinstance(self.rebalance_interval_s, (int, float)) \
                or not 0 <= self.rebalance_interval_s < float("inf"):
            raise ValueError(f"rebalance_interval_s must be a number of seconds >= 0 (0: never), "
                             f"got {self.rebalance_interval_s!r}")
        if isinstance(self.rebalance_threshold, bool) or not isinstance(self.rebalance_threshold, (int, float)) \
                or not 1 <= self.rebalance_threshold < float("inf"):
            raise ValueError(f"rebalance_threshold must be a number >= 1, got {self.rebalance_threshold!r}")
        _check_positive("rebalance_window", self.rebalance_window)
        if self.autoscale is not None:
            AutoscalePolicy.from_dict(self.autoscale)
        if isinstance(self.spare_workers, bool) or not isinstance(self.spare_workers, int) or self.spare_workers < 0:
            raise ValueError(f"spare_workers must be an integer >= 0, got {self.spare_workers!r}")
        for name in ("worker_num_cpus", "placement_timeout_s", "start_timeout_s", "link_timeout_s"):
            _check_positive(name, getattr(self, name), integer=False)
        for name in ("link_slots", "link_slot_bytes"):
            _check_positive(name, getattr(self, name))
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                             f"got {self.placement_strategy!r}")
        if isinstance(self.merge_wait_ms, bool) or not isinstance(self.merge_wait_ms, (int, float)) \
                or not 0 <= self.merge_wait_ms <= 1000:
            raise ValueError(f"merge_wait_ms must be in [0, 1000], got {self.merge_wait_ms!r}")
        if self.threads_per_worker is not None:
            _check_positive("threads_per_worker", self.threads_per_worker)
        _check_omp_wait_policy("worker_omp_wait_policy", self.worker_omp_wait_policy)
        if isinstance(self.expert_cache_size, bool) or not isinstance(self.expert_cache_size, int) \
                or self.expert_cache_size < 0:
            raise ValueError(f"expert_cache_size must be an integer >= 0 (experts per layer; 0: all resident), "
                             f"got {self.expert_cache_size!r}")
        if isinstance(self.expert_prefetch_lookahead, bool) or self.expert_prefetch_lookahead not in (0, 1, 2):
            raise ValueError(f"expert_prefetch_lookahead must be 0 (off), 1 or 2 layers, "
                             f"got {self.expert_prefetch_lookahead!r}")
        _check_gpu_share("worker_num_gpus", self.worker_num_gpus)
        _check_resources("worker_resources", self.worker_resources)

    @property
    def actor_threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.worker_num_cpus))

    def with_(self, **changes: Any) -> PoolConfig:
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PoolConfig:
        return cls(**known_fields(cls, raw, "pool"))


def _check_gpu_share(name: str, value: Any) -> None:
    """A Ray GPU request: a fraction in (0, 1] (actors sharing a device) or a whole number of devices."""
    _check_positive(name, value, integer=False)
    if value > 1 and value != int(value):
        raise ValueError(f"{name} must be in (0, 1] or a whole number of GPUs, got {value!r}")


def _check_resources(name: str, value: Any) -> None:
    """Custom Ray resources: {name: amount}; CPU and GPU have fields of their own."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                              and not isinstance(v, bool) and v > 0 for k, v in value.items()):
        raise ValueError(f"{name} must map resource names to positive amounts, got {value!r}")
    reserved = sorted(set(value) & {"CPU", "GPU", "memory", "object_store_memory"})
    if reserved:
        raise ValueError(f"{name} may not set {reserved}: they have fields of their own")
