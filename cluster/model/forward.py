"""The coordinator's part of the Mixtral forward pass: embeddings, attention over the paged KV cache,
norms, routing gates and the LM head. The MoE feed-forward is delegated to a ``MoEBackend`` (local experts
or an expert pool), which is the only thing that differs between engines.

A step may be split into micro-batches (disjoint sets of sequences) that take turns, layer by layer: while the
experts work on one micro-batch's rows, the coordinator runs the next one's attention (the ping-pong pipeline of
MegaScale-Infer; dual-batch overlap in vLLM and SGLang). The plan is in ``MixtralTransformer.forward``.

Shape legend: T new tokens in the step (all sequences, flattened), H hidden, Q/KV heads, D head dim,
Bd sequences decoding one token, S keys attended, V vocabulary, N_out rows whose logits are wanted.
The step's token rows are laid out by step_batch.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.errors import WorkerFailure
from cluster.model.checkpoint import CoordinatorWeights
from cluster.model.config import ModelConfig
from cluster.model.kv_cache import PagedKVCache
from cluster.model.ops import apply_rope, attention, rms_norm, rope_cos_sin, rope_inv_freq
from cluster.model.step_batch import StepBatch


class MoEBackend(Protocol):
    """Where the experts run: every engine call on its MoE backend is declared here."""

    @property
    def can_recover(self) -> bool:
        """Whether ``recover`` can replace failed experts (the local backend cannot fail that way)."""
        ...

    def begin_step(self, num_tokens: int) -> None:
        """Called once before the layers of a forward step run."""

    def micro_batches(self, num_tokens: int, num_seqs: int) -> int:
        """How many micro-batches a step of this size should be split into (1: the serial schedule)."""
        ...

    def dispatch(self, layer: int, x: Tensor, gate_weight: Tensor) -> Any:
        """Start the MoE of ``layer`` on x (T, H); the experts may still be working when this returns."""
        ...

    def collect(self, pending: Any) -> Tensor:
        """The MoE output (T, H) of a ``dispatch``, once the experts are done."""
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
        # Issue 23 (expert cache): called with (layer, residual entering the layer's MoE) before its dispatch, and
        # with (-1, the embeddings) before layer 0, for the speculative prefetch (cluster/moe/prefetch.py
        # Prefetcher); None: no prefetch.
        self.on_moe_input: Callable[[int, Tensor], None] | None = None

    @torch.inference_mode()
    def forward(self, batches: Sequence[StepBatch], cache: PagedKVCache, moe: MoEBackend) -> list[Tensor]:
        """Micro-batches of one step -> float32 logits (N_out, V) of each, for its ``logits_rows``.

        The ping-pong plan: for each layer, each micro-batch i in turn
          1. collects its experts' output of the layer before (they ran while the other micro-batches' attention
             did) and adds it to its residual stream;
          2. runs its attention (writing its keys and values into the cache);
          3. routes its rows and sends them to the experts (dispatch), and the next micro-batch goes on.
        After the last layer each collects its last experts, then the final norm and the LM head run.
        With one micro-batch this is the serial schedule; with any number the results are the same, since the
        micro-batches hold disjoint sequences and attention reads only a sequence's own keys.
        """
        cfg = self.cfg
        xs = [F.embedding(b.token_ids, self.w.embed) for b in batches]  # (T_i, H) each
        ropes = [rope_cos_sin(b.positions, self.inv_freq, self.dtype) for b in batches]  # (T_i, D) x2 each
        moe.begin_step(sum(x.shape[0] for x in xs))
        pending: list[Any] = [None] * len(batches)
        if self.on_moe_input is not None:  # issue 23: layer 0's guess comes from the embeddings
            for x in xs:
                self.on_moe_input(-1, x)
        for layer, lw in enumerate(self.w.layers):
            for i, batch in enumerate(batches):
                if pending[i] is not None:
                    xs[i] = xs[i] + moe.collect(pending[i])  # 1
                h = rms_norm(xs[i], lw.attn_norm, cfg.rms_norm_eps)
                xs[i] = xs[i] + self._attention(layer, h, *ropes[i], batch, cache)  # 2
                if self.on_moe_input is not None:  # issue 23: prefetch hints go out before this layer's rows
                    self.on_moe_input(layer, xs[i])
                pending[i] = moe.dispatch(layer, rms_norm(xs[i], lw.moe_norm, cfg.rms_norm_eps), lw.gate)  # 3
        logits = []
        for i, batch in enumerate(batches):
            x = xs[i] + moe.collect(pending[i])
            x = rms_norm(x[batch.logits_rows], self.w.final_norm, cfg.rms_norm_eps)  # (N_out, H)
            logits.append(F.linear(x, self.w.lm_head).float())
        return logits

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
