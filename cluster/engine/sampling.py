"""Per-request sampling parameters (validated) and the batched sampler.

Shape legend: B sequences sampled this step, V vocabulary.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cluster.engine.structured_output import StructuredOutput

MAX_LOGPROBS = 20
MAX_N = 64
MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1
MAX_LOGIT_BIAS = 1024  # tokens per request (OpenAI allows 300)
MAX_BAD_WORDS = 128


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
    # Logits processing, with vLLM's semantics (see ``process_logits`` for the order they apply in).
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (after temperature)
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output (CTRL's penalty)
    presence_penalty: float = 0.0  # subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    min_tokens: int = 0  # EOS and stop_token_ids are banned (and stop strings not checked) before this many
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text in it
    bad_words: tuple[str, ...] = ()  # words never generated (their last token is banned after the rest)
    structured: StructuredOutput | None = None  # a grammar the output must match (structured_output.py)

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
        for name in ("ignore_eos", "echo", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        bias = tuple(self.logit_bias.items()) if isinstance(self.logit_bias, dict) else self.logit_bias
        if not isinstance(bias, (tuple, list)) or not all(
                isinstance(b, (tuple, list)) and len(b) == 2 and _is_int(b[0]) and b[0] >= 0 and _is_number(b[1])
                and math.isfinite(b[1]) and -100 <= b[1] <= 100 for b in bias):
            raise ValueError(f"logit_bias must map token ids (>= 0) to numbers in [-100, 100], got {self.logit_bias!r}")
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(v)) for t, v in bias))
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens!r}")
        words = (self.bad_words,) if isinstance(self.bad_words, str) else self.bad_words
        if not isinstance(words, (tuple, list)) or not all(isinstance(w, str) and w.strip() for w in words):
            raise ValueError(f"bad_words must be a list of non-empty strings, got {self.bad_words!r}")
        if len(words) > MAX_BAD_WORDS:
            raise ValueError(f"bad_words may hold at most {MAX_BAD_WORDS} words, got {len(words)}")
        object.__setattr__(self, "bad_words", tuple(words))
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise TypeError(f"structured must be a StructuredOutput, got {type(self.structured).__name__}")

    @property
    def processes_logits(self) -> bool:
        """Whether any logits processor (penalties, bias, bans) applies to this request's rows."""
        return bool(self.repetition_penalty != 1 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias or self.min_tokens or self.bad_words)

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
    # The texts of token_id and of each top entry, attached by the output processor for the wire adapters.
    text: str = ""
    top_texts: list[str] = field(default_factory=list)


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


@dataclass(frozen=True)
class RowHistory:
    """What the logits processors of one row need beyond its parameters: the sequence's prompt and output so far,
    and the tokens it may not take this step (see ``banned_tokens``)."""

    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    banned: Sequence[int] = ()


def banned_tokens(params: SamplingParams, output_ids: Sequence[int], eos_ids: Collection[int],
                  bad_words_ids: Sequence[Sequence[int]]) -> list[int]:
    """The tokens a sequence may not take next: before ``min_tokens`` are generated, EOS (unless ignored) and the
    stop token ids; a bad word's last token when the output ends with the rest of that word (one-token words:
    always). vLLM's MinTokensLogitsProcessor and bad-words processor."""
    banned: list[int] = []
    if len(output_ids) < params.min_tokens:
        banned.extend(params.stop_token_ids)
        if not params.ignore_eos:
            banned.extend(eos_ids)
    for word in bad_words_ids:
        prefix = len(word) - 1
        if prefix == 0 or (len(output_ids) >= prefix and list(output_ids[-prefix:]) == list(word[:-1])):
            banned.append(word[-1])
    return banned


def bad_words_token_ids(words: Sequence[str], encode: Callable[[str], list[int]]) -> list[list[int]]:
    """The token sequences of ``bad_words`` as vLLM makes them: each word (left-stripped) alone, and after a
    space when that gives a different first token in as many tokens (a word inside a text); ``encode`` adds no
    special tokens."""
    out: list[list[int]] = []
    for word in words:
        alone = encode(word.lstrip())
        if alone:
            out.append(alone)
        spaced = encode(" " + word.lstrip())
        if spaced and (not alone or (spaced[0] != alone[0] and len(spaced) == len(alone))):
            out.append(spaced)
    return out


