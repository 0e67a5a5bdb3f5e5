"""KV cache sizes as pure functions of the model shape, the policy and a capacity.

Why this module exists: the planner, the CLI, the engine (one allotment per sequence) and the
caches themselves must agree on how many bytes a KV cache takes. Every such number is computed
here, from numbers only (no tensors are allocated), so there is one home for "bytes per token",
"which chunk size a layer takes" (``chunk_tokens_for``: skew, policy and capacity, never the
budgets, and ``chunk_size_candidates``: every size it may take), "fewest device bytes that work"
(the worst case over those sizes) and "most device / host bytes a cache would take".
"""

from __future__ import annotations

import math

import torch

from tierkv.config import ModelConfig, Policy
from tierkv.io.buffers import ARENA_BYTES, round_up
from tierkv.kernels.sketch import sketch_bytes_per_token
from tierkv.pipeline.chunking import ChunkRule, chunk_tokens_for_entropy
from tierkv.quantspec import kv_chunk_bytes

__all__ = ["MIN_BUDGET_CHUNKS", "MIN_CONTEXT_CHUNKS", "SCRATCH_SLOTS_PER_SEQ", "budget_holds_chunks",
           "chunk_cap_tokens", "chunk_size_candidates", "chunk_tokens_for", "cold_chunk_bytes", "dense_fits", "element_bytes",
           "gathered_kv_bytes",
           "keeps_ellipsoids", "keeps_sketch", "kv_budget_tokens", "kv_bytes_per_token", "kv_device_minimum_bytes", "kv_device_want_bytes",
           "kv_host_want_bytes", "layer_device_bytes", "layer_index_bytes", "layer_minimum_bytes", "max_kv_batch",
           "min_chunk_slots", "slot_bytes", "sparse_possible"]

SCRATCH_SLOTS_PER_SEQ = 2        # at least one streamed chunk per sequence in each half of the double buffer
MIN_ELLIPSOID_CHUNK_TOKENS = 32  # smallest chunks that keep key ellipsoids (``keeps_ellipsoids``)
MIN_BUDGET_CHUNKS = 8            # a sparse budget holds at least this many of a layer's chunks (else: too coarse)
MIN_CONTEXT_CHUNKS = 16          # an adaptive layer's capacity holds at least this many chunks (so a few can spill)


