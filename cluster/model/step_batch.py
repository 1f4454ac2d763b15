"""One forward step's batch layout: which token rows the step computes, where their keys and values live in
the paged KV cache, and which rows need logits. Pure bookkeeping: no model math.

Shape legend: T new tokens in the step (all sequences, flattened), Bd sequences decoding one token,
S keys attended, N_out rows whose logits are wanted.
Token rows are ordered: all single-token (decode) sequences first, then the multi-token (prefill) chunks (the
step's one reordering; ``logits_rows`` lists the logits rows in chunk order, so the logits come back unpermuted).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cluster.model.ops import attention_mask


@dataclass(frozen=True)
class SeqChunk:
    """New tokens of one sequence for this step."""

    token_ids: Sequence[int]
    start: int  # position of the first new token (= tokens already in the cache)
    block_table: Sequence[int]
    logits: str = "last"  # which rows need logits: "last", "all" or "none"


@dataclass
class DecodeGroup:
    rows: int  # token rows [0, rows) are single-token sequences
    key_slots: Tensor  # (Bd, S) cache slot of each key, padded
    mask: Tensor  # (Bd, 1, 1, S)


@dataclass
class PrefillChunk:
    start_row: int
    end_row: int
    key_slots: Tensor  # (S,)
    mask: Tensor  # (1, 1, n, S)


@dataclass
class StepBatch:
    token_ids: Tensor  # (T,)
    positions: Tensor  # (T,)
    slot_mapping: Tensor  # (T,) cache slot each new token's K/V is written to
    decode: DecodeGroup | None
    prefills: list[PrefillChunk]
    logits_rows: Tensor  # (N_out,) token rows whose logits are computed
    chunk_logit_rows: list[list[int]]  # per input chunk: indices into logits_rows, in input order


def _slots(block_table: Sequence[int], positions: range, block_size: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in positions]


def build_step_batch(chunks: Sequence[SeqChunk], block_size: int, sliding_window: int | None,
                     device: torch.device | str) -> StepBatch:
    """Lay out one step: decode sequences first, then prefill chunks; keys limited to the window."""
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].token_ids) != 1)  # stable: decodes first
    tokens: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    row_of_chunk: dict[int, int] = {}
    for i in order:
        c = chunks[i]
        row_of_chunk[i] = len(tokens)
        new = range(c.start, c.start + len(c.token_ids))
        tokens.extend(c.token_ids)
        positions.extend(new)
        slot_mapping.extend(_slots(c.block_table, new, block_size))

    def key_range(c: SeqChunk) -> range:
        end = c.start + len(c.token_ids)
        first = max(0, c.start - sliding_window + 1) if sliding_window else 0
        return range(first, end)

    decodes = [chunks[i] for i in order if len(chunks[i].token_ids) == 1]
    decode = None
    if decodes:
        q_pos = torch.tensor([c.start for c in decodes])  # (Bd,)
        key_start = (q_pos - sliding_window + 1).clamp(min=0) if sliding_window else torch.zeros_like(q_pos)
        k_pos = key_start[:, None] + torch.arange(int((q_pos - key_start).max()) + 1)[None, :]  # (Bd, S)
        valid = k_pos <= q_pos[:, None]
        k_pos = torch.where(valid, k_pos, 0)  # padding keys read slot of position 0, masked out
        width = max(len(c.block_table) for c in decodes)
        tables = torch.tensor([[*c.block_table, *[0] * (width - len(c.block_table))] for c in decodes])
        slots = tables.gather(1, k_pos // block_size) * block_size + k_pos % block_size  # (Bd, S)
        mask = attention_mask(q_pos[:, None], k_pos, valid, sliding_window)  # (Bd, 1, S)
        decode = DecodeGroup(rows=len(decodes), key_slots=slots.to(device), mask=mask[:, None].to(device))
    prefills = []
    for i in order[len(decodes):]:
        c = chunks[i]
        keys = key_range(c)
        k_pos = torch.tensor(keys)
        q_pos = torch.arange(c.start, c.start + len(c.token_ids))
        mask = attention_mask(q_pos, k_pos, torch.ones(len(keys), dtype=torch.bool), sliding_window)
        start = row_of_chunk[i]
        prefills.append(PrefillChunk(start, start + len(c.token_ids),
                                     torch.tensor(_slots(c.block_table, keys, block_size), device=device),
                                     mask[None, None].to(device)))
    logits_rows: list[int] = []
    chunk_logit_rows: list[list[int]] = []
    for i, c in enumerate(chunks):
        first, n = row_of_chunk[i], len(c.token_ids)
        rows = [first + n - 1] if c.logits == "last" else list(range(first, first + n)) if c.logits == "all" else []
        chunk_logit_rows.append(list(range(len(logits_rows), len(logits_rows) + len(rows))))
        logits_rows.extend(rows)

    def as_long(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return StepBatch(as_long(tokens), as_long(positions), as_long(slot_mapping), decode, prefills,
                     as_long(logits_rows), chunk_logit_rows)


def split_micro_batches(chunk_tokens: Sequence[int], count: int) -> list[range]:
    """Cut a step's chunks, kept in their order, into ``count`` contiguous micro-batches of about equal tokens
    (fewer when there are fewer chunks): chunk_tokens (n,) new tokens of each chunk -> the chunk range of each
    micro-batch. Each cut goes where the running token sum is nearest its share, as SGLang's two-batch overlap
    splits at the half sum: nothing is reordered, so the micro-batches' logits concatenate in chunk order. A
    chunk is never split (its tokens attend to each other within one layer's attention)."""
    n = len(chunk_tokens)
    count = max(1, min(count, n))
    running = list(itertools.accumulate(chunk_tokens, initial=0))  # (n+1,) tokens of chunks [0, j)
    cuts = [0]
    for i in range(1, count):
        share = running[-1] * i / count
        # the cut after the last one that leaves at least one chunk to each micro-batch still to come
        candidates = range(cuts[-1] + 1, n - (count - i) + 1)
        cuts.append(min(candidates, key=lambda j: abs(running[j] - share)))
    cuts.append(n)
    return [range(a, b) for a, b in itertools.pairwise(cuts)]
