"""Serving-side configuration, separate from the model's architecture (ModelConfig).

``EngineConfig`` says how one engine runs (device, dtype, batching limits, KV cache budget);
``ClusterConfig`` says how the expert-parallel cluster is laid out on Ray. Both are frozen and checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from cluster.config import parse_dtype


def _check_positive(name: str, value: Any, integer: bool = True) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value <= 0:
        kind = "integer" if integer else "number"
        raise ValueError(f"{name} must be a positive {kind}, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: str  # checkpoint directory
    dtype: str | None = None  # None: the checkpoint's own dtype
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:N"
    max_num_seqs: int = 64  # sequences in one forward step
    max_num_batched_tokens: int = 1024  # tokens in one forward step (prefill is chunked to fit)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16  # tokens per KV cache block
    kv_cache_gib: float | None = None  # KV cache budget in GiB ...
    kv_cache_fraction: float = 0.25  # ... or this fraction of the device's free memory
    num_kv_blocks: int | None = None  # exact block count (overrides the budget; for tests)
    max_queue_len: int = 1024  # waiting requests beyond which new ones are refused
    progress: bool = True  # progress bars while loading weights

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a checkpoint directory, got {self.model!r}")
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
        if self.kv_cache_gib is not None:
            _check_positive("kv_cache_gib", self.kv_cache_gib, integer=False)
        if not isinstance(self.kv_cache_fraction, (int, float)) or not 0 < self.kv_cache_fraction <= 0.95:
            raise ValueError(f"kv_cache_fraction must be in (0, 0.95], got {self.kv_cache_fraction!r}")

    def with_(self, **changes: Any) -> EngineConfig:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EngineConfig:
        return cls(**_known(cls, raw, "engine"))


@dataclass(frozen=True)
class ClusterConfig:
    experts_per_worker: int = 1  # experts hosted by one ExpertWorker actor
    address: str | None = None  # Ray address; None starts (or joins) a local embedded Ray
    use_gpus: bool | None = None  # None: one GPU per actor when the Ray cluster has GPUs
    worker_num_cpus: float = 1.0  # CPUs reserved per actor
    placement_timeout_s: float = 60.0  # give up gang scheduling after this long
    collective_timeout_s: float = 60.0  # a member silent this long is reported stuck
    heartbeat_s: float = 2.0  # idle workers are pinged this often through the process group
    backend: str = "auto"  # "auto" (nccl when all members use CUDA, else gloo), "gloo", "nccl"
    exchange: str = "auto"  # "auto" (collective on nccl, sparse on gloo), "collective", "sparse"
    inline_message_bytes: int = 16 * 1024  # sparse exchange: rows up to this size travel inside the work message
    placement_strategy: str = "PACK"  # Ray placement group strategy for the cluster's bundles
    threads_per_actor: int | None = None  # torch intra-op threads per actor; None: max(1, worker_num_cpus)
    start_timeout_s: float = 300.0  # loading weights and joining the process group must end within this
    recover_workers: bool = True  # replace a failed expert worker and recompute (False: fail every request)

    def __post_init__(self) -> None:
        _check_positive("experts_per_worker", self.experts_per_worker)
        for name in ("worker_num_cpus", "placement_timeout_s", "collective_timeout_s", "heartbeat_s"):
            _check_positive(name, getattr(self, name), integer=False)
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {self.backend!r}")
        if self.exchange not in ("auto", "collective", "sparse"):
            raise ValueError(f"exchange must be 'auto', 'collective' or 'sparse', got {self.exchange!r}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                             f"got {self.placement_strategy!r}")
        if isinstance(self.inline_message_bytes, bool) or not isinstance(self.inline_message_bytes, int) \
                or self.inline_message_bytes < 0:
            raise ValueError(f"inline_message_bytes must be an integer >= 0, got {self.inline_message_bytes!r}")
        if self.threads_per_actor is not None:
            _check_positive("threads_per_actor", self.threads_per_actor)
        _check_positive("start_timeout_s", self.start_timeout_s, integer=False)
        if self.heartbeat_s >= self.collective_timeout_s:
            raise ValueError(f"heartbeat_s={self.heartbeat_s} must be shorter than "
                             f"collective_timeout_s={self.collective_timeout_s}")

    @property
    def actor_threads(self) -> int:
        return self.threads_per_actor or max(1, int(self.worker_num_cpus))

    def with_(self, **changes: Any) -> ClusterConfig:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ClusterConfig:
        return cls(**_known(cls, raw, "cluster"))


def _known(cls: type, raw: dict[str, Any], section: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{section} config must be a mapping, got {raw!r}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"unknown {section} config field(s) {unknown}; known: {sorted(names)}")
    return dict(raw)
