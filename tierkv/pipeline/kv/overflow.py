"""Sparse decode steps whose selection does not fit the device slots (an *overflow*).

Why this module exists: a slot holds a chunk for every KV head, so the device must hold the union
of the KV heads' selections. When it cannot, the slots keep as much of the union as they hold and
the rest is read for that step only, in large groups on several reader threads, and every selected
(chunk, KV head) pair gets the per-chunk partial the all-resident kernel computes, combined the
same way: the step's output does not depend on which chunks were on the device.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from tierkv.kernels import Partials, Selection, combine_partials, decode_partials, empty_partials
from tierkv.pipeline.kv.layer import Fetch, LayerKV
from tierkv.pipeline.kv.moves import evict, finish_fetch, poll_fetches, start_fetches
from tierkv.pipeline.kv.state import CacheState
from tierkv.pipeline.kv.streamed import read_cold
from tierkv.pipeline.kv.table import ChunkKey, KVBudgetError, Tier
from tierkv.pipeline.kv.workers import KVMove, complete, settle

__all__ = ["decode_overflow", "overflow_order"]

STREAM_BYTES = 32 << 20          # cap on the K/V a sparse step that overflows the device streams at once
Group = tuple[list[KVMove], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]   # moves, k, v, lens, where


def decode_overflow(st: CacheState, kv: LayerKV, q: torch.Tensor, picked: Mapping[ChunkKey, int],
                    sel: Selection) -> torch.Tensor:
    """Sparse attention when the union of the KV heads' selections exceeds the resident slots.

    ``picked`` maps each needed chunk to the KV heads that selected it (bit h = head h); ``sel`` is
    the step's selection (its ``ids`` table, as the attention kernel gets it). As many needed
    chunks as the resident slots hold become resident (``overflow_order`` says which), evicting
    only chunks the step does not need; the rest, the remainder, is read from the host or disk for
    this step only and never placed.

    The output is the all-resident kernel's, bit for bit: each table entry's partial comes from
    ``kernels.decode_partials`` (the needed chunks already resident, over the slot pool, while
    reader threads fetch the new resident chunks and read the remainder; then the fetched chunks;
    then the remainder, one call per group over the group's own pool) into one partials buffer,
    merged once by ``combine_partials`` in table order. A group is one pool (B*n, Hkv, S, D) of up
    to ``STREAM_BYTES // 2`` that ``STREAM_THREADS`` jobs fill in parallel straight from host
    buffers and disk records; the next group is read while one is computed. Groups bypass the
    scratch slots (a couple of chunks each: every wave would cost a reader round trip of its own).
    They are transient activations: two groups in flight stay within half the attention scratch.
    """
    st.c.overflow_steps += 1
    poll_fetches(st, kv, wait=True)                   # fetches in flight hold slots: let them land
    order = overflow_order(kv, picked)
    kv.prev_needed = order
    fetches = _fit_resident(st, kv, order)
    rest = sorted((key for key in order if kv.slot_of(key) is None),
                  key=lambda key: (kv.table.tier_of(key) is Tier.DISK, key.seq, key.chunk))
    b, hq, _, d = q.shape
    parts = empty_partials(b, hq, sel.ids.shape[-1], d, st.device)
    todo = _stream_groups(st, kv, rest)
    inflight: list[Group] = []

    def submit() -> None:
        if todo:
            inflight.append(_submit_group(st, kv, todo.pop(0)))

    kv.table.pin(rest)
    try:
        submit()
        submit()                                        # double-buffered: read group i+1 while computing i
        fetched = {key for f in fetches for key in f.keys}
        _slot_partials(st, kv, q, sel, parts,
                       [key for key in order if kv.slot_of(key) is not None and key not in fetched])
        for f in fetches:
            finish_fetch(st, kv, f)
        _slot_partials(st, kv, q, sel, parts, [key for f in fetches for key in f.keys])
        while inflight:
            moves, k, v, lens, where = inflight.pop(0)
            complete(st.mover, moves)
            _partials(q, sel, parts, k, v, lens, where)
            submit()
    finally:
        settle(st.mover, [m for group in inflight for m in group[0]])
        kv.table.unpin(rest)
    return combine_partials(parts, q.dtype).unsqueeze(2)


def overflow_order(kv: LayerKV, picked: Mapping[ChunkKey, int]) -> list[ChunkKey]:
    """The needed chunks, those most worth a resident slot first.

    1. Chunks already on the device: keeping them costs no copy.
    2. Chunks selected by more KV heads: a slot holds every head, so one slot serves more
       (chunk, head) pairs, and a chunk many heads want is the likeliest to be selected again
       (the next step of this layer, and the next layer, which speculation fetches for).
    3. Chunks on disk before chunks on the host: all cost one read now, but a later step that
       selects the chunk again saves the slower read if it stayed resident.
    4. Newer chunks first (nearer the recent window, which every step attends to).
    """
    def rank(key: ChunkKey) -> tuple[bool, int, bool, int]:
        return kv.slot_of(key) is None, -picked[key].bit_count(), kv.table.tier_of(key) is not Tier.DISK, -key.chunk

    return sorted(picked, key=rank)


def _fit_resident(st: CacheState, kv: LayerKV, order: Sequence[ChunkKey]) -> list[Fetch]:
    """Make the longest prefix of ``order`` that fits the resident slots resident, evicting chunks not
    in ``order``. Returns the fetches started (the caller finishes them)."""
    wanted = set(order)
    stuck = sum(1 for key in kv.resident() if key not in wanted and kv.table.protected(key))
    for n in range(min(len(order), kv.geo.resident_slots - stuck), 0, -1):
        try:
            plan = kv.table.plan_moves(order[:n])
        except KVBudgetError:
            continue                                    # pinned or protected chunks hold slots: fewer
        evict(st, kv, plan.evict)
        return start_fetches(st, kv, plan.fetch)
    return []


def _partials(q: torch.Tensor, sel: Selection, parts: Partials, k_pool: torch.Tensor, v_pool: torch.Tensor,
              lens: torch.Tensor, where: torch.Tensor) -> None:
    """Write the partials of the table entries whose chunk ``where`` (B, C) places in this pool (slot
    id; -1: elsewhere). q (B, Hq, 1, D); k_pool/v_pool (N, Hkv, S, D); lens (N,)."""
    b, h, m = sel.ids.shape
    table = where.gather(1, sel.ids.clamp(min=0).long().reshape(b, h * m)).view(b, h, m)
    decode_partials(q[:, :, 0], k_pool, v_pool, table, sel.counts, lens, parts)


def _slot_partials(st: CacheState, kv: LayerKV, q: torch.Tensor, sel: Selection, parts: Partials,
                   keys: Sequence[ChunkKey]) -> None:
    """Partials of the entries of resident chunks ``keys``, read from their slots."""
    if not keys:
        return
    where = torch.full((st.batch, kv.n_chunks), -1, dtype=torch.int64)
    for key in keys:
        slot = kv.slot_of(key)
        assert slot is not None, f"{key} is not resident"
        where[key.seq, key.chunk] = slot
    _partials(q, sel, parts, kv.k_pool, kv.v_pool, kv.slot_lens, where.to(st.device))


def _stream_groups(st: CacheState, kv: LayerKV, keys: Sequence[ChunkKey]) -> list[list[list[ChunkKey]]]:
    """Off-device chunks cut into groups of up to min(``STREAM_BYTES``, half the attention scratch) // 2
    (two are in flight): per group, per sequence, up to n chunks (the same n for every sequence)."""
    per_seq: list[list[ChunkKey]] = [[] for _ in range(st.batch)]
    for key in keys:
        per_seq[key.seq].append(key)
    longest = max(len(row) for row in per_seq)
    n = max(1, min(STREAM_BYTES, st.scratch_bytes // 2) // 2 // (st.batch * kv.geo.slot_bytes))
    return [[row[lo:lo + n] for row in per_seq] for lo in range(0, longest, n)]


def _submit_group(st: CacheState, kv: LayerKV, rows: Sequence[Sequence[ChunkKey]]) -> Group:
    """Start copying a group of host/disk chunks into a pool of its own, split over the stream threads.

    Returns (moves, k, v, lens, where): the pool k/v (B*n, Hkv, S, D) (row i's j-th chunk in slot
    i*n + j), its slots' tokens (B*n,) and where (B, C) each chunk of the layer is in it (-1: not).
    """
    b, h, s, d = st.batch, st.kv_heads, kv.geo.chunk_tokens, st.head_dim
    n = max(len(row) for row in rows)
    k = torch.empty((b * n, h, s, d), dtype=st.dtype, device=st.device)
    v = torch.empty_like(k)
    lens = torch.zeros(b * n, dtype=torch.int32)
    where = torch.full((b, kv.n_chunks), -1, dtype=torch.int64)
    items = []
    for i, row in enumerate(rows):
        for j, key in enumerate(row):
            items.append((key, (k[i * n + j], v[i * n + j])))
            lens[i * n + j] = kv.table.tokens_of(key)
            where[key.seq, key.chunk] = i * n + j
    moves = read_cold(st, kv, items)
    return moves, k, v, lens.to(st.device), where.to(st.device)
