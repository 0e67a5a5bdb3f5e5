"""Exact attention over every chunk of a layer, on any tier, with an online softmax.

Why this module exists: prefill pieces and exact decode must see every key, but only part of the
KV is on the device. Resident chunks are read in place; the others stream through a layer's
scratch slots, double-buffered on the reader thread, and each batch of keys is folded into an fp32
online softmax (``OnlineSoftmax``, flash-attention style) whose temporaries stay within the
attention scratch budget. The overflow path of sparse decode reuses the same softmax.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from tierkv.model import ATTENTION_SCRATCH_BYTES, attention_block_rows, attention_pair_bytes, visibility_mask
from tierkv.pipeline.kv.layer import LayerKV, Wave
from tierkv.pipeline.kv.moves import load, poll_fetches
from tierkv.pipeline.kv.sizing import element_bytes
from tierkv.pipeline.kv.state import CacheState
from tierkv.pipeline.kv.table import ChunkKey
from tierkv.pipeline.kv.workers import complete, settle

__all__ = ["OnlineSoftmax", "attend_streamed", "drain_prefetch", "slot_batches", "submit_wave"]

MIN_BLOCK_ROWS = 64             # a batch of chunks leaves room for this many query rows
Entries = Sequence[tuple[int, int, int]]  # (seq, chunk, slot)


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

    def fold(self, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor) -> None:
        """Decode: k/v (B, Hkv, N, D) that every query may see; key_ok (B, Hkv, N) bool picks the keys
        each KV head attends to (no positions: a decode query comes after every stored key)."""
        logits = (self.q @ k.float().transpose(-1, -2)).masked_fill_(~key_ok[:, :, None], float("-inf"))
        self._accumulate(logits, v.float(), slice(None))

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


def slot_batches(entries: Entries, batch: int, per_batch: int) -> Iterator[tuple[list[list[int]], ...]]:
    """Rectangular (B, n) lists of slots, chunk ids and validity from (seq, chunk, slot) entries."""
    per_seq: list[list[tuple[int, int]]] = [[] for _ in range(batch)]
    for b, c, s in entries:
        per_seq[b].append((c, s))
    longest = max((len(x) for x in per_seq), default=0)
    for lo in range(0, longest, per_batch):
        rows = [x[lo:lo + per_batch] for x in per_seq]
        n = max(len(r) for r in rows)
        yield ([[s for _, s in r] + [0] * (n - len(r)) for r in rows],
               [[c for c, _ in r] + [0] * (n - len(r)) for r in rows],
               [[True] * len(r) + [False] * (n - len(r)) for r in rows])


def window_keys(st: CacheState, kv: LayerKV, q_first: int, window_tokens: int | None) -> list[ChunkKey]:
    """Every chunk of every sequence that a query at ``q_first`` (or later) may see."""
    lo = 0 if window_tokens is None else max(0, q_first - window_tokens + 1) // kv.geo.chunk_tokens
    return [kv.key(c, b) for b in range(st.batch) for c in range(lo, kv.n_chunks)]


def attend_streamed(st: CacheState, kv: LayerKV, q: torch.Tensor, positions: torch.Tensor, q_first: int,
                    window_tokens: int | None,
                    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Exact attention over every chunk (of the window) on any tier, plus ``new_kv``.

    Resident chunks are read in place; the others stream through the scratch slots. q_first is
    the position of the first query; new_kv (B, Hkv, T, D) are the queries' own keys/values.
    """
    state = OnlineSoftmax(q, st.kv_heads, st.scratch_bytes)
    keys = window_keys(st, kv, q_first, window_tokens)
    poll_fetches(st, kv, wait=True, keys=keys)
    slots = {key: kv.slot_of(key) for key in keys}
    resident = [(k.seq, k.chunk, slot) for k, slot in slots.items() if slot is not None]
    for batch in slot_batches(resident, st.batch, _chunks_per_batch(st, kv, q)):
        _update_from_slots(st, state, kv, batch, positions, window_tokens)
    _stream(st, kv, state, [k for k, slot in slots.items() if slot is None], positions, window_tokens)
    if new_kv is not None:
        state.update(new_kv[0], new_kv[1], positions, positions, None, window_tokens)
    return state.result()


