"""Requests, their sequences (one per parallel sample), and what the engine reports about them."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from cluster.engine.sampling import SamplingParams, TokenLogprob
from cluster.model.tokenizer import IncrementalDetokenizer

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    last_token_time: float | None = None
    # Per step that gave the request new tokens after its first: the time since the previous such step (vLLM's
    # inter-token latency, one sample per step and request).
    inter_token_latencies: list[float] = field(default_factory=list)

    @property
    def queue_time(self) -> float | None:
        """Arrival to first scheduled (vLLM's request_queue_time)."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def prefill_time(self) -> float | None:
        """First scheduled to first token (vLLM's request_prefill_time)."""
        if self.first_scheduled_time is None or self.first_token_time is None:
            return None
        return self.first_token_time - self.first_scheduled_time

    @property
    def decode_time(self) -> float | None:
        """First token to the last (vLLM's request_decode_time)."""
        if self.first_token_time is None or self.finished_time is None:
            return None
        return self.finished_time - self.first_token_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    """What one sample produced: since the last report (in a RequestOutput), or in all (folded, fold_completions).
    Logprobs carry their token texts (the output processor attaches them), so a wire adapter needs no tokenizer."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (None for EOS)


@dataclass
class RequestOutput:
    """One report for a request, the one output type from the output processor to the wire adapters (HTTP, gRPC):
    what its samples produced since the last report; the last one has ``finished`` set. ``merge_outputs`` joins
    several into one."""

    request_id: str
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_token_ids: list[int] | None = None  # in the first report only
    seed: int | None = None  # in the first report: the seed the request is sampled with (given or drawn)
    prompt_text: str | None = None  # in the first report, with echo
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with echo + logprobs, first report
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0  # all samples, so far
    metrics: RequestMetrics | None = None  # in the last report
    error: str | None = None  # set when the engine failed the request


def fold_completions(deltas: Iterable[CompletionOutput]) -> list[CompletionOutput]:
    """Join each sample's deltas in order, by index: texts, token ids and logprobs concatenated, the last finish
    and stop reasons."""
    by_index: dict[int, CompletionOutput] = {}
    for d in deltas:
        c = by_index.get(d.index)
        if c is None:
            c = by_index[d.index] = CompletionOutput(d.index)
        c.text += d.text
        c.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            c.logprobs = (c.logprobs or []) + d.logprobs
        if d.finish_reason is not None:
            c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    return [by_index[i] for i in sorted(by_index)]


def merge_outputs(outputs: Sequence[RequestOutput]) -> RequestOutput:
    """Consecutive reports of one request as one (a coalesced stream item, a non-streaming response)."""
    first, last = outputs[0], outputs[-1]
    return RequestOutput(first.request_id, fold_completions(d for out in outputs for d in out.outputs),
                         last.finished, first.prompt_token_ids, first.seed, first.prompt_text, first.prompt_logprobs,
                         last.num_prompt_tokens, last.num_generated_tokens, last.metrics, last.error)


@dataclass
class RequestResult:
    """A finished request, all reports folded together (what generate() returns)."""

    request_id: str
    prompt_token_ids: list[int]
    completions: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    metrics: RequestMetrics | None = None

    @classmethod
    def fold(cls, outputs: Sequence[RequestOutput]) -> RequestResult:
        out = merge_outputs(outputs)
        return cls(out.request_id, list(out.prompt_token_ids or []), out.outputs, out.prompt_logprobs,
                   out.num_prompt_tokens, out.num_generated_tokens, out.metrics)


@dataclass(frozen=True)
class SampleSoFar:
    """What one sample of a request had produced, as its consumer received it, when its engine stopped."""

    token_ids: tuple[int, ...] = ()  # every token generated and reported
    text_chars: int = 0  # characters of text delivered (text held back for a possible stop string is not)
    finished: bool = False  # a finish reason was reported: nothing more to generate


@dataclass(frozen=True)
class Continuation:
    """The continuation form of a request: it resumes, on this engine, a request another engine started (and
    died serving). One SampleSoFar per sample (SamplingParams.n of them, by index). Each open sample becomes
    prompt + its tokens, recomputed by prefill, with its detokenizer replayed, so stop strings and text go on as
    if nothing happened; its next token is drawn with token_seed(sample seed, position), so given the request's
    seed (required when sampling) the result is exactly the uninterrupted one. Finished samples are not
    generated again but still count in usage. Reports carry only what comes after: tokens after the given
    ones, text after the delivered characters, logprobs of new tokens, no prompt; the budget is what
    max_tokens leaves after the given tokens."""

    samples: tuple[SampleSoFar, ...]


OutputSink = Callable[[RequestOutput], None]
_arrival_counter = itertools.count()


class Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_tokens: int, seed: int,
                 sink: OutputSink, arrival_time: float | None = None,
                 bad_words_ids: Sequence[Sequence[int]] = (), prompt_text: str | None = None) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_tokens = max_tokens  # params.max_tokens resolved against the context length
        self.sink = sink
        self.arrival_order = next(_arrival_counter)
        self.metrics = RequestMetrics(arrival_time if arrival_time is not None else time.monotonic())
        self.seqs: list[Seq] = []
        self.seed = seed  # params.seed, or the one the input processor drew
        self.needs_fork = params.n > 1  # forks into n samples when its prompt is computed
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] if params.echo and params.logprobs is not None else None)
        self.sent_prompt = False
        self.bad_words_ids = bad_words_ids  # params.bad_words as token sequences
        self.prompt_text = prompt_text  # the prompt as text, when it was given as text (for echo)
        self.closed = False  # aborted or failed: no more reports after the final one

    @property
    def finished(self) -> bool:
        return all(s.status is SeqStatus.FINISHED for s in self.seqs)

    @property
    def num_generated(self) -> int:
        return sum(s.num_generated for s in self.seqs)


class Seq:
    """One sample of a request: its tokens, its KV blocks and its output state."""

    def __init__(self, seq_id: int, request: Request, index: int, token_ids: list[int],
                 seed: int, detok: IncrementalDetokenizer) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.token_ids = token_ids
        self.num_prompt_tokens = len(request.prompt_ids)
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of its full blocks (kv_cache.chain_block_hash)
        self.num_cached_blocks = 0  # blocks of block_table in the prefix cache
        self.status = SeqStatus.WAITING
        self.seed = seed  # this sample's seed; token i is drawn with token_seed(seed, i)
        self.detok = detok
        self.text = ""  # output text so far (stop strings already cut)
        self.emitted_chars = 0
        self.emitted_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.pending_logprobs: list[TokenLogprob] = []

    @property
    def order(self) -> tuple[int, int]:
        """First come, first served: by request arrival, then sample index."""
        return (self.request.arrival_order, self.index)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def max_cached_prefix(self) -> int:
        """Tokens at most that may come from the prefix cache: all but the last (its logits are sampled from),
        and, while the prompt logprobs of echo + logprobs are not all computed, none whose logits they still need
        (a fresh such request computes its whole prompt, as vLLM does; one preempted after them reuses it)."""
        limit = len(self.token_ids) - 1
        pending = self.request.prompt_logprobs
        if pending is not None and len(pending) < self.num_prompt_tokens:
            limit = min(limit, len(pending) - 1)
        return limit
