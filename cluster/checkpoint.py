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

from cluster.config import ModelConfig
from cluster.moe import LocalExperts

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
    """A checkpoint directory: which file holds which tensor, and role-based loading."""

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
        self.files_opened: list[str] = []  # shards opened so far, for tests and logs

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def load(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device | str,
             desc: str, progress: bool = True) -> dict[str, Tensor]:
        """Read exactly the named tensors, checking each shape; opens only the shards that hold them."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in shapes:
            if name not in self.weight_map:
                raise ValueError(f"tensor {name!r} is missing from checkpoint {self.model_dir}")
            by_file[self.weight_map[name]].append(name)
        total = sum(_numel(shape) for shape in shapes.values()) * dtype.itemsize
        tensors: dict[str, Tensor] = {}
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
                        if found != shapes[name]:
                            raise ValueError(f"tensor {name!r} in {path} has shape {list(found)}, "
                                             f"expected {list(shapes[name])}")
                        tensors[name] = f.get_tensor(name).to(device=device, dtype=dtype)
                        bar.update(tensors[name].numel() * dtype.itemsize)
        return tensors


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
                        device: torch.device | str = "cpu", progress: bool = True) -> LocalExperts:
    """w1/w2/w3 of ``expert_ids`` (global ids, in local-id order) for every layer, and nothing else."""
    return load_layer_experts(ckpt, cfg, (tuple(expert_ids),) * cfg.num_layers, dtype, device, progress)


def load_layer_experts(ckpt: Checkpoint, cfg: ModelConfig, layer_experts: Sequence[Sequence[int]],
                       dtype: torch.dtype, device: torch.device | str = "cpu", progress: bool = True,
                       have: LocalExperts | None = None) -> LocalExperts:
    """w1/w2/w3 of ``layer_experts[layer]`` (global ids in local-id order, per layer). Experts that ``have``
    already holds in a layer are taken from it (a layer whose list is unchanged shares its tensors); only the
    others are read, from only the shards that hold them."""
    if len(layer_experts) != cfg.num_layers:
        raise ValueError(f"expected expert ids for {cfg.num_layers} layers, got {len(layer_experts)}")
    held = {} if have is None else {(layer, e): j for layer, ids in enumerate(have.layer_experts)
                                    for j, e in enumerate(ids)}
    missing = [(layer, e) for layer, ids in enumerate(layer_experts) for e in ids if (layer, e) not in held]
    t = ckpt.load(layer_expert_shapes(cfg, missing), dtype, device,
                  desc=f"loading {len(missing)} expert-layers", progress=progress)
    w13, w2 = [], []
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
        parts13, parts2 = [], []
        for e in ids:
            if (layer, e) in held:
                assert have is not None
                parts13.append(have.w13[layer][held[layer, e]])
                parts2.append(have.w2[layer][held[layer, e]])
            else:
                parts13.append(torch.cat([t.pop(expert_tensor_name(layer, e, "w1")),
                                          t.pop(expert_tensor_name(layer, e, "w3"))]))
                parts2.append(t.pop(expert_tensor_name(layer, e, "w2")))
        w13.append(torch.stack(parts13))
        w2.append(torch.stack(parts2))
    return LocalExperts(layer_experts=tuple(tuple(ids) for ids in layer_experts), w13=w13, w2=w2)
