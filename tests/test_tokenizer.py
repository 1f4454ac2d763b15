"""Tokenizer, chat template and incremental detokenisation, checked against transformers' own tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.model.tokenizer import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TEXTS = ["Hello world", "The experts of one layer can live on different machines.", "  two  spaces",
         "Café naïve 東京 🙂🚀", "line\nbreak\ttab", "</s> is text here", ""]
PLAIN_TEXTS = [t for t in TEXTS if t and "</s>" not in t]
SURROGATES: tuple[Literal["Cs"], ...] = ("Cs",)  # unpaired surrogates cannot be encoded as UTF-8


@pytest.fixture(scope="module")
def tok(demo_dir: Path) -> Tokenizer:
    return Tokenizer(demo_dir)


@pytest.fixture(scope="module")
def hf_tok(demo_dir: Path) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(demo_dir / "tokenizer.json"), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", chat_template=DEFAULT_CHAT_TEMPLATE)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, hf_tok: PreTrainedTokenizerFast, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    if "</s>" not in text:  # a special token written in the text is a special token, as in transformers
        assert tok.decode(ids) == text


def test_chat_template_matches_transformers(tok: Tokenizer, hf_tok: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a color."}]
    rendered = tok.render_chat(messages)
    assert rendered == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>[INST] Be brief.\n\nHi [/INST] Hello.</s>[INST] Name a color. [/INST]"
    ids = tok.encode_chat(messages)
    bos = tok.bos_token_id
    assert bos is not None
    assert ids.count(bos) == 1 and ids[0] == bos


def test_no_template_no_chat_and_where_templates_come_from(tmp_path: Path, demo_dir: Path) -> None:
    """As vLLM: no guessed default; the given template, else chat_template.jinja, else tokenizer_config's."""
    (tmp_path / "tokenizer.json").write_bytes((demo_dir / "tokenizer.json").read_bytes())
    chat = [{"role": "user", "content": "x"}]
    assert Tokenizer(tmp_path).chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template") as err:
        Tokenizer(tmp_path).render_chat(chat)
    assert err.value.param == "messages"
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "default", "template": "{{ messages[0].content }}!"}]}')
    assert Tokenizer(tmp_path).render_chat(chat) == "x!"
    (tmp_path / "chat_template.jinja").write_text("<{{ messages[0].content }}>")
    assert Tokenizer(tmp_path).render_chat(chat) == "<x>"
    assert Tokenizer(tmp_path, chat_template="[{{ messages[0].content }}]").render_chat(chat) == "[x]"


def test_template_options_as_transformers(tok: Tokenizer, hf_tok: PreTrainedTokenizerFast, demo_dir: Path) -> None:
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Once upon"}]
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                      continue_final_message=True)
    assert tok.render_chat(messages, add_generation_prompt=False, continue_final_message=True) == want
    assert tok.render_chat(messages, add_generation_prompt=False).startswith(want)
    with pytest.raises(ChatTemplateError, match="cannot both be true"):
        tok.render_chat(messages, add_generation_prompt=True, continue_final_message=True)
    custom = Tokenizer(demo_dir, chat_template="{% if loud %}LOUD {% endif %}{{ messages[0].content }}")
    assert custom.render_chat(messages[:1], template_kwargs={"loud": True}) == "LOUD Hello"
    assert custom.render_chat(messages[:1]) == "Hello"
    with pytest.raises(ChatTemplateError, match="may not set") as err:
        custom.render_chat(messages[:1], template_kwargs={"messages": []})
    assert err.value.param == "chat_template_kwargs"


@pytest.mark.parametrize(("messages", "message"), [
    ([], "messages must be a non-empty list"),
    ([{"role": "wizard", "content": "x"}], r"messages\[0\].role='wizard' is not one of"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string"),
])
def test_bad_chat_messages(tok: Tokenizer, messages: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tok.render_chat(messages)


def test_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_incremental_detokenizer_streams_exact_text(tok: Tokenizer, text: str) -> None:
    prompt = tok.encode("A prompt:")
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert not any("\ufffd" in d for d in deltas)  # multi-byte characters never split


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\u2581<>", blacklist_categories=SURROGATES), max_size=40))
def test_incremental_detokenizer_streams_any_text(text: str) -> None:
    """Any Unicode text (byte fallback included) streams back exactly, never a broken character."""
    tok = _demo_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [1])
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == tok.decode([1, *ids])
    assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 873), min_size=1, max_size=30))
def test_incremental_detokenizer_holds_back_unfinished_bytes(ids: list[int]) -> None:
    """Arbitrary ids (invalid byte runs included): a delta never ends inside a character."""
    tok = _demo_tokenizer()
    detok = IncrementalDetokenizer(tok, [1])
    assert not any(detok.add(i).endswith("\ufffd") for i in ids)


_DEMO: dict[str, Tokenizer] = {}


def _demo_tokenizer() -> Tokenizer:
    if "tok" not in _DEMO:
        import tempfile

        from cluster.model.demo import init_demo

        _DEMO["tok"] = Tokenizer(init_demo(Path(tempfile.mkdtemp()) / "m"))
    return _DEMO["tok"]
