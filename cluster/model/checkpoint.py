"""Safetensors checkpoints in the Hugging Face Mixtral layout, loaded by role.

  * coordinator role: embeddings, attention, norms, router gates, LM head - never an expert tensor;
  * expert role: w1/w2/w3 of the given experts for every layer - only the shards that hold them are opened.

Names follow the published Mixtral checkpoints (``model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight``...),
which is also what ``transformers``' ``save_pretrained`` writes.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

from cluster.model.config import ModelConfig
from cluster.model.experts import LocalExperts
from cluster.model.quant import (
    FP8_DTYPES,
    ExpertQuantization,
    QuantizedWeight,
    cat_rows,
    dequantize_fp8,
    fp8_weight,
    from_compressed_tensors,
    quantize_weight,
    stack_weights,
)
from cluster.model.quant_kernels import keeps_fp8

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class LayerWeights:
    """Non-expert weights of one decoder layer. Shapes: (H,), ((Q+2KV)*D, H), (H, Q*D), (H,), (E, H)."""

    attn_norm: Tensor
    wqkv: Tensor  # q_proj, k_proj, v_proj stacked: one matmul instead of three
    wo: Tensor
    moe_norm: Tensor
    gate: Tensor


@dataclass
class CoordinatorWeights:
    embed: Tensor  # (V, H)
    layers: list[LayerWeights]
    final_norm: Tensor  # (H,)
    lm_head: Tensor  # (V, H); the embedding itself when tied


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def expert_tensor_name(layer: int, expert: int, proj: str) -> str:
    return f"{layer_prefix(layer)}.block_sparse_moe.experts.{expert}.{proj}.weight"


def coordinator_shapes(cfg: ModelConfig, include_lm_head: bool) -> dict[str, tuple[int, ...]]:
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h),
                                          "model.norm.weight": (h,)}
    for layer in range(cfg.num_layers):
        p = layer_prefix(layer)
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.block_sparse_moe.gate.weight": (cfg.num_experts, h),
        }
    if include_lm_head:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def expert_shapes(cfg: ModelConfig, experts: Iterable[int]) -> dict[str, tuple[int, ...]]:
    return layer_expert_shapes(cfg, [(layer, e) for e in experts for layer in range(cfg.num_layers)])


def layer_expert_shapes(cfg: ModelConfig, pairs: Iterable[tuple[int, int]]) -> dict[str, tuple[int, ...]]:
    """w1/w2/w3 names and shapes of the given (layer, global expert) pairs."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, expert in pairs:
        if not 0 <= expert < cfg.num_experts:
            raise ValueError(f"expert id {expert} is outside [0, {cfg.num_experts})")
        shapes[expert_tensor_name(layer, expert, "w1")] = (i, h)
        shapes[expert_tensor_name(layer, expert, "w2")] = (h, i)
        shapes[expert_tensor_name(layer, expert, "w3")] = (i, h)
    return shapes


