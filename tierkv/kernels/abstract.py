"""Chunk abstracts: the element-wise min and max key of every KV chunk.

Why this module exists: the importance estimator never reads the full KV cache of a layer; it
scores each chunk from a tiny per-chunk summary (two vectors of D values per KV head) that stays on
the device while the chunk itself may live on host memory or disk. The abstracts are built once at
prefill (``chunk_abstract``) and then kept current as decode appends tokens to the open, last
chunk (``abstract_append``). Chunks may have different sizes (adaptive chunking per layer) and the
last one may be partial, so chunk boundaries are given as start offsets. The tiered cache, whose
chunks all hold S tokens, folds each appended piece (a prefill piece, a decode token) into every
chunk it reaches with one call (``piece_abstract``): one launch on the GPU, at most three
reductions in torch, however many chunks the piece closes.

Keys are post-RoPE: the abstract bounds what the attention logits can be, so it must see the keys
exactly as attention does. Min and max are exact, so the abstracts keep the dtype of the keys.
"""

from __future__ import annotations

import torch

from tierkv.kernels._select import jit, next_pow2, pick_backend, tl
from tierkv.kernels.reference import abstract_append_ref, chunk_abstract_ref, piece_abstract_ref

__all__ = ["chunk_abstract", "chunk_abstract_fwd", "abstract_append", "abstract_append_fwd", "piece_abstract"]


