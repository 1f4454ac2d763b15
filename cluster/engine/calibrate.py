"""Measured op costs for ``moe-cluster plan``: a small calibration run on this machine, cached.

For the model's real shapes (random weights: only the shapes matter), time what one decoder layer's parts cost at
a few row counts, each in milliseconds (median of a few runs, torch's threads as the caller set them):

  coordinator_layer[rows]  RMSNorms, q/k/v/o projections, RoPE, attention over ``context`` keys per sequence
                           (decode: one query per sequence), the router
  expert[rows]             one SwiGLU expert (cluster/ops.expert_swiglu) on ``rows`` rows, its weights streamed
                           from memory as in a real step (each call takes the next of enough distinct experts to
                           overflow the caches: a decode step reads every layer's experts once)
  moe_overhead[rows]       the coordinator's MoE bookkeeping of one layer around the expert calls: routing, the
                           dispatch plan, gathering rows by expert and combining the outputs (cluster/moe/layer.py's
                           own code, the expert calls left out)
  lm_head[rows]            the final norm and the LM head

and, where a layer's weights are small enough to write a throwaway checkpoint of them (``ENGINE_MAX_LAYER_BYTES``),
the local engine's own decode step on random checkpoints of the model's shapes with 1 and 3 layers (a step's own
time from the engine's stats, ``least_disturbed_ms`` of the D decode steps of a few runs, the two models taking
turns; 3 layers rather than 2 halve the noise of the difference that gives one layer):

  engine_layer[rows]       what one more layer adds to a real decode step: its ops, the paged KV cache, the MoE
                           layer's bookkeeping and its experts, streamed
  engine_step[rows]        the rest of a real decode step: embeddings, the final norm and LM head, sampling,
                           scheduling and outputs (the step of the 1-layer model less its layer; never less than
                           lm_head, which it contains)
  engine_prefill_layer[T]  the same for a prefill step of T prompt tokens (prompts of 128): what one more layer
  engine_prefill_step[T]   adds (its ops at T rows, writing T tokens' keys and values to the paged cache, the
                           experts), and the rest of that step (never less than lm_head on a row per prompt)

``cluster/planning/plan.py`` interpolates these (linearly in rows, extrapolating from the last two points) to predict
step times. Cached under ~/.cache/moe-cluster/calibration/ by shapes, dtype, device, threads and torch version.
Shape legend: R rows (tokens), H hidden, Q/KV heads, D head dim, I expert intermediate, S keys per sequence.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig
from cluster.errors import WorkerFailure
from cluster.model.config import ModelConfig, parse_dtype
from cluster.model.demo import init_demo
from cluster.model.ops import apply_rope, attention, expert_swiglu, rms_norm, rope_cos_sin, rope_inv_freq, route
from cluster.moe.expert_map import ExpertMap
from cluster.moe.layer import MoELayer
from cluster.planning.plan import interpolate

CACHE = Path("~/.cache/moe-cluster/calibration").expanduser()
ENGINE_MAX_LAYER_BYTES = 2**30  # above this a layer's throwaway checkpoint costs more than the calibration is worth
ENGINE_DECODE_TOKENS = 16
OP_PASSES = 2
# Prefill steps timed (prompts of ENGINE_PREFILL_PROMPT_LEN tokens): the plan's PREFILL_TOKENS, its half (each of two
# micro-batches: below the first point a half would read the whole step's layer) and a large one.
ENGINE_PREFILL_TOKENS = (128, 256, 1024)
ENGINE_PREFILL_PROMPT_LEN = 128
ENGINE_LAYERS = (1, 3)  # the two random checkpoints whose difference is ENGINE_LAYERS[1] - ENGINE_LAYERS[0] layers
STREAM_BYTES = 256 * 2**20  # distinct expert weights cycled through: more than any CPU's last-level cache
LEAST_DISTURBED_FIFTHS = 5  # least_disturbed_ms: the first of the quantiles cutting samples into fifths
CALIBRATION_VERSION = 11  # bump when what is measured changes: older cached costs are measured again
# The CPU's matmul kernels change at small row counts (on an AVX-512 Xeon an expert on 4 rows costs 1.7x one on 2,
# on 16 rows less than on 8): points this dense keep the linear interpolation on those steps.
DECODE_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# The decode batches plan.py predicts for (DECODE_BATCHES) and their halves (two micro-batches): a half's
# coordinator part is the engine layer less the experts' ops, and the experts' cost steps at 4 rows where a line
# between 1 and 8 would not.
ENGINE_ROWS = (1, 4, 8, 16, 32, 64)
PREFILL_ROWS = (256,)


def calibration_key(cfg: ModelConfig, dtype: str, device: torch.device, context: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shapes = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
              cfg.num_experts, cfg.vocab_size, dtype, name, torch.get_num_threads(), torch.__version__, context,
              CALIBRATION_VERSION)
    return hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]


def calibrate(cfg: ModelConfig, dtype: str, device: str = "cpu", context: int = 128, cache: Path | None = CACHE,
              repeats: int = 5, rows: tuple[int, ...] = DECODE_ROWS + PREFILL_ROWS, refresh: bool = False,
              also: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Op costs of ``cfg`` on ``device`` (cached; ``refresh`` measures again). ``context``: keys per sequence in
    the decode attention. The load average at the time is kept with them: costs measured on a busy machine are
    inflated by waiting for a core, and should be measured again when it is quiet. ``also``: more measurements
    (the links' exchange, workers/link_calibration.py) made and cached with these."""
    dev = torch.device(device)
    key = calibration_key(cfg, dtype, dev, context)
    path = cache / f"{key}.json" if cache is not None else None
    if path is not None and path.exists() and not refresh:
        return dict(json.loads(path.read_text())) | {"cached": str(path)}
    # OP_PASSES passes, the least disturbed time of each op kept: memory just allocated (a fresh process, fresh
    # weights) reads slower for a second or two on some machines (a virtual machine's host backing its pages),
    # and a long-running engine does not pay that.
    costs = functools.reduce(least_disturbed, [_measure(cfg, parse_dtype(dtype), dev, context, repeats, rows)
                                               for _ in range(OP_PASSES)])
    costs |= _engine_costs(cfg, dtype, dev, context, tuple(r for r in rows if r in ENGINE_ROWS), repeats)
    for r, ms in costs.get("engine_step", {}).items():  # the rest of a step holds the LM head
        costs["engine_step"][r] = max(ms, costs["lm_head"].get(r, 0.0))
    for t, ms in costs.get("engine_prefill_step", {}).items():  # ... on one row per prompt: a difference of two
        prompts = max(1, int(t) // ENGINE_PREFILL_PROMPT_LEN)  # noisy steps must not make it less than that
        costs["engine_prefill_step"][t] = max(ms, interpolate(costs["lm_head"], prompts))
    if also is not None:
        costs |= also()
    costs |= {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": dtype,
              "threads": torch.get_num_threads(), "context": context, "torch": torch.__version__,
              "load_average": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(costs, indent=1))
    return costs


def least_disturbed(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two measurements of the same costs as one: every time the smaller of the two (noise only adds time), nested
    dicts alike; anything else from ``a``."""
    out = dict(a)
    for key, value in a.items():
        if isinstance(value, dict) and isinstance(b.get(key), dict):
            out[key] = least_disturbed(value, b[key])
        elif isinstance(value, float) and isinstance(b.get(key), float):
            out[key] = min(value, b[key])
    return out


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    return timed_with_cores(fn, device, repeats)[0]


def timed_with_cores(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median ms of ``fn``, the cores it kept busy on average: this process's CPU time over the same calls per
    their time, every thread counted)."""
    fn()  # warm-up
    samples, wall, cpu = [], 0.0, 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cpu += time.process_time() - cpu_started
        samples.append(time.perf_counter() - started)
        wall += samples[-1]
    return statistics.median(samples) * 1e3, cpu / wall if wall > 0 else 1.0


@dataclass(frozen=True)
class CoordinatorWeights:
    """One layer's weights on the coordinator, random (only their shapes matter), and RoPE's frequencies."""

    norm: torch.Tensor  # (H,)
    wqkv: torch.Tensor  # ((Q + 2 KV) * D, H)
    wo: torch.Tensor  # (H, Q * D)
    gate: torch.Tensor  # (E, H)
    inv_freq: torch.Tensor  # (D / 2,)

    @classmethod
    def random(cls, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> CoordinatorWeights:
        h, q_heads, kv_heads, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        return cls(torch.ones(h, dtype=dtype, device=device),
                   _random_weight(dtype, device, (q_heads + 2 * kv_heads) * d, h),
                   _random_weight(dtype, device, h, q_heads * d), _random_weight(dtype, device, cfg.num_experts, h),
                   rope_inv_freq(d, cfg.rope_theta).to(device))


def _random_weight(dtype: torch.dtype, device: torch.device, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=device) * shape[-1] ** -0.5


class StreamedExperts:
    """Random experts of the model's shapes, enough distinct copies to stream STREAM_BYTES through the caches (as a
    step reads every layer's experts from memory); each call runs the next copy."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        h, i = cfg.hidden_size, cfg.intermediate_size
        expert_bytes = 3 * h * i * torch.finfo(dtype).bits // 8
        self.copies = max(2, -(-STREAM_BYTES // expert_bytes))
        self.w13s = [_random_weight(dtype, device, 2 * i, h) for _ in range(self.copies)]  # (2I, H) = [w1; w3]
        self.w2s = [_random_weight(dtype, device, h, i) for _ in range(self.copies)]  # (H, I)
        self._turn = itertools.count()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (R, H) -> (R, H) through the next copy."""
        copy = next(self._turn) % self.copies
        return expert_swiglu(x, self.w13s[copy], self.w2s[copy])


def coordinator_ops(cfg: ModelConfig, w: CoordinatorWeights, rows: int, context: int,
                    decode: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    """The coordinator's share of one layer at ``rows`` rows, as two calls: the layer's ops (RMSNorms, q/k/v/o
    projections, RoPE, attention, the router) and the MoE bookkeeping around the expert calls (cluster/moe/layer.py's
    own code, experts that give their rows back). ``decode``: ``rows`` sequences of one query over ``context``
    keys each; else one prompt of ``rows`` tokens attending causally to itself."""
    dtype, device = w.wqkv.dtype, w.wqkv.device
    h, q_heads, kv_heads, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = torch.randn(rows, h, dtype=dtype, device=device)  # (R, H)
    seqs, q_len, keys = (rows, 1, context) if decode else (1, rows, rows)
    k_cache = torch.randn(seqs, kv_heads, keys, d, dtype=dtype, device=device)  # (S, KV, keys, D)
    mask = torch.ones(seqs, 1, q_len, keys, dtype=torch.bool, device=device)
    if not decode:
        mask = torch.ones(q_len, keys, dtype=torch.bool, device=device).tril().expand(1, 1, q_len, keys)
    cos, sin = rope_cos_sin(torch.arange(q_len, device=device).repeat(seqs), w.inv_freq, dtype)
    moe = MoELayer(_NoExperts(cfg.num_experts), 1, cfg.num_experts, cfg.experts_per_token)

    @torch.inference_mode()
    def layer() -> None:
        y = rms_norm(x, w.norm, cfg.rms_norm_eps)
        qkv = y @ w.wqkv.T  # (R, (Q + 2 KV) * D)
        q = qkv[:, :q_heads * d].view(-1, q_heads, d)
        k = qkv[:, q_heads * d:(q_heads + kv_heads) * d].view(-1, kv_heads, d)
        q, _ = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attention(q.view(seqs, q_len, q_heads, d).transpose(1, 2), k_cache, k_cache, mask)  # (S, Q, q_len, D)
        x2 = x + o.transpose(1, 2).reshape(-1, q_heads * d) @ w.wo.T  # (R, H)
        route(rms_norm(x2, w.norm, cfg.rms_norm_eps), w.gate, cfg.experts_per_token)

    @torch.inference_mode()
    def bookkeeping() -> None:
        moe.collect(moe.dispatch(0, x, w.gate))

    return layer, bookkeeping


@torch.inference_mode()
def _measure(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, context: int, repeats: int,
             rows: tuple[int, ...]) -> dict[str, Any]:
    h = cfg.hidden_size
    coordinator = CoordinatorWeights.random(cfg, dtype, device)
    experts = StreamedExperts(cfg, dtype, device)
    head = _random_weight(dtype, device, cfg.vocab_size, h)
    out: dict[str, Any] = {"coordinator_layer": {}, "expert": {}, "moe_overhead": {}, "lm_head": {}}
    for r in rows:
        x = torch.randn(r, h, dtype=dtype, device=device)
        decode = r in DECODE_ROWS  # decode: r sequences; prefill: one prompt
        layer, moe_bookkeeping = coordinator_ops(cfg, coordinator, r, context, decode)
        out["coordinator_layer"][str(r)] = _timed(layer, device, repeats)

        out["expert"][str(r)] = _timed(functools.partial(experts, x), device, max(repeats, experts.copies))
        out["moe_overhead"][str(r)] = _timed(moe_bookkeeping, device, repeats)
        if decode:
            out["lm_head"][str(r)] = _timed(functools.partial(_lm_head, x, coordinator.norm, head,
                                                              cfg.rms_norm_eps), device, repeats)
    return out


def _engine_costs(cfg: ModelConfig, dtype: str, device: torch.device, context: int, rows: tuple[int, ...],
                  repeats: int) -> dict[str, Any]:
    """engine_layer / engine_step (see the module's docstring), or why they were not measured."""
    layer_bytes = (cfg.hidden_size * cfg.intermediate_size * 3 * cfg.num_experts
                   + cfg.hidden_size * cfg.head_dim * (cfg.num_heads + cfg.num_kv_heads) * 2) \
        * torch.finfo(parse_dtype(dtype)).bits // 8
    if not rows or layer_bytes > ENGINE_MAX_LAYER_BYTES:
        return {"engine": f"not measured: one layer is {layer_bytes / 2**30:.1f} GiB (the limit is "
                          f"{ENGINE_MAX_LAYER_BYTES / 2**30:g} GiB); steps are sums of op costs"}
    prompt_len = max(1, context - ENGINE_DECODE_TOKENS)
    shape = {name: getattr(cfg, name) for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads",
                                                  "num_kv_heads", "head_dim", "num_experts", "experts_per_token",
                                                  "sliding_window")}
    engines: dict[int, EngineLoop] = {}
    with tempfile.TemporaryDirectory(prefix="moe-cluster-calibration-") as tmp:
        try:
            for layers in ENGINE_LAYERS:
                path = init_demo(Path(tmp) / f"layers-{layers}", seed=0, shards=1, num_layers=layers, dtype=dtype,
                                 max_position_embeddings=max(context * 2, 2 * ENGINE_PREFILL_PROMPT_LEN), **shape)
                # Room for every decode batch and for the largest prefill in one step (its prompts all at once).
                prefill_prompts = max(ENGINE_PREFILL_TOKENS) // ENGINE_PREFILL_PROMPT_LEN
                blocks = max(max(rows) * -(-(prompt_len + ENGINE_DECODE_TOKENS + 2) // 16),
                             prefill_prompts * -(-(ENGINE_PREFILL_PROMPT_LEN + 2) // 16))
                engines[layers] = EngineLoop.local(EngineConfig(
                    model=str(path), progress=False, enable_prefix_caching=False, dtype=dtype, device=str(device),
                    max_num_seqs=max(max(rows), prefill_prompts),
                    max_num_batched_tokens=max(4096, max(rows) * prompt_len, max(ENGINE_PREFILL_TOKENS)),
                    num_kv_blocks=blocks + 8))
            steps: dict[int, dict[int, float]] = {}
            for r in rows:  # a decode step of r sequences
                steps[r] = _least_steps_ms(engines, _random_prompts(r, prompt_len, cfg.vocab_size),
                                           1 + ENGINE_DECODE_TOKENS, r, max(3, repeats))
            prefills: dict[int, dict[int, float]] = {}
            for t in ENGINE_PREFILL_TOKENS:  # a prefill step of t prompt tokens (and the first token's sampling)
                prompts = _random_prompts(max(1, t // ENGINE_PREFILL_PROMPT_LEN), ENGINE_PREFILL_PROMPT_LEN,
                                          cfg.vocab_size)
                prefills[t] = _least_steps_ms(engines, prompts, 1, sum(map(len, prompts)), max(3, repeats))
        finally:
            for engine in engines.values():
                engine.shutdown()
    few, many = ENGINE_LAYERS
    layer = {r: max(0.0, (steps[r][many] - steps[r][few]) / (many - few)) for r in rows}
    prefill_layer = {t: max(0.0, (prefills[t][many] - prefills[t][few]) / (many - few)) for t in prefills}
    return {"engine_layer": {str(r): layer[r] for r in rows},
            "engine_step": {str(r): max(0.0, steps[r][few] - few * layer[r]) for r in rows},
            "engine_prefill_layer": {str(t): prefill_layer[t] for t in prefills},
            "engine_prefill_step": {str(t): max(0.0, prefills[t][few] - few * prefill_layer[t]) for t in prefills}}


def _random_prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(count * length)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def _least_steps_ms(engines: dict[int, EngineLoop], prompts: list[list[int]], max_tokens: int, step_tokens: int,
                    repeats: int) -> dict[int, float]:
    """{layers: ms} of one step computing ``step_tokens`` tokens, while each engine generates ``max_tokens`` tokens
    for ``prompts``: ``least_disturbed_ms`` of those steps' own times over ``repeats`` runs after a warm-up, the
    engines taking turns so that a burst of load hits them alike."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for engine in engines.values():
        engine.generate(prompts, params)  # warm-up
    runs: dict[int, list[float]] = defaultdict(list)
    for _ in range(repeats):
        for layers, engine in engines.items():
            runs[layers] += step_times_ms(engine, functools.partial(engine.generate, prompts, params), step_tokens)
    return {layers: least_disturbed_ms(times) for layers, times in runs.items()}


def least_disturbed_ms(samples: list[float]) -> float:
    """The time of an operation on this machine at its least disturbed, from many samples: their lowest fifth's
    boundary (the 20th percentile). A shared host switches between a fast and a slow state within seconds (1.4x
    apart on the Intel Xeon VM this was tuned on); a median mixes the two as the run happened to, a minimum
    keeps one lucky sample."""
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=LEAST_DISTURBED_FIFTHS, method="inclusive")[0]


def step_times_ms(engine: Any, run: Callable[[], object], step_tokens: int) -> list[float]:
    """Call ``run`` (which drives ``engine``, a local or a cluster engine) and return the times in ms of the steps
    it made that computed ``step_tokens`` tokens: each step's own time, from the engine's stats, without the
    requests' admission and outputs around them."""
    before = engine.stats().num_steps
    run()
    stats = engine.stats()
    made = stats.num_steps - before
    assert 0 < made <= len(stats.recent_steps), f"{made} steps made, {len(stats.recent_steps)} kept"
    times = [1000 * seconds for tokens, seconds in stats.recent_steps[-made:] if tokens == step_tokens]
    if not times:
        raise RuntimeError(f"no step computed {step_tokens} tokens: {stats.recent_steps[-made:]}")
    return times


class _NoExperts:
    """An Experts stage whose experts give their rows back unchanged: what MoELayer costs around them."""

    max_in_flight = 1
    can_recover = False

    def __init__(self, num_experts: int) -> None:
        self.expert_map = ExpertMap(((tuple(range(num_experts)),),), num_experts)  # one layer, one "worker"

    def begin_step(self) -> None:
        pass

    def submit(self, layer: int, rows: torch.Tensor, rows_per_slot: torch.Tensor) -> torch.Tensor:
        return rows

    def wait(self, ticket: torch.Tensor) -> torch.Tensor:
        return ticket

    def timings(self) -> dict[str, float]:
        return {}

    def heartbeat(self) -> None:
        pass

    def recover(self, failure: WorkerFailure) -> None:
        raise failure

    def describe(self) -> dict[str, Any]:
        return {"experts": "none (calibration)"}

    def close(self) -> None:
        pass


def _lm_head(x: torch.Tensor, norm: torch.Tensor, head: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x, norm, eps) @ head.T
