"""RMSNorm and RoPE in as few ops as each device runs fastest: one Triton kernel each on CUDA, one C++ pass on the CPU.

Why this module exists: at decode a layer's norms and rotary embedding touch a few kilobytes, so
their cost is the number of ops (kernel launches on a GPU, dispatches and Python on the CPU), not
bytes. HF's formulation is ~8 ops per norm and ~7 per RoPE of q and of k. Here:

- ``rms_norm``: on CUDA ``_rms_norm_kernel`` (one program per row: fp32 sum of squares, rsqrt,
  the normalised row rounded to x's dtype and times the weight, as HF rounds); elsewhere the
  torch path ``rms_norm_torch`` (``torch.rms_norm`` in fp32, then the weight: 2-4 ops, the same
  values as ``rms_norm_ref``, HF's formula, which the tests hold it to).
- ``rope``: the rotate-half convention written as ``x * cos + roll(x, D/2) * sin_signed``, where
  ``sin_signed`` is the sine table with its first half negated (``signed_sin``, built once per
  step by ``model.step_inputs``), so rotating is one roll instead of slice, negate, slice, concat.
  It applies to q's and k's heads in one call when they sit side by side (a fused q/k/v output).
  On CUDA ``_rope_kernel`` does it in one launch (fp32 math, one rounding); the torch path
  ``rope_torch`` gives bit for bit what HF's ``x * cos + rotate_half(x) * sin`` gives
  (``rope_ref``): negating is exact and the products and the sum round the same way.

Backend (``_select.pick_backend`` with one difference): "auto" takes Triton on CUDA tensors only.
On the CPU the torch paths are the fast ones (the Triton interpreter is for tests, which ask for it
with ``backend="triton"`` or ``TIERKV_KERNELS=triton``), and faster still, where they apply, the C++
row kernels of ``kernels.cpu_rows`` (same values; ``TIERKV_CPU_ROW_KERNELS``): a call without an
explicit ``backend`` that resolves to torch takes them first; ``backend="torch"`` keeps the torch ops.

Shapes: x (..., N) rows for the norm; x (R, T, H, D) for RoPE with tables (R, T, 1, D), D even.
"""

from __future__ import annotations

import os

import torch

from tierkv.kernels._select import ENV_VAR, jit, next_pow2, pick_backend, tl
from tierkv.kernels.cpu_rows import rms_norm_rows, rope_rows

__all__ = ["rms_norm", "rms_norm_ref", "rms_norm_torch", "rms_norm_fwd", "rope", "rope_ref", "rope_torch",
           "rope_fwd", "signed_sin"]


# ---------------------------------------------------------------------------------------------
# references (HF's formulas) and the torch paths


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: fp32 math, the normalised row cast back to x's dtype, then times the weight.
    x (..., N), weight (N,) -> (..., N) in the promotion of their dtypes."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm_ref``'s values in fewer ops: ``torch.rms_norm`` over the fp32 row (the weight inside it
    when x and the weight are fp32), then the cast and the weight."""
    n = x.shape[-1:]
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.rms_norm(x, n, weight, eps)
    return weight * torch.rms_norm(x.float(), n, None, eps).to(x.dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sine table (..., D) with its first half negated: ``rope``'s form of the rotate-half table."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half RoPE, ``x * cos + rotate_half(x) * sin``, with ``sin`` recovered from the signed
    table. x (..., D), cos/sin_signed broadcastable to x -> x's shape."""
    half = x.shape[-1] // 2
    sin = torch.cat((-sin_signed[..., :half], sin_signed[..., half:]), dim=-1)
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``rope_ref``'s values bit for bit in four ops: x * cos + roll(x, D/2) * sin_signed."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


# ---------------------------------------------------------------------------------------------
# Triton


@jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, s_xr, s_yr, eps, BLOCK: tl.constexpr):
    # grid (rows,): one program normalises one row of N values.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + row * s_xr + offs, mask=ok, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)        # rounded to x's dtype, as HF
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * s_yr + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=ok)


def rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """Launch ``_rms_norm_kernel``: x2 (R, N) with unit stride along N, weight (N,) contiguous, out (R, N)."""
    r, n = x2.shape
    assert x2.stride(1) == 1 and out.stride(1) == 1 and weight.is_contiguous() and out.shape == (r, n)
    if r:
        _rms_norm_kernel[(r,)](x2, weight, out, n, x2.stride(0), out.stride(0), float(eps), BLOCK=next_pow2(n))


@jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, T, H, D, HALF,
                 s_xr, s_xt, s_xh, s_cr, s_ct, s_yr, s_yt, s_yh, BLOCK: tl.constexpr):
    # grid (R * T, H): one program rotates one head of one token; the tables have one row per token.
    rt = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    r = (rt // T).to(tl.int64)
    t = (rt % T).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    partner = tl.where(offs < HALF, offs + HALF, offs - HALF)              # roll by D/2
    base = x_ptr + r * s_xr + t * s_xt + h * s_xh
    x = tl.load(base + offs, mask=ok, other=0.0).to(tl.float32)
    xr = tl.load(base + partner, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + r * s_cr + t * s_ct + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + r * s_cr + t * s_ct + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + r * s_yr + t * s_yt + h * s_yh + offs, (x * c + xr * s).to(y_ptr.dtype.element_ty), mask=ok)


def rope_fwd(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, out: torch.Tensor) -> None:
    """Launch ``_rope_kernel``: x/out (R, T, H, D) with unit stride along D, cos/sin_signed (R, T, 1, D)
    with the same strides as each other and unit stride along D."""
    r, t, h, d = x.shape
    assert cos.shape == sin_signed.shape == (r, t, 1, d) and cos.stride() == sin_signed.stride()
    assert x.stride(3) == 1 and out.stride(3) == 1 and cos.stride(3) == 1 and out.shape == x.shape
    if x.numel():
        _rope_kernel[(r * t, h)](x, cos, sin_signed, out, t, h, d, d // 2,
                                 x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
                                 out.stride(0), out.stride(1), out.stride(2), BLOCK=next_pow2(d))


# ---------------------------------------------------------------------------------------------
# public wrappers


def _backend(kernel: object, backend: str | None, *tensors: torch.Tensor) -> str:
    """Triton or torch for one call: as ``pick_backend``, except that "auto" runs Triton on CUDA only."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice == "auto" and not all(t.is_cuda for t in tensors):
        return "torch"
    return pick_backend(kernel, *tensors, backend=choice)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str | None = None) -> torch.Tensor:
    """RMSNorm of the last dim as HF computes it (``rms_norm_ref``).

    x:       (..., N) float32/bfloat16/float16, unit stride along N for the Triton path.
    weight:  (N,) on x's device.
    eps:     added to the mean square.
    backend: "torch" | "triton" | "auto" | None (see the module docstring).
    Returns (..., N) in the promotion of x's and the weight's dtypes.
    """
    if _backend(_rms_norm_kernel, backend, x, weight) == "torch":
        out = rms_norm_rows(x, weight, eps) if backend is None else None      # one C++ pass on the CPU
        return out if out is not None else rms_norm_torch(x, weight, eps)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rms_norm_fwd(x2, weight.contiguous(), eps, out)
    return out.view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Rotary embedding, rotate-half convention (``rope_ref``), of every head of every token.

    x:          (R, T, H, D), any strides with unit stride along D for the Triton path (e.g. q's and
                k's heads of a fused q/k/v output side by side).
    cos:        (R, T, 1, D) in x's dtype, the per-token cosine table.
    sin_signed: (R, T, 1, D), the sine table with its first half negated (``signed_sin``).
    backend:    "torch" | "triton" | "auto" | None (see the module docstring).
    Returns a new (R, T, H, D) tensor in x's dtype.
    """
    if _backend(_rope_kernel, backend, x, cos, sin_signed) == "torch":
        out = rope_rows(x, cos, sin_signed) if backend is None else None      # one C++ pass on the CPU
        return out if out is not None else rope_torch(x, cos, sin_signed)
    xs = x if x.stride(-1) == 1 else x.contiguous()
    tables = [c if c.stride(-1) == 1 else c.contiguous() for c in (cos, sin_signed)]
    if tables[0].stride() != tables[1].stride():
        tables = [c.contiguous() for c in tables]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rope_fwd(xs, tables[0], tables[1], out)
    return out
