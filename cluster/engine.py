"""LLMEngine: scheduler + paged KV cache + transformer + a MoE backend, advanced one step at a time.

The same engine serves the local path (``LocalMoE``: all experts in-process) and the cluster path
(``DistributedMoE``: experts on Ray actors behind an all-to-all). It is single-threaded: ``EngineLoop``
(async_engine.py) drives it from a background thread for concurrent callers.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cluster.config import ModelConfig
from cluster.engine_config import EngineConfig
from cluster.errors import WorkerFailure
from cluster.kv_cache import BlockAllocator, PagedKVCache, blocks_for, kv_bytes_per_block
from cluster.model import MixtralTransformer, MoEBackend, SeqChunk, build_step_batch
from cluster.sampling import SamplingParams, TokenLogprob, sample, token_logprobs
from cluster.scheduler import ScheduledSeq, Scheduler
from cluster.sequence import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    CompletionDelta,
    OutputSink,
    Request,
    RequestOutput,
    Seq,
    SeqStatus,
)
from cluster.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("moe_cluster.engine")


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full; retry later (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_block_size: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    last_step_tokens: int = 0
    last_step_seconds: float = 0.0
    recoveries: int = 0  # expert-worker failures the engine recovered from
    last_recovery_seconds: float = 0.0
    tokens_per_expert: list[list[int]] = field(default_factory=list)  # [layer][global expert]
    backend: dict[str, Any] = field(default_factory=dict)  # MoE backend timings (cluster: all-to-all time)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available")
    return device


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 * 2**30


def kv_cache_blocks(model_cfg: ModelConfig, engine_cfg: EngineConfig, dtype: torch.dtype,
                    device: torch.device, max_model_len: int) -> int:
    """Blocks that fit the budget, capped at what max_num_seqs full-length sequences could ever use."""
    if engine_cfg.num_kv_blocks is not None:
        return engine_cfg.num_kv_blocks
    per_block = kv_bytes_per_block(model_cfg, engine_cfg.block_size, dtype)
    budget = (engine_cfg.kv_cache_gib * 2**30 if engine_cfg.kv_cache_gib is not None
              else available_memory_bytes(device) * engine_cfg.kv_cache_fraction)
    blocks = int(budget // per_block)
    if blocks < 1:
        raise ValueError(f"the KV cache budget ({budget / 2**30:.3f} GiB) is smaller than one block "
                         f"({per_block} bytes)")
    return min(blocks, engine_cfg.max_num_seqs * blocks_for(max_model_len, engine_cfg.block_size))


class LLMEngine:
    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, tokenizer: Tokenizer,
                 transformer: MixtralTransformer, moe: MoEBackend, num_blocks: int) -> None:
        self.model_cfg = model_cfg
        self.engine_cfg = engine_cfg
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.moe = moe
        self.device = transformer.device
        self.max_model_len = resolve_max_model_len(model_cfg, engine_cfg)
        self.block_size = engine_cfg.block_size
        self.cache = PagedKVCache.allocate(model_cfg, num_blocks, self.block_size, transformer.dtype, self.device)
        self.allocator = BlockAllocator(num_blocks)
        self.scheduler = Scheduler(self.allocator, self.block_size, engine_cfg.max_num_seqs,
                                   engine_cfg.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self.eos_ids = set(model_cfg.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.default_generator = torch.Generator(device=self.device).manual_seed(engine_cfg.seed)
        self._seq_ids = itertools.count()
        self._stats = EngineStats(kv_blocks_total=num_blocks, kv_block_size=self.block_size)

    # ----------------------------------------------------------------------------------------- requests

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> int:
        """Check a request against the model and the cache; returns max_tokens resolved. Thread-safe."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        vocab = self.model_cfg.vocab_size
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise ValueError("prompt must contain at least one token")
        for i, token in enumerate(prompt_ids):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise ValueError(f"prompt token id {token!r} at position {i} is outside the vocabulary "
                                 f"[0, {vocab})")
        for token in params.stop_token_ids:
            if token >= vocab:
                raise ValueError(f"stop_token_ids holds {token}, outside the vocabulary [0, {vocab})")
        n_prompt = len(prompt_ids)
        if n_prompt >= self.max_model_len:
            raise ValueError(f"the prompt has {n_prompt} tokens but the model's context length is "
                             f"{self.max_model_len} tokens, leaving no room to generate")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n_prompt
        if n_prompt + max_tokens > self.max_model_len:
            raise ValueError(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the "
                             f"model's context length of {self.max_model_len} tokens")
        needed = blocks_for(n_prompt + max_tokens, self.block_size)
        if needed > self.allocator.num_blocks:
            raise ValueError(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) needs {needed} "
                             f"KV cache blocks but the cache holds only {self.allocator.num_blocks} "
                             f"({self.allocator.num_blocks * self.block_size} tokens)")
        return max_tokens

    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                    sink: OutputSink, arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        max_tokens = self.validate(prompt_ids, params)
        if len(self.scheduler.waiting) >= self.engine_cfg.max_queue_len:
            raise QueueFullError(f"the engine's queue is full ({self.engine_cfg.max_queue_len} waiting "
                                 "requests); retry later")
        request = Request(request_id, list(prompt_ids), params, max_tokens, sink, arrival_time)
        seq = self._new_seq(request, 0, list(prompt_ids))
        self.requests[request_id] = request
        self.scheduler.add(seq)

    def _new_seq(self, request: Request, index: int, token_ids: list[int]) -> Seq:
        seed = request.params.sample_seed(index)
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_ids, request.params.skip_special_tokens)
        seq = Seq(next(self._seq_ids), request, index, token_ids, generator, detok)
        request.seqs.append(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        """Stop a request now, free its blocks, and send its final report. False if unknown."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._emit(request, self._close(request))
        return True

    def _close(self, request: Request) -> list[Seq]:
        """Finish every unfinished sample of ``request`` as aborted; returns them."""
        request.closed = True
        open_seqs = [seq for seq in request.seqs if seq.status is not SeqStatus.FINISHED]
        for seq in open_seqs:
            self.scheduler.remove(seq)
            seq.finish_reason = FINISH_ABORT
        return open_seqs

    def fail_all(self, message: str) -> None:
        """The engine cannot go on: every request gets a final report carrying the error."""
        for request in list(self.requests.values()):
            self._emit(request, self._close(request), error=message)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # --------------------------------------------------------------------------------------------- step

    def step(self) -> int:
        """Schedule, run one forward pass, sample, and report. Returns the number of tokens computed."""
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return 0
        now = time.monotonic()
        chunks = []
        for s in plan.scheduled:
            seq, request = s.seq, s.seq.request
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            chunks.append(SeqChunk(seq.token_ids[seq.num_computed:seq.num_computed + s.num_new_tokens],
                                   seq.num_computed, seq.block_table, self._logits_mode(s)))
        logits, chunk_rows = self.execute(chunks, plan.block_copies)

        to_sample: list[tuple[Seq, int]] = []
        for s, chunk, rows in zip(plan.scheduled, chunks, chunk_rows, strict=True):
            seq = s.seq
            if chunk.logits == "all":
                self._record_prompt_logprobs(seq, chunk.start, logits[rows])
            seq.num_computed += s.num_new_tokens
            if seq.num_computed == len(seq.token_ids):
                for member in self._fork_if_needed(seq):
                    to_sample.append((member, rows[-1]))
        if to_sample:
            self._sample_and_append(to_sample, logits)
        self._report(to_sample)
        self._stats.num_steps += 1
        self._stats.last_step_tokens = plan.num_tokens
        self._stats.last_step_seconds = time.perf_counter() - started
        return plan.num_tokens

    def execute(self, chunks: Sequence[SeqChunk], block_copies: Sequence[tuple[int, int]] = ()
                ) -> tuple[Tensor, list[list[int]]]:
        """One forward pass -> (logits (N_out, V), per chunk the indices of its logits rows)."""
        self.cache.copy_blocks(list(block_copies))
        batch = build_step_batch(chunks, self.block_size, self.model_cfg.sliding_window, self.device)
        return self.transformer.forward(batch, self.cache, self.moe), batch.chunk_logit_rows

    def _logits_mode(self, s: ScheduledSeq) -> str:
        seq, request = s.seq, s.seq.request
        pending = request.prompt_logprobs
        if pending is not None and len(pending) < seq.num_prompt_tokens and seq.index == 0:
            return "all"
        return "last" if seq.num_computed + s.num_new_tokens == len(seq.token_ids) else "none"

    def _record_prompt_logprobs(self, seq: Seq, start: int, logits: Tensor) -> None:
        """Row j of ``logits`` predicts the token at position start + j + 1."""
        request = seq.request
        pending = request.prompt_logprobs
        assert pending is not None
        targets = [(j, start + j + 1) for j in range(logits.shape[0])
                   if len(pending) <= start + j + 1 < seq.num_prompt_tokens]  # skip what a recompute repeats
        if not targets:
            return
        rows = torch.tensor([j for j, _ in targets], device=logits.device)
        chosen = torch.tensor([seq.token_ids[p] for _, p in targets], device=logits.device)
        top_n = [request.params.logprobs or 0] * len(targets)
        pending.extend(token_logprobs(logits[rows], chosen, top_n))

    def _fork_if_needed(self, seq: Seq) -> list[Seq]:
        """At the end of the prompt, a request with n > 1 forks into n samples sharing its blocks."""
        request = seq.request
        if request.forked:
            return [seq]
        request.forked = True
        members = [seq]
        for index in range(1, request.params.n):
            child = self._new_seq(request, index, list(seq.token_ids))
            child.num_computed = seq.num_computed
            child.block_table = list(seq.block_table)
            for block in child.block_table:
                self.allocator.share(block)
            self.scheduler.add_running(child)
            members.append(child)
        return members

    def _sample_and_append(self, to_sample: list[tuple[Seq, int]], logits: Tensor) -> None:
        rows = logits[torch.tensor([row for _, row in to_sample], device=logits.device)]  # (B, V)
        params = [seq.request.params for seq, _ in to_sample]
        tokens = sample(rows, params, [seq.generator for seq, _ in to_sample], self.default_generator)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        lps: dict[int, TokenLogprob] = {}
        if want:
            idx = torch.tensor(want, device=rows.device)
            for i, lp in zip(want, token_logprobs(rows[idx], tokens[idx], [params[i].logprobs or 0 for i in want]),
                             strict=True):
                lps[i] = lp
        now = time.monotonic()
        for i, (token, (seq, _)) in enumerate(zip(tokens.tolist(), to_sample, strict=True)):
            if seq.request.metrics.first_token_time is None:
                seq.request.metrics.first_token_time = now
            self._append_token(seq, token, lps.get(i))

    def _append_token(self, seq: Seq, token: int, logprob: TokenLogprob | None) -> None:
        params = seq.request.params
        seq.token_ids.append(token)
        self._stats.generation_tokens_total += 1
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        if token in params.stop_token_ids:
            self._finish(seq, FINISH_STOP, token)
        elif not params.ignore_eos and token in self.eos_ids:
            self._finish(seq, FINISH_STOP, None)
        else:
            before = len(seq.text)
            seq.text += seq.detok.add(token)
            if not self._check_stop_strings(seq, before) and seq.num_generated >= seq.request.max_tokens:
                self._finish(seq, FINISH_LENGTH, None)

    def _check_stop_strings(self, seq: Seq, before: int) -> bool:
        stops = seq.request.params.stop
        if not stops:
            return False
        longest = max(len(s) for s in stops)
        search_from = max(0, before - longest + 1)
        hits = [(i, s) for s in stops if (i := seq.text.find(s, search_from)) != -1]
        if not hits:
            return False
        index, stop = min(hits)
        seq.text = seq.text[:index]
        self._finish(seq, FINISH_STOP, stop)
        return True

    def _finish(self, seq: Seq, reason: str, stop_reason: str | int | None) -> None:
        if seq.finish_reason is None:
            seq.finish_reason, seq.stop_reason = reason, stop_reason

    # ------------------------------------------------------------------------------------------ reports

    def _report(self, sampled: list[tuple[Seq, int]]) -> None:
        by_request: dict[str, list[Seq]] = {}
        for seq, _ in sampled:
            by_request.setdefault(seq.request.request_id, []).append(seq)
        for request_id, seqs in by_request.items():
            request = self.requests[request_id]
            for seq in seqs:
                if seq.finish_reason is not None:
                    self.scheduler.remove(seq)
            self._emit(request, seqs)

    def _emit(self, request: Request, seqs: Sequence[Seq], error: str | None = None) -> None:
        deltas = []
        for seq in seqs:
            done = seq.finish_reason is not None
            end = len(seq.text) if done else len(seq.text) - _stop_holdback(seq.text, request.params.stop)
            text = seq.text[seq.emitted_chars:max(end, seq.emitted_chars)]
            new_tokens = seq.token_ids[seq.num_prompt_tokens + seq.emitted_tokens:]
            seq.emitted_chars += len(text)
            seq.emitted_tokens += len(new_tokens)
            logprobs = seq.pending_logprobs if request.params.logprobs is not None else None
            seq.pending_logprobs = []
            deltas.append(CompletionDelta(seq.index, text, new_tokens, logprobs, seq.finish_reason,
                                          seq.stop_reason))
        finished = request.closed or (request.forked and request.finished)
        out = RequestOutput(request.request_id, deltas, finished=finished,
                            num_prompt_tokens=len(request.prompt_ids),
                            num_generated_tokens=request.num_generated, error=error)
        if not request.sent_prompt:
            request.sent_prompt = True
            out.prompt_token_ids = list(request.prompt_ids)
            out.prompt_logprobs = request.prompt_logprobs
        if finished:
            request.metrics.finished_time = time.monotonic()
            out.metrics = request.metrics
            self._stats.prompt_tokens_total += len(request.prompt_ids)
            del self.requests[request.request_id]
        try:
            request.sink(out)
        except Exception:  # a consumer's failure must never stop the engine
            log.exception("output sink of request %s failed; aborting it", request.request_id)
            if not finished:
                self._close(request)
                del self.requests[request.request_id]

    # ------------------------------------------------------------------------------------------- others

    def score(self, token_lists: Sequence[Sequence[int]]) -> list[Tensor]:
        """Full-sequence logits (len, V) for each token list, in one batch, leaving no state behind."""
        tables: list[list[int]] = []
        try:
            for ids in token_lists:
                need = blocks_for(len(ids), self.block_size)
                if need > self.allocator.num_free:
                    raise ValueError(f"scoring needs {need} free KV blocks, {self.allocator.num_free} are free")
                tables.append([self.allocator.allocate() for _ in range(need)])
            chunks = [SeqChunk(list(ids), 0, table, "all") for ids, table in zip(token_lists, tables, strict=True)]
            logits, rows = self.execute(chunks)
            return [logits[r] for r in rows]
        finally:
            for table in tables:
                self.allocator.release_all(table)

    @property
    def can_recover(self) -> bool:
        return bool(getattr(self.moe, "can_recover", False))

    def recover(self, failure: WorkerFailure) -> None:
        """After a worker failure: every running sequence is preempted (the failed step sampled nothing, so
        their tokens and random streams are intact) and the MoE backend replaces the failed members. The
        sequences are then recomputed from their prompt plus what they had generated. Raises if the backend
        cannot recover."""
        if not self.can_recover:
            raise failure
        started = time.monotonic()
        preempted = self.scheduler.preempt_all()
        self.moe.recover(failure)  # type: ignore[attr-defined]
        self._stats.recoveries += 1
        self._stats.last_recovery_seconds = time.monotonic() - started
        log.warning("recovered from '%s' in %.1fs; %d sequences will be recomputed", failure,
                    self._stats.last_recovery_seconds, preempted)

    def heartbeat(self) -> None:
        """Called by the loop when idle (the cluster backend pings its workers)."""
        beat = getattr(self.moe, "heartbeat", None)
        if beat is not None:
            beat()

    def stats(self) -> EngineStats:
        s = self._stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_blocks_used = self.allocator.num_used
        s.num_preemptions = self.scheduler.num_preemptions
        routing = getattr(self.moe, "stats", None)
        s.tokens_per_expert = [list(row) for row in routing.counts] if routing is not None else []
        timings = getattr(self.moe, "timings", None)
        s.backend = dict(timings) if timings is not None else {}
        return EngineStats(**vars(s))


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


def resolve_max_model_len(model_cfg: ModelConfig, engine_cfg: EngineConfig) -> int:
    if engine_cfg.max_model_len is None:
        return model_cfg.max_position_embeddings
    if engine_cfg.max_model_len > model_cfg.max_position_embeddings:
        raise ValueError(f"max_model_len={engine_cfg.max_model_len} exceeds the model's "
                         f"max_position_embeddings={model_cfg.max_position_embeddings}")
    return engine_cfg.max_model_len
