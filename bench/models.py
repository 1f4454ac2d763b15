"""Checkpoints the benchmarks run on, written in the real Hugging Face format (cached under /tmp)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.model.demo import init_demo

CACHE = Path("/tmp/moe-cluster-bench")

SIZES: dict[str, dict[str, Any]] = {
    # The demo model itself: every step is dominated by per-message overheads.
    "demo": {},
    # About 152M parameters, experts dominating (2/3 of a local decode step's time at 32 sequences): the shape
    # the cluster's throughput targets are measured on.
    "bench": dict(hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
                  vocab_size=8000),
    # Wide enough that expert matmuls, not messages, dominate a decode step (1.4 GB of experts in fp32).
    "mid": dict(hidden_size=1024, intermediate_size=3584, num_layers=4, num_heads=16, num_kv_heads=4, head_dim=64),
}


def describe(size: str) -> str:
    from cluster.model.config import ModelConfig

    cfg = ModelConfig.from_file(bench_model(size))
    return (f"'{size}': {cfg.num_layers} layers, hidden {cfg.hidden_size}, expert intermediate "
            f"{cfg.intermediate_size}, {cfg.num_experts} experts top-{cfg.experts_per_token}, "
            f"{cfg.num_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size}, {cfg.dtype}")


def bench_model(size: str, router_skew: float = 0.0) -> Path:
    """The checkpoint of ``size``; with ``router_skew`` > 0, its routers prefer some experts per layer
    (cluster/model/demo.py), for the load-balancing benchmark."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    path = CACHE / (f"{size}-skew{router_skew:g}" if router_skew else size)
    if not (path / "config.json").exists():
        init_demo(path, seed=0, shards=4, overwrite=True, router_skew=router_skew, **SIZES[size])
    return path
