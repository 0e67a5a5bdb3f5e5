"""Appending K/V to a tiered cache's layer: fill the open chunk, open new ones, close full ones.

Why this module exists: every new token (a prefill piece, a decode step, a session's copy-in) goes
through one path that keeps the chunk index right: the chunk's min/max-key abstract and size are
updated before the K/V land in its slot, a chunk that fills up gets its 2-bit key codes and (when
the KV may spill) is written behind to disk, and a new chunk is born on the device, evicting the
least recently selected chunks when the slots are full.
"""

from __future__ import annotations

import torch

from tierkv.kernels import abstract_append, chunk_abstract, encode_keys
from tierkv.pipeline.kv.layer import LayerKV
from tierkv.pipeline.kv.moves import make_room, write_behind
from tierkv.pipeline.kv.state import CacheState
from tierkv.pipeline.kv.table import Tier

__all__ = ["append"]

Segment = tuple[int, int, int, int]   # (chunk, tokens already in it, offset in the piece, tokens)


def append(st: CacheState, kv: LayerKV, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k/v (B, Hkv, T, D) after the layer's last token: fill the open chunk, open new ones."""
    segments = _segments(kv, k.shape[2])
    _update_abstracts(st, kv, k, segments)
    for c, fill, pos, take in segments:
        if fill == 0:
            _new_chunk(st, kv, take)
        else:
            for b in range(st.batch):
                kv.table.grow(kv.key(c, b), fill + take, kv.geo.slot_bytes, kv.geo.cold_bytes)
        slots = torch.tensor([kv.slot_of(kv.key(c, b)) for b in range(st.batch)], device=st.device)
        kv.k_pool[slots, :, fill:fill + take] = k[:, :, pos:pos + take]
        kv.v_pool[slots, :, fill:fill + take] = v[:, :, pos:pos + take]
        kv.slot_lens[slots] = fill + take
        kv.tokens += take
        if fill + take == kv.geo.chunk_tokens:
            _encode(kv, c, slots)
            write_behind(st, kv, c)


def _encode(kv: LayerKV, c: int, slots: torch.Tensor) -> None:
    """Chunk ``c`` just closed (its abstract is final): write its keys' 2-bit codes, if kept."""
    if kv.codes is not None:
        keys = kv.k_pool[slots].unsqueeze(2)                                      # (B, Hkv, 1, S, D)
        kv.codes[:, :, c:c + 1] = encode_keys(keys, kv.kmin[:, :, c:c + 1], kv.kmax[:, :, c:c + 1])
        kv.n_coded = c + 1


def _segments(kv: LayerKV, t: int) -> list[Segment]:
    """How ``t`` new tokens split over chunks."""
    s, out, pos = kv.geo.chunk_tokens, [], 0
    c, fill = kv.n_chunks - 1, (kv.tokens - (kv.n_chunks - 1) * s if kv.n_chunks else s)
    while pos < t:
        if fill == s:
            c, fill = c + 1, 0
        take = min(s - fill, t - pos)
        out.append((c, fill, pos, take))
        fill, pos = fill + take, pos + take
    assert out[-1][0] < kv.geo.max_chunks, f"layer {kv.layer}: more tokens than the cache's capacity"
    return out


def _new_chunk(st: CacheState, kv: LayerKV, tokens: int) -> None:
    """Open chunk ``n_chunks`` on the device for every sequence, evicting to make room."""
    make_room(st, kv, st.batch)
    c = kv.n_chunks
    slots = [kv.free.pop() for _ in range(st.batch)]
    for b, slot in enumerate(slots):
        kv.table.add(kv.key(c, b), tokens, kv.geo.slot_bytes, Tier.DEVICE, slot=slot, cold_nbytes=kv.geo.cold_bytes)
    kv.slot_map[:, c] = torch.tensor(slots, dtype=torch.int32, device=st.device)
    kv.n_chunks += 1


def _update_abstracts(st: CacheState, kv: LayerKV, k: torch.Tensor, segments: list[Segment]) -> None:
    """Fold the appended keys into the abstracts and sizes of the chunks they go to (before placing them)."""
    s = kv.geo.chunk_tokens
    first, last = segments[0][0], segments[-1][0]
    kv.chunk_sizes[first:last + 1] = s
    kv.chunk_sizes[last] = segments[-1][1] + segments[-1][3]
    if len(segments) == 1:
        c, fill, pos, take = segments[0]
        abstract_append(kv.kmin, kv.kmax, k[:, :, pos:pos + take], c, fresh=fill == 0)
        return
    end = segments[-1][2] + segments[-1][3]
    starts = torch.tensor([pos for _, _, pos, _ in segments], device=st.device)
    lo, hi = chunk_abstract(k[:, :, :end], starts)                            # (B, Hkv, n, D)
    if segments[0][1] > 0:  # the first segment continued a chunk opened earlier
        lo[:, :, 0] = torch.minimum(lo[:, :, 0], kv.kmin[:, :, first])
        hi[:, :, 0] = torch.maximum(hi[:, :, 0], kv.kmax[:, :, first])
    kv.kmin[:, :, first:last + 1] = lo
    kv.kmax[:, :, first:last + 1] = hi
