"""Decode attention: sparse (importance-selected chunks) or exact, for one new token per sequence.

Why this module exists: a sparse decode step scores every chunk's abstract (and key codes, when
kept) against the query on the device, selects chunks within ``kv_budget`` tokens plus the sink
and recent chunks, makes the selection resident (evicting others) and runs the slot-pool attention
kernel through a chunk table. Scoring and selection never synchronise with the host; reading the
selection back to fetch misses does, once per layer, and only when a chunk is off the device. A
selection the slots cannot hold goes to ``overflow``, which computes the same per-chunk partials and
the same combine (so the bits do not depend on placement); exact decode reads every chunk
(``streamed``).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from tierkv.kernels import Ellipsoid, KeySketch, Selection, chunk_scores, select_chunks, sketch_candidates, sparse_decode_attention
from tierkv.kernels.estimate import fused_applies, select_two_stage
from tierkv.pipeline.kv.layer import LayerKV
from tierkv.pipeline.kv.moves import evict, finish_fetch, poll_fetches, start_fetches
from tierkv.pipeline.kv.overflow import decode_overflow
from tierkv.pipeline.kv.sizing import kv_budget_tokens
from tierkv.pipeline.kv.speculate import count_speculation
from tierkv.pipeline.kv.state import CacheState
from tierkv.pipeline.kv.streamed import attend_streamed, drain_prefetch
from tierkv.pipeline.kv.table import ChunkKey, KVBudgetError

__all__ = ["decode", "forced_tokens", "head_words", "join_words", "select"]

HEAD_WORD_BITS = 63             # KV heads per int64 word of a chunk's "which heads picked it" bitmask


def join_words(words: Sequence[int]) -> int:
    """63-bit words (low word first) -> one Python int: bit h set = KV head h picked the chunk."""
    return sum(int(w) << (HEAD_WORD_BITS * i) for i, w in enumerate(words))


def decode(st: CacheState, kv: LayerKV, q: torch.Tensor, positions: torch.Tensor,
           window_tokens: int | None) -> torch.Tensor:
    """One new token per sequence, already appended: sparse, or exact over every chunk."""
    if window_tokens is None and st.sparse_now(kv):
        st.c.sparse_layer_steps += 1
        return _decode_sparse(st, kv, q)
    st.c.exact_layer_steps += 1
    return attend_streamed(st, kv, q, positions, kv.tokens - 1, window_tokens)


def _decode_sparse(st: CacheState, kv: LayerKV, q: torch.Tensor) -> torch.Tensor:
    """Score chunks, select within the token budget, make the selection resident, attend.

    A slot holds a chunk for every KV head, so what must be on the device is the union of the
    KV heads' selections; when it does not fit the resident slots the step overflows
    (``overflow.decode_overflow``: as much as fits becomes resident, the rest streams).
    """
    drain_prefetch(st, kv)
    sel = select(st, kv, q[:, :, 0])
    union = sel.mask.any(1)                                                       # (B, C)
    st.union_tokens += (union * kv.chunk_sizes[:kv.n_chunks]).sum()
    if kv.all_resident():
        kv.prev_needed = []
        return _kernel(kv, q, sel.ids, sel.counts)
    words = head_words(sel.mask)                                                  # (B, W, C)
    idx = union.nonzero()
    rows = torch.cat([idx, words[idx[:, 0], :, idx[:, 1]]], 1).tolist()          # the one host sync
    picked = {kv.key(c, b): join_words(ws) for b, c, *ws in rows}
    needed = list(picked)
    kv.prev_needed = needed
    st.hint = (kv.geo.chunk_tokens, needed)
    count_speculation(st, kv, needed)
    if len(needed) <= kv.geo.resident_slots and _make_resident(st, kv, needed):
        return _kernel(kv, q, sel.ids, sel.counts)
    return decode_overflow(st, kv, q, picked, sel)


def head_words(mask: torch.Tensor) -> torch.Tensor:
    """mask (B, Hkv, C) bool -> (B, W, C) int64: bit j of word w set = KV head 63*w + j picked the chunk.

    Words of 63 bits, so any head count fits without int64 overflow (2**63 does not fit int64).
    """
    b, h, c = mask.shape
    n_words = -(-h // HEAD_WORD_BITS)
    padded = mask.new_zeros((b, n_words * HEAD_WORD_BITS, c))
    padded[:, :h] = mask
    bits = 2 ** torch.arange(HEAD_WORD_BITS, device=mask.device)                  # (63,) int64
    return (padded.view(b, n_words, HEAD_WORD_BITS, c) * bits[:, None]).sum(2)


def forced_tokens(n_chunks: int, chunk_tokens: int, tokens: int, sink_chunks: int) -> tuple[int, int]:
    """(tokens, chunks) the selection forces: the sinks and the recent window of ``chunk_tokens``, when
    every chunk but the open last one holds ``chunk_tokens`` (host ints: no device read)."""
    last = tokens - (n_chunks - 1) * chunk_tokens                                # the open chunk's tokens
    recent = {n_chunks - 1} if last >= chunk_tokens else {n_chunks - 2, n_chunks - 1}
    forced = set(range(min(sink_chunks, n_chunks))) | {i for i in recent if i >= 0}
    return sum(last if i == n_chunks - 1 else chunk_tokens for i in forced), len(forced)


def select(st: CacheState, kv: LayerKV, q0: torch.Tensor) -> Selection:
    """Importance selection on the device: q0 (B, Hq, D) -> Selection over the layer's chunks.

    With key codes, two stages (``kernels.importance``): the key ellipsoids (chunks of 32 tokens and
    up, ``sizing.keeps_ellipsoids``; the coarse sketch below that) rank every coded chunk, the full sketch bounds the ``sketch_candidates`` best (a few times the chunks the budget
    holds beside the forced ones), the rest are pruned. When the budget holds no chunk beside the
    forced ones, nothing is scored: the selection is the forced chunks.
    """
    c = kv.n_chunks
    t0 = time.perf_counter()
    budget = kv_budget_tokens(st.policy.kv_budget, kv.tokens)
    sink, size = st.shape.sink_chunks, kv.geo.chunk_tokens
    forced, n_forced = forced_tokens(c, size, kv.tokens, sink)
    candidates = sketch_candidates(budget - forced, size, n_forced)
    sketch = _sketch_of(kv) if candidates else None
    if fused_applies(q0, sketch, candidates):                 # the torch path: one C++ call on the CPU, else few ops
        assert sketch is not None
        sel = select_two_stage(q0, kv.kmin[:, :, :c], kv.kmax[:, :, :c], sketch, candidates, budget_tokens=budget,
                               sink_chunks=sink, recent_tokens=size, full_coded=True)   # coded = closed: S keys
    else:
        scores = chunk_scores(q0, kv.kmin[:, :, :c], kv.kmax[:, :, :c], sketch=sketch, candidates=candidates) \
            if candidates else torch.zeros(st.batch, st.kv_heads, c, device=st.device)  # 0: forced chunks only
        sel = select_chunks(scores, kv.chunk_sizes[:c], budget_tokens=budget, sink_chunks=sink, recent_tokens=size)
    st.c.estimator_s += time.perf_counter() - t0
    st.selected_tokens += (sel.mask * kv.chunk_sizes[:c]).sum()
    st.c.selectable_tokens += st.batch * st.kv_heads * kv.tokens
    # Trim the id table (B, Hkv, C) to the most chunks a selection can hold, without a host sync:
    # every chunk but the open last one holds S tokens, so the budget admits at most budget // S
    # unforced chunks, beside the sinks and at most two recent chunks. The attention kernel's
    # cost grows with the table's width (the torch reference gathers all of it), not the counts.
    width = min(c, sink + 2 + budget // size)
    assert st.device.type != "cpu" or int(sel.counts.max()) <= width, "selection wider than its bound"
    return sel._replace(ids=sel.ids[..., :width])


def _sketch_of(kv: LayerKV) -> KeySketch | None:
    """The layer's key codes (and ellipsoids, where kept) as ``chunk_scores`` reads them; None without codes."""
    if kv.codes is None:
        return None
    ell = None if kv.centre is None or kv.axes2 is None else Ellipsoid(kv.centre, kv.axes2)
    return KeySketch(kv.codes, kv.chunk_sizes[:kv.n_chunks], kv.n_coded, ell)


