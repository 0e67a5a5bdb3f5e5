"""Tokenizer metadata for GGUF files built at test time, written the way llama.cpp's converter does.

Why this exists: GGUF tests need files whose ``tokenizer.ggml.*`` keys look like the ones
``convert_hf_to_gguf.py`` writes, without llama.cpp. ``add_tokenizer`` copies a Hugging Face
tokenizer (a directory or a loaded transformers tokenizer) into a ``gguf.GGUFWriter``:

- ``kind="gpt2"``: byte-level BPE; tokens as the vocabulary spells them, token types (CONTROL for
  special added tokens, USER_DEFINED for other added ones), merges, and ``pre`` as
  ``tokenizer.ggml.pre`` (llama.cpp names it by hashing a probe text; tests name it).
- ``kind="llama"``: SentencePiece-style; tokens, scores (``-id`` for ordinary pieces, which is how
  a SentencePiece BPE model ranks them, 0 for special and byte tokens) and token types (BYTE for
  ``<0xNN>``, UNKNOWN for the unk token); merges only when ``merges=True`` (files made from a
  ``tokenizer.model`` have none and readers rebuild them from the scores).

Special token ids, ``add_bos_token``/``add_eos_token`` and the chat template come from the
tokenizer unless given. Used by tests/test_gguf_tokenizer.py and tests/gguf_util.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
PROBE = "probe"  # add_bos/add_eos default: what the tokenizer does to a probe text


def _load(source: Any) -> Any:
    if isinstance(source, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(source))
    return source


def _tokens(tok: Any) -> list[str]:
    """All tokens (added ones included) in id order; ids must run 0..n-1 without gaps."""
    vocab = tok.get_vocab()
    tokens = [""] * len(vocab)
    for text, index in vocab.items():
        if index >= len(tokens):
            raise ValueError(f"token ids of {type(tok).__name__} have gaps (id {index} of {len(vocab)} tokens)")
        tokens[index] = text
    return tokens


def _types(tok: Any, tokens: list[str], kind: str) -> list[int]:
    added = tok.added_tokens_decoder  # id -> AddedToken
    unk = tok.unk_token_id
    types = []
    for index, text in enumerate(tokens):
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and _BYTE_TOKEN.fullmatch(text):
            types.append(gguf.TokenType.BYTE)
        elif kind == "llama" and index == unk:
            types.append(gguf.TokenType.UNKNOWN)
        else:
            types.append(gguf.TokenType.NORMAL)
    return [int(t) for t in types]


def _merges(tok: Any) -> list[str]:
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def add_tokenizer(writer: gguf.GGUFWriter, source: Any, kind: str = "gpt2", pre: str | None = None, *,
                  merges: bool | None = None, add_bos: bool | str | None = PROBE, add_eos: bool | str | None = PROBE,
                  chat_template: str | None = None, eot_id: int | None = None) -> None:
    """Write ``source``'s vocabulary and special tokens into ``writer`` as ``tokenizer.ggml.*`` keys.

    ``pre`` is written only when given. ``add_bos``/``add_eos``: True/False, None to leave the key
    out, PROBE (default) for whether the tokenizer puts BOS first / EOS last on a probe text, as
    llama.cpp's converter reads it from the post-processor. ``chat_template`` defaults to the
    tokenizer's own. ``merges`` defaults to True for "gpt2", False for "llama".
    """
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"kind must be 'gpt2' or 'llama', not {kind!r}")
    tok = _load(source)
    tokens = _tokens(tok)
    types = _types(tok, tokens, kind)
    writer.add_tokenizer_model(kind)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "llama":
        writer.add_token_scores([-float(i) if t == gguf.TokenType.NORMAL else 0.0 for i, t in enumerate(types)])
    if merges if merges is not None else kind == "gpt2":
        writer.add_token_merges(_merges(tok))
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tok, f"{name}_token_id", None)
        if token_id is not None:
            add(token_id)
    if eot_id is not None:
        writer.add_eot_token_id(eot_id)
    probe = tok("a").input_ids
    if add_bos == PROBE:
        add_bos = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
    if add_eos == PROBE:
        add_eos = tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id]
    if add_bos is not None:
        writer.add_add_bos_token(bool(add_bos))
    if add_eos is not None:
        writer.add_add_eos_token(bool(add_eos))
    template = chat_template if chat_template is not None else getattr(tok, "chat_template", None)
    if template:
        writer.add_chat_template(template)
