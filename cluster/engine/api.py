"""What every engine offers its callers, torch-free: the local engine, the cluster engine and a Serve engine
replica all implement ``EngineClient``; ``EngineStats`` is what they report."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cluster.engine.sampling import SamplingParams
    from cluster.engine.sequence import RequestOutput, RequestResult
    from cluster.model.config import ModelConfig
    from cluster.model.tokenizer import Tokenizer

Prompt = str | Sequence[int]  # text, or token ids


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


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

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class EngineClient(Protocol):
    """The engine API: generate a batch, stream one request, abort, stats, health, shutdown."""

    tokenizer: Tokenizer
    model_config: ModelConfig
    max_model_len: int

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[RequestResult]: ...

    def stream(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None
               ) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def health(self) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...
