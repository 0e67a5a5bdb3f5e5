"""What a tiered cache reports (``stats``) and the consistency check tests run on it (``check_invariants``).

Why this module exists: the numbers users and the planner read (bytes per tier, reads per step,
speculation hit rate, sparse selection sizes) and the assertion that storage follows the chunk
table are views of the cache's state, kept apart from the code that changes it.
"""

from __future__ import annotations

import time
from typing import Any

from tierkv.pipeline.kv.layer import LayerKV
from tierkv.pipeline.kv.sizing import MIN_BUDGET_CHUNKS, budget_holds_chunks, kv_budget_tokens
from tierkv.pipeline.kv.state import CacheState
from tierkv.pipeline.kv.table import Tier

__all__ = ["budget_note", "check_invariants", "note_step", "stats"]

DEVICE, HOST, DISK = Tier.DEVICE, Tier.HOST, Tier.DISK


def note_step(st: CacheState) -> None:
    """At each ``advance``: a decode step that selected chunks adds its wall time (since the previous
    advance, so the whole step: sampling, every layer, the head) to ``sparse_step_s``, the
    denominator of ``estimator_share``."""
    now, sparse = time.perf_counter(), st.c.sparse_layer_steps
    if st.decoding and st.step_mark is not None and sparse > st.step_mark[1]:
        st.c.sparse_step_s += now - st.step_mark[0]
    st.step_mark = (now, sparse)


