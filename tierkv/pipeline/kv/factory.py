"""``make_kv_cache``: the KV cache the policy and the budgets call for.

Why this module exists: the engine asks for "a KV cache for this many sequences of this many
tokens" and must not decide between the resident and the tiered cache itself. The choice (and
the copy of a saved cache's geometry) is made here from ``sizing.dense_fits``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from tierkv.config import ModelConfig, Policy
from tierkv.model import ATTENTION_SCRATCH_BYTES
from tierkv.pipeline.kv.dense import DenseKVCache
from tierkv.pipeline.kv.sizing import dense_fits
from tierkv.pipeline.kv.tiered import TieredKVCache
from tierkv.pipeline.kv.workers import KVWorkers

__all__ = ["make_kv_cache"]


def make_kv_cache(cfg: ModelConfig, policy: Policy, batch: int, capacity_tokens: int, dtype: torch.dtype,
                  device: torch.device | str, *, kv_device_bytes: int | None = None,
                  kv_host_bytes: int | None = None, offload_dir: str | Path | None = None,
                  offload_bytes: int | None = None, attention_scratch_bytes: int = ATTENTION_SCRATCH_BYTES,
                  workers: KVWorkers | None = None,
                  geometry: Mapping[str, Any] | None = None,
                  sketch_note: str | None = None) -> DenseKVCache | TieredKVCache:
    """The KV cache for ``batch`` sequences of up to ``capacity_tokens`` tokens.

    Returns the resident ``DenseKVCache`` when every step attends exactly (``kv="exact"``, or
    ``"auto"`` with capacity <= ``kv_exact_max_tokens``) and the whole KV fits the device budget
    (or none is given); otherwise a ``TieredKVCache`` over device, host (``kv_host_bytes``) and
    ``offload_dir`` (at most ``offload_bytes`` there; None = until the disk is full). Budgets are
    bytes for this cache alone; None = unbounded. ``attention_scratch_bytes`` caps the temporaries
    of one block of prefill (and streamed) attention (``Plan.attention_scratch_bytes``). ``workers``
    (the engine's, shared by its caches; None = the cache owns its own) run the tiered cache's copies.
    ``geometry`` (a cache's ``geometry()``) of a tiered cache builds a tiered cache with the same chunk
    sizes (for copying K/V in with ``append_kv``); a dense one changes nothing. ``sketch_note`` says
    why the key codes are off when the planner left no room for them (``Plan.kv_sketch_note``; the
    caller passes ``policy`` with ``kv_sketch=False`` then). Raises KVBudgetError when the budgets
    cannot work.
    """
    tiered = geometry is not None and geometry.get("kind") == "tiered"
    if not tiered and dense_fits(cfg, policy, batch, capacity_tokens, dtype, kv_device_bytes):
        return DenseKVCache(cfg, batch, capacity_tokens, dtype, torch.device(device), attention_scratch_bytes)
    return TieredKVCache(cfg, policy, batch, capacity_tokens, dtype, device, kv_device_bytes=kv_device_bytes,
                         kv_host_bytes=kv_host_bytes, offload_dir=offload_dir, offload_bytes=offload_bytes,
                         attention_scratch_bytes=attention_scratch_bytes, workers=workers,
                         geometry=geometry if tiered else None, sketch_note=sketch_note)
