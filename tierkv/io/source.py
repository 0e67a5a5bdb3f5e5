"""What a weight store is converted from: a HF safetensors directory or a GGUF model, behind one protocol.

Why this module exists: ``io.convert`` writes a store from anything with ``io.checkpoint.Checkpoint``'s
protocol; a GGUF file (``io.gguf.GGUFCheckpoint``) answers it too but differs in where its identity,
its config and its tokenizer come from. Those differences live here, in one place, so the
converter, the store cache and the engine ask ``open_source(path)`` and never test the kind again.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Union

import torch

from tierkv.config import ModelConfig, format_size, read_json
from tierkv.io.checkpoint import Checkpoint, resolve_dtype
from tierkv.io.gguf import OTHER_TYPES, GGUFCheckpoint, gguf_parts, is_gguf_source
from tierkv.io.gguf_tokenizer import UnsupportedTokenizer, check_tokenizer, write_tokenizer_files
from tierkv.io.store import Extent, hf_name, logical_shape, plan_layout, write_json_atomic
from tierkv.quantspec import EMBED_WEIGHT, TensorQuant, WeightQuant

Source = Union[Checkpoint, GGUFCheckpoint]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def open_source(path: str | Path) -> Source:
    """The model at ``path`` opened for conversion: a GGUF model (``is_gguf_source``) or a HF checkpoint dir."""
    return GGUFCheckpoint(path) if is_gguf_source(path) else Checkpoint(path)


def source_path(path: str | Path) -> Path:
    """What stores record as their source (``source_dir`` in the manifest): the resolved checkpoint
    directory, or a GGUF model's first file."""
    return gguf_parts(path)[0].resolve() if is_gguf_source(path) else Path(path).resolve()


def source_name(path: str | Path) -> str:
    """A short name for the cached store's directory: the checkpoint directory's, or the GGUF file's stem."""
    p = source_path(path)
    return p.stem if p.suffix.lower() == ".gguf" else p.name


def identity(path: str | Path, dtype: str | torch.dtype | None) -> tuple[list[list[Any]], torch.dtype]:
    """(the files that make up the source as [name, size, mtime_ns], the target dtype ``dtype`` resolves
    to against the source's own). HF: config.json, the safetensors files and their index."""
    p = Path(path)
    if is_gguf_source(p):
        files = gguf_parts(p)
        default = "float32" if dtype is not None else GGUFCheckpoint(p).config.dtype
    else:
        files = sorted(c for c in p.iterdir() if c.name == "config.json" or c.name.endswith(".safetensors")
                       or c.name.endswith(".safetensors.index.json"))
        default = ModelConfig.from_dir(p).dtype
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files], resolve_dtype(dtype, default)


def layout_sources(ckpt: Source, keep_source: bool) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
    """``store.plan_layout``'s (source_quants, source_types) for ``ckpt``: the weights a GGUF model keeps
    in its own scheme (none unless ``keep_source``) and every tensor's GGML type; ({}, {}) for HF."""
    if isinstance(ckpt, GGUFCheckpoint):
        return (ckpt.source_quants() if keep_source else {}), ckpt.source_types()
    return {}, {}


def planned_layout(ckpt: Source, dtype: str | torch.dtype | None = None, quant: WeightQuant | None = None,
                   device_type: str = "cpu", keep_source: bool = True) -> list[Extent]:
    """The extents a store of ``ckpt`` gets (``store.plan_layout`` with the source's own schemes) at
    ``dtype`` (default: the source's), ``quant`` for the rest, packed for ``device_type``."""
    target = resolve_dtype(dtype, ckpt.config.dtype)
    return plan_layout(ckpt.config, target, quant, device_type, *layout_sources(ckpt, keep_source))


