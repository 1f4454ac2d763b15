"""The coordinator's part of the Mixtral forward pass: embeddings, attention over the paged KV cache,
norms, routing gates and the LM head. The MoE feed-forward is delegated to a ``MoEBackend`` (local experts
or the expert-parallel cluster), which is the only thing that differs between engines.

Shape legend: T new tokens in the step (all sequences, flattened), H hidden, Q/KV heads, D head dim,
Bd sequences decoding one token, S keys attended, V vocabulary, N_out rows whose logits are wanted.
The step's token rows are laid out by step_batch.py.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.checkpoint import CoordinatorWeights
from cluster.config import ModelConfig
from cluster.errors import WorkerFailure
from cluster.kv_cache import PagedKVCache
from cluster.ops import apply_rope, attention, rms_norm, rope_cos_sin, rope_inv_freq
from cluster.step_batch import StepBatch


class MoEBackend(Protocol):
    """Where the experts run: every engine call on its MoE backend is declared here."""

    @property
    def can_recover(self) -> bool:
        """Whether ``recover`` can replace failed experts (the local backend cannot fail that way)."""
        ...

    def begin_step(self, num_tokens: int) -> None:
        """Called once before the layers of a forward step run."""

    def moe(self, layer: int, x: Tensor, gate_weight: Tensor) -> Tensor:
        """x (T, H) -> the MoE output (T, H) of ``layer``."""
        ...

    def routing_counts(self) -> list[list[int]]:
        """Rows routed so far to each [layer][global expert]."""
        ...

    def timings(self) -> dict[str, float]:
        """Seconds spent so far per phase (route, exchange, combine, ...) and a ``steps`` count."""
        ...

    def heartbeat(self) -> None:
        """Called while the engine is idle."""

    def recover(self, failure: WorkerFailure) -> None:
        """Replace what failed; the engine recomputes every running sequence afterwards."""

    def close(self) -> None:
        """Release workers and links (best effort)."""


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
