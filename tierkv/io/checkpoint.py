"""Lazy reader of Hugging Face safetensors checkpoints (single file or sharded with an index).

Why this module exists: a 70B checkpoint does not fit in RAM, so nothing may read a whole file at
once. ``Checkpoint`` maps every tensor name to its shard, checks the files up front (missing
shards, truncated headers, wrong shapes) so that a broken download fails before any work starts,
and then hands out one tensor, or one layer's tensors, at a time through safetensors' memory map.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from tierkv.config import ConfigError, ModelConfig, read_json
from tierkv.errors import ArgumentError, TierkvError
from tierkv.io.progress import ProgressFn, progress_or_bar

LAYER_PREFIX = "model.layers."
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype codes tierkv reads -> torch dtype names; others (I8/I32/U8: quantized exports,
# F8_*: FP8 exports, F64, BOOL) are refused at open with the tensor's name
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# a weight beyond this is corruption, not training: its square overflows float32, so no norm or
# matmul can use it (trained weights stay below ~1e3; random bytes read as floats exceed it a
# quarter of the time)
FINITE_LIMIT = 2.0 ** 64
_CHECK_CHUNK_ELEMS = 1 << 22    # values checked per step: bounds the temporaries of a check


class CheckpointError(TierkvError):
    """A checkpoint file is missing, truncated or inconsistent; the message names it and the fix."""


def resolve_dtype(name: str | torch.dtype | None, default: str = "float32") -> torch.dtype:
    """Map ``"bfloat16"``/``"bf16"``/``torch.float16``/... to a torch dtype; None means ``default``."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name or default).lower().removeprefix("torch.")
    key = default if key == "auto" else key
    key = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
           "float": "float32"}.get(key, key)
    if key not in ("bfloat16", "float16", "float32"):
        raise ArgumentError(f"dtype {name!r} is not supported; use bfloat16, float16 or float32")
    return getattr(torch, key)