def source_codes(ckpt: Source, name: str, tq: TensorQuant) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes, qparams) of weight ``name`` straight from a quantized source when it holds it in ``tq``'s
    scheme and group size (``GGUFCheckpoint.quantized_codes``); None: quantize the dequantized values."""
    if not isinstance(ckpt, GGUFCheckpoint) or ckpt.source_quants().get(name) != (tq.scheme, tq.group_size):
        return None
    return ckpt.quantized_codes(name)


def held_quant(ckpt: Source, extents: list[Extent], asked: WeightQuant | None) -> WeightQuant | None:
    """The weight quantization a store records (``WeightStore.quant``, what the planner sizes layers
    with): ``asked`` for a HF checkpoint; for a GGUF model the scheme and group size holding most of
    the layer linears' weights (None when they are all 16-bit), the head flag set when the head is
    quantized. A GGUF store can mix schemes (Q4_K_M keeps some layers' weights int8): the manifest's
    per-tensor entries are the exact record."""
    if isinstance(ckpt, Checkpoint):
        return asked
    weights: Counter[tuple[str, int]] = Counter()
    head = False
    for e in extents:
        for key, entry in e.tensors.items():
            if entry.quant is None:
                continue
            if e.name == "head":
                head = True
            elif e.name.startswith("layer."):
                rows, inputs = logical_shape(e, key)
                weights[(entry.quant.scheme, entry.quant.group_size)] += rows * inputs
    if not weights:
        return None
    (scheme, group), _ = weights.most_common(1)[0]
    return WeightQuant(scheme, group, head)


def conversion_notes(ckpt: Source, extents: list[Extent], dtype: torch.dtype, keep_source: bool) -> list[str]:
    """What converting a GGUF model changed about its weights, one line each ([] for HF checkpoints and
    for GGUF weights kept as they are): quantized weights dequantized because 16-bit was asked, and
    weights of types tierkv keeps no int4/int8 form of, stored 16-bit or re-quantized, and a tied
    head stored as a second compressed copy of the embedding."""
    if not isinstance(ckpt, GGUFCheckpoint):
        return []
    name = str(dtype).removeprefix("torch.")
    held = {hf_name(e.name, key): entry for e in extents for key, entry in e.tensors.items() if entry.source_type}
    notes = []
    if not keep_source and ckpt.source_quants():
        kinds = sorted({ckpt.source_types()[n] for n in ckpt.source_quants()})
        notes.append(f"the file's {'/'.join(kinds)} weights were dequantized to {name}, as 16-bit weights were asked "
                     "for (leave --quant out to keep them quantized)")
    problem = tokenizer_problem(ckpt)
    if problem is not None:
        notes.append(f"no tokenizer files: {problem}")
    others = sorted({t for t in ckpt.source_types().values() if t in OTHER_TYPES})
    if others:
        requantized = any(e.quant is not None and e.source_type in OTHER_TYPES for e in held.values())
        notes.append(f"{'/'.join(others)} weights have no exact int4/int8 form: "
                     + ("re-quantized as --quant asked" if requantized else
                        f"dequantized to {name} (--quant int4 or int8 re-quantizes them)"))
    head = next((e for e in extents if e.name == "head"), None)
    if ckpt.config.tie_word_embeddings and head is not None:
        notes.append(f"the tied LM head is stored twice compressed: the {ckpt.source_types()[EMBED_WEIGHT]} embedding "
                     f"for row lookups, and its codes packed for the quantized matmul ({format_size(head.nbytes)})")
    return notes


def source_config(ckpt: Source) -> dict[str, Any]:
    """The HF config dict the store's manifest records: config.json, or the one built from GGUF metadata."""
    if isinstance(ckpt, GGUFCheckpoint):
        return dict(ckpt.config_dict)
    return dict(read_json(ckpt.dir / "config.json", what="model configuration"))


def write_side_files(ckpt: Source, out: Path, fresh: bool = True) -> None:
    """The tokenizer and generation files beside the store, so the store opens as a model on its own
    (``tierkv run OUT``); config.json stays in the manifest only (a config.json would make the store
    directory look like a checkpoint). A HF checkpoint's files are copied. A GGUF model's are built
    from its metadata (``io.gguf_tokenizer``) when the store was just written (``fresh``) or lacks
    them; a file whose tokenizer cannot be built gets a generation_config.json with its BOS/EOS ids
    only (text prompts are then refused with a message; token ids work)."""
    if isinstance(ckpt, GGUFCheckpoint):
        if fresh or not (out / "generation_config.json").is_file():
            _gguf_side_files(ckpt, out)
        return
    for name in TOKENIZER_FILES:
        src = ckpt.dir / name
        if src.is_file() and (not (out / name).is_file() or (out / name).read_bytes() != src.read_bytes()):
            shutil.copyfile(src, out / name)


def _gguf_side_files(ckpt: GGUFCheckpoint, out: Path) -> None:
    reader = ckpt.reader()
    if tokenizer_problem(ckpt, reader) is None:
        write_tokenizer_files(reader, out)
        return
    for name in TOKENIZER_FILES:                        # none left from another file converted here before
        (out / name).unlink(missing_ok=True)
    write_json_atomic(out / "generation_config.json",
                      {k: ckpt.config_dict[k] for k in ("bos_token_id", "eos_token_id") if k in ckpt.config_dict})


def tokenizer_problem(ckpt: GGUFCheckpoint, reader: Any = None) -> str | None:
    """Why no tokenizer can be built from the GGUF model's metadata (``gguf_tokenizer.check_tokenizer``),
    or None when one can."""
    try:
        check_tokenizer(reader if reader is not None else ckpt.reader())
    except UnsupportedTokenizer as exc:
        return str(exc)
    return None


__all__ = ["Source", "TOKENIZER_FILES", "conversion_notes", "held_quant", "identity", "layout_sources", "open_source",
           "planned_layout", "source_codes", "source_config", "source_name", "source_path", "tokenizer_problem",
           "write_side_files"]
