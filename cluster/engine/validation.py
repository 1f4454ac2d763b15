"""Request validation against the model and the KV cache: every refusal names the request field at fault."""

from __future__ import annotations

from collections.abc import Sequence

from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import Continuation
from cluster.engine_config import EngineConfig
from cluster.errors import RequestError
from cluster.model.config import ModelConfig
from cluster.model.kv_cache import blocks_for


def resolve_max_model_len(model_cfg: ModelConfig, engine_cfg: EngineConfig) -> int:
    if engine_cfg.max_model_len is None:
        return model_cfg.max_position_embeddings
    if engine_cfg.max_model_len > model_cfg.max_position_embeddings:
        raise ValueError(f"max_model_len={engine_cfg.max_model_len} exceeds the model's "
                         f"max_position_embeddings={model_cfg.max_position_embeddings}")
    return engine_cfg.max_model_len


def validate_request(prompt_ids: Sequence[int], params: SamplingParams, *, vocab_size: int, max_model_len: int,
                     kv_blocks: int, block_size: int, continuation: Continuation | None = None) -> int:
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
    for token, _ in params.logit_bias:
        if token >= vocab_size:
            raise RequestError(f"logit_bias holds token id {token}, outside the vocabulary [0, {vocab_size})",
                               "logit_bias")
    n_prompt = len(prompt_ids)
    if n_prompt >= max_model_len:
        raise RequestError(f"the prompt has {n_prompt} tokens but the model's context length is "
                           f"{max_model_len} tokens, leaving no room to generate", "prompt")
    max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len - n_prompt
    if n_prompt + max_tokens > max_model_len:
        raise RequestError(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the "
                           f"model's context length of {max_model_len} tokens", "max_tokens")
    if continuation is not None:
        validate_continuation(continuation, params, max_tokens, vocab_size)
    needed = blocks_for(n_prompt + max_tokens, block_size)
    if needed > kv_blocks:
        raise RequestError(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) needs {needed} "
                           f"KV cache blocks but the cache holds only {kv_blocks} ({kv_blocks * block_size} tokens)",
                           "max_tokens")
    return max_tokens


def validate_continuation(continuation: Continuation, params: SamplingParams, max_tokens: int, vocab_size: int) -> None:
    """Check the continuation form of a request (see sequence.Continuation) against its parameters."""
    if not isinstance(continuation, Continuation):
        raise TypeError(f"continuation must be a Continuation, got {type(continuation).__name__}")
    samples = continuation.samples
    if len(samples) != params.n:
        raise RequestError(f"the continuation holds {len(samples)} samples but n is {params.n}", "continuation")
    if not params.greedy and params.seed is None:
        raise RequestError("a continuation of a sampled request needs the request's seed, to draw what the "
                           "uninterrupted request would have", "seed")
    if all(s.finished for s in samples):
        raise RequestError("every sample of the continuation is finished: nothing to continue", "continuation")
    for index, sample in enumerate(samples):
        where = f"continuation sample {index}"
        if isinstance(sample.text_chars, bool) or not isinstance(sample.text_chars, int) or sample.text_chars < 0:
            raise RequestError(f"{where}: text_chars must be an integer >= 0, got {sample.text_chars!r}",
                               "continuation")
        bad = [t for t in sample.token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"{where}: token id {bad[0]!r} is outside the vocabulary [0, {vocab_size})",
                               "continuation")
        limit = max_tokens if sample.finished else max_tokens - 1  # an open sample has room for one more token
        if len(sample.token_ids) > limit:
            raise RequestError(f"{where} has {len(sample.token_ids)} tokens; max_tokens={max_tokens} leaves room "
                               f"for at most {limit} before it continues", "continuation")
