"""Appending K/V to a tiered cache's layer: fill the open chunk, open new ones, close full ones.

Why this module exists: every new token (a prefill piece, a decode step, a session's copy-in) goes
through one path that keeps the chunk index right: the chunks' min/max-key abstracts and sizes are
updated before the K/V land in their slots, chunks that fill up get their 2-bit key codes and key ellipsoids and (when
the KV may spill) are written behind to disk, and new chunks are born on the device, evicting the
least recently selected chunks when the slots are full.

A prefill piece may close many chunks (a 1K-token piece, 64 chunks of 16 tokens). Its work is done
per piece, not per chunk: one abstract update for every chunk it reaches (``piece_abstract``), and
then, per *wave* (as many of its new chunks as the device slots can take at once, usually all),
one eviction, one write of its K and V, one ``encode_keys`` for the chunks it closes and one
write-behind. Only the chunk table's entries are per chunk (pure Python). Waves keep what a
chunk-by-chunk append did: the same victims in the same order (the oldest evictable chunks before
the wave; its own chunks are never victims of it), the same abstracts, codes and records.
"""

from __future__ import annotations

import torch

from tierkv.kernels.abstract import piece_abstract
from tierkv.kernels.ellipsoid import causal_variances, key_ellipsoids
from tierkv.kernels.sketch import encode_keys
from tierkv.pipeline.kv.layer import LayerKV
from tierkv.pipeline.kv.moves import make_room, write_behind
from tierkv.pipeline.kv.state import CacheState
from tierkv.pipeline.kv.table import Tier

__all__ = ["append"]


