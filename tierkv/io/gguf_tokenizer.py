"""The tokenizer and chat template a GGUF file carries, written out as the files a HF model dir holds.

Why this module exists: a GGUF file has no ``tokenizer.json``; it stores the vocabulary, merges,
scores, token types, special token ids, the add-BOS flag and the chat template as
``tokenizer.ggml.*`` / ``tokenizer.chat_template`` metadata. tierkv's runtime reads a model
directory (``tierkv.tokenizer.Tokenizer``), so a GGUF store gets tokenizer.json,
tokenizer_config.json, special_tokens_map.json and generation_config.json written beside it.

The vocabulary -> ``tokenizers`` pipeline is not re-derived here: it is Hugging Face transformers'
own GGUF tokenizer converter (``transformers.integrations.gguf``: ``get_gguf_tokenizer`` reads the
keys, ``convert_gguf_tokenizer`` builds the tokenizer per ``tokenizer.ggml.model`` and
``tokenizer.ggml.pre``, and ``TokenizersBackend`` sets the BOS/EOS post-processor), so ids equal
those of ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` but for the fixes below. What this
module adds: refusing files that converter would silently get wrong (no token list, a tokenizer model or
pre-tokenizer it does not know), three fixes where it departs from the model's own tokenizer.json
and llama.cpp (``smollm`` splits digits one by one; Llama 3-style BPE takes a word found whole in
the vocabulary before merging; no token ids past the file's vocabulary), and the end-of-generation
ids (EOS, EOT, EOM and the control tokens llama.cpp stops on).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierkv.config import ConfigError

if TYPE_CHECKING:  # gguf is an optional extra; only its reader objects are passed in
    from gguf import GGUFReader

INSTALL_HINT = ("pip install 'transformers>=5.24' 'gguf>=0.10' (what the tierkv[gguf] extra installs; "
                "from a tierkv checkout: pip install -e '.[gguf]')")
TOKENIZER_MODELS = ("gpt2", "llama")  # tokenizer.ggml.model values: byte-level BPE, SentencePiece
# tokenizer.ggml.pre values byte-level BPE keeps GPT-2's own split for (transformers' default): llama.cpp's name
GPT2_SPLIT_PRES = ("gpt-2",)
# pre-tokenizers transformers' converter gets wrong, fixed here: llama.cpp's regexes "\p{N}" then GPT-2's
DIGIT_SPLIT_PRES = ("smollm",)
# pre-tokenizers whose BPE takes a pre-token found whole in the vocabulary before any merge (Llama 3's
# tokenizer.json "ignore_merges", llama.cpp's ignore_merges = true in src/llama-vocab.cpp); transformers'
# converter leaves it off, which splits the few vocabulary words the merges cannot reach
IGNORE_MERGES_PRES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                      "jina-v5-nano", "tekken")
# control tokens llama.cpp ends generation on by their text (src/llama-vocab.cpp, the EOG list), the
# subset the llama/qwen2/qwen3 families use; EOS, EOT and EOM ids from the file are always added
EOG_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>",
             "<end_of_turn>", "<EOT>")
CONTROL = 3  # gguf.TokenType.CONTROL


class UnsupportedTokenizer(ConfigError):
    """The file's tokenizer cannot be reproduced; its weights may still be usable with token ids."""


def _hf_gguf() -> Any:
    try:
        from transformers.integrations.gguf import gguf_tokenizer_mapping
    except ImportError as exc:
        raise ConfigError(f"reading a GGUF file's tokenizer needs transformers' GGUF converter ({exc}); "
                          f"install it with: {INSTALL_HINT}") from None
    return gguf_tokenizer_mapping


