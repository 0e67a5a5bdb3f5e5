"""The tokenizer files written from a GGUF file's metadata (tierkv/io/gguf_tokenizer.py).

GGUF files are built at test time with gguf's writer (tests/gguf_tok_util.py) from tokenizers
trained here or shipped in tierkv/demo_model. Two oracles: transformers' own GGUF tokenizer
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) on the same file, and the tokenizer the
file was made from (what the model was trained with).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf_tok_util import add_tokenizer  # noqa: E402
from tokenizer_fixtures import SENTENCES  # noqa: E402
from tokenizers import Tokenizer as RawTokenizer  # noqa: E402
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers  # noqa: E402

from tierkv.config import ConfigError, ModelConfig  # noqa: E402
from tierkv.io.gguf_tokenizer import UnsupportedTokenizer, write_tokenizer_files  # noqa: E402
from tierkv.tokenizer import Tokenizer  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "tierkv" / "demo_model"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello tokenizer!",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "digits 1234567890 and 3.14159, 42nd",
    "unicode: héllo wörld naïve café — ½ ∑ 漢字 日本語",
    "emoji 😀🚀👍🏽 and a family 👨‍👩‍👧",
    "don't won't it's we're I'll",
    "",
    " ",
]
CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hi there 😀"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count: 1 2 3"}]
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}"
                  "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                  "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")


def _sp_source(vocab_size: int = 420):
    """A Llama-2-style SentencePiece BPE: <unk> <s> </s>, the 256 <0xNN> byte tokens, then pieces."""
    from transformers.models.llama.tokenization_llama import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    raw = RawTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    raw.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    model = json.loads(raw.to_str())["model"]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    tok.chat_template = LLAMA_TEMPLATE
    return tok


# the splits of the models' own tokenizer.json files (Llama 3, Qwen2), written out here as the oracle
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = [*SENTENCES, *TEXTS, "In 2024 there were 365 days; 1000000 is a million.", "x  =  1\n\n\ty = 22\r\n"]


def _split(kind: str):
    """The pre-tokenizer of a byte-level BPE: GPT-2's regex, a model's regex, or SmolLM's digit split."""
    if kind == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if kind == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    regex = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[kind]
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _bpe_source(split: str = "qwen2", bos: str | None = None):
    """A byte-level BPE trained with ``split`` (Qwen2-style by default: no BOS, <|endoftext|> as
    EOS and pad, chat control tokens, <think> as a plain added token)."""
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = _split(split)
    raw.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *([bos] if bos else [])]
    raw.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=520, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.add_tokens(["<think>"])
    kwargs = {"bos_token": bos, "add_bos_token": True} if bos else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"], **kwargs)
    tok.chat_template = QWEN_TEMPLATE
    return tok


def _demo_source():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO))


def _write_gguf(path: Path, source, kind: str, pre: str | None, more=None, **kwargs) -> Path:
    """A GGUF holding ``source``'s tokenizer (``more(writer)`` adds keys) and one dummy tensor."""
    writer = gguf.GGUFWriter(str(path), arch="qwen2" if pre == "qwen2" else "llama")
    writer.add_block_count(1)
    add_tokenizer(writer, source, kind=kind, pre=pre, **kwargs)
    if more is not None:
        more(writer)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tierkv(gguf_path: Path, out: Path) -> Tokenizer:
    write_tokenizer_files(gguf.GGUFReader(str(gguf_path)), out)
    return Tokenizer(out)