class Checkpoint:
    """A HF model directory opened for lazy, tensor-by-tensor reading.

    ``config`` is the parsed ModelConfig; ``layer(j)`` returns the tensors of decoder layer j keyed
    by their name after ``model.layers.{j}.``; ``tensor(name)`` reads one tensor.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir} is not a directory; pass the folder that holds config.json "
                                  "and the *.safetensors files")
        self.config = ModelConfig.from_dir(self.dir)
        self._files = self._shard_files()
        self._handles: dict[Path, object] = {}
        self._where: dict[str, Path] = {}
        for path in sorted(set(self._files.values()) if self._files else []):
            for name in self._open(path).keys():
                self._where[name] = path
        self._nbytes: dict[str, int] = {}    # bytes of each tensor the model uses, from the headers
        self._check_shapes()

    # -- discovery ---------------------------------------------------------------------------
    def _shard_files(self) -> dict[str, Path]:
        """tensor name -> shard path from the index; or {"*": file} for a single file."""
        index = self.dir / _INDEX_FILE
        single = self.dir / _SINGLE_FILE
        if index.is_file():
            weight_map = read_json(index, what="safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no 'weight_map'; restore it from the original checkpoint")
            files = {name: self.dir / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"shard {shard.name} is listed in {index.name} but missing from "
                                          f"{self.dir}; download it again")
            return files
        if single.is_file():
            return {"*": single}
        found = sorted(p.name for p in self.dir.glob("*.safetensors"))
        hint = f" (found {', '.join(found)} but no {_INDEX_FILE})" if found else ""
        raise CheckpointError(f"no {_SINGLE_FILE} or {_INDEX_FILE} in {self.dir}{hint}; tierkv reads "
                              "safetensors checkpoints (convert .bin files with transformers' save_pretrained)")

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path} cannot be read as safetensors ({exc}); the file is truncated "
                                      "or corrupt: download it again") from None
            self._handles[path] = handle
        return handle

    def _check_shapes(self) -> None:
        """Every tensor the config implies exists with its shape and a dtype tierkv can use."""
        cfg = self.config
        expected = dict(cfg.global_tensor_shapes())
        for j in range(cfg.num_layers):
            for key, shape in cfg.layer_tensor_shapes().items():
                expected[f"{LAYER_PREFIX}{j}.{key}"] = shape
        dtypes: dict[str, str] = {}
        for name, shape in expected.items():
            path = self._where.get(name)
            if path is None:
                raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.dir}; "
                                      "the files do not match config.json: download the model again")
            info = self._open(path).get_slice(name)
            actual, dtypes[name] = tuple(info.get_shape()), info.get_dtype()
            if actual != shape:
                raise CheckpointError(f"tensor {name} in {path.name} has shape {list(actual)} but config.json "
                                      f"implies {list(shape)}; the weights and config.json do not belong together")
            self._check_dtype_code(name, dtypes[name])
            itemsize = torch.empty((), dtype=getattr(torch, FLOAT_DTYPES[dtypes[name]])).element_size()
            self._nbytes[name] = itemsize * _numel(shape)
        self._check_declared_dtype(dtypes)

    def _check_dtype_code(self, name: str, code: str) -> None:
        """Refuse a tensor stored as anything but float32/float16/bfloat16, saying what to use instead."""
        if code in FLOAT_DTYPES:
            return
        where = f"tensor {name} in {self._where[name].name} has dtype {code}"
        if code == "F64":
            fix = ("re-save the model in float32 (with transformers: "
                   "model.to(torch.float32).save_pretrained(DIR)) and load that")
        elif code.startswith("F8"):
            fix = "FP8 checkpoints are not supported: use the model's bfloat16 or float16 release"
        else:
            fix = ("this looks like a quantized export (GPTQ, AWQ, bitsandbytes), which tierkv does not read: "
                   "use the model's unquantized bfloat16, float16 or float32 release")
        raise CheckpointError(f"{where}, but tierkv reads float32, float16 and bfloat16 weights; {fix}")

    def _check_declared_dtype(self, dtypes: dict[str, str]) -> None:
        """float32 tensors go with any declared dtype (fp32 norms in bf16 checkpoints are common) and
        anything goes with a declared float32 (it widens exactly); but float16 and bfloat16 do not
        convert into each other (fewer mantissa bits one way, overflow past 65504 the other), so a
        tensor of the other half type means the wrong config or files mixed from two exports."""
        declared = str(self.config.dtype).lower().removeprefix("torch.")
        if declared not in ("float16", "bfloat16"):
            return
        other = {n: FLOAT_DTYPES[c] for n, c in dtypes.items() if FLOAT_DTYPES[c] not in ("float32", declared)}
        if not other:
            return
        name, found = next(iter(other.items()))
        if any(FLOAT_DTYPES[c] == declared for c in dtypes.values()):
            fix = (f"the files mix {found} and {declared} tensors from different exports: "
                   "download the model again")
        else:
            fix = f'every half-precision tensor is {found}: set "dtype": "{found}" in config.json'
        raise CheckpointError(f"tensor {name} in {self._where[name].name} is {found} but {self.dir / 'config.json'} "
                              f"declares {declared}, and {found} does not convert exactly to {declared}; {fix}")

    # -- reading -----------------------------------------------------------------------------
    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor, optionally cast)."""
        path = self._where.get(name)
        if path is None:
            raise KeyError(f"tensor {name} is not in the checkpoint {self.dir}")
        try:
            t = self._open(path).get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"reading {name} from {path} failed ({exc}); the file is corrupt: "
                                  "download it again") from None
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def layer(self, j: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All tensors of decoder layer ``j`` keyed like ``self_attn.q_proj.weight``."""
        return {key: self.tensor(f"{LAYER_PREFIX}{j}.{key}", dtype) for key in self.config.layer_tensor_shapes()}

    def globals(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Embedding, final norm and head (``lm_head.weight`` absent when tied)."""
        return {name: self.tensor(name, dtype) for name in self.config.global_tensor_shapes()}

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor the model uses, one at a time, in layer order (for bounded-memory conversion)."""
        for name in self.config.global_tensor_shapes():
            yield name, self.tensor(name)
        for j in range(self.config.num_layers):
            for key in self.config.layer_tensor_shapes():
                yield f"{LAYER_PREFIX}{j}.{key}", self.tensor(f"{LAYER_PREFIX}{j}.{key}")

    # -- values ------------------------------------------------------------------------------
    def check_finite(self, name: str, tensor: torch.Tensor) -> None:
        """Raise CheckpointError naming ``name`` and its file unless every value of ``tensor`` (that
        checkpoint tensor, possibly cast to a compute dtype) is finite and within FINITE_LIMIT.
        Extra memory: one chunk of values."""
        if not all_usable(tensor):
            raise CheckpointError(self._value_problem(name, tensor.dtype))

    def verify(self, dtype: torch.dtype | None = None, progress: ProgressFn | None = None) -> None:
        """Check every tensor the model uses with ``check_finite``, as stored and cast to ``dtype``.

        Reads blocks of rows with plain reads (no memory map) and drops each block's cached pages,
        so memory stays bounded by a few blocks of _CHECK_CHUNK_ELEMS values whatever the model's
        size. ``progress(done_bytes, total_bytes)`` is called after each tensor; without it a bar
        is shown on a terminal.
        """
        total, done = sum(self._nbytes.values()), 0
        offsets = {path: _data_offsets(path) for path in self.files()}
        with progress_or_bar(progress, total, "verifying") as report:
            report(0, total)
            for name in self._nbytes:
                for block in self._row_blocks(name, offsets[self._where[name]][name]):
                    if not all_usable(block) or (dtype is not None and _cast_can_overflow(block.dtype, dtype)
                                                  and not all_usable(block.to(dtype))):
                        raise CheckpointError(self._value_problem(name, dtype or block.dtype))
                done += self._nbytes[name]
                report(done, total)

    def _row_blocks(self, name: str, data_start: int) -> Iterator[torch.Tensor]:
        """Tensor ``name``, whose data starts at byte ``data_start`` of its file, in blocks of whole
        rows (about _CHECK_CHUNK_ELEMS values each), read without a memory map; the file's cached
        pages are dropped behind each read."""
        path = self._where[name]
        info = self._open(path).get_slice(name)
        shape, dtype = info.get_shape(), getattr(torch, FLOAT_DTYPES[info.get_dtype()])
        assert shape, f"{name}: model tensors have at least one dimension"
        row_bytes = _numel(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        rows = max(1, _CHECK_CHUNK_ELEMS // max(1, _numel(shape[1:])))
        with open(path, "rb", buffering=0) as f:
            for first in range(0, shape[0], rows):
                n = min(rows, shape[0] - first)
                buf, offset = bytearray(n * row_bytes), data_start + first * row_bytes
                if os.preadv(f.fileno(), [buf], offset) != len(buf):
                    raise CheckpointError(f"{path} ends inside tensor {name}; the file is truncated: "
                                          "download it again")
                os.posix_fadvise(f.fileno(), offset, len(buf), os.POSIX_FADV_DONTNEED)
                yield torch.frombuffer(buf, dtype=dtype).view(n, *shape[1:])             # (n, ...)

    def _value_problem(self, name: str, dtype: torch.dtype) -> str:
        """Error path: what is wrong with tensor ``name`` (stored values, or only once cast to ``dtype``)."""
        path = self._where[name]
        source = self.tensor(name)
        counts = _bad_value_counts(source)
        if any(counts.values()):
            found = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
            noun = "value" if sum(counts.values()) == 1 else "values"
            return (f"tensor {name} in {path} holds {found} {noun}: the file is corrupt "
                    f"(or was saved from a diverged model); download the checkpoint again")
        peak = float(source.abs().max())
        name_of = str(dtype).removeprefix("torch.")
        return (f"tensor {name} in {path} has values up to {peak:.4g}, which overflow {name_of} "
                f"(largest {torch.finfo(dtype).max:.4g}); use --dtype bfloat16 or --dtype float32 "
                f'(dtype="bfloat16" in tierkv.load)')

    @property
    def source(self) -> Path:
        """What a store converted from this checkpoint records as its source: the directory."""
        return self.dir.resolve()

    def files(self) -> list[Path]:
        """The safetensors files of this checkpoint."""
        return sorted(set(self._files.values()))

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file as stored (after its 8-byte little-endian length):
    every tensor's name, dtype, shape and ``data_offsets`` relative to the header's end. Reads
    only the header, never tensor data."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        header = f.read(struct.unpack("<Q", prefix)[0]) if len(prefix) == 8 else b""
    if len(prefix) != 8 or len(header) != struct.unpack("<Q", prefix)[0]:
        raise CheckpointError(f"{path} ends inside its safetensors header; the file is truncated: download it again")
    return header


def _data_offsets(path: Path) -> dict[str, int]:
    """Byte offset in the file where each tensor's data starts, from the safetensors header."""
    raw = safetensors_header(path)
    return {name: 8 + len(raw) + int(meta["data_offsets"][0]) for name, meta in json.loads(raw).items()
            if name != "__metadata__"}


def _cast_can_overflow(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether values that pass the FINITE_LIMIT check in ``source`` can still overflow ``target``
    (float32/bfloat16 -> float16); widening casts and bfloat16's float32-like range cannot."""
    return torch.finfo(target).max < FINITE_LIMIT and torch.finfo(source).max > torch.finfo(target).max


def all_usable(t: torch.Tensor) -> bool:
    """Every value finite and of magnitude at most FINITE_LIMIT (NaN fails every comparison); one chunk at a time."""
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHECK_CHUNK_ELEMS):
        lo, hi = torch.aminmax(flat[start:start + _CHECK_CHUNK_ELEMS])
        if not (-FINITE_LIMIT <= float(lo) and float(hi) <= FINITE_LIMIT):
            return False
    return True


def _bad_value_counts(t: torch.Tensor) -> dict[str, int]:
    """Error path: how many values are NaN, infinite, or finite beyond FINITE_LIMIT."""
    counts = {"NaN": 0, "infinite": 0, f"huge (magnitude over {FINITE_LIMIT:.3g})": 0}
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHECK_CHUNK_ELEMS):
        part = flat[start:start + _CHECK_CHUNK_ELEMS].float()
        keys = list(counts)
        counts[keys[0]] += int(part.isnan().sum())
        counts[keys[1]] += int(part.isinf().sum())
        counts[keys[2]] += int((part.isfinite() & (part.abs() > FINITE_LIMIT)).sum())
    return counts


def has_weights(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds any safetensors weights (a file, an index, or shards); a directory
    with only config.json can still be planned (``tierkv plan``), not run."""
    path = Path(model_dir)
    return (path / _SINGLE_FILE).is_file() or (path / _INDEX_FILE).is_file() or any(path.glob("*.safetensors"))


__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "FINITE_LIMIT", "FLOAT_DTYPES", "LAYER_PREFIX", "all_usable",
           "has_weights", "resolve_dtype", "safetensors_header"]

