"""Exact attention over every chunk of a layer, on any tier, with bits that do not depend on placement.

Why this module exists: prefill pieces and exact decode must see every key, but only part of the
KV is on the device, and the README promises the tokens of the resident (dense) cache. So where
the answer is computed never depends on where the chunks are:

* Gathered (the context's K/V of one layer fits the attention scratch, ``st.scratch_bytes``, a
  planned constant): the visible chunks, from the slots, the scratch slots of a prefetched wave,
  the host or the disk, are copied in position order into one contiguous K/V, the piece's own K/V
  after them, and ``model.dense_attention`` runs with the arguments the dense cache gives it: the
  same bits as ``DenseKVCache`` (and resident tiered prefill costs what dense prefill costs, plus
  one copy of the layer's K/V).
* Grouped (larger contexts): the chunks go in fixed groups of ``group_chunks`` consecutive chunk
  ids (a size fixed by the scratch and the shapes alone), each gathered into a group buffer the
  same way (the next group is read while one is folded) and folded in position order into an fp32
  online softmax (``OnlineSoftmax``, flash-attention style). Placement-invariant too, but not the
  dense path's reduction: within ~1e-6 (fp32) of it; tokens may differ where two logits tie to
  the last bit of the model dtype (``test_kv_placement`` measures it).

Which one runs depends only on sizes (context, piece, scratch), never on where the chunks are.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from tierkv.model import ATTENTION_SCRATCH_BYTES, attention_block_rows, attention_pair_bytes, dense_attention, \
    visibility_mask
from tierkv.pipeline.kv.layer import LayerKV, Wave
from tierkv.pipeline.kv.moves import load, load_into, poll_fetches
from tierkv.pipeline.kv.sizing import element_bytes, gathered_kv_bytes
from tierkv.pipeline.kv.state import CacheState
from tierkv.pipeline.kv.table import ChunkKey, Tier
from tierkv.pipeline.kv.workers import STREAM_THREADS, KVMove, complete, settle

__all__ = ["OnlineSoftmax", "attend_streamed", "drain_prefetch", "gathered_fits", "group_chunks", "read_cold",
           "submit_wave", "window_keys"]

MIN_BLOCK_ROWS = 64             # a group leaves room for this many query rows' scores
Dest = tuple[torch.Tensor, torch.Tensor]   # (k, v) views (Hkv, S, D) a chunk is copied into


class OnlineSoftmax:
    """Attention accumulated over batches of keys in fp32 (flash-attention style).

    State per (B, Hkv, G*T) query row (row r is query head g = r // T of the group, query t = r % T):
    running max ``m`` and sum ``l`` of exp(logit - m), and ``acc`` (..., D); after the last batch
    the output is acc / l. ``update`` goes through the rows in blocks whose temporaries fit
    ``scratch_bytes`` (``model.attention_block_rows``), so a prefill piece never holds its scores
    against a whole batch of keys at once.
    """

    def __init__(self, q: torch.Tensor, kv_heads: int, scratch_bytes: int = ATTENTION_SCRATCH_BYTES) -> None:
        b, hq, t, d = q.shape
        self.shape, self.dtype, self.group = q.shape, q.dtype, hq // kv_heads
        self.scratch_bytes = scratch_bytes
        self.q = (q.float() / math.sqrt(d)).reshape(b, kv_heads, self.group * t, d)   # (B, Hkv, G*T, D)
        self.m = torch.full(self.q.shape[:-1], float("-inf"), device=q.device)        # (B, Hkv, G*T)
        self.l = torch.zeros_like(self.m)
        self.acc = torch.zeros_like(self.q)

    def update(self, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
               key_ok: torch.Tensor | None, window_tokens: int | None) -> None:
        """k/v (B, Hkv, N, D); q_pos (B, T), k_pos (B, N); key_ok (B, 1 or Hkv, N) bool or None."""
        b, h, n, _ = k.shape
        t, rows_total = self.shape[2], self.q.shape[2]
        kt, vf = k.float().transpose(-1, -2), v.float()
        step = attention_block_rows(b, h, n, self.scratch_bytes)
        for a in range(0, rows_total, step):
            rows = slice(a, min(rows_total, a + step))
            row_pos = q_pos[:, torch.arange(rows.start, rows.stop, device=q_pos.device) % t]   # (B, R)
            allowed = visibility_mask(row_pos, k_pos, window_tokens)[:, None]                   # (B, 1, R, N)
            if key_ok is not None:
                allowed = allowed & key_ok[:, :, None, :]
            logits = (self.q[:, :, rows] @ kt).masked_fill_(~allowed, float("-inf"))          # (B, Hkv, R, N)
            self._accumulate(logits, vf, rows)

    def _accumulate(self, logits: torch.Tensor, v: torch.Tensor, rows: slice) -> None:
        """Fold masked logits (B, Hkv, R, N) of state rows ``rows`` and their values v (B, Hkv, N, D) fp32."""
        m = self.m[:, :, rows]
        m_new = torch.maximum(m, logits.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = logits.sub_(m_safe[..., None]).exp_()                       # in place: the logits are not needed again
        corr = torch.exp(m - m_safe)
        self.l[:, :, rows] = self.l[:, :, rows] * corr + p.sum(-1)
        self.acc[:, :, rows] = self.acc[:, :, rows] * corr[..., None] + p @ v
        self.m[:, :, rows] = m_new

    def result(self) -> torch.Tensor:
        """(B, Hq, T, D) in the query's dtype."""
        out = self.acc / self.l.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
        return out.reshape(self.shape).to(self.dtype)


def window_keys(st: CacheState, kv: LayerKV, q_first: int, window_tokens: int | None) -> list[ChunkKey]:
    """Every chunk of every sequence that a query at ``q_first`` (or later) may see, in chunk order."""
    lo = 0 if window_tokens is None else max(0, q_first - window_tokens + 1) // kv.geo.chunk_tokens
    return [kv.key(c, b) for c in range(lo, kv.n_chunks) for b in range(st.batch)]


def gathered_fits(st: CacheState, kv: LayerKV, chunks: int, new_tokens: int) -> bool:
    """Whether ``chunks`` whole chunks plus ``new_tokens`` of one layer's K/V (all sequences) fit
    the attention scratch: then exact attention gathers them and runs the dense path's attention."""
    tokens = chunks * kv.geo.chunk_tokens + new_tokens
    return gathered_kv_bytes(st.batch, st.kv_heads, tokens, st.head_dim, st.dtype) <= st.scratch_bytes


def group_chunks(st: CacheState, kv: LayerKV, q: torch.Tensor) -> int:
    """Chunks per group of the grouped regime: two group buffers (one read while one is folded),
    their fp32 copies and the scores of ``MIN_BLOCK_ROWS`` query rows fit the attention scratch
    (``OnlineSoftmax.update`` then takes as many rows per block as fit). Sizes only."""
    b, hq, t, _ = q.shape
    h, d = st.kv_heads, st.head_dim
    rows = min(hq // h * t, MIN_BLOCK_ROWS)
    per_key = attention_pair_bytes(b, h) * rows + b * h * d * (4 * element_bytes(st.dtype) + 8)
    return max(1, st.scratch_bytes // (per_key * kv.geo.chunk_tokens))


def attend_streamed(st: CacheState, kv: LayerKV, q: torch.Tensor, positions: torch.Tensor, q_first: int,
                    window_tokens: int | None,
                    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Exact attention over every stored token a query at ``q_first`` may see, on any tier, plus ``new_kv``.

    q (B, Hq, T, D), positions (B, T); new_kv (B, Hkv, T, D) are the queries' own keys/values (a
    prefill piece; a decode token is appended before). Gathered when it fits the scratch, else grouped.
    """
    lo = 0 if window_tokens is None else max(0, q_first - window_tokens + 1)   # the dense cache's first key
    c0, t_new = lo // kv.geo.chunk_tokens, 0 if new_kv is None else new_kv[0].shape[2]
    keys = window_keys(st, kv, q_first, window_tokens)
    poll_fetches(st, kv, wait=True, keys=keys)
    if gathered_fits(st, kv, kv.n_chunks - c0, t_new):
        return _attend_gathered(st, kv, q, positions, lo, window_tokens, new_kv)
    return _attend_grouped(st, kv, q, positions, c0, window_tokens, new_kv)


def _attend_gathered(st: CacheState, kv: LayerKV, q: torch.Tensor, positions: torch.Tensor, lo: int,
                     window_tokens: int | None, new_kv: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Copy the visible chunks into one K/V in position order and call ``model.dense_attention``."""
    s, b, h, d = kv.geo.chunk_tokens, st.batch, st.kv_heads, st.head_dim
    c0, hi, t_new = lo // s, kv.tokens, 0 if new_kv is None else new_kv[0].shape[2]
    n = kv.n_chunks - c0
    shape = (b, h, n * s + t_new, d)
    k, v = torch.empty(shape, dtype=st.dtype, device=st.device), torch.empty(shape, dtype=st.dtype, device=st.device)
    chunks = Chunks(k[:, :, :n * s].view(b, h, n, s, d), v[:, :, :n * s].view(b, h, n, s, d),
                    c0, [kv.key(c, i) for c in range(c0, kv.n_chunks) for i in range(b)])
    _fill(st, kv, chunks)
    end = hi - c0 * s
    if new_kv is not None:                        # after the chunks: it overwrites the open chunk's unused rows
        k[:, :, end:end + t_new], v[:, :, end:end + t_new] = new_kv
    span = slice(lo - c0 * s, end + t_new)
    k_pos = torch.arange(lo, hi + t_new, device=st.device)[None].expand(b, -1)   # (B, keys)
    return dense_attention(q, k[:, :, span], v[:, :, span], positions, k_pos, window_tokens, st.scratch_bytes)


def _attend_grouped(st: CacheState, kv: LayerKV, q: torch.Tensor, positions: torch.Tensor, c0: int,
                    window_tokens: int | None, new_kv: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Fold fixed groups of chunk ids [j*g, (j+1)*g) in position order into an fp32 online softmax."""
    g, s = group_chunks(st, kv, q), kv.geo.chunk_tokens
    groups = list(range(c0 // g, -(-kv.n_chunks // g)))
    state = OnlineSoftmax(q, st.kv_heads, st.scratch_bytes)
    pending: list[tuple[int, torch.Tensor, torch.Tensor, list[KVMove]]] = []

    def submit() -> None:
        if groups:
            j = groups.pop(0)
            pending.append((j, *_submit_group(st, kv, j * g, g, c0)))

    try:
        submit()
        while pending:
            submit()                                    # read group j+1 while group j is folded
            j, k, v, moves = pending.pop(0)
            complete(st.mover, moves)
            _copy_resident(st, kv, _group(st, kv, k, v, j * g, g, c0))
            ids = torch.arange(j * g, (j + 1) * g, device=st.device)
            lens = kv.chunk_sizes[ids.clamp(max=kv.chunk_sizes.shape[0] - 1)] * (ids < kv.n_chunks) * (ids >= c0)
            k_pos = (ids[:, None] * s + torch.arange(s, device=st.device)).reshape(1, g * s).expand(st.batch, -1)
            key_ok = (torch.arange(s, device=st.device) < lens[:, None]).reshape(1, 1, g * s)
            state.update(k.view(st.batch, st.kv_heads, g * s, -1), v.view(st.batch, st.kv_heads, g * s, -1),
                         positions, k_pos, key_ok.expand(st.batch, 1, -1), window_tokens)
    finally:
        settle(st.mover, [m for *_, moves in pending for m in moves])
    _release_prefetch(st, kv)
    if new_kv is not None:
        state.update(new_kv[0], new_kv[1], positions, positions, None, window_tokens)
    return state.result()


class Chunks(NamedTuple):
    """Buffers k/v (B, Hkv, n, S, D) that hold chunk ids first .. first + n - 1 of every sequence, and
    the chunks (``keys``) to copy there."""

    k: torch.Tensor
    v: torch.Tensor
    first: int
    keys: list[ChunkKey]

    def dest(self, key: ChunkKey) -> Dest:
        return self.k[key.seq, :, key.chunk - self.first], self.v[key.seq, :, key.chunk - self.first]


def _group(st: CacheState, kv: LayerKV, k: torch.Tensor, v: torch.Tensor, first: int, g: int, c0: int) -> Chunks:
    """Group [first, first + g): the chunks of it that exist and are visible (from ``c0``)."""
    keys = [kv.key(c, i) for c in range(max(first, c0), min(first + g, kv.n_chunks)) for i in range(st.batch)]
    return Chunks(k, v, first, keys)


def _submit_group(st: CacheState, kv: LayerKV, first: int, g: int, c0: int
                  ) -> tuple[torch.Tensor, torch.Tensor, list[KVMove]]:
    """A zeroed group buffer (B, Hkv, g, S, D) and the reads of its chunks that are off the device."""
    shape = (st.batch, st.kv_heads, g, kv.geo.chunk_tokens, st.head_dim)
    k, v = torch.zeros(shape, dtype=st.dtype, device=st.device), torch.zeros(shape, dtype=st.dtype, device=st.device)
    return k, v, _start_cold(st, kv, _group(st, kv, k, v, first, g, c0))


def _fill(st: CacheState, kv: LayerKV, chunks: Chunks) -> None:
    """Copy every chunk of ``chunks`` into its buffers, from whatever tier holds it."""
    moves = _start_cold(st, kv, chunks)
    try:
        _copy_resident(st, kv, chunks)
        complete(st.mover, moves)
    finally:
        settle(st.mover, moves)
    _release_prefetch(st, kv)


def _start_cold(st: CacheState, kv: LayerKV, chunks: Chunks) -> list[KVMove]:
    """Start reading the chunks that are neither resident nor in the prefetched wave."""
    pre = set(kv.prefetched.keys) if kv.prefetched is not None else set()
    return read_cold(st, kv, [(key, chunks.dest(key)) for key in chunks.keys
                              if kv.slot_of(key) is None and key not in pre])


def _copy_resident(st: CacheState, kv: LayerKV, chunks: Chunks) -> None:
    """Copy the chunks held by a resident slot or by the prefetched wave's scratch slots: one
    gather per sequence (not a copy per chunk: on a GPU each would be a kernel launch)."""
    pre = kv.prefetched
    wave = dict(zip(pre.keys, pre.slots)) if pre is not None else {}
    if pre is not None and any(key in wave for key in chunks.keys):
        complete(st.mover, pre.records)
    per_seq: list[tuple[list[int], list[int]]] = [([], []) for _ in range(st.batch)]
    for key in chunks.keys:
        slot = kv.slot_of(key)
        slot = wave.get(key) if slot is None else slot
        if slot is not None:
            per_seq[key.seq][0].append(key.chunk - chunks.first)
            per_seq[key.seq][1].append(slot)
    for b, (at, slots) in enumerate(per_seq):
        if slots:
            at_t, slots_t = (torch.tensor(x, device=st.device) for x in (at, slots))
            chunks.k[b][:, at_t] = kv.k_pool[slots_t].transpose(0, 1)                  # (Hkv, n, S, D)
            chunks.v[b][:, at_t] = kv.v_pool[slots_t].transpose(0, 1)


def read_cold(st: CacheState, kv: LayerKV, items: Sequence[tuple[ChunkKey, Dest]]) -> list[KVMove]:
    """Start reading host and disk chunks into (k, v) views (Hkv, S, D): host copies on the reader
    thread, disk reads round-robin over the stream threads (in parallel). Counts the bytes read."""
    host = [(key, d) for key, d in items if kv.table.tier_of(key) is Tier.HOST]
    disk = [(key, d) for key, d in items if kv.table.tier_of(key) is Tier.DISK]
    assert len(host) + len(disk) == len(items), "only host and disk chunks are read cold"
    st.c.host_read_bytes += len(host) * kv.geo.cold_bytes
    st.c.disk_read_bytes += len(disk) * kv.geo.cold_bytes
    st.c.streamed_chunks += len(items)
    if st.decoding:
        st.c.decode_read_bytes += len(items) * kv.geo.cold_bytes
    moves = load_into(st, kv, [(key, kv.host_buf(key)) for key, _ in host], [], [d for _, d in host], [])
    parts = max(1, min(STREAM_THREADS, len(disk)))
    for t in range(parts):
        part = disk[t::parts]
        moves += load_into(st, kv, [], [key for key, _ in part], [], [d for _, d in part])
    return moves


def _release_prefetch(st: CacheState, kv: LayerKV) -> None:
    """Exact attention read the prefetched wave's chunks from their scratch slots: count them, unpin them."""
    if kv.prefetched is not None:
        st.c.streamed_chunks += len(kv.prefetched.keys)
    drain_prefetch(st, kv)


def submit_wave(st: CacheState, kv: LayerKV, keys: Sequence[ChunkKey], buffer: int) -> Wave:
    """Pin chunks and load them into scratch half ``buffer`` (0 or 1) on the reader thread."""
    half = len(kv.scratch) // 2
    slots = kv.scratch[buffer * half: buffer * half + len(keys)]
    assert len(slots) == len(keys), "a wave is larger than half the scratch slots"
    kv.table.pin(keys)
    return Wave(tuple(keys), tuple(slots), tuple(load(st, kv, keys, slots)))


def drain_prefetch(st: CacheState, kv: LayerKV) -> None:
    """Drop a streamed wave prefetched for exact attention (used, or the step turned sparse)."""
    if kv.prefetched is not None:
        settle(st.mover, kv.prefetched.records)
        kv.table.unpin(kv.prefetched.keys)
        kv.prefetched = None
