"""The on-disk format of a saved conversation: its token history and its KV cache.

Why this module exists: a session saved today must restore tomorrow into the same model, or be
refused with a message that says why; never half-restored, never restored into another model's
weights. This module is only I/O and validation (the engine's ``Session.save`` and
``Engine.restore_session`` call it): it streams the KV into the file in bounded pieces, writes
crash-safely (temporary file in the same directory, fsync, rename, fsync of the directory), and
checks everything on the way back (magic, format version, header checksum, total size, model
fingerprint, each piece's checksum).

File layout (integers little-endian)::

    MAGIC (16 bytes) | u32 format version | u32 header length | header JSON | u32 crc32(header JSON)
    piece * n:  u64 start | u64 end | payload | u32 crc32(start, end, payload)
                payload = for each layer: K then V, each (1, Hkv, end - start, D) in the dtype, C order
    FOOTER_MAGIC (16 bytes) | u64 total file length

Every piece but the last holds ``piece_tokens`` positions (in the header JSON), so the header
alone gives the file's exact length: a truncated file is refused before any KV is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch

from tierkv.version import __version__
from tierkv.config import ModelConfig
from tierkv.errors import TierkvError
from tierkv.io.checkpoint import Checkpoint, resolve_dtype, safetensors_header
from tierkv.io.store import MANIFEST_FILE, is_store_dir
from tierkv.quantspec import WeightQuant
from tierkv.io.store import fsync_dir

FORMAT_VERSION = 1
MAGIC = b"TIERKV-SESSION\r\n"            # \r\n: a file mangled by a text-mode copy fails the magic
FOOTER_MAGIC = b"TIERKV-SESS-END\n"
PIECE_BYTES = 8 << 20                    # KV bytes per piece (all layers): bounds write and read memory
SUFFIX = ".tkvs"
_PREFIX = struct.Struct("<II")           # format version, header length
_CRC = struct.Struct("<I")
_PIECE_HEAD = struct.Struct("<QQ")       # start, end (positions)
_FOOTER = struct.Struct("<Q")            # total file length
_MAX_HEADER_BYTES = 1 << 30
_SAMPLE_BYTES = 64                       # fingerprint: bytes read from the middle of each tensor
_FINGERPRINT_VERSION = 1
_DTYPES = ("float32", "float16", "bfloat16")

# read_kv(layer, start, end) -> (k, v), each (1, Hkv, end - start, D) in the session's dtype, any device
ReadKV = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]


class SessionError(TierkvError):
    """A session file cannot be restored (not one, damaged, truncated, newer, another model's); the
    message says what happened and what to do."""


def dtype_name(dtype: str | torch.dtype) -> str:
    """``torch.bfloat16`` / ``"bf16"`` / ``"bfloat16"`` -> ``"bfloat16"``."""
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def model_fingerprint(model_dir: str | Path, config: ModelConfig, dtype: str | torch.dtype,
                      quant: WeightQuant | None = None) -> str:
    """Identity of (model, compute dtype, weight quantization) for sessions: 16 hex characters.

    A converted weight store opened as the model (``tierkv run OUT``) is identified by its
    manifest instead (it records every extent's checksums and the checkpoint's config).

    A hash over the config (canonical JSON), the compute dtype and, for each safetensors file of the
    checkpoint (``Checkpoint.files()``), its name, its size, its header as stored (every tensor's
    name, dtype, shape and offsets) and the 64 bytes in the middle of each tensor. The headers
    alone cannot tell two fine-tunes of one base apart (same names, shapes and sizes), and a
    session's KV restored into other weights would continue the conversation with garbage; the
    samples cost one small read per tensor (no tensor is read whole). Unlike the store key, file
    mtimes are not part of it: a model copied elsewhere restores its sessions.
    """
    digest = hashlib.sha256()
    facts = {"version": _FINGERPRINT_VERSION, "dtype": dtype_name(dtype),
             "config": dataclasses.asdict(config)}
    if quant is not None:       # 16-bit sessions keep the fingerprint they always had
        facts["weight_quant"] = quant.to_json()
    digest.update(json.dumps(facts, sort_keys=True).encode())
    if is_store_dir(model_dir):
        digest.update((Path(model_dir) / MANIFEST_FILE).read_bytes())
        return digest.hexdigest()[:16]
    with Checkpoint(model_dir) as ckpt:
        files = ckpt.files()
    for path in files:
        raw = safetensors_header(path)
        digest.update(json.dumps([path.name, path.stat().st_size, len(raw)]).encode())
        digest.update(raw)
        digest.update(_tensor_samples(path, 8 + len(raw), json.loads(raw)))
    return digest.hexdigest()[:16]


def _tensor_samples(path: Path, data_start: int, header: dict[str, Any]) -> bytes:
    """Up to _SAMPLE_BYTES from the middle of each tensor of one safetensors file, in name order."""
    parts = []
    with open(path, "rb", buffering=0) as f:
        for name in sorted(n for n in header if n != "__metadata__"):
            begin, end = (int(x) for x in header[name]["data_offsets"])
            take = min(_SAMPLE_BYTES, end - begin)
            parts.append(os.pread(f.fileno(), take, data_start + begin + (end - begin - take) // 2))
    return b"".join(parts)


@dataclass(frozen=True)
class SessionHeader:
    """What a session file says about itself. ``token_ids`` is the whole history (prompts and
    replies); ``kv_tokens`` how many of its positions the file holds KV for (usually
    ``len(token_ids) - 1``: the last reply token has not been through the model yet). ``geometry``
    is the KV cache's own JSON-able description, stored and returned as is."""

    fingerprint: str                     # model_fingerprint() of the model and dtype that made it
    model: str                           # for people: the model directory's name
    dtype: str                           # compute dtype name of the KV: "bfloat16", "float16", "float32"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    token_ids: tuple[int, ...]
    kv_tokens: int
    geometry: dict[str, Any] = field(default_factory=dict)
    created_unix_s: float = field(default_factory=time.time)
    tierkv_version: str = __version__
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_ids", tuple(self.token_ids))
        problem = _header_problem(dataclasses.asdict(self))
        assert problem is None, problem

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one position over all layers."""
        itemsize = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def _header_problem(fields: dict[str, Any]) -> str | None:
    """What is wrong with a header's fields (None: nothing); used on write (an assert) and read."""
    ints = ("num_layers", "num_kv_heads", "head_dim", "kv_tokens", "format_version")
    strs = ("fingerprint", "model", "dtype", "tierkv_version")
    if any(not isinstance(fields.get(k), int) or isinstance(fields.get(k), bool) for k in ints):
        return f"one of {', '.join(ints)} is not a whole number"
    if any(not isinstance(fields.get(k), str) for k in strs):
        return f"one of {', '.join(strs)} is not text"
    if not isinstance(fields.get("created_unix_s"), (int, float)) or not isinstance(fields.get("geometry"), dict):
        return "created_unix_s is not a number or geometry is not an object"
    ids = fields.get("token_ids")
    if not isinstance(ids, (list, tuple)) or any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids):
        return "token_ids is not a list of token ids"
    if fields["dtype"] not in _DTYPES:
        return f"dtype {fields['dtype']!r} is not one of {', '.join(_DTYPES)}"
    if min(fields["num_layers"], fields["num_kv_heads"], fields["head_dim"]) < 1:
        return "num_layers, num_kv_heads and head_dim must be >= 1"
    if not 0 <= fields["kv_tokens"] <= len(ids):
        return f"kv_tokens {fields['kv_tokens']} is not between 0 and the {len(ids)} tokens of the history"
    return None


