"""Lazy reader of GGUF files (llama.cpp's format) with the protocol of ``io.checkpoint.Checkpoint``.

Why this module exists: people hold their models as GGUF files, often 4-6-bit quantized. tierkv
runs a GGUF model by converting it once into its own weight store (``io.convert``), so what the
converter needs is a reader that answers like a HF checkpoint: the model's config (built from the
metadata by ``io.gguf_config``), one tensor at a time under its HF name (dequantized, Llama's Q/K
rows un-permuted), and, for the weights the file holds quantized, the scheme they keep in the
store (``source_quants``) and their codes (``quantized_codes``). Discovery takes a .gguf file, a
directory holding one GGUF (or one split set), or any part of a split set. The files are parsed
once with ``gguf.GGUFReader`` (memory-mapped, metadata only) and tensor data is then read with
plain reads, one tensor at a time, so nothing stays mapped between tensors.

Needs the ``gguf`` package (``INSTALL_HINT`` says how to get it); importing tierkv does not.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tierkv.config import ConfigError, ModelConfig
from tierkv.io.checkpoint import LAYER_PREFIX, CheckpointError, all_usable
from tierkv.io.gguf_config import ARCHITECTURES, ROPE_FREQS_TENSOR, GGUFMetadataError, hf_config
from tierkv.io.progress import ProgressFn, progress_or_bar
from tierkv.errors import ArgumentError
from tierkv.io.gguf_blocks import GGUF_SCHEMES, blocks_to_groups
from tierkv.quantspec import EMBED_WEIGHT, HEAD_WEIGHT, LAYER_LINEARS

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# GGUF types kept quantized in the store (``io.gguf_blocks``): 4-bit values -> int4 groups of 32, 5/6/8-bit -> int8
SOURCE_SCHEMES = {name: s.scheme for name, s in GGUF_SCHEMES.items()}
# other types gguf.quants dequantizes: stored 16-bit, or re-quantized when --quant asks
OTHER_TYPES = ("Q2_K", "Q3_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
               "TQ1_0", "TQ2_0", "MXFP4")
INSTALL_HINT = ("install the GGUF reader and tokenizer converter with `pip install 'gguf>=0.10' 'transformers>=5.24'` "
                "(what the tierkv[gguf] extra installs; from a tierkv checkout: `pip install -e '.[gguf]'`)")


class GGUFError(CheckpointError):
    """A GGUF file is not one, truncated, of an unsupported model or tensor type, or a split set misses a
    part; the message names the file, the reason and what to do."""


def import_gguf() -> Any:
    """The ``gguf`` package, or GGUFError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise GGUFError(f"reading GGUF files needs the gguf package; {INSTALL_HINT}") from None
    return gguf