def element_bytes(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype`` (read from the dtype: no tensor is made on the attention path)."""
    return dtype.itemsize


def gathered_kv_bytes(batch: int, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
    """The K and V of ``tokens`` keys of one layer (all ``batch`` sequences) gathered into one contiguous
    pair: what exact attention's gathered regime holds in the attention scratch (``streamed.gathered_fits``)."""
    return 2 * batch * kv_heads * tokens * head_dim * element_bytes(dtype)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V that one token of one sequence takes over all layers."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * element_bytes(dtype)


def slot_bytes(cfg: ModelConfig, dtype: torch.dtype, chunk_tokens: int) -> int:
    """K + V of one chunk of one sequence in one layer, exact: a device slot (and a host buffer or disk
    record when the cold tiers hold chunks exact; ``cold_chunk_bytes`` otherwise)."""
    return cold_chunk_bytes(cfg, dtype, chunk_tokens, "none")


def cold_chunk_bytes(cfg: ModelConfig, dtype: torch.dtype, chunk_tokens: int, kv_quant: str = "none") -> int:
    """One chunk of one sequence in one layer on the host or disk tier: ``slot_bytes`` when exact, the
    packed int8/int4 codes and their 16-bit params under ``kv_quant`` (``quantspec.kv_chunk_bytes``)."""
    return kv_chunk_bytes(kv_quant, cfg.num_kv_heads, chunk_tokens, cfg.head_dim, element_bytes(dtype))


def keeps_sketch(policy: Policy) -> bool:
    """Whether a tiered cache under ``policy`` keeps 2-bit key codes and key ellipsoids (only sparse
    selection reads them).

    Default (``policy.kv_sketch`` None): on outside exact mode, on every device: the token-level
    bound finds single-key needles the min/max bound misses, and the two-stage selection
    (``kernels.importance``: the ellipsoids rank every chunk, the sketch scores only 2x the budget's
    chunks) keeps its cost a small part of a decode step on the CPU too. ``kv_sketch=False`` turns it off.
    """
    if policy.kv == "exact":
        return False
    return policy.kv_sketch if policy.kv_sketch is not None else True


def keeps_ellipsoids(chunk_tokens: int) -> bool:
    """Whether a layer with key codes also keeps key ellipsoids (``kernels.ellipsoid``): for chunks of
    at least ``MIN_ELLIPSOID_CHUNK_TOKENS``. Why not smaller: an ellipsoid costs as much as the
    abstracts whatever the chunk size, so at 16-token chunks it would grow the index (abstracts +
    codes) by half and with it the device room the planner reserves for the full context (a 70B
    int8 model on 24 GiB + 64 GiB then streamed 3 layers from disk); at 32 tokens and up the index
    with ellipsoids is no larger than at 16 without. Layers of smaller chunks rank for the sketch
    with the coarse sketch bound (``kernels.importance``)."""
    return chunk_tokens >= MIN_ELLIPSOID_CHUNK_TOKENS


def layer_index_bytes(cfg: ModelConfig, dtype: torch.dtype, batch: int, capacity_tokens: int, chunk_tokens: int,
                      sketch: bool) -> int:
    """Device bytes of one layer's chunk index for a context: abstracts (min/max key per chunk) and,
    with ``sketch``, the 2-bit key codes (``kernels.sketch``) and the key ellipsoids that rank chunks for
    them (``kernels.ellipsoid``: centre and squared semi-axes, D values each in ``dtype``, like the
    abstracts). Always resident, beside the slot pool."""
    chunks = -(-capacity_tokens // chunk_tokens)
    summary = 2 * cfg.num_kv_heads * cfg.head_dim * element_bytes(dtype)     # two (D,) vectors per KV head
    per_chunk = summary
    if sketch:
        per_chunk += cfg.num_kv_heads * chunk_tokens * sketch_bytes_per_token(cfg.head_dim)
        per_chunk += summary if keeps_ellipsoids(chunk_tokens) else 0
    return batch * chunks * per_chunk


def layer_device_bytes(cfg: ModelConfig, dtype: torch.dtype, batch: int, capacity_tokens: int, chunk_tokens: int,
                       slots: int, sketch: bool) -> int:
    """Every device byte one layer of a tiered cache allocates with ``slots`` slots (resident + scratch):
    the slot pool, the chunk index, and the int32 tables beside them (slot lengths, slot map, chunk sizes)."""
    chunks = -(-capacity_tokens // chunk_tokens)
    pool = slots * (slot_bytes(cfg, dtype, chunk_tokens) + 4)
    tables = 4 * batch * chunks + 4 * chunks
    return pool + tables + layer_index_bytes(cfg, dtype, batch, capacity_tokens, chunk_tokens, sketch)


def min_chunk_slots(batch: int, sink_chunks: int = 1) -> int:
    """Fewest device slots per layer a tiered cache works with: per sequence its sink chunks, two
    recent chunks and a new one resident, plus the scratch slots streamed chunks pass through."""
    return batch * (sink_chunks + 3 + SCRATCH_SLOTS_PER_SEQ)


def sparse_possible(policy: Policy, capacity_tokens: int) -> bool:
    """Whether a cache of ``capacity_tokens`` under ``policy`` may run a sparse decode step."""
    return policy.kv == "sparse" or (policy.kv == "auto" and capacity_tokens > policy.kv_exact_max_tokens)


def kv_budget_tokens(kv_budget: float | int, context_tokens: int) -> int:
    """Tokens a sparse step attends to: a float <= 1 is a fraction of the context, anything else a count."""
    if isinstance(kv_budget, float) and kv_budget <= 1.0:
        return max(1, math.ceil(kv_budget * context_tokens))
    return int(kv_budget)


def budget_holds_chunks(kv_budget: float | int, context_tokens: int, chunk_tokens: int) -> bool:
    """Whether a sparse step's budget at ``context_tokens`` holds ``MIN_BUDGET_CHUNKS`` chunks of
    ``chunk_tokens`` (or the whole context). Below that, selection picks among too few chunks to
    follow attention: ``kv="auto"`` attends exactly in such a layer, and ``kv="sparse"`` says so
    in ``stats()["kv_budget_note"]``."""
    return kv_budget_tokens(kv_budget, context_tokens) >= min(MIN_BUDGET_CHUNKS * chunk_tokens, context_tokens)


def chunk_cap_tokens(policy: Policy, capacity_tokens: int, rule: ChunkRule = ChunkRule()) -> int:
    """Largest chunk the adaptive rule may pick for a cache of ``capacity_tokens``: the largest power
    of two (at least the rule's smallest size, at most its largest) of which the capacity holds
    ``MIN_CONTEXT_CHUNKS`` and the sparse budget ``MIN_BUDGET_CHUNKS``: the budget at the capacity
    under "sparse", under "auto" at the capacity or the first context that decodes sparse, whichever
    is longer (so the cap, like the device minimum, never falls as the capacity grows); exact mode
    has no budget. The device room plays no part: chunk sizes (so the math) do not depend on where
    the KV lives, and the capacity bound keeps the working set of the largest size (a few whole
    chunks) a fraction of the context."""
    per_chunk = min(rule.max_chunk_tokens, capacity_tokens // MIN_CONTEXT_CHUNKS)
    if policy.kv != "exact":
        budgeted = capacity_tokens if policy.kv == "sparse" else max(capacity_tokens, policy.kv_exact_max_tokens + 1)
        per_chunk = min(per_chunk, kv_budget_tokens(policy.kv_budget, budgeted) // MIN_BUDGET_CHUNKS)
    cap = rule.min_chunk_tokens
    while cap * 2 <= per_chunk:
        cap *= 2
    return cap


def chunk_tokens_for(policy: Policy, capacity_tokens: int, entropy: float | None,
                     rule: ChunkRule = ChunkRule()) -> int:
    """A layer's chunk size: ``policy.chunk_tokens``, else the adaptive rule's size for the layer's
    measured attention entropy (None: unmeasured, the rule's default) within ``chunk_cap_tokens``;
    never more than the capacity. The one place a tiered cache's chunk size is decided."""
    if policy.chunk_tokens is not None:
        size = policy.chunk_tokens
    else:
        size = min(chunk_tokens_for_entropy(entropy, rule), chunk_cap_tokens(policy, capacity_tokens, rule))
    return max(1, min(size, capacity_tokens))


def chunk_size_candidates(policy: Policy, capacity_tokens: int, rule: ChunkRule = ChunkRule()) -> tuple[int, ...]:
    """Every chunk size ``chunk_tokens_for`` may give a layer of a cache of ``capacity_tokens`` (the
    entropy, so the adaptive size, is only known at prefill), smallest first."""
    if policy.chunk_tokens is not None:
        return (chunk_tokens_for(policy, capacity_tokens, None, rule),)
    cap = min(chunk_cap_tokens(policy, capacity_tokens, rule), capacity_tokens)
    sizes, size = {chunk_tokens_for(policy, capacity_tokens, None, rule)}, rule.min_chunk_tokens
    while size <= rule.max_chunk_tokens:
        sizes.add(max(1, min(size, cap)))
        size *= 2
    return tuple(sorted(sizes))


def layer_minimum_bytes(cfg: ModelConfig, dtype: torch.dtype, batch: int, capacity_tokens: int, chunk_tokens: int,
                        sketch: bool, sink_chunks: int = 1) -> int:
    """Fewest device bytes one layer of a tiered cache with chunks of ``chunk_tokens`` works with:
    the chunk index for the whole capacity beside the minimum of slots (or every chunk, if fewer)."""
    chunks = batch * -(-capacity_tokens // chunk_tokens)
    index = layer_index_bytes(cfg, dtype, batch, capacity_tokens, chunk_tokens, sketch)
    return index + slot_bytes(cfg, dtype, chunk_tokens) * min(min_chunk_slots(batch, sink_chunks), chunks)


def kv_device_minimum_bytes(cfg: ModelConfig, policy: Policy, dtype: torch.dtype, batch: int, capacity_tokens: int,
                            sketch: bool, rule: ChunkRule = ChunkRule(), sink_chunks: int = 1) -> int:
    """Fewest device KV bytes (all layers) with which a ``TieredKVCache`` of ``batch`` x
    ``capacity_tokens`` runs whatever chunk sizes its layers choose: at the size of
    ``chunk_size_candidates`` that needs the most, the per-chunk index (abstracts, and key codes with
    ``sketch``) for the whole capacity plus the fewest slots; the rest spills to host and disk. The
    cache refuses a smaller budget when it is built, so one this large never fails at prefill.
    Never decreases with the capacity, so the minimum at the model's full context covers any prompt."""
    per_layer = max(layer_minimum_bytes(cfg, dtype, batch, capacity_tokens, size, sketch, sink_chunks)
                    for size in chunk_size_candidates(policy, capacity_tokens, rule))
    return cfg.num_layers * per_layer


def dense_fits(cfg: ModelConfig, policy: Policy, batch: int, capacity_tokens: int, dtype: torch.dtype,
               kv_device_bytes: int | None) -> bool:
    """Whether ``make_kv_cache`` builds the resident cache: every step exact and all KV in the room."""
    need = kv_bytes_per_token(cfg, dtype) * batch * capacity_tokens
    return not sparse_possible(policy, capacity_tokens) and (kv_device_bytes is None or need <= kv_device_bytes)


def max_kv_batch(cfg: ModelConfig, policy: Policy, batch: int, capacity_tokens: int, dtype: torch.dtype,
                 kv_device_bytes: int | None) -> int:
    """Most sequences (<= ``batch``, at least 1) of ``capacity_tokens`` whose KV cache ``make_kv_cache``
    builds in the device room: resident, or tiered at or above ``kv_device_minimum_bytes`` (key codes
    are dropped before a tiered cache refuses, so they are not counted)."""
    if kv_device_bytes is None:
        return batch
    for b in range(batch, 1, -1):
        if dense_fits(cfg, policy, b, capacity_tokens, dtype, kv_device_bytes) or \
                kv_device_minimum_bytes(cfg, policy, dtype, b, capacity_tokens, sketch=False) <= kv_device_bytes:
            return b
    return 1


def kv_device_want_bytes(cfg: ModelConfig, policy: Policy, dtype: torch.dtype, capacity_tokens: int,
                         batch: int = 1, *, rule: ChunkRule = ChunkRule()) -> int:
    """The most device bytes ``make_kv_cache`` allocates for ``batch`` x ``capacity_tokens`` with an
    unbounded device budget: the dense K/V when it builds the resident cache, else (all layers) the
    tiered chunk index with every chunk's slot resident, at the chunk size that costs the most.

    Key codes are counted when the policy keeps them (``keeps_sketch``). A device allotment of this
    many bytes never spills.
    """
    if dense_fits(cfg, policy, batch, capacity_tokens, dtype, None):
        return kv_bytes_per_token(cfg, dtype) * batch * capacity_tokens
    sketch = keeps_sketch(policy)
    per_layer = max(layer_device_bytes(cfg, dtype, batch, capacity_tokens, size,
                                       batch * -(-capacity_tokens // size), sketch)
                    for size in chunk_size_candidates(policy, capacity_tokens, rule))
    return cfg.num_layers * per_layer


def kv_host_want_bytes(cfg: ModelConfig, policy: Policy, dtype: torch.dtype, capacity_tokens: int,
                       batch: int = 1, *, rule: ChunkRule = ChunkRule()) -> int:
    """Host bytes (all layers) a tiered cache of ``batch`` x ``capacity_tokens`` allocates if every
    chunk lives on the host, at the chunk size that costs the most: whole chunks (quantized under
    ``policy.kv_quant``) in page-rounded arenas (``io.buffers.ChunkArenas``). A host allotment of
    this many bytes holds every chunk."""
    per_layer = 0
    for size in chunk_size_candidates(policy, capacity_tokens, rule):
        chunk = cold_chunk_bytes(cfg, dtype, size, policy.kv_quant)
        chunks = batch * -(-capacity_tokens // size)
        per_arena = max(1, ARENA_BYTES // chunk)
        full, last = divmod(chunks, per_arena)
        arenas = full * round_up(per_arena * chunk) + (round_up(last * chunk) if last else 0)
        per_layer = max(per_layer, arenas)
    return cfg.num_layers * per_layer
