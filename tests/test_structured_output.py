"""Structured output in the engine (cluster/engine/structured_output.py) on the random-weight demo: a random model
writes valid JSON only because the grammar's bitmask forbids everything else; a grammar compiles once per spec;
n > 1 and a resumed request (continuation) follow the grammar too, the latter exactly as uninterrupted. Tool-call
rendering and parsing (router_service/tool_calls.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import RequestResult
from cluster.engine.structured_output import StructuredOutput
from cluster.errors import RequestError
from router_service import tool_calls
from tests.test_continuation import cut_and_continue, run

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0,
                                                                                      "maximum": 99}},
          "required": ["answer", "n"], "additionalProperties": False}


def test_json_schema_regex_and_choice_are_enforced(engine: EngineLoop) -> None:
    spec = StructuredOutput.json_schema(SCHEMA)
    free = engine.generate(["Answer:"], SamplingParams(max_tokens=30, temperature=1.0, seed=3, n=3))[0]
    assert not any(c.text.startswith("{") for c in free.completions)  # without the grammar: no JSON
    compiles = engine.engine.grammars.compiles
    for seed in (3, 4):  # the same spec twice: compiled once
        result = engine.generate(["Answer:"], SamplingParams(max_tokens=30, temperature=1.0, seed=seed, n=3,
                                                            structured=spec))[0]
        for c in result.completions:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), SCHEMA)
    assert engine.engine.grammars.compiles == compiles + 1
    regex = engine.generate(["Code:"], SamplingParams(max_tokens=12, temperature=1.0, seed=1, n=2, structured=
                                                      StructuredOutput("regex", "[a-c]{2}-[0-9]{3}")))[0]
    assert all(re.fullmatch("[a-c]{2}-[0-9]{3}", c.text) for c in regex.completions)
    choice = engine.generate(["Pick:"], SamplingParams(max_tokens=12, temperature=1.0, seed=1, structured=
                                                       StructuredOutput.choice(["alpha", "beta"])))[0]
    assert choice.completions[0].text in ("alpha", "beta")
    grammar = engine.generate(["G:"], SamplingParams(max_tokens=12, temperature=1.0, seed=1, structured=
                                                     StructuredOutput("grammar", 'root ::= "x" ("y" | "z")')))[0]
    assert grammar.completions[0].text in ("xy", "xz")
    # min_tokens bans EOS, a complete grammar allows only EOS: the grammar wins (EOS until min_tokens, then stop).
    short = engine.generate(["Pick:"], SamplingParams(max_tokens=30, min_tokens=20, temperature=1.0, seed=2,
                                                      structured=StructuredOutput.choice(["yes"])))[0]
    assert (short.completions[0].text, short.completions[0].finish_reason) == ("yes", "stop")
    assert len(short.completions[0].token_ids) <= 21
    assert engine.engine.grammars.num_matchers == 0  # every finished sequence let its matcher go


def test_bad_specs_are_request_errors_naming_the_parameter(engine: EngineLoop) -> None:
    for spec in (StructuredOutput("regex", "(", "guided_regex"), StructuredOutput("grammar", "root ::= (",
                                                                                  "guided_grammar"),
                 StructuredOutput.json_schema({"type": "nope"}, "guided_json")):
        with pytest.raises(RequestError) as err:
            engine.generate(["x"], SamplingParams(structured=spec))
        assert err.value.param == spec.param


def test_a_constrained_request_resumes_exactly(engine: EngineLoop) -> None:
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=9, n=2,
                            structured=StructuredOutput.json_schema(SCHEMA))
    whole = run(engine, params)
    for c in RequestResult.fold(whole).completions:
        jsonschema.validate(json.loads(c.text), SCHEMA)
    for k in range(1, len(whole), 3):
        cut_and_continue(engine, params, whole, k)  # the grammar state is replayed from the tokens so far


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "x": {"type": "integer"}}, "required": ["x"]}}}, {"type": "function", "function": {"name": "g"}}]


def test_tool_plans_parse_and_stream() -> None:
    required = tool_calls.plan(TOOLS, "required", None)
    assert required is not None and required.constraint() is not None
    content, calls = tool_calls.parse(required, '[{"name":"f","arguments":{"x":3}}]')
    assert content is None and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("f", {"x": 3})]
    auto = tool_calls.plan(TOOLS, None, None)
    assert auto is not None and auto.mode == "auto" and auto.constraint() is None
    assert tool_calls.parse(auto, "plain words")[1] == []
    assert tool_calls.parse(auto, ' [TOOL_CALLS] [{"name": "g", "arguments": {}}]')[1][0]["function"]["name"] == "g"
    # Streamed: auto text that cannot be a call streams at once; a call is held back and sent whole at the end.
    stream = tool_calls.ToolStream(auto)
    assert stream.feed("[TOOL", None) == ([], None)
    deltas, finish = stream.feed('_CALLS] [{"name": "g", "arguments": {"a": 1}}]', "stop")
    assert finish == "tool_calls" and deltas[0]["tool_calls"][0]["function"] == {"name": "g",
                                                                                 "arguments": '{"a": 1}'}
    assert tool_calls.ToolStream(auto).feed("Hello", None) == ([{"content": "Hello"}], None)
    # Required: each call's name as soon as known, then its arguments piece by piece, equal to the whole parse.
    text = '[{"name":"f","arguments":{"x":7,"s":"a}\\"b"}},{"name":"g","arguments":{}}]'
    required_stream = tool_calls.ToolStream(required)
    pieces = [required_stream.feed(text[i:i + 4], None)[0] for i in range(0, len(text), 4)]
    last, finish = required_stream.feed("", "stop")
    streamed: dict[int, list[str]] = {}
    for delta in [d for p in pieces for d in p] + last:
        for call in delta.get("tool_calls", []):
            entry = streamed.setdefault(call["index"], ["", ""])
            entry[0] += call.get("function", {}).get("name", "")
            entry[1] += call.get("function", {}).get("arguments", "")
    whole = tool_calls.parse(required, text)[1]
    assert finish == "tool_calls" and [streamed[i] for i in sorted(streamed)] == \
        [[c["function"]["name"], c["function"]["arguments"]] for c in whole]
    assert json.loads(whole[0]["function"]["arguments"]) == {"x": 7, "s": 'a}"b'}
    named = tool_calls.plan(TOOLS, {"type": "function", "function": {"name": "f"}}, None)
    assert named is not None
    named_stream = tool_calls.ToolStream(named)
    pieces = [named_stream.feed(t, None)[0] for t in ('{"x"', ':4}')]
    arguments = "".join(d["tool_calls"][0]["function"].get("arguments", "") for p in pieces for d in p)
    assert arguments == '{"x":4}' and pieces[0][0]["tool_calls"][0]["function"]["name"] == "f"
    for bad, param in (([{"type": "function"}], "tools"), ("nope", "tool_choice")):
        with pytest.raises(Exception) as err:
            tool_calls.plan(TOOLS if param == "tool_choice" else bad, bad if param == "tool_choice" else None, None)
        assert getattr(err.value, "param", None) == param


def test_tools_reach_a_template_that_knows_them_and_fold_otherwise() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    messages: list[dict[str, Any]] = [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "2"}]
    kept, options = tool_calls.with_tools(messages, {"tools": TOOLS}, "{% for t in tools %}{% endfor %}")
    assert kept[0] == messages[0] and kept[2] == messages[2] and options["template_kwargs"]["tools"] == TOOLS
    assert kept[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}  # an object, for templates
    folded, options = tool_calls.with_tools(messages, {"tools": TOOLS}, "{{ messages }}")
    assert "tools" not in options and [m["role"] for m in folded] == ["user", "assistant", "user"]
    assert folded[0]["content"].startswith("[AVAILABLE_TOOLS] ")
    assert folded[1]["content"] == '[TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}}]'
    assert folded[2]["content"] == '[TOOL_RESULTS] {"call_id": "c", "content": "2"} [/TOOL_RESULTS]'


MISTRAL_TOOLS_TEMPLATE = (  # the shape of Mistral's v3 tool template, cut down
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'user' %}{% if loop.last and tools %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]"
    "{% endif %}[INST] {{ m.content }}[/INST]"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS] {{ m.content }}[/TOOL_RESULTS]"
    "{% elif m.tool_calls %}[TOOL_CALLS] {{ m.tool_calls | map(attribute='function') | list | tojson }}{{ eos_token }}"
    "{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}")


def test_a_template_with_tool_support_renders_them(demo_dir: Path) -> None:
    from cluster.model.tokenizer import Tokenizer

    tokenizer = Tokenizer(demo_dir, chat_template=MISTRAL_TOOLS_TEMPLATE)
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    history: list[dict[str, Any]] = [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "", "tool_calls": [call]},
                                     {"role": "tool", "tool_call_id": "c", "content": "2"},
                                     {"role": "user", "content": "and now?"}]
    messages, options = tool_calls.with_tools(history, {"tools": TOOLS[:1]}, tokenizer.chat_template)
    text = tokenizer.render_chat(messages, **options)
    assert '[TOOL_CALLS] [{"arguments": {"x": 1}, "name": "f"}]' in text or \
        '[TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}}]' in text
    assert "[TOOL_RESULTS] 2[/TOOL_RESULTS]" in text
    assert text.index("[AVAILABLE_TOOLS]") > text.index("[TOOL_RESULTS]")  # ahead of the last user turn
