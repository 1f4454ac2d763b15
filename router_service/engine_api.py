"""What the ingress and the engine deployment exchange: a request, ``Accepted``, then the engine's own outputs
(cluster.engine.sequence.RequestOutput, token texts included, so the ingress needs no tokenizer), rendered by
the adapters as OpenAI JSON, SSE events or protobuf messages."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import Continuation


@dataclass
class GenerateRequest:
    request_id: str
    params: SamplingParams
    prompt: str | list[int] | None = None  # text or token ids ...
    messages: list[dict[str, Any]] | None = None  # ... or chat messages (rendered with the chat template)
    chat_options: dict[str, Any] = field(default_factory=dict)  # Tokenizer.render_chat's options for messages
    deadline: float | None = None  # wall-clock time (time.time()) after which the request is aborted
    # Set when the ingress resumes the request on another engine replica: what the client has received so far.
    continuation: Continuation | None = None
    # False when the client takes the answer whole (a non-streamed completion, gRPC Generate): after Accepted the
    # engine replica sends one item, the finished output, instead of one per stream interval. Each item costs
    # CPU in both replicas, and on a small node that CPU is the engine's.
    stream: bool = True

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()


@dataclass
class Accepted:
    """First item of every stream: the engine took the request (errors before this are request errors)."""

    request_id: str
    prompt_tokens: int
    engine_id: str = ""  # the engine replica that took it (named when the ingress resumes it elsewhere)
    seed: int | None = None  # the seed the engine samples the request with (its own, or one it drew)
