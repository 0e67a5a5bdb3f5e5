"""Copy-out of stored K/V from a tiered cache's layer, whatever tier holds each chunk.

Why this module exists: sessions keep a conversation's KV between calls and save it to disk; they
read a cache's K/V back in position order (``read_kv``) and feed it to another cache through the
normal append path. Reading is synchronous and holds at most one chunk per sequence besides the
output: device chunks are read from their slots, host chunks from their buffers, disk chunks are
read back (checksummed) one chunk index at a time.
"""

from __future__ import annotations

import torch

from tierkv.pipeline.kv.layer import LayerKV
from tierkv.pipeline.kv.moves import poll_fetches
from tierkv.pipeline.kv.state import CacheState
from tierkv.pipeline.kv.table import Tier

__all__ = ["read_kv"]


def read_kv(st: CacheState, kv: LayerKV, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions [start, end) of every sequence: each (B, Hkv, end - start, D) in the cache dtype."""
    assert 0 <= start <= end <= kv.tokens, f"read_kv({start}, {end}) of a layer holding {kv.tokens} tokens"
    shape = (st.batch, st.kv_heads, end - start, st.head_dim)
    k_out = torch.empty(shape, dtype=st.dtype, device=st.device)
    v_out = torch.empty_like(k_out)
    poll_fetches(kv, wait=True)                       # every chunk is where the table says, none in flight
    s = kv.geo.chunk_tokens
    for c in range(start // s, -(-end // s)):
        lo, hi = max(start, c * s), min(end, (c + 1) * s)    # positions of chunk c that are wanted
        keys = [kv.key(c, b) for b in range(st.batch)]
        disk = [key for key in keys if kv.table.tier_of(key) is Tier.DISK]
        records = dict(zip(disk, st.store.read(disk))) if disk and st.store is not None else {}
        assert len(records) == len(disk), "disk chunks without a store"
        for b, key in enumerate(keys):
            tier, rows = kv.table.tier_of(key), slice(lo - c * s, hi - c * s)
            if tier is Tier.DEVICE:
                slot = kv.slot_of(key)
                k, v = kv.k_pool[slot, :, rows], kv.v_pool[slot, :, rows]
            elif tier is Tier.HOST:
                buf = kv.host_buf(key)
                k, v = buf[0, :, rows], buf[1, :, rows]
            else:
                k, v = records[key].k[:, rows], records[key].v[:, rows]
            k_out[b, :, lo - start:hi - start] = k
            v_out[b, :, lo - start:hi - start] = v
    return k_out, v_out
