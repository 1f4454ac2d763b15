"""What every engine reports and takes, torch-free: ``EngineStats``, ``Prompt``, request ids. The interface itself
is client.py's ``EngineClient``."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Prompt = str | Sequence[int]  # text, or token ids


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


RECENT_STEPS = 64  # steps whose times EngineStats.recent_steps keeps


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_block_size: int = 0
    kv_blocks_cached: int = 0  # blocks the prefix cache can find (held or free)
    prefix_cache_queries_total: int = 0  # context tokens looked up in the prefix cache at admission
    prefix_cache_hits_total: int = 0  # of those, tokens found there (not computed again)
    num_preemptions: int = 0
    num_steps: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    last_step_tokens: int = 0
    last_step_seconds: float = 0.0
    last_step_micro_batches: int = 0  # micro-batches the last step's forward pass was split into (1: serial)
    micro_batch_steps: dict[int, int] = field(default_factory=dict)  # micro-batches of a step -> steps so split
    recoveries: int = 0  # expert-worker failures the engine recovered from
    last_recovery_seconds: float = 0.0
    tokens_per_expert: list[list[int]] = field(default_factory=list)  # [layer][global expert]
    backend: dict[str, Any] = field(default_factory=dict)  # MoE backend timings (cluster: exchange time)
    step_seconds: dict[str, float] = field(default_factory=dict)  # schedule / forward / sample_and_report, summed
    # The last RECENT_STEPS steps, oldest first: (tokens computed, seconds). Per-step times for benchmarks and the
    # cost model's calibration: a step's own time, without a request's admission and output around it.
    recent_steps: list[tuple[int, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

