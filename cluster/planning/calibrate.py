"""Measured op costs for ``moe-cluster plan``: a small calibration run on this machine, cached.

For the model's real shapes (random weights: only the shapes matter), time what one decoder layer's parts cost at
a few row counts, each in milliseconds (median of a few runs, torch's threads as the caller set them):

  coordinator_layer[rows]  RMSNorms, q/k/v/o projections, RoPE, attention over ``context`` keys per sequence
                           (decode: one query per sequence), the router
  expert[rows]             one SwiGLU expert (cluster/ops.expert_swiglu) on ``rows`` rows
  lm_head[rows]            the final norm and the LM head

``cluster/planning/plan.py`` interpolates these (linearly in rows, extrapolating from the last two points) to predict
step times. Cached under ~/.cache/moe-cluster/calibration/ by shapes, dtype, device, threads and torch version.
Shape legend: R rows (tokens), H hidden, Q/KV heads, D head dim, I expert intermediate, S keys per sequence.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cluster.model.config import ModelConfig, parse_dtype
from cluster.model.ops import apply_rope, attention, expert_swiglu, rms_norm, rope_cos_sin, rope_inv_freq, route

CACHE = Path("~/.cache/moe-cluster/calibration").expanduser()
DECODE_ROWS = (1, 4, 16, 64)
PREFILL_ROWS = (256,)


def calibration_key(cfg: ModelConfig, dtype: str, device: torch.device, context: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shapes = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
              cfg.num_experts, cfg.vocab_size, dtype, name, torch.get_num_threads(), torch.__version__, context)
    return hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]


def calibrate(cfg: ModelConfig, dtype: str, device: str = "cpu", context: int = 128, cache: Path | None = CACHE,
              repeats: int = 5, rows: tuple[int, ...] = DECODE_ROWS + PREFILL_ROWS, refresh: bool = False
              ) -> dict[str, Any]:
    """Op costs of ``cfg`` on ``device`` (cached; ``refresh`` measures again). ``context``: keys per sequence in
    the decode attention. The load average at the time is kept with them: costs measured on a busy machine are
    inflated by waiting for a core, and should be measured again when it is quiet."""
    dev = torch.device(device)
    key = calibration_key(cfg, dtype, dev, context)
    path = cache / f"{key}.json" if cache is not None else None
    if path is not None and path.exists() and not refresh:
        return dict(json.loads(path.read_text())) | {"cached": str(path)}
    costs = _measure(cfg, parse_dtype(dtype), dev, context, repeats, rows)
    costs |= {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": dtype,
              "threads": torch.get_num_threads(), "context": context, "torch": torch.__version__,
              "load_average": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(costs, indent=1))
    return costs


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


@torch.inference_mode()
def _measure(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, context: int, repeats: int,
             rows: tuple[int, ...]) -> dict[str, Any]:
    h, q_heads, kv_heads, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, device=device) * shape[-1] ** -0.5

    norm = torch.ones(h, dtype=dtype, device=device)
    wqkv, wo, gate = weight((q_heads + 2 * kv_heads) * d, h), weight(h, q_heads * d), weight(cfg.num_experts, h)
    w13, w2 = weight(2 * cfg.intermediate_size, h), weight(h, cfg.intermediate_size)
    head = weight(cfg.vocab_size, h)
    inv_freq = rope_inv_freq(d, cfg.rope_theta).to(device)
    out: dict[str, Any] = {"coordinator_layer": {}, "expert": {}, "lm_head": {}}
    for r in rows:
        x = torch.randn(r, h, dtype=dtype, device=device)
        decode = r in DECODE_ROWS
        seqs, q_len, keys = (r, 1, context) if decode else (1, r, r)  # decode: r sequences; prefill: one prompt
        k_cache = torch.randn(seqs, kv_heads, keys, d, dtype=dtype, device=device)
        mask = torch.ones(seqs, 1, q_len, keys, dtype=torch.bool, device=device)
        if not decode:
            mask = torch.ones(q_len, keys, dtype=torch.bool, device=device).tril().expand(1, 1, q_len, keys)
        positions = torch.arange(q_len, device=device).repeat(seqs)
        cos, sin = rope_cos_sin(positions, inv_freq, dtype)

        def layer(x: torch.Tensor = x, k_cache: torch.Tensor = k_cache, mask: torch.Tensor = mask,
                  cos: torch.Tensor = cos, sin: torch.Tensor = sin, seqs: int = seqs, q_len: int = q_len) -> None:
            y = rms_norm(x, norm, cfg.rms_norm_eps)
            qkv = y @ wqkv.T
            q = qkv[:, :q_heads * d].view(-1, q_heads, d)
            k = qkv[:, q_heads * d:(q_heads + kv_heads) * d].view(-1, kv_heads, d)
            q, _ = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            o = attention(q.view(seqs, q_len, q_heads, d).transpose(1, 2), k_cache, k_cache, mask)
            x2 = x + o.transpose(1, 2).reshape(-1, q_heads * d) @ wo.T
            route(rms_norm(x2, norm, cfg.rms_norm_eps), gate, cfg.experts_per_token)

        out["coordinator_layer"][str(r)] = _timed(layer, device, repeats)
        out["expert"][str(r)] = _timed(functools.partial(expert_swiglu, x, w13, w2), device, repeats)
        if decode:
            out["lm_head"][str(r)] = _timed(functools.partial(_lm_head, x, norm, head, cfg.rms_norm_eps), device,
                                            repeats)
    return out


def _lm_head(x: torch.Tensor, norm: torch.Tensor, head: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x, norm, eps) @ head.T
