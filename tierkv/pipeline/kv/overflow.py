"""Sparse decode steps whose selection does not fit the device slots (an *overflow*).

Why this module exists: a slot holds a chunk for every KV head, so the device must hold the union
of the KV heads' selections. When it cannot, the slots keep as much of the union as they hold and
the rest is read for that step only, in large groups on several reader threads, and combined
exactly (over the selected (chunk, KV head) pairs) with the online softmax of ``streamed``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from tierkv.pipeline.kv.layer import Fetch, LayerKV
from tierkv.pipeline.kv.moves import evict, finish_fetch, load_into, poll_fetches, start_fetches
from tierkv.pipeline.kv.state import CacheState
from tierkv.pipeline.kv.streamed import OnlineSoftmax
from tierkv.pipeline.kv.table import ChunkKey, KVBudgetError, Tier
from tierkv.pipeline.kv.workers import STREAM_THREADS, KVMove, complete, settle

__all__ = ["decode_overflow", "overflow_order"]

STREAM_BYTES = 32 << 20          # cap on the K/V a sparse step that overflows the device streams at once
Group = tuple[list[KVMove], torch.Tensor, torch.Tensor, torch.Tensor]   # moves, k, v, key_ok


def decode_overflow(st: CacheState, kv: LayerKV, q: torch.Tensor, picked: Mapping[ChunkKey, int]) -> torch.Tensor:
    """Sparse attention when the union of the KV heads' selections exceeds the resident slots.

    ``picked`` maps each needed chunk to the KV heads that selected it (bit h = head h). As
    many needed chunks as the resident slots hold become resident (``overflow_order`` says
    which), evicting only chunks the step does not need; the rest, the remainder, is read from
    the host or disk for this step only and never placed.

    An fp32 online softmax folds the needed chunks already resident (each KV head through a slot
    table of the chunks it selected, as the attention kernel reads them) while reader threads
    fetch the new resident chunks and read the remainder; then the fetched chunks; then the
    remainder, one fold per group. A group is one K/V buffer (B, Hkv, n*S, D) of up to
    ``STREAM_BYTES // 2`` that ``STREAM_THREADS`` jobs fill in parallel straight from host buffers
    and disk records; the next group is read while one is folded. Groups bypass the scratch slots
    (a couple of chunks each: every wave would cost a reader round trip and a fold of its own).
    They are transient activations: two groups in flight stay within half the attention scratch.
    """
    st.c.overflow_steps += 1
    poll_fetches(st, kv, wait=True)                   # fetches in flight hold slots: let them land
    order = overflow_order(kv, picked)
    kv.prev_needed = order
    fetches = _fit_resident(st, kv, order)
    rest = sorted((key for key in order if kv.slot_of(key) is None),
                  key=lambda key: (kv.table.tier_of(key) is Tier.DISK, key.seq, key.chunk))
    state = OnlineSoftmax(q, st.kv_heads, st.scratch_bytes)
    todo = _stream_groups(st, kv, rest)
    inflight: list[Group] = []

    def submit() -> None:
        if todo:
            inflight.append(_submit_group(st, kv, todo.pop(0), picked))

    kv.table.pin(rest)
    try:
        submit()
        submit()                                        # double-buffered: read group i+1 while folding i
        fetched = {key for f in fetches for key in f.keys}
        _fold_slots(st, state, kv, [key for key in order if kv.slot_of(key) is not None and key not in fetched],
                    picked)
        for f in fetches:
            finish_fetch(st, kv, f)
        _fold_slots(st, state, kv, [key for f in fetches for key in f.keys], picked)
        while inflight:
            moves, k, v, key_ok = inflight.pop(0)
            complete(st.mover, moves)
            state.fold(k, v, key_ok)
            submit()
    finally:
        settle(st.mover, [m for group in inflight for m in group[0]])
        kv.table.unpin(rest)
    st.c.streamed_chunks += len(rest)
    return state.result()


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


def _fold_slots(st: CacheState, state: OnlineSoftmax, kv: LayerKV, keys: Sequence[ChunkKey],
                picked: Mapping[ChunkKey, int]) -> None:
    """Fold resident chunks into ``state``; each KV head reads only the chunks it selected."""
    if not keys:
        return
    b, h, s, d = st.batch, st.kv_heads, kv.geo.chunk_tokens, st.head_dim
    rows: list[list[list[int]]] = [[[] for _ in range(h)] for _ in range(b)]
    for key in keys:
        slot, bits = kv.slot_of(key), picked[key]
        assert slot is not None, f"{key} is not resident"
        for j in range(h):
            if bits >> j & 1:
                rows[key.seq][j].append(slot)
    m = max(len(r) for row in rows for r in row)
    table = torch.tensor([[r + [-1] * (m - len(r)) for r in row] for row in rows],
                         device=st.device)                                          # (B, Hkv, m) slots
    slots = table.clamp(min=0)
    heads = torch.arange(h, device=st.device).view(1, h, 1)
    k = kv.k_pool[slots, heads].view(b, h, m * s, d)                               # (B, Hkv, m*S, D)
    v = kv.v_pool[slots, heads].view(b, h, m * s, d)
    key_ok = (torch.arange(s, device=st.device) < kv.slot_lens[slots][..., None]) & (table >= 0)[..., None]
    state.fold(k, v, key_ok.view(b, h, m * s))


def _stream_groups(st: CacheState, kv: LayerKV, keys: Sequence[ChunkKey]) -> list[list[list[ChunkKey]]]:
    """Off-device chunks cut into groups of up to min(``STREAM_BYTES``, half the attention scratch) // 2
    (two are in flight): per group, per sequence, up to n chunks (the same n for every sequence)."""
    per_seq: list[list[ChunkKey]] = [[] for _ in range(st.batch)]
    for key in keys:
        per_seq[key.seq].append(key)
    longest = max(len(row) for row in per_seq)
    n = max(1, min(STREAM_BYTES, st.scratch_bytes // 2) // 2 // (st.batch * kv.geo.slot_bytes))
    return [[row[lo:lo + n] for row in per_seq] for lo in range(0, longest, n)]


def _submit_group(st: CacheState, kv: LayerKV, rows: Sequence[Sequence[ChunkKey]],
                  picked: Mapping[ChunkKey, int]) -> Group:
    """Start copying a group of host/disk chunks into one K/V (B, Hkv, n*S, D), split over the
    stream threads (disk reads round-robin, so they run in parallel).

    Returns (moves, k, v, key_ok (B, Hkv, n*S)): key_ok marks the tokens each KV head selected.
    """
    b, h, s, d = st.batch, st.kv_heads, kv.geo.chunk_tokens, st.head_dim
    n = max(len(row) for row in rows)
    k = torch.empty((b, h, n, s, d), dtype=st.dtype, device=st.device)
    v = torch.empty_like(k)
    host, disk = [], []
    for i, row in enumerate(rows):
        for j, key in enumerate(row):
            (host if kv.table.tier_of(key) is Tier.HOST else disk).append((i, j, key))
        v[i, :, len(row):].zero_()          # K there is masked; V must hold no NaN (0 * NaN)
    assert all(kv.table.tier_of(key) is Tier.DISK for *_, key in disk), "only host and disk chunks stream"
    st.c.host_read_bytes += len(host) * kv.geo.cold_bytes
    st.c.disk_read_bytes += len(disk) * kv.geo.cold_bytes
    st.c.decode_read_bytes += (len(host) + len(disk)) * kv.geo.cold_bytes
    moves = load_into(st, kv, [(key, kv.host_buf(key)) for *_, key in host], [],
                      [(k[i, :, j], v[i, :, j]) for i, j, _ in host], [])
    parts = max(1, min(STREAM_THREADS, len(disk)))
    for t in range(parts):                  # disk reads round-robin over the stream threads
        part = disk[t::parts]
        moves += load_into(st, kv, [], [key for *_, key in part], [],
                           [(k[i, :, j], v[i, :, j]) for i, j, _ in part])
    sel = [[[bool(picked[key] >> j & 1) for key in row] + [False] * (n - len(row)) for j in range(h)]
           for row in rows]                                                                  # (B, Hkv, n)
    lens = [[kv.table.tokens_of(key) for key in row] + [0] * (n - len(row)) for row in rows]  # (B, n)
    key_ok = ((torch.arange(s, device=st.device) < torch.tensor(lens, device=st.device)[:, None, :, None])
              & torch.tensor(sel, device=st.device)[..., None])                           # (B, Hkv, n, S)
    return moves, k.view(b, h, n * s, d), v.view(b, h, n * s, d), key_ok.view(b, h, n * s)