class Checkpoint:
    """A checkpoint directory: which file holds which tensor, and role-based loading.

    A quantized checkpoint (config.json ``quantization_config``, cluster/model/quant_format.py) is read here too: an FP8
    weight is dequantized with its scale; a pack-quantized int weight is unpacked (and kept quantized where the
    caller asks: the experts)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ValueError(f"model directory {str(self.model_dir)!r} does not exist")
        index = self.model_dir / INDEX_FILE
        single = self.model_dir / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index} is not a valid safetensors index: {err!r}") from None
            self.weight_map: dict[str, str] = dict(weight_map)
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}  # noqa: SIM118
        else:
            raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.model_dir}")
        config = self.model_dir / "config.json"
        # refuses a quantization_config that is not implemented, before any weight is read
        self.quantization = ModelConfig.from_file(config).quantization if config.is_file() else None
        self.files_opened: list[str] = []  # shards opened so far, for tests and logs

    def has(self, name: str) -> bool:
        return name in self.weight_map or self._packed_parts(name) is not None

    def _packed_parts(self, name: str) -> list[str] | None:
        """The pack-quantized tensors that stand for ``name`` (``X.weight``), if the checkpoint has them."""
        quant = self.quantization
        if quant is None or quant.kind != "int" or not name.endswith(".weight"):
            return None
        base = name.removesuffix("weight")
        if base + "weight_packed" not in self.weight_map:
            return None
        return [base + suffix for suffix in ("weight_packed", "weight_scale", "weight_shape")
                if base + suffix in self.weight_map]

    def _parts(self, name: str) -> list[str]:
        """The stored tensors that make up ``name``: itself (and its FP8 scale), or its packed form."""
        if name in self.weight_map:
            quant = self.quantization
            scale = name.removesuffix("weight") + quant.scale_suffix if quant and quant.kind == "fp8" else None
            return [name] + ([scale] if scale and name.endswith(".weight") and scale in self.weight_map else [])
        packed = self._packed_parts(name)
        if packed is None:
            raise ValueError(f"tensor {name!r} is missing from checkpoint {self.model_dir}")
        return packed

    def load(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device | str,
             desc: str, progress: bool = True) -> dict[str, Tensor]:
        """Read exactly the named tensors, checking each shape; opens only the shards that hold them. Quantized
        weights come back dequantized to ``dtype``."""
        loaded = self.load_weights(shapes, dtype, device, desc, progress, keep_quantized=False)
        return {name: t for name, t in loaded.items() if isinstance(t, Tensor)}

    def load_weights(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device | str,
                     desc: str, progress: bool = True, keep_quantized: bool = False, keep_fp8: bool = False
                     ) -> dict[str, Tensor | QuantizedWeight]:
        """``load``, except that with ``keep_quantized`` a pack-quantized weight stays a QuantizedWeight, and with
        ``keep_fp8`` too an FP8 weight stays FP8 (a QuantizedWeight of FP8 values, ``quant.fp8_weight``)."""
        parts = {name: self._parts(name) for name in shapes}
        by_file: dict[str, list[str]] = defaultdict(list)
        for stored in parts.values():
            for part in stored:
                by_file[self.weight_map[part]].append(part)
        total = sum(_numel(shape) for shape in shapes.values()) * dtype.itemsize
        raw: dict[str, Tensor] = {}
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress,
                  file=sys.stderr, leave=False) as bar:
            for filename in sorted(by_file):
                path = self.model_dir / filename
                if not path.is_file():
                    raise ValueError(f"checkpoint shard {path} named in {INDEX_FILE} does not exist")
                self.files_opened.append(filename)
                with safe_open(str(path), framework="pt") as f:
                    present = set(f.keys())
                    for name in by_file[filename]:
                        if name not in present:
                            raise ValueError(f"tensor {name!r} is missing from {path} "
                                             f"(the index says it is there)")
                        found = tuple(f.get_slice(name).get_shape())
                        if name in shapes and found != shapes[name]:
                            raise ValueError(f"tensor {name!r} in {path} has shape {list(found)}, "
                                             f"expected {list(shapes[name])}")
                        raw[name] = f.get_tensor(name)
                        bar.update(raw[name].numel() * dtype.itemsize)
        return {name: self._assemble(name, stored, raw, shapes[name], dtype, device, keep_quantized,
                                     keep_quantized and keep_fp8)
                for name, stored in parts.items()}

    def _assemble(self, name: str, stored: list[str], raw: dict[str, Tensor], shape: tuple[int, ...],
                  dtype: torch.dtype, device: torch.device | str, keep_quantized: bool, keep_fp8: bool
                  ) -> Tensor | QuantizedWeight:
        quant = self.quantization
        if stored[0] == name:  # plain, or FP8 with its scale
            tensor = raw.pop(name)
            if len(stored) == 2:
                assert quant is not None
                if keep_fp8 and tensor.dtype == torch.float8_e4m3fn and len(shape) == 2:
                    try:
                        return fp8_weight(tensor, raw.pop(stored[1]), quant.block).to(device)
                    except ValueError as err:
                        raise ValueError(f"tensor {name!r} in {self.model_dir}: {err}") from None
                return dequantize_fp8(tensor, raw.pop(stored[1]), dtype, quant.block).to(device)
            if tensor.dtype in FP8_DTYPES:
                raise ValueError(f"tensor {name!r} of {self.model_dir} is {tensor.dtype} but has no "
                                 f"{quant.scale_suffix if quant else 'weight_scale'} next to it (quantization_config: "
                                 f"{quant.describe() if quant else 'none'}); refusing to load it unscaled")
            return tensor.to(device=device, dtype=dtype)
        assert quant is not None and quant.kind == "int"
        base = name.removesuffix("weight")
        if base + "weight_scale" not in raw:
            raise ValueError(f"tensor {base + 'weight_packed'!r} of {self.model_dir} has no weight_scale")
        if base + "weight_shape" in raw:
            stored_shape = tuple(int(d) for d in raw.pop(base + "weight_shape").tolist())
            if stored_shape != shape:
                raise ValueError(f"tensor {name!r} in {self.model_dir} has weight_shape {list(stored_shape)}, "
                                 f"expected {list(shape)}")
        if len(shape) != 2:
            raise ValueError(f"tensor {name!r} is pack-quantized but is not a matrix (shape {list(shape)})")
        try:
            weight = from_compressed_tensors(raw.pop(base + "weight_packed"), raw.pop(base + "weight_scale"),
                                             quant.bits, (shape[0], shape[1]))
        except ValueError as err:
            raise ValueError(f"tensor {name!r} in {self.model_dir}: {err}") from None
        return weight.to(device) if keep_quantized else weight.dequantize(dtype).to(device)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def load_coordinator_weights(ckpt: Checkpoint, cfg: ModelConfig, dtype: torch.dtype,
                             device: torch.device | str = "cpu", progress: bool = True) -> CoordinatorWeights:
    """Everything but the experts. When tied, lm_head is the embedding (a stored copy is ignored)."""
    if not cfg.tie_word_embeddings and not ckpt.has("lm_head.weight"):
        raise ValueError(f"tensor 'lm_head.weight' is missing from checkpoint {ckpt.model_dir} "
                         "and tie_word_embeddings is false")
    t = ckpt.load(coordinator_shapes(cfg, include_lm_head=not cfg.tie_word_embeddings),
                  dtype, device, desc="loading coordinator weights", progress=progress)
    layers = []
    for layer in range(cfg.num_layers):
        p = layer_prefix(layer)
        layers.append(LayerWeights(
            attn_norm=t[f"{p}.input_layernorm.weight"],
            wqkv=torch.cat([t.pop(f"{p}.self_attn.{n}_proj.weight") for n in ("q", "k", "v")]),
            wo=t[f"{p}.self_attn.o_proj.weight"], moe_norm=t[f"{p}.post_attention_layernorm.weight"],
            gate=t[f"{p}.block_sparse_moe.gate.weight"]))
    embed = t["model.embed_tokens.weight"]
    lm_head = embed if cfg.tie_word_embeddings else t["lm_head.weight"]
    return CoordinatorWeights(embed=embed, layers=layers, final_norm=t["model.norm.weight"], lm_head=lm_head)


def load_expert_weights(ckpt: Checkpoint, cfg: ModelConfig, expert_ids: Sequence[int], dtype: torch.dtype,
                        device: torch.device | str = "cpu", progress: bool = True,
                        quantize: ExpertQuantization | None = None) -> LocalExperts:
    """w1/w2/w3 of ``expert_ids`` (global ids, in local-id order) for every layer, and nothing else."""
    return load_layer_experts(ckpt, cfg, (tuple(expert_ids),) * cfg.num_layers, dtype, device, progress,
                              quantize=quantize)


def load_layer_experts(ckpt: Checkpoint, cfg: ModelConfig, layer_experts: Sequence[Sequence[int]],
                       dtype: torch.dtype, device: torch.device | str = "cpu", progress: bool = True,
                       have: LocalExperts | None = None, quantize: ExpertQuantization | None = None) -> LocalExperts:
    """w1/w2/w3 of ``layer_experts[layer]`` (global ids in local-id order, per layer). Experts that ``have``
    already holds in a layer are taken from it (a layer whose list is unchanged shares its tensors); only the
    others are read, from only the shards that hold them.

    ``quantize``: store them quantized (quantized in float32 from the checkpoint's values, one expert matrix at a
    time); a checkpoint whose experts are already pack-quantized keeps them as stored (``quantize`` must then be
    None or the same scheme). Full-precision experts are in ``dtype``."""
    if len(layer_experts) != cfg.num_layers:
        raise ValueError(f"expected expert ids for {cfg.num_layers} layers, got {len(layer_experts)}")
    held = {} if have is None else {(layer, e): j for layer, ids in enumerate(have.layer_experts)
                                    for j, e in enumerate(ids)}
    missing = [(layer, e) for layer, ids in enumerate(layer_experts) for e in ids if (layer, e) not in held]
    read_dtype = torch.float32 if quantize is not None else dtype
    # FP8 experts stay FP8 where a GPU multiplies FP8 (quant_kernels.keeps_fp8): half the bytes of bf16
    t = ckpt.load_weights(layer_expert_shapes(cfg, missing), read_dtype, device,
                          desc=f"loading {len(missing)} expert-layers", progress=progress, keep_quantized=True,
                          keep_fp8=quantize is None and keeps_fp8(device))

    def stored(layer: int, e: int, proj: str) -> Tensor | QuantizedWeight:
        w = t.pop(expert_tensor_name(layer, e, proj))
        if isinstance(w, QuantizedWeight):
            if quantize is not None and (quantize.bits, quantize.groups(w.in_features)) != (w.bits, w.group_size):
                raise ValueError(f"checkpoint {ckpt.model_dir} already holds int{w.bits} experts (group size "
                                 f"{w.group_size}); quantize_experts {quantize.name} would quantize them again: "
                                 "leave quantize_experts unset")
            return w
        return quantize_weight(w, quantize) if quantize is not None else w

    w13: list[Tensor | QuantizedWeight] = []
    w2: list[Tensor | QuantizedWeight] = []
    i, h = cfg.intermediate_size, cfg.hidden_size
    for layer, ids in enumerate(layer_experts):
        if have is not None and tuple(have.layer_experts[layer]) == tuple(ids):
            w13.append(have.w13[layer])
            w2.append(have.w2[layer])
            continue
        if not ids:  # no expert of this layer here: empty stacks
            w13.append(torch.empty(0, 2 * i, h, dtype=dtype, device=device))
            w2.append(torch.empty(0, h, i, dtype=dtype, device=device))
            continue
        parts13: list[Tensor | QuantizedWeight] = []
        parts2: list[Tensor | QuantizedWeight] = []
        for e in ids:
            if (layer, e) in held:
                assert have is not None
                parts13.append(have.w13[layer][held[layer, e]])
                parts2.append(have.w2[layer][held[layer, e]])
            else:
                parts13.append(cat_rows(stored(layer, e, "w1"), stored(layer, e, "w3")))
                parts2.append(stored(layer, e, "w2"))
        w13.append(stack_weights(parts13))
        w2.append(stack_weights(parts2))
    return LocalExperts(layer_experts=tuple(tuple(ids) for ids in layer_experts), w13=w13, w2=w2)
