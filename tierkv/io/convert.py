"""Conversion of a Hugging Face checkpoint into a weight store, its repair, and the store cache.

Why this module exists: writing a store is a different concern from reading one (``io.store``,
which this module builds on and which never imports it back). ``convert`` rewrites a checkpoint
once, tensor by tensor (memory bounded by about one tensor), into the packed format. The manifest
is written last (temporary file, fsync, rename), so an interrupted conversion never leaves a store
that opens; a small state file lets the next run resume after the last extent that reached the
disk.

Repair: ``convert`` on an existing store re-verifies every extent and re-converts only the bad
ones (everything when the manifest is unusable), and ``cached_store`` does the same on its own. A
store records the checkpoint it came from; ``convert`` refuses to overwrite another checkpoint's
store unless told to restart. An exclusive lock keeps two processes from converting into one
directory at once, and ``remove_stale_stores`` removes a stale store only when no process holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tierkv.config import format_size
from tierkv.io.buffers import ALIGN_BYTES
from tierkv.io.checkpoint import Checkpoint, resolve_dtype
from tierkv.io.gguf import is_gguf_source
from tierkv.io.progress import ProgressFn, progress_or_bar
from tierkv.io.source import (Source, conversion_notes, held_quant, identity, open_source, planned_layout,
                              source_codes, source_config, source_name, source_path, write_side_files)
from tierkv.errors import TierkvError
from tierkv.kernels.quant import pack_weight, quantize_weight
from tierkv.quantspec import QPARAMS_SUFFIX, WeightQuant
from tierkv.io.store import (CRC_BLOCK_BYTES, DAMAGE_FILE, DATA_FILE, FORMAT_NAME, FORMAT_VERSION, LOCK_FILE,
                             MANIFEST_FILE, PARTIAL_SUFFIX, STATE_FILE, USE_LOCK_FILE, Extent, StoreError,
                             WeightStore, existing_manifest, extent_from_json, extent_to_json, fsync_dir,
                             hf_name, layout_digest, pack_device, read_damage, write_json_atomic)

FREE_SPACE_MARGIN_BYTES = 4 << 20      # the manifest, the resume state and filesystem metadata

# report(line): one line per repair or rebuild convert makes ("layer 1 failed its checksum: re-converted")
ReportFn = Callable[[str], None]
_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# conversion


def store_key(checkpoint_dir: str | Path, dtype: str | torch.dtype | None = None, quant: WeightQuant | None = None,
              device_type: str = "cpu", keep_source: bool = True) -> str:
    """Identity of (source files, target dtype, weight quantization): names, sizes and mtimes of
    config.json, the safetensors files and their index (or of a GGUF model's files), plus the dtype,
    the store format version and, for a quantized store, its scheme, group size, head flag and pack
    device family (16-bit stores keep the key they always had); for a GGUF source also whether its
    quantized weights keep their scheme (``keep_source``). 16 hex chars."""
    return _key(Path(checkpoint_dir), dtype, quant, pack_device(device_type), keep_source)


def _key(cdir: Path, dtype: str | torch.dtype | None, quant: WeightQuant | None, packs: str,
         keep_source: bool = True) -> str:
    """``store_key`` with the packs' target spelled as ``pack_device`` records it."""
    facts, target = identity(cdir, dtype)
    ident: dict[str, Any] = {"files": facts, "dtype": str(target), "format": FORMAT_VERSION}
    if quant is not None:
        ident.update(quant=quant.to_json(), pack_device=packs)
    if is_gguf_source(cdir):
        ident.update(gguf_quants="keep" if keep_source else "dequantize", pack_device=packs)
    text = json.dumps(ident, sort_keys=True)
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
            overwrite_other: bool = False, elsewhere: str = CONVERT_ELSEWHERE, quant: WeightQuant | None = None,
            device_type: str = "cpu", keep_source: bool = True) -> Path:
    """Rewrite a HF checkpoint (or a GGUF model: ``io.source``) into a weight store in ``out_dir`` and
    return ``out_dir``.

    A GGUF model's weights held in a type tierkv keeps quantized (``io.gguf.SOURCE_SCHEMES``) keep
    that scheme when ``keep_source`` (the default) whatever ``quant`` says; ``quant`` then covers
    its 16-bit and other-type weights; ``keep_source=False`` dequantizes everything first.

    ``quant`` stores the linear weights it covers group-wise quantized (``quantspec``), each
    quantized as it streams by and packed for computing on ``device_type`` ("cpu": PyTorch's fused
    int4 layout where the shape allows; "cuda": the plain layout the Triton kernels read); the
    manifest records the request, the pack device and each tensor's scheme. A store made with
    another ``quant`` or pack device counts as another conversion: it is converted again.

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
    with open_source(checkpoint_dir) as ckpt:            # a broken checkpoint fails before anything is written
        out = check_offload_dir(out_dir, elsewhere=elsewhere)
        with _dir_lock(out):
            try:
                return _convert_locked(ckpt, out, _Target(dtype, quant, device_type, keep_source), progress, restart,
                                       report or _log.warning, overwrite_other, elsewhere)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise StoreError(f"{out} ran out of space while converting ({exc.strerror}); free space there "
                                 f"and run the same command again (it resumes where it stopped), or "
                                 f"{elsewhere}") from None


@dataclass(frozen=True)
class _Target:
    """What a conversion writes: the dtype asked for (None: the checkpoint's), the weight
    quantization and the device type its packs are for."""

    dtype: str | torch.dtype | None
    quant: WeightQuant | None
    device_type: str
    keep_source: bool = True

    def facts(self, ckpt: Source, extents: list[Extent], dtype: torch.dtype) -> dict[str, Any]:
        """The manifest's and the resume state's record of the quantization: for a GGUF source, what its
        store holds (``held_quant``), what was asked and whether the file's schemes were kept."""
        held = held_quant(ckpt, extents, self.quant)
        facts: dict[str, Any] = {"weight_quant": None, "pack_device": None}      # 16-bit stores have no packs
        if held is not None:
            facts = {"weight_quant": held.to_json(), "pack_device": pack_device(self.device_type)}
        if not isinstance(ckpt, Checkpoint):               # a GGUF store's key always names its pack device
            facts.update(pack_device=pack_device(self.device_type), source_format="gguf",
                         source_quants="keep" if self.keep_source else "dequantize", asked_quant=self.quant.to_json() if self.quant is not None else None,
                         notes=conversion_notes(ckpt, extents, dtype, self.keep_source))
        return facts


def _convert_locked(ckpt: Checkpoint, out: Path, want: _Target, progress: ProgressFn | None,
                    restart: bool, report: ReportFn, overwrite_other: bool, elsewhere: str) -> Path:
    """The body of ``convert`` while holding the directory lock."""
    target = resolve_dtype(want.dtype, ckpt.config.dtype)
    key = store_key(ckpt.source, target, want.quant, want.device_type, want.keep_source)
    extents = planned_layout(ckpt, target, want.quant, want.device_type, want.keep_source)
    total = extents[-1].offset + extents[-1].padded_nbytes
    if restart:
        _remove_store_files(out)
    else:
        if not overwrite_other:
            _refuse_other_checkpoint(out, ckpt.source)
        with progress_or_bar(progress, total, "converting") as bar:
            if _reuse_or_repair(ckpt, target, out, key, extents, bar, report, elsewhere):
                write_side_files(ckpt, out, fresh=False)
                return out
    for name in (MANIFEST_FILE, DAMAGE_FILE, DATA_FILE):    # from here on nothing looks valid
        (out / name).unlink(missing_ok=True)
    done = {} if restart else _resume_state(out, key, extents, report)
    resume_at = max((e.offset + e.padded_nbytes for e in extents if e.name in done), default=0)
    check_offload_dir(out, need_bytes=total - resume_at, elsewhere=elsewhere)
    facts = want.facts(ckpt, extents, target)
    with progress_or_bar(progress, total, "converting") as bar:
        crcs = _write_extents(ckpt, target, out, extents, done, key, bar, facts)
    _finish(out, ckpt, target, key, [_with_crc(e, crcs[e.name]) for e in extents], facts)
    write_side_files(ckpt, out)
    return out


def _with_crc(e: Extent, crc: tuple[int, ...]) -> Extent:
    return Extent(e.name, e.offset, e.nbytes, e.padded_nbytes, e.tensors, crc)


def _remove_store_files(out: Path) -> None:
    """Everything ``convert`` writes in ``out`` (the locks stay: a peer may be waiting on them)."""
    for name in (MANIFEST_FILE, DAMAGE_FILE, DATA_FILE, DATA_FILE + PARTIAL_SUFFIX, STATE_FILE):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _read_state(out: Path) -> dict[str, Any]:
    """The resume state of an interrupted conversion ({} when absent or unreadable)."""
    try:
        state = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _refuse_other_checkpoint(out: Path, checkpoint_dir: Path) -> None:
    """StoreError when ``out`` holds the store, or an unfinished conversion, of another checkpoint
    (``checkpoint_dir``: the source as stores record it, ``source_path``)."""
    raw, _ = existing_manifest(out)
    recorded = (raw or {}).get("source_dir") or _read_state(out).get("source_dir")
    if recorded and str(recorded) != str(checkpoint_dir.resolve()):
        what = "weight store" if raw else "unfinished conversion"
        raise StoreError(f"{out} holds the {what} of another checkpoint ({recorded}); converting {checkpoint_dir} "
                         "there would overwrite it. Choose another directory, or pass --restart "
                         "(restart=True) to replace it")


def _reuse_or_repair(ckpt: Source, dtype: torch.dtype, out: Path, key: str, extents: list[Extent],
                     progress: ProgressFn, report: ReportFn, elsewhere: str) -> bool:
    """True when ``out`` now holds a verified store of this conversion: reused, or repaired in place."""
    raw, problem = existing_manifest(out)
    if problem is not None:
        report(f"the store manifest is unusable ({problem}): converting everything again")
        return False
    if raw is None:
        return False
    if raw["source_key"] != key:
        held = WeightQuant.from_json(raw.get("weight_quant"))
        what = f"{raw.get('dtype')}, weights {held.describe() if held else '16-bit'}"
        what += f", packed for {raw.get('pack_device')}" if held else ""
        report(f"{out} holds another conversion ({what}) or one of an older version of {ckpt.dir}: "
               "converting again")
        return False
    recorded = {n: extent_from_json(n, e) for n, e in raw["extents"].items()}
    if set(recorded) != {e.name for e in extents} or \
            layout_digest([recorded[e.name] for e in extents]) != layout_digest(extents):
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
        write_json_atomic(out / DAMAGE_FILE, {"extents": sorted(e.name for e, _ in bad)})  # until repaired
        new = _rewrite_extents(ckpt, dtype, out / DATA_FILE, [e for e, _ in bad], ordered, progress, elsewhere)
        for name, crc in new.items():
            raw["extents"][name]["crc32"] = list(crc)
        write_json_atomic(out / MANIFEST_FILE, raw)
        report(f"repaired the weight store {out}: {len(bad)} of {len(extents)} extents re-converted")
    (out / DAMAGE_FILE).unlink(missing_ok=True)
    fsync_dir(out)
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


def _rewrite_extents(ckpt: Source, dtype: torch.dtype, data_path: Path, bad: list[Extent],
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
    if state.get("source_key") != key or state.get("layout") != layout_digest(extents) or not partial.is_file():
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


def _write_extents(ckpt: Source, dtype: torch.dtype, out: Path, extents: list[Extent],
                   done: dict[str, tuple[int, ...]], key: str, report: ProgressFn,
                   facts: dict[str, Any]) -> dict[str, tuple[int, ...]]:
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
            write_json_atomic(out / STATE_FILE, {"source_key": key, "layout": layout_digest(extents),
                                                  "source_dir": str(ckpt.source),
                                                  "dtype": str(dtype).removeprefix("torch."), **facts,
                                                  "done": {n: list(c) for n, c in crcs.items()}})
    return crcs


def _release_source_pages(ckpt: Source) -> None:
    """Unmap the checkpoint and drop its cached pages, so memory stays bounded by about one extent."""
    ckpt.close()    # safetensors tensors are views of its mmap; closing unmaps once they are gone
    for path in ckpt.files():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _write_extent(f: Any, ckpt: Source, dtype: torch.dtype, e: Extent,
                  report: Callable[[int], None]) -> tuple[int, ...]:
    """Stream the extent's tensors, one at a time, into ``f``; returns its block CRCs. A quantized
    weight is read, checked, quantized, and written as its packed data then its qparams; one a GGUF
    source holds in that very scheme is packed from the source's codes (``source_codes``)."""
    crc = _BlockCrc(CRC_BLOCK_BYTES)
    pos = 0
    qparams: torch.Tensor | None = None       # of the quantized weight just written: the next entry
    for key, entry in e.tensors.items():
        pad = entry.offset - pos
        if qparams is not None:
            assert key.endswith(QPARAMS_SUFFIX), (e.name, key)
            tensor, qparams = qparams, None
        elif entry.quant is not None and (codes := source_codes(ckpt, hf_name(e.name, key), entry.quant)) is not None:
            ckpt.check_finite(hf_name(e.name, key), codes[1])    # scales and minimums NaN, inf or overflowing
            tensor, qparams = pack_weight(*codes, entry.quant)
        else:
            tensor = ckpt.tensor(hf_name(e.name, key), dtype).contiguous()
            ckpt.check_finite(hf_name(e.name, key), tensor)     # NaN, inf or overflow: refuse, naming it
            if entry.quant is not None:
                tensor, qparams = quantize_weight(tensor, entry.quant)
        tensor = tensor.contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy()     # (nbytes,) view, no copy
        assert pad >= 0 and data.nbytes == entry.nbytes, (e.name, key, pad, data.nbytes, entry.nbytes)
        for chunk in (bytes(pad), data):
            f.write(chunk)
            crc.update(memoryview(chunk).cast("B"))
        pos = entry.offset + entry.nbytes
        del tensor, data
        report(pos)
    assert pos == e.nbytes and qparams is None
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


def _finish(out: Path, ckpt: Source, dtype: torch.dtype, key: str, extents: list[Extent],
            facts: dict[str, Any]) -> None:
    """Publish the data file, then the manifest (the commit point), then drop the resume state."""
    partial = out / (DATA_FILE + PARTIAL_SUFFIX)
    with open(partial, "r+b") as f:
        os.fsync(f.fileno())
    os.replace(partial, out / DATA_FILE)
    config = source_config(ckpt)
    source_dtype = str(config.pop("torch_dtype", None) or config.get("dtype") or "float32")
    config["dtype"] = str(dtype).removeprefix("torch.")
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "data_file": DATA_FILE,
        "architecture": ckpt.config.architecture, "dtype": config["dtype"], "source_dtype": source_dtype,
        "source_key": key, "source_dir": str(ckpt.source), "alignment_bytes": ALIGN_BYTES,
        "crc_block_bytes": CRC_BLOCK_BYTES, **facts,
        "data_bytes": extents[-1].offset + extents[-1].padded_nbytes,
        "config": config, "extents": {e.name: extent_to_json(e) for e in extents},
    }
    write_json_atomic(out / MANIFEST_FILE, manifest)
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



def cached_store_dir(checkpoint_dir: str | Path, offload_dir: str | Path, dtype: str | torch.dtype | None = None,
                     quant: WeightQuant | None = None, device_type: str = "cpu", keep_source: bool = True) -> Path:
    """Where ``cached_store`` keeps the store of ``checkpoint_dir`` (or GGUF model) at ``dtype`` with
    ``quant`` packed for ``device_type`` (nothing is created)."""
    cdir = Path(checkpoint_dir)
    if not is_gguf_source(cdir) and not (cdir / "config.json").is_file():
        Checkpoint(cdir)    # raises the checkpoint's own clear error
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in source_name(cdir)) or "model"
    return Path(offload_dir) / "stores" / f"{name}-{store_key(cdir, dtype, quant, device_type, keep_source)}"


