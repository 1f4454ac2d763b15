"""What the ingress and the engine deployment exchange: a request, and chunks ready to be rendered as
OpenAI JSON, SSE events or protobuf messages (token texts included, so the ingress needs no tokenizer)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.engine.sampling import SamplingParams, TokenLogprob
from cluster.engine.sequence import Continuation, RequestMetrics, RequestOutput, fold_deltas
from cluster.model.tokenizer import Tokenizer


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

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()


@dataclass
class TokenInfo:
    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token id, text, logprob), best first


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenInfo] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string / token id; None for EOS or length


@dataclass
class GenerateChunk:
    request_id: str
    choices: list[ChoiceDelta]
    finished: bool = False
    prompt_token_ids: list[int] | None = None  # first chunk only
    prompt_text: str | None = None  # first chunk, when echo was asked for
    prompt_logprobs: list[TokenInfo | None] | None = None  # first chunk, with echo + logprobs
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None  # on the last chunk
    e2e_s: float | None = None
    metrics: RequestMetrics | None = None  # on the last chunk: queue / prefill / decode times, inter-token gaps


@dataclass
class Accepted:
    """First item of every stream: the engine took the request (errors before this are request errors)."""

    request_id: str
    prompt_tokens: int
    engine_id: str = ""  # the engine replica that took it (named when the ingress resumes it elsewhere)


def token_info(tokenizer: Tokenizer, lp: TokenLogprob) -> TokenInfo:
    return TokenInfo(lp.token_id, tokenizer.token_text(lp.token_id), lp.logprob,
                     [(t, tokenizer.token_text(t), v) for t, v in lp.top])


def to_chunk(tokenizer: Tokenizer, out: RequestOutput) -> GenerateChunk:
    choices = [ChoiceDelta(d.index, d.text, list(d.token_ids),
                           None if d.logprobs is None else [token_info(tokenizer, lp) for lp in d.logprobs],
                           d.finish_reason, d.stop_reason) for d in out.outputs]
    chunk = GenerateChunk(out.request_id, choices, out.finished, out.prompt_token_ids,
                          prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_generated_tokens)
    if out.prompt_logprobs is not None:
        chunk.prompt_logprobs = [None if lp is None else token_info(tokenizer, lp) for lp in out.prompt_logprobs]
    if out.metrics is not None:
        chunk.ttft_s, chunk.e2e_s, chunk.metrics = out.metrics.ttft, out.metrics.e2e, out.metrics
    return chunk


def merge(chunks: Sequence[GenerateChunk]) -> GenerateChunk:
    """Fold a stream's chunks into one (for non-streaming responses)."""
    first, last = chunks[0], chunks[-1]
    choices = fold_deltas((d for chunk in chunks for d in chunk.choices), lambda i: ChoiceDelta(i, "", []))
    return GenerateChunk(first.request_id, choices, last.finished, first.prompt_token_ids, first.prompt_text,
                         first.prompt_logprobs, last.prompt_tokens, last.completion_tokens, last.ttft_s, last.e2e_s,
                         last.metrics)
