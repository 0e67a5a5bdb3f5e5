"""Chunk size and slot counts of each layer of a tiered cache, from its budgets (pure arithmetic).

Why this module exists: a layer's layout (chunk tokens S, resident and scratch slots, whether closed
chunks are written behind to disk) is decided once, when its first K/V arrive, from numbers alone:
the model shape, the policy, the capacity and the first piece's attention skew choose S
(``sizing.chunk_tokens_for``; or a saved cache's ``geometry()`` fixes it), and the per-layer byte
budgets then only decide how many slots of S live where. S never follows the budgets, so the
same prompt is cut into the same chunks wherever its KV lives; a budget too small for the working
set at any size a layer may choose is refused when the cache is built. Keeping that here, away
from tensors, lets the cache, its budget checks and its errors share one calculation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from tierkv.config import ModelConfig, Policy, format_size
from tierkv.io.buffers import ChunkArenas
from tierkv.pipeline.chunking import ChunkRule
from tierkv.pipeline.kv.sizing import (SCRATCH_SLOTS_PER_SEQ, chunk_size_candidates, chunk_tokens_for,
                                       cold_chunk_bytes, kv_bytes_per_token, layer_index_bytes, layer_minimum_bytes,
                                       min_chunk_slots, slot_bytes)
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

    def chunk_tokens(self, entropy: float | None) -> int:
        """Chunk size of a layer whose first piece's attention has this entropy (``sizing.chunk_tokens_for``)."""
        return chunk_tokens_for(self.policy, self.capacity_tokens, entropy, self.rule)

    def sizes(self, fixed: Sequence[int | None] = ()) -> tuple[int, ...]:
        """Every chunk size a layer may take: the ``fixed`` ones (a saved geometry's, capped at the
        capacity) and, unless every layer is fixed, each size ``chunk_tokens`` may choose."""
        sizes = {min(f, self.capacity_tokens) for f in fixed if f is not None}
        if not fixed or None in fixed:
            sizes.update(chunk_size_candidates(self.policy, self.capacity_tokens, self.rule))
        return tuple(sorted(sizes))

    def _usable_slots(self, size: int) -> int:
        """Slots of ``size``; a budget that holds the whole context is always enough."""
        slots = self.slots_for(size)
        return self.min_slots() if slots >= self.batch * self.chunks(size) else slots

    def fits(self, size: int) -> bool:
        """Whether the device budget holds the working set at chunks of ``size`` (``layer_minimum``)."""
        return self._usable_slots(size) >= self.min_slots()

    def layer_geometry(self, size: int, entropy: float | None) -> LayerGeometry:
        """Slot counts for one layer with chunks of ``size`` tokens; KVBudgetError naming the minimum
        when the device budget cannot hold its working set."""
        if not self.fits(size):
            raise self.too_small_error((size,))
        slots, chunks, one, cold = self.slots_for(size), self.chunks(size), self.slot_bytes(size), self.cold_bytes(size)
        host_slots = math.inf if self.host_layer_bytes is None else \
            ChunkArenas(cold, self.host_layer_bytes).capacity   # allocates nothing until take()
        if slots >= self.batch * chunks:
            return LayerGeometry(size, chunks, self.batch * chunks, 0, one, entropy, False, cold)
        pair = SCRATCH_SLOTS_PER_SEQ * self.batch
        scratch = max(pair, (slots // 4) // pair * pair)   # about a quarter of the slots, in whole pairs
        spill = self.batch * chunks > slots - scratch + host_slots
        return LayerGeometry(size, chunks, slots - scratch, scratch, one, entropy, spill, cold)

    def too_small_error(self, sizes: Sequence[int]) -> KVBudgetError:
        """The budget error for a device budget that does not hold the working set at every one of
        ``sizes``: it names the minimum at the size that needs the most."""
        size = max(sizes, key=self.layer_minimum)
        need, n, slots = self.layer_minimum(size), self.cfg.num_layers, self.slots_for(size)
        adaptive = len(sizes) > 1 or self.policy.chunk_tokens is None
        return KVBudgetError(
            f"the device KV budget ({format_size(self.device_layer_bytes or 0)} per layer) holds {slots} chunks "
            f"of {size} tokens, but batch {self.batch} x {self.capacity_tokens} tokens needs at least "
            f"{self.min_slots()} per layer beside the chunk index: {format_size(need)} per layer, "
            f"{format_size(need * n)} in all ({need * n} bytes)"
            + (f" (chunks of {size} tokens are the adaptive size that needs the most room; the size follows "
               "the attention skew, not the budget)" if adaptive else "")
            + "; raise --device-mem or --kv-device-tokens, lower the batch or the context"
            + (", or try another --chunk-tokens" if self.policy.chunk_tokens is not None else
               ", or fix the size with --chunk-tokens"))

    def no_offload_error(self) -> KVBudgetError:
        need = kv_bytes_per_token(self.cfg, self.dtype) * self.batch * self.capacity_tokens
        return KVBudgetError(
            f"the KV cache for {self.batch} x {self.capacity_tokens} tokens needs {format_size(need)}, more than "
            "the device and host KV budgets hold; give an offload dir (--offload-dir), raise --device-mem "
            "or --host-mem, or lower the context")
