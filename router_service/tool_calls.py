"""Tool calls (OpenAI's ``tools`` / ``tool_choice``) in Mistral's format: how the tools and the history reach the
chat template, how ``required`` and named choices constrain the output (structured output, so even a weak model
returns valid calls), and how the output is parsed back into OpenAI ``tool_calls``, whole or as stream deltas.

The model's side (Mistral's function-calling format): tools are offered as ``[AVAILABLE_TOOLS] [...]
[/AVAILABLE_TOOLS]``, the model answers ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}]``, and results come
back as ``[TOOL_RESULTS] {...} [/TOOL_RESULTS]``.

- A chat template that knows tools (it mentions ``tools``): it gets ``tools`` as a template variable and the
  ``tool`` / assistant ``tool_calls`` messages as they are (transformers' convention), and renders them itself.
- A template without tool support (the demo's): the messages are folded into plain turns before rendering, in
  Mistral's format as text: the tools ahead of the last user turn, assistant calls as ``[TOOL_CALLS] [...]``,
  tool results as a user turn ``[TOOL_RESULTS] {...} [/TOOL_RESULTS]``.

``tool_choice``: "none" (tools not offered, plain text), "auto" (offered; a reply starting with ``[TOOL_CALLS]``
is parsed as calls, anything else is content), "required" (the output is a JSON list of calls constrained by a
schema built from the tools' parameters), or a named function (the output is that function's arguments,
constrained by its parameters' schema).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.engine.structured_output import StructuredOutput
from router_service.errors import ApiError

TOOL_CALLS_TAG = "[TOOL_CALLS]"
MAX_TOOLS = 128


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass
class ToolPlan:
    """What a request's tools mean for its rendering, its constraint and its parsing."""

    tools: list[Tool]
    mode: str  # "none" | "auto" | "required" | "named"
    named: str | None = None  # the forced function's name (mode "named")
    parallel: bool = True

    @property
    def offered(self) -> bool:
        return bool(self.tools) and self.mode != "none"

    def constraint(self) -> StructuredOutput | None:
        """The grammar the output must follow: the named function's arguments, or a list of calls."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t.name == self.named)
            return StructuredOutput.json_schema(tool.parameters, param="tools")
        if self.mode == "required":
            call = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                     "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]
            schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                      "items": call[0] if len(call) == 1 else {"anyOf": call}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutput.json_schema(schema, param="tools")
        return None


def plan(tools: Sequence[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPlan | None:
    """Check ``tools`` / ``tool_choice`` (400s name the parameter); None when the request has no tools."""
    if tool_choice is not None and not tools and tool_choice != "none":
        raise ApiError(400, "tool_choice needs tools", param="tool_choice")
    if not tools:
        return None
    if len(tools) > MAX_TOOLS:
        raise ApiError(400, f"at most {MAX_TOOLS} tools, got {len(tools)}", param="tools")
    parsed: list[Tool] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param="tools")
        name, params = fn.get("name"), fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(name, str) or not name or not isinstance(params, dict):
            raise ApiError(400, f"tools[{i}].function needs a name (a string) and parameters (a JSON schema)",
                           param="tools")
        if any(t.name == name for t in parsed):
            raise ApiError(400, f"tools[{i}]: the function name {name!r} is used twice", param="tools")
        parsed.append(Tool(name, str(fn.get("description", "")), params))
    named = None
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        mode = tool_choice or "auto"
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and \
            isinstance(tool_choice.get("function"), dict):
        mode, named = "named", tool_choice["function"].get("name")
        if not any(t.name == named for t in parsed):
            raise ApiError(400, f"tool_choice names the function {named!r}, which is not in tools",
                           param="tool_choice")
    else:
        raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                            "{'name': ...}}", param="tool_choice")
    return ToolPlan(parsed, mode, named, parallel_tool_calls is not False)


# ------------------------------------------------------------------------------------------ rendering


def template_knows_tools(template: str | None) -> bool:
    return template is not None and "tools" in template


def with_tools(messages: Sequence[Mapping[str, Any]], options: Mapping[str, Any], template: str | None
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and Tokenizer.render_chat options to render a chat whose options may carry ``tools`` (a list
    of OpenAI tool objects): given to a template that knows tools, else folded into plain turns (module doc)."""
    options = dict(options)
    tools = options.pop("tools", None)
    has_tool_turns = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    if template_knows_tools(template):
        if tools:
            options["template_kwargs"] = dict(options.get("template_kwargs") or {}) | {"tools": tools}
        # transformers' convention: a call's arguments as an object (OpenAI sends them as JSON text).
        return [dict(m) | ({"tool_calls": [c | {"function": c["function"] | {
            "arguments": _arguments_object(c["function"].get("arguments"))}} for c in m["tool_calls"]]}
            if m.get("tool_calls") else {}) for m in messages], options
    if not tools and not has_tool_turns:
        return [dict(m) for m in messages], options
    folded: list[dict[str, Any]] = []
    last_user = None  # the last user turn (not a folded tool result): Mistral offers the tools ahead of it
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "tool":
            result = {"call_id": m.get("tool_call_id"), "content": content}
            folded.append({"role": "user", "content": f"[TOOL_RESULTS] {json.dumps(result)} [/TOOL_RESULTS]"})
        elif role == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _arguments_object(c["function"].get("arguments"))}
                     for c in m["tool_calls"]]
            folded.append({"role": "assistant", "content": (content + " " if content else "") +
                           f"{TOOL_CALLS_TAG} {json.dumps(calls)}"})
        else:
            if role == "user":
                last_user = len(folded)
            folded.append({"role": role, "content": content})
    if tools:
        offer = f"[AVAILABLE_TOOLS] {json.dumps(tools, separators=(',', ':'))} [/AVAILABLE_TOOLS]"
        if last_user is None:
            folded.insert(0, {"role": "user", "content": offer})
        else:
            folded[last_user] = {"role": "user", "content": offer + folded[last_user]["content"]}
    return folded, options


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


