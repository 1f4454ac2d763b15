"""torch's kernels for held quantized expert weights on a GPU: one expert Linear y = x W^T with W a QuantizedWeight
(N, K) (cluster/model/quant.py), computed without dequantizing W where a kernel fits, and the grouped SwiGLU of a
layer's experts built on it.

  int8, a scale per output channel    -> ``torch._weight_int8pack_mm(x, q (N, K) int8, s (N,) float32)``
  int4, G in {32, 64, 128, 256}, bf16  -> ``torch._weight_int4pack_mm(x, packed, G, scale_and_zeros (K/G, N, 2))``
                                          on W packed once by ``torch._convert_weight_to_int4pack`` (cached)
  FP8 (e4m3), per channel, bf16/fp16   -> ``torch._scaled_mm(x_fp8, q.t(), s_x (M, 1), s_w (1, N))``: x quantized
                                          to FP8 per row on the fly (W8A8 with dynamic per-token scales, what vLLM
                                          runs for these checkpoints), needs compute capability >= 8.9
  FP8 in [128, 128] blocks, bf16, sm90 -> ``F.scaled_mm`` with BlockWise1x128 x BlockWise128x128 scaling (x in FP8
                                          per 1 x 128 block), where this torch has it
  anything else (CPU, fp32 rows for int4/FP8, FP8 blocks, ragged groups, a kernel missing from this torch build)
                                       -> dequantize W to the rows' dtype and F.linear, as on a CPU.

Each kernel is tried once per device and dtype on a small case against the dequantize path before it is used
(``kernel_problem``): a kernel that raises or disagrees is not used, and the reason is kept for logs and benchmarks.

Shape legend: M rows, N output features, K input features, G group size; R_w rows of a layer grouped by expert.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.model.quant import (
    ExpertQuantization,
    QuantizedWeight,
    dequantize,
    fp8_weight,
    integer_values,
    quantize_weight,
)

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
INT4_GROUPS = (32, 64, 128, 256)  # what tinygemm (_weight_int4pack_mm) takes
KERNELS = ("int8pack", "int4pack", "scaled_mm_rowwise", "scaled_mm_tensorwise", "scaled_mm_block")
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: FP8 tensor cores


def keeps_fp8(device: torch.device | str) -> bool:
    """Whether FP8 expert weights are kept in FP8 on ``device`` (a CUDA device with FP8 matmul) rather than
    dequantized at load."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(dev) >= FP8_MIN_CAPABILITY


# ---------------------------------------------------------------------------------------------- one Linear


@dataclass(frozen=True)
class Int4Packed:
    """An int4 weight in tinygemm's layout: ``packed`` from _convert_weight_to_int4pack, ``scale_and_zeros``
    (K/G, N, 2) bf16 (zero 0: our int4 is symmetric)."""

    packed: Tensor
    scale_and_zeros: Tensor
    group_size: int


def pack_for_int4mm(w: QuantizedWeight, high_nibble_first: bool = True) -> Int4Packed:
    """One int4 expert matrix (N, K) -> tinygemm's layout. tinygemm computes (u - 8) * scale + zero with u the
    unsigned nibble, so u = q + 8 and zero = 0 give q * scale, our value. Bytes hold two K-neighbours; which one
    sits in the high nibble is ``high_nibble_first`` (torch's own tests pack the even one high for CUDA)."""
    k = w.in_features
    u = (integer_values(w).to(torch.int16) + 8).to(torch.uint8)  # (N, K) in [0, 15]
    first, second = u[:, 0::2], u[:, 1::2]
    byte = (first << 4) | second if high_nibble_first else first | (second << 4)  # (N, K/2)
    inner_k_tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
    packed = torch.ops.aten._convert_weight_to_int4pack(byte.contiguous(), inner_k_tiles)
    scale = w.scale.to(torch.bfloat16)  # (N, K/G)
    scale_and_zeros = torch.stack([scale, torch.zeros_like(scale)], dim=-1).transpose(0, 1).contiguous()
    return Int4Packed(packed, scale_and_zeros, w.group_size)


def int8pack_linear(x: Tensor, w: QuantizedWeight) -> Tensor:
    """x (M, K) -> (M, N) by torch._weight_int8pack_mm (int8 per output channel). The scales go in x's dtype, as
    the CPU kernel requires (the CUDA one takes any and computes in float32)."""
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), w.data, w.scale.reshape(-1).to(x.dtype))


