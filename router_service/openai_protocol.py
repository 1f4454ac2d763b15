"""The OpenAI-compatible wire format: request models (strictly typed: a string where a number belongs is an
error, not a coercion), their translation to SamplingParams, and the JSON of responses and stream chunks."""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from cluster.engine.sampling import SamplingParams, TokenLogprob
from cluster.engine.sequence import RequestOutput
from cluster.engine.structured_output import StructuredOutput
from router_service import tool_calls
from router_service.errors import ApiError

log = logging.getLogger("moe_cluster.serve")
Number = StrictInt | StrictFloat
TokenIds = list[StrictInt]


@functools.lru_cache(maxsize=512)  # bounded: a client sending ever new names cannot grow it
def log_unknown_field(name: str) -> None:
    """Say once, at debug level, that a field this server does not know was ignored."""
    log.debug("ignoring the unknown request field %r (OpenAI clients send newer fields; this one changes nothing "
              "here)", name)


class _IgnoresUnknown(BaseModel):
    """A request object whose unknown fields are ignored, as OpenAI's SDKs send newer ones, each logged once."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _log_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            where = cls.__name__
            for name in data.keys() - cls.model_fields.keys():
                log_unknown_field(f"{where}.{name}" if isinstance(name, str) else repr(name))
        return data


class StreamOptions(_IgnoresUnknown):
    include_usage: StrictBool = False
    # vLLM's extension: with include_usage, every chunk carries the usage so far (not only the last one).
    continuous_usage_stats: StrictBool = False

    @property
    def continuous(self) -> bool:
        """Usage in every chunk: vLLM gives it only when include_usage is set too."""
        return self.include_usage and self.continuous_usage_stats


class _Common(_IgnoresUnknown):
    """Fields shared by completions and chat completions. Unknown fields are ignored, as OpenAI's SDKs
    sometimes send newer ones; fields we cannot honour are refused when set to anything but their default."""

    NOT_IMPLEMENTED_HERE: ClassVar[dict[str, tuple[Any, ...]]] = {}

    model: StrictStr
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number = 0
    frequency_penalty: Number = 0
    logit_bias: dict[str, Number] | None = None
    user: StrictStr | None = None
    # Extensions (as in vLLM)
    top_k: StrictInt | None = None
    min_p: Number = 0
    repetition_penalty: Number = 1
    min_tokens: StrictInt = 0
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: StrictBool = False
    bad_words: list[StrictStr] | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    timeout: Number | None = None  # seconds: the request's deadline
    # Known OpenAI / vLLM parameters this server does not implement: refused unless left at their default
    # (NOT_IMPLEMENTED); typed loosely, so that the refusal, not a type error, names them.
    use_beam_search: Any = None
    length_penalty: Any = None
    prompt_logprobs: Any = None
    allowed_token_ids: Any = None
    spaces_between_special_tokens: Any = None
    truncate_prompt_tokens: Any = None
    logits_processors: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    structured_outputs: Any = None
    return_tokens_as_token_ids: Any = None
    return_token_ids: Any = None
    priority: Any = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None
    prompt_embeds: Any = None
    # Accepted and without effect on the output: request_id, cache_salt (no prefix cache), store, metadata,
    # service_tier (OpenAI's platform fields).
    request_id: Any = None
    cache_salt: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None

    def refuse_unimplemented(self, table: dict[str, tuple[Any, ...]]) -> None:
        """A 400 naming the first parameter of ``table`` set to anything but None or one of its defaults."""
        for name, defaults in table.items():
            value = getattr(self, name, None)
            if value is not None and not any(value == d and type(value) is type(d) for d in defaults):
                shown = json.dumps(value, default=str)[:100]
                raise ApiError(400, f"{name}={shown} is not supported by this server (an OpenAI or vLLM parameter "
                                    "it does not implement: leave it unset)", param=name)

    def check_unsupported(self) -> None:
        self.refuse_unimplemented(NOT_IMPLEMENTED)
        self.refuse_unimplemented(self.NOT_IMPLEMENTED_HERE)
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
        if self.timeout is not None and not 0 < self.timeout <= 3600:
            raise ApiError(400, f"timeout must be in (0, 3600] seconds, got {self.timeout!r}", param="timeout")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous)

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs; keys are token ids as strings (OpenAI's JSON), biases clamped to
        [-100, 100] as vLLM does."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise ApiError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
            pairs.append((int(key), min(100.0, max(-100.0, float(bias)))))
        return tuple(pairs)

    def structured_output(self) -> StructuredOutput | None:
        """vLLM's guided_json / guided_regex / guided_choice / guided_grammar, or its newer ``structured_outputs``
        object ({json | regex | choice | grammar | json_object}): at most one."""
        given: list[tuple[str, str, Any]] = [(name, name.removeprefix("guided_"), getattr(self, name))
                                             for name in ("guided_json", "guided_regex", "guided_choice",
                                                          "guided_grammar") if getattr(self, name) is not None]
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, dict):
                raise ApiError(400, "structured_outputs must be an object", param="structured_outputs")
            given += [("structured_outputs", key, value) for key, value in self.structured_outputs.items()
                      if key in ("json", "regex", "choice", "grammar", "json_object") and value not in (None, False)]
        if len(given) > 1:
            raise ApiError(400, f"give at most one structured output constraint, got {[g[0] for g in given]}",
                           param=given[1][0])
        if not given:
            return None
        param, kind, value = given[0]
        try:
            if kind == "json":
                return StructuredOutput.json_schema(value, param)
            if kind == "json_object":
                return StructuredOutput("json_object", "", param)
            if kind == "choice":
                return StructuredOutput.choice(value if isinstance(value, list) else [], param)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{param} must be a non-empty string")
            return StructuredOutput(kind, value, param)
        except ValueError as err:
            raise ApiError(400, str(err), param=param) from None

    def sampling(self, max_tokens: int | None, logprobs: int | None, echo: bool,
                 structured: StructuredOutput | None = None, skip_special_tokens: bool | None = None
                 ) -> SamplingParams:
        stop: tuple[str, ...] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=-1 if self.top_k is None else self.top_k,
                seed=self.seed, stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos, n=self.n, logprobs=logprobs, echo=echo,
                skip_special_tokens=self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
                min_p=self.min_p,
                repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, logit_bias=self.logit_bias_pairs(),
                min_tokens=self.min_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
                bad_words=tuple(self.bad_words or ()), structured=structured)
        except (ValueError, TypeError) as err:
            param = str(err).split(" ", 1)[0]
            raise ApiError(400, str(err), param=param) from None


# Parameters of OpenAI's API or vLLM's that would change the output and are not implemented, with the values that
# mean "not used" (None always does): anything else is a 400 naming the parameter.
NOT_IMPLEMENTED: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,), "length_penalty": (1, 1.0), "prompt_logprobs": (), "allowed_token_ids": (),
    "spaces_between_special_tokens": (True,), "truncate_prompt_tokens": (), "logits_processors": (),
    "guided_decoding_backend": ("xgrammar", "auto"),  # guided_json/regex/choice/grammar: structured_output()
    "guided_whitespace_pattern": (), "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,), "priority": (0,), "kv_transfer_params": (),
    "vllm_xargs": (), "prompt_embeds": (),
}
# Chat-only ones (the chat request declares them).
CHAT_NOT_IMPLEMENTED: dict[str, tuple[Any, ...]] = {
    "echo": (False,), "documents": (), "mm_processor_kwargs": (), "reasoning_effort": (), "include_reasoning": (),
    "functions": (), "function_call": ("none",),  # the legacy spelling; tools / tool_choice are implemented
    "modalities": (["text"],), "audio": (), "prediction": (), "web_search_options": (),
    "chat_template": (),  # per request: vLLM too refuses it unless told to trust it; the server's is --chat-template
    "add_special_tokens": (False,),  # the chat template writes the special tokens
}


class CompletionRequest(_Common):
    NOT_IMPLEMENTED_HERE: ClassVar[dict[str, tuple[Any, ...]]] = {"add_special_tokens": (True,)}
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
    add_special_tokens: Any = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            out: list[str | list[int]] = [p]
        elif p and all(isinstance(x, int) for x in p):
            out = [list(p)]  # type: ignore[arg-type]
        else:
            out = list(p)  # type: ignore[arg-type]
        if not out or any(len(x) == 0 for x in out):
            raise ApiError(400, "prompt must be a non-empty string, token list, or list of them", param="prompt")
        return out

    def to_params(self) -> SamplingParams:
        self.check_unsupported()
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, f"best_of={self.best_of} is not supported (only best_of == n)", param="best_of")
        return self.sampling(self.max_tokens, self.logprobs, self.echo, self.structured_output())


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    arguments: StrictStr | dict[str, Any] = "{}"  # OpenAI sends JSON text; some clients send the object


class ToolCall(BaseModel):
    """A call in an assistant turn of the history."""

    model_config = ConfigDict(extra="ignore")
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: StrictStr | None = None  # a tool turn: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    NOT_IMPLEMENTED_HERE: ClassVar[dict[str, tuple[Any, ...]]] = CHAT_NOT_IMPLEMENTED
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    # Chat-only OpenAI / vLLM parameters not implemented (CHAT_NOT_IMPLEMENTED): refused unless at their default.
    add_special_tokens: Any = None
    echo: Any = None
    documents: Any = None
    mm_processor_kwargs: Any = None
    reasoning_effort: Any = None
    include_reasoning: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    chat_template: Any = None
    # Chat template options (vLLM's extras).
    chat_template_kwargs: dict[StrictStr, Any] | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False

    def to_messages(self) -> list[dict[str, str]]:
        if not self.messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        out: list[dict[str, Any]] = []
        for m in self.messages:
            entry: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.tool_calls:
                entry["tool_calls"] = [call.model_dump() for call in m.tool_calls]
            if m.tool_call_id is not None:
                entry["tool_call_id"] = m.tool_call_id
            out.append(entry)
        return out

    def tool_plan(self) -> tool_calls.ToolPlan | None:
        return tool_calls.plan(self.tools, self.tool_choice, self.parallel_tool_calls)

    def chat_options(self) -> dict[str, Any]:
        """How the chat template renders these messages (Tokenizer.render_chat's keyword arguments)."""
        if self.add_generation_prompt and self.continue_final_message:
            raise ApiError(400, "add_generation_prompt and continue_final_message cannot both be true (set "
                                "add_generation_prompt=false to continue the final message)",
                           param="continue_final_message")
        options = {"add_generation_prompt": self.add_generation_prompt,
                   "continue_final_message": self.continue_final_message,
                   "template_kwargs": dict(self.chat_template_kwargs or {})}
        plan = self.tool_plan()
        if plan is not None and plan.offered:  # tool_calls.with_tools gives them to the template
            options["tools"] = [t.openai() for t in plan.tools]
        return options

    def response_format_output(self) -> StructuredOutput | None:
        """OpenAI's response_format: text (nothing), json_object, or json_schema {name, schema, strict}."""
        fmt = self.response_format
        if not fmt or fmt.get("type", "text") == "text":
            return None
        if fmt.get("type") == "json_object":
            return StructuredOutput("json_object", "", "response_format")
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise ApiError(400, "response_format json_schema needs json_schema.schema", param="response_format")
            try:
                return StructuredOutput.json_schema(spec["schema"], "response_format")
            except ValueError as err:
                raise ApiError(400, str(err), param="response_format") from None
        raise ApiError(400, f"response_format type {fmt.get('type')!r} is not one of text, json_object, "
                            "json_schema", param="response_format")

    def to_params(self) -> SamplingParams:
        self.check_unsupported()
        structured = [(name, s) for name, s in (("response_format", self.response_format_output()),
                                                ("guided", self.structured_output())) if s is not None]
        plan = self.tool_plan()
        if plan is not None and (constraint := plan.constraint()) is not None:
            structured.append(("tool_choice", constraint))
        if len(structured) > 1:
            raise ApiError(400, "response_format, guided_* / structured_outputs and a required or named "
                                "tool_choice each constrain the output: give at most one", param=structured[1][0]
                           if structured[1][0] != "guided" else "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        # Auto tool calls start with Mistral's [TOOL_CALLS] token, a special token: keep it in the text to parse.
        skip_special = False if plan is not None and plan.mode == "auto" else None
        return self.sampling(max_tokens, logprobs, echo=False,
                             structured=structured[0][1] if structured else None, skip_special_tokens=skip_special)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[TokenLogprob | None], offset: int) -> dict[str, Any]:
    """OpenAI's legacy completions logprobs object; ``None`` entries (the first prompt token) have none."""
    texts: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for info in tokens:
        offsets.append(offset)
        if info is None:
            texts.append("")
            lps.append(None)
            tops.append(None)
            continue
        texts.append(info.text)
        lps.append(info.logprob)
        tops.append({text: lp for text, (_, lp) in zip(info.top_texts, info.top, strict=True)} if info.top else None)
        offset += len(info.text)
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    def entry(text: str, lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [entry(t.text, t.logprob) | {"top_logprobs": [entry(text, lp) for text, (_, lp)
                                                                      in zip(t.top_texts, t.top, strict=True)]}
                        for t in tokens]}


def completion_choice(index: int, chunk: RequestOutput, choice_pos: int, echo_text: str | None,
                      with_logprobs: bool, text_offset: int = 0) -> dict[str, Any]:
    """One choice; ``text_offset``: where this chunk's text starts in the whole text (streams send several)."""
    choice = chunk.outputs[choice_pos]
    text = choice.text if echo_text is None else echo_text + choice.text
    logprobs = None
    if with_logprobs:
        entries: list[TokenLogprob | None] = []
        if echo_text is not None and chunk.prompt_logprobs is not None:
            entries.extend(chunk.prompt_logprobs)
        entries.extend(choice.logprobs or [])
        logprobs = completion_logprobs(entries, text_offset)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason}


def stream_event(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def created() -> int:
    return int(time.time())