# -------------------------------------------------------------------------------------------- parsing


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _call(name: str, arguments: str, call_id: str | None = None) -> dict[str, Any]:
    return {"id": call_id or new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _calls_from_json(text: str) -> list[dict[str, Any]] | None:
    """A JSON list (or one object) of {"name", "arguments"} as OpenAI calls; None if ``text`` is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        calls.append(_call(item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)))
    return calls


CALL_HEAD = re.compile(r'[\s\[\],}]*\{"name":"((?:[^"\\]|\\.)*)","arguments":')


@dataclass
class CallScanner:
    """Reads a ``required`` choice's output as it grows: the grammar makes it compact JSON,
    ``[{"name":"f","arguments":{...}},...]``. Yields ("open", index, name) when a call's name is known and
    ("args", index, text) for each new piece of its arguments, which are the output's own characters (so the
    streamed arguments equal the whole response's)."""

    text: str = ""
    pos: int = 0  # where scanning goes on
    calls: list[list[str]] = field(default_factory=list)  # [name, arguments so far]
    in_args: bool = False
    depth: int = 0
    in_string: bool = False
    escape: bool = False

    def feed(self, piece: str) -> list[tuple[str, int, str]]:
        self.text += piece
        events: list[tuple[str, int, str]] = []
        while self.pos < len(self.text):
            if not self.in_args:
                head = CALL_HEAD.match(self.text, self.pos)
                if head is None:
                    break  # wait for more text (or it is not a call list: parse() decides at the end)
                name = json.loads(f'"{head.group(1)}"')
                self.calls.append([name, ""])
                events.append(("open", len(self.calls) - 1, name))
                self.pos, self.in_args, self.depth = head.end(), True, 0
                continue
            start = self.pos
            while self.pos < len(self.text) and self.in_args:
                c = self.text[self.pos]
                self.pos += 1
                if self.in_string:
                    if self.escape:
                        self.escape = False
                    elif c == "\\":
                        self.escape = True
                    elif c == '"':
                        self.in_string = False
                elif c == '"':
                    self.in_string = True
                elif c in "{[":
                    self.depth += 1
                elif c in "}]":
                    self.depth -= 1
                if self.depth == 0 and not self.in_string:
                    self.in_args = False
            piece_args = self.text[start:self.pos]
            if piece_args:
                self.calls[-1][1] += piece_args
                events.append(("args", len(self.calls) - 1, piece_args))
        return events


def parse(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A finished choice's text -> (content, tool calls). Text that is not a call stays content."""
    if plan.mode == "named":
        assert plan.named is not None
        return None, [_call(plan.named, text)]
    if plan.mode == "required":
        scanner = CallScanner()
        scanner.feed(text)
        if scanner.calls and not scanner.in_args and _calls_from_json(text):  # complete and valid
            return None, [_call(name, arguments) for name, arguments in scanner.calls]
        calls = _calls_from_json(text)
        return (None, calls) if calls else (text, [])
    if plan.mode == "auto" and text.lstrip().startswith(TOOL_CALLS_TAG):
        calls = _calls_from_json(text.lstrip()[len(TOOL_CALLS_TAG):])
        if calls:
            return None, calls
    return text, []


def message(plan: ToolPlan | None, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
    """The chat completion's message for one choice, and its finish reason ("tool_calls" when the model chose to
    call, as OpenAI; a forced named call ends with "stop", as OpenAI's)."""
    if plan is None or not plan.offered:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = parse(plan, text)
    if not calls:
        return {"role": "assistant", "content": content}, finish_reason
    reason = finish_reason if plan.mode == "named" or finish_reason != "stop" else "tool_calls"
    return {"role": "assistant", "content": content, "tool_calls": calls}, reason


@dataclass
class ToolStream:
    """Turns one choice's streamed text into chat deltas: named and required calls stream each call's name as soon
    as it is known, then its arguments as they come (CallScanner); auto calls are parsed when the choice ends
    (auto text that cannot be a call streams at once)."""

    plan: ToolPlan
    buffered: str = ""
    scanner: CallScanner = field(default_factory=CallScanner)
    ids: list[str] = field(default_factory=list)
    streaming_content: bool = False
    call_id: str = field(default_factory=new_call_id)
    opened: bool = False

    def feed(self, text: str, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """-> (deltas to send for this piece of text, the finish reason to report)."""
        plan = self.plan
        deltas: list[dict[str, Any]] = []
        if plan.mode == "named":
            assert plan.named is not None
            if not self.opened:
                self.opened = True
                deltas.append({"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                               "function": {"name": plan.named, "arguments": ""}}]})
            if text:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return deltas, finish_reason
        if self.streaming_content:
            return ([{"content": text}] if text else []), finish_reason
        if plan.mode == "required":  # each call's name as soon as known, then its arguments as they come
            for kind, index, value in self.scanner.feed(text):
                if kind == "open":
                    self.ids.append(new_call_id())
                    deltas.append({"tool_calls": [{"index": index, "id": self.ids[index], "type": "function",
                                                   "function": {"name": value, "arguments": ""}}]})
                else:
                    deltas.append({"tool_calls": [{"index": index, "function": {"arguments": value}}]})
            if finish_reason is None:
                return deltas, None
            if not self.scanner.calls:  # not a call list after all (cut short): what there is, as content
                return [{"content": self.scanner.text}], finish_reason
            return deltas or [{}], "tool_calls" if finish_reason == "stop" else finish_reason
        self.buffered += text
        if plan.mode == "auto":
            head = self.buffered.lstrip()
            if head and not (head.startswith(TOOL_CALLS_TAG) or TOOL_CALLS_TAG.startswith(head)):
                self.streaming_content, out = True, self.buffered
                return [{"content": out}], finish_reason
        if finish_reason is None:
            return [], None
        content, calls = parse(plan, self.buffered)
        if not calls:
            return ([{"content": content}] if content else []), finish_reason
        deltas = [{"tool_calls": [{"index": i} | call for i, call in enumerate(calls)]}]
        return deltas, "tool_calls" if finish_reason == "stop" else finish_reason
