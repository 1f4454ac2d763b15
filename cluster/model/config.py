"""ModelConfig: the architecture of a Mixtral-family checkpoint, parsed once from its config.json.

Two forms of config.json exist in the wild and both are accepted:
  * classic (Mixtral-8x7B as published, transformers < 4.56): top-level ``rope_theta`` and ``torch_dtype``;
  * current (what ``transformers`` writes today): ``rope_parameters = {"rope_type", "rope_theta"}`` and ``dtype``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.model.quant_format import CheckpointQuantization, parse_quantization_config

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch.dtype of those) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype {name} is not supported; choose one of {sorted(DTYPES)}")
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


# Our field name -> the Hugging Face config.json key, for the integer fields every Mixtral config.json names.
# Read in from_dict, written by to_hf_dict, and used to name fields in errors.
HF_KEYS: dict[str, str] = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "num_experts": "num_local_experts",
    "experts_per_token": "num_experts_per_tok",
    "max_position_embeddings": "max_position_embeddings",
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    quantization: CheckpointQuantization | None = None  # how the checkpoint's weights are stored (None: plain)

    def __post_init__(self) -> None:
        for name, key in HF_KEYS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {key} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"config field num_attention_heads={self.num_heads} is not divisible by "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"config field head_dim must be even for RoPE, got {self.head_dim}")
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"config field num_experts_per_tok={self.experts_per_token} exceeds "
                f"num_local_experts={self.num_experts}"
            )
        if not self.rms_norm_eps > 0:
            raise ValueError(f"config field rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"config field rope_theta must be > 0, got {self.rope_theta!r}")
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool)
            or not isinstance(self.sliding_window, int)
            or self.sliding_window <= 0
        ):
            raise ValueError(f"config field sliding_window must be a positive integer or null, "
                             f"got {self.sliding_window!r}")
        parse_dtype(self.dtype)
        for token_id in self.eos_token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"config field eos_token_id={token_id} is outside the vocabulary "
                                 f"(vocab_size={self.vocab_size})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse a Hugging Face Mixtral config.json (classic or current form)."""
        if not isinstance(raw, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise ValueError(f"config field model_type must be 'mixtral', got {model_type!r}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config field hidden_act must be 'silu' (SwiGLU experts), got {act!r}")
        optional = {"head_dim": None, "num_key_value_heads": raw.get("num_attention_heads"),
                    "max_position_embeddings": 32768}
        fields: dict[str, Any] = {}
        for name, key in HF_KEYS.items():
            value = raw.get(key)
            if value is None:
                if key not in optional:
                    raise ValueError(f"config.json is missing the required field {key!r}")
                value = optional[key]
            fields[name] = value
        if fields["head_dim"] is None:
            hidden, heads = fields["hidden_size"], fields["num_heads"]
            if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0 or hidden % heads:
                raise ValueError(f"config field hidden_size={hidden!r} is not divisible by "
                                 f"num_attention_heads={heads!r} and no head_dim is given")
            fields["head_dim"] = hidden // heads
        eos = raw.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        quantization = parse_quantization_config(raw.get("quantization_config"))  # refuses what is not implemented
        return cls(
            **fields,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=_rope_theta(raw),
            sliding_window=raw.get("sliding_window"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            dtype=str(dtype).removeprefix("torch."),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quantization=quantization,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (or a model directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The current Hugging Face form of this config (what ``init-demo`` writes)."""
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            **{key: getattr(self, name) for name, key in HF_KEYS.items()},
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "attention_dropout": 0.0,
            "router_jitter_noise": 0.0,
        }


def _rope_theta(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"config field rope_parameters must be an object, got {params!r}")
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"config field rope_parameters.rope_type={rope_type!r} is not supported "
                             "(only 'default' RoPE)")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    scaling = raw.get("rope_scaling")
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if rope_type != "default":
            raise ValueError(f"config field rope_scaling={scaling!r} is not supported (only default RoPE)")
    return float(raw.get("rope_theta", 1e6))