def is_gguf_source(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF model: a ``*.gguf`` file, or a directory without config.json or a
    weight store that holds ``*.gguf`` files."""
    p = Path(path)
    if p.suffix.lower() == GGUF_SUFFIX:
        return True
    return p.is_dir() and not (p / "config.json").is_file() and not (p / "manifest.json").is_file() \
        and any(c.suffix.lower() == GGUF_SUFFIX for c in p.iterdir())


def gguf_parts(path: str | Path) -> list[Path]:
    """The GGUF files of a model, in order: the file itself, the one GGUF in a directory, or every part
    of the split set ``path`` (a directory or any part) belongs to. GGUFError names what is missing."""
    p = Path(path)
    if p.is_dir():
        found = sorted(c for c in p.iterdir() if c.suffix.lower() == GGUF_SUFFIX and c.is_file())
        sets = {(_SPLIT.match(c.name).group("stem") if _SPLIT.match(c.name) else c.name) for c in found}
        if len(sets) != 1:
            names = ", ".join(c.name for c in found) or "none"
            raise GGUFError(f"{p} holds {len(sets)} GGUF models ({names}); pass the .gguf file to use")
        p = found[0]
    if not p.is_file():
        raise GGUFError(f"{p} does not exist; pass a .gguf file, a directory holding one, or a part of a split set")
    m = _SPLIT.match(p.name)
    if m is None:
        return [p]
    count = int(m.group("count"))
    parts = [p.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}{p.suffix}") for i in range(1, count + 1)]
    missing = [q.name for q in parts if not q.is_file()]
    if missing:
        raise GGUFError(f"the split GGUF set {m.group('stem')} has {count} parts but {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} missing from {p.parent}; download every part")
    return parts


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor's data lies and how it is encoded."""

    file: Path
    gguf_name: str
    type_name: str              # GGML type, e.g. "Q4_K", "F16"
    ggml_type: int
    shape: tuple[int, ...]      # HF order: (N, K) for a linear weight
    offset: int                 # absolute byte offset in ``file``
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


class GGUFCheckpoint:
    """A GGUF model opened for tensor-by-tensor reading under HF names (Checkpoint's protocol).

    ``config`` is the ModelConfig built from the metadata (``config_dict`` the HF dict it came from);
    ``tensor(name, dtype)`` a dequantized tensor; ``source_quants()`` / ``quantized_codes(name)`` the
    weights the file holds in a type the store keeps quantized, and their codes.
    """

    def __init__(self, path: str | Path) -> None:
        self.gguf = import_gguf()
        self.parts = gguf_parts(path)
        self.source = self.parts[0].resolve()       # what stores record as their source
        self.dir = self.parts[0].parent
        readers = [self._reader(p) for p in self.parts]
        self._check_split(readers)
        fields = readers[0].fields
        self.metadata: dict[str, Any] = {k: _field_value(f) for k, f in fields.items()
                                         if not k.startswith("tokenizer.ggml.") or not _is_array(f)}
        self._tensors = {t.gguf_name: t for r, p in zip(readers, self.parts) for t in self._tensor_infos(r, p)}
        # the first part's reader stays for the tokenizer (metadata pages only); tensor data is read with plain
        # reads, never through a map, so no tensor's pages stay mapped
        self._reader_0 = readers[0]
        del readers
        self.architecture = self._arch()
        self.config_dict = self._config_dict()
        try:
            self.config = ModelConfig.from_dict(self.config_dict, source=f"{self.source} (GGUF metadata)")
        except ConfigError as exc:
            raise GGUFError(f"{exc}; the file's metadata does not describe a model tierkv runs") from None
        self._hf = self._map_names()

    # -- discovery ---------------------------------------------------------------------------
    def _reader(self, path: Path) -> Any:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf file "
                            "made by llama.cpp, or a Hugging Face model directory")
        try:
            return self.gguf.GGUFReader(path)
        except (ValueError, IndexError, OSError, KeyError) as exc:
            raise GGUFError(f"{path} cannot be read as GGUF ({exc}); the file is truncated or corrupt: "
                            "download it again") from None

    def _check_split(self, readers: list[Any]) -> None:
        for i, (reader, path) in enumerate(zip(readers, self.parts)):
            count, no = (_field_value(reader.fields.get(k)) for k in ("split.count", "split.no"))
            if len(self.parts) > 1 and count is None:
                raise GGUFError(f"{path} is named as part {i + 1} of a split set but has no split.count metadata; "
                                "it is not a part of a split GGUF: rename it or download the set again")
            if count is not None and (int(count) != len(self.parts) or int(no or 0) != i):
                raise GGUFError(f"{path} says it is part {int(no or 0) + 1} of {count}, but its name makes it part "
                                f"{i + 1} of {len(self.parts)}; the parts are mixed from different sets: download "
                                "them again")

    def _tensor_infos(self, reader: Any, path: Path) -> Iterator[GGUFTensor]:
        size = path.stat().st_size
        for t in reader.tensors:
            type_name = self.gguf.GGMLQuantizationType(int(t.tensor_type)).name
            info = GGUFTensor(path, t.name, type_name, int(t.tensor_type), tuple(int(s) for s in reversed(t.shape)),
                              int(t.data_offset), int(t.n_bytes))
            if info.offset + info.nbytes > size:
                raise GGUFError(f"{path} is truncated: tensor {t.name} ends at byte {info.offset + info.nbytes} but "
                                f"the file has {size}; download it again")
            yield info

    def _arch(self) -> str:
        arch = self.metadata.get("general.architecture")
        if arch is None:
            raise GGUFError(f"{self.source} lacks the required metadata key general.architecture; the file is "
                            "incomplete: download it again")
        if arch not in ARCHITECTURES:
            raise GGUFError(f"{self.source} holds a {arch!r} model (general.architecture); tierkv runs GGUF files "
                            f"of the {', '.join(ARCHITECTURES)} architectures")
        return str(arch)

    def _config_dict(self) -> dict[str, Any]:
        embed = self._tensors.get("token_embd.weight")
        if embed is None:
            raise GGUFError(f"{self.source} has no token_embd.weight tensor; the file is incomplete: download it again")
        freqs = self._tensors.get(ROPE_FREQS_TENSOR)
        try:
            return hf_config(self.metadata.get, self.architecture, embed.shape[0], "output.weight" not in self._tensors,
                             self._dequantized(freqs).numpy() if freqs is not None else None, self._file_dtype())
        except GGUFMetadataError as exc:
            raise GGUFError(f"{self.source}: {exc}") from None

    def _file_dtype(self) -> str:
        """The compute dtype the file suggests: float32 for an all-F32 file, its 16-bit float type when
        every weight is one, bfloat16 when weights are quantized (the CPU's fast path for int4/int8)."""
        types = {t.type_name for t in self._tensors.values() if len(t.shape) == 2}
        if types <= {"F32"}:
            return "float32"
        if types <= {"F32", "F16"}:
            return "float16"
        return "bfloat16"

    def _map_names(self) -> dict[str, GGUFTensor]:
        """HF name -> tensor, for every tensor the config implies, with its shape and type checked."""
        cfg = self.config
        arch = next(a for a in self.gguf.MODEL_ARCH if self.gguf.MODEL_ARCH_NAMES[a] == self.architecture)
        names = self.gguf.get_tensor_name_map(arch, cfg.num_layers)
        expected = dict(cfg.global_tensor_shapes())
        for j in range(cfg.num_layers):
            expected.update({f"{LAYER_PREFIX}{j}.{k}": s for k, s in cfg.layer_tensor_shapes().items()})
        out = {}
        for hf_name, shape in expected.items():
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            info = self._tensors.get(gguf_name or "")
            if info is None:
                raise GGUFError(f"{self.source} lacks tensor {gguf_name or hf_name} ({hf_name}), which its metadata "
                                "implies; the file is incomplete or not a model tierkv runs: download it again")
            if info.shape != tuple(shape):
                raise GGUFError(f"tensor {info.gguf_name} in {info.file.name} has shape {list(info.shape)} but the "
                                f"metadata implies {list(shape)}; the file is inconsistent: download it again")
            if info.type_name not in FLOAT_TYPES and info.type_name not in SOURCE_SCHEMES \
                    and info.type_name not in OTHER_TYPES:
                raise GGUFError(f"tensor {info.gguf_name} in {info.file.name} has GGML type {info.type_name}, which "
                                f"tierkv does not read (it reads F32, F16, BF16, {', '.join(SOURCE_SCHEMES)} and "
                                f"{', '.join(OTHER_TYPES)}); use a file quantized to one of those (e.g. Q4_K_M)")
            out[hf_name] = info
        return out

    # -- reading -----------------------------------------------------------------------------
    def info(self, name: str) -> GGUFTensor:
        """Where HF tensor ``name`` lies in the file (KeyError when the model has no such tensor)."""
        if name not in self._hf:
            raise KeyError(f"tensor {name} is not in the GGUF model {self.source}")
        return self._hf[name]

    def _raw(self, info: GGUFTensor) -> np.ndarray:
        """The tensor's bytes (nbytes,) uint8, read without a memory map."""
        raw = np.fromfile(info.file, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if raw.size != info.nbytes:
            raise GGUFError(f"{info.file} ends inside tensor {info.gguf_name}; the file is truncated: "
                            "download it again")
        return raw

    def _dequantized(self, info: GGUFTensor) -> torch.Tensor:
        """The tensor as stored in the file (rows as the file orders them), float32/16-bit as stored, else
        dequantized to float32 by gguf.quants."""
        raw = self._raw(info)
        if info.type_name in FLOAT_TYPES:
            return torch.frombuffer(bytearray(raw), dtype=getattr(torch, FLOAT_TYPES[info.type_name])).view(info.shape)
        rows = raw.reshape(int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1, -1)   # (N, row bytes)
        values = self.gguf.quants.dequantize(rows, self.gguf.GGMLQuantizationType(info.ggml_type))
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(info.shape)

    def row_order(self, name: str) -> torch.Tensor | None:
        """Indices that undo llama.cpp's Q/K row permutation of LLAMA-arch files (weight or bias rows of
        ``name``: file rows -> HF rows); None for every other tensor."""
        if self.architecture != "llama" or not name.startswith(LAYER_PREFIX):
            return None
        key = name.split(".", 3)[3]
        heads = {"self_attn.q_proj": self.config.num_heads, "self_attn.k_proj": self.config.num_kv_heads}.get(
            key.rsplit(".", 1)[0])
        if heads is None:
            return None
        n = self._hf[name].shape[0]
        return torch.arange(n).view(heads, n // heads // 2, 2).transpose(1, 2).reshape(n)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor under its HF name: F32/F16/BF16 as stored, other types dequantized (float32),
        Q/K rows in HF order; optionally cast."""
        t = self._dequantized(self.info(name))
        order = self.row_order(name)
        t = t[order] if order is not None else t
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def layer(self, j: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {key: self.tensor(f"{LAYER_PREFIX}{j}.{key}", dtype) for key in self.config.layer_tensor_shapes()}

    def globals(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name, dtype) for name in self.config.global_tensor_shapes()}

    # -- quantized weights -------------------------------------------------------------------
    def source_quants(self) -> dict[str, tuple[str, int]]:
        """HF name -> (scheme, group size) for the weights the store keeps quantized from the file: the
        layer linears, the head and the embedding held in a type of ``SOURCE_SCHEMES``; for a tied model
        whose embedding is so held, ``lm_head.weight`` too (the store packs the head from the embedding's
        codes: ``tied_head``)."""
        linears = {f"{n}.weight" for n in LAYER_LINEARS}
        out = {name: GGUF_SCHEMES[info.type_name][:2] for name, info in self._hf.items()
               if info.type_name in SOURCE_SCHEMES and (name in (HEAD_WEIGHT, EMBED_WEIGHT)
                                                        or name.split(".", 3)[-1] in linears)}
        if self.tied_head():
            out[HEAD_WEIGHT] = out[EMBED_WEIGHT]
        return out

    def tied_head(self) -> bool:
        """Whether the model ties its head to an embedding the file holds in a type of ``SOURCE_SCHEMES``:
        then ``lm_head.weight`` names the embedding's codes (``quantized_codes``, ``source_types``)."""
        return self.config.tie_word_embeddings and self._hf[EMBED_WEIGHT].type_name in SOURCE_SCHEMES

    def source_types(self) -> dict[str, str]:
        """HF name -> GGML type name of every tensor the model uses (a ``tied_head`` under both names)."""
        types = {name: info.type_name for name, info in self._hf.items()}
        return {**types, HEAD_WEIGHT: types[EMBED_WEIGHT]} if self.tied_head() else types

    def quantized_codes(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (N, K) uint8, qparams (K/32, N, 2) float16) of a weight in ``source_quants``, rows in HF
        order, ``w = codes * scale + minimum``: the file's blocks decoded straight into groups by
        ``io.gguf_blocks.blocks_to_groups`` (bit-exact for Q8_0/Q4_0/Q4_1/Q5_0/Q5_1; its docstring
        states the K-quants' error), never through 16-bit. A ``tied_head``'s are the embedding's."""
        if name not in self.source_quants():
            raise KeyError(f"tensor {name} ({self.source_types().get(name)}) is not kept quantized from {self.source}")
        name = EMBED_WEIGHT if name == HEAD_WEIGHT and self.tied_head() else name
        info = self.info(name)
        n, k = info.shape
        try:
            codes, qparams = blocks_to_groups(info.type_name, self._raw(info).reshape(n, -1), k)
        except ArgumentError as exc:
            raise GGUFError(f"tensor {info.gguf_name} in {info.file}: {exc}; the file is corrupt: download it "
                            "again") from None
        codes_t, qparams_t = torch.from_numpy(codes), torch.from_numpy(qparams)   # (N, K), (K/32, N, 2)
        order = self.row_order(name)
        return (codes_t, qparams_t) if order is None else (codes_t[order], qparams_t[:, order].contiguous())

    # -- values ------------------------------------------------------------------------------
    def check_finite(self, name: str, tensor: torch.Tensor) -> None:
        """GGUFError naming ``name`` and its file unless every value of ``tensor`` is finite and usable."""
        if not all_usable(tensor):
            info = self._hf.get(name)
            where = f"{info.gguf_name} in {info.file}" if info is not None else str(self.source)
            raise GGUFError(f"tensor {name} ({where}) holds NaN, infinite or huge values (in {tensor.dtype}); the "
                            "file is corrupt or does not fit this dtype: download it again, or use --dtype float32")

    def verify(self, dtype: torch.dtype | None = None, progress: ProgressFn | None = None) -> None:
        """``check_finite`` on every tensor the model uses, as read and cast to ``dtype`` (one tensor at a time)."""
        total = sum(info.nbytes for info in self._hf.values())
        done = 0
        with progress_or_bar(progress, total, "verifying") as report:
            for name, info in self._hf.items():
                t = self.tensor(name)
                self.check_finite(name, t)
                if dtype is not None:
                    self.check_finite(name, t.to(dtype))
                done += info.nbytes
                report(done, total)

    # -- facts -------------------------------------------------------------------------------
    def type_counts(self) -> dict[str, int]:
        """GGML type name -> how many of the model's tensors have it."""
        return dict(Counter(info.type_name for info in self._hf.values()))

    def bits_per_weight(self) -> float:
        """Bits per value of the model's tensors in the file."""
        return 8 * sum(i.nbytes for i in self._hf.values()) / max(1, sum(i.numel for i in self._hf.values()))

    def reader(self) -> Any:
        """The ``gguf.GGUFReader`` of the first (metadata) part, e.g. for the tokenizer (parsing one again
        costs seconds for a 150K-token vocabulary)."""
        return self._reader_0

    def files(self) -> list[Path]:
        return list(self.parts)

    def close(self) -> None:
        """Nothing stays open between tensors (plain reads); kept for Checkpoint's protocol."""

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_array(field: Any) -> bool:
    return bool(field.types) and field.types[0].name == "ARRAY"


def _field_value(field: Any) -> Any:
    """A metadata field's value (str, number, bool, list), None when absent."""
    if field is None:
        return None
    value = field.contents()
    return value


__all__ = ["FLOAT_TYPES", "GGUFCheckpoint", "GGUFError", "GGUFTensor", "INSTALL_HINT", "OTHER_TYPES",
           "SOURCE_SCHEMES", "gguf_parts", "import_gguf", "is_gguf_source"]