def int4pack_linear(x: Tensor, packed: Int4Packed) -> Tensor:
    """x (M, K) bf16 -> (M, N) by torch._weight_int4pack_mm."""
    return torch.ops.aten._weight_int4pack_mm(x.contiguous(), packed.packed, packed.group_size,
                                              packed.scale_and_zeros)


def fp8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) -> its FP8 values and per-row scales (M, 1) float32, x ~= x_fp8 * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def scaled_mm_linear(x: Tensor, w: QuantizedWeight, rowwise: bool = True) -> Tensor:
    """x (M, K) bf16/fp16 -> (M, N) by torch._scaled_mm on FP8 x and FP8 W (a scale per output channel).

    rowwise: one scale per row of x and per column of the output inside the kernel (sm90's rowwise scaling);
    else (tensorwise): x with one scale, the channel scales applied to the float32 result afterwards."""
    if rowwise:
        x_q, x_scale = fp8_rows(x)
        return torch._scaled_mm(x_q, w.data.t(), scale_a=x_scale, scale_b=w.scale.reshape(1, -1),
                                out_dtype=x.dtype)
    x_scale = x.abs().amax().float().clamp(min=1e-12) / FP8_MAX
    x_q = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    one = torch.ones((), device=x.device, dtype=torch.float32)
    out = torch._scaled_mm(x_q, w.data.t(), scale_a=x_scale, scale_b=one, out_dtype=torch.float32)
    return (out * w.scale.reshape(1, -1)).to(x.dtype)


FP8_BLOCK = 128  # the DeepSeek-style [128, 128] weight blocks that _scaled_mm's blockwise recipes take


def fp8_block_scales(w: QuantizedWeight) -> Tensor | None:
    """An FP8 weight's per-(row, K block) scales (N, K/128) as the (N/128, K/128) of [128, 128] blocks, padded
    along K blocks to a multiple of 4 (cuBLAS), or None when its scales are not constant over 128-row blocks."""
    blocks = w.scale[::FP8_BLOCK]  # (N/128, K/128)
    if not torch.equal(blocks.repeat_interleave(FP8_BLOCK, dim=0)[: w.scale.shape[0]], w.scale):
        return None
    pad = -blocks.shape[1] % 4
    return F.pad(blocks, (0, pad)) if pad else blocks.contiguous()