def _field(reader: GGUFReader, key: str) -> Any:
    """A metadata value as Python (str, int, float, bool or list), or None when the key is absent."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _reader_path(reader: GGUFReader) -> Path:
    """The file a reader maps (transformers' converter reads the metadata by path)."""
    return Path(reader.data.filename)


def check_tokenizer(reader: GGUFReader) -> None:
    """Refuse a file whose tokenizer transformers' converter would build wrong or not at all.

    A byte-level file without tokenizer.ggml.pre (older than that key) or naming "default" gets
    GPT-2's split, as in transformers (llama.cpp's "default" regexes differ slightly)."""
    where = _reader_path(reader)
    field = reader.get_field("tokenizer.ggml.tokens")
    if field is None or not field.data:
        raise UnsupportedTokenizer(f"{where} has no tokenizer.ggml.tokens (the vocabulary), so no tokenizer "
                                   "can be built; prompts would have to be given as token ids")
    model = _field(reader, "tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise UnsupportedTokenizer(f"{where}: tokenizer.ggml.model = {model!r} is not a tokenizer tierkv can "
                                   f"build (supported: {', '.join(TOKENIZER_MODELS)})")
    if model == "llama":
        if reader.get_field("tokenizer.ggml.scores") is None and reader.get_field("tokenizer.ggml.merges") is None:
            raise UnsupportedTokenizer(f"{where}: a SentencePiece vocabulary (tokenizer.ggml.model = 'llama') "
                                       "needs tokenizer.ggml.scores or tokenizer.ggml.merges; the file has neither")
        return
    if reader.get_field("tokenizer.ggml.merges") is None:
        raise UnsupportedTokenizer(f"{where}: a byte-level BPE vocabulary (tokenizer.ggml.model = 'gpt2') "
                                   "without tokenizer.ggml.merges cannot be tokenized; re-convert the file")
    pre = _field(reader, "tokenizer.ggml.pre")
    known = supported_pre_tokenizers()
    if pre is not None and pre != "default" and pre not in known:
        raise UnsupportedTokenizer(f"{where}: tokenizer.ggml.pre = {pre!r} names a pre-tokenizer tierkv cannot "
                                   f"reproduce (supported: {', '.join(sorted(known))})")


def supported_pre_tokenizers() -> set[str]:
    """``tokenizer.ggml.pre`` values a byte-level BPE file may name."""
    return {*_hf_gguf().GGUF_PRE_TOKENIZER_SPLITS, *GPT2_SPLIT_PRES, *DIGIT_SPLIT_PRES}


def build_tokenizer(reader: GGUFReader) -> tuple[Any, dict[str, Any]]:
    """``(tokenizers.Tokenizer, tokenizer_config)`` exactly as transformers builds them from the file."""
    from tokenizers import pre_tokenizers
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    check_tokenizer(reader)
    hf = _hf_gguf()
    architecture, tokenizer_dict, config = hf.get_gguf_tokenizer(str(_reader_path(reader)))
    backend, extra = hf.convert_gguf_tokenizer(architecture, tokenizer_dict)
    config = {**config, **extra}
    # the post-processor transformers puts on from add_bos_token/add_eos_token (as from_pretrained does)
    hf_tok = TokenizersBackend(tokenizer_object=backend, **config)
    backend = hf_tok.backend_tokenizer
    pre = tokenizer_dict.get("pre_tokenizer_type")
    if tokenizer_dict.get("tokenizer_type") == "gpt2" and pre in DIGIT_SPLIT_PRES:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if tokenizer_dict.get("tokenizer_type") == "gpt2" and pre in IGNORE_MERGES_PRES:
        backend.model.ignore_merges = True
    return _drop_tokens_past_vocab(backend, len(tokenizer_dict["tokens"])), config


def _drop_tokens_past_vocab(backend: Any, n_tokens: int) -> Any:
    """Without the added tokens transformers' classes bring that the file lacks (GPT2Tokenizer adds
    "<|endoftext|>" to a vocabulary without it): their ids lie past the model's embedding rows."""
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    kept = [t for t in data.get("added_tokens") or [] if t["id"] < n_tokens]
    if len(kept) == len(data.get("added_tokens") or []):
        return backend
    data["added_tokens"] = kept
    return Tokenizer.from_str(json.dumps(data))


def eos_token_ids(reader: GGUFReader) -> list[int]:
    """End-of-generation ids: EOS, EOT, EOM, then control tokens llama.cpp stops on (EOG_TEXTS)."""
    ids = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    types = _field(reader, "tokenizer.ggml.token_type")
    if types is not None:
        tokens = _field(reader, "tokenizer.ggml.tokens")
        found: dict[str, int] = {}
        for index, text in enumerate(tokens):
            if text in EOG_TEXTS and types[index] == CONTROL:
                found.setdefault(text, index)
        ids += [found[text] for text in EOG_TEXTS if text in found]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def write_tokenizer_files(reader: GGUFReader, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json
    for the tokenizer ``reader``'s file describes (a ``gguf.GGUFReader``; for a split set, part 1)."""
    backend, config = build_tokenizer(reader)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "tokenizer.json", backend.to_str(pretty=True))
    specials = {name: config.get(name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": bool(config.get("add_bos_token", False)),
        "add_eos_token": bool(config.get("add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    template = _chat_templates(reader, config.get("chat_template"))
    if template:
        tok_cfg["chat_template"] = template
    gen_cfg: dict[str, Any] = {}
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        gen_cfg["bos_token_id"] = int(bos)
    eos = eos_token_ids(reader)
    if eos:
        gen_cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        gen_cfg["pad_token_id"] = int(pad)
    _write_json(out_dir / "tokenizer_config.json", tok_cfg)
    _write_json(out_dir / "special_tokens_map.json", {k: v for k, v in specials.items() if v is not None})
    _write_json(out_dir / "generation_config.json", gen_cfg)


def _chat_templates(reader: GGUFReader, default: str | None) -> str | list[dict[str, str]] | None:
    """The default template, or with named ones (tokenizer.chat_template.NAME) the list form
    tokenizer_config.json uses, "default" first."""
    names = _field(reader, "tokenizer.chat_templates") or []
    if not names:
        return default
    named = [{"name": n, "template": _field(reader, f"tokenizer.chat_template.{n}")} for n in names]
    return [*([{"name": "default", "template": default}] if default else []), *named]


def _write_json(path: Path, value: dict[str, Any]) -> None:
    _write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Whole or not at all: a crash mid-write leaves no half file under the final name."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
