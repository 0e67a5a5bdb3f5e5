"""On-disk KV chunk segments: the disk tier of the chunked KV cache.

Why this module exists: a long context does not fit in device and host memory, so the tiered KV
cache (``pipeline.kv``) spills closed KV chunks to the offload directory and reads the ones a
decode step needs back. That path must be fast (one read per chunk, aligned records), safe (a
crash, a full disk or a flipped bit must never hand wrong keys to attention) and free of model
math, so it lives here, below the pipeline, and knows chunks only as (layer, chunk, seq) ids.

Layout: one append-only segment file per layer (``layer0003.kvseg``). A record is

    prefix (16 B: magic, version, header length, header crc32)
    header (JSON: layer, chunk, seq, token range, dtype, shapes, payload offset/size, payload crc32)
    payload at a 64-byte aligned offset: K (Hkv, n, D), V (Hkv, n, D), kmin (Hkv, D), kmax (Hkv, D);
      or, for a chunk kept quantized (header ``kv_quant`` int8/int4), its packed K/V bytes (opaque
      here: ``kernels.kvquant`` owns the layout) zero-padded to 8 bytes, then kmin, kmax
    zero padding up to a multiple of 4 KiB, so every record starts 4 KiB aligned.

Closed chunks never change, so a chunk is written once and read many times; records are never
rewritten in place. Crash safety: ``append`` writes a batch of records past the end of their
segments, fsyncs, and only then adds them to the in-memory index. Reopening a directory rebuilds
the index by walking the record headers; a torn last record (a crash mid-append) is dropped and
truncated away, while a bad header followed by valid records is reported as corruption. The
payload checksum is verified on every read, so a corrupted segment is named when it is used.

A full disk (``ENOSPC``/``EDQUOT``) or the store's byte budget raises ``KVStoreError`` telling the
user what to do; the failed batch is truncated away, so the store (and the cache that asked, which
keeps the chunk where it was) stays consistent.

An open store holds an exclusive lock on ``.owner.lock`` in its directory. A process killed while
it generated leaves its directory behind; ``remove_abandoned`` (called by the tiered cache before
it makes a new store) deletes the ``kv-*`` directories whose lock no process holds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from tierkv.errors import TierkvError
from tierkv.io.buffers import ALIGN_BYTES, round_up

__all__ = ["KVChunk", "KVStore", "PackedKV", "KVStoreError", "ChunkId", "RECORD_ALIGN_BYTES", "remove_abandoned"]

MAGIC = b"TKVC"
FORMAT_VERSION = 1
RECORD_ALIGN_BYTES = ALIGN_BYTES
PAYLOAD_ALIGN_BYTES = 64
_PREFIX = struct.Struct("<4sHHII")  # magic, version, reserved, header length, header crc32 (16 bytes)
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
OWNER_LOCK = ".owner.lock"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                               torch.uint8)}

ChunkId = tuple[int, int, int]  # (layer, chunk, seq); pipeline.kv.table.ChunkKey is one of these


class KVStoreError(TierkvError, RuntimeError):
    """The KV offload directory is full, unwritable or corrupt; the message names it and the fix."""


@dataclass(frozen=True, eq=False)
class PackedKV:
    """A chunk's K and V as quantized bytes: opaque to the store, which records the scheme and shape."""

    scheme: str                     # "int8" | "int4" (tierkv.quantspec.KV_SCHEMES)
    shape: tuple[int, int, int]     # (Hkv, T, D): the rows the packed layout has room for
    tokens: int                     # n <= T rows that hold tokens
    data: torch.Tensor              # (P,) uint8


@dataclass(frozen=True, eq=False)
class KVChunk:
    """One KV chunk of one sequence and layer, as written to and read from a segment.

    k, v: (Hkv, n, D) post-RoPE keys and values of tokens [start_token, start_token + n); None when
    ``packed`` holds them quantized instead. kmin, kmax: (Hkv, D) the chunk's abstract (exact).
    """

    layer: int
    chunk: int
    seq: int
    start_token: int
    k: torch.Tensor | None
    v: torch.Tensor | None
    kmin: torch.Tensor
    kmax: torch.Tensor
    packed: PackedKV | None = None

    @property
    def key(self) -> ChunkId:
        return (self.layer, self.chunk, self.seq)

    @property
    def n_tokens(self) -> int:
        return self.packed.tokens if self.packed is not None else int(self.k.shape[1])   # type: ignore[union-attr]


