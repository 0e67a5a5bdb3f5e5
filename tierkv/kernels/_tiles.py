"""Triton helpers that several chunk-scoring kernels share.

Why this module exists: the min/max bound (``importance._chunk_scores_kernel``) and the ellipsoid bound
(``ellipsoid._ellipsoid_scores_kernel``) start the same way: one program per (sequence, KV head) and
block of chunks, loading two per-chunk summaries of the same layout (kmin/kmax, centre/axes2). That
prologue lives here once. Decorated with ``_select.jit`` (plain functions when Triton is missing).
"""

from __future__ import annotations

from tierkv.kernels._select import jit, tl

__all__ = ["chunk_tile_pair"]


@jit
def chunk_tile_pair(x_ptr, y_ptr, N, Hkv, D, s_b, s_h, s_c, s_d, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """On grid (B * Hkv, cdiv(N, BLOCK_C)): this program's (b, h), chunk offsets (BLOCK_C,), channel
    offsets (BLOCK_D,), chunk mask (offs_c < N) and the tiles (BLOCK_C, BLOCK_D) float32 of x and y,
    two (B, Hkv, N, D) tensors with strides s_b, s_h, s_c, s_d (masked lanes read 0)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    c_ok = offs_c < N
    ok = c_ok[:, None] & (offs_d < D)[None, :]
    off = b.to(tl.int64) * s_b + h * s_h + offs_c[:, None] * s_c + offs_d[None, :] * s_d
    x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32)
    return b, h, offs_c, offs_d, c_ok, x, y
