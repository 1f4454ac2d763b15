"""Weight quantization math, once, as small pure functions: symmetric integer weight-only quantization of expert
matrices (int8 per output channel, int4 with group-wise scales), FP8 dequantization (per tensor, per channel, per
block) and the compressed-tensors int32 packing used on disk.

Shape legend: N output features (rows of a Linear weight), K input features, G group size (input features per
scale), ``...`` leading dims (a stack of experts). A weight W (..., N, K) is stored as integers q and scales s
(..., N, ceil(K/G)) with  W[n, k] ~= q[n, k] * s[n, k // G]  (symmetric, no zero point: what compressed-tensors
writes for ``symmetric: true`` and what vLLM's WNA16 kernels read).

In memory an int4 weight is two values per byte (column 2j in the low nibble, 2j+1 in the high one, both offset by
8 to be unsigned); int8 is plain int8. On disk (compressed-tensors ``pack-quantized``) both are packed into int32
along K, element i of a word in bits [i*b, (i+1)*b), offset by 2^(b-1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class ExpertQuantization:
    """How expert weights are quantized: ``bits`` 8 (per output channel) or 4 (``group_size`` input features per
    scale). For 8 bits ``group_size`` None means one scale per output channel."""

    bits: int
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"expert quantization bits must be 8 or 4, got {self.bits!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"quantization group size must be an even integer >= 2, got {self.group_size!r}")
        if self.bits == 4 and self.group_size is None:
            raise ValueError("int4 expert quantization needs a group size")

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 and self.group_size is None else f"int{self.bits}-g{self.group_size}"

    def groups(self, in_features: int) -> int:
        """Input features per scale for a weight of ``in_features`` columns."""
        return in_features if self.group_size is None else self.group_size


DEFAULT_INT4_GROUP_SIZE = 64  # by measurement: docs/benchmarks.md "Quantized experts" (perplexity cost vs 128)


def expert_quantization(method: str | None, group_size: int | None = None) -> ExpertQuantization | None:
    """'int8' | 'int4' | None (and a group size) -> ExpertQuantization; errors name the bad value."""
    if method is None:
        if group_size is not None:
            raise ValueError(f"quantize_group_size={group_size!r} needs quantize_experts (int8 or int4)")
        return None
    if method == "int8":
        return ExpertQuantization(8, group_size)
    if method == "int4":
        return ExpertQuantization(4, DEFAULT_INT4_GROUP_SIZE if group_size is None else group_size)
    raise ValueError(f"quantize_experts must be 'int8' or 'int4', got {method!r}")


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight (..., N, K) as integers and scales; indexing and stacking act on the leading (expert) dims."""

    data: Tensor  # int8 (..., N, K) for 8 bits; uint8 (..., N, ceil(K/2)) for 4 bits (two per byte)
    scale: Tensor  # float32 (..., N, ceil(K/G))
    bits: int
    group_size: int  # G (K for one scale per output channel)
    in_features: int  # K

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.data.shape[:-1], self.in_features)

    @property
    def is_fp8(self) -> bool:
        """FP8 values (kept from an FP8 checkpoint, ``fp8_weight``) rather than integers."""
        return self.data.dtype in FP8_DTYPES

    @property
    def name(self) -> str:
        """'int8', 'int4-g64', 'fp8', 'fp8-g128' (a scale per G input features; none: per output channel)."""
        kind = "fp8" if self.is_fp8 else f"int{self.bits}"
        return kind if self.group_size == self.in_features else f"{kind}-g{self.group_size}"

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def __getitem__(self, index: int | Tensor | slice) -> QuantizedWeight:
        return QuantizedWeight(_as_bytes(self.data)[index].view(self.data.dtype), self.scale[index], self.bits,
                               self.group_size, self.in_features)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(self.data.to(device), self.scale.to(device), self.bits, self.group_size,
                               self.in_features)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return dequantize(self, dtype)


def stack_weights(parts: Sequence[Tensor | QuantizedWeight]) -> Tensor | QuantizedWeight:
    """torch.stack for plain or quantized weights (all of one kind and one quantization)."""
    if all(isinstance(p, Tensor) for p in parts):
        return torch.stack(list(parts))  # type: ignore[arg-type]
    quantized = [p for p in parts if isinstance(p, QuantizedWeight)]
    if len(quantized) != len(parts):
        raise ValueError("cannot stack quantized and full-precision expert weights together")
    first = quantized[0]
    if any((q.bits, q.group_size, q.in_features, q.data.dtype)
           != (first.bits, first.group_size, first.in_features, first.data.dtype) for q in quantized):
        raise ValueError("cannot stack expert weights quantized differently")
    data = torch.stack([_as_bytes(q.data) for q in quantized]).view(first.data.dtype)
    return QuantizedWeight(data, torch.stack([q.scale for q in quantized]), first.bits, first.group_size,
                           first.in_features)