def _chunks_per_batch(st: CacheState, kv: LayerKV, q: torch.Tensor) -> int:
    """Chunks folded at once: their gathered K/V (and fp32 copies) plus the scores of a block of
    ``MIN_BLOCK_ROWS`` query rows fit the attention scratch (``OnlineSoftmax.update`` then takes
    as many rows per block as fit)."""
    b, hq, t, _ = q.shape
    h, d = st.kv_heads, st.head_dim
    rows = min(hq // h * t, MIN_BLOCK_ROWS)
    per_key = attention_pair_bytes(b, h) * rows + b * h * d * (2 * element_bytes(st.dtype) + 8)
    return max(1, st.scratch_bytes // (per_key * kv.geo.chunk_tokens))


def _update_from_slots(st: CacheState, state: OnlineSoftmax, kv: LayerKV, batch: tuple[list[list[int]], ...],
                       positions: torch.Tensor, window_tokens: int | None) -> None:
    """Fold one rectangular batch of slots (B, n) into the softmax state."""
    slots, cids, ok = (torch.tensor(x, device=st.device) for x in batch)
    b, n = slots.shape
    s, h, d = kv.geo.chunk_tokens, st.kv_heads, st.head_dim
    k = kv.k_pool[slots].permute(0, 2, 1, 3, 4).reshape(b, h, n * s, d)          # (B, Hkv, n*S, D)
    v = kv.v_pool[slots].permute(0, 2, 1, 3, 4).reshape(b, h, n * s, d)
    offs = torch.arange(s, device=st.device)
    k_pos = (cids[..., None] * s + offs).reshape(b, n * s)                         # (B, n*S)
    key_ok = (offs < kv.slot_lens[slots][..., None]) & ok[..., None]              # (B, n, S)
    state.update(k, v, positions, k_pos, key_ok.reshape(b, 1, n * s), window_tokens)


def _stream(st: CacheState, kv: LayerKV, state: OnlineSoftmax, keys: Sequence[ChunkKey], positions: torch.Tensor,
            window_tokens: int | None) -> None:
    """Attend to chunks off the device through the scratch slots, loading one wave ahead."""
    pre, kv.prefetched = kv.prefetched, None
    taken = set(pre.keys) if pre is not None else set()
    rest = [k for k in keys if k not in taken]
    if pre is None and not rest:
        return
    half = len(kv.scratch) // 2
    assert half > 0, f"layer {kv.layer}: chunks off the device but no scratch slots"
    plan = [rest[i:i + half] for i in range(0, len(rest), half)]
    waves = [pre] if pre is not None else []
    if pre is None and plan:
        waves.append(submit_wave(st, kv, plan.pop(0), 0))
    done = 0
    try:
        while done < len(waves):
            if plan:
                waves.append(submit_wave(st, kv, plan.pop(0), len(waves) % 2))
            wave = waves[done]
            complete(st.mover, wave.records)
            for batch in slot_batches(wave.entries(), st.batch, len(wave.keys)):
                _update_from_slots(st, state, kv, batch, positions, window_tokens)
            done += 1
    finally:
        settle(st.mover, [r for w in waves for r in w.records])
        for wave in waves:
            kv.table.unpin(wave.keys)
    st.c.streamed_chunks += sum(len(w.keys) for w in waves)


def submit_wave(st: CacheState, kv: LayerKV, keys: Sequence[ChunkKey], buffer: int) -> Wave:
    """Pin chunks and load them into scratch half ``buffer`` (0 or 1) on the reader thread."""
    half = len(kv.scratch) // 2
    slots = kv.scratch[buffer * half: buffer * half + len(keys)]
    assert len(slots) == len(keys), "a wave is larger than half the scratch slots"
    kv.table.pin(keys)
    return Wave(tuple(keys), tuple(slots), tuple(load(st, kv, keys, slots)))


def drain_prefetch(st: CacheState, kv: LayerKV) -> None:
    """Drop a streamed wave prefetched for exact attention (the step turned sparse)."""
    if kv.prefetched is not None:
        settle(st.mover, kv.prefetched.records)
        kv.table.unpin(kv.prefetched.keys)
        kv.prefetched = None