def _padded(lists: Sequence[Sequence[int]], pad: int, device: torch.device) -> Tensor:
    """Token lists -> (b, L) long, padded with ``pad`` (the extra column of a (b, V + 1) scatter)."""
    width = max((len(x) for x in lists), default=0)
    out = torch.full((len(lists), max(width, 1)), pad, dtype=torch.long)
    for row, ids in enumerate(lists):
        if ids:
            out[row, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    return out.to(device)


def process_logits(logits: Tensor, params: Sequence[SamplingParams], history: Sequence[RowHistory]) -> Tensor:
    """logits (B, V) -> float32 logits (B, V) after the logits processors, batched over the rows that use them, in
    vLLM's order: bans (bad words, min_tokens) to -inf, logit_bias added, then the penalties: repetition (on
    tokens of the prompt or output: a positive logit divided by it, a negative one multiplied), frequency
    (times each token's count in the output) and presence (once per token in the output) subtracted. Rows that
    use none are returned as they came; no loop over the vocabulary."""
    logits = logits.float()
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    out, device, vocab = logits.clone(), logits.device, logits.shape[-1]
    ban_rows = [i for i in rows for _ in history[i].banned]
    if ban_rows:
        ban_tokens = [t for i in rows for t in history[i].banned]
        out[torch.tensor(ban_rows, device=device), torch.tensor(ban_tokens, device=device)] = float("-inf")
    bias = [(i, t, v) for i in rows for t, v in params[i].logit_bias]
    if bias:
        out.index_put_((torch.tensor([b[0] for b in bias], device=device),
                        torch.tensor([b[1] for b in bias], device=device)),
                       torch.tensor([b[2] for b in bias], device=device, dtype=out.dtype), accumulate=True)
    pen = [i for i in rows if params[i].repetition_penalty != 1 or params[i].presence_penalty
           or params[i].frequency_penalty]
    if pen:
        idx = torch.tensor(pen, device=device)
        outputs = _padded([history[i].output_ids for i in pen], vocab, device)  # (b, L)
        counts = torch.zeros(len(pen), vocab + 1, device=device).scatter_add_(
            1, outputs, torch.ones_like(outputs, dtype=torch.float32))[:, :vocab]  # (b, V)
        in_output = counts > 0
        part = out[idx]  # (b, V)
        rep = torch.tensor([params[i].repetition_penalty for i in pen], device=device)[:, None]
        if bool((rep != 1).any()):
            prompts = _padded([history[i].prompt_ids for i in pen], vocab, device)
            seen = torch.zeros(len(pen), vocab + 1, dtype=torch.bool, device=device).scatter_(
                1, prompts, True)[:, :vocab] | in_output
            part = torch.where(seen, torch.where(part > 0, part / rep, part * rep), part)
        freq = torch.tensor([params[i].frequency_penalty for i in pen], device=device)[:, None]
        presence = torch.tensor([params[i].presence_penalty for i in pen], device=device)[:, None]
        out[idx] = part - freq * counts - presence * in_output
    return out


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """logits (B, V) (temperature applied), min_p (B,) -> tokens less likely than min_p x the top one at -inf."""
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))


def sample(logits: Tensor, params: Sequence[SamplingParams], seeds: Sequence[int]) -> Tensor:
    """logits (B, V) float32 (processed: ``process_logits``), seeds (B,) the ``token_seed`` of each row -> token
    ids (B,). Greedy rows take the argmax; the others are scaled by their temperature, cut by min_p, top-k and
    top-p, and draw from their own seed, so a row's token never depends on the rest of the batch."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    idx = torch.tensor(rows, device=logits.device)
    temps = torch.tensor([params[i].temperature for i in rows], device=logits.device)
    scaled = logits[idx] / temps[:, None]  # (b, V)
    if any(params[i].min_p > 0 for i in rows):
        scaled = apply_min_p(scaled, torch.tensor([params[i].min_p for i in rows], device=logits.device))
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

    Log-probabilities are those of the ``logits`` given: the engine passes the processed ones (after penalties,
    logit_bias and bans, before temperature and the min-p / top-k / top-p cuts)."""
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
