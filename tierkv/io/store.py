"""Packed weight store: every layer's tensors in one 4 KiB-aligned extent of one data file.

Why this module exists: streaming a layer from disk must be one large aligned read (O_DIRECT,
several requests in flight), not a few dozen small reads scattered over safetensors shards in
whatever order and dtype the checkpoint was saved. ``convert`` rewrites a Hugging Face checkpoint
once, tensor by tensor (memory bounded by about one tensor), into::

    OUT/weights.bin     extents: embed, layer.0 .. layer.{L-1}, norm, head (absent when tied)
    OUT/manifest.json   format/version, dtype, the checkpoint's config.json, and per extent its
                        offset, size, padded size, CRC-32 per 4 MiB block and tensor table

The manifest is written last (temporary file, fsync, rename), so an interrupted conversion never
leaves a store that opens; a small state file lets the next run resume after the last extent that
reached the disk. Checksums are per block so the reader threads verify blocks in parallel as they
land (zlib.crc32 runs at about 4 GB/s per core here, above the disk's 1.5-1.9 GB/s).

Repair: a checksum mismatch found while streaming is recorded in ``damaged.json`` beside the
manifest, so the store no longer opens until it is repaired; ``convert`` on an existing store
re-verifies every extent and re-converts only the bad ones (everything when the manifest is
unusable), and ``cached_store`` does the same on its own. A store records the checkpoint it came
from; ``convert`` refuses to overwrite another checkpoint's store unless told to restart. Readers
hold a shared lock on the store while it is open, so a stale store (its checkpoint changed) is
removed only when no process uses it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import threading
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tierkv.config import ConfigError, ModelConfig, format_size, read_json
from tierkv.errors import TierkvError
from tierkv.io.buffers import ALIGN_BYTES, aligned_host_tensor, round_up
from tierkv.io.checkpoint import LAYER_PREFIX, Checkpoint, resolve_dtype
from tierkv.io.reader import DEFAULT_REQUEST_BYTES, AlignedReader, ReadRecord

FORMAT_NAME = "tierkv-weight-store"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DATA_FILE = "weights.bin"
PARTIAL_SUFFIX = ".partial"
STATE_FILE = "convert-state.json"
LOCK_FILE = ".convert.lock"
USE_LOCK_FILE = ".in-use.lock"   # readers hold it shared; removing a stale store needs it exclusive
DAMAGE_FILE = "damaged.json"     # extents found corrupt while streaming: the store needs a repair
CRC_BLOCK_BYTES = 4 << 20       # one CRC-32 per block; the reader's request size is a multiple of it
TENSOR_ALIGN_BYTES = 64         # tensors inside an extent start on 64-byte boundaries
FREE_SPACE_MARGIN_BYTES = 4 << 20      # the manifest, the resume state and filesystem metadata
_GLOBAL_EXTENTS = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight"}

# progress(done_bytes, total_bytes); may raise to abort (the conversion stays resumable)
ProgressFn = Callable[[int, int], None]
# report(line): one line per repair or rebuild convert makes ("layer 1 failed its checksum: re-converted")
ReportFn = Callable[[str], None]
_log = logging.getLogger(__name__)


class StoreError(TierkvError):
    """A weight store is missing, incomplete, corrupt or cannot be written; the message says what to do."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside its extent."""

    dtype: str                  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int                 # bytes from the start of the extent (multiple of 64)
    nbytes: int


@dataclass(frozen=True)
class Extent:
    """One contiguous, 4 KiB-aligned byte range of the data file holding a group of tensors."""

    name: str                   # "layer.{j}", "embed", "norm" or "head"
    offset: int                 # bytes from the start of the data file (multiple of 4096)
    nbytes: int                 # meaningful bytes (the checksummed range)
    padded_nbytes: int          # nbytes rounded up to 4096: what one O_DIRECT read covers
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    crc32: tuple[int, ...] = ()  # CRC-32 of each CRC_BLOCK_BYTES block of [0, nbytes)
    scheme: str = "plain"       # compression scheme of the tensors (later: "int8-group", "int4-group")

    def describe(self) -> str:
        """Human name for messages: "layer 3", "the embedding", ..."""
        if self.name.startswith("layer."):
            return f"layer {self.name.split('.', 1)[1]}"
        return {"embed": "the embedding", "norm": "the final norm", "head": "the LM head"}.get(self.name, self.name)


def layer_extent_name(j: int) -> str:
    return f"layer.{j}"