def cat_rows(a: Tensor | QuantizedWeight, b: Tensor | QuantizedWeight) -> Tensor | QuantizedWeight:
    """[a; b] along N (w1 and w3 into w13): row-wise scales make this the same as quantizing the fused weight."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.cat([a, b], dim=-2)
    if not (isinstance(a, QuantizedWeight) and isinstance(b, QuantizedWeight)) \
            or (a.bits, a.group_size, a.in_features, a.data.dtype) != (b.bits, b.group_size, b.in_features,
                                                                      b.data.dtype):
        raise ValueError("w1 and w3 of an expert must be quantized the same way")
    data = torch.cat([_as_bytes(a.data), _as_bytes(b.data)], dim=-2).view(a.data.dtype)
    return QuantizedWeight(data, torch.cat([a.scale, b.scale], dim=-2), a.bits, a.group_size, a.in_features)


def _as_bytes(data: Tensor) -> Tensor:
    """FP8 values as uint8 (the same bytes): indexing, stacking and concatenating FP8 tensors are not implemented on
    every device for float8 dtypes, and copying bytes is all they do."""
    return data.view(torch.uint8) if data.dtype in FP8_DTYPES else data


def weight_nbytes(w: Tensor | QuantizedWeight) -> int:
    return w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()


# ------------------------------------------------------------------------------------------ integer quantization

def _group_view(w: Tensor, group_size: int) -> Tensor:
    """(..., N, K) -> (..., N, ceil(K/G), G), zero-padded at the end of K (zeros never raise a group's max)."""
    k = w.shape[-1]
    pad = -k % group_size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(*w.shape[:-1], -1, group_size)


def quantize_weight(w: Tensor, quant: ExpertQuantization) -> QuantizedWeight:
    """w (..., N, K) float -> QuantizedWeight. Symmetric round-to-nearest in float32: s = absmax / qmax per group,
    q = round(w / s) in [-qmax, qmax] (qmax 127 or 7). An all-zero group gets s = 1 (q = 0)."""
    k = w.shape[-1]
    group = quant.groups(k)
    qmax = 2 ** (quant.bits - 1) - 1
    grouped = _group_view(w.float(), group)  # (..., N, ceil(K/G), G)
    scale = grouped.abs().amax(dim=-1) / qmax  # (..., N, ceil(K/G))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(grouped / scale[..., None]).clamp_(-qmax, qmax)
    q = q.reshape(*q.shape[:-2], -1)[..., :k].to(torch.int8)  # (..., N, K)
    data = q if quant.bits == 8 else pack_int4(q)
    return QuantizedWeight(data.contiguous(), scale.contiguous(), quant.bits, group, k)


def pack_int4(q: Tensor) -> Tensor:
    """int8 values in [-8, 7] (..., N, K) -> uint8 (..., N, ceil(K/2)): column 2j low nibble, 2j+1 high."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    """uint8 (..., N, ceil(K/2)) -> int8 (..., N, K), the inverse of ``pack_int4``."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)[..., :in_features]


def integer_values(w: QuantizedWeight) -> Tensor:
    """The integers q (..., N, K) int8 of a quantized weight."""
    return w.data if w.bits == 8 else unpack_int4(w.data, w.in_features)


def dequantize(w: QuantizedWeight, dtype: torch.dtype) -> Tensor:
    """QuantizedWeight -> (..., N, K) in ``dtype``: q * s computed in float32, then cast (the same numbers whether
    the weight was quantized at load or read from a quantized checkpoint)."""
    q = integer_values(w)
    k, group = w.in_features, w.group_size
    if k % group == 0:
        values = q.reshape(*q.shape[:-1], k // group, group).float() * w.scale[..., None]
        return values.reshape(q.shape).to(dtype)
    scale = w.scale.repeat_interleave(group, dim=-1)[..., :k]
    return (q.float() * scale).to(dtype)


# --------------------------------------------------------------------------------------- compressed-tensors packing

def pack_int32(q: Tensor, bits: int) -> Tensor:
    """int8 (N, K) in [-2^(b-1), 2^(b-1)) -> int32 (N, ceil(K*b/32)): compressed-tensors ``pack_to_int32`` along K
    (element i of a word in bits [i*b, (i+1)*b), unsigned with offset 2^(b-1), the last word zero-padded)."""
    per_word = 32 // bits
    u = (q.to(torch.int64) + (1 << (bits - 1)))  # (N, K) unsigned
    pad = -u.shape[-1] % per_word
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(*u.shape[:-1], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (u << shifts).sum(dim=-1)  # (N, words) in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """int32 (N, W) -> int8 (N, K), the inverse of ``pack_int32``."""
    per_word = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    u = (words[..., None] >> shifts) & ((1 << bits) - 1)  # (N, W, per_word)
    u = u.reshape(*packed.shape[:-1], -1)[..., :in_features]
    return (u - (1 << (bits - 1))).to(torch.int8)


def to_compressed_tensors(w: QuantizedWeight) -> dict[str, Tensor]:
    """One expert matrix (N, K) -> its pack-quantized tensors by suffix (weight_packed, weight_scale,
    weight_shape)."""
    return {"weight_packed": pack_int32(integer_values(w), w.bits), "weight_scale": w.scale.clone(),
            "weight_shape": torch.tensor(w.shape, dtype=torch.int64)}


def from_compressed_tensors(packed: Tensor, scale: Tensor, bits: int, shape: tuple[int, int]) -> QuantizedWeight:
    """pack-quantized tensors of one matrix -> QuantizedWeight (in the in-memory layout)."""
    n, k = shape
    q = unpack_int32(packed, bits, k)
    if q.shape != (n, k):
        raise ValueError(f"packed weight unpacks to {list(q.shape)}, expected {[n, k]}")
    groups = scale.shape[-1]
    group = k if groups == 1 else -(-k // groups)
    if scale.shape != (n, -(-k // group)):
        raise ValueError(f"weight_scale has shape {list(scale.shape)}, which fits no group size for {[n, k]}")
    data = q if bits == 8 else pack_int4(q)
    return QuantizedWeight(data.contiguous(), scale.float().contiguous(), bits, group, k)


# ---------------------------------------------------------------------------------------------------- FP8

def dequantize_fp8(weight: Tensor, scale: Tensor, dtype: torch.dtype, block: tuple[int, int] | None = None) -> Tensor:
    """An FP8 weight (N, K) and its scale -> (N, K) in ``dtype``, computed in float32.

    scale: () or (1,) per tensor, (N, 1) per channel (compressed-tensors ``weight_scale``: w = q * s), or
    (ceil(N/bn), ceil(K/bk)) per ``block`` (bn, bk) (transformers' ``fp8`` ``weight_scale_inv``: also w = q * s).
    """
    w = weight.float()
    s = scale.float()
    n, k = w.shape
    if s.numel() == 1:
        return (w * s.reshape(())).to(dtype)
    if s.shape in ((n, 1), (n,)):
        return (w * s.reshape(n, 1)).to(dtype)
    if s.ndim == 2 and block is not None:
        block_n, block_k = block
        if (-(-n // block_n), -(-k // block_k)) == tuple(s.shape):
            full = s.repeat_interleave(block_n, dim=0)[:n].repeat_interleave(block_k, dim=1)[:, :k]
            return (w * full).to(dtype)
    raise ValueError(f"FP8 scale of shape {list(scale.shape)} fits neither per-tensor, per-channel nor per-block "
                     f"(block {block}) scaling of a weight {[n, k]}")


def fp8_weight(weight: Tensor, scale: Tensor, block: tuple[int, int] | None = None) -> QuantizedWeight:
    """An FP8 weight (N, K) and its scale (as ``dequantize_fp8`` takes them) -> a QuantizedWeight that keeps the FP8
    values, with the scale expanded to one per output channel, or per output channel and block of K: (N, 1) or
    (N, ceil(K/bk)). Expanding is exact (the same s multiplies the same q), so ``dequantize`` of it equals
    ``dequantize_fp8``, and w1/w3 of different per-tensor scales concatenate (``cat_rows``)."""
    n, k = weight.shape
    s = scale.float()
    if s.numel() == 1 or s.shape in ((n, 1), (n,)):
        per_row = s.reshape(-1, 1).expand(n, 1)  # (N, 1)
        group = k
    elif s.ndim == 2 and block is not None and (-(-n // block[0]), -(-k // block[1])) == tuple(s.shape):
        per_row = s.repeat_interleave(block[0], dim=0)[:n]  # (N, ceil(K/bk))
        group = block[1]
    else:
        raise ValueError(f"FP8 scale of shape {list(scale.shape)} fits neither per-tensor, per-channel nor "
                         f"per-block (block {block}) scaling of a weight {[n, k]}")
    return QuantizedWeight(weight.contiguous(), per_row.contiguous(), 8, group, k)


def full_precision(w: Tensor | QuantizedWeight) -> Tensor:
    """A weight known to be held in full precision (a TypeError if it is quantized)."""
    if isinstance(w, QuantizedWeight):
        raise TypeError(f"expected a full-precision weight, got an int{w.bits} quantized one")
    return w
