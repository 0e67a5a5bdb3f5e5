"""Speculative fetches: start moving what the next layer will most likely need while this one computes.

Why this module exists: after a layer attends, the chunks the next layer selected at the previous
step (sparse; temporal locality), the token ranges this layer just selected (adjacent layers attend
to similar tokens) or the next layer's first wave of streamed chunks (exact) are fetched on the
reader thread; what was not prefetched is fetched on demand, and ``stats()`` reports the hit rate.
"""

from __future__ import annotations

from typing import Sequence

from tierkv.pipeline.kv.layer import LayerKV
from tierkv.pipeline.kv.moves import evict, poll_fetches, start_fetches
from tierkv.pipeline.kv.state import CacheState
from tierkv.pipeline.kv.streamed import drain_prefetch, submit_wave, window_keys
from tierkv.pipeline.kv.table import ChunkKey, KVBudgetError

__all__ = ["count_speculation", "speculate"]


def speculate(st: CacheState, layer: int, sparse: bool) -> None:
    """Start fetching what layer ``layer`` will most likely need next, while this one computes."""
    kv = st.layers[layer]
    if kv is None:
        return
    poll_fetches(st, kv, wait=False)
    window = st.window(layer)
    if sparse and window is None and st.sparse_now(kv):
        _speculate_sparse(st, kv)
    elif kv.prefetched is None and kv.scratch:
        off = [key for key in window_keys(st, kv, kv.tokens, window) if kv.slot_of(key) is None]
        if off:
            kv.prefetched = submit_wave(st, kv, off[:len(kv.scratch) // 2], 0)


def _speculate_sparse(st: CacheState, kv: LayerKV) -> None:
    """Prefetch what this layer selected at the previous step and what the layer before it just selected."""
    drain_prefetch(st, kv)
    kv.spec = set()
    guess = list(dict.fromkeys([*kv.prev_needed, *_map_hint(st, kv)]))[:kv.geo.resident_slots // 2]
    cand = [k for k in guess if kv.slot_of(k) is None]
    if not cand:
        return
    try:
        plan = kv.table.plan_moves(guess)
    except KVBudgetError:
        return
    evict(st, kv, plan.evict)
    start_fetches(st, kv, plan.fetch)
    kv.spec = set(cand)
    st.c.spec_fetched_chunks += len(cand)


def _map_hint(st: CacheState, kv: LayerKV) -> list[ChunkKey]:
    """The chunks of ``kv`` covering the tokens of the chunks the previous layer just selected."""
    if st.hint is None:
        return []
    from_tokens, keys = st.hint
    to_tokens, out = kv.geo.chunk_tokens, []
    for key in keys:
        last = min(kv.n_chunks - 1, ((key.chunk + 1) * from_tokens - 1) // to_tokens)
        out.extend(kv.key(c, key.seq) for c in range(key.chunk * from_tokens // to_tokens, last + 1))
    return out


def count_speculation(st: CacheState, kv: LayerKV, needed: Sequence[ChunkKey]) -> None:
    """Score the layer's speculative fetches against what the step really needed."""
    spec, kv.spec = kv.spec, set()
    for key in needed:
        if key in spec:
            st.c.spec_hits += 1
        elif kv.slot_of(key) is None:
            st.c.spec_misses += 1
    st.c.spec_unused_chunks += len(spec.difference(needed))
