"""ModelConfig parsing: both config.json forms, and a clear error for every bad field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig
from cluster.model.config import ModelConfig

# The config.json published with Mixtral-8x7B-v0.1 (classic form).
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def test_classic_mixtral_8x7b() -> None:
    cfg = ModelConfig.from_dict(MIXTRAL_8X7B)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (4096, 32, 32, 8)
    assert (cfg.head_dim, cfg.num_experts, cfg.experts_per_token) == (128, 8, 2)
    assert cfg.rope_theta == 1e6 and cfg.dtype == "bfloat16" and cfg.sliding_window is None
    assert cfg.eos_token_ids == (2,) and not cfg.tie_word_embeddings


def test_current_form_round_trips_through_transformers(tmp_path: Path) -> None:
    from transformers import MixtralConfig

    hf = MixtralConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, sliding_window=7, tie_word_embeddings=True,
                       # The legacy keyword, not a declared field: transformers turns it into rope_parameters.
                       rope_theta=5e5)  # type: ignore[call-arg]
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_theta" not in raw
    cfg = ModelConfig.from_file(tmp_path)
    assert cfg.rope_theta == 5e5 and cfg.sliding_window == 7 and cfg.tie_word_embeddings
    assert ModelConfig.from_dict(cfg.to_hf_dict()) == cfg
    # transformers reads what we write back.
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    again = MixtralConfig.from_pretrained(tmp_path)
    assert again.rope_parameters is not None
    assert again.num_key_value_heads == 2 and again.rope_parameters["rope_theta"] == 5e5


@pytest.mark.parametrize(("change", "message"), [
    ({"num_attention_heads": 32, "num_key_value_heads": 5}, "num_attention_heads=32 is not divisible by "
                                                            "num_key_value_heads=5"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok=9 exceeds num_local_experts=8"),
    ({"hidden_size": None}, "missing the required field 'hidden_size'"),
    ({"vocab_size": -1}, "vocab_size must be a positive integer, got -1"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer, got 2.5"),
    ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
    ({"model_type": "llama"}, "model_type must be 'mixtral', got 'llama'"),
    ({"torch_dtype": "int8"}, "dtype 'int8' is not supported"),
    ({"sliding_window": 0}, "sliding_window must be a positive integer or null, got 0"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope_scaling"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be > 0"),
    ({"eos_token_id": 40000}, "eos_token_id=40000 is outside the vocabulary"),
])
def test_bad_fields_name_field_and_value(change: dict[str, Any], message: str) -> None:
    raw = MIXTRAL_8X7B | change
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_dict(raw)


def test_missing_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)


def test_config_is_frozen() -> None:
    cfg = ModelConfig.from_dict(MIXTRAL_8X7B)
    with pytest.raises(AttributeError):
        cfg.hidden_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (EngineConfig, {"model": "m", "max_num_seqs": 0}, "max_num_seqs must be a positive integer, got 0"),
    (EngineConfig, {"model": "m", "dtype": "fp8"}, "dtype 'fp8' is not supported"),
    (EngineConfig, {"model": "m", "device": "tpu"}, "device must be"),
    (EngineConfig, {"model": "m", "kv_cache_fraction": 1.5}, "kv_cache_fraction must be in"),
    (PoolConfig, {"experts_per_worker": 0}, "experts_per_worker must be a positive integer, got 0"),
    (PoolConfig, {"link_slots": 0}, "link_slots must be a positive integer, got 0"),
    (PoolConfig, {"placement_strategy": "RANDOM"}, "placement_strategy must be PACK"),
    (ClusterConfig, {"backend": "mpi"}, "backend must be"),
    (ClusterConfig, {"link": "tcp"}, "link must be 'auto', 'shm' or 'pg', got 'tcp'"),
    (ClusterConfig, {"heartbeat_s": 0}, "heartbeat_s must be a positive number, got 0"),
    (ClusterConfig, {"coordinator_omp_wait_policy": "sleepy"}, "coordinator_omp_wait_policy must be 'passive', "
                                                                 "'active' or null .*got 'sleepy'"),
    (PoolConfig, {"worker_omp_wait_policy": "PASSIVE"}, "worker_omp_wait_policy must be .*got 'PASSIVE'"),
])
def test_serving_config_errors(cls: type, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_unknown_serving_config_field_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown engine config field\(s\) \['max_seqs'\]"):
        EngineConfig.from_dict({"model": "m", "max_seqs": 3})
