"""Packed weight store format: every layer's tensors in one 4 KiB-aligned extent of one data file.

Why this module exists: streaming a layer from disk must be one large aligned read (O_DIRECT,
several requests in flight), not a few dozen small reads scattered over safetensors shards in
whatever order and dtype the checkpoint was saved. This module is the format and its reader: the
layout of extents, the manifest (read, validated, written atomically) and ``WeightStore``, which
opens a complete store, reads extents and verifies them. Writing a store from a checkpoint lives
in ``io.convert``, which builds on this module (never the reverse). A store directory holds::

    OUT/weights.bin     extents: embed, layer.0 .. layer.{L-1}, norm, head (absent when tied, unless a
                        GGUF source's quantized embedding is tied: then the head is its packed copy)
    OUT/manifest.json   format/version, dtype, the checkpoint's config.json, and per extent its
                        offset, size, padded size, CRC-32 per 4 MiB block and tensor table

Checksums are per block so the reader threads verify blocks in parallel as they land (zlib.crc32
runs at about 4 GB/s per core here, above the disk's 1.5-1.9 GB/s). A checksum mismatch found
while streaming is recorded in ``damaged.json`` beside the manifest, so the store no longer opens
until ``io.convert`` repairs it. Readers hold a shared lock on the store while it is open, so a
stale store (its checkpoint changed) is removed only when no process uses it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import threading
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tierkv.config import ConfigError, ModelConfig
from tierkv.errors import TierkvError
from tierkv.io.buffers import aligned_host_tensor, round_up
from tierkv.io.checkpoint import LAYER_PREFIX, resolve_dtype
from tierkv.io.mover import MoveRecord
from tierkv.io.reader import DEFAULT_REQUEST_BYTES, AlignedReader
from tierkv.kernels.quant_cpu import cpu_layout
from tierkv.quantspec import EMBED_WEIGHT, GROUP_SIZE_CHOICES, HEAD_WEIGHT, QPARAMS_SUFFIX, SCHEMES, QuantWeight, \
    TensorQuant, WeightQuant, choose_pack, group_size_name, tensor_quants

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
_GLOBAL_EXTENTS = {"embed": EMBED_WEIGHT, "norm": "model.norm.weight", "head": HEAD_WEIGHT}


class StoreError(TierkvError):
    """A weight store is missing, incomplete, corrupt or cannot be written; the message says what to do."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside its extent."""

    dtype: str                  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int                 # bytes from the start of the extent (multiple of 64)
    nbytes: int
    quant: TensorQuant | None = None   # set on the packed data of a quantized weight (its qparams
                                       # follow as KEY + ".qparams"); None for plain tensors
    source_type: str | None = None     # the GGML type the tensor had in its GGUF source ("Q4_K"), else None


@dataclass(frozen=True)
class Extent:
    """One contiguous, 4 KiB-aligned byte range of the data file holding a group of tensors."""

    name: str                   # "layer.{j}", "embed", "norm" or "head"
    offset: int                 # bytes from the start of the data file (multiple of 4096)
    nbytes: int                 # meaningful bytes (the checksummed range)
    padded_nbytes: int          # nbytes rounded up to 4096: what one O_DIRECT read covers
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    crc32: tuple[int, ...] = ()  # CRC-32 of each CRC_BLOCK_BYTES block of [0, nbytes)

    def describe(self) -> str:
        """Human name for messages: "layer 3", "the embedding", ..."""
        if self.name.startswith("layer."):
            return f"layer {self.name.split('.', 1)[1]}"
        return {"embed": "the embedding", "norm": "the final norm", "head": "the LM head"}.get(self.name, self.name)


def layer_extent_name(j: int) -> str:
    return f"layer.{j}"


PIECE_SEP = "#"                 # "layer.3#2": CRC block 2 of extent layer.3 (``pipeline.pieces`` streams those)


def piece_name(extent_name: str, index: int) -> str:
    """The name of CRC block ``index`` of an extent, as a move's ``what`` (``WeightStore.piece_range``)."""
    return f"{extent_name}{PIECE_SEP}{index}"


