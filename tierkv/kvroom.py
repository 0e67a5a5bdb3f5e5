"""The KV room: one engine-lifetime owner of every sequence's KV cache and of the rooms they share.

Why this module exists: the plan leaves one device room and one host room for KV; many sequences
(and idle sessions) share them. The scheduler decides the shares as numbers (``KVSizer`` here
gives it the sizes, from the KV package's pure sizing functions); this module turns them into
caches — each sequence's own ``DenseKVCache`` or ``TieredKVCache``, opened with its allotment on
the engine's shared KV worker threads and offload directory — and moves a parked session's KV
off its cache (to host tensors or to a session file on disk) and back, in bounded pieces.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tierkv.config import ModelConfig, Policy
from tierkv.pipeline import kv
from tierkv.plan import Plan
from tierkv.scheduler import Admission

__all__ = ["KVRoom", "pieces", "sequence_minimum_bytes"]

_log = logging.getLogger(__name__)

COPY_PIECE_BYTES = 8 << 20          # K/V of one layer moved at a time when a cache is saved, parked or restored

ReadKV = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]


class KVRoom:
    """Caches per sequence within the plan's KV rooms; also the scheduler's ``KVSizer``."""

    def __init__(self, cfg: ModelConfig, policy: Policy, dtype: torch.dtype, device: torch.device,
                 plan: Plan | None, attention_scratch_bytes: int, head_rows: int,
                 write_parked: Callable[[Path, Any, ReadKV, int], Any]) -> None:
        """``write_parked(path, seq, read_kv, tokens)`` writes a parked session's KV to a file and returns
        its handle (``session.ParkedFile``: the file format sits above this module).

        Where the plan found no device room for the key codes (``Plan.kv_sketch_note``), caches are
        built without them, their stats say why, and a warning says so at load."""
        self.sketch_note = plan.kv_sketch_note if plan is not None and plan.kv_sketch_note else None
        if self.sketch_note is not None:
            policy = replace(policy, kv_sketch=False)
            _log.warning("sparse key codes: %s", self.sketch_note)
        self.cfg, self.policy, self.dtype, self.device = cfg, policy, dtype, device
        self.device_room_bytes = plan.kv_device_bytes if plan is not None else None
        self.host_room_bytes = plan.kv_host_bytes if plan is not None else None
        self.offload_dir = Path(plan.offload_dir) if plan is not None else None
        self.scratch_bytes, self.head_rows = attention_scratch_bytes, head_rows
        self.workers = kv.KVWorkers(device)
        self._write_parked = write_parked
        self._per_token = kv.kv_bytes_per_token(cfg, dtype)

    # -- sizes (the scheduler's KVSizer) -------------------------------------------------------
    def minimum_bytes(self, capacity_tokens: int) -> int:
        return sequence_minimum_bytes(self.cfg, self.policy, self.dtype, capacity_tokens)

    def want_bytes(self, capacity_tokens: int) -> int:
        return kv.kv_device_want_bytes(self.cfg, self.policy, self.dtype, capacity_tokens)

    def host_bytes(self, tokens: int) -> int:
        return self._per_token * tokens

    # -- caches --------------------------------------------------------------------------------
    def make_cache(self, capacity_tokens: int, device_bytes: int | None, host_bytes: int | None,
                   geometry: dict[str, Any] | None = None) -> Any:
        """One sequence's cache for ``capacity_tokens`` with its allotments (None = unbounded)."""
        return kv.make_kv_cache(self.cfg, self.policy, 1, capacity_tokens, self.dtype, self.device,
                             kv_device_bytes=device_bytes, kv_host_bytes=host_bytes,
                             offload_dir=self.offload_dir / "kv" if self.offload_dir is not None else None,
                             attention_scratch_bytes=self.scratch_bytes, workers=self.workers, geometry=geometry,
                             sketch_note=self.sketch_note)

    def open(self, seq: Any, adm: Admission) -> None:
        """Give ``seq`` a cache with the admission's room; bring its kept KV back into it if it has any.

        A cache it outgrew is first copied to host tensors and closed, so the device never holds the
        old and the new cache at once (the copy is host memory outside the host budget, for that moment)."""
        device = adm.device_bytes if self.device_room_bytes is not None else None
        host = adm.host_bytes if self.host_room_bytes is not None else None
        if adm.restore == "cache":
            self.offload(seq, "host")
        restore = "host" if adm.restore == "cache" else adm.restore
        cache = self.make_cache(adm.capacity_tokens, device, host, seq.geometry if restore != "none" else None)
        try:
            if restore == "host":
                self.copy(_host_reader(seq.parked), cache, seq.parked[0][0].shape[2])
            elif restore == "disk":
                seq.parked.restore_into(cache)
        except BaseException:
            cache_close(cache)
            raise
        self._discard_parked(seq)
        seq.cache = cache

    def offload(self, seq: Any, to: str) -> None:
        """Move a parked session's KV off its cache (or off the host) to ``to``: "host" or "disk"."""
        if seq.cache is not None:
            seq.geometry = seq.cache.geometry()
        if to == "host":
            seq.parked = self.host_copy(seq.cache.read_kv, seq.cache.length_tokens)
        else:
            seq.parked = self.spill(seq)
        if seq.cache is not None:
            cache_close(seq.cache)
            seq.cache = None

    def spill(self, seq: Any) -> Any:
        """Write ``seq``'s KV (from its cache or host tensors) into a session file under the offload dir."""
        read, n = self.reader(seq)
        return self._write_parked(self._parked_path(), seq, read, n)

    def host_copy(self, read: ReadKV, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v) host copies (1, Hkv, tokens, D) of the first ``tokens`` positions ``read`` gives."""
        return [tuple(t.to("cpu", copy=True) for t in read(j, 0, tokens))  # type: ignore[misc]
                for j in range(self.cfg.num_layers)]

    def _parked_path(self) -> Path:
        assert self.offload_dir is not None, "a KV room without an offload directory never spills to disk"
        return self.offload_dir / "sessions" / f"parked-{uuid.uuid4().hex[:12]}.tkvs"

    def reader(self, seq: Any) -> tuple[ReadKV, int]:
        """(read_kv(layer, start, end), tokens) over wherever ``seq``'s KV is now (cache or host tensors)."""
        if seq.cache is not None:
            return seq.cache.read_kv, seq.cache.length_tokens
        assert isinstance(seq.parked, list), "the KV is in a file already"
        return _host_reader(seq.parked), seq.parked[0][0].shape[2]

    def drop(self, seq: Any) -> None:
        """Free ``seq``'s KV wherever it is: the cache (every tier), host tensors, an engine-owned file."""
        if seq.cache is not None:
            cache_close(seq.cache)
            seq.cache = None
        self._discard_parked(seq)

    def _discard_parked(self, seq: Any) -> None:
        if seq.parked is not None and hasattr(seq.parked, "discard"):
            seq.parked.discard()
        seq.parked = None

    def piece_tokens(self) -> int:
        """Tokens per piece so that one layer's K/V of a piece stays within COPY_PIECE_BYTES."""
        return max(1, COPY_PIECE_BYTES // max(1, self._per_token // self.cfg.num_layers))

    def copy(self, read: ReadKV, cache: Any, tokens: int) -> None:
        """Feed ``tokens`` positions of KV from ``read`` into the empty ``cache``, a piece at a time."""
        assert cache.length_tokens == 0
        for start, end in pieces(tokens, self.piece_tokens()):
            for layer in range(self.cfg.num_layers):
                k, v = read(layer, start, end)
                cache.append_kv(layer, k.to(self.device), v.to(self.device))
            cache.advance(end - start)

    def close(self) -> None:
        self.workers.close()


def sequence_minimum_bytes(cfg: ModelConfig, policy: Policy, dtype: torch.dtype, capacity_tokens: int) -> int:
    """Fewest device bytes one sequence's cache for ``capacity_tokens`` runs with: the tiered cache's
    minimum at every chunk size it may choose, with the key codes it keeps (the plan's room holds them
    at the full context, so each admitted sequence keeps them too), or the dense cache's when smaller."""
    codes = kv.keeps_sketch(policy)
    tiered = kv.kv_device_minimum_bytes(cfg, policy, dtype, 1, capacity_tokens, sketch=codes)
    return min(tiered, kv.kv_device_want_bytes(cfg, policy, dtype, capacity_tokens))


def cache_close(cache: Any) -> None:
    if hasattr(cache, "close"):
        cache.close()


def _host_reader(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> ReadKV:
    def read(layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = layers[layer]
        return k[:, :, start:end], v[:, :, start:end]
    return read


def pieces(tokens: int, piece_tokens: int) -> Iterator[tuple[int, int]]:
    for start in range(0, tokens, piece_tokens):
        yield start, min(tokens, start + piece_tokens)

