"""A checkpoint's ``quantization_config`` (config.json): what is implemented, and a refusal naming the rest.

Implemented (weights only; activations always run in the compute dtype here):
  * ``compressed-tensors``, format ``float-quantized`` / ``naive-quantized``: FP8 (e4m3) weights with
    ``weight_scale`` per tensor or per channel (the published Mixtral FP8 checkpoints); ``input_scale`` (static
    activation scales for FP8 compute) is read by no one here and ignored;
  * ``compressed-tensors``, format ``pack-quantized``: symmetric int4/int8 weights (``weight_packed`` int32,
    ``weight_scale`` per channel or per group, ``weight_shape``), what ``moe-cluster quantize`` writes;
  * ``fp8`` (transformers / vLLM): FP8 weights with ``weight_scale_inv`` per block of ``weight_block_size``, or
    (no block size: the AutoFP8 form) ``weight_scale`` per tensor.
Anything else - GPTQ, AWQ, bitsandbytes, asymmetric or activation-ordered int, sparsity - is refused at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED = ("compressed-tensors (float-quantized FP8 weights per tensor or per channel; pack-quantized symmetric "
             "int4/int8 weights per channel or per group) and fp8 (per-block weight_scale_inv, or per-tensor "
             "weight_scale)")
FLOAT_FORMATS = ("float-quantized", "naive-quantized")
INT_FORMATS = ("pack-quantized",)


@dataclass(frozen=True)
class CheckpointQuantization:
    """How the quantized tensors of a checkpoint are stored.

    kind "fp8": a Linear's ``weight`` is float8 with a companion ``scale_suffix`` tensor (``weight_scale`` or
    ``weight_scale_inv``), ``block`` its (rows, cols) per scale when per block;
    kind "int": a Linear's ``weight_packed``/``weight_scale``/``weight_shape`` replace ``weight`` (``bits``).
    Tensors without those companions (layers the checkpoint left unquantized) load as they are.
    """

    method: str
    kind: str
    bits: int = 8
    scale_suffix: str = "weight_scale"
    block: tuple[int, int] | None = None

    def describe(self) -> str:
        if self.kind == "fp8":
            return f"{self.method} FP8 weights" + (f" in blocks of {list(self.block)}" if self.block else "")
        return f"{self.method} pack-quantized int{self.bits} weights"


def refuse(what: str) -> ValueError:
    return ValueError(f"config.json quantization_config {what} is not supported; supported: {SUPPORTED}")


def parse_quantization_config(raw: Any) -> CheckpointQuantization | None:
    """config.json's ``quantization_config`` (None: not quantized) -> CheckpointQuantization, or a ValueError naming
    the method (or option) that is not implemented."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise refuse(f"{raw!r} (not an object)")
    method = raw.get("quant_method")
    if method == "fp8":
        return _parse_fp8(raw)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(raw)
    raise refuse(f"quant_method={method!r}")


def _parse_fp8(raw: dict[str, Any]) -> CheckpointQuantization:
    fmt = raw.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise refuse(f"fp8 fmt={fmt!r}")
    block = raw.get("weight_block_size")
    if block is None:
        return CheckpointQuantization("fp8", "fp8")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise refuse(f"fp8 weight_block_size={block!r}")
    return CheckpointQuantization("fp8", "fp8", scale_suffix="weight_scale_inv", block=(block[0], block[1]))


def _parse_compressed_tensors(raw: dict[str, Any]) -> CheckpointQuantization:
    if raw.get("sparsity_config"):
        raise refuse(f"compressed-tensors sparsity_config={raw['sparsity_config']!r}")
    if raw.get("transform_config"):
        raise refuse("compressed-tensors transform_config")
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise refuse("compressed-tensors without config_groups")
    found: set[CheckpointQuantization] = set()
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise refuse(f"compressed-tensors config_groups.{name}={group!r}")
        fmt = group.get("format") or raw.get("format")
        weights = group.get("weights")
        if not isinstance(weights, dict):
            raise refuse(f"compressed-tensors config_groups.{name} without weights")
        kind, bits = weights.get("type"), weights.get("num_bits")
        strategy = weights.get("strategy")
        where = f"compressed-tensors config_groups.{name}"
        if group.get("output_activations"):
            raise refuse(f"{where}.output_activations")
        if weights.get("symmetric", True) is not True:
            raise refuse(f"{where}.weights.symmetric=false (zero points)")
        if kind == "float" and bits == 8 and fmt in FLOAT_FORMATS:
            if strategy not in ("tensor", "channel"):
                raise refuse(f"{where} FP8 weights.strategy={strategy!r}")
            found.add(CheckpointQuantization("compressed-tensors", "fp8"))
        elif kind == "int" and bits in (4, 8) and fmt in INT_FORMATS:
            if strategy not in ("channel", "group"):
                raise refuse(f"{where} int weights.strategy={strategy!r}")
            if weights.get("actorder") not in (None, "weight", False):
                raise refuse(f"{where}.weights.actorder={weights.get('actorder')!r}")
            if group.get("input_activations"):
                raise refuse(f"{where}.input_activations (int activations)")
            found.add(CheckpointQuantization("compressed-tensors", "int", bits=bits))
        else:
            raise refuse(f"{where} format={fmt!r} weights type={kind!r} num_bits={bits!r}")
    if len(found) != 1:
        raise refuse(f"compressed-tensors with mixed schemes {sorted(q.describe() for q in found)}")
    return found.pop()