def hf_name(extent_name: str, key: str) -> str:
    """The source's (HF) name of tensor ``key`` of the extent named ``extent_name``."""
    return f"{LAYER_PREFIX}{extent_name.split('.', 1)[1]}.{key}" if extent_name.startswith("layer.") else key


def logical_shape(e: "Extent", key: str) -> tuple[int, int]:
    """The (N, K) weight quantized entry ``key`` of ``e`` stores, from its (G, N, 2) qparams."""
    entry = e.tensors[key]
    groups, n, _ = e.tensors[key + QPARAMS_SUFFIX].shape
    return n, groups * entry.quant.group_size or entry.shape[-1]        # per channel: int8's data is (N, K)


def tensors_from_buffer(extent: Extent, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero-copy typed views of an extent's tensors inside ``buffer`` (uint8, >= extent.nbytes).

    Layer tensors are keyed like ``self_attn.q_proj.weight``; globals by their full HF name. A
    quantized weight (its manifest entry has a scheme) comes back as one ``QuantWeight`` under its
    own key, holding the views of its packed data and of its ``.qparams``. The views alias
    ``buffer``: they are valid only while the buffer (slot) holding the extent is.
    """
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1, (buffer.dtype, buffer.shape)
    assert buffer.numel() >= extent.nbytes, f"{extent.name}: buffer {buffer.numel()} B < {extent.nbytes} B"
    views = {}
    for key, entry in extent.tensors.items():
        raw = buffer[entry.offset:entry.offset + entry.nbytes]
        views[key] = raw.view(getattr(torch, entry.dtype)).view(entry.shape)
    qparams = {key + QPARAMS_SUFFIX for key, entry in extent.tensors.items() if entry.quant is not None}
    out: dict[str, Any] = {}
    for key, entry in extent.tensors.items():
        if entry.quant is not None:
            out[key] = QuantWeight(views[key], views[key + QPARAMS_SUFFIX], entry.quant)
        elif key not in qparams:                              # a quantized weight's qparams are inside it
            out[key] = views[key]
    return out


def block_crcs(data: memoryview | bytes, block_bytes: int = CRC_BLOCK_BYTES) -> tuple[int, ...]:
    """CRC-32 of each ``block_bytes`` block of ``data`` (the last one may be short)."""
    view = memoryview(data).cast("B")
    return tuple(zlib.crc32(view[i:i + block_bytes]) for i in range(0, len(view), block_bytes))


# ---------------------------------------------------------------------------------------------
# layout


def plan_layout(config: ModelConfig, dtype: torch.dtype, quant: WeightQuant | None = None,
                device_type: str = "cpu", source_quants: dict[str, tuple[str, int]] | None = None,
                source_types: dict[str, str] | None = None) -> list[Extent]:
    """Extents (without checksums) in file order: embed, layer.0 .. layer.{L-1}, norm, head.

    With ``quant``, the weights it covers (``quantized_keys``) are stored packed for computing on
    ``device_type`` (``choose_pack``): their data entry carries the scheme, and their qparams
    follow under KEY + ".qparams". ``source_quants`` (full HF name -> (scheme, group size)) are the
    weights a quantized source (a GGUF file) keeps in its own scheme, whatever ``quant`` says (the
    embedding among them is stored plain, for row lookups; a tied model's ``lm_head.weight`` among them
    gets a "head" extent of its own, the same codes packed for ``device_type``'s quantized matmul);
    ``source_types`` (full HF name -> GGML type) is recorded on each entry as ``gguf_type``.
    """
    dtype_name = str(dtype).removeprefix("torch.")
    globals_ = dict(config.global_tensor_shapes())
    embed = _GLOBAL_EXTENTS["embed"]
    groups: list[tuple[str, dict[str, tuple[int, ...]]]] = [("embed", {embed: globals_[embed]})]
    groups += [(layer_extent_name(j), config.layer_tensor_shapes()) for j in range(config.num_layers)]
    if HEAD_WEIGHT in (source_quants or {}) and HEAD_WEIGHT not in globals_:
        globals_[HEAD_WEIGHT] = globals_[embed]        # a tied head kept quantized: its own copy, packed to compute
    groups += [(name, {hf: globals_[hf]}) for name, hf in _GLOBAL_EXTENTS.items()
               if name != "embed" and hf in globals_]
    extents, offset = [], 0
    for name, shapes in groups:
        tensors, pos = {}, 0
        prefix = hf_name(name, "")
        quantized = _group_quants(shapes, prefix, quant, device_type, source_quants or {})
        for key, shape in shapes.items():
            kind = (source_types or {}).get(prefix + key)
            entries = [(key, dtype_name, tuple(shape), None)]
            if key in quantized:
                tq = quantized[key]
                entries = [(key + suffix, dt, st, tq if not suffix else None)
                           for suffix, (dt, st) in tq.stored(tuple(shape)).items()]
            for entry_key, entry_dtype, entry_shape, tq_or_none in entries:
                pos = round_up(pos, TENSOR_ALIGN_BYTES)
                nbytes = torch.empty((), dtype=getattr(torch, entry_dtype)).element_size() * _numel(entry_shape)
                tensors[entry_key] = TensorEntry(entry_dtype, entry_shape, pos, nbytes, tq_or_none,
                                                 kind if entry_key == key else None)
                pos += nbytes
        extents.append(Extent(name, offset, pos, round_up(pos), tensors))
        offset += round_up(pos)
    return extents


def layout_prepared_bytes(extents: list[Extent], dtype_bytes: int) -> tuple[int, int]:
    """(largest layer, all globals) bytes ``kernels.quant.prepare`` adds to an actual layout's quantized
    weights placed to stay (``TensorQuant.prepared_nbytes`` of each, its logical (N, K) from its qparams)."""
    def prepared(e: Extent) -> int:
        total = 0
        for key, entry in e.tensors.items():
            if entry.quant is not None:
                total += entry.quant.prepared_nbytes(logical_shape(e, key), dtype_bytes)
        return total
    layers = [prepared(e) for e in extents if e.name.startswith("layer.")]
    return max(layers, default=0), sum(prepared(e) for e in extents if not e.name.startswith("layer."))


def _group_quants(shapes: dict[str, tuple[int, ...]], prefix: str, quant: WeightQuant | None, device_type: str,
                  source_quants: dict[str, tuple[str, int]]) -> dict[str, TensorQuant]:
    """Key -> how it is stored for one extent's tensors: the source's own scheme where it has one,
    else what ``quant`` asks (``tensor_quants``). A quantized embedding is always the plain pack: the
    lookup gathers rows of its codes (``kernels.quant.dequantize_rows``)."""
    own = {key: source_quants[prefix + key] for key in shapes if prefix + key in source_quants}
    out = tensor_quants({k: s for k, s in shapes.items() if k not in own}, quant, device_type)
    for key, (scheme, group) in own.items():
        pack = "plain" if prefix + key == EMBED_WEIGHT else choose_pack(scheme, tuple(shapes[key]), device_type, group)
        out[key] = TensorQuant(scheme, group, pack)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------------
# manifest (de)serialisation


def extent_to_json(e: Extent) -> dict[str, Any]:
    return {"offset": e.offset, "nbytes": e.nbytes, "padded_nbytes": e.padded_nbytes, "crc32": list(e.crc32),
            "tensors": {k: _entry_to_json(t) for k, t in e.tensors.items()}}


def _entry_to_json(t: TensorEntry) -> dict[str, Any]:
    raw: dict[str, Any] = {"dtype": t.dtype, "shape": list(t.shape), "offset": t.offset, "nbytes": t.nbytes}
    if t.quant is not None:
        raw["quant"] = t.quant.to_json()
    if t.source_type is not None:
        raw["gguf_type"] = t.source_type
    return raw


def extent_from_json(name: str, raw: dict[str, Any]) -> Extent:
    """Reads the keys it knows and ignores others (manifests from earlier tierkv versions carry an unused
    "scheme": "plain" per extent; they stay readable)."""
    tensors = {k: TensorEntry(t["dtype"], tuple(t["shape"]), int(t["offset"]), int(t["nbytes"]),
                              TensorQuant.from_json(t["quant"]) if t.get("quant") else None,
                              str(t["gguf_type"]) if t.get("gguf_type") else None)
               for k, t in raw["tensors"].items()}
    return Extent(name, int(raw["offset"]), int(raw["nbytes"]), int(raw["padded_nbytes"]), tensors,
                  tuple(int(c) for c in raw["crc32"]))


def layout_digest(extents: list[Extent]) -> str:
    text = json.dumps([[e.name, extent_to_json(e)["tensors"], e.offset] for e in extents], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that a crash leaves either the old file or the complete new one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")   # writers never share one
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """``write_bytes_atomic`` of ``data`` as indented JSON."""
    write_bytes_atomic(path, json.dumps(data, indent=1).encode("utf-8"))


def fsync_dir(path: Path) -> None:
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
    quant: WeightQuant | None = None   # the weight quantization it was converted with (None: 16-bit)
    pack_device: str = ""       # what its packs are made for (``pack_device``: "cpu:AVX512", "gpu"; "" in
                                # 16-bit stores, which have no packs)
    notes: tuple[str, ...] = () # what the conversion changed that a user should hear (a GGUF file's weights
                                # dequantized, types without an int4/int8 form), shown in the CLI's summary

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
            extents = {name: extent_from_json(name, e) for name, e in raw["extents"].items()}
            dtype = resolve_dtype(raw["dtype"])
            config = ModelConfig.from_dict(raw["config"], source=str(store_dir / MANIFEST_FILE))
            data_path = store_dir / raw["data_file"]
            block = int(raw["crc_block_bytes"])
            quant = WeightQuant.from_json(raw.get("weight_quant"))
            packs = str(raw.get("pack_device") or "")
            notes = tuple(str(n) for n in raw.get("notes") or ())
        except (KeyError, TypeError, ValueError, AttributeError, ConfigError, TierkvError) as exc:
            raise StoreError(f"{store_dir / MANIFEST_FILE} is damaged ({exc!r}); "
                             f"{repair_hint(store_dir, source)}") from None
        store = cls(store_dir, data_path, dtype, config, extents, block, str(raw.get("source_key", "")), source,
                    quant, packs, notes)
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

    def check_quant(self, asked: WeightQuant | None, device_type: str) -> None:
        """StoreError unless this store holds what was asked: the same scheme (16-bit when ``asked``
        is None), group size and head flag, packed for ``device_type``'s family. The message lists
        what the store holds and the two ways out (ask for that, or convert again)."""
        here = pack_device(device_type)
        if asked == self.quant and (self.quant is None or self.pack_device == here):
            return
        held = self.quant.describe() if self.quant is not None else "16-bit weights"
        if asked is not None and asked == self.quant:
            other = "--device cuda" if self.pack_device == "gpu" else "--device cpu on a CPU of that kind"
            raise StoreError(f"the weight store {self.dir} is packed for {self.pack_device}, but this run computes "
                             f"on {here}; run it with {other}, or convert the checkpoint again here "
                             f"(`tierkv convert {shlex.quote(self.source_dir) if self.source_dir else 'MODEL'} "
                             f"OTHER_DIR --device {device_type}` with the same --quant)")
        wanted = asked.describe() if asked is not None else "16-bit weights"
        flags = (f"--quant {self.quant.scheme} --group-size {group_size_name(self.quant.group_size)}"
                 + (" --quant-head" if self.quant.head else "")) if self.quant is not None else "--quant none"
        model = shlex.quote(self.source_dir) if self.source_dir else "MODEL"
        raise StoreError(f"the weight store {self.dir} holds {held}, not the {wanted} asked for; run it with "
                         f"{flags} (or leave --quant out to use what it holds), or convert again with "
                         f"`tierkv convert {model} OTHER_DIR` and the --quant you want (schemes: {', '.join(SCHEMES)}, none; "
                         f"group sizes: {GROUP_SIZE_CHOICES})")

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

    def piece_range(self, name: str) -> tuple[Extent, int, int]:
        """(extent, start, nbytes) of ``name``: a whole extent (0, its padded size), or one CRC block of it
        (``piece_name``: its bytes within the padded size, the last block's short tail included)."""
        extent_name, sep, index = name.partition(PIECE_SEP)
        e = self.extents[extent_name]
        if not sep:
            return e, 0, e.padded_nbytes
        start = int(index) * self.crc_block_bytes
        assert 0 <= start < e.padded_nbytes, (name, e.padded_nbytes)
        return e, start, min(self.crc_block_bytes, e.padded_nbytes - start)

    def read_extent(self, reader: AlignedReader, name: str, dest: torch.Tensor, verify: bool = True,
                    record: MoveRecord | None = None) -> MoveRecord:
        """Start reading extent ``name`` (its padded size; or one CRC block of it, named by ``piece_name``) into
        ``dest``, filling ``record`` if given.

        With ``verify`` each CRC block is checked on the reader thread that read it; a mismatch
        raises StoreError from ``wait()``.
        """
        e, start, nbytes = self.piece_range(name)
        assert reader.path == self.data_path, (reader.path, self.data_path)
        assert reader.request_bytes % self.crc_block_bytes == 0, "a CRC block must not straddle two requests"
        check = _BlockVerifier(self, e, start) if verify else None
        return reader.submit(e.offset + start, nbytes, dest, verify=check, label=name, record=record)

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


class _BlockVerifier:
    """Checks the CRC blocks of one extent that fall inside each landed request."""

    def __init__(self, store: WeightStore, extent: Extent, base: int = 0) -> None:
        self.store, self.extent, self.base = store, extent, base     # base: where the read starts in the extent

    def __call__(self, start: int, view: memoryview) -> None:
        e, block = self.extent, self.store.crc_block_bytes
        start += self.base
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
        write_json_atomic(store_dir / DAMAGE_FILE, {"extents": sorted(names)})
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


def pack_device(device_type: str) -> str:
    """What a quantized store's packs are made for: "gpu" (the plain packs), or "cpu:" and the CPU
    capability whose tinygemm layout the cpu_int4 packs follow (``kernels.quant_cpu``: a pack made
    under AVX512 is wrong under AVX2). Part of the store key and the manifest."""
    return f"cpu:{cpu_layout()}" if device_type == "cpu" else "gpu"


def is_store_dir(path: str | Path) -> bool:
    """Whether ``path`` is (or was meant to be) a weight store rather than a checkpoint: it holds a
    manifest or an unfinished conversion and no config.json."""
    p = Path(path)
    return not (p / "config.json").is_file() and any(
        (p / name).exists() for name in (MANIFEST_FILE, STATE_FILE, DATA_FILE + PARTIAL_SUFFIX))


def existing_manifest(out: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) when ``out`` has a usable one, (None, why) when it is unusable, (None, None) when absent."""
    if not (out / MANIFEST_FILE).exists():
        return None, None
    try:
        raw = _read_manifest(out)
    except _UnusableManifest as exc:
        return None, exc.reason
    try:
        for name, e in raw["extents"].items():
            extent_from_json(name, e)
        str(raw["source_key"])
        int(raw["crc_block_bytes"])
        WeightQuant.from_json(raw.get("weight_quant"))
    except (KeyError, TypeError, ValueError, AttributeError, TierkvError) as exc:
        return None, f"{out / MANIFEST_FILE} is damaged ({exc!r})"
    return raw, None



__all__ = ["CRC_BLOCK_BYTES", "DATA_FILE", "DAMAGE_FILE", "Extent", "FORMAT_VERSION", "MANIFEST_FILE", "PIECE_SEP",
           "StoreError",
           "TensorEntry", "WeightStore", "block_crcs", "existing_manifest", "extent_from_json", "extent_to_json",
           "fsync_dir", "hf_name", "is_store_dir", "layer_extent_name", "layout_prepared_bytes", "logical_shape", "pack_device",
           "layout_digest", "mark_damaged", "piece_name", "plan_layout", "read_damage",
           "repair_hint", "tensors_from_buffer", "write_json_atomic"]
