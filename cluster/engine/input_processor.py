"""InputProcessor: a caller's request (prompt text or token ids, SamplingParams, maybe a continuation) made into
an ``EngineRequest`` the engine trusts, after vLLM v1's engine/input_processor.py. The one place where a prompt is
tokenized, a request is validated (validation.py) and a seed is drawn for a request that gave none: the engine
checks nothing again, and the seed it samples with is reported back in the request's first output (so that a
gateway resuming the request elsewhere resumes it exactly). Pure: callable from any thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cluster.engine.api import Prompt, new_request_id
from cluster.engine.sampling import SamplingParams, bad_words_token_ids, new_request_seed
from cluster.engine.sequence import Continuation
from cluster.engine.structured_output import GrammarConstraints
from cluster.engine.validation import validate_request
from cluster.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineRequest:
    """A tokenized, validated request with its seed resolved: LLMEngine.add_request takes only these."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    max_tokens: int  # params.max_tokens resolved against the context length
    seed: int  # params.seed, or one drawn for this request
    continuation: Continuation | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # params.bad_words as token sequences
    prompt_text: str | None = None  # the prompt, when it came as text (echoed as given)
    arrival_time: float = field(default_factory=time.monotonic)


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, kv_blocks: int,
                 block_size: int, grammars: GrammarConstraints | None = None) -> None:
        self.tokenizer = tokenizer
        self.grammars = grammars  # structured output: a request's spec is compiled (and cached) when it comes in
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.kv_blocks = kv_blocks
        self.block_size = block_size

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)):
            raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def process(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                continuation: Continuation | None = None) -> EngineRequest:
        """Tokenize, validate (a refusal raises RequestError naming the field) and resolve the seed."""
        prompt_ids = self.encode(prompt)
        max_tokens = validate_request(prompt_ids, params, vocab_size=self.vocab_size,
                                      max_model_len=self.max_model_len, kv_blocks=self.kv_blocks,
                                      block_size=self.block_size, continuation=continuation)
        if params.structured is not None and self.grammars is not None:
            self.grammars.compile(params.structured)  # a bad schema / regex / grammar fails here (cached)
        bad_words = bad_words_token_ids(params.bad_words,
                                        lambda text: self.tokenizer.encode(text, add_special_tokens=False))
        return EngineRequest(request_id or new_request_id(), tuple(prompt_ids), params, max_tokens,
                             params.seed if params.seed is not None else new_request_seed(), continuation,
                             tuple(tuple(ids) for ids in bad_words), prompt if isinstance(prompt, str) else None)
