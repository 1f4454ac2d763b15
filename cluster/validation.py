"""Request validation against the model and the KV cache: every refusal names the request field at fault."""

from __future__ import annotations

from collections.abc import Sequence

from cluster.config import ModelConfig
from cluster.engine_config import EngineConfig
from cluster.errors import RequestError
from cluster.kv_cache import blocks_for
from cluster.sampling import SamplingParams


def resolve_max_model_len(model_cfg: ModelConfig, engine_cfg: EngineConfig) -> int:
    if engine_cfg.max_model_len is None:
        return model_cfg.max_position_embeddings
    if engine_cfg.max_model_len > model_cfg.max_position_embeddings:
        raise ValueError(f"max_model_len={engine_cfg.max_model_len} exceeds the model's "
                         f"max_position_embeddings={model_cfg.max_position_embeddings}")
    return engine_cfg.max_model_len


def validate_request(prompt_ids: Sequence[int], params: SamplingParams, *, vocab_size: int, max_model_len: int,
                     kv_blocks: int, block_size: int) -> int:
    """Check a request; returns its max_tokens resolved against the context length. Pure, so thread-safe."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise RequestError("prompt must contain at least one token", "prompt")
    for i, token in enumerate(prompt_ids):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise RequestError(f"prompt token id {token!r} at position {i} is outside the vocabulary "
                               f"[0, {vocab_size})", "prompt")
    for token in params.stop_token_ids:
        if token >= vocab_size:
            raise RequestError(f"stop_token_ids holds {token}, outside the vocabulary [0, {vocab_size})",
                               "stop_token_ids")
    n_prompt = len(prompt_ids)
    if n_prompt >= max_model_len:
        raise RequestError(f"the prompt has {n_prompt} tokens but the model's context length is "
                           f"{max_model_len} tokens, leaving no room to generate", "prompt")
    max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len - n_prompt
    if n_prompt + max_tokens > max_model_len:
        raise RequestError(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the "
                           f"model's context length of {max_model_len} tokens", "max_tokens")
    needed = blocks_for(n_prompt + max_tokens, block_size)
    if needed > kv_blocks:
        raise RequestError(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) needs {needed} "
                           f"KV cache blocks but the cache holds only {kv_blocks} ({kv_blocks * block_size} tokens)",
                           "max_tokens")
    return max_tokens
