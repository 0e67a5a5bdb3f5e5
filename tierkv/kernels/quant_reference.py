"""Pure torch references for group-wise quantization: weights and KV chunks.

Why this module exists: the converter quantizes with these functions, the Triton kernels and the
CPU fused matmuls are checked against them, and they are the production path where neither runs.
One asymmetric min/max rule serves weights (groups along the input dimension) and KV (keys per
channel within a chunk, values per token, KIVI-style), so the rounding is the same everywhere.

Rule: for a group x of values, ``minimum = min(x)``, ``scale = (max(x) - min(x)) / (2**bits - 1)``
(1 where the group is constant, so q = 0 and the minimum carries the value), ``q = round((x -
minimum) / scale)`` clamped to [0, 2**bits - 1], and ``x ~= q * scale + minimum``. Scale and
minimum are rounded to 16 bits *before* q is computed, so q is the best code for the stored
parameters.

Shapes: N output rows, K inputs, G = K / group_size groups; KV: Hkv heads, C tokens, D head dim.
"""

from __future__ import annotations

import torch

__all__ = ["asym_quantize", "asym_dequantize", "pack_nibbles", "unpack_nibbles",
           "quantize_weight_codes", "quantize_weight_plain", "weight_codes_plain", "dequantize_weight_plain", "quant_linear_ref"]


def asym_quantize(x: torch.Tensor, bits: int, dim: int,
                  param_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` with one (scale, minimum) per slice along ``dim`` (reduced over ``dim``).

    Returns q (x's shape, uint8 in [0, 2**bits-1]), scale and minimum (x's shape with ``dim`` of
    size 1, ``param_dtype``). Computed in fp32.
    """
    xf = x.float()
    lo = xf.amin(dim, keepdim=True)
    hi = xf.amax(dim, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).to(param_dtype)
    scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))
    minimum = lo.to(param_dtype)
    q = torch.round((xf - minimum.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return q, scale, minimum


def asym_dequantize(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale + minimum`` in fp32, cast to ``dtype`` (scale/minimum broadcast against q)."""
    return (q.float() * scale.float() + minimum.float()).to(dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., 2m) uint8 values < 16 -> (..., m) uint8, element 2i in the low nibble, 2i+1 in the high."""
    assert q.dtype == torch.uint8 and q.shape[-1] % 2 == 0, (q.dtype, q.shape)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: (..., m) uint8 -> (..., 2m) uint8."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def quantize_weight_codes(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (codes (N, K) uint8 in [0, 2**bits-1], qparams (G, N, 2) float16 [scale, minimum])."""
    n, k = w.shape
    assert k % group_size == 0, (w.shape, group_size)
    q, scale, minimum = asym_quantize(w.reshape(n, k // group_size, group_size), bits, dim=-1)
    qparams = torch.stack((scale[..., 0], minimum[..., 0]), dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
    return q.reshape(n, k), qparams


def quantize_weight_plain(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (data, qparams) in the ``plain`` pack.

    data: int4 (N, K/2) uint8 nibbles, int8 (N, K) uint8; qparams (G, N, 2) float16 [scale, minimum].
    """
    q, qparams = quantize_weight_codes(w, bits, group_size)
    return (pack_nibbles(q) if bits == 4 else q), qparams


def weight_codes_plain(data: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The (N, K) uint8 codes of a ``plain`` pack's data."""
    q = unpack_nibbles(data) if bits == 4 else data
    assert q.shape[-1] == k, (q.shape, k)
    return q


def dequantize_weight_plain(data: torch.Tensor, qparams: torch.Tensor, bits: int,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``plain`` pack -> (N, K) weight in ``dtype`` (fp32 math)."""
    g, n, _ = qparams.shape
    k = data.shape[-1] * (2 if bits == 4 else 1)
    q = weight_codes_plain(data, bits, k).reshape(n, g, k // g)
    params = qparams.transpose(0, 1)                          # (N, G, 2)
    w = asym_dequantize(q, params[..., 0:1], params[..., 1:2])
    return w.reshape(n, k).to(dtype)


def quant_linear_ref(x: torch.Tensor, data: torch.Tensor, qparams: torch.Tensor, bits: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ dequantized W^T (+ bias) -> (..., N) in x's dtype; the weight is rebuilt in x's dtype."""
    w = dequantize_weight_plain(data, qparams, bits, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, bias)
