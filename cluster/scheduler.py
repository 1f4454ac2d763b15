"""Iteration-level scheduler: which sequences run in the next forward step, and with how many tokens.

Each step:
  1. running sequences first, oldest first: one token each when decoding, the next chunk when a prompt is
     still being prefilled, within the step's token budget. When the KV cache cannot hold a sequence's new
     tokens, the newest running sequence is preempted (its blocks freed; it is recomputed later).
  2. then waiting sequences, strictly first come first served: the head of the queue is admitted when its
     whole context fits in the free blocks and a sequence slot is free; nothing overtakes it, so a long
     prompt is never starved. Prefill is chunked, so a long prompt never stalls running decodes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cluster.kv_cache import BlockAllocator, blocks_for
from cluster.sequence import Seq, SeqStatus


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
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
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
        self.allocator.release_all(seq.block_table)
        seq.status = SeqStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self.running.sort(key=lambda s: s.order)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n_new = min(seq.num_uncomputed, budget)
            while not self._can_append(seq, n_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self._append_slots(seq, n_new, out)
                out.scheduled.append(ScheduledSeq(seq, n_new))
                budget -= n_new
                i += 1
        if out.preempted:
            return out  # the cache is short: admit nobody new this step
        # Blocks that running prefills will still claim: admitting against them would only cause preemptions.
        reserved = sum(blocks_for(len(s.token_ids), self.block_size) - len(s.block_table) for s in self.running)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.request.params.n if not seq.request.forked else 1
            if len(self.running) + n > self.max_num_seqs:
                break
            needed = blocks_for(len(seq.token_ids), self.block_size)
            if needed > self.allocator.num_free - reserved:
                break
            self.waiting.popleft()
            n_new = min(seq.num_uncomputed, budget)
            self._append_slots(seq, n_new, out)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n_new))
            budget -= n_new
            reserved += needed - len(seq.block_table)
        return out

    def _blocks_needed(self, seq: Seq, n_new: int) -> int:
        needed = blocks_for(seq.num_computed + n_new, self.block_size) - len(seq.block_table)
        return needed + (1 if self._cow_block(seq) is not None else 0)

    def _can_append(self, seq: Seq, n_new: int) -> bool:
        return self._blocks_needed(seq, n_new) <= self.allocator.num_free

    def _cow_block(self, seq: Seq) -> int | None:
        """Index in the block table of a shared, partly filled block the next token would write into."""
        if seq.num_computed % self.block_size == 0:
            return None
        idx = seq.num_computed // self.block_size
        return idx if self.allocator.refcount(seq.block_table[idx]) > 1 else None

    def _append_slots(self, seq: Seq, n_new: int, out: SchedulerOutput) -> None:
        cow = self._cow_block(seq)
        if cow is not None:
            src = seq.block_table[cow]
            dst = self.allocator.allocate()
            self.allocator.release(src)
            seq.block_table[cow] = dst
            out.block_copies.append((src, dst))
        while len(seq.block_table) < blocks_for(seq.num_computed + n_new, self.block_size):
            seq.block_table.append(self.allocator.allocate())

    def preempt_all(self) -> int:
        """Preempt every running sequence (after a failed step: the cache state is unknown). Returns how many."""
        victims = list(self.running)
        for seq in victims:
            self._preempt(seq)
        return len(victims)

    def _preempt(self, seq: Seq) -> None:
        """Free the sequence's blocks and put it back at the head of the queue, to be recomputed."""
        self.running.remove(seq)
        self.allocator.release_all(seq.block_table)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        # Preempted sequences are older than anything waiting, so they go first, in arrival order.
        self.waiting.appendleft(seq)
        self.waiting = deque(sorted(self.waiting, key=lambda s: s.order))
        self.num_preemptions += 1