def scaled_mm_block_linear(x: Tensor, w: QuantizedWeight, block_scales: Tensor) -> Tensor:
    """x (M, K) bf16 -> (M, N) by F.scaled_mm with x in FP8 per 1 x 128 block (BlockWise1x128) and W in [128, 128]
    blocks (BlockWise128x128, ``block_scales`` from ``fp8_block_scales``). cuBLAS wants M a multiple of 4 (x is
    zero-padded) and x's scales outer-dim-major."""
    m, k = x.shape
    pad = -m % 4
    xp = F.pad(x, (0, 0, 0, pad)) if pad else x
    groups = xp.float().reshape(m + pad, k // FP8_BLOCK, FP8_BLOCK)
    x_scale = groups.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX  # (M', K/128)
    x_q = (groups / x_scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(m + pad, k)
    scaling = F.ScalingType
    out = F.scaled_mm(x_q, w.data.t(), x_scale.t().contiguous().t(), scaling.BlockWise1x128,
                      block_scales.t(), scaling.BlockWise128x128, output_dtype=x.dtype)
    return out[:m]


def dequantize_linear(x: Tensor, w: QuantizedWeight) -> Tensor:
    """The reference path: W dequantized to x's dtype, then F.linear (what the CPU runs)."""
    return F.linear(x, dequantize(w, x.dtype))


# --------------------------------------------------------------------------------------- choosing a kernel


def kernel_candidates(w: QuantizedWeight, x: Tensor) -> tuple[str, ...]:
    """The kernels that could compute x @ W^T for this matrix and rows, best first (empty: dequantize)."""
    if not x.is_cuda:
        return ()
    n, k = w.data.shape[-2], w.in_features
    per_channel = w.group_size == k
    if w.is_fp8:
        if w.group_size == FP8_BLOCK and k % FP8_BLOCK == 0 and n % FP8_BLOCK == 0 and x.dtype == torch.bfloat16 \
                and torch.cuda.get_device_capability(x.device) == (9, 0):
            return ("scaled_mm_block",)  # torch restricts the blockwise recipes to sm90
        fits = (per_channel and x.dtype in (torch.bfloat16, torch.float16) and k % 16 == 0 and n % 16 == 0
                and torch.cuda.get_device_capability(x.device) >= FP8_MIN_CAPABILITY)
        return ("scaled_mm_rowwise", "scaled_mm_tensorwise") if fits else ()
    if w.bits == 8:
        return ("int8pack",) if per_channel else ()
    fits = (x.dtype == torch.bfloat16 and w.group_size in INT4_GROUPS and k % w.group_size == 0 and k % 32 == 0
            and n % 8 == 0 and torch.cuda.get_device_capability(x.device) >= (8, 0))
    return ("int4pack",) if fits else ()


def choose_kernel(w: QuantizedWeight, x: Tensor) -> str | None:
    """The kernel ``quantized_linear`` uses for this matrix and rows (None: dequantize)."""
    for kernel in kernel_candidates(w, x):
        if kernel_problem(kernel, str(x.device), x.dtype) is None:
            return kernel
    return None


@functools.cache
def kernel_problem(kernel: str, device: str, dtype: torch.dtype) -> str | None:
    """Why ``kernel`` is not used on ``device`` for rows of ``dtype`` (None: it works). Runs it once on a small
    case (N 64, K 256, at 1 and 3 rows) and compares with dequantize + F.linear, relative to the output's size:
    integer kernels within 2% (the rows' own rounding), FP8 within 10% (x is rounded to FP8 too)."""
    try:
        gen = torch.Generator().manual_seed(0)
        w_full = torch.randn(256 if kernel == "scaled_mm_block" else 64, 256, generator=gen)
        x_all = torch.randn(3, 256, generator=gen).to(device, dtype)
        run, w = _probe_case(kernel, w_full, device)
        tolerance = 0.1 if kernel.startswith("scaled_mm") else 0.02
        for rows in (1, 3):
            x = x_all[:rows]
            got, want = run(x).float(), dequantize_linear(x, w).float()
            err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
            if not err <= tolerance:
                return f"{kernel} differs from dequantize + linear by {err:.2g} of the output (limit {tolerance})"
        return None
    except Exception as err:  # a kernel missing from this build, or refusing these shapes/dtypes: say which
        return f"{kernel}: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def _probe_case(kernel: str, w_full: Tensor, device: str) -> tuple[Callable[[Tensor], Tensor], QuantizedWeight]:
    if kernel == "int8pack":
        w = quantize_weight(w_full, ExpertQuantization(8)).to(device)
        return (lambda x: int8pack_linear(x, w)), w
    if kernel == "int4pack":
        w = quantize_weight(w_full, ExpertQuantization(4, 64)).to(device)
        packed = pack_for_int4mm(w, int4_high_nibble_first(device))
        return (lambda x: int4pack_linear(x, packed)), w
    if kernel == "scaled_mm_block":
        n, k = w_full.shape
        blocks = w_full.abs().reshape(n // FP8_BLOCK, FP8_BLOCK, k // FP8_BLOCK, FP8_BLOCK).amax(dim=(1, 3)) / FP8_MAX
        full = blocks.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
        w = fp8_weight((w_full / full).to(torch.float8_e4m3fn), blocks, (FP8_BLOCK, FP8_BLOCK)).to(device)
        block_scales = fp8_block_scales(w)
        assert block_scales is not None
        return (lambda x: scaled_mm_block_linear(x, w, block_scales)), w
    scale = w_full.abs().amax(dim=1, keepdim=True) / FP8_MAX
    w = fp8_weight((w_full / scale).to(torch.float8_e4m3fn), scale).to(device)
    rowwise = kernel == "scaled_mm_rowwise"
    return (lambda x: scaled_mm_linear(x, w, rowwise)), w


@functools.cache
def int4_high_nibble_first(device: str) -> bool:
    """Which K-neighbour _convert_weight_to_int4pack expects in a byte's high nibble on ``device``: the even one in
    torch's CUDA tests; checked here (on one row block) so that a layout change in torch shows up as the other
    order, not as wrong numbers."""
    try:
        gen = torch.Generator().manual_seed(1)
        w = quantize_weight(torch.randn(64, 256, generator=gen), ExpertQuantization(4, 64)).to(device)
        x = torch.randn(2, 256, generator=gen).to(device, torch.bfloat16)
        want = dequantize_linear(x, w).float()
        errors = {}
        for order in (True, False):
            got = int4pack_linear(x, pack_for_int4mm(w, order)).float()
            errors[order] = (got - want).abs().max().item()
        return errors[True] <= errors[False]
    except Exception:  # the kernel itself fails: kernel_problem says why
        return True


def kernel_report(device: str, dtype: torch.dtype) -> dict[str, str]:
    """Each kernel's status on ``device`` for rows of ``dtype``: 'ok' or why not (for logs and benchmarks)."""
    return {kernel: kernel_problem(kernel, device, dtype) or "ok" for kernel in KERNELS}


# ------------------------------------------------------------------------------------ a layer's experts


def quantized_linear(x: Tensor, w: QuantizedWeight, cache: dict[Any, Any], key: Any,
                     kernel: str | None) -> Tensor:
    """x (M, K) @ W^T -> (M, N) with ``kernel`` (from ``choose_kernel``; None: dequantize). ``cache[key]`` keeps
    this matrix's int4 packing (or FP8 block scales) between calls, stamped with where its values live and their
    version, so that weights replaced in place (an expert cache refilling a slot) are packed again, never stale."""
    if kernel == "scaled_mm_block":
        block_scales = _cached(cache, key, w, fp8_block_scales)
        if block_scales is None:  # blocks of another height than 128: not what the kernel takes
            return dequantize_linear(x, w)
        return scaled_mm_block_linear(x, w, block_scales)
    if kernel == "int8pack":
        return int8pack_linear(x, w)
    if kernel == "int4pack":
        order = int4_high_nibble_first(str(x.device))
        return int4pack_linear(x, _cached(cache, key, w, lambda q: pack_for_int4mm(q, order)))
    if kernel is not None and kernel.startswith("scaled_mm"):
        return scaled_mm_linear(x, w, rowwise=kernel == "scaled_mm_rowwise")
    return dequantize_linear(x, w)


def _cached(cache: dict[Any, Any], key: Any, w: QuantizedWeight, make: Callable[[QuantizedWeight], Any]) -> Any:
    stamp = (w.data.data_ptr(), w.data._version, w.scale.data_ptr(), w.scale._version)
    held = cache.get(key)
    if held is None or held[0] != stamp:
        held = cache[key] = (stamp, make(w))
    return held[1]


def layer_kernels(w13: Tensor | QuantizedWeight, w2: Tensor | QuantizedWeight, rows: Tensor
                  ) -> tuple[str | None, str | None] | None:
    """The kernels for a layer's two expert matrices on these rows, or None when neither has one (then the layer
    runs as on a CPU: dequantize the active experts, grouped matmul)."""
    kernels = tuple(choose_kernel(w[0], rows) if isinstance(w, QuantizedWeight) and w.data.shape[0] else None
                    for w in (w13, w2))
    return None if kernels == (None, None) else (kernels[0], kernels[1])


def run_experts_with_kernels(rows: Tensor, w13: Tensor | QuantizedWeight, w2: Tensor | QuantizedWeight,
                             counts: list[int], kernels: tuple[str | None, str | None],
                             cache: dict[Any, Any]) -> Tensor:
    """The grouped SwiGLU (ops.expert_swiglu per expert) of rows (R_w, H) grouped by local expert, ``counts`` rows
    per local expert, each expert's two Linears through ``kernels`` (w13's, w2's) -> (R_w, H)."""
    out = torch.empty_like(rows)
    start = 0
    for local_id, count in enumerate(counts):
        if not count:
            continue
        end = start + count
        x = rows[start:end]  # (M, H)
        h = _linear(x, w13, local_id, kernels[0], cache, "w13")  # (M, 2I)
        gate, up = h.chunk(2, dim=-1)
        out[start:end] = _linear(F.silu(gate) * up, w2, local_id, kernels[1], cache, "w2")
        start = end
    return out


def _linear(x: Tensor, stack: Tensor | QuantizedWeight, local_id: int, kernel: str | None,
            cache: dict[Any, Any], which: str) -> Tensor:
    if isinstance(stack, Tensor):
        return F.linear(x, stack[local_id])
    return quantized_linear(x, stack[local_id], cache, (which, local_id), kernel)
