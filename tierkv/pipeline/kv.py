"""KV caches behind the ``model.KVCache`` protocol.

Why this module exists: attention code must not care where keys and values live. This module
holds the resident cache (every token's K/V preallocated on the compute device); the tiered,
chunked cache of the KV issue implements the same ``attend`` so the engine can swap one for the
other without touching the model math.
"""

from __future__ import annotations

import torch

from tierkv.config import ModelConfig
from tierkv.model import dense_attention


class DenseKVCache:
    """All K/V resident on one device, preallocated for ``capacity_tokens`` positions per sequence.

    Storage per layer: k, v (B, Hkv, capacity, D). Sequences in a batch share positions (equal
    lengths); ``attend`` writes the new K/V at their positions and attends over the prefix.
    """

    def __init__(self, cfg: ModelConfig, batch: int, capacity_tokens: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (batch, cfg.num_kv_heads, capacity_tokens, cfg.head_dim)
        self.capacity_tokens = capacity_tokens
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.length_tokens = 0  # tokens stored so far (same for every layer once a forward finishes)
        self._key_pos = torch.arange(capacity_tokens, device=device)[None].expand(batch, -1)  # (B, cap)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, window_tokens: int | None) -> torch.Tensor:
        """q (B, Hq, T, D), k/v (B, Hkv, T, D), positions (B, T) -> (B, Hq, T, D)."""
        start, t = self.length_tokens, k.shape[2]
        end = start + t
        assert end <= self.capacity_tokens, f"KV cache full: {end} > {self.capacity_tokens} tokens"
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        lo = 0 if window_tokens is None else max(0, end - t - window_tokens + 1)  # oldest key any query can see
        return dense_attention(q, self.k[layer][:, :, lo:end], self.v[layer][:, :, lo:end],
                               positions, self._key_pos[:, lo:end], window_tokens)

    def advance(self, t: int) -> None:
        """Mark ``t`` more tokens as stored (called once per forward, after the last layer)."""
        self.length_tokens += t