def tensors_from_buffer(extent: Extent, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero-copy typed views of an extent's tensors inside ``buffer`` (uint8, >= extent.nbytes).

    Layer tensors are keyed like ``self_attn.q_proj.weight``; globals by their full HF name. The
    views alias ``buffer``: they are valid only while the buffer (slot) holding the extent is.
    """
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1, (buffer.dtype, buffer.shape)
    assert buffer.numel() >= extent.nbytes, f"{extent.name}: buffer {buffer.numel()} B < {extent.nbytes} B"
    out = {}
    for key, entry in extent.tensors.items():
        raw = buffer[entry.offset:entry.offset + entry.nbytes]
        out[key] = raw.view(getattr(torch, entry.dtype)).view(entry.shape)
    return out


def block_crcs(data: memoryview | bytes, block_bytes: int = CRC_BLOCK_BYTES) -> tuple[int, ...]:
    """CRC-32 of each ``block_bytes`` block of ``data`` (the last one may be short)."""
    view = memoryview(data).cast("B")
    return tuple(zlib.crc32(view[i:i + block_bytes]) for i in range(0, len(view), block_bytes))


# ---------------------------------------------------------------------------------------------
# layout


def plan_layout(config: ModelConfig, dtype: torch.dtype) -> list[Extent]:
    """Extents (without checksums) in file order: embed, layer.0 .. layer.{L-1}, norm, head."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    dtype_name = str(dtype).removeprefix("torch.")
    globals_ = config.global_tensor_shapes()
    embed = _GLOBAL_EXTENTS["embed"]
    groups: list[tuple[str, dict[str, tuple[int, ...]]]] = [("embed", {embed: globals_[embed]})]
    groups += [(layer_extent_name(j), config.layer_tensor_shapes()) for j in range(config.num_layers)]
    groups += [(name, {hf: globals_[hf]}) for name, hf in _GLOBAL_EXTENTS.items()
               if name != "embed" and hf in globals_]
    extents, offset = [], 0
    for name, shapes in groups:
        tensors, pos = {}, 0
        for key, shape in shapes.items():
            pos = round_up(pos, TENSOR_ALIGN_BYTES)
            nbytes = itemsize * _numel(shape)
            tensors[key] = TensorEntry(dtype_name, tuple(shape), pos, nbytes)
            pos += nbytes
        extents.append(Extent(name, offset, pos, round_up(pos), tensors))
        offset += round_up(pos)
    return extents


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _source_name(extent: Extent, key: str) -> str:
    """HF checkpoint name of tensor ``key`` of ``extent``."""
    if extent.name.startswith("layer."):
        return f"{LAYER_PREFIX}{extent.name.split('.', 1)[1]}.{key}"
    return key


# ---------------------------------------------------------------------------------------------
# manifest (de)serialisation


def _extent_to_json(e: Extent) -> dict[str, Any]:
    return {"offset": e.offset, "nbytes": e.nbytes, "padded_nbytes": e.padded_nbytes, "scheme": e.scheme,
            "crc32": list(e.crc32),
            "tensors": {k: {"dtype": t.dtype, "shape": list(t.shape), "offset": t.offset, "nbytes": t.nbytes}
                        for k, t in e.tensors.items()}}


def _extent_from_json(name: str, raw: dict[str, Any]) -> Extent:
    tensors = {k: TensorEntry(t["dtype"], tuple(t["shape"]), int(t["offset"]), int(t["nbytes"]))
               for k, t in raw["tensors"].items()}
    return Extent(name, int(raw["offset"]), int(raw["nbytes"]), int(raw["padded_nbytes"]), tensors,
                  tuple(int(c) for c in raw["crc32"]), str(raw.get("scheme", "plain")))


def _layout_digest(extents: list[Extent]) -> str:
    text = json.dumps([[e.name, _extent_to_json(e)["tensors"], e.offset] for e in extents], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``path`` so that a crash leaves either the old file or the complete new one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")   # writers never share one
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# the store


@dataclass(frozen=True, eq=False)
class WeightStore:
    """An opened, validated store. Open with ``WeightStore.open(dir)``.

    ``config`` is the model shape (its ``dtype`` is the store's dtype); ``extents`` maps
    ``layer.{j}``/``embed``/``norm``/``head`` to Extent. Reading goes through an AlignedReader on
    ``data_path`` with ``read_extent``, which verifies checksums on the reader threads.
    """

    dir: Path
    data_path: Path
    dtype: torch.dtype
    config: ModelConfig
    extents: dict[str, Extent]
    crc_block_bytes: int
    source_key: str
    source_dir: str = ""        # the checkpoint directory it was converted from ("" in old stores)

    @classmethod
    def open(cls, store_dir: str | Path) -> "WeightStore":
        """Open and check a complete store; StoreError names what is wrong and the command that fixes it.

        The opened store holds a shared lock on the directory until it is garbage-collected or
        ``close()``d, so no other process removes it as stale meanwhile.
        """
        store_dir = Path(store_dir)
        release = _hold_use_lock(store_dir)
        try:
            store = cls._open_locked(store_dir)
        except BaseException:
            release()
            raise
        object.__setattr__(store, "_release", weakref.finalize(store, release))
        return store

    @classmethod
    def _open_locked(cls, store_dir: Path) -> "WeightStore":
        raw = _read_manifest(store_dir)
        source = str(raw.get("source_dir") or "")
        try:
            extents = {name: _extent_from_json(name, e) for name, e in raw["extents"].items()}
            dtype = resolve_dtype(raw["dtype"])
            config = ModelConfig.from_dict(raw["config"], source=str(store_dir / MANIFEST_FILE))
            data_path = store_dir / raw["data_file"]
            block = int(raw["crc_block_bytes"])
        except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
            raise StoreError(f"{store_dir / MANIFEST_FILE} is damaged ({exc!r}); "
                             f"{repair_hint(store_dir, source)}") from None
        store = cls(store_dir, data_path, dtype, config, extents, block, str(raw.get("source_key", "")), source)
        store._check_files()
        damaged = read_damage(store_dir)
        if damaged:
            raise StoreError(f"the weight store {store_dir} was found corrupt ({', '.join(damaged)} failed its "
                             f"checksum when it was read); {repair_hint(store_dir, source)}")
        return store

    def close(self) -> None:
        """Release the directory's shared lock now (it is released at garbage collection otherwise)."""
        release = getattr(self, "_release", None)
        if release is not None:
            release()

    def _check_files(self) -> None:
        fix = repair_hint(self.dir, self.source_dir)
        if not self.data_path.is_file():
            raise StoreError(f"{self.data_path} is missing from the weight store {self.dir}; {fix}")
        size = self.data_path.stat().st_size
        short = [e for e in self.extents.values() if e.offset + e.padded_nbytes > size]
        if short:
            need = max(e.offset + e.padded_nbytes for e in self.extents.values())
            raise StoreError(f"{self.data_path} is truncated: {size} bytes, but the manifest needs {need} "
                             f"({short[0].describe()} and {len(short) - 1} more extents lie past the end); {fix}")
        expected = {"embed", "norm"} | {layer_extent_name(j) for j in range(self.config.num_layers)}
        expected |= set() if self.config.tie_word_embeddings else {"head"}
        missing = sorted(expected - set(self.extents))
        if missing:
            raise StoreError(f"{self.dir / MANIFEST_FILE} lacks extents {missing}; {fix}")

    def layer(self, j: int) -> Extent:
        return self.extents[layer_extent_name(j)]

    def global_extents(self) -> list[Extent]:
        return [self.extents[n] for n in ("embed", "norm", "head") if n in self.extents]

    def max_layer_padded_bytes(self) -> int:
        """The slot size a ring of layer buffers needs."""
        return max(self.layer(j).padded_nbytes for j in range(self.config.num_layers))

    def verifier(self, name: str) -> Callable[[int, memoryview], None]:
        """A reader verifier that checks each CRC block of extent ``name`` as its bytes land."""
        return _BlockVerifier(self, self.extents[name])

    def check(self, name: str, buffer: torch.Tensor) -> None:
        """Verify extent ``name`` held in ``buffer`` (uint8 CPU); raise StoreError on a mismatch."""
        self.verifier(name)(0, memoryview(buffer[: self.extents[name].nbytes].numpy()).cast("B"))

    def read_extent(self, reader: AlignedReader, name: str, dest: torch.Tensor, verify: bool = True) -> ReadRecord:
        """Start reading extent ``name`` (its padded size) into ``dest``.

        With ``verify`` each CRC block is checked on the reader thread that read it; a mismatch
        raises StoreError from ``wait()``.
        """
        e = self.extents[name]
        assert reader.path == self.data_path, (reader.path, self.data_path)
        assert reader.request_bytes % self.crc_block_bytes == 0, "a CRC block must not straddle two requests"
        check = self.verifier(name) if verify else None
        return reader.submit(e.offset, e.padded_nbytes, dest, verify=check, label=name)

    def open_reader(self, threads: int = 4, request_bytes: int = DEFAULT_REQUEST_BYTES,
                    direct: bool | None = None) -> AlignedReader:
        return AlignedReader(self.data_path, threads=threads, request_bytes=request_bytes, direct=direct)

    def read_bytes(self, names: list[str], reader: AlignedReader | None = None) -> dict[str, torch.Tensor]:
        """Read whole extents (verified) into fresh page-aligned host buffers: name -> (padded_nbytes,) uint8."""
        own = reader is None
        reader = reader or self.open_reader()
        try:
            bufs = {n: aligned_host_tensor(self.extents[n].padded_nbytes) for n in names}
            records = [self.read_extent(reader, n, bufs[n]) for n in names]
            for r in records:
                r.wait()
        finally:
            if own:
                reader.close()
        return bufs

    def load(self, names: list[str], reader: AlignedReader | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Read whole extents into host memory: extent name -> tensors (which keep their memory alive)."""
        bufs = self.read_bytes(names, reader)
        return {n: tensors_from_buffer(self.extents[n], bufs[n]) for n in names}

    def verify_all(self) -> None:
        """Read and check every extent (slow: reads the whole store)."""
        names = list(self.extents)
        with self.open_reader() as reader:
            for n in names:
                self.load([n], reader)


class _BlockVerifier:
    """Checks the CRC blocks of one extent that fall inside each landed request."""

    def __init__(self, store: WeightStore, extent: Extent) -> None:
        self.store, self.extent = store, extent

    def __call__(self, start: int, view: memoryview) -> None:
        e, block = self.extent, self.store.crc_block_bytes
        assert start % block == 0, (start, block)
        end = min(start + len(view), e.nbytes)
        for lo in range(start, end, block):
            hi = min(lo + block, e.nbytes)
            assert hi <= start + len(view), f"CRC block [{lo}, {hi}) straddles a request boundary"
            if zlib.crc32(view[lo - start:hi - start]) != e.crc32[lo // block]:
                recorded = mark_damaged(self.store.dir, e.name)
                again = ("; or just run the same command again, which repairs the store first" if recorded else
                         f" (the damage could not be recorded in {self.store.dir}: it is not writable)")
                raise StoreError(
                    f"checksum mismatch in {e.describe()} (extent {e.name}, bytes {e.offset + lo}-{e.offset + hi} "
                    f"of {self.store.data_path}): the weight store is corrupt; "
                    f"{repair_hint(self.store.dir, self.store.source_dir)}{again}")


def repair_hint(store_dir: Path, source_dir: str = "") -> str:
    """The command that repairs the store in ``store_dir`` (its checkpoint named when the manifest records it)."""
    model = shlex.quote(source_dir) if source_dir else "MODEL"
    return (f"repair it with `tierkv convert {model} {shlex.quote(str(store_dir))}`, which re-verifies every "
            "extent and re-converts the bad ones")


def mark_damaged(store_dir: Path, name: str) -> bool:
    """Record extent ``name`` as corrupt so the store refuses to open until repaired; False if unwritable.

    Reader threads may call this at once: each writes its own temporary file, and any record left
    makes the next open refuse and the next ``convert`` re-verify everything.
    """
    names = set(read_damage(store_dir)) | {name}
    try:
        _write_json_atomic(store_dir / DAMAGE_FILE, {"extents": sorted(names)})
    except OSError:
        return False
    return True


def read_damage(store_dir: Path) -> list[str]:
    """Extents recorded as corrupt in ``store_dir`` ([] when none; an unreadable record counts as damage)."""
    path = store_dir / DAMAGE_FILE
    if not path.exists():
        return []
    try:
        names = json.loads(path.read_text(encoding="utf-8")).get("extents")
    except (OSError, ValueError, AttributeError):
        return ["some extent"]
    return [str(n) for n in names] if isinstance(names, list) and names else ["some extent"]


def _hold_use_lock(store_dir: Path) -> Callable[[], None]:
    """Take the store's shared use lock (blocks while a stale-store sweep removes it); returns the release.

    A directory where the lock file cannot be made (read-only) is not locked: no tierkv process can
    remove it either.
    """
    try:
        fd = os.open(store_dir / USE_LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        return lambda: None
    fcntl.flock(fd, fcntl.LOCK_SH)
    closed = []

    def release() -> None:
        if not closed:
            closed.append(True)
            os.close(fd)
    return release


class _UnusableManifest(StoreError):
    """A manifest that exists but cannot be used; ``reason`` says why in a few words."""

    def __init__(self, reason: str, store_dir: Path, source_dir: str = "") -> None:
        super().__init__(f"{reason}; {repair_hint(store_dir, source_dir)}")
        self.reason = reason


def _read_manifest(store_dir: Path) -> dict[str, Any]:
    path = store_dir / MANIFEST_FILE
    if not path.is_file():
        if (store_dir / STATE_FILE).exists() or (store_dir / (DATA_FILE + PARTIAL_SUFFIX)).exists():
            raise StoreError(f"the conversion into {store_dir} did not finish; re-run "
                             f"`tierkv convert MODEL {store_dir}` to resume it")
        raise StoreError(f"{store_dir} is not a tierkv weight store (no {MANIFEST_FILE}); create one with "
                         f"`tierkv convert MODEL {store_dir}`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _UnusableManifest(f"{path} is damaged (not valid JSON: {exc})", store_dir) from None
    if not isinstance(raw, dict):
        raise _UnusableManifest(f"{path} is damaged (not a JSON object)", store_dir)
    if raw.get("format") != FORMAT_NAME or raw.get("version") != FORMAT_VERSION:
        raise _UnusableManifest(f"{path} is format {raw.get('format')!r} version {raw.get('version')!r}, this "
                                f"tierkv reads {FORMAT_NAME!r} version {FORMAT_VERSION}", store_dir,
                                str(raw.get("source_dir") or ""))
    return raw


# ---------------------------------------------------------------------------------------------
# conversion


def store_key(checkpoint_dir: str | Path, dtype: str | torch.dtype | None = None) -> str:
    """Identity of (checkpoint files, target dtype): names, sizes and mtimes of config.json, the
    safetensors files and their index, plus the dtype and store format version. 16 hex chars."""
    cdir = Path(checkpoint_dir)
    config = ModelConfig.from_dir(cdir)
    target = resolve_dtype(dtype, config.dtype)
    files = sorted(p for p in cdir.iterdir() if p.name == "config.json" or p.name.endswith(".safetensors")
                   or p.name.endswith(".safetensors.index.json"))
    facts = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    text = json.dumps({"files": facts, "dtype": str(target), "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


OFFLOAD_ELSEWHERE = "choose another directory with --offload-dir (offload_dir=...)"
CONVERT_ELSEWHERE = "convert into another directory (`tierkv convert MODEL OTHER_DIR`)"


def check_offload_dir(path: str | Path, need_bytes: int = 0, elsewhere: str = OFFLOAD_ELSEWHERE) -> Path:
    """Create ``path`` if needed and make sure it is writable with ``need_bytes`` (plus a small
    margin for metadata) free. ``elsewhere`` is how the caller's user picks another directory.

    Raises StoreError naming the directory and the fix before any work starts.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".tierkv-write-probe-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise StoreError(f"cannot write to the directory {path} ({exc.strerror}); {elsewhere}, "
                         "or fix its permissions") from None
    free = shutil.disk_usage(path).free
    if need_bytes and free < need_bytes + FREE_SPACE_MARGIN_BYTES:
        raise StoreError(f"{path} has {format_size(free)} free but needs {format_size(need_bytes)} "
                         f"(+{format_size(FREE_SPACE_MARGIN_BYTES)} for metadata); free space there or {elsewhere}")
    return path


def convert(checkpoint_dir: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
            progress: ProgressFn | None = None, restart: bool = False, report: ReportFn | None = None,
            overwrite_other: bool = False, elsewhere: str = CONVERT_ELSEWHERE) -> Path:
    """Rewrite a HF checkpoint into a weight store in ``out_dir`` and return ``out_dir``.

    ``dtype`` defaults to the checkpoint's. An existing store of the same checkpoint and dtype is
    re-verified (every CRC) and its bad extents are re-converted in place; a store whose manifest
    is unusable, or that an older version of the checkpoint made, is converted again. An
    interrupted conversion resumes after its last complete extent that still verifies.
    ``restart=True`` discards whatever the directory holds and starts over. A store (or unfinished
    conversion) of another checkpoint is refused unless ``restart`` or ``overwrite_other``.
    ``report(line)`` hears each repair (default: a logging warning); ``progress(done_bytes,
    total_bytes)`` is called after every tensor and verified extent; without it a progress bar is
    shown when stderr is a terminal. ``elsewhere``: how the out-of-space and unwritable-directory
    errors tell the user to pick another directory. A disk that fills up during the conversion
    raises StoreError; the conversion then resumes where it stopped when run again.
    """
    with Checkpoint(checkpoint_dir) as ckpt:              # a broken checkpoint fails before anything is written
        out = check_offload_dir(out_dir, elsewhere=elsewhere)
        with _dir_lock(out):
            try:
                return _convert_locked(ckpt, out, dtype, progress, restart, report or _log.warning,
                                       overwrite_other, elsewhere)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise StoreError(f"{out} ran out of space while converting ({exc.strerror}); free space there "
                                 f"and run the same command again (it resumes where it stopped), or "
                                 f"{elsewhere}") from None


def _convert_locked(ckpt: Checkpoint, out: Path, dtype: str | torch.dtype | None, progress: ProgressFn | None,
                    restart: bool, report: ReportFn, overwrite_other: bool, elsewhere: str) -> Path:
    """The body of ``convert`` while holding the directory lock."""
    target = resolve_dtype(dtype, ckpt.config.dtype)
    key = store_key(ckpt.dir, target)
    extents = plan_layout(ckpt.config, target)
    total = extents[-1].offset + extents[-1].padded_nbytes
    if restart:
        _remove_store_files(out)
    else:
        if not overwrite_other:
            _refuse_other_checkpoint(out, ckpt.dir)
        with _progress_or_bar(progress, total) as bar:
            if _reuse_or_repair(ckpt, target, out, key, extents, bar, report, elsewhere):
                return out
    for name in (MANIFEST_FILE, DAMAGE_FILE, DATA_FILE):    # from here on nothing looks valid
        (out / name).unlink(missing_ok=True)
    done = {} if restart else _resume_state(out, key, extents, report)
    resume_at = max((e.offset + e.padded_nbytes for e in extents if e.name in done), default=0)
    check_offload_dir(out, need_bytes=total - resume_at, elsewhere=elsewhere)
    with _progress_or_bar(progress, total) as bar:
        crcs = _write_extents(ckpt, target, out, extents, done, key, bar)
    _finish(out, ckpt, target, key, [_with_crc(e, crcs[e.name]) for e in extents])
    return out


def _with_crc(e: Extent, crc: tuple[int, ...]) -> Extent:
    return Extent(e.name, e.offset, e.nbytes, e.padded_nbytes, e.tensors, crc, e.scheme)


def _remove_store_files(out: Path) -> None:
    """Everything ``convert`` writes in ``out`` (the locks stay: a peer may be waiting on them)."""
    for name in (MANIFEST_FILE, DAMAGE_FILE, DATA_FILE, DATA_FILE + PARTIAL_SUFFIX, STATE_FILE):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _existing_manifest(out: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) when ``out`` has a usable one, (None, why) when it is unusable, (None, None) when absent."""
    if not (out / MANIFEST_FILE).exists():
        return None, None
    try:
        raw = _read_manifest(out)
    except _UnusableManifest as exc:
        return None, exc.reason
    try:
        for name, e in raw["extents"].items():
            _extent_from_json(name, e)
        str(raw["source_key"])
        int(raw["crc_block_bytes"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return None, f"{out / MANIFEST_FILE} is damaged ({exc!r})"
    return raw, None


def _read_state(out: Path) -> dict[str, Any]:
    """The resume state of an interrupted conversion ({} when absent or unreadable)."""
    try:
        state = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _refuse_other_checkpoint(out: Path, checkpoint_dir: Path) -> None:
    """StoreError when ``out`` holds the store, or an unfinished conversion, of another checkpoint."""
    raw, _ = _existing_manifest(out)
    recorded = (raw or {}).get("source_dir") or _read_state(out).get("source_dir")
    if recorded and str(recorded) != str(checkpoint_dir.resolve()):
        what = "weight store" if raw else "unfinished conversion"
        raise StoreError(f"{out} holds the {what} of another checkpoint ({recorded}); converting {checkpoint_dir} "
                         "there would overwrite it. Choose another directory, or pass --restart "
                         "(restart=True) to replace it")


def _reuse_or_repair(ckpt: Checkpoint, dtype: torch.dtype, out: Path, key: str, extents: list[Extent],
                     progress: ProgressFn, report: ReportFn, elsewhere: str) -> bool:
    """True when ``out`` now holds a verified store of this conversion: reused, or repaired in place."""
    raw, problem = _existing_manifest(out)
    if problem is not None:
        report(f"the store manifest is unusable ({problem}): converting everything again")
        return False
    if raw is None:
        return False
    if raw["source_key"] != key:
        report(f"{out} holds a store of another dtype or an older version of {ckpt.dir}: converting again")
        return False
    recorded = {n: _extent_from_json(n, e) for n, e in raw["extents"].items()}
    if set(recorded) != {e.name for e in extents} or \
            _layout_digest([recorded[e.name] for e in extents]) != _layout_digest(extents):
        report(f"the manifest in {out} does not match the checkpoint's layout: converting everything again")
        return False
    ordered = [recorded[e.name] for e in extents]
    bad = _bad_extents(out / DATA_FILE, ordered, int(raw["crc_block_bytes"]), progress)
    damaged = read_damage(out)
    if not bad and not damaged:
        return True
    if not bad:
        report(f"{', '.join(damaged)} was recorded as corrupt, but every extent of {out} verifies now: "
               "the record is cleared (a checksum mismatch without damage on disk points to memory errors)")
    else:
        for e, why in bad:
            report(f"{e.describe()} {why}: re-converting it")
        _write_json_atomic(out / DAMAGE_FILE, {"extents": sorted(e.name for e, _ in bad)})  # until repaired
        new = _rewrite_extents(ckpt, dtype, out / DATA_FILE, [e for e, _ in bad], ordered, progress, elsewhere)
        for name, crc in new.items():
            raw["extents"][name]["crc32"] = list(crc)
        _write_json_atomic(out / MANIFEST_FILE, raw)
        report(f"repaired the weight store {out}: {len(bad)} of {len(extents)} extents re-converted")
    (out / DAMAGE_FILE).unlink(missing_ok=True)
    _fsync_dir(out)
    return True


def _extent_verifies(f: Any, e: Extent, block: int) -> bool:
    """Whether extent ``e`` in the open data file ``f`` matches its CRCs (reads one block at a time)."""
    if len(e.crc32) != -(-e.nbytes // block):
        return False
    f.seek(e.offset)
    for i, crc in enumerate(e.crc32):
        data = f.read(min(block, e.nbytes - i * block))
        if zlib.crc32(data) != crc:
            return False
    return True


def _bad_extents(data_path: Path, extents: list[Extent], block: int,
                 progress: ProgressFn) -> list[tuple[Extent, str]]:
    """Extents of the data file that are missing, cut off or fail their CRCs, with the reason."""
    if not data_path.is_file():
        return [(e, f"is missing ({data_path.name} is gone)") for e in extents]
    size, total = data_path.stat().st_size, extents[-1].offset + extents[-1].padded_nbytes
    bad = []
    with open(data_path, "rb") as f:
        for e in extents:
            if e.offset + e.padded_nbytes > size:
                bad.append((e, f"lies past the end of the truncated {data_path.name}"))
            elif not _extent_verifies(f, e, block):
                bad.append((e, "failed its checksum"))
            progress(e.offset + e.padded_nbytes, total)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)     # verifying must not fill the page cache
    return bad


def _rewrite_extents(ckpt: Checkpoint, dtype: torch.dtype, data_path: Path, bad: list[Extent],
                     extents: list[Extent], progress: ProgressFn, elsewhere: str) -> dict[str, tuple[int, ...]]:
    """Convert the ``bad`` extents again, in place in the data file; returns their new CRCs."""
    total = extents[-1].offset + extents[-1].padded_nbytes
    size = data_path.stat().st_size if data_path.is_file() else 0
    check_offload_dir(data_path.parent, need_bytes=max(0, total - size), elsewhere=elsewhere)
    crcs = {}
    with open(data_path, "r+b" if size else "w+b") as f:
        if size < total:
            f.truncate(total)                  # a cut-off file grows back; its missing extents are all in ``bad``
        for e in bad:
            f.seek(e.offset)
            crcs[e.name] = _write_extent(f, ckpt, dtype, e, lambda n, e=e: progress(e.offset + n, total))
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), e.offset, e.padded_nbytes, os.POSIX_FADV_DONTNEED)
            _release_source_pages(ckpt)
    return crcs


def _resume_state(out: Path, key: str, extents: list[Extent], report: ReportFn) -> dict[str, tuple[int, ...]]:
    """Extents already written by an interrupted run of the same conversion (name -> CRCs).

    Only the longest run of extents, in file order, that still verifies against the recorded
    CRCs is kept: a damaged partial file resumes from its first bad extent.
    """
    state, partial = _read_state(out), out / (DATA_FILE + PARTIAL_SUFFIX)
    if state.get("source_key") != key or state.get("layout") != _layout_digest(extents) or not partial.is_file():
        return {}
    try:
        done = {str(name): tuple(int(c) for c in crc) for name, crc in state.get("done", {}).items()}
    except (TypeError, ValueError, AttributeError):
        return {}
    kept: dict[str, tuple[int, ...]] = {}
    size = partial.stat().st_size
    with open(partial, "rb") as f:
        for e in extents:
            if e.name not in done:
                break
            if e.offset + e.padded_nbytes > size or not _extent_verifies(f, _with_crc(e, done[e.name]),
                                                                            CRC_BLOCK_BYTES):
                report(f"{e.describe()} of the interrupted conversion in {out} does not verify: "
                       "converting again from there")
                break
            kept[e.name] = done[e.name]
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return kept


def _write_extents(ckpt: Checkpoint, dtype: torch.dtype, out: Path, extents: list[Extent],
                   done: dict[str, tuple[int, ...]], key: str, report: ProgressFn) -> dict[str, tuple[int, ...]]:
    """Write every extent not in ``done`` to the partial data file; returns all CRCs."""
    partial = out / (DATA_FILE + PARTIAL_SUFFIX)
    crcs = dict(done)
    resume_at = max((e.offset + e.padded_nbytes for e in extents if e.name in done), default=0)
    total = extents[-1].offset + extents[-1].padded_nbytes
    with open(partial, "r+b" if resume_at else "wb") as f:
        f.truncate(resume_at)
        f.seek(resume_at)
        report(resume_at, total)
        for e in extents:
            if e.name in crcs:
                continue
            assert f.tell() == e.offset, (f.tell(), e.offset)
            crcs[e.name] = _write_extent(f, ckpt, dtype, e, lambda n, e=e: report(e.offset + n, total))
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), e.offset, e.padded_nbytes, os.POSIX_FADV_DONTNEED)
            _release_source_pages(ckpt)
            _write_json_atomic(out / STATE_FILE, {"source_key": key, "layout": _layout_digest(extents),
                                                  "source_dir": str(ckpt.dir.resolve()),
                                                  "dtype": str(dtype).removeprefix("torch."),
                                                  "done": {n: list(c) for n, c in crcs.items()}})
    return crcs


def _release_source_pages(ckpt: Checkpoint) -> None:
    """Unmap the checkpoint and drop its cached pages, so memory stays bounded by about one extent."""
    ckpt.close()    # safetensors tensors are views of its mmap; closing unmaps once they are gone
    for path in ckpt.files():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _write_extent(f: Any, ckpt: Checkpoint, dtype: torch.dtype, e: Extent,
                  report: Callable[[int], None]) -> tuple[int, ...]:
    """Stream the extent's tensors, one at a time, into ``f``; returns its block CRCs."""
    crc = _BlockCrc(CRC_BLOCK_BYTES)
    pos = 0
    for key, entry in e.tensors.items():
        pad = entry.offset - pos
        tensor = ckpt.tensor(_source_name(e, key), dtype).contiguous()
        ckpt.check_finite(_source_name(e, key), tensor)         # NaN, inf or overflow: refuse, naming it
        data = tensor.reshape(-1).view(torch.uint8).numpy()     # (nbytes,) view, no copy
        assert pad >= 0 and data.nbytes == entry.nbytes, (e.name, key, pad, data.nbytes, entry.nbytes)
        for chunk in (bytes(pad), data):
            f.write(chunk)
            crc.update(memoryview(chunk).cast("B"))
        pos = entry.offset + entry.nbytes
        del tensor, data
        report(pos)
    assert pos == e.nbytes
    f.write(bytes(e.padded_nbytes - e.nbytes))
    return crc.finish()


class _BlockCrc:
    """Running CRC-32 per fixed-size block over a stream of byte chunks."""

    def __init__(self, block_bytes: int) -> None:
        self.block_bytes, self.crcs, self.current, self.filled = block_bytes, [], 0, 0

    def update(self, view: memoryview) -> None:
        while len(view):
            take = min(len(view), self.block_bytes - self.filled)
            self.current = zlib.crc32(view[:take], self.current)
            self.filled += take
            view = view[take:]
            if self.filled == self.block_bytes:
                self.crcs.append(self.current)
                self.current, self.filled = 0, 0

    def finish(self) -> tuple[int, ...]:
        return tuple(self.crcs + ([self.current] if self.filled else []))


def _finish(out: Path, ckpt: Checkpoint, dtype: torch.dtype, key: str, extents: list[Extent]) -> None:
    """Publish the data file, then the manifest (the commit point), then drop the resume state."""
    partial = out / (DATA_FILE + PARTIAL_SUFFIX)
    with open(partial, "r+b") as f:
        os.fsync(f.fileno())
    os.replace(partial, out / DATA_FILE)
    config = dict(read_json(ckpt.dir / "config.json", what="model configuration"))
    source_dtype = str(config.pop("torch_dtype", None) or config.get("dtype") or "float32")
    config["dtype"] = str(dtype).removeprefix("torch.")
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "data_file": DATA_FILE,
        "architecture": ckpt.config.architecture, "dtype": config["dtype"], "source_dtype": source_dtype,
        "source_key": key, "source_dir": str(ckpt.dir.resolve()), "alignment_bytes": ALIGN_BYTES,
        "crc_block_bytes": CRC_BLOCK_BYTES,
        "data_bytes": extents[-1].offset + extents[-1].padded_nbytes,
        "config": config, "extents": {e.name: _extent_to_json(e) for e in extents},
    }
    _write_json_atomic(out / MANIFEST_FILE, manifest)
    (out / STATE_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def _dir_lock(out: Path) -> Iterator[None]:
    """Exclusive lock so two processes never convert into the same directory at once."""
    with open(out / LOCK_FILE, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _progress_or_bar(progress: ProgressFn | None, total: int) -> Iterator[ProgressFn]:
    """The caller's callback, or a rich bar on a terminal, or nothing."""
    if progress is not None or not sys.stderr.isatty():
        yield progress or (lambda done, total: None)
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)
    columns = (TextColumn("converting"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("convert", total=total)
        yield lambda done, total: bar.update(task, completed=done)


def cached_store_dir(checkpoint_dir: str | Path, offload_dir: str | Path,
                     dtype: str | torch.dtype | None = None) -> Path:
    """Where ``cached_store`` keeps the store of ``checkpoint_dir`` at ``dtype`` (nothing is created)."""
    cdir = Path(checkpoint_dir)
    if not (cdir / "config.json").is_file():
        Checkpoint(cdir)    # raises the checkpoint's own clear error
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in cdir.resolve().name) or "model"
    return Path(offload_dir) / "stores" / f"{name}-{store_key(cdir, dtype)}"


def find_cached_store(checkpoint_dir: str | Path, offload_dir: str | Path,
                      dtype: str | torch.dtype | None = None) -> WeightStore | None:
    """The cached store of ``checkpoint_dir`` when it exists and opens (read-only: nothing is written)."""
    out = cached_store_dir(checkpoint_dir, offload_dir, dtype)
    if not (out / MANIFEST_FILE).is_file():
        return None
    try:
        store = WeightStore.open(out)
    except StoreError:
        return None
    return store if store.source_key == out.name.rsplit("-", 1)[1] else None


def cached_store(checkpoint_dir: str | Path, offload_dir: str | Path, dtype: str | torch.dtype | None = None,
                 progress: ProgressFn | None = None, report: ReportFn | None = None) -> Path:
    """The store of ``checkpoint_dir`` at ``dtype`` under ``offload_dir/stores``, converted on first use.

    The directory name carries ``store_key``, so a changed checkpoint (files, sizes, mtimes) or
    another dtype gets a fresh conversion instead of stale weights; the stores that older versions
    of the same checkpoint left are then removed (``remove_stale_stores``). A store that does not
    open (damaged manifest, truncated data file, an extent found corrupt while streaming) is
    repaired by ``convert``, which re-verifies it, instead of failing.
    """
    cdir = Path(checkpoint_dir)
    out = check_offload_dir(cached_store_dir(cdir, offload_dir, dtype))
    if find_cached_store(cdir, offload_dir, dtype) is not None:
        return out
    path = convert(cdir, out, dtype=dtype, progress=progress, report=report, overwrite_other=True,
                   elsewhere=OFFLOAD_ELSEWHERE)
    remove_stale_stores(cdir, out.parent, keep=out, report=report)
    return path


def remove_stale_stores(checkpoint_dir: str | Path, stores_dir: str | Path, keep: Path | None = None,
                        report: ReportFn | None = None) -> list[Path]:
    """Remove the stores under ``stores_dir`` made from ``checkpoint_dir`` whose source no longer matches.

    A store is stale when its manifest (or an unfinished conversion's state) names this checkpoint
    directory but a key the checkpoint's current files no longer give for its dtype. Stores of
    other dtypes that still match, other checkpoints' stores, and stores that another process has
    open (shared use lock) or is converting into (convert lock) are left alone. Returns the
    removed directories.
    """
    source = str(Path(checkpoint_dir).resolve())
    removed = []
    for d in sorted(p for p in Path(stores_dir).iterdir() if p.is_dir() and p != keep):
        manifest, _ = _existing_manifest(d)
        facts = manifest or _read_state(d)
        if str(facts.get("source_dir") or "") != source or not facts.get("dtype"):
            continue
        try:
            current = store_key(checkpoint_dir, str(facts["dtype"]))
        except ValueError:          # a dtype this tierkv does not know: not ours to judge
            continue
        if current == facts.get("source_key"):
            continue
        with _exclusive_or_none(d) as locked:
            if locked:
                shutil.rmtree(d)
                removed.append(d)
                (report or _log.warning)(f"removed {d}: its checkpoint {source} has changed since it was converted")
    return removed


@contextlib.contextmanager
def _exclusive_or_none(store_dir: Path) -> Iterator[bool]:
    """Hold both locks of ``store_dir`` exclusively, or yield False at once when any process holds one."""
    fds = []
    try:
        locked = True
        for name in (LOCK_FILE, USE_LOCK_FILE):
            fds.append(os.open(store_dir / name, os.O_RDONLY | os.O_CREAT, 0o644))
            try:
                fcntl.flock(fds[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                locked = False
                break
        yield locked
    finally:
        for fd in fds:
            os.close(fd)


__all__ = ["CRC_BLOCK_BYTES", "DATA_FILE", "DAMAGE_FILE", "Extent", "FORMAT_VERSION", "MANIFEST_FILE", "ProgressFn",
           "ReportFn", "StoreError", "TensorEntry", "WeightStore", "block_crcs", "cached_store", "cached_store_dir",
           "check_offload_dir", "convert", "find_cached_store", "layer_extent_name", "mark_damaged", "plan_layout",
           "read_damage", "remove_stale_stores", "repair_hint", "store_key", "tensors_from_buffer"]
