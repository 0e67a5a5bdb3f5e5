"""KV chunks in int8/int4 on the slow tiers: quantize when a chunk leaves the device, dequantize on return.

Why this module exists: a KV chunk evicted to host memory or disk is read back over the slowest
links of a decode step, so it travels (and is stored) as KIVI-style codes: keys quantized per
channel within the chunk (one (scale, minimum) per (KV head, channel) over the chunk's tokens:
key outliers live in channels), values per token (one per (KV head, token) over the head dim).
The rounding rule is ``quant_reference.asym_quantize`` (one rule for weights and KV); the sizes
are ``quantspec.kv_chunk_bytes``. Quantizing runs once per chunk move, on the device, in torch;
dequantizing runs on every fetch of a cold chunk into a device slot, so it is a triplet: torch
reference, Triton kernel (``_dequantize_kv_kernel`` -> ``dequantize_kv_fwd``), and the public
``dequantize_kv`` that picks one (``_select.pick_backend``).

One packed chunk is a flat uint8 buffer of ``KVQuantLayout.nbytes``, in this order (16-bit params
first, so every float16 view is 2-byte aligned):

    k params (Hkv, D, 2) float16  [..., 0] scale, [..., 1] minimum, per (head, channel)
    v params (Hkv, T, 2) float16  per (head, token); rows past the chunk's tokens are zero
    k codes  (Hkv, T, D*bits/8) uint8  (int4: channel 2i in the low nibble of byte i, 2i+1 high)
    v codes  (Hkv, T, D*bits/8) uint8

and ``x ~= q * scale + minimum``. Rows past the chunk's tokens have zero codes and zero value
params: they dequantize to V = 0 (never NaN) and K = the channel minimum (masked by the slot length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierkv.kernels._select import cdiv, jit, next_pow2, pick_backend, tl
from tierkv.kernels.quant_reference import asym_dequantize, asym_quantize, pack_nibbles, unpack_nibbles
from tierkv.quantspec import BITS, SCHEMES, kv_chunk_bytes

__all__ = ["KVQuantLayout", "quantize_kv", "dequantize_kv_ref", "dequantize_kv_fwd", "dequantize_kv"]

_PARAM = torch.float16


@dataclass(frozen=True)
class KVQuantLayout:
    """Where the parts of one packed chunk of ``tokens`` rows (T) of ``kv_heads`` x ``head_dim`` live."""

    scheme: str             # "int8" | "int4"
    kv_heads: int           # Hkv
    tokens: int             # T: rows of the buffer (the chunk size; a chunk may fill fewer)
    head_dim: int           # D

    def __post_init__(self) -> None:
        assert self.scheme in SCHEMES, self.scheme
        assert self.head_dim * self.bits % 8 == 0, f"{self.scheme} packs code pairs along D: {self.head_dim} is odd"

    @property
    def bits(self) -> int:
        return BITS[self.scheme]

    @property
    def code_cols(self) -> int:
        """Bytes per (head, token) row of codes: D * bits / 8."""
        return self.head_dim * self.bits // 8

    @property
    def nbytes(self) -> int:
        return kv_chunk_bytes(self.scheme, self.kv_heads, self.tokens, self.head_dim, 2)

    def views(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """packed (nbytes,) uint8 -> k params (Hkv, D, 2) f16, v params (Hkv, T, 2) f16, k codes, v codes
        (Hkv, T, D*bits/8) uint8; all views of ``packed``."""
        assert packed.dtype == torch.uint8 and packed.numel() == self.nbytes, (packed.shape, packed.dtype, self)
        h, t, d, cols = self.kv_heads, self.tokens, self.head_dim, self.code_cols
        sizes = (h * d * 4, h * t * 4, h * t * cols, h * t * cols)
        parts, start = [], 0
        for size in sizes:
            parts.append(packed[start:start + size])
            start += size
        kp = parts[0].view(_PARAM).view(h, d, 2)
        vp = parts[1].view(_PARAM).view(h, t, 2)
        return kp, vp, parts[2].view(h, t, cols), parts[3].view(h, t, cols)


def quantize_kv(k: torch.Tensor, v: torch.Tensor, layout: KVQuantLayout, tokens: int) -> torch.Tensor:
    """k, v (Hkv, >= tokens, D) of one chunk (only the first ``tokens`` rows are read) -> the packed
    chunk (layout.nbytes,) uint8 on their device. Keys per channel over the tokens, values per token."""
    h, _, d = k.shape
    assert (h, d) == (layout.kv_heads, layout.head_dim) and 0 < tokens <= layout.tokens <= k.shape[1], \
        (k.shape, layout, tokens)
    packed = torch.zeros(layout.nbytes, dtype=torch.uint8, device=k.device)
    kp, vp, kc, vc = layout.views(packed)
    qk, ks, km = asym_quantize(k[:, :tokens], layout.bits, dim=1)        # (Hkv, n, D), (Hkv, 1, D) x2
    qv, vs, vm = asym_quantize(v[:, :tokens], layout.bits, dim=2)        # (Hkv, n, D), (Hkv, n, 1) x2
    kp[..., 0], kp[..., 1] = ks[:, 0], km[:, 0]
    vp[:, :tokens, 0], vp[:, :tokens, 1] = vs[..., 0], vm[..., 0]
    kc[:, :tokens] = pack_nibbles(qk) if layout.bits == 4 else qk
    vc[:, :tokens] = pack_nibbles(qv) if layout.bits == 4 else qv
    return packed


def dequantize_kv_ref(packed: torch.Tensor, layout: KVQuantLayout, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
    """Torch reference: packed (nbytes,) uint8 -> k_out, v_out (Hkv, T, D) (any float dtype; fp32 math)."""
    kp, vp, kc, vc = layout.views(packed)
    qk = unpack_nibbles(kc) if layout.bits == 4 else kc                    # (Hkv, T, D)
    qv = unpack_nibbles(vc) if layout.bits == 4 else vc
    k_out.copy_(asym_dequantize(qk, kp[:, None, :, 0], kp[:, None, :, 1]))           # per (head, channel)
    v_out.copy_(asym_dequantize(qv, vp[..., 0:1], vp[..., 1:2]))                      # per (head, token)


@jit
def _dequantize_kv_kernel(
    kp_ptr, vp_ptr, kc_ptr, vc_ptr, k_ptr, v_ptr,
    T, D, COLS,
    s_kh, s_kt, s_vh, s_vt,
    BITS_: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (Hkv, cdiv(T, BLOCK_T)): one program rebuilds BLOCK_T rows of one KV head's K and V.
    h = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok, d_ok = offs_t < T, offs_d < D
    ok = t_ok[:, None] & d_ok[None, :]
    col = offs_d * BITS_ // 8                                           # byte holding channel d
    codes = h.to(tl.int64) * T * COLS + offs_t[:, None].to(tl.int64) * COLS + col[None, :]
    kq = tl.load(kc_ptr + codes, mask=ok, other=0).to(tl.int32)
    vq = tl.load(vc_ptr + codes, mask=ok, other=0).to(tl.int32)
    if BITS_ == 4:
        shift = ((offs_d % 2) * 4)[None, :]
        kq = (kq >> shift) & 15
        vq = (vq >> shift) & 15
    kparams = kp_ptr + (h * D + offs_d) * 2                             # (D,) per channel
    k_scale = tl.load(kparams, mask=d_ok, other=0.0).to(tl.float32)
    k_min = tl.load(kparams + 1, mask=d_ok, other=0.0).to(tl.float32)
    vparams = vp_ptr + (h.to(tl.int64) * T + offs_t) * 2                # (T,) per token
    v_scale = tl.load(vparams, mask=t_ok, other=0.0).to(tl.float32)
    v_min = tl.load(vparams + 1, mask=t_ok, other=0.0).to(tl.float32)
    k = kq.to(tl.float32) * k_scale[None, :] + k_min[None, :]
    v = vq.to(tl.float32) * v_scale[:, None] + v_min[:, None]
    rows = offs_t[:, None].to(tl.int64)
    tl.store(k_ptr + h.to(tl.int64) * s_kh + rows * s_kt + offs_d[None, :], k.to(k_ptr.dtype.element_ty), mask=ok)
    tl.store(v_ptr + h.to(tl.int64) * s_vh + rows * s_vt + offs_d[None, :], v.to(v_ptr.dtype.element_ty), mask=ok)


def dequantize_kv_fwd(packed: torch.Tensor, layout: KVQuantLayout, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
    """Launch ``_dequantize_kv_kernel``: packed (nbytes,) uint8, k_out/v_out (Hkv, T, D) with unit last stride."""
    kp, vp, kc, vc = layout.views(packed)
    h, t, d = k_out.shape
    block_d = next_pow2(d)
    block_t = max(1, min(next_pow2(t), 4096 // block_d))
    _dequantize_kv_kernel[(h, cdiv(t, block_t))](
        kp, vp, kc, vc, k_out, v_out, t, d, layout.code_cols,
        k_out.stride(0), k_out.stride(1), v_out.stride(0), v_out.stride(1),
        BITS_=layout.bits, BLOCK_T=block_t, BLOCK_D=block_d)


def dequantize_kv(packed: torch.Tensor, layout: KVQuantLayout, k_out: torch.Tensor, v_out: torch.Tensor, *,
                  backend: str | None = None) -> None:
    """Rebuild one chunk's K and V from its packed codes, in place.

    packed: (layout.nbytes,) uint8 on any device (copied to the outputs' device first, without
    blocking); k_out, v_out: (Hkv, T, D) views on one device, any float dtype, last stride 1 (a
    device slot, or a slice of a streamed group). ``backend`` as in ``_select.pick_backend``.
    """
    shape = (layout.kv_heads, layout.tokens, layout.head_dim)
    assert tuple(k_out.shape) == shape == tuple(v_out.shape), (k_out.shape, v_out.shape, layout)
    assert k_out.stride(-1) == 1 and v_out.stride(-1) == 1, "dequantize_kv writes rows with unit last stride"
    if packed.device != k_out.device:
        packed = packed.to(k_out.device, non_blocking=True)
    if pick_backend(_dequantize_kv_kernel, packed, k_out, v_out, backend=backend) == "triton":
        dequantize_kv_fwd(packed, layout, k_out, v_out)
    else:
        dequantize_kv_ref(packed, layout, k_out, v_out)
