"""The model's math, once, as small pure functions. Every engine path (local, cluster, reference) calls these.

Shape legend:
  T  tokens in the step, flattened over all sequences     H  hidden size
  Q  query heads   KV  key/value heads   D  head dim      I  expert intermediate size
  E  experts       K  experts per token (top-k)           S  context length (keys)
  R  (token, expert) assignment rows, R = T * K
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm computed in float32, cast back, then scaled (the order Mixtral uses)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    """(D/2,) float32 inverse frequencies of default RoPE."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions (T,) -> cos, sin (T, D) in ``dtype``, halves duplicated (the 'rotate_half' layout)."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (T, heads, D) rotated by cos/sin (T, D); pairs are (i, i + D/2) as in HF checkpoints."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attention_mask(q_positions: Tensor, k_positions: Tensor, k_valid: Tensor,
                   sliding_window: int | None) -> Tensor:
    """Boolean mask (..., Tq, S): key visible iff valid, not in the future, and inside the window.

    q_positions (..., Tq), k_positions (..., S), k_valid (..., S). The window holds ``sliding_window``
    positions including the query's own (key visible iff q - k < window), as in Mistral.
    """
    delta = q_positions[..., :, None] - k_positions[..., None, :]  # (..., Tq, S)
    mask = (delta >= 0) & k_valid[..., None, :]
    if sliding_window is not None:
        mask &= delta < sliding_window
    return mask


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Grouped-query attention. q (B, Q, Tq, D), k/v (B, KV, S, D), mask (B, 1, Tq, S) -> (B, Q, Tq, D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def route(x: Tensor, gate_weight: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Top-k softmax routing. x (T, H), gate_weight (E, H) -> weights (T, K) float32, expert_ids (T, K).

    Softmax runs in float32 over all experts, the top k are kept and renormalised to sum to one.
    """
    logits = F.linear(x, gate_weight)  # (T, E)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)  # (T, K)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


def expert_swiglu(x: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """One SwiGLU expert. x (R, H), w13 (2I, H) = [w1; w3] stacked, w2 (H, I) -> (R, H).

    silu(x @ w1.T) * (x @ w3.T) @ w2.T, with w1 and w3 fused into one matmul.
    """
    gate, up = F.linear(x, w13).chunk(2, dim=-1)  # (R, I) each
    return F.linear(F.silu(gate) * up, w2)


def grouped_expert_swiglu(x: Tensor, w13: Tensor, w2: Tensor, offsets: Tensor) -> Tensor:
    """``expert_swiglu`` for E experts at once, each on its own group of rows, as two grouped matmuls.

    x (R, H) grouped by expert, w13 (E, 2I, H), w2 (E, H, I), offsets (E,) int32: end row of each group.
    """
    gate, up = F.grouped_mm(x, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)  # (R, I) each
    return F.grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets)


def combine(expert_out: Tensor, row_weights: Tensor, row_token: Tensor, num_tokens: int) -> Tensor:
    """Weighted sum of expert outputs back onto tokens.

    expert_out (R, H) in model dtype, row_weights (R,) float32, row_token (R,) token index of each row
    -> (T, H). The weights are rounded to the model dtype and each row is scaled in that dtype, then accumulated
    in row order: the rounding of Mixtral's reference code (mistral-inference ``moe.py``) and of transformers,
    so that bf16 outputs match theirs, not just float32 ones (found on the first GPU run: scaling in float32 and
    rounding once differs by one bf16 ulp now and then, enough to flip a later layer's top-2 choice).
    """
    out = torch.zeros(num_tokens, expert_out.shape[-1], dtype=expert_out.dtype, device=expert_out.device)
    weighted = expert_out * row_weights.to(expert_out.dtype)[:, None]
    return out.index_add_(0, row_token, weighted)
