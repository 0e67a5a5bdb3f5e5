"""Small tokenizers built at test time with the ``tokenizers`` library, and the files a HF model dir holds.

Two kinds: a byte-level BPE trained on a few sentences (multi-byte characters outside the training
text stay split into single-byte tokens, which is what the incremental decoder must cope with), and
a WordLevel tokenizer over a fixed word list (every token is clean ASCII, so stop-string tests can
pick strings that span token boundaries). Special tokens come first: <pad>=0, <s>=1, </s>=2, the
ids a default ``LlamaConfig`` uses for bos/eos.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIALS = ["<pad>", "<s>", "</s>"]
BOS, EOS = "<s>", "</s>"
BOS_ID, EOS_ID = 1, 2

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Return a list of the numbers in the given range.",
    "Memory tiers move weights from the disk to the host and then to the device.",
    "A small model can still say something a person recognises.",
    "Hello world, hello tokenizer, hello again!",
]

WORDS = ["apple", "banana", "cherry", "delta", "echo", "forest", "garden", "harbor", "island", "jungle",
         "kettle", "lemon", "mango", "nectar", "orange", "pepper", "quartz", "river", "sunset", "tiger",
         "umbrella", "velvet", "walnut", "xenon", "yellow", "zebra", "hello", "world", "user", "assistant"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_level_bpe(vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) trained on SENTENCES; vocab_size includes the 256 byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return tok


def word_level() -> Tokenizer:
    """Whitespace-split words; decode joins tokens with single spaces. Vocab: SPECIALS + WORDS + <unk>."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, *WORDS, "<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return tok


def sentencepiece_like() -> Tokenizer:
    """Llama-2 style: "▁" for spaces, <0xNN> byte-fallback tokens for characters outside the vocab,
    and a decoder that strips the one leading space the normalizer prepends."""
    pieces = [*SPECIALS, *(f"<0x{i:02X}>" for i in range(256)), "▁", *"abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(pieces)}, merges=[], byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIALS)
    return tok


def write_tokenizer(model_dir: Path, tok: Tokenizer, *, add_bos_token: bool | None = True,
                    chat_template: str | None = CHAT_TEMPLATE, bos: Any = BOS, eos: Any = EOS) -> Path:
    """Write tokenizer.json and tokenizer_config.json into ``model_dir`` (a key left out when None)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(model_dir / "tokenizer.json"))
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos}
    if add_bos_token is not None:
        cfg["add_bos_token"] = add_bos_token
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return model_dir