def _piece_ranges(kv_tokens: int, piece_tokens: int) -> Iterator[tuple[int, int]]:
    for start in range(0, kv_tokens, piece_tokens):
        yield start, min(start + piece_tokens, kv_tokens)


def _file_bytes(prefix_bytes: int, header: SessionHeader, piece_tokens: int) -> int:
    """The exact length of a file with this prefix, header and piece size."""
    pieces = -(-header.kv_tokens // piece_tokens)
    overhead = pieces * (_PIECE_HEAD.size + _CRC.size)
    return prefix_bytes + overhead + header.kv_tokens * header.kv_bytes_per_token + len(FOOTER_MAGIC) + _FOOTER.size


def _encode_prefix(header: SessionHeader, piece_tokens: int) -> bytes:
    fields = dataclasses.asdict(header)
    text = json.dumps({"session": {**fields, "token_ids": list(header.token_ids)},
                       "layout": {"piece_tokens": piece_tokens}}, sort_keys=True).encode()
    return MAGIC + _PREFIX.pack(FORMAT_VERSION, len(text)) + text + _CRC.pack(zlib.crc32(text))


# ---------------------------------------------------------------------------------------------
# writing


def write_session(path: str | Path, header: SessionHeader, read_kv: ReadKV,
                  piece_bytes: int = PIECE_BYTES) -> Path:
    """Write a session file at ``path`` (parent directories created), streaming the KV of positions
    ``[0, header.kv_tokens)`` through ``read_kv(layer, start, end)`` one piece at a time (about
    ``piece_bytes`` of KV over all layers; at least one position). Crash-safe: the file is written
    under a temporary name in the same directory, fsynced, renamed over ``path`` and the directory
    fsynced; if anything fails (``read_kv`` raising, a full disk) the previous file at ``path`` is
    untouched and the temporary file removed. Returns ``path``."""
    assert header.format_version == FORMAT_VERSION, header.format_version
    assert piece_bytes >= 1, piece_bytes
    json.dumps(header.geometry)                        # geometry must be JSON-able: fail before writing
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    piece_tokens = max(1, piece_bytes // header.kv_bytes_per_token)
    prefix = _encode_prefix(header, piece_tokens)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")   # writers never share one
    renamed = False
    try:
        with open(tmp, "wb") as f:
            f.write(prefix)
            for start, end in _piece_ranges(header.kv_tokens, piece_tokens):
                _write_piece(f, header, read_kv, start, end)
            total = _file_bytes(len(prefix), header, piece_tokens)
            assert f.tell() + len(FOOTER_MAGIC) + _FOOTER.size == total, (f.tell(), total)
            f.write(FOOTER_MAGIC + _FOOTER.pack(total))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        renamed = True
    finally:
        if not renamed:
            tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def _write_piece(f: BinaryIO, header: SessionHeader, read_kv: ReadKV, start: int, end: int) -> None:
    """One piece: every layer's K and V of positions [start, end), then the piece's checksum."""
    head = _PIECE_HEAD.pack(start, end)
    f.write(head)
    crc = zlib.crc32(head)
    want = (1, header.num_kv_heads, end - start, header.head_dim)
    dtype = getattr(torch, header.dtype)
    for layer in range(header.num_layers):
        for t in read_kv(layer, start, end):                                  # k, v: (1, Hkv, n, D)
            assert tuple(t.shape) == want and t.dtype == dtype, (layer, start, end, tuple(t.shape), t.dtype)
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()   # (nbytes,) view
            f.write(data)
            crc = zlib.crc32(data, crc)
    f.write(_CRC.pack(crc))


# ---------------------------------------------------------------------------------------------
# reading

_START_OVER = "start a new session"


class SessionReader:
    """A session file opened and validated (magic, version, header, exact length, footer, and the
    model when ``expect_fingerprint`` is given); ``pieces()`` streams its KV back.

    ``expect_model`` and ``expect_dtype`` name the engine's model and dtype in the message when the
    fingerprint differs. Use as a context manager (or call ``close``)."""

    def __init__(self, path: str | Path, expect_fingerprint: str | None = None, *,
                 expect_model: str | None = None, expect_dtype: str | torch.dtype | None = None) -> None:
        self.path = Path(path)
        try:
            self._f: BinaryIO = open(self.path, "rb")
        except FileNotFoundError:
            raise SessionError(f"no session file at {self.path}; give the path Session.save returned") from None
        valid = False
        try:
            self.nbytes = os.fstat(self._f.fileno()).st_size
            self.header, self.piece_tokens, self._data_start = self._read_prefix()
            self._check_length_and_footer()
            if expect_fingerprint is not None and expect_fingerprint != self.header.fingerprint:
                raise SessionError(self._mismatch(expect_fingerprint, expect_model, expect_dtype))
            valid = True
        finally:
            if not valid:
                self._f.close()

    # -- validation ------------------------------------------------------------------------
    def _read_prefix(self) -> tuple[SessionHeader, int, int]:
        head = self._f.read(len(MAGIC) + _PREFIX.size)
        if not head:
            raise SessionError(f"{self.path} is empty, not a tierkv session file; {_START_OVER}")
        marker = head[:len(MAGIC)]
        if marker != MAGIC[:len(marker)]:
            raise SessionError(f"{self.path} is not a tierkv session file (it does not start with tierkv's "
                               f"session marker); give the path of a file saved by Session.save")
        if len(head) < len(MAGIC) + _PREFIX.size:
            raise self._truncated(len(MAGIC) + _PREFIX.size, at_least=True)
        version, length = _PREFIX.unpack(head[len(MAGIC):])
        if version > FORMAT_VERSION:
            raise SessionError(f"{self.path} was written by a newer tierkv (session format version {version}; "
                               f"this tierkv {__version__} reads version {FORMAT_VERSION}): "
                               f"upgrade tierkv to restore it, or {_START_OVER}")
        if version < 1 or length > _MAX_HEADER_BYTES:
            raise self._damaged(f"its format version {version} or header length {length} is impossible")
        end = len(head) + length + _CRC.size
        if self.nbytes < end:
            raise self._truncated(end, at_least=True)
        text = self._f.read(length)
        (crc,) = _CRC.unpack(self._f.read(_CRC.size))
        if zlib.crc32(text) != crc:
            raise self._damaged("its header fails its checksum")
        return (*self._decode_header(text), end)

    def _decode_header(self, text: bytes) -> tuple[SessionHeader, int]:
        try:
            raw = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._damaged("its header is not JSON") from None
        fields = raw.get("session") if isinstance(raw, dict) else None
        layout = raw.get("layout") if isinstance(raw, dict) else None
        names = {f.name for f in dataclasses.fields(SessionHeader)}
        if not isinstance(fields, dict) or set(fields) != names or not isinstance(layout, dict):
            raise self._damaged("its header does not hold the fields of a session")
        piece_tokens = layout.get("piece_tokens")
        problem = _header_problem(fields)
        if problem is None and (not isinstance(piece_tokens, int) or piece_tokens < 1):
            problem = f"piece_tokens {piece_tokens!r} is not a whole number >= 1"
        if problem is not None:
            raise self._damaged(f"its header is inconsistent ({problem})")
        return SessionHeader(**fields), piece_tokens

    def _check_length_and_footer(self) -> None:
        total = _file_bytes(self._data_start, self.header, self.piece_tokens)
        if self.nbytes < total:
            raise self._truncated(total)
        if self.nbytes > total:
            raise self._damaged(f"it has {self.nbytes} bytes but its header accounts for {total}")
        tail = os.pread(self._f.fileno(), len(FOOTER_MAGIC) + _FOOTER.size, total - len(FOOTER_MAGIC) - _FOOTER.size)
        if tail[:len(FOOTER_MAGIC)] != FOOTER_MAGIC or _FOOTER.unpack(tail[len(FOOTER_MAGIC):])[0] != total:
            raise self._damaged("its footer is damaged")

    def _mismatch(self, fingerprint: str, model: str | None, dtype: str | torch.dtype | None) -> str:
        h = self.header
        engine = model or "another model"
        engine += f" ({dtype_name(dtype)}, fingerprint {fingerprint})" if dtype is not None \
            else f" (fingerprint {fingerprint})"
        return (f"{self.path} was saved with model {h.model} ({h.dtype}, fingerprint {h.fingerprint}), "
                f"this engine runs {engine}; load {h.model} with dtype {h.dtype} to restore it, or {_START_OVER}")

    def _truncated(self, expected: int, at_least: bool = False) -> SessionError:
        of = f"at least {expected}" if at_least else str(expected)
        return SessionError(f"{self.path} is truncated ({self.nbytes} of {of} bytes): the save was interrupted; "
                            f"{_START_OVER}")

    def _damaged(self, what: str) -> SessionError:
        return SessionError(f"{self.path} is damaged: {what}; {_START_OVER} (or restore the file from a backup)")

    # -- reading ---------------------------------------------------------------------------
    def pieces(self) -> Iterator[tuple[int, int, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """The KV, one piece at a time: ``(start, end, [(k, v) for each layer])`` with k, v
        ``(1, Hkv, end - start, D)`` CPU tensors in the header's dtype, fresh for each piece (the
        caller may keep them). A restoring caller appends every layer's (k, v) of a piece, then
        advances the cache by ``end - start``. Each piece's checksum is verified before it is
        yielded (SessionError otherwise); memory: one piece (about PIECE_BYTES)."""
        h = self.header
        dtype = getattr(torch, h.dtype)
        per_tensor = h.kv_bytes_per_token // (2 * h.num_layers)          # one layer's K (or V) of one position
        offset = self._data_start
        for start, end in _piece_ranges(h.kv_tokens, self.piece_tokens):
            n = end - start
            buf = bytearray(_PIECE_HEAD.size + n * h.kv_bytes_per_token + _CRC.size)
            got = os.preadv(self._f.fileno(), [buf], offset)
            if got != len(buf):                       # the file shrank after it was validated
                raise self._truncated(offset + len(buf))
            body = memoryview(buf)[:-_CRC.size]
            if _PIECE_HEAD.unpack_from(buf) != (start, end) or zlib.crc32(body) != _CRC.unpack_from(buf, len(body))[0]:
                raise self._damaged(f"the KV of positions {start}..{end} fails its checksum")
            flat = torch.frombuffer(buf, dtype=torch.uint8)[_PIECE_HEAD.size:len(body)]      # (payload bytes,)
            shape = (1, h.num_kv_heads, n, h.head_dim)
            tensors = [flat[i * n * per_tensor:(i + 1) * n * per_tensor].view(dtype).view(shape)
                       for i in range(2 * h.num_layers)]
            yield start, end, [(tensors[2 * j], tensors[2 * j + 1]) for j in range(h.num_layers)]
            offset += len(buf)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "SessionReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_session_path(offload_dir: str | Path, session_id: str) -> Path:
    """Where ``Session.save()`` puts a session by default: ``<offload_dir>/sessions/<id>.tkvs``."""
    return Path(offload_dir) / "sessions" / f"{session_id}{SUFFIX}"


def read_header(path: str | Path) -> SessionHeader:
    """A session file's header, after the same checks as ``SessionReader`` (no model check)."""
    with SessionReader(path) as reader:
        return reader.header


__all__ = ["FORMAT_VERSION", "PIECE_BYTES", "SUFFIX", "ReadKV", "SessionError", "SessionHeader", "SessionReader",
           "default_session_path", "dtype_name", "model_fingerprint", "read_header", "write_session"]