@dataclass(frozen=True)
class _Entry:
    """Where one record lives: its segment's layer, byte offset and padded size, and its header."""

    layer: int
    offset: int
    record_bytes: int
    header: dict[str, Any]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _encode(chunk: KVChunk) -> bytes:
    """One complete record (prefix, header, payload, padding) for ``chunk``."""
    header = _kv_header(chunk)
    kv = (chunk.k, chunk.v) if chunk.packed is None else \
        (chunk.packed.data, torch.zeros(_packed_span(chunk.packed.data.numel()) - chunk.packed.data.numel(),
                                        dtype=torch.uint8))      # the abstracts after it stay aligned
    payload = b"".join(_tensor_bytes(t) for t in (*kv, chunk.kmin, chunk.kmax))   # type: ignore[arg-type]
    header.update({
        "layer": chunk.layer, "chunk": chunk.chunk, "seq": chunk.seq,
        "start_token": chunk.start_token, "end_token": chunk.start_token + chunk.n_tokens,
        "dtype": str(chunk.kmin.dtype), "abstract_shape": list(chunk.kmin.shape),
        "payload_bytes": len(payload), "crc32": zlib.crc32(payload), "payload_offset": 0,
    })
    slack = 24  # room for the digits of the real payload offset
    header["payload_offset"] = round_up(_PREFIX.size + len(json.dumps(header)) + slack, PAYLOAD_ALIGN_BYTES)
    text = json.dumps(header).encode()
    assert _PREFIX.size + len(text) <= header["payload_offset"] <= RECORD_ALIGN_BYTES
    record = bytearray(_record_bytes(header))
    record[:_PREFIX.size] = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(text), zlib.crc32(text))
    record[_PREFIX.size:_PREFIX.size + len(text)] = text
    record[header["payload_offset"]:header["payload_offset"] + len(payload)] = payload
    return bytes(record)


def _kv_header(chunk: KVChunk) -> dict[str, Any]:
    """The header fields that describe the chunk's K/V (checked against its abstract's shape and dtype)."""
    p, k, v = chunk.packed, chunk.k, chunk.v
    if p is not None:
        assert k is None and v is None and p.data.dtype == torch.uint8 and p.data.dim() == 1, chunk.key
        assert 0 < p.tokens <= p.shape[1] and chunk.kmin.shape == (p.shape[0], p.shape[2]), (chunk.key, p.shape)
        return {"kv_quant": p.scheme, "kv_shape": list(p.shape), "kv_tokens": p.tokens,
                "packed_bytes": p.data.numel()}
    assert k is not None and v is not None
    assert k.dim() == 3 and v.shape == k.shape and chunk.kmin.shape == (k.shape[0], k.shape[2]), (
        f"chunk {chunk.key}: k/v must be (Hkv, n, D) and kmin/kmax (Hkv, D)")
    assert k.dtype == v.dtype == chunk.kmin.dtype == chunk.kmax.dtype, f"chunk {chunk.key}: mixed dtypes"
    return {"kv_shape": list(k.shape)}


