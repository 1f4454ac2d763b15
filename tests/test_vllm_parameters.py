"""Every sampling or extra parameter a vLLM client may send is either honoured (it reaches SamplingParams, or it
cannot change the output) or refused with a 400 naming it: none is silently ignored. Unknown fields are ignored,
as OpenAI's SDKs send newer ones, and logged once at debug level."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from cluster.engine.structured_output import StructuredOutput
from cluster.engine_config import EngineConfig
from cluster.model.tokenizer import ChatTemplateError, Tokenizer
from router_service.cli import build_parser
from router_service.errors import ApiError, engine_error
from router_service.openai_protocol import ChatCompletionRequest, CompletionRequest, log_unknown_field
from router_service.serve_config import resolve_config

Kind = type[CompletionRequest] | type[ChatCompletionRequest]
# vLLM's SamplingParams and its OpenAI server's request extras (completions and chat), with a value that is not
# the default: (name, value, the SamplingParams attribute that must show it, or None when it must be refused).
HONOURED: list[tuple[str, Any, str, Any]] = [
    ("n", 2, "n", 2), ("temperature", 0.5, "temperature", 0.5), ("top_p", 0.9, "top_p", 0.9),
    ("top_k", 5, "top_k", 5), ("min_p", 0.1, "min_p", 0.1), ("seed", 7, "seed", 7),
    ("presence_penalty", 0.5, "presence_penalty", 0.5), ("frequency_penalty", -0.5, "frequency_penalty", -0.5),
    ("repetition_penalty", 1.2, "repetition_penalty", 1.2), ("logit_bias", {"5": 150}, "logit_bias", ((5, 100.0),)),
    ("stop", ["x"], "stop", ("x",)), ("stop_token_ids", [3], "stop_token_ids", (3,)),
    ("bad_words", ["no"], "bad_words", ("no",)), ("ignore_eos", True, "ignore_eos", True),
    ("max_tokens", 9, "max_tokens", 9), ("min_tokens", 2, "min_tokens", 2),
    ("include_stop_str_in_output", True, "include_stop_str_in_output", True),
    ("skip_special_tokens", False, "skip_special_tokens", False),
    ("guided_json", {"type": "object"}, "structured", StructuredOutput("json", '{"type": "object"}', "guided_json")),
    ("guided_regex", "a+", "structured", StructuredOutput("regex", "a+", "guided_regex")),
    ("guided_choice", ["a", "b"], "structured", StructuredOutput("choice", '["a", "b"]', "guided_choice")),
    ("guided_grammar", "root ::= 'a'", "structured", StructuredOutput("grammar", "root ::= 'a'", "guided_grammar")),
    ("structured_outputs", {"regex": "b+"}, "structured", StructuredOutput("regex", "b+", "structured_outputs")),
]
COMPLETION_ONLY = [("logprobs", 2, "logprobs", 2), ("echo", True, "echo", True), ("best_of", 2, "n", 2)]
CHAT_ONLY = [("max_completion_tokens", 9, "max_tokens", 9), ("logprobs", True, "logprobs", 0),
             ("response_format", {"type": "json_object"}, "structured", StructuredOutput("json_object")),
             ("tool_choice", "none", "structured", None)]
NO_EFFECT = [("user", "u"), ("request_id", "r"), ("cache_salt", "s"), ("store", True), ("metadata", {"a": "b"}),
             ("service_tier", "auto"), ("priority", 0), ("stream", True), ("stream_options", {"include_usage": True}),
             ("timeout", 30), ("guided_decoding_backend", "xgrammar")]
REFUSED: list[tuple[str, Any]] = [
    ("use_beam_search", True), ("length_penalty", 0.5), ("prompt_logprobs", 1), ("allowed_token_ids", [1, 2]),
    ("spaces_between_special_tokens", False), ("truncate_prompt_tokens", 8), ("logits_processors", ["x"]),
    ("guided_decoding_backend", "outlines"), ("guided_whitespace_pattern", " "),
    ("return_tokens_as_token_ids", True), ("return_token_ids", True),
    ("priority", 3), ("kv_transfer_params", {"a": 1}), ("vllm_xargs", {"a": 1}), ("prompt_embeds", "AAAA"),
]
COMPLETION_REFUSED = [("suffix", "tail"), ("add_special_tokens", False)]
CHAT_REFUSED = [("echo", True), ("documents", [{"a": "b"}]), ("mm_processor_kwargs", {"a": 1}),
                ("reasoning_effort", "high"), ("include_reasoning", True), ("functions", [{"name": "f"}]),
                ("function_call", "auto"),
                # tools / tool_choice are honoured (test_tools_are_honoured); these values are malformed
                ("tool_choice", "required"), ("tools", [{"type": "function"}]),
                ("modalities", ["audio"]), ("audio", {"voice": "x"}), ("prediction", {"type": "content"}),
                ("web_search_options", {}), ("chat_template", "{{ x }}"),
                ("add_special_tokens", True), ("response_format", {"type": "xml"})]
# Chat template options: honoured by the rendering of the messages (tests/serving and test_tokenizer check it).
CHAT_TEMPLATE_OPTIONS = [("chat_template_kwargs", {"a": 1}, "template_kwargs", {"a": 1}),
                         ("add_generation_prompt", False, "add_generation_prompt", False),
                         ("continue_final_message", True, "continue_final_message", True)]


def body(kind: Kind, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": "m"}
    base |= {"prompt": "hi"} if kind is CompletionRequest else {"messages": [{"role": "user", "content": "hi"}]}
    return base | extra


def params_of(kind: Kind, **extra: Any) -> Any:
    return kind.model_validate(body(kind, **extra)).to_params()


@pytest.mark.parametrize("kind", [CompletionRequest, ChatCompletionRequest])
def test_every_vllm_parameter_is_honoured_or_refused(kind: Kind) -> None:
    own = COMPLETION_ONLY if kind is CompletionRequest else CHAT_ONLY
    for name, value, attribute, shown in HONOURED + own:
        extra = {name: value} | ({"n": 2} if name == "best_of" else {}) | (
            {"max_tokens": 9} if name == "min_tokens" else {})
        assert getattr(params_of(kind, **extra), attribute) == shown, name
    for name, value in NO_EFFECT:
        extra = {name: value} | ({"stream": True} if name == "stream_options" else {})
        assert params_of(kind, **extra) == params_of(kind), name
    refused = REFUSED + (COMPLETION_REFUSED if kind is CompletionRequest else CHAT_REFUSED)
    for name, value in refused:
        with pytest.raises(ApiError) as err:
            params_of(kind, **{name: value})
        assert err.value.status == 400 and err.value.param == name, name
    names = {n for n, *_ in HONOURED + own + refused} | {n for n, _ in NO_EFFECT}
    if kind is ChatCompletionRequest:
        for name, value, option, shown in CHAT_TEMPLATE_OPTIONS:
            extra = {name: value} | ({"add_generation_prompt": False} if name == "continue_final_message" else {})
            assert ChatCompletionRequest.model_validate(body(kind, **extra)).chat_options()[option] == shown, name
        names |= {n for n, *_ in CHAT_TEMPLATE_OPTIONS}
    assert not names - set(kind.model_fields), "a listed parameter is not declared (it would be ignored)"


def test_tools_are_honoured() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    named = {"type": "function", "function": {"name": "f"}}
    assert params_of(ChatCompletionRequest, tools=tools, tool_choice=named).structured == StructuredOutput(
        "json", '{"type": "object"}', "tools")
    assert params_of(ChatCompletionRequest, tools=tools, tool_choice="required").structured is not None
    auto = ChatCompletionRequest.model_validate(body(ChatCompletionRequest, tools=tools))
    assert auto.to_params().skip_special_tokens is False  # the [TOOL_CALLS] token stays in the text to parse
    assert auto.chat_options()["tools"] == [{"type": "function", "function": {
        "name": "f", "description": "", "parameters": {"type": "object"}}}]
    with pytest.raises(ApiError) as err:
        params_of(ChatCompletionRequest, tools=tools, tool_choice={"type": "function", "function": {"name": "g"}})
    assert err.value.param == "tool_choice"
    with pytest.raises(ApiError) as err:
        params_of(ChatCompletionRequest, tools=tools, tool_choice="required", response_format={"type": "json_object"})
    assert err.value.status == 400


def test_defaults_of_refused_parameters_are_accepted() -> None:
    assert params_of(CompletionRequest, use_beam_search=False, length_penalty=1.0, add_special_tokens=True,
                     spaces_between_special_tokens=True) == params_of(CompletionRequest)
    assert params_of(ChatCompletionRequest, add_generation_prompt=True, continue_final_message=False,
                     add_special_tokens=False, tool_choice="none", echo=False) == params_of(ChatCompletionRequest)


def test_contradicting_chat_options_are_refused() -> None:
    request = ChatCompletionRequest.model_validate(body(ChatCompletionRequest, continue_final_message=True))
    with pytest.raises(ApiError) as err:
        request.chat_options()
    assert err.value.param == "continue_final_message"


def test_unknown_fields_are_ignored_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    log_unknown_field.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="moe_cluster.serve"):
        for _ in range(3):
            assert params_of(CompletionRequest, brand_new_field=1) == params_of(CompletionRequest)
    hits = [r for r in caplog.records if "brand_new_field" in r.getMessage()]
    assert len(hits) == 1 and hits[0].levelno == logging.DEBUG


def test_a_model_without_chat_template_gets_a_400_naming_messages() -> None:
    err = engine_error(ChatTemplateError("this model has no chat template"))
    assert err.status == 400 and err.param == "messages" and "no chat template" in err.message


def test_chat_template_flag_reaches_the_engine(tmp_path: Path, demo_dir: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("Q: {{ messages[0].content }}\nA:")
    args = build_parser().parse_args(["serve", "--model", str(demo_dir), "--chat-template", str(template)])
    options = resolve_config(args)["applications"][0]["args"]["engine_options"]
    assert options["chat_template"] == template.read_text()
    with pytest.raises(ValueError, match="no such file"):
        resolve_config(build_parser().parse_args(["serve", "--chat-template", str(tmp_path / "missing")]))
    for given in (template.read_text(), str(template)):  # the template, or a file of it (as vLLM)
        cfg = EngineConfig(model=str(demo_dir), chat_template=given)
        assert Tokenizer(demo_dir, cfg.chat_template_text()).render_chat([{"role": "user", "content": "hi"}]) == \
            "Q: hi\nA:"