@jit
def _chunk_abstract_kernel(
    k_ptr, starts_ptr, kmin_ptr, kmax_ptr,
    T, C, Hkv, D,
    s_kb, s_kh, s_kt, s_kd,
    s_ob, s_oh, s_oc, s_od,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (B * Hkv, C): one program reduces the tokens of one chunk of one (sequence, KV head).
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    start = tl.load(starts_ptr + c).to(tl.int32)
    end = tl.load(starts_ptr + c + 1, mask=c + 1 < C, other=T).to(tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    base = k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    lo = tl.full([BLOCK_D], float("inf"), tl.float32)
    hi = tl.full([BLOCK_D], float("-inf"), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok = (offs_t < end)[:, None] & d_ok[None, :]
        x = tl.load(base + offs_t[:, None].to(tl.int64) * s_kt + offs_d[None, :] * s_kd, mask=ok, other=0.0)
        x = x.to(tl.float32)  # (BLOCK_T, BLOCK_D)
        lo = tl.minimum(lo, tl.min(tl.where(ok, x, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(ok, x, float("-inf")), axis=0))
    out = b.to(tl.int64) * s_ob + h * s_oh + c * s_oc + offs_d * s_od
    tl.store(kmin_ptr + out, lo.to(kmin_ptr.dtype.element_ty), mask=d_ok)
    tl.store(kmax_ptr + out, hi.to(kmax_ptr.dtype.element_ty), mask=d_ok)


def chunk_abstract_fwd(
    keys: torch.Tensor, starts: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor
) -> None:
    """Launch ``_chunk_abstract_kernel``: keys (B, Hkv, T, D), starts (C,), kmin/kmax (B, Hkv, C, D)."""
    B, H, T, D = keys.shape
    C = starts.shape[0]
    assert kmin.shape == kmax.shape == (B, H, C, D) and kmin.stride() == kmax.stride()
    _chunk_abstract_kernel[(B * H, C)](
        keys, starts, kmin, kmax,
        T, C, H, D,
        *keys.stride(),
        *kmin.stride(),
        BLOCK_T=min(64, max(16, next_pow2(T))), BLOCK_D=max(16, next_pow2(D)),
    )


def _check_starts(starts: torch.Tensor, T: int, device: torch.device) -> None:
    """User errors in chunk boundaries; the values are only checked when they live on the CPU."""
    if starts.dim() != 1 or starts.numel() == 0 or starts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"starts must be a non-empty 1-D int32/int64 tensor, got {tuple(starts.shape)} {starts.dtype}")
    if starts.device != device:
        raise ValueError(f"starts is on {starts.device} but keys are on {device}; move starts first")
    if starts.device.type == "cpu":  # checking a device tensor would synchronise with the host
        if int(starts[0]) != 0 or int(starts[-1]) >= T or bool((starts[1:] <= starts[:-1]).any()):
            raise ValueError(
                f"starts must begin at 0, strictly increase and stay below T={T}; got {starts.tolist()[:8]}..."
            )


def chunk_abstract(
    keys: torch.Tensor,
    starts: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max key of every chunk of one layer.

    keys:   (B, Hkv, T, D) post-RoPE keys, any strides, fp32/fp16/bf16.
    starts: (C,) int32/int64 chunk start offsets on the keys' device: starts[0] == 0, strictly
            increasing, all < T; chunk c covers [starts[c], starts[c+1]) and the last one ends at T.
    out:    optional (kmin, kmax) buffers, each (B, Hkv, C, D) in the keys' dtype.
    Returns (kmin, kmax), each (B, Hkv, C, D) in the keys' dtype.
    """
    if keys.dim() != 4:
        raise ValueError(f"keys must be (B, Hkv, T, D), got shape {tuple(keys.shape)}")
    B, H, T, D = keys.shape
    _check_starts(starts, T, keys.device)
    shape = (B, H, starts.shape[0], D)
    kmin, kmax = out if out is not None else (keys.new_empty(shape), keys.new_empty(shape))
    if kmin.shape != shape or kmax.shape != shape or kmin.dtype != keys.dtype or kmax.dtype != keys.dtype:
        raise ValueError(f"out buffers must be {shape} {keys.dtype}, got {tuple(kmin.shape)} {kmin.dtype}")
    use_triton = pick_backend(_chunk_abstract_kernel, keys, starts, backend=backend) == "triton"
    if use_triton and kmin.stride() == kmax.stride():
        chunk_abstract_fwd(keys, starts, kmin, kmax)
    else:
        lo, hi = chunk_abstract_ref(keys, starts)
        kmin.copy_(lo)
        kmax.copy_(hi)
    return kmin, kmax


@jit
def _abstract_append_kernel(
    new_ptr, kmin_ptr, kmax_ptr,
    n, Hkv, D,
    s_nb, s_nh, s_nt, s_nd,
    s_ob, s_oh, s_od,
    FRESH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (B * Hkv,): kmin_ptr/kmax_ptr already point at the chunk being extended.
    pid_bh = tl.program_id(0)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    base = new_ptr + b.to(tl.int64) * s_nb + h.to(tl.int64) * s_nh
    out = b.to(tl.int64) * s_ob + h * s_oh + offs_d * s_od
    if FRESH:
        lo = tl.full([BLOCK_D], float("inf"), tl.float32)
        hi = tl.full([BLOCK_D], float("-inf"), tl.float32)
    else:
        lo = tl.load(kmin_ptr + out, mask=d_ok, other=0.0).to(tl.float32)
        hi = tl.load(kmax_ptr + out, mask=d_ok, other=0.0).to(tl.float32)
    for t0 in range(0, n, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok = (offs_t < n)[:, None] & d_ok[None, :]
        x = tl.load(base + offs_t[:, None] * s_nt + offs_d[None, :] * s_nd, mask=ok, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(ok, x, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(ok, x, float("-inf")), axis=0))
    tl.store(kmin_ptr + out, lo.to(kmin_ptr.dtype.element_ty), mask=d_ok)
    tl.store(kmax_ptr + out, hi.to(kmax_ptr.dtype.element_ty), mask=d_ok)


def abstract_append_fwd(
    kmin_c: torch.Tensor, kmax_c: torch.Tensor, new_keys: torch.Tensor, fresh: bool
) -> None:
    """Launch ``_abstract_append_kernel``: kmin_c/kmax_c (B, Hkv, D) views of one chunk, new_keys (B, Hkv, n, D)."""
    B, H, n, D = new_keys.shape
    assert kmin_c.shape == kmax_c.shape == (B, H, D) and kmin_c.stride() == kmax_c.stride()
    _abstract_append_kernel[(B * H,)](
        new_keys, kmin_c, kmax_c,
        n, H, D,
        *new_keys.stride(),
        *kmin_c.stride(),
        FRESH=fresh, BLOCK_T=min(64, max(16, next_pow2(n))), BLOCK_D=max(16, next_pow2(D)),
    )


def abstract_append(
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    new_keys: torch.Tensor,
    chunk: int = -1,
    *,
    fresh: bool = False,
    backend: str | None = None,
) -> None:
    """Fold keys appended to the open chunk into its abstract, in place.

    kmin, kmax: (B, Hkv, C, D) abstracts from ``chunk_abstract`` (or preallocated for the chunks
                to come); only chunk ``chunk`` is written.
    new_keys:   (B, Hkv, n, D), n >= 1, post-RoPE keys of the appended tokens, same dtype.
    chunk:      index of the open chunk in C (negative counts from the end).
    fresh:      True when these are the first tokens of the chunk (its old values are ignored).
    """
    if kmin.dim() != 4 or kmin.shape != kmax.shape or kmin.dtype != kmax.dtype:
        raise ValueError(f"kmin/kmax must be matching (B, Hkv, C, D), got {tuple(kmin.shape)}, {tuple(kmax.shape)}")
    B, H, C, D = kmin.shape
    if new_keys.dim() != 4 or new_keys.shape[:2] != (B, H) or new_keys.shape[3] != D or new_keys.shape[2] < 1:
        raise ValueError(f"new_keys must be ({B}, {H}, n>=1, {D}), got {tuple(new_keys.shape)}")
    if not -C <= chunk < C:
        raise IndexError(f"chunk {chunk} out of range for {C} chunks")
    chunk %= C
    kmin_c, kmax_c = kmin[:, :, chunk], kmax[:, :, chunk]  # (B, Hkv, D) views
    use_triton = pick_backend(_abstract_append_kernel, kmin, new_keys, backend=backend) == "triton"
    if use_triton and kmin_c.stride() == kmax_c.stride():
        abstract_append_fwd(kmin_c, kmax_c, new_keys, fresh)
    else:
        abstract_append_ref(kmin, kmax, new_keys, chunk, fresh)


def piece_abstract(
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    keys: torch.Tensor,
    first: int,
    fill: int,
    chunk_tokens: int,
    *,
    backend: str | None = None,
) -> None:
    """Fold a piece of appended keys into the abstracts of every chunk of S tokens it reaches, in place.

    kmin, kmax:   (B, Hkv, C, D) abstracts of chunks of ``chunk_tokens`` (S) tokens each.
    keys:         (B, Hkv, T, D), T >= 1, post-RoPE keys in kmin's dtype, any strides: the tokens that
                  follow the ``fill`` (0 <= fill < S) tokens already in chunk ``first``.
    Chunk ``first`` takes the first S - fill keys (folded into its abstract when fill > 0, which is
    overwritten when fill == 0), each next chunk the next S keys, the last one possibly fewer; the
    chunks reached must exist in C. The same values as ``chunk_abstract`` over the whole sequence.
    """
    if kmin.dim() != 4 or kmin.shape != kmax.shape or kmin.dtype != kmax.dtype:
        raise ValueError(f"kmin/kmax must be matching (B, Hkv, C, D), got {tuple(kmin.shape)}, {tuple(kmax.shape)}")
    B, H, C, D = kmin.shape
    if keys.dim() != 4 or keys.shape[:2] != (B, H) or keys.shape[3] != D or keys.shape[2] < 1:
        raise ValueError(f"keys must be ({B}, {H}, T>=1, {D}), got {tuple(keys.shape)}")
    T, s = keys.shape[2], chunk_tokens
    if s < 1 or not 0 <= fill < s:
        raise ValueError(f"need chunk_tokens >= 1 and 0 <= fill < chunk_tokens, got {chunk_tokens}, {fill}")
    n = (fill + T - 1) // s + 1   # chunks the piece reaches
    if first < 0 or first + n > C:
        raise IndexError(f"a piece of {T} keys after {fill} in chunk {first} reaches chunk {first + n - 1}, "
                         f"but there are {C} chunks")
    use_triton = pick_backend(_chunk_abstract_kernel, kmin, keys, backend=backend) == "triton"
    if not use_triton or kmin.stride() != kmax.stride():
        piece_abstract_ref(kmin, kmax, keys, first, fill, s)
    elif n == 1:
        abstract_append_fwd(kmin[:, :, first], kmax[:, :, first], keys, fill == 0)
    else:
        old = (kmin[:, :, first].clone(), kmax[:, :, first].clone()) if fill else None   # (B, Hkv, D)
        starts = torch.arange(-fill, T, s, device=keys.device).clamp_(min=0)              # (n,) on the device
        chunk_abstract_fwd(keys, starts, kmin[:, :, first:first + n], kmax[:, :, first:first + n])
        if old is not None:
            kmin[:, :, first] = torch.minimum(kmin[:, :, first], old[0])
            kmax[:, :, first] = torch.maximum(kmax[:, :, first], old[1])
