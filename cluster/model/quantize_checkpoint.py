"""``moe-cluster quantize IN OUT --bits 8|4 [--group-size G]``: a checkpoint with its experts quantized once.

The output is the Hugging Face layout with compressed-tensors' ``pack-quantized`` format for the expert Linears
(``...experts.{e}.w{1,2,3}.weight_packed`` int32, ``weight_scale`` float32 (N, groups), ``weight_shape``) and every
other tensor (embeddings, attention, routers, norms, LM head) copied unchanged; config.json gets the matching
``quantization_config`` (targets ``Linear``, the non-expert Linears listed in ``ignore``). This project loads it with
the experts kept quantized; the same numbers as ``--quantize-experts`` at load (cluster/model/quant.py quantize_weight).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from cluster.model.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint
from cluster.model.quant import ExpertQuantization, quantize_weight, to_compressed_tensors

log = logging.getLogger("moe_cluster.quantize")
EXPERT_WEIGHT = re.compile(r"^model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]\.weight$")


def quantization_config(quant: ExpertQuantization) -> dict[str, Any]:
    """The compressed-tensors ``quantization_config`` of a checkpoint whose experts only are quantized."""
    per_channel = quant.group_size is None
    weights = {"num_bits": quant.bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "channel" if per_channel else "group", "group_size": quant.group_size,
               "actorder": None, "observer": "minmax", "block_structure": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        # attention and the routers stay in full precision (only the experts are quantized)
        "ignore": ["lm_head", "re:.*self_attn\\..*", "re:.*block_sparse_moe\\.gate$"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


def quantize_checkpoint(src: str | Path, dst: str | Path, quant: ExpertQuantization, overwrite: bool = False,
                        progress: bool = True) -> Path:
    """Write ``src`` with its experts quantized to ``dst``; returns ``dst``."""
    src, dst = Path(src), Path(dst)
    ckpt = Checkpoint(src)
    if ckpt.quantization is not None:
        raise ValueError(f"checkpoint {src} is already quantized ({ckpt.quantization.describe()}); "
                         "quantize a full-precision checkpoint")
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise ValueError(f"output directory {str(dst)!r} is not empty (pass --force to overwrite)")
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    raw_config = json.loads((src / "config.json").read_text())
    for path in src.iterdir():  # tokenizer, generation config, ...: copied as they are
        if path.is_file() and path.name not in ("config.json", INDEX_FILE) and path.suffix != ".safetensors":
            shutil.copy2(path, dst / path.name)
    weight_map: dict[str, str] = {}
    total_in = total_out = 0
    files = sorted(set(ckpt.weight_map.values()))
    for filename in tqdm(files, desc="quantizing shards", disable=not progress, file=sys.stderr, leave=False):
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(src / filename), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                tensor = f.get_tensor(name)
                total_in += tensor.numel() * tensor.element_size()
                if EXPERT_WEIGHT.match(name):
                    parts = to_compressed_tensors(quantize_weight(tensor.float(), quant))
                    for suffix, part in parts.items():
                        out[name.removesuffix("weight") + suffix] = part
                else:
                    out[name] = tensor
        save_file(out, str(dst / filename), metadata={"format": "pt"})
        total_out += sum(t.numel() * t.element_size() for t in out.values())
        weight_map |= {name: filename for name in out}
    if len(files) > 1 or filename != SINGLE_FILE:
        (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total_out}, "weight_map": weight_map},
                                                 indent=2))
    raw_config["quantization_config"] = quantization_config(quant)
    (dst / "config.json").write_text(json.dumps(raw_config, indent=2))
    log.info("wrote %s: experts %s, %.1f MiB -> %.1f MiB in all", dst, quant.name, total_in / 2**20,
             total_out / 2**20)
    return dst
