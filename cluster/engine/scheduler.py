"""Iteration-level scheduler: which sequences run in the next forward step, and with how many tokens.

Each step:
  1. running sequences first, oldest first: one token each when decoding, the next chunk when a prompt is
     still being prefilled, within the step's token budget. When the KV cache cannot hold a sequence's new
     tokens, the newest running sequence is preempted (its blocks freed; it is recomputed later).
  2. then waiting sequences, strictly first come first served: the head of the queue is admitted when its
     whole context fits in the free blocks and a sequence slot is free; nothing overtakes it, so a long
     prompt is never starved. Prefill is chunked, so a long prompt never stalls running decodes. An admitted
     sequence starts from the longest prefix of its context the prefix cache holds (new or preempted alike)
     and computes only the rest. When the head's next block is one a running prefill is computing right now
     (requests that arrive together with one shared system prompt), the queue waits for it instead of
     computing it again: a block becomes findable only after the step that computes it, so admitting the head
     in the same step would compute the shared prefix once per request (SGLang's in-batch prefix check does
     the same).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cluster.engine.sequence import Seq, SeqStatus
from cluster.model.kv_cache import KVCacheManager


@dataclass
class ScheduledSeq:
    seq: Seq
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Seq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) copy-on-write

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Decides which sequences run and with how many tokens; every block decision is the KV cache manager's."""

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.num_preemptions = 0

    def add(self, seq: Seq) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Seq) -> None:
        """A fork of a running sequence (parallel sampling): it shares its parent's blocks."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Seq) -> None:
        """Drop a finished or aborted sequence and free its blocks at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self.running.sort(key=lambda s: s.order)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n_new = min(seq.num_uncomputed, budget)
            while (copies := self.kv.allocate_slots(seq, n_new)) is None:
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.block_copies += copies
                out.scheduled.append(ScheduledSeq(seq, n_new))
                budget -= n_new
                i += 1
        if out.preempted:
            return out  # the cache is short: admit nobody new this step
        # Blocks that running prefills will still claim: admitting against them would only cause preemptions.
        reserved = sum(self.kv.blocks_still_needed(s) for s in self.running)
        being_computed = self.kv.blocks_being_computed(self.running)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.request.params.n if seq.request.needs_fork else 1
            if len(self.running) + n > self.max_num_seqs:
                break
            cached = self.kv.cached_prefix(seq, seq.max_cached_prefix)
            if self.kv.next_block_in(seq, len(cached), seq.max_cached_prefix, being_computed):
                break  # a running prefill computes it now: the head finds it cached next step
            if not self.kv.can_admit(seq, reserved, cached):
                break
            self.waiting.popleft()
            self.kv.take_cached(seq, cached)
            n_new = min(seq.num_uncomputed, budget)
            copies = self.kv.allocate_slots(seq, n_new)
            assert copies is not None, "admission checked that the whole context fits"
            out.block_copies += copies
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n_new))
            budget -= n_new
            reserved += self.kv.blocks_still_needed(seq)
            being_computed |= self.kv.blocks_being_computed([seq])
        return out

    def preempt_all(self) -> int:
        """Preempt every running sequence (after a failed step: the cache state is unknown). Returns how many."""
        victims = list(self.running)
        for seq in victims:
            self._preempt(seq)
        return len(victims)

    def _preempt(self, seq: Seq) -> None:
        """Free the sequence's blocks and put it back at the head of the queue, to be recomputed."""
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        # Preempted sequences are older than anything waiting, so they go first, in arrival order.
        self.waiting.appendleft(seq)
        self.waiting = deque(sorted(self.waiting, key=lambda s: s.order))
        self.num_preemptions += 1
