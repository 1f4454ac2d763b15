"""LLMEngine: one step at a time, scheduler -> forward pass -> sampling -> reports.

The jobs around it each have their own home: tokenizing and validating requests (input_processor.py), KV block decisions
(kv_cache.KVCacheManager), which sequences run (scheduler.py), the batch layout (step_batch.py), the model math
(model.py, with a MoE backend: all experts in-process, or an expert pool), tokens to text and reports
(output_processor.py). The engine is single-threaded: ``EngineLoop`` drives it from a thread of its own.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from cluster.engine.api import RECENT_STEPS, EngineStats
from cluster.engine.input_processor import EngineRequest, InputProcessor
from cluster.engine.output_processor import OutputProcessor
from cluster.engine.sampling import (
    RowHistory,
    TokenLogprob,
    banned_tokens,
    process_logits,
    sample,
    sample_seed,
    token_logprobs,
    token_seed,
)
from cluster.engine.scheduler import ScheduledSeq, Scheduler
from cluster.engine.sequence import FINISH_ABORT, Continuation, OutputSink, Request, Seq, SeqStatus
from cluster.engine.structured_output import GrammarConstraints
from cluster.engine.validation import resolve_max_model_len
from cluster.engine_config import EngineConfig
from cluster.errors import QueueFullError, WorkerFailure
from cluster.model.config import ModelConfig
from cluster.model.forward import MixtralTransformer, MoEBackend
from cluster.model.kv_cache import KVCacheManager, PagedKVCache
from cluster.model.step_batch import SeqChunk, build_step_batch, split_micro_batches
from cluster.model.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("moe_cluster.engine")


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
        self.kv = KVCacheManager(num_blocks, self.block_size, engine_cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, engine_cfg.max_num_seqs, engine_cfg.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        eos_ids = set(model_cfg.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.outputs = OutputProcessor(eos_ids, tokenizer)
        self.grammars = GrammarConstraints(tokenizer, model_cfg.vocab_size, sorted(eos_ids))  # structured output
        self.input_processor = InputProcessor(tokenizer, model_cfg.vocab_size, self.max_model_len, num_blocks,
                                              self.block_size, self.grammars)
        self._seq_ids = itertools.count()
        self._stats = EngineStats(kv_blocks_total=num_blocks, kv_block_size=self.block_size)
        self._recent_steps: collections.deque[tuple[int, float]] = collections.deque(maxlen=RECENT_STEPS)
        self._last_micro_batches = 0  # of the last forward pass

    # ----------------------------------------------------------------------------------------- requests

    def add_request(self, request: EngineRequest, sink: OutputSink) -> None:
        """Queue a request the input processor made (validated there, not here); with a continuation, the rest
        of one another engine started (sequence.Continuation)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if len(self.scheduler.waiting) >= self.engine_cfg.max_queue_len:
            raise QueueFullError(f"the engine's queue is full ({self.engine_cfg.max_queue_len} waiting "
                                 "requests); retry later")
        state = Request(request.request_id, list(request.prompt_ids), request.params, request.max_tokens,
                        request.seed, sink, request.arrival_time, request.bad_words_ids, request.prompt_text)
        continuation = request.continuation
        seqs = [self._new_seq(state, 0, list(request.prompt_ids))] if continuation is None else \
            self._resumed_seqs(state, continuation)
        self.requests[request.request_id] = state
        for seq in seqs:
            self.scheduler.add(seq)

    def _resumed_seqs(self, request: Request, continuation: Continuation) -> list[Seq]:
        """A continuation's samples, each its own sequence of prompt + its tokens (no fork: they differ); the
        finished ones only hold their tokens, for usage. Returns the open ones, to be scheduled. The prompt (and
        its logprobs) went out with the first report of the engine that started the request."""
        request.needs_fork, request.prompt_logprobs, request.sent_prompt = False, None, True
        open_seqs = []
        for index, so_far in enumerate(continuation.samples):
            seq = self._new_seq(request, index, list(request.prompt_ids))
            if so_far.finished:
                seq.token_ids.extend(so_far.token_ids)
                seq.status = SeqStatus.FINISHED
            else:
                self.outputs.replay(seq, so_far)
                open_seqs.append(seq)
        return open_seqs

    def _new_seq(self, request: Request, index: int, token_ids: list[int]) -> Seq:
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_ids, request.params.skip_special_tokens)
        seq = Seq(next(self._seq_ids), request, index, token_ids, sample_seed(request.seed, index), detok)
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
            self.grammars.release(seq.seq_id)
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
        scheduled = self.scheduler.schedule()
        if not scheduled.scheduled:
            return 0
        now = time.monotonic()
        chunks = []
        for s in scheduled.scheduled:
            seq, request = s.seq, s.seq.request
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            chunks.append(SeqChunk(seq.token_ids[seq.num_computed:seq.num_computed + s.num_new_tokens],
                                   seq.num_computed, seq.block_table, self._logits_mode(s)))
        forward_started = time.perf_counter()
        logits, chunk_rows = self.execute(chunks, scheduled.block_copies)
        sample_started = time.perf_counter()

        to_sample: list[tuple[Seq, int]] = []
        for s, chunk, rows in zip(scheduled.scheduled, chunks, chunk_rows, strict=True):
            seq = s.seq
            if chunk.logits == "all":
                self._record_prompt_logprobs(seq, chunk.start, logits[rows])
            seq.num_computed += s.num_new_tokens
            self.kv.cache_full_blocks(seq)  # now written: later requests may reuse them
            if seq.num_computed == len(seq.token_ids):
                for member in self._fork_if_needed(seq):
                    to_sample.append((member, rows[-1]))
        if to_sample:
            self._sample_and_append(to_sample, logits)
        self._report(to_sample)
        done = time.perf_counter()
        stats = self._stats
        stats.num_steps += 1
        stats.last_step_tokens = scheduled.num_tokens
        stats.last_step_seconds = done - started
        stats.last_step_micro_batches = self._last_micro_batches
        self._recent_steps.append((scheduled.num_tokens, done - started))
        stats.micro_batch_steps[self._last_micro_batches] = stats.micro_batch_steps.get(self._last_micro_batches, 0) + 1
        # Where steps go: scheduling and layout, the forward pass (MoE included), sampling and reports.
        for phase, seconds in (("schedule", forward_started - started), ("forward", sample_started - forward_started),
                               ("sample_and_report", done - sample_started)):
            stats.step_seconds[phase] = stats.step_seconds.get(phase, 0.0) + seconds
        return scheduled.num_tokens

    def execute(self, chunks: Sequence[SeqChunk], block_copies: Sequence[tuple[int, int]] = ()
                ) -> tuple[Tensor, list[list[int]]]:
        """One forward pass -> (logits (N_out, V), per chunk the indices of its logits rows)."""
        self.cache.copy_blocks(list(block_copies))
        tokens = [len(c.token_ids) for c in chunks]
        groups = split_micro_batches(tokens, self.moe.micro_batches(sum(tokens), len(chunks)))  # contiguous
        self._last_micro_batches = len(groups)
        batches = [build_step_batch(chunks[group.start:group.stop], self.block_size, self.model_cfg.sliding_window,
                                    self.device) for group in groups]
        logits = self.transformer.forward(batches, self.cache, self.moe)
        rows: list[list[int]] = []  # micro-batches in chunk order: their logits concatenate in chunk order
        offset = 0
        for batch, part in zip(batches, logits, strict=True):
            rows.extend([offset + r for r in local_rows] for local_rows in batch.chunk_logit_rows)
            offset += part.shape[0]
        return torch.cat(logits) if len(logits) > 1 else logits[0], rows

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
        if not request.needs_fork:
            return [seq]
        request.needs_fork = False
        members = [seq]
        for index in range(1, request.params.n):
            child = self._new_seq(request, index, list(seq.token_ids))
            child.num_computed = seq.num_computed
            self.kv.fork(seq, child)
            self.scheduler.add_running(child)
            members.append(child)
        return members

    def _sample_and_append(self, to_sample: list[tuple[Seq, int]], logits: Tensor) -> None:
        rows = logits[torch.tensor([row for _, row in to_sample], device=logits.device)]  # (B, V)
        params = [seq.request.params for seq, _ in to_sample]
        seeds = [token_seed(seq.seed, seq.num_generated) for seq, _ in to_sample]
        rows = process_logits(rows, params, [self._history(seq) for seq, _ in to_sample])  # logprobs see these
        if any(p.structured is not None for p in params):  # structured output: one batched grammar bitmask
            self.grammars.apply(rows, [(seq.seq_id, seq.request.params.structured,
                                        seq.token_ids[seq.num_prompt_tokens:]) for seq, _ in to_sample])
        tokens = sample(rows, params, seeds)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        lps: dict[int, TokenLogprob] = {}
        if want:
            idx = torch.tensor(want, device=rows.device)
            for i, lp in zip(want, token_logprobs(rows[idx], tokens[idx], [params[i].logprobs or 0 for i in want]),
                             strict=True):
                lps[i] = lp
        now = time.monotonic()
        for i, (token, (seq, _)) in enumerate(zip(tokens.tolist(), to_sample, strict=True)):
            metrics = seq.request.metrics
            if metrics.first_token_time is None:  # its prefill is done: count its prompt now, so
                metrics.first_token_time = now  # that prompt throughput is measured when it happens
                self._stats.prompt_tokens_total += len(seq.request.prompt_ids)
            elif metrics.last_token_time is not None and metrics.last_token_time < now:  # once per step
                metrics.inter_token_latencies.append(now - metrics.last_token_time)
            metrics.last_token_time = now
            if params[i].structured is not None:
                self.grammars.accept(seq.seq_id, token)
            self.outputs.append_token(seq, token, lps.get(i))
            if seq.finish_reason is not None:
                self.grammars.release(seq.seq_id)
            self._stats.generation_tokens_total += 1

    def _history(self, seq: Seq) -> RowHistory:
        """What the logits processors of ``seq`` need (empty for a request that uses none)."""
        params = seq.request.params
        if not params.processes_logits:
            return RowHistory((), ())
        output = seq.token_ids[seq.num_prompt_tokens:]
        banned = banned_tokens(params, output, self.outputs.eos_ids, seq.request.bad_words_ids)
        return RowHistory(seq.token_ids[:seq.num_prompt_tokens], output, banned)

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
        finished = request.closed or (not request.needs_fork and request.finished)
        out = self.outputs.build_output(request, seqs, finished, error)
        if finished:
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
                tables.append(self.kv.allocate_table(len(ids)))
            chunks = [SeqChunk(list(ids), 0, table, "all") for ids, table in zip(token_lists, tables, strict=True)]
            logits, rows = self.execute(chunks)
            return [logits[r] for r in rows]
        finally:
            for table in tables:
                self.kv.free_table(table)

    @property
    def can_recover(self) -> bool:
        return self.moe.can_recover

    def recover(self, failure: WorkerFailure) -> None:
        """After a worker failure: every running sequence is preempted (the failed step sampled nothing, so
        their tokens and random streams are intact) and the MoE backend replaces the failed members. The
        sequences are then recomputed from their prompt plus what they had generated. Raises if the backend
        cannot recover."""
        if not self.can_recover:
            raise failure
        started = time.monotonic()
        preempted = self.scheduler.preempt_all()
        self.moe.recover(failure)
        self._stats.recoveries += 1
        self._stats.last_recovery_seconds = time.monotonic() - started
        log.warning("recovered from '%s' in %.1fs; %d sequences will be recomputed", failure,
                    self._stats.last_recovery_seconds, preempted)

    def heartbeat(self) -> None:
        """Called by the loop when idle (the cluster backend tells its workers it is alive)."""
        self.moe.heartbeat()

    def stats(self) -> EngineStats:
        s = self._stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_blocks_used = self.kv.num_used
        s.kv_blocks_cached = self.kv.allocator.num_cached
        s.prefix_cache_queries_total = self.kv.prefix_stats.queries
        s.prefix_cache_hits_total = self.kv.prefix_stats.hits
        s.num_preemptions = self.scheduler.num_preemptions
        s.tokens_per_expert = self.moe.routing_counts()
        s.backend = self.moe.timings()
        return EngineStats(**(vars(s) | {"step_seconds": dict(s.step_seconds),
                                         "micro_batch_steps": dict(s.micro_batch_steps),
                                         "recent_steps": list(self._recent_steps)}))