def _packed_span(nbytes: int) -> int:
    """Payload bytes a packed K/V of ``nbytes`` takes: padded so the abstracts after it are aligned."""
    return -(-nbytes // 8) * 8


def _record_bytes(header: dict[str, Any]) -> int:
    return round_up(header["payload_offset"] + header["payload_bytes"], RECORD_ALIGN_BYTES)


def _parse_header(raw: bytes) -> dict[str, Any] | None:
    """The header of a record starting at ``raw`` (at least prefix + header bytes), or None if invalid."""
    if len(raw) < _PREFIX.size:
        return None
    magic, version, _, length, crc = _PREFIX.unpack_from(raw)
    text = raw[_PREFIX.size:_PREFIX.size + length]
    if magic != MAGIC or version != FORMAT_VERSION or len(text) != length or zlib.crc32(text) != crc:
        return None
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return header if isinstance(header, dict) else None


def _decode(entry: _Entry, buf: bytearray) -> KVChunk:
    """Tensors viewing ``buf`` (one whole record, checksum already verified)."""
    h = entry.header
    dtype = _DTYPES[h["dtype"]]
    kv_shape, ab_shape = tuple(h["kv_shape"]), tuple(h["abstract_shape"])
    data = torch.frombuffer(buf, dtype=torch.uint8)
    elt = torch.empty((), dtype=dtype).element_size()
    ab_bytes = elt * ab_shape[0] * ab_shape[1]
    scheme = h.get("kv_quant", "none")
    kv_bytes = elt * kv_shape[0] * kv_shape[1] * kv_shape[2]
    kv_sizes = [_packed_span(h["packed_bytes"])] if scheme != "none" else [kv_bytes, kv_bytes]
    offsets = [h["payload_offset"]]
    for size in (*kv_sizes, ab_bytes, ab_bytes):
        offsets.append(offsets[-1] + size)
    views = [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    kmin, kmax = views[-2].view(dtype).view(ab_shape), views[-1].view(dtype).view(ab_shape)
    if scheme != "none":
        data = views[0][:h["packed_bytes"]]
        packed = PackedKV(scheme, kv_shape, int(h["kv_tokens"]), data)   # type: ignore[arg-type]
        return KVChunk(h["layer"], h["chunk"], h["seq"], h["start_token"], None, None, kmin, kmax, packed)
    return KVChunk(h["layer"], h["chunk"], h["seq"], h["start_token"],
                   views[0].view(dtype).view(kv_shape), views[1].view(dtype).view(kv_shape), kmin, kmax)


class KVStore:
    """Append-only KV chunk segments under ``root``, one per layer, with an in-memory index.

    budget_bytes: most bytes the segments may use (None = as much as the disk has).
    durable: fsync every appended batch before indexing it (crash-safe); tests may turn it off.
    Thread-safe: one writer thread and reader threads may use the store together.
    """

    def __init__(self, root: str | Path, *, budget_bytes: int | None = None, durable: bool = True) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KVStoreError(f"cannot create the KV offload dir {self.root} ({exc.strerror}); "
                               "choose another with --offload-dir or fix its permissions") from None
        self._owner_fd = _take_owner_lock(self.root)
        self.budget_bytes = budget_bytes
        self.durable = durable
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}
        self._sizes: dict[int, int] = {}          # layer -> valid bytes in its segment
        self._index: dict[ChunkId, _Entry] = {}
        self._closed = False
        try:
            for path in sorted(self.root.glob("layer*.kvseg")):
                self._recover(int(path.stem.removeprefix("layer")))
        except BaseException:
            self.close()
            raise

    # -- paths and files ---------------------------------------------------------------------

    def segment_path(self, layer: int) -> Path:
        return self.root / f"layer{layer:04d}.kvseg"

    def _fd(self, layer: int) -> int:
        fd = self._fds.get(layer)
        if fd is None:
            path = self.segment_path(layer)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise KVStoreError(f"cannot open KV segment {path} ({exc.strerror}); "
                                   "check the offload dir's permissions and free space") from None
            self._fds[layer] = fd
            self._sizes.setdefault(layer, os.fstat(fd).st_size)
        return fd

    def _recover(self, layer: int) -> None:
        """Index an existing segment; drop (truncate) a torn last record, refuse a corrupt middle."""
        fd, path = self._fd(layer), self.segment_path(layer)
        size, offset = os.fstat(fd).st_size, 0
        while offset < size:
            raw = os.pread(fd, RECORD_ALIGN_BYTES, offset)
            header = _parse_header(raw)
            if header is None or offset + _record_bytes(header) > size:
                if self._magic_after(fd, offset + RECORD_ALIGN_BYTES, size):
                    raise KVStoreError(f"KV segment {path} is corrupt at offset {offset} (bad record header "
                                       "followed by more records); delete the offload dir's KV files and rerun")
                break  # a torn last record: a crash during its append
            key = (header["layer"], header["chunk"], header["seq"])
            self._index[key] = _Entry(layer, offset, _record_bytes(header), header)
            offset += _record_bytes(header)
        if offset < size:
            os.ftruncate(fd, offset)
        self._sizes[layer] = offset

    @staticmethod
    def _magic_after(fd: int, start: int, size: int) -> bool:
        for off in range(start, size, RECORD_ALIGN_BYTES):
            if os.pread(fd, len(MAGIC), off) == MAGIC:
                return True
        return False

    # -- queries -----------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[ChunkId]:
        with self._lock:
            return list(self._index)

    @property
    def used_bytes(self) -> int:
        """Bytes of valid records in all segments."""
        return sum(self._sizes.values())

    def _full_error(self, extra: str = "") -> KVStoreError:
        mib = self.used_bytes / 2**20
        budget = "" if self.budget_bytes is None else f" (its KV budget is {self.budget_bytes / 2**20:.1f} MiB)"
        return KVStoreError(f"offload dir {self.root} full after {mib:.1f} MiB of KV{budget}{extra}; "
                            "free space or lower the context (or give --offload-dir a larger disk)")

    # -- writing -----------------------------------------------------------------------------

    def append(self, chunks: Sequence[KVChunk]) -> None:
        """Write a batch of chunks durably, then index them; all or nothing.

        Raises KVStoreError when the budget or the disk is full (or the write fails); the segments
        are then truncated back, so nothing of the batch is visible and earlier records are intact.
        """
        records = [(c.layer, c.key, _encode(c)) for c in chunks]
        with self._lock:
            assert not self._closed, "KVStore used after close()"
            need = sum(len(r) for _, _, r in records)
            if self.budget_bytes is not None and self.used_bytes + need > self.budget_bytes:
                raise self._full_error()
            old_sizes = {layer: self._sizes.get(layer, 0) for layer, _, _ in records}
            for layer in old_sizes:
                self._fd(layer)
            try:
                placed = self._write_records(records)
            except OSError as exc:
                self._truncate(old_sizes)
                if exc.errno in _FULL_ERRNOS:
                    raise self._full_error() from None
                raise KVStoreError(f"writing KV chunks to {self.root} failed ({exc.strerror or exc}); "
                                   "check the offload dir's disk") from None
            for key, entry in placed:
                self._index[key] = entry

    def _write_records(self, records: list[tuple[int, ChunkId, bytes]]) -> list[tuple[ChunkId, _Entry]]:
        """pwrite each record at its segment's end, then fsync every touched segment."""
        placed = []
        for layer, key, record in records:
            fd, offset = self._fds[layer], self._sizes[layer]
            view = memoryview(record)
            while view:
                written = os.pwrite(fd, view, offset + len(record) - len(view))
                view = view[written:]
            self._sizes[layer] = offset + len(record)
            placed.append((key, _Entry(layer, offset, len(record), _parse_header(record) or {})))
        if self.durable:
            for layer in {layer for layer, _, _ in records}:
                os.fsync(self._fds[layer])
        return placed

    def _truncate(self, sizes: dict[int, int]) -> None:
        """Cut segments back to ``sizes`` after a failed batch (freeing space never fails for lack of it)."""
        for layer, size in sizes.items():
            self._sizes[layer] = size
            os.ftruncate(self._fds[layer], size)

    # -- reading -----------------------------------------------------------------------------

    def read(self, keys: Iterable[ChunkId]) -> list[KVChunk]:
        """Read chunks back (in the order of ``keys``), checksums verified.

        Raises KeyError for a chunk that was never written and KVStoreError naming the segment and
        offset of a record whose checksum does not match.
        """
        keys = [tuple(k) for k in keys]
        with self._lock:
            assert not self._closed, "KVStore used after close()"
            missing = [k for k in keys if k not in self._index]
            if missing:
                raise KeyError(f"KV chunk (layer, chunk, seq) {missing[0]} is not in {self.root}")
            entries = [self._index[k] for k in keys]
            fds = [self._fds[e.layer] for e in entries]
        order = sorted(range(len(keys)), key=lambda i: (entries[i].layer, entries[i].offset))
        out: list[KVChunk | None] = [None] * len(keys)
        for i in order:
            out[i] = self._read_one(fds[i], entries[i])
        return out  # type: ignore[return-value]

    def _read_one(self, fd: int, entry: _Entry) -> KVChunk:
        buf = bytearray(entry.record_bytes)
        got = os.preadv(fd, [buf], entry.offset)
        h = entry.header
        payload = memoryview(buf)[h["payload_offset"]:h["payload_offset"] + h["payload_bytes"]]
        crc = zlib.crc32(payload)
        if got != entry.record_bytes or crc != h["crc32"]:
            raise KVStoreError(
                f"KV chunk (layer {h['layer']}, chunk {h['chunk']}, seq {h['seq']}) in segment "
                f"{self.segment_path(entry.layer)} at offset {entry.offset} failed its checksum "
                f"(stored {h['crc32']:#010x}, read {crc:#010x}, {got} of {entry.record_bytes} bytes); "
                "the offload dir is corrupt: delete its KV files and rerun")
        return _decode(entry, buf)

    # -- lifetime ----------------------------------------------------------------------------

    def close(self, delete: bool = False) -> None:
        """Close the segment files; with ``delete``, remove them and the store directory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            os.close(self._owner_fd)
        if delete:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _take_owner_lock(root: Path) -> int:
    """Lock ``root`` for this store: created under a temporary name, locked, then renamed into place,
    so ``remove_abandoned`` never sees an owner lock that is not yet held."""
    path = root / OWNER_LOCK
    try:
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
        else:
            tmp = root / f"{OWNER_LOCK}.{os.getpid()}.{threading.get_ident()}.tmp"
            fd = os.open(tmp, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        raise KVStoreError(f"cannot create files in the KV offload dir {root} ({exc.strerror}); "
                           "choose another with --offload-dir or fix its permissions") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise KVStoreError(f"the KV offload dir {root} is in use by another process; "
                           "give each process its own directory") from None
    if not path.exists():
        os.replace(tmp, path)
    return fd


def remove_abandoned(parent: str | Path) -> list[Path]:
    """Delete the ``kv-*`` store directories under ``parent`` that no live process owns (their owner was
    killed before it could clean up); returns them. Directories without an owner lock are left alone."""
    removed = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for d in sorted(parent.glob("kv-*")):
        try:
            fd = os.open(d / OWNER_LOCK, os.O_RDONLY)
        except OSError:         # no owner lock: not a store this tierkv made, or already gone
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue            # a live process uses it
        try:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        finally:
            os.close(fd)
    return removed