def stats(st: CacheState, device_allocated_bytes: int) -> dict[str, Any]:
    """What the cache did: chunk sizes, bytes per tier, reads per decode step, speculation, estimator time."""
    layers, c, b = st.live_layers(), st.c, st.batch
    judged = c.spec_hits + c.spec_misses
    return {
        "kv_mode": st.policy.kv,
        # host and disk hold chunks as codes under kv_quant; bytes_read_* / bytes_written_disk / moves
        # count the bytes that crossed each link, so compressed; cold_chunk_ratio = cold / device chunk bytes
        "kv_quant": st.policy.kv_quant,
        "cold_chunk_ratio": [kv.geo.cold_bytes / kv.geo.slot_bytes if kv else None for kv in st.layers],
        "chunk_tokens": [kv.geo.chunk_tokens if kv else None for kv in st.layers],
        "attention_entropy": [kv.geo.entropy if kv else None for kv in st.layers],
        "device_bytes": sum(kv.table.used_bytes(DEVICE) for kv in layers),
        "host_bytes": sum(kv.table.used_bytes(HOST) for kv in layers),
        "host_allocated_bytes": sum(kv.host_pool.allocated_bytes for kv in layers),
        "disk_bytes": sum(kv.table.used_bytes(DISK) for kv in layers),
        "disk_file_bytes": st.store.used_bytes if st.store is not None else 0,
        "device_allocated_bytes": device_allocated_bytes,
        "bytes_read_host": c.host_read_bytes,
        "bytes_read_disk": c.disk_read_bytes,
        "bytes_read_per_step": c.decode_read_bytes / c.decode_steps if c.decode_steps else 0.0,
        "bytes_written_disk": c.disk_write_bytes,
        "evicted_chunks": c.evicted_chunks,
        "streamed_chunks": c.streamed_chunks,
        "spec_hit_rate": c.spec_hits / judged if judged else None,
        "spec_fetched_chunks": c.spec_fetched_chunks,
        "spec_unused_chunks": c.spec_unused_chunks,
        "estimator_s": c.estimator_s,
        # estimator (scoring + selection, host wall time: on CUDA the launches) over the wall time of
        # the decode steps that selected chunks; None before such a step
        "estimator_share": c.estimator_s / c.sparse_step_s if c.sparse_step_s else None,
        "sparse_step_s": c.sparse_step_s,
        "sketch": st.sketch_note,
        "sketch_bytes": sum(t.numel() * t.element_size() for kv in layers
                            for t in (kv.codes, kv.centre, kv.axes2) if t is not None),   # codes + ellipsoids
        "selected_fraction": float(st.selected_tokens) / c.selectable_tokens if c.selectable_tokens else None,
        "sparse_layer_steps": c.sparse_layer_steps,
        "kv_budget_note": budget_note(st),
        # sizing the device KV room for sparse decode: the union of the KV heads' selections (tokens
        # per sequence, mean over sparse layer-steps) must fit device_room_tokens, else the step
        # overflows and streams the rest (raise --kv-device-tokens / --device-mem)
        "sparse_union_tokens": float(st.union_tokens) / (c.sparse_layer_steps * b) if c.sparse_layer_steps else None,
        "sparse_overflow_steps": c.overflow_steps,
        "device_room_tokens": [kv.geo.resident_slots * kv.geo.chunk_tokens // b if kv else None for kv in st.layers],
        "exact_layer_steps": c.exact_layer_steps,
        "decode_steps": c.decode_steps,
        "moves": st.mover.stats(),     # per link ("host->device", ...): bytes, moves, busy_s, gbps, wait_s
    }


def budget_note(st: CacheState) -> str | None:
    """What the sparse budget at the current context does not hold (``sizing.budget_holds_chunks``):
    the layers whose budget holds fewer than ``MIN_BUDGET_CHUNKS`` of their chunks, which attend
    exactly under ``kv="auto"`` and select among too few chunks under ``kv="sparse"``; None when
    every layer's budget holds enough (or no step is sparse)."""
    policy, tokens = st.policy, max(1, st.length)
    if policy.kv == "exact" or (policy.kv == "auto" and tokens <= policy.kv_exact_max_tokens):
        return None
    short = [(j, kv.geo.chunk_tokens) for j, kv in enumerate(st.layers)
             if kv is not None and not budget_holds_chunks(policy.kv_budget, tokens, kv.geo.chunk_tokens)]
    if not short:
        return None
    budget, sizes = kv_budget_tokens(policy.kv_budget, tokens), sorted({size for _, size in short})
    need = MIN_BUDGET_CHUNKS * sizes[-1]
    what = "so they attend exactly" if policy.kv == "auto" else "so sparse selection there is coarse"
    return (f"budget {budget} tokens holds < {MIN_BUDGET_CHUNKS} chunks of {'/'.join(map(str, sizes))} tokens "
            f"in layers {', '.join(str(j) for j, _ in short)}, {what}; raise kv_budget (--kv-budget) to at least "
            f"{need} tokens ({need / tokens:.3g} of this {tokens}-token context)")


def check_invariants(st: CacheState) -> int:
    """Assert that the storage follows the chunk tables: device slots, the device slot map, host
    buffers and the store (tests, debugging); returns how many chunks it checked. A closed cache
    has nothing left to check, so calling it after ``close()`` is refused rather than passing vacuously."""
    if st.closed:
        raise RuntimeError("check_invariants() on a closed TieredKVCache checks nothing: call it before "
                           "close() (inside the `with` block, or before the engine ends the generation)")
    return sum(_check_layer(st, kv) for kv in st.live_layers())


def _check_layer(st: CacheState, kv: LayerKV) -> int:
    checked, device_slots, host_slots = 0, [], []
    slot_map = kv.slot_map.tolist()                                       # (B, C_max), the kernel's view
    for b in range(st.batch):
        keys = kv.table.chunks(kv.layer, b)
        assert len(keys) == kv.n_chunks, f"layer {kv.layer} seq {b}: {len(keys)} chunks in the table"
        checked += len(keys)
        for key in keys:
            tier, slot, host_slot = kv.table.tier_of(key), kv.slot_of(key), kv.table.host_slot_of(key)
            fetching = key in kv.fetching
            assert fetching == (kv.table.in_flight(key) and tier is not DEVICE), f"{key}: fetch record mismatch"
            assert (slot is not None) == (tier is DEVICE or fetching), f"{key} on {tier.value}: device slot {slot}"
            assert (host_slot is not None) == (tier is HOST), f"{key} on {tier.value}: host slot {host_slot}"
            expect = slot if tier is DEVICE else -1
            assert slot_map[b][key.chunk] == expect, f"{key}: slot map says {slot_map[b][key.chunk]}, table {expect}"
            if slot is not None:
                assert 0 <= slot < kv.geo.resident_slots, f"{key}: slot {slot} is not a resident slot"
                device_slots.append(slot)
            if host_slot is not None:
                host_slots.append(host_slot)
            if tier is DISK:
                assert st.store is not None and key in st.store, f"{key} is on disk but not stored"
    assert len(set(device_slots)) == len(device_slots), f"layer {kv.layer}: a slot is shared"
    assert len(kv.free) + len(device_slots) == kv.geo.resident_slots and not set(kv.free) & set(device_slots), \
        f"layer {kv.layer}: slots leak"
    assert len(set(host_slots)) == len(host_slots), f"layer {kv.layer}: a host buffer is shared"
    assert len(kv.host_free) + len(host_slots) == len(kv.host_bufs) and not set(kv.host_free) & set(host_slots), \
        f"layer {kv.layer}: host buffers leak"
    return checked
