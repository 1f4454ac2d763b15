from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    MAX_TOKENS: _ClassVar[StopReason]
    EOS_TOKEN: _ClassVar[StopReason]
    STOP_SEQUENCE: _ClassVar[StopReason]
    CANCELLED: _ClassVar[StopReason]
    ERROR: _ClassVar[StopReason]
STOP_REASON_UNSPECIFIED: StopReason
MAX_TOKENS: StopReason
EOS_TOKEN: StopReason
STOP_SEQUENCE: StopReason
CANCELLED: StopReason
ERROR: StopReason

class SamplingParams(_message.Message):
    __slots__ = ("seed", "temperature", "top_k", "top_p")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: float | None = ..., top_p: float | None = ..., top_k: int | None = ..., seed: int | None = ...) -> None: ...

class StoppingCriteria(_message.Message):
    __slots__ = ("ignore_eos", "max_new_tokens", "stop_sequences", "stop_token_ids")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    stop_sequences: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_new_tokens: int | None = ..., stop_sequences: _Iterable[str] | None = ..., stop_token_ids: _Iterable[int] | None = ..., ignore_eos: bool | None = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Iterable[int] | None = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("logprobs", "model", "prompt", "prompt_token_ids", "request_id", "sampling", "stopping")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    prompt_token_ids: TokenIds
    sampling: SamplingParams
    stopping: StoppingCriteria
    logprobs: int
    request_id: str
    def __init__(self, model: str | None = ..., prompt: str | None = ..., prompt_token_ids: TokenIds | _Mapping | None = ..., sampling: SamplingParams | _Mapping | None = ..., stopping: StoppingCriteria | _Mapping | None = ..., logprobs: int | None = ..., request_id: str | None = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("completion_tokens", "prompt_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: int | None = ..., completion_tokens: int | None = ..., total_tokens: int | None = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("logprob", "token", "token_id")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    logprob: float
    def __init__(self, token_id: int | None = ..., token: str | None = ..., logprob: float | None = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("logprob", "token", "token_id", "top")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: int | None = ..., token: str | None = ..., logprob: float | None = ..., top: _Iterable[TopLogprob | _Mapping] | None = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("logprobs", "model", "request_id", "stop_reason", "stop_sequence", "stop_token_id", "text", "token_ids", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop_reason: StopReason
    stop_sequence: str
    stop_token_id: int
    usage: Usage
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, request_id: str | None = ..., model: str | None = ..., text: str | None = ..., token_ids: _Iterable[int] | None = ..., stop_reason: StopReason | str | None = ..., stop_sequence: str | None = ..., stop_token_id: int | None = ..., usage: Usage | _Mapping | None = ..., logprobs: _Iterable[TokenLogprob | _Mapping] | None = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("logprobs", "request_id", "stop_reason", "stop_sequence", "stop_token_id", "text", "token_ids", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    stop_reason: StopReason
    stop_sequence: str
    stop_token_id: int
    usage: Usage
    def __init__(self, request_id: str | None = ..., text: str | None = ..., token_ids: _Iterable[int] | None = ..., logprobs: _Iterable[TokenLogprob | _Mapping] | None = ..., stop_reason: StopReason | str | None = ..., stop_sequence: str | None = ..., stop_token_id: int | None = ..., usage: Usage | _Mapping | None = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("add_special_tokens", "model", "text")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    add_special_tokens: bool
    def __init__(self, model: str | None = ..., text: str | None = ..., add_special_tokens: bool | None = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids", "tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, token_ids: _Iterable[int] | None = ..., tokens: _Iterable[str] | None = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("engine", "experts_per_token", "hidden_size", "max_model_len", "model", "num_experts", "num_layers", "vocab_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    model: str
    max_model_len: int
    vocab_size: int
    num_layers: int
    num_experts: int
    experts_per_token: int
    hidden_size: int
    engine: str
    def __init__(self, model: str | None = ..., max_model_len: int | None = ..., vocab_size: int | None = ..., num_layers: int | None = ..., num_experts: int | None = ..., experts_per_token: int | None = ..., hidden_size: int | None = ..., engine: str | None = ...) -> None: ...
