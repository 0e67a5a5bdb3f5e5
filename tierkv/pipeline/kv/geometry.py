"""Chunk size and slot counts of each layer of a tiered cache, from its budgets (pure arithmetic).

Why this module exists: a layer's layout (chunk tokens S, resident and scratch slots, whether closed
chunks are written behind to disk) is decided once, when its first K/V arrive, from numbers alone:
the model shape, the per-layer byte budgets and the wanted chunk size (the policy's, the adaptive
rule's from the first piece's attention, or a saved cache's ``geometry()``). Keeping that here, away
from tensors, lets the cache, its budget checks and its errors share one calculation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tierkv.config import ModelConfig, Policy, format_size
from tierkv.io.buffers import ChunkArenas
from tierkv.pipeline.chunking import ChunkRule, fit_chunk_tokens
from tierkv.pipeline.kv.sizing import (SCRATCH_SLOTS_PER_SEQ, chunk_size_candidates, cold_chunk_bytes,
                                       kv_bytes_per_token, layer_index_bytes, layer_minimum_bytes, min_chunk_slots,
                                       slot_bytes)
from tierkv.pipeline.kv.table import KVBudgetError

__all__ = ["CacheShape", "LayerGeometry"]


@dataclass(frozen=True)
class LayerGeometry:
    """Sizes chosen for one layer when its first K/V arrive."""

    chunk_tokens: int          # S
    max_chunks: int            # C_max = ceil(capacity / S)
    resident_slots: int
    scratch_slots: int
    slot_bytes: int            # K + V of one chunk of one sequence
    entropy: float | None      # measured attention skew (None: fixed size or not measurable)
    spill_expected: bool       # the context may outgrow device + host: write closed chunks behind
    cold_bytes: int            # one chunk of one sequence on the host or disk (quantized: < slot_bytes)


@dataclass(frozen=True)
class CacheShape:
    """What a tiered cache's layout depends on; budgets are per layer (None = unbounded)."""

    cfg: ModelConfig
    policy: Policy
    dtype: torch.dtype
    batch: int
    capacity_tokens: int
    device_layer_bytes: int | None
    host_layer_bytes: int | None
    sink_chunks: int
    rule: ChunkRule
    sketch: bool

    def slot_bytes(self, chunk_tokens: int) -> int:
        return slot_bytes(self.cfg, self.dtype, chunk_tokens)

    def cold_bytes(self, chunk_tokens: int) -> int:
        return cold_chunk_bytes(self.cfg, self.dtype, chunk_tokens, self.policy.kv_quant)

    def chunks(self, chunk_tokens: int) -> int:
        return -(-self.capacity_tokens // chunk_tokens)

    def slots_for(self, chunk_tokens: int) -> int:
        """Chunk slots of this size that one layer's device budget holds beside the chunk index."""
        if self.device_layer_bytes is None:
            return self.batch * self.chunks(chunk_tokens)
        index = layer_index_bytes(self.cfg, self.dtype, self.batch, self.capacity_tokens, chunk_tokens, self.sketch)
        return max(0, (self.device_layer_bytes - index) // self.slot_bytes(chunk_tokens))

    def min_slots(self) -> int:
        """Fewest slots per layer that work: sinks, two recent chunks and a new one resident, plus scratch."""
        return min_chunk_slots(self.batch, self.sink_chunks)

    def layer_minimum(self, chunk_tokens: int) -> int:
        return layer_minimum_bytes(self.cfg, self.dtype, self.batch, self.capacity_tokens, chunk_tokens,
                                   self.sketch, self.sink_chunks)

    def _usable_slots(self, size: int) -> int:
        """Slots of ``size``; a budget that holds the whole context is always enough."""
        slots = self.slots_for(size)
        return self.min_slots() if slots >= self.batch * self.chunks(size) else slots

    def pick_size(self, wanted_tokens: int, forced: bool = False) -> tuple[int, bool]:
        """(chunk size, whether the device budget holds enough slots of it): the size nearest the
        wanted one that fits, else the size with the smallest working set (which fits whenever any
        does). ``forced`` (a saved geometry) or a fixed ``policy.chunk_tokens`` keeps the size."""
        need = self.min_slots()
        if forced:
            size = min(wanted_tokens, self.capacity_tokens)
            return size, self._usable_slots(size) >= need
        fixed = self.policy.chunk_tokens is not None
        smallest = wanted_tokens if fixed else min(wanted_tokens, self.rule.min_chunk_tokens)
        largest = wanted_tokens if fixed else max(wanted_tokens, self.rule.max_chunk_tokens)
        size = fit_chunk_tokens(min(wanted_tokens, self.capacity_tokens), self._usable_slots, need, smallest,
                                min(largest, self.capacity_tokens))
        if self._usable_slots(size) < need:
            size = min((min(c, self.capacity_tokens) for c in chunk_size_candidates(self.policy, self.rule)),
                       key=self.layer_minimum)
        return size, self._usable_slots(size) >= need

    def layer_geometry(self, wanted_tokens: int, entropy: float | None, forced: bool = False) -> LayerGeometry:
        """Chunk size and slot counts for one layer (``pick_size``); KVBudgetError naming the minimum
        when no chunk size fits the device budget."""
        size, fits = self.pick_size(wanted_tokens, forced)
        slots, chunks, one = self.slots_for(size), self.chunks(size), self.slot_bytes(size)
        cold = self.cold_bytes(size)
        if not fits:
            raise self.too_small_error(size, slots)
        host_slots = math.inf if self.host_layer_bytes is None else \
            ChunkArenas(cold, self.host_layer_bytes).capacity   # allocates nothing until take()
        if slots >= self.batch * chunks:
            return LayerGeometry(size, chunks, self.batch * chunks, 0, one, entropy, False, cold)
        pair = SCRATCH_SLOTS_PER_SEQ * self.batch
        scratch = max(pair, (slots // 4) // pair * pair)   # about a quarter of the slots, in whole pairs
        spill = self.batch * chunks > slots - scratch + host_slots
        return LayerGeometry(size, chunks, slots - scratch, scratch, one, entropy, spill, cold)

    def too_small_error(self, size: int, slots: int) -> KVBudgetError:
        need, n = self.layer_minimum(size), self.cfg.num_layers
        return KVBudgetError(
            f"the device KV budget ({format_size(self.device_layer_bytes or 0)} per layer) holds {slots} chunks "
            f"of {size} tokens, but batch {self.batch} x {self.capacity_tokens} tokens needs at least "
            f"{self.min_slots()} per layer beside the chunk index: {format_size(need)} per layer, "
            f"{format_size(need * n)} in all ({need * n} bytes); raise "
            "--device-mem or --kv-device-tokens, lower the batch or the context"
            + (", or try another --chunk-tokens" if self.policy.chunk_tokens is not None else ""))

    def no_offload_error(self) -> KVBudgetError:
        need = kv_bytes_per_token(self.cfg, self.dtype) * self.batch * self.capacity_tokens
        return KVBudgetError(
            f"the KV cache for {self.batch} x {self.capacity_tokens} tokens needs {format_size(need)}, more than "
            "the device and host KV budgets hold; give an offload dir (--offload-dir), raise --device-mem "
            "or --host-mem, or lower the context")
