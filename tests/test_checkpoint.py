"""Checkpoint loading by role: the coordinator never reads experts; a worker reads only its experts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from cluster.model.checkpoint import (
    Checkpoint,
    expert_tensor_name,
    load_coordinator_weights,
    load_expert_weights,
)
from cluster.model.config import ModelConfig
from cluster.model.quant import full_precision
from tests.conftest import HFCheckpoint, make_hf_checkpoint


def test_expert_role_reads_only_its_experts_and_their_shards(hf_small: HFCheckpoint) -> None:
    cfg = ModelConfig.from_file(hf_small.path)
    ckpt = Checkpoint(hf_small.path)
    experts = load_expert_weights(ckpt, cfg, [5, 2], torch.float32, progress=False)
    assert experts.layer_experts == ((5, 2),) * cfg.num_layers
    hf_experts = hf_small.model.model.layers[1].mlp.experts
    # Local id 0 is global expert 5: w13 = [w1; w3] = transformers' fused gate_up_proj.
    assert torch.equal(full_precision(experts.w13[1])[0], hf_experts.gate_up_proj[5])
    assert torch.equal(full_precision(experts.w2[1])[1], hf_experts.down_proj[2])
    index = json.loads((hf_small.path / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {index[expert_tensor_name(layer, e, p)] for layer in range(cfg.num_layers) for e in (5, 2)
              for p in ("w1", "w2", "w3")}
    assert set(ckpt.files_opened) == needed
    assert len(needed) < len(set(index.values()))  # some shards were never opened


def test_coordinator_role_reads_no_expert_tensor(hf_small: HFCheckpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ModelConfig.from_file(hf_small.path)
    ckpt = Checkpoint(hf_small.path)
    requested: list[str] = []
    original = ckpt.load

    def spy(shapes: dict[str, tuple[int, ...]], *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        requested.extend(shapes)
        return original(shapes, *args, **kwargs)

    monkeypatch.setattr(ckpt, "load", spy)
    weights = load_coordinator_weights(ckpt, cfg, torch.float32, progress=False)
    assert requested and not any(".experts." in name for name in requested)
    assert torch.equal(weights.layers[0].gate, hf_small.model.model.layers[0].mlp.gate.weight)
    assert torch.equal(weights.lm_head, hf_small.model.lm_head.weight)


def test_tied_checkpoint_without_lm_head(tmp_path: Path) -> None:
    ckpt = make_hf_checkpoint(tmp_path, tie_word_embeddings=True)
    cfg = ModelConfig.from_file(ckpt.path)
    weights = load_coordinator_weights(Checkpoint(ckpt.path), cfg, torch.float32, progress=False)
    assert weights.lm_head is weights.embed


def test_dtype_is_selectable(hf_small: HFCheckpoint) -> None:
    cfg = ModelConfig.from_file(hf_small.path)
    for dtype in (torch.bfloat16, torch.float16):
        experts = load_expert_weights(Checkpoint(hf_small.path), cfg, [0], dtype, progress=False)
        assert full_precision(experts.w13[0]).dtype == dtype


def _single_file(tmp_path: Path) -> tuple[Path, ModelConfig]:
    ckpt = make_hf_checkpoint(tmp_path)
    return ckpt.path, ModelConfig.from_file(ckpt.path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path, cfg = _single_file(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model.layers.1.block_sparse_moe.experts.3.w2.weight' is missing"):
        load_expert_weights(Checkpoint(path), cfg, [3], torch.float32, progress=False)


def test_wrong_shape_names_key_file_and_both_shapes(tmp_path: Path) -> None:
    path, cfg = _single_file(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(7, 32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        load_coordinator_weights(Checkpoint(path), cfg, torch.float32, progress=False)
    text = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight" in text and "model.safetensors" in text
    assert "[7, 32]" in text and "[8, 32]" in text


def test_no_checkpoint_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        Checkpoint(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        Checkpoint(tmp_path / "nope")


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    ckpt = make_hf_checkpoint(tmp_path, shards=True)
    cfg = ModelConfig.from_file(ckpt.path)
    index = json.loads((ckpt.path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][expert_tensor_name(0, 0, "w1")]
    (ckpt.path / shard).unlink()
    with pytest.raises(ValueError, match=f"shard .*{shard} named in model.safetensors.index.json does not exist"):
        load_expert_weights(Checkpoint(ckpt.path), cfg, [0], torch.float32, progress=False)
