"""Copy-out of stored K/V from a tiered cache's layer, whatever tier holds each chunk.

Why this module exists: sessions keep a conversation's KV between calls and save it to disk; they
read a cache's K/V back in position order (``read_kv``) and feed it to another cache through the
normal append path. Reading is synchronous and holds at most one chunk per sequence besides the
output: device chunks are read from their slots, host chunks from their buffers and disk chunks
(checksummed) are decoded (dequantized, when the cold tiers hold codes) one chunk index at a time
into staging chunks; host and disk reads are moves of the cache's mover. Sessions therefore see,
and session files store, the values the cache holds, in the cache dtype.
"""

from __future__ import annotations

import torch

from tierkv.pipeline.kv.layer import LayerKV
from tierkv.pipeline.kv.moves import load_into, poll_fetches
from tierkv.pipeline.kv.state import CacheState
from tierkv.pipeline.kv.table import Tier
from tierkv.pipeline.kv.workers import complete

__all__ = ["read_kv"]


def read_kv(st: CacheState, kv: LayerKV, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions [start, end) of every sequence: each (B, Hkv, end - start, D) in the cache dtype."""
    assert 0 <= start <= end <= kv.tokens, f"read_kv({start}, {end}) of a layer holding {kv.tokens} tokens"
    shape = (st.batch, st.kv_heads, end - start, st.head_dim)
    k_out = torch.empty(shape, dtype=st.dtype, device=st.device)
    v_out = torch.empty_like(k_out)
    poll_fetches(st, kv, wait=True)                   # every chunk is where the table says, none in flight
    s = kv.geo.chunk_tokens
    for c in range(start // s, -(-end // s)):
        lo, hi = max(start, c * s), min(end, (c + 1) * s)    # positions of chunk c that are wanted
        rows, out = slice(lo - c * s, hi - c * s), slice(lo - start, hi - start)
        keys = [kv.key(c, b) for b in range(st.batch)]
        host = [(key, kv.host_buf(key)) for key in keys if kv.table.tier_of(key) is Tier.HOST]
        disk = [key for key in keys if kv.table.tier_of(key) is Tier.DISK]
        cold = [key for key, _ in host] + disk
        staged = [(torch.empty_like(kv.k_pool[0]), torch.empty_like(kv.v_pool[0])) for _ in cold]   # (Hkv, S, D)
        complete(st.mover, load_into(st, kv, host, disk, staged[:len(host)], staged[len(host):]))
        for key, (k, v) in zip(cold, staged):
            k_out[key.seq, :, out], v_out[key.seq, :, out] = k[:, rows], v[:, rows]
        for key in keys:
            if kv.table.tier_of(key) is Tier.DEVICE:
                k, v = kv.slot_pair(kv.slot_of(key))   # type: ignore[arg-type]  # resident: has a slot
                k_out[key.seq, :, out], v_out[key.seq, :, out] = k[:, rows], v[:, rows]
    return k_out, v_out