def find_cached_store(checkpoint_dir: str | Path, offload_dir: str | Path, dtype: str | torch.dtype | None = None,
                      quant: WeightQuant | None = None, device_type: str = "cpu",
                      keep_source: bool = True) -> WeightStore | None:
    """The cached store of ``checkpoint_dir`` (at ``dtype``, with ``quant`` packed for
    ``device_type``) when it exists and opens (read-only: nothing is written)."""
    out = cached_store_dir(checkpoint_dir, offload_dir, dtype, quant, device_type, keep_source)
    if not (out / MANIFEST_FILE).is_file():
        return None
    try:
        store = WeightStore.open(out)
    except StoreError:
        return None
    return store if store.source_key == out.name.rsplit("-", 1)[1] else None


def cached_store(checkpoint_dir: str | Path, offload_dir: str | Path, dtype: str | torch.dtype | None = None,
                 progress: ProgressFn | None = None, report: ReportFn | None = None,
                 quant: WeightQuant | None = None, device_type: str = "cpu", keep_source: bool = True) -> Path:
    """The store of ``checkpoint_dir`` (or GGUF model) at ``dtype`` (with ``quant``, packed for
    ``device_type``; ``keep_source``: see ``convert``) under ``offload_dir/stores``, converted on first use.

    The directory name carries ``store_key``, so a changed checkpoint (files, sizes, mtimes),
    another dtype or another quantization gets a fresh conversion instead of stale weights; the
    stores that older versions of the same checkpoint left are then removed
    (``remove_stale_stores``). A store that does not
    open (damaged manifest, truncated data file, an extent found corrupt while streaming) is
    repaired by ``convert``, which re-verifies it, instead of failing.
    """
    cdir = Path(checkpoint_dir)
    out = check_offload_dir(cached_store_dir(cdir, offload_dir, dtype, quant, device_type, keep_source))
    if find_cached_store(cdir, offload_dir, dtype, quant, device_type, keep_source) is not None:
        return out
    path = convert(cdir, out, dtype=dtype, progress=progress, report=report, overwrite_other=True,
                   elsewhere=OFFLOAD_ELSEWHERE, quant=quant, device_type=device_type, keep_source=keep_source)
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
    source = str(source_path(checkpoint_dir))
    removed = []
    for d in sorted(p for p in Path(stores_dir).iterdir() if p.is_dir() and p != keep):
        manifest, _ = existing_manifest(d)
        facts = manifest or _read_state(d)
        if str(facts.get("source_dir") or "") != source or not facts.get("dtype"):
            continue
        try:
            asked = facts.get("asked_quant") if facts.get("source_format") == "gguf" else facts.get("weight_quant")
            current = _key(Path(checkpoint_dir), str(facts["dtype"]), WeightQuant.from_json(asked),
                           str(facts.get("pack_device") or "cpu"), facts.get("source_quants") != "dequantize")
        except (ValueError, TierkvError, KeyError, TypeError):   # a dtype or scheme this tierkv does not know
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


__all__ = ["ReportFn", "cached_store", "cached_store_dir", "check_offload_dir", "convert", "find_cached_store",
           "remove_stale_stores", "store_key"]
