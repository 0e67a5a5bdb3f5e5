"""The resident KV cache: every position's K/V preallocated on the compute device.

Why this module exists: when the whole KV of a generation fits the device and every step attends
exactly, the fastest cache is the simplest one. It implements the same ``model.KVCache`` protocol
as the tiered cache (and the same copy-out / copy-in calls sessions use), so the engine swaps one
for the other without touching the model math.
"""

from __future__ import annotations

from typing import Any

import torch

from tierkv.config import ModelConfig
from tierkv.model import ATTENTION_SCRATCH_BYTES, dense_attention

__all__ = ["DenseKVCache"]


class DenseKVCache:
    """All K/V resident on one device, preallocated for ``capacity_tokens`` positions per sequence.

    Storage per layer: k, v (B, Hkv, capacity, D). Sequences in a batch share positions (equal
    lengths); ``attend`` writes the new K/V at their positions and attends over the prefix.
    """

    def __init__(self, cfg: ModelConfig, batch: int, capacity_tokens: int, dtype: torch.dtype,
                 device: torch.device, attention_scratch_bytes: int = ATTENTION_SCRATCH_BYTES) -> None:
        shape = (batch, cfg.num_kv_heads, capacity_tokens, cfg.head_dim)
        self.batch, self.capacity_tokens = batch, capacity_tokens
        self.attention_scratch_bytes = attention_scratch_bytes   # cap on one block of prefill attention
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.length_tokens = 0  # tokens stored so far (same for every layer once a forward finishes)
        self._key_pos = torch.arange(capacity_tokens, device=device)[None].expand(batch, -1)  # (B, cap)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Write k/v (B, Hkv, T, D) after the stored prefix; returns the end position."""
        start, t = self.length_tokens, k.shape[2]
        end = start + t
        assert end <= self.capacity_tokens, f"KV cache full: {end} > {self.capacity_tokens} tokens"
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return end

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, window_tokens: int | None) -> torch.Tensor:
        """q (B, Hq, T, D), k/v (B, Hkv, T, D), positions (B, T) -> (B, Hq, T, D)."""
        end = self._store(layer, k, v)
        t = k.shape[2]
        lo = 0 if window_tokens is None else max(0, end - t - window_tokens + 1)  # oldest key any query can see
        return dense_attention(q, self.k[layer][:, :, lo:end], self.v[layer][:, :, lo:end],
                               positions, self._key_pos[:, lo:end], window_tokens, self.attention_scratch_bytes)

    def decode_buffers(self, layer: int, window_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """For one new token of a batch of one that sees every stored key: the layer's K and V storage
        (Hkv, capacity, D) and the position to write it at (a fused decode kernel appends and attends
        itself: ``model.fused_decode_layer``), else None."""
        pos = self.length_tokens
        if self.batch != 1 or pos >= self.capacity_tokens or (window_tokens is not None and pos + 1 > window_tokens):
            return None
        return self.k[layer][0], self.v[layer][0], pos

    def advance(self, t: int) -> None:
        """Mark ``t`` more tokens as stored (called once per forward, after the last layer)."""
        self.length_tokens += t

    # -- copy-out / copy-in (sessions) -------------------------------------------------------

    def read_kv(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the stored K and V of positions [start, end): each (B, Hkv, end - start, D)."""
        assert 0 <= start <= end <= self.length_tokens, f"read_kv({start}, {end}) of {self.length_tokens} tokens"
        return self.k[layer][:, :, start:end].clone(), self.v[layer][:, :, start:end].clone()

    def append_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v (B, Hkv, n, D) at the next positions without attending; ``advance(n)`` follows
        once every layer got its K/V."""
        self._store(layer, k, v)

    def geometry(self) -> dict[str, Any]:
        """What fixes this cache's layout (JSON-able): a dense cache has no chunks."""
        return {"kind": "dense"}
