"""Per-request sampling parameters (validated) and the batched sampler.

Shape legend: B sequences sampled this step, V vocabulary.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

MAX_LOGPROBS = 20
MAX_N = 64
MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """What to generate for one request. Every field is checked; a bad value raises ValueError/TypeError."""

    max_tokens: int | None = 16  # None: up to the model's context length
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # top-N alternatives per generated token (0: only the chosen one)
    echo: bool = False  # return the prompt (and its logprobs, when asked) ahead of the completion
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (-1 or 0 disables it), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer in [0, 2**63-1], got {self.seed!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, (tuple, list)) or not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        for name in ("ignore_eos", "echo", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a boolean, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _mix64(value: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit function of a 64-bit integer (same in every process)."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)


def sample_seed(request_seed: int, index: int) -> int:
    """Seed of parallel sample ``index`` of a request: the request's own seed for the first sample."""
    return request_seed if index == 0 else _mix64(request_seed * 0x9E3779B97F4A7C15 + index) % MAX_SEED


def token_seed(seq_seed: int, position: int) -> int:
    """Seed of the draw of a sample's ``position``-th generated token. Counter-based: the draw depends only on
    (seed, position), so a sequence recomputed or resumed elsewhere draws exactly what it would have."""
    return _mix64(_mix64(seq_seed) ^ (position + 1) * 0xD1B54A32D192ED03 & 0xFFFFFFFFFFFFFFFF) % MAX_SEED


def new_request_seed() -> int:
    """A fresh random seed for a request that gave none (different samples on every request, as in vLLM)."""
    return secrets.randbits(63)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


def apply_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """logits (B, V) float32, top_k (B,) long (<=0: off), top_p (B,) float -> logits with cut tokens at -inf."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # (B, V)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    ranks = torch.arange(vocab, device=logits.device)[None, :]  # (1, V)
    cut = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(cut, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token
    cut |= mass_before >= top_p[:, None]  # the top token always survives (mass_before = 0)
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def sample(logits: Tensor, params: Sequence[SamplingParams], seeds: Sequence[int]) -> Tensor:
    """logits (B, V) float32, seeds (B,) the ``token_seed`` of each row -> token ids (B,). Greedy rows take the
    argmax; the others draw from their own seed, so a row's token never depends on the rest of the batch."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    idx = torch.tensor(rows, device=logits.device)
    temps = torch.tensor([params[i].temperature for i in rows], device=logits.device)
    scaled = logits[idx] / temps[:, None]  # (b, V)
    if any(params[i].top_k > 0 or params[i].top_p < 1 for i in rows):
        scaled = apply_top_k_top_p(
            scaled, torch.tensor([params[i].top_k for i in rows], device=logits.device),
            torch.tensor([params[i].top_p for i in rows], device=logits.device, dtype=torch.float32))
    probs = torch.softmax(scaled, dim=-1)
    # Exponential race: argmax(p / Exp(1)) is a draw from p; each row's noise comes from its own seed.
    noise = torch.empty_like(probs)
    for j, i in enumerate(rows):
        noise[j].exponential_(generator=torch.Generator(device=logits.device).manual_seed(seeds[i]))
    tokens[idx] = (probs / noise).argmax(dim=-1)
    return tokens


def token_logprobs(logits: Tensor, chosen: Tensor, top_n: Sequence[int]) -> list[TokenLogprob]:
    """logits (B, V), chosen (B,) -> the chosen token's logprob and the top-N alternatives, per row.

    Log-probabilities are those of the model's raw distribution (before temperature and cuts)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen_lp = logp.gather(-1, chosen[:, None]).squeeze(-1).tolist()
    widest = max(top_n, default=0)
    top_vals, top_ids = (logp.topk(widest, dim=-1) if widest else (logp[:, :0], chosen[:, None][:, :0]))
    top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
    out = []
    for row, n in enumerate(top_n):
        top = list(zip(top_ids_l[row][:n], top_vals_l[row][:n], strict=True))
        out.append(TokenLogprob(int(chosen[row]), float(chosen_lp[row]), top))
    return out
