"""The coordinator's part of the Mixtral forward pass: embeddings, attention over the paged KV cache,
norms, routing gates and the LM head. The MoE feed-forward is delegated to a ``MoEBackend`` (local experts
or the expert-parallel cluster), which is the only thing that differs between engines.

Shape legend: T new tokens in the step (all sequences, flattened), H hidden, Q/KV heads, D head dim,
Bd sequences decoding one token, S keys attended, V vocabulary, N_out rows whose logits are wanted.
Token rows are ordered: all single-token (decode) sequences first, then the multi-token (prefill) chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.checkpoint import CoordinatorWeights
from cluster.config import ModelConfig
from cluster.kv_cache import PagedKVCache
from cluster.ops import apply_rope, attention, attention_mask, rms_norm, rope_cos_sin, rope_inv_freq


class MoEBackend(Protocol):
    def begin_step(self, num_tokens: int) -> None:
        """Called once before the layers of a forward step run (the cluster announces the step here)."""

    def moe(self, layer: int, x: Tensor, gate_weight: Tensor) -> Tensor:
        """x (T, H) -> the MoE output (T, H) of ``layer``."""
        ...


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


class MixtralTransformer:
    """Non-expert weights plus the forward pass over a StepBatch."""

    def __init__(self, cfg: ModelConfig, weights: CoordinatorWeights) -> None:
        self.cfg = cfg
        self.w = weights
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(self.device)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache: PagedKVCache, moe: MoEBackend) -> Tensor:
        """-> float32 logits (N_out, V) for ``batch.logits_rows``."""
        cfg = self.cfg
        x = F.embedding(batch.token_ids, self.w.embed)  # (T, H)
        cos, sin = rope_cos_sin(batch.positions, self.inv_freq, self.dtype)  # (T, D) each
        moe.begin_step(x.shape[0])
        for layer, lw in enumerate(self.w.layers):
            h = rms_norm(x, lw.attn_norm, cfg.rms_norm_eps)
            x = x + self._attention(layer, h, cos, sin, batch, cache)
            h = rms_norm(x, lw.moe_norm, cfg.rms_norm_eps)
            x = x + moe.moe(layer, h, lw.gate)
        x = rms_norm(x[batch.logits_rows], self.w.final_norm, cfg.rms_norm_eps)  # (N_out, H)
        return F.linear(x, self.w.lm_head).float()

    def _attention(self, layer: int, x: Tensor, cos: Tensor, sin: Tensor, batch: StepBatch,
                   cache: PagedKVCache) -> Tensor:
        cfg, lw = self.cfg, self.w.layers[layer]
        n, q_dim, kv_dim = x.shape[0], cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = F.linear(x, lw.wqkv).split([q_dim, kv_dim, kv_dim], dim=-1)  # (T, Q*D), (T, KV*D) x2
        q = apply_rope(q.view(n, cfg.num_heads, cfg.head_dim), cos, sin)  # (T, Q, D)
        k = apply_rope(k.view(n, cfg.num_kv_heads, cfg.head_dim), cos, sin)  # (T, KV, D)
        v = v.view(n, cfg.num_kv_heads, cfg.head_dim)  # (T, KV, D)
        cache.write(layer, batch.slot_mapping, k, v)
        k_cache, v_cache = cache.k[layer], cache.v[layer]  # (slots, KV, D)
        out = torch.empty_like(q)  # (T, Q, D)
        if batch.decode is not None:
            d = batch.decode
            keys = k_cache[d.key_slots].transpose(1, 2)  # (Bd, S, KV, D) -> (Bd, KV, S, D)
            values = v_cache[d.key_slots].transpose(1, 2)
            out[: d.rows] = attention(q[: d.rows, :, None, :], keys, values, d.mask)[:, :, 0, :]  # (Bd, Q, D)
        for p in batch.prefills:
            keys = k_cache[p.key_slots].transpose(0, 1)[None]  # (S, KV, D) -> (1, KV, S, D)
            values = v_cache[p.key_slots].transpose(0, 1)[None]
            queries = q[p.start_row:p.end_row].transpose(0, 1)[None]  # (n, Q, D) -> (1, Q, n, D)
            out[p.start_row:p.end_row] = attention(queries, keys, values, p.mask)[0].transpose(0, 1)
        return F.linear(out.view(n, cfg.num_heads * cfg.head_dim), lw.wo)  # (T, H)