def append(st: CacheState, kv: LayerKV, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k/v (B, Hkv, T, D) after the layer's last token: fill the open chunk, open new ones."""
    s, t = kv.geo.chunk_tokens, k.shape[2]
    first = kv.tokens // s                  # the chunk the piece starts in, and the tokens already in it
    fill = kv.tokens - first * s
    last = first + (fill + t - 1) // s
    assert last < kv.geo.max_chunks, f"layer {kv.layer}: more tokens than the cache's capacity"
    kv.chunk_sizes[first:last + 1] = s
    kv.chunk_sizes[last] = (fill + t - 1) % s + 1
    piece_abstract(kv.kmin, kv.kmax, k, first, fill, s)      # before any K/V lands (or leaves) a slot
    c = first
    while c <= last:
        end = _place(st, kv, first, fill, t, c, last)
        _write(st, kv, k, v, first, fill, c, end)
        c = end


def _span(s: int, first: int, fill: int, t: int, c: int) -> tuple[int, int, int]:
    """Chunk ``c``'s part of a piece of ``t`` tokens that starts after ``fill`` tokens of chunk ``first``:
    (tokens it held before, offset of its first new token in the piece, its new tokens)."""
    before = fill if c == first else 0
    start = max(0, (c - first) * s - fill)
    return before, start, min(t, (c - first + 1) * s - fill) - start


def _place(st: CacheState, kv: LayerKV, first: int, fill: int, t: int, c: int, last: int) -> int:
    """Give chunks c..last device slots, as many as fit at once (at least one), in the table: the open
    chunk keeps its own and grows; new ones are opened on the device for every sequence, evicting the
    least recently selected unprotected chunks for them. Returns the end of the chunks placed."""
    s, b = kv.geo.chunk_tokens, st.batch
    new = max(c, kv.n_chunks)                   # the first chunk to open (c itself unless c is the open one)
    if new > c:                                 # the open chunk grows (in the table, before chunks follow it)
        held, _, tokens = _span(s, first, fill, t, c)
        for seq in range(b):
            kv.table.grow(kv.key(c, seq), held + tokens, kv.geo.slot_bytes, kv.geo.cold_bytes)
    if new > last:
        return last + 1
    want, room = last + 1 - new, len(kv.free)
    if room < want * b:
        room += len(kv.table.eviction_order(Tier.DEVICE))     # slots freeable without waiting
    n = max(1, min(want, room // b))
    make_room(st, kv, n * b)
    slots = [kv.free.pop() for _ in range(n * b)]                     # chunk-major, as one chunk at a time
    for i in range(n):
        tokens = _span(s, first, fill, t, new + i)[2]
        for seq in range(b):
            kv.table.add(kv.key(new + i, seq), tokens, kv.geo.slot_bytes, Tier.DEVICE, slot=slots[i * b + seq],
                         cold_nbytes=kv.geo.cold_bytes)
    kv.slot_map[:, new:new + n] = torch.tensor(slots, dtype=torch.int32, device=st.device).view(n, b).T
    kv.n_chunks += n
    return new + n


def _write(st: CacheState, kv: LayerKV, k: torch.Tensor, v: torch.Tensor, first: int, fill: int, c0: int,
           c1: int) -> None:
    """Store the piece's K/V of chunks c0..c1-1 (all placed) in their slots; code and write behind the
    ones that close."""
    s, t, b = kv.geo.chunk_tokens, k.shape[2], st.batch
    spans = [_span(s, first, fill, t, c) for c in range(c0, c1)]
    before, a, z = spans[0][0], spans[0][1], spans[-1][1] + spans[-1][2]      # the wave's tokens: k[:, :, a:z]
    ends = [held + new for held, _, new in spans]                              # tokens per chunk afterwards
    slot_t = torch.tensor([[kv.slot_of(kv.key(c, seq)) for c in range(c0, c1)] for seq in range(b)],
                          device=st.device)                                    # (B, n)
    _store(kv.k_pool, slot_t, k[:, :, a:z], before, s)
    _store(kv.v_pool, slot_t, v[:, :, a:z], before, s)
    kv.slot_lens[slot_t] = ends[0] if len(set(ends)) == 1 else \
        torch.tensor(ends, dtype=kv.slot_lens.dtype, device=st.device).expand(b, -1)
    kv.tokens += z - a
    closed = c1 if ends[-1] == s else c1 - 1                                   # chunks c0..closed-1 are full
    if closed > c0:
        _encode(kv, slot_t[:, :closed - c0], c0, closed)
        write_behind(st, kv, range(c0, closed))


def _store(pool: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, before: int, s: int) -> None:
    """Write x (B, Hkv, n, D) into consecutive chunk slots (B, m) of ``pool`` (N, Hkv, S, D), from row
    ``before`` of the first: the first slot's rest, then whole slots, then the last slot's start."""
    b, h, n, d = x.shape
    head = min(n, s - before) if before else 0
    if head:
        pool[slots[:, 0], :, before:before + head] = x[:, :, :head]
    full, tail = divmod(n - head, s)
    i = 1 if head else 0
    if full:
        body = x[:, :, head:head + full * s].reshape(b, h, full, s, d).transpose(1, 2)   # (B, full, Hkv, S, D)
        pool[slots[:, i:i + full]] = body
    if tail:
        pool[slots[:, i + full], :, :tail] = x[:, :, n - tail:]


def _encode(kv: LayerKV, slots: torch.Tensor, c0: int, c1: int) -> None:
    """Chunks c0..c1-1 (in ``slots`` (B, n)) just closed and their abstracts are final: write their
    keys' 2-bit codes and their ellipsoids, all in one call each, if the layer keeps them."""
    if kv.codes is not None:
        keys = kv.k_pool[slots].transpose(1, 2)                                  # (B, Hkv, n, S, D)
        kv.codes[:, :, c0:c1] = encode_keys(keys, kv.kmin[:, :, c0:c1], kv.kmax[:, :, c0:c1])
        if kv.centre is not None and kv.axes2 is not None:
            variance, kv.moments = causal_variances(keys, kv.moments)            # the context's, up to each chunk
            kv.centre[:, :, c0:c1], kv.axes2[:, :, c0:c1] = key_ellipsoids(keys, kv.centre.dtype, variance)
        kv.n_coded = c1