def _kernel(kv: LayerKV, q: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Decode attention through the slot pool: ids (B, Hkv, M) chunk ids -> (B, Hq, 1, D).

    One chunk per split (``split_tokens=1``): per-chunk partials and one combine over the table,
    the reduction ``overflow.decode_overflow`` reproduces when part of the selection is off the device.
    """
    b, h, m = ids.shape
    table = kv.slot_map.gather(1, ids.clamp(min=0).long().reshape(b, h * m)).view(b, h, m)   # slot ids
    return sparse_decode_attention(q[:, :, 0], kv.k_pool, kv.v_pool, table, counts, kv.slot_lens,
                                   split_tokens=1).unsqueeze(2)


def _make_resident(st: CacheState, kv: LayerKV, keys: Sequence[ChunkKey]) -> bool:
    """Move ``keys`` to the device (evicting others); False when they do not fit together."""
    poll_fetches(st, kv, wait=True, keys=keys)
    plan = None
    for _ in range(2):
        try:
            plan = kv.table.plan_moves(keys)
            break
        except KVBudgetError:
            if not kv.fetching:
                return False
            poll_fetches(st, kv, wait=True)   # speculative fetches hold slots: let them land
    if plan is None:
        return False
    evict(st, kv, plan.evict)
    for f in start_fetches(st, kv, plan.fetch):
        finish_fetch(st, kv, f)
    return True
