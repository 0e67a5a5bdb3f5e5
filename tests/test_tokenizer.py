"""Tokenizer over tokenizer.json: BOS rules, round trips, chat templates, incremental UTF-8-safe decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import processors

import tierkv
from tierkv.config import ConfigError
from tierkv.tokenizer import IncrementalDecoder, Tokenizer
from tokenizer_fixtures import (BOS_ID, EOS_ID, byte_level_bpe, sentencepiece_like, word_level,
                               write_tokenizer)

torch.set_num_threads(1)  # tiny matmuls: extra threads only contend on a shared 2-core machine

UNICODE_TEXT = "naïve café — 日本語のテキスト 中文 한국어 😀🎉👍🏽 ok"


@pytest.fixture(scope="module")
def bpe():
    return byte_level_bpe()


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, bpe) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("bpe"), bpe)


@pytest.fixture(scope="module")
def bpe_tok(bpe_dir) -> Tokenizer:
    return Tokenizer(bpe_dir)


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(write_tokenizer(tmp_path_factory.mktemp("sp"), sentencepiece_like()))


# -- BOS -------------------------------------------------------------------------------------------
def test_bos_prepended_when_configured(bpe_tok) -> None:
    ids = bpe_tok.encode("hello world")
    assert bpe_tok.bos_token_id == BOS_ID and bpe_tok.eos_token_id == EOS_ID
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    assert bpe_tok.encode("hello world", add_special_tokens=False) == ids[1:]


def test_bos_not_prepended_when_disabled(tmp_path, bpe) -> None:
    tok = Tokenizer(write_tokenizer(tmp_path, bpe, add_bos_token=False))
    ids = tok.encode("hello world")
    assert BOS_ID not in ids
    assert tok.decode(ids) == "hello world"


def test_bos_follows_post_processor_without_add_bos_token(tmp_path, bpe) -> None:
    """Without add_bos_token, BOS is added exactly when tokenizer.json's post-processor adds it."""
    plain = Tokenizer(write_tokenizer(tmp_path / "plain", bpe, add_bos_token=None))
    assert plain.encode("hello")[0] != BOS_ID
    templated = byte_level_bpe()
    templated.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    tok = Tokenizer(write_tokenizer(tmp_path / "templated", templated, add_bos_token=None))
    ids = tok.encode("hello")
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1


def test_special_tokens_as_content_objects(tmp_path, bpe) -> None:
    tok = Tokenizer(write_tokenizer(tmp_path, bpe, bos={"content": "<s>", "special": True},
                                    eos={"content": "</s>", "special": True}))
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token_id) == ("<s>", BOS_ID, EOS_ID)


def test_no_tokenizer_config_means_no_bos(tmp_path, bpe) -> None:
    bpe.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    assert tok.bos_token_id is None and tok.chat_template is None
    assert tok.decode(tok.encode("hello")) == "hello"


def test_malformed_tokenizer_json_names_the_file(tmp_path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        Tokenizer(tmp_path)


# -- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["The quick brown fox.", "hello  world\n\ttabs", UNICODE_TEXT, " lead space", ""])
def test_encode_decode_round_trip(bpe_tok, text: str) -> None:
    ids = bpe_tok.encode(text)
    assert bpe_tok.decode(ids) == text                       # BOS is special: skipped on decode
    assert bpe_tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert all(0 <= i < bpe_tok.vocab_size for i in ids)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_round_trip_any_text(bpe_tok, text: str) -> None:
    assert bpe_tok.decode(bpe_tok.encode(text)) == text


def test_word_level_round_trip(tmp_path) -> None:
    tok = Tokenizer(write_tokenizer(tmp_path, word_level()))
    ids = tok.encode("apple banana cherry")
    assert ids[0] == BOS_ID and len(ids) == 4
    assert tok.decode(ids) == "apple banana cherry"


# -- chat templates --------------------------------------------------------------------------------
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


def test_render_chat(bpe_tok) -> None:
    assert bpe_tok.render_chat(MESSAGES) == "<s><|system|>be brief</s>\n<|user|>hello</s>\n<|assistant|>"
    assert bpe_tok.render_chat(MESSAGES, add_generation_prompt=False) == \
        "<s><|system|>be brief</s>\n<|user|>hello</s>\n"


def test_encode_chat_has_exactly_one_bos(bpe_tok) -> None:
    ids = bpe_tok.encode_chat(MESSAGES)
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    assert ids.count(EOS_ID) == 2                                  # the template's </s> are special tokens
    assert bpe_tok.decode(ids, skip_special_tokens=False) == bpe_tok.render_chat(MESSAGES)


def test_chat_template_tojson_and_raise_exception(tmp_path, bpe) -> None:
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}"
                "{% endif %}{{ messages | tojson }}")
    tok = Tokenizer(write_tokenizer(tmp_path, bpe, chat_template=template))
    assert json.loads(tok.render_chat([{"role": "user", "content": "日本"}])) == [{"role": "user", "content": "日本"}]
    with pytest.raises(ConfigError, match="first message must be from the user"):
        tok.render_chat([{"role": "assistant", "content": "hi"}])


