"""Lazy reader of Hugging Face safetensors checkpoints (single file or sharded with an index).

Why this module exists: a 70B checkpoint does not fit in RAM, so nothing may read a whole file at
once. ``Checkpoint`` maps every tensor name to its shard, checks the files up front (missing
shards, truncated headers, wrong shapes) so that a broken download fails before any work starts,
and then hands out one tensor, or one layer's tensors, at a time through safetensors' memory map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from tierkv.config import ConfigError, ModelConfig, read_json
from tierkv.errors import ArgumentError, TierkvError

LAYER_PREFIX = "model.layers."
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


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
        cfg = self.config
        expected = dict(cfg.global_tensor_shapes())
        for j in range(cfg.num_layers):
            for key, shape in cfg.layer_tensor_shapes().items():
                expected[f"{LAYER_PREFIX}{j}.{key}"] = shape
        for name, shape in expected.items():
            path = self._where.get(name)
            if path is None:
                raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.dir}; "
                                      "the files do not match config.json: download the model again")
            actual = tuple(self._open(path).get_slice(name).get_shape())
            if actual != shape:
                raise CheckpointError(f"tensor {name} in {path.name} has shape {list(actual)} but config.json "
                                      f"implies {list(shape)}; the weights and config.json do not belong together")

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

    def files(self) -> list[Path]:
        """The safetensors files of this checkpoint."""
        return sorted(set(self._files.values()))

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "resolve_dtype", "LAYER_PREFIX"]
