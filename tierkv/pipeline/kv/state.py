"""The small state one tiered KV cache carries, shared by the functions that act on it.

Why this module exists: the tiered cache's behaviour is split by concern (append, moves, streamed,
sparse, overflow, speculation, stats), each a module of functions over one ``CacheState``: what
the cache was built with, its layers, its store and workers, and its running counters. The facade
``tiered.TieredKVCache`` owns one and composes those functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tierkv.config import Policy
from tierkv.io.kvstore import KVStore
from tierkv.io.mover import Mover
from tierkv.pipeline.kv.geometry import CacheShape
from tierkv.pipeline.kv.layer import LayerKV
from tierkv.pipeline.kv.sizing import budget_holds_chunks
from tierkv.pipeline.kv.table import ChunkKey
from tierkv.pipeline.kv.workers import KVWorkers

__all__ = ["CacheState", "Counters", "WRITE_BEHIND_BYTES"]

WRITE_BEHIND_BYTES = 8 << 20     # default cap on host snapshots of closed chunks waiting for the writer thread


@dataclass
class Counters:
    """Running totals reported by ``TieredKVCache.stats`` (bytes, chunk counts, seconds)."""

    forwards: int = 0
    decode_steps: int = 0
    host_read_bytes: int = 0
    disk_read_bytes: int = 0
    decode_read_bytes: int = 0
    disk_write_bytes: int = 0
    evicted_chunks: int = 0
    streamed_chunks: int = 0
    spec_fetched_chunks: int = 0
    spec_hits: int = 0
    spec_misses: int = 0
    spec_unused_chunks: int = 0
    sparse_layer_steps: int = 0
    overflow_steps: int = 0       # sparse layer-steps whose selection (union over KV heads) exceeded the device slots
    exact_layer_steps: int = 0
    estimator_s: float = 0.0
    sparse_step_s: float = 0.0    # wall time of the decode steps that selected chunks (advance to advance)
    selectable_tokens: int = 0


@dataclass(eq=False)
class CacheState:
    """One tiered cache: its shape and budgets, layers (None until their first K/V), store, workers."""

    shape: CacheShape
    device: torch.device
    scratch_bytes: int                 # cap on one block of streamed attention's temporaries
    workers: KVWorkers
    store: KVStore | None
    layers: list[LayerKV | None]
    sketch_note: str = "off"
    write_behind_bytes: int = WRITE_BEHIND_BYTES
    length: int = 0
    decoding: bool = False
    hint: tuple[int, list[ChunkKey]] | None = None   # (chunk tokens, keys) the last layer selected
    closed: bool = False
    c: Counters = field(default_factory=Counters)
    step_mark: tuple[float, int] | None = None       # (perf_counter, sparse_layer_steps) at the last advance
    mover: Mover = field(init=False)                    # this cache's routes and link counters
    selected_tokens: torch.Tensor = field(init=False)   # () float64: sparse steps' selected tokens
    union_tokens: torch.Tensor = field(init=False)      # () float64: sparse steps' union sizes

    def __post_init__(self) -> None:
        self.mover = self.workers.mover()
        self.selected_tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        self.union_tokens = torch.zeros((), dtype=torch.float64, device=self.device)

    @property
    def policy(self) -> Policy:
        return self.shape.policy

    @property
    def batch(self) -> int:
        return self.shape.batch

    @property
    def kv_heads(self) -> int:
        return self.shape.cfg.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.shape.cfg.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.shape.dtype

    def live_layers(self) -> list[LayerKV]:
        return [kv for kv in self.layers if kv is not None]

    def window(self, layer: int) -> int | None:
        windows = self.shape.cfg.sliding_window_tokens
        return windows[layer] if windows else None

    def sparse_now(self, kv: LayerKV | None = None) -> bool:
        """Whether this decode step selects chunks: ``policy.kv``, with auto switching on context length;
        given a layer, auto also stays exact there while the budget holds fewer than ``MIN_BUDGET_CHUNKS``
        of its chunks (``sizing.budget_holds_chunks``; an explicit "sparse" still selects, and says so)."""
        mode, tokens = self.policy.kv, self.length + 1
        if mode != "auto":
            return mode == "sparse"
        return tokens > self.policy.kv_exact_max_tokens and (
            kv is None or budget_holds_chunks(self.policy.kv_budget, tokens, kv.geo.chunk_tokens))
