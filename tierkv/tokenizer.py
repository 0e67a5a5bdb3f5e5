"""Tokenizer and chat template of a HF model directory, without transformers.

Why this module exists: the runtime must not depend on transformers, yet it has to encode,
decode and render chat prompts exactly as the model expects. ``tokenizer.json`` is read with the
``tokenizers`` library, BOS handling follows ``tokenizer_config.json``, the ``chat_template`` is
rendered with a sandboxed jinja2 environment, and decoding is incremental so streamed text never
splits a multi-byte character.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from tierkv.config import ConfigError, read_json


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode text and render chat prompts for one model directory."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception subclass on malformed files
            raise ConfigError(f"{path} cannot be read ({exc}); restore it from the original checkpoint") from None
        cfg_path = model_dir / "tokenizer_config.json"
        self._cfg = read_json(cfg_path, what="tokenizer config") if cfg_path.is_file() else {}
        self.bos_token = _token_text(self._cfg.get("bos_token"))
        self.eos_token = _token_text(self._cfg.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template = self._load_template(model_dir)
        self._add_bos = self._decide_add_bos()

    @staticmethod
    def _load_template(model_dir: Path) -> str | None:
        jinja = model_dir / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = None
        cfg_path = model_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            template = read_json(cfg_path, what="tokenizer config").get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template

    def _decide_add_bos(self) -> bool:
        """BOS is prepended when tokenizer_config says so, else when the post-processor adds it."""
        if self.bos_token_id is None:
            return False
        if "add_bos_token" in self._cfg:
            return bool(self._cfg["add_bos_token"])
        probe = self._tok.encode("a", add_special_tokens=True).ids
        return bool(probe) and probe[0] == self.bos_token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids, with BOS prepended when the model expects it."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self._add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render ``[{"role": ..., "content": ...}]`` with the model's chat template."""
        if not self.chat_template:
            raise ConfigError("this model has no chat_template in tokenizer_config.json; "
                              "use `tierkv run --prompt` for plain completion")
        # the same environment transformers gives Hub templates: loop controls, tojson with its options
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as exc:
            raise ConfigError(f"the model's chat template failed: {exc}") from None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat prompt ids; the template already places BOS, so none is added here."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces without splitting multi-byte characters."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context
        self._read = 0    # ids before this are already emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the newly complete text (may be empty)."""
        self.ids.append(token_id)
        if self._tok is None:
            return ""
        before = self._tok.decode(self.ids[self._prefix:self._read])
        after = self._tok.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of generation."""
        if self._tok is None or self._read == len(self.ids):
            return ""
        before = self._tok.decode(self.ids[self._prefix:self._read])
        after = self._tok.decode(self.ids[self._prefix:])
        self._read = len(self.ids)
        return after[len(before):]
