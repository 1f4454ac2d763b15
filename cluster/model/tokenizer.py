"""Tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, special tokens from
``tokenizer_config.json``, and the chat template: the one given (``--chat-template FILE``), else
``chat_template.jinja`` beside the tokenizer, else tokenizer_config's. A model with none has no chat: rendering
raises (as vLLM, which since transformers 4.44 guesses no default template). DEFAULT_CHAT_TEMPLATE, Mistral's
format, is what the demo checkpoint writes into its tokenizer_config."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from cluster.errors import RequestError

CHAT_ROLES = ("system", "user", "assistant", "tool")  # "tool": for templates that render tool results

# Mistral-instruct format; a system message is folded into the first user turn.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = none %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for m in turns %}"
    "{%- if m['role'] == 'user' %}"
    "{%- if loop.first and system %}{{- '[INST] ' + system + '\\n\\n' + m['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + m['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif m['role'] == 'assistant' %}{{- ' ' + m['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('unknown role ' + m['role']) }}{%- endif %}"
    "{%- endfor %}"
)


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


# Template variables the renderer sets itself: chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token",
                                         "raise_exception"})


class Tokenizer:
    def __init__(self, model_dir: str | Path, chat_template: str | None = None) -> None:
        """``chat_template``: a template text that replaces the checkpoint's."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"no tokenizer.json in {model_dir}")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as err:
            raise ValueError(f"{path} is not a valid tokenizer: {err}") from None
        config_path = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.bos_token = _token_text(config.get("bos_token")) or "<s>"
        self.eos_token = _token_text(config.get("eos_token")) or "</s>"
        self.bos_token_id = self._tok.token_to_id(self.bos_token)
        self.eos_token_id = self._tok.token_to_id(self.eos_token)
        self.add_bos_token = bool(config.get("add_bos_token", True)) and self.bos_token_id is not None
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = model_dir / "chat_template.jinja"  # transformers' own file for it, preferred to the config
        if chat_template is None and jinja_file.is_file():
            chat_template = jinja_file.read_text()
        self.chat_template: str | None = chat_template if chat_template is not None else (
            template if isinstance(template, str) else None)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_template_error
        try:
            self._template = None if self.chat_template is None else env.from_string(self.chat_template)
        except jinja2.TemplateError as err:
            raise ValueError(f"the chat template of {model_dir} is not a valid Jinja template: {err}") from None

    @property
    def backend(self) -> HFTokenizer:
        """The ``tokenizers`` object itself (for libraries that build their own view of the vocabulary)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text to encode must be a string, got {type(text).__name__}")
        ids: list[int] = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)  # tokenizer.json without a BOS post-processor
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (for logprob listings)."""
        return self.decode([token_id], skip_special_tokens=False)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, template_kwargs: Mapping[str, Any] | None = None) -> str:
        """Apply the chat template. ``continue_final_message``: the text ends inside the last message (its end of
        turn cut off), for the model to go on with it; ``template_kwargs``: extra template variables. Raises
        ValueError (ChatTemplateError when the model has no template) on an empty list, a bad role or content."""
        if self._template is None:
            raise ChatTemplateError("this model has no chat template (no chat_template in tokenizer_config.json, no "
                                    "chat_template.jinja beside the tokenizer): start the server with "
                                    "--chat-template FILE, or use /v1/completions")
        if add_generation_prompt and continue_final_message:
            raise ChatTemplateError("add_generation_prompt and continue_final_message cannot both be true",
                                    "continue_final_message")
        extra = dict(template_kwargs or {})
        if reserved := sorted(RESERVED_TEMPLATE_VARIABLES & extra.keys()):
            raise ChatTemplateError(f"chat_template_kwargs may not set {reserved}", "chat_template_kwargs")
        if not messages:
            raise ValueError("messages must be a non-empty list")
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in CHAT_ROLES:
                raise ValueError(f"messages[{i}].role={role!r} is not one of {list(CHAT_ROLES)}")
            if not isinstance(message.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
        try:
            text = self._template.render(**extra, messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template failed: {err}") from None
        if continue_final_message:  # as transformers: cut after the final message's content
            final = str(messages[-1].get("content", "")).rstrip()
            end = text.rfind(final) if final else -1
            if end < 0:
                raise ChatTemplateError("continue_final_message: the final message's content is not in the rendered "
                                        "chat", "continue_final_message")
            text = text[:end + len(final)]
        return text

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, template_kwargs: Mapping[str, Any] | None = None
                    ) -> list[int]:
        # The template writes the BOS token itself, so no special tokens are added again.
        return self.encode(self.render_chat(messages, add_generation_prompt, continue_final_message, template_kwargs),
                           add_special_tokens=False)


class ChatTemplateError(RequestError):
    """A chat that cannot be rendered: no template, or options that contradict each other."""

    def __init__(self, message: str, param: str | None = "messages") -> None:
        super().__init__(message, param)


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Decodes a short window of tokens (seeded with the prompt's last tokens, so that leading-space rules
    see context) and holds text back while it ends in U+FFFD, i.e. while a multi-byte character is incomplete.
    An incomplete character at the very end of a sequence is dropped, never emitted as U+FFFD.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_ids[-self.CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_id: int) -> str:
        """Append a token; returns the text it completes (possibly empty while a character is partial)."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], self._skip_special)
        full_text = decode(self._ids[self._prefix_offset:], self._skip_special)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text):]