def _hf(gguf_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


CASES = {  # name: (source, kind, pre, add_tokenizer kwargs, BOS prepended)
    "llama-sp-scores": (_sp_source, "llama", None, {"add_bos": False}, False),
    "llama-sp-merges": (_sp_source, "llama", None, {"merges": True, "add_bos": True}, True),
    "gpt2-demo": (_demo_source, "gpt2", "gpt-2", {}, True),  # the demo's tokenizer_config says add_bos_token
    "gpt2-demo-no-pre": (_demo_source, "gpt2", None, {}, True),  # files older than tokenizer.ggml.pre
    "llama-bpe": (partial(_bpe_source, "llama-bpe", bos="<|begin_of_text|>"), "gpt2", "llama-bpe", {}, True),
    "qwen2": (_bpe_source, "gpt2", "qwen2", {"add_bos": False}, False),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(tierkv Tokenizer, HF's GGUF tokenizer, source tokenizer, case name, written dir) for one file."""
    make, kind, pre, kwargs, _ = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    source = make()
    path = _write_gguf(root / "model.gguf", source, kind, pre, **kwargs)
    return _tierkv(path, root / "store"), _hf(path), source, request.param, root / "store"


def _special_texts(hf) -> list[str]:
    specials = [t for t in (hf.bos_token, hf.eos_token) if t]
    extra = [t for t in ("<|im_start|>", "<|im_end|>", "<think>") if t in hf.get_vocab()]
    return [f"{specials[-1]} between {' x '.join(extra or specials)} words{specials[0]}",
            f"x{''.join(specials)}glued{specials[-1]}"]  # a text starting with BOS: tierkv adds no second one


def test_ids_equal_transformers_gguf_tokenizer(pair, tmp_path) -> None:
    """tierkv's ids equal transformers' GGUF tokenizer's; the written directory also loads in
    transformers (AutoTokenizer) with the same ids."""
    from transformers import AutoTokenizer

    tk, hf, _, _, store = pair
    written = AutoTokenizer.from_pretrained(str(store))
    for text in TEXTS + CORPUS + _special_texts(hf):
        assert tk.encode(text) == hf(text).input_ids == written(text).input_ids, text
        assert tk.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids, text


def test_special_tokens_and_add_bos_equal_transformers(pair) -> None:
    tk, hf, source, name, _ = pair
    assert (tk.bos_token, tk.eos_token) == (hf.bos_token, hf.eos_token)
    assert (tk.bos_token_id, tk.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert tk.vocab_size == len(source)  # transformers adds "<|endoftext|>" past a GPT-2 vocab without it
    assert all(i < len(source) for i in tk.encode("a <|endoftext|> b"))
    assert (tk.bos_token_id is not None and tk.encode("a")[:1] == [tk.bos_token_id]) == CASES[name][4]
    assert bool(hf.add_bos_token) == CASES[name][4]


def test_decode_round_trip(pair) -> None:
    """Decoding equals transformers'; byte-level BPE gives every text back, SentencePiece decodes as
    the source tokenizer does (its Metaspace decoder folds a run of leading spaces)."""
    tk, hf, source, name, _ = pair
    for text in TEXTS + _special_texts(hf):
        ids = tk.encode(text)
        assert tk.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert tk.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), text
    for text in TEXTS:
        ids = tk.encode(text, add_special_tokens=False)
        assert tk.decode(ids) == (source.decode(ids) if name.startswith("llama-sp") else text), text


def test_chat_template_renders_as_transformers(pair) -> None:
    tk, hf, _, _, _ = pair
    for prompt in (True, False):
        rendered = tk.render_chat(CHAT, add_generation_prompt=prompt)
        assert rendered == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
    expected = hf(hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False).input_ids
    assert tk.encode_chat(CHAT) == expected


def test_ids_equal_the_source_tokenizer(pair) -> None:
    """The ids are the ones of the tokenizer the file was made from (trained with the split its
    tokenizer.ggml.pre names), i.e. the model's own."""
    tk, _, source, _, _ = pair
    for text in TEXTS + CORPUS:
        assert tk.encode(text, add_special_tokens=False) == source(text, add_special_tokens=False).input_ids, text


def test_smollm_splits_digits_one_by_one_like_its_source(tmp_path) -> None:
    """SmolLM's split (each digit alone, then GPT-2's regex; llama.cpp's "smollm" regexes) keeps a
    run of spaces before a digit whole: "x  1" is x, "  ", 1. transformers' GGUF tokenizer uses
    GPT-2's regex alone there and gives x, " ", " ", 1; tierkv follows the model's own tokenizer."""
    source = _bpe_source("smollm")
    tk = _tierkv(_write_gguf(tmp_path / "smol.gguf", source, "gpt2", "smollm"), tmp_path / "store")
    assert [tk.decode([i]) for i in tk.encode("x  1", add_special_tokens=False)] == ["x", "  ", "1"]
    for text in [*TEXTS, *CORPUS, "x  1", "a   22 b", "tabs\t\t3"]:
        assert tk.encode(text, add_special_tokens=False) == source(text, add_special_tokens=False).input_ids, text
    pieces = [tk.decode([i]) for i in tk.encode("x 2024", add_special_tokens=False)]
    assert pieces[-4:] == ["2", "0", "2", "4"]


def test_llama3_style_bpe_takes_a_vocabulary_word_whole(tmp_path) -> None:
    """Llama 3's tokenizer.json (and llama.cpp for "llama-bpe") take a pre-token found in the vocabulary
    before merging: "abc" is one token although the merge order (b c first) never builds it."""
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(["<|begin_of_text|>", "<|end_of_text|>", *sorted(alphabet), "bc", "ab", "abc"])}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b"), ("ab", "c")], ignore_merges=True))
    raw.pre_tokenizer = _split("llama-bpe")
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    source = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    tk = _tierkv(_write_gguf(tmp_path / "l3.gguf", source, "gpt2", "llama-bpe", add_bos=True), tmp_path / "store")
    assert tk.encode("abc xbc", add_special_tokens=False) == source("abc xbc").input_ids
    assert tk.encode("abc", add_special_tokens=False) == [vocab["abc"]]


def test_generation_config_lists_every_end_of_generation_id(tmp_path) -> None:
    source = _bpe_source()
    im_end = source.convert_tokens_to_ids("<|im_end|>")
    think = source.convert_tokens_to_ids("<think>")
    path = _write_gguf(tmp_path / "q.gguf", source, "gpt2", "qwen2", eot_id=think)
    write_tokenizer_files(gguf.GGUFReader(str(path)), tmp_path / "store")
    gen = json.loads((tmp_path / "store" / "generation_config.json").read_text())
    eos = ModelConfig.token_ids_field(gen, "eos_token_id", "generation_config.json")
    assert list(eos) == [source.eos_token_id, think, im_end]
    assert gen["pad_token_id"] == source.pad_token_id and "bos_token_id" not in gen
    special = json.loads((tmp_path / "store" / "special_tokens_map.json").read_text())
    assert special == {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def test_named_chat_templates_are_kept_beside_the_default(tmp_path) -> None:
    templates = [{"name": "default", "template": QWEN_TEMPLATE},
                 {"name": "tool_use", "template": "TOOLS {{ messages | length }}"}]
    path = _write_gguf(tmp_path / "named.gguf", _bpe_source(), "gpt2", "qwen2", chat_template="",
                       more=lambda writer: writer.add_chat_template(templates))
    tk = _tierkv(path, tmp_path / "store")
    cfg = json.loads((tmp_path / "store" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == templates
    assert tk.render_chat(CHAT) == _hf(path).apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


def test_sentencepiece_file_without_add_bos_flag_adds_bos(tmp_path) -> None:
    """llama.cpp and transformers both prepend BOS to a SentencePiece vocabulary that does not say."""
    source = _sp_source()
    path = _write_gguf(tmp_path / "sp.gguf", source, "llama", None, add_bos=None, add_eos=None)
    assert gguf.GGUFReader(str(path)).get_field("tokenizer.ggml.add_bos_token") is None
    tk = _tierkv(path, tmp_path / "store")
    assert tk.encode("hello")[0] == tk.bos_token_id == source.bos_token_id
    assert tk.encode("hello") == _hf(path)("hello").input_ids


def _raw_gguf(path: Path, **keys) -> Path:
    """A GGUF with exactly the given tokenizer keys (values: str, int, bool or list of str)."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in keys.items():
        name = "tokenizer.ggml." + key
        if isinstance(value, list):
            writer.add_array(name, value)
        elif isinstance(value, bool):
            writer.add_bool(name, value)
        elif isinstance(value, int):
            writer.add_uint32(name, value)
        else:
            writer.add_string(name, value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keys, named", [
    ({"model": "gpt2", "pre": "gpt-2", "merges": ["a b"]}, "tokenizer.ggml.tokens"),
    ({"model": "rwkv", "tokens": ["a", "b"]}, "tokenizer.ggml.model = 'rwkv'"),
    ({"tokens": ["a", "b"]}, "tokenizer.ggml.model = None"),
    ({"model": "gpt2", "pre": "deepseek-llm", "tokens": ["a", "b", "ab"], "merges": ["a b"]},
     "tokenizer.ggml.pre = 'deepseek-llm'"),
    ({"model": "gpt2", "pre": "qwen2", "tokens": ["a", "b"]}, "tokenizer.ggml.merges"),
    ({"model": "llama", "tokens": ["a", "b"]}, "tokenizer.ggml.scores"),
])
def test_bad_tokenizer_metadata_is_refused_with_the_key_named(tmp_path, keys, named) -> None:
    path = _raw_gguf(tmp_path / "bad.gguf", **keys)
    with pytest.raises(UnsupportedTokenizer, match=named.replace("(", r"\(")) as err:
        write_tokenizer_files(gguf.GGUFReader(str(path)), tmp_path / "store")
    assert isinstance(err.value, ConfigError) and str(path) in str(err.value)
    assert not (tmp_path / "store" / "tokenizer.json").exists()


def test_missing_transformers_converter_says_how_to_install(tmp_path, monkeypatch) -> None:
    import sys

    path = _write_gguf(tmp_path / "q.gguf", _bpe_source(), "gpt2", "qwen2")
    monkeypatch.setitem(sys.modules, "transformers.integrations.gguf", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'transformers>=5\.24' 'gguf>=0\.10'"):
        write_tokenizer_files(gguf.GGUFReader(str(path)), tmp_path / "store")
