"""How a layer's KV chunks are held off the device: exact, or int8/int4 codes (``Policy.kv_quant``).

Why this module exists: a chunk leaves the device for the host (an eviction) or the disk (a write),
and comes back into a device slot (a fetch, a streamed wave, an overflow group, a session read).
Every one of those moves goes through a handler of ``workers``, and each must turn a device chunk
into its cold form and back the same way. ``ChunkCodec`` is that one conversion per layer: exact
(a copy, as before) or KIVI-style quantization (``kernels.kvquant``: keys per channel within the
chunk, values per token; 16-bit params). It is chosen once per layer; the chunk table charges
``cold_bytes`` on the host and disk tiers and ``slot_bytes`` on the device.

What stays exact: device-resident chunks (so the open chunk and the recent window, which never
leave the device), and the abstracts and key codes (computed from the exact keys when the chunk
closes, before it can leave). A chunk that comes back from a cold tier holds the dequantized
values from then on; quantizing those again gives the same codes up to the 16-bit rounding of
the params (min and max are kept), so repeated round trips do not drift.
"""

from __future__ import annotations

import torch

from tierkv.io.kvstore import KVChunk, PackedKV
from tierkv.kernels.kvquant import KVQuantLayout, dequantize_kv, quantize_kv
from tierkv.quantspec import check_kv_scheme, kv_chunk_bytes

__all__ = ["ChunkCodec", "decode_record"]


class ChunkCodec:
    """One layer's conversion between a device chunk (k, v (Hkv, S, D) views) and its cold form.

    Exact: a host buffer is (2, Hkv, S, D) in the cache dtype and a disk record holds K and V.
    Quantized: a host buffer is the packed (cold_bytes,) uint8 chunk and a record holds those bytes.
    """

    def __init__(self, scheme: str, kv_heads: int, chunk_tokens: int, head_dim: int, dtype: torch.dtype) -> None:
        self.scheme = check_kv_scheme(scheme)
        self.shape = (kv_heads, chunk_tokens, head_dim)
        self.dtype = dtype
        self.layout = None if self.scheme == "none" else KVQuantLayout(self.scheme, kv_heads, chunk_tokens, head_dim)
        self.cold_bytes = kv_chunk_bytes(self.scheme, kv_heads, chunk_tokens, head_dim,
                                         torch.empty((), dtype=dtype).element_size())

    def host_view(self, raw: torch.Tensor) -> torch.Tensor:
        """A host buffer from a (cold_bytes,) uint8 piece of the host arenas."""
        assert raw.dtype == torch.uint8 and raw.numel() == self.cold_bytes, (raw.shape, self.cold_bytes)
        return raw if self.layout is not None else raw.view(self.dtype).view(2, *self.shape)

    def encode(self, k: torch.Tensor, v: torch.Tensor, tokens: int, buf: torch.Tensor) -> None:
        """Device chunk k, v (Hkv, S, D) holding ``tokens`` rows -> host buffer ``buf`` (quantized on k's device)."""
        if self.layout is None:
            buf[0].copy_(k)
            buf[1].copy_(v)
        else:
            buf.copy_(quantize_kv(k, v, self.layout, tokens))

    def decode(self, buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Host buffer -> device views k, v (Hkv, S, D) (dequantized on their device)."""
        if self.layout is None:
            k.copy_(buf[0], non_blocking=True)
            v.copy_(buf[1], non_blocking=True)
        else:
            dequantize_kv(buf, self.layout, k, v)

    def record(self, layer: int, chunk: int, seq: int, tensors: tuple[torch.Tensor, ...], tokens: int,
               snapshot: bool) -> KVChunk:
        """A disk record of a device chunk: tensors = (k, v (Hkv, S, D), kmin, kmax (Hkv, D)); ``snapshot``
        copies it to host memory first (the slot may be reused before the writer runs)."""
        k, v, kmin, kmax = tensors
        start = chunk * self.shape[1]
        if self.layout is None:
            parts = (k, v, kmin, kmax)
            if snapshot:
                parts = tuple(t.to("cpu", copy=True) for t in parts)
            return KVChunk(layer, chunk, seq, start, *parts)
        packed = quantize_kv(k, v, self.layout, tokens)
        if snapshot:
            packed, kmin, kmax = (t.to("cpu", copy=True) for t in (packed, kmin, kmax))
        return KVChunk(layer, chunk, seq, start, None, None, kmin, kmax,
                       PackedKV(self.scheme, self.shape, tokens, packed))


def decode_record(chunk: KVChunk, k: torch.Tensor, v: torch.Tensor) -> None:
    """A record read back from disk -> device views k, v (Hkv, S, D); V past the record's tokens is zeroed."""
    n = chunk.n_tokens
    if chunk.packed is None:
        assert chunk.k is not None and chunk.v is not None
        k[:, :n].copy_(chunk.k)
        v[:, :n].copy_(chunk.v)
    else:
        p = chunk.packed
        layout = KVQuantLayout(p.scheme, *p.shape)
        assert (layout.kv_heads, layout.tokens, layout.head_dim) == tuple(k.shape), (p.shape, k.shape)
        dequantize_kv(p.data, layout, k, v)
    v[:, n:].zero_()