def test_chat_template_features_hub_templates_use(tmp_path, bpe) -> None:
    """Loop controls ({% break %}/{% continue %}) and tojson's keyword options, as transformers allows."""
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
                "{{ m['content'] }}{% break %}{% endfor %}|{{ messages[1] | tojson(ensure_ascii=False, "
                "sort_keys=True, separators=(',', ':')) }}|{{ {'a': 1} | tojson(indent=2) }}")
    tok = Tokenizer(write_tokenizer(tmp_path, bpe, chat_template=template))
    assert tok.render_chat(MESSAGES + [{"role": "user", "content": "日本"}]) == \
        'hello|{"content":"hello","role":"user"}|{\n  "a": 1\n}'


def test_chat_template_file_and_named_templates(tmp_path, bpe) -> None:
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT{{ bos_token }}"}]
    tok = Tokenizer(write_tokenizer(tmp_path, bpe, chat_template=named))  # type: ignore[arg-type]
    assert tok.render_chat(MESSAGES) == "DEFAULT<s>"
    (tmp_path / "chat_template.jinja").write_text("FILE", encoding="utf-8")
    assert Tokenizer(tmp_path).render_chat(MESSAGES) == "FILE"


def test_render_chat_without_template_is_a_clear_error(tmp_path, bpe) -> None:
    tok = Tokenizer(write_tokenizer(tmp_path, bpe, chat_template=None))
    with pytest.raises(ConfigError, match="chat_template"):
        tok.render_chat(MESSAGES)


# -- incremental decoding --------------------------------------------------------------------------
def _pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    return pieces + [dec.flush()]


def test_incremental_decoder_never_splits_multibyte_characters(bpe_tok) -> None:
    ids = bpe_tok.encode(UNICODE_TEXT, add_special_tokens=False)
    # the test only means something if some characters really are split across tokens
    assert any("\ufffd" in bpe_tok.decode([i]) for i in ids)
    pieces = _pieces(bpe_tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == bpe_tok.decode(ids) == UNICODE_TEXT


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8"), max_size=30))
def test_incremental_pieces_are_whole_characters(bpe_tok, text: str) -> None:
    ids = bpe_tok.encode(text, add_special_tokens=False)
    pieces = _pieces(bpe_tok, ids)
    assert "".join(pieces) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in p for p in pieces)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 299), max_size=25))
def test_incremental_pieces_concatenate_to_full_decode_for_any_ids(bpe_tok, ids: list[int]) -> None:
    """Even for arbitrary ids (invalid UTF-8, special tokens), pieces add up to the one-shot decode."""
    assert "".join(_pieces(bpe_tok, ids)) == bpe_tok.decode(ids)


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.sampled_from("ab z日本😀é"), max_size=16))
def test_incremental_decoder_byte_fallback(sp_tok, text: str) -> None:
    """Byte-fallback tokens (<0xE6><0x97><0xA5>) and a leading-space-stripping decoder, as in Llama 2."""
    tok = sp_tok
    ids = tok.encode(text, add_special_tokens=False)
    pieces = _pieces(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)


def test_incremental_decoder_word_level_spacing(tmp_path) -> None:
    tok = Tokenizer(write_tokenizer(tmp_path, word_level()))
    ids = tok.encode("hello world apple", add_special_tokens=False)
    pieces = _pieces(tok, ids)
    assert pieces[:3] == ["hello", " world", " apple"]
    assert "".join(pieces) == "hello world apple"


def test_incremental_decoder_without_tokenizer_yields_no_text() -> None:
    dec = IncrementalDecoder(None)
    assert dec.push(5) == "" and dec.flush() == "" and dec.ids == [5]


# -- end to end through the engine -----------------------------------------------------------------
def test_text_prompt_end_to_end(make_checkpoint, bpe) -> None:
    model, path = make_checkpoint("llama", vocab_size=bpe.get_vocab_size())
    write_tokenizer(path, bpe)
    engine = tierkv.load(path, dtype="float32", device="cpu")
    tok = engine.tokenizer
    assert tok is not None
    prompt = "Hello world, the quick"
    res = engine.generate(prompt, max_new_tokens=10)
    assert res.prompt_token_ids == tok.encode(prompt) and res.prompt_token_ids[0] == BOS_ID
    with torch.no_grad():
        ref = model.generate(torch.tensor([res.prompt_token_ids]), max_new_tokens=10, do_sample=False,
                             eos_token_id=sorted(engine.eos_token_ids), pad_token_id=0)
    assert res.token_ids == ref[0, len(res.prompt_token_ids):].tolist()
    assert res.text == tok.decode(res.token_ids)
    chat = engine.generate(tok.encode_chat([{"role": "user", "content": "hello"}]), max_new_tokens=4)
    assert chat.prompt_token_ids.count(BOS_ID) == 1
    engine.close()
