"""A per-chunk ellipsoid around the keys: the first stage of the importance estimator, without the codes.

Why this module exists: the key sketch (``tierkv.kernels.sketch``) bounds q.k per key, so scoring
every chunk with it reads every key's codes at every decode step, which on the CPU is half of the
step. The estimator only needs the sketch for the few chunks that might make the budget, and to
find those it ranks every chunk by a bound that costs O(D) per chunk, like the min/max abstract,
but that follows the keys' shape instead of their per-channel extremes (the min/max bound takes
every channel's extreme from a different key, so one needle key barely moves it).

Per closed chunk and KV head we keep the centre c (the mean key, as stored) and squared semi-axes
a^2 of an axis-aligned ellipsoid that holds every key of the chunk:

    a_d^2 = r^2 * v_d,   v_d > 0 the axis weights of channel d (any positive weights give a valid
                         ellipsoid; see below which),
    r^2   = max over the chunk's keys of sum_d (k_d - c_d)^2 / v_d     (the farthest key's radius).

Every key k satisfies sum_d (k_d - c_d)^2 / a_d^2 <= 1, so by Cauchy-Schwarz

    q.k = q.c + sum_d (q_d a_d) ((k_d - c_d) / a_d) <= q.c + sqrt(sum_d q_d^2 a_d^2)

for every key of the chunk: an upper bound on the chunk's largest logit, from two matmuls over
(D, C) per query head. A needle (one key far from the rest along q) inflates r^2 of its chunk,
so its bound rises in the direction of q, where the min/max bound would not see it. ``a^2`` is
computed against the centre as stored (rounded to the cache's dtype) and stored rounded up, so
the bound holds for the stored values; fp32 rounding of the score itself is ~1e-6 of |q| |c|.

Axis weights: the variance of channel d over the context's keys so far (``causal_variances``: all
keys of the sequence and KV head up to the chunk's end, floored so no axis is 0), not the chunk's
own variance. With the chunk's own, a chunk whose keys vary little in a channel gets a thin axis
there, and any key off that axis (the needle) is charged as if far out in every direction; on the
eval's needle set (outlier channels, per-channel offsets) the chunk's own variance ranked a needle's
chunk 41st of 256 where the context's variance ranks it within the first 11 (24 contexts x 4 KV
heads). Causal, so a chunk's ellipsoid does not depend on how the prompt was split into pieces.

Ranking (``ellipsoid_rank``): each query head's bounds are standardized over the chunks (minus
the mean, over the standard deviation) before the max over the KV group, so a head whose logits
are small but sharp is not outvoted by a head whose bounds are large everywhere (measured on the
needle set: the raw max lost 2 of 24 single-key needles at a 5% budget, standardized none).

Kernels: ``ellipsoid_scores`` (per query head bounds, Triton on CUDA, ``reference.ellipsoid_scores_ref``
elsewhere); the summary itself (``key_ellipsoids``) is plain torch, made once per closed chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tierkv.kernels._select import cdiv, jit, next_pow2, pick_backend, tl
from tierkv.kernels._tiles import chunk_tile_pair
from tierkv.kernels.reference import ellipsoid_scores_ref

__all__ = ["Ellipsoid", "KeyMoments", "causal_variances", "ellipsoid_rank", "ellipsoid_scores", "ellipsoid_scores_fwd",
           "key_ellipsoids", "no_moments"]

VARIANCE_FLOOR = 2.0**-20   # smallest axis weight, relative to the chunk's largest variance plus its centre's size
RADIUS_MARGIN = 2.0**-12    # relative slack on a^2 beside the storage dtype's rounding (fp32 sums of D terms)


class Ellipsoid(NamedTuple):
    """The ellipsoids of a layer's closed chunks: centre and axes2 (B, Hkv, C, D), the cache's dtype."""

    centre: torch.Tensor
    axes2: torch.Tensor


class KeyMoments(NamedTuple):
    """Running sums of the keys seen so far per (sequence, KV head): s1, s2 (B, Hkv, D) float64, count."""

    s1: torch.Tensor
    s2: torch.Tensor
    count: int


def no_moments(batch: int, kv_heads: int, head_dim: int, device: torch.device | str) -> KeyMoments:
    """The moments before the first key."""
    zero = torch.zeros(batch, kv_heads, head_dim, dtype=torch.float64, device=device)
    return KeyMoments(zero, zero.clone(), 0)


def causal_variances(keys: torch.Tensor, before: KeyMoments) -> tuple[torch.Tensor, KeyMoments]:
    """Per chunk, each channel's variance over every key up to the chunk's end: keys (B, Hkv, n, S, D)
    of n consecutive full chunks after the keys summed in ``before`` -> (B, Hkv, n, D) float32 and the
    moments after them. Chunk sums, then a running sum in chunk order (float64): the same values
    whether the chunks come in one call or several."""
    k = keys.double()
    S = k.shape[3]
    s1 = torch.cat([before.s1.unsqueeze(2), k.sum(3)], 2).cumsum(2)[:, :, 1:]       # (B, Hkv, n, D)
    s2 = torch.cat([before.s2.unsqueeze(2), k.square().sum(3)], 2).cumsum(2)[:, :, 1:]
    count = before.count + S * torch.arange(1, k.shape[2] + 1, dtype=torch.float64, device=k.device).view(1, 1, -1, 1)
    mean = s1 / count
    var = (s2 / count - mean.square()).clamp_min_(0.0)
    return var.float(), KeyMoments(s1[:, :, -1], s2[:, :, -1], before.count + S * k.shape[2])


def key_ellipsoids(keys: torch.Tensor, dtype: torch.dtype, variance: torch.Tensor | None = None) -> Ellipsoid:
    """The ellipsoid of each chunk's keys: keys (B, Hkv, n, S, D), every key valid -> centre, axes2
    (B, Hkv, n, D) in ``dtype``. ``variance`` (B, Hkv, n, D): the axis weights (``causal_variances``);
    None = each chunk's own variance. Element-wise per chunk (n chunks in one call = n calls)."""
    k = keys.float()
    centre = k.mean(3).to(dtype)                                             # (B, Hkv, n, D) as stored
    dev2 = (k - centre.float().unsqueeze(3)).square_()                       # (B, Hkv, n, S, D)
    var = dev2.mean(3) if variance is None else variance.float()            # (B, Hkv, n, D)
    size = var.amax(-1, keepdim=True) + centre.float().square().amax(-1, keepdim=True)
    var = torch.maximum(var, VARIANCE_FLOOR * size + torch.finfo(torch.float32).tiny)
    r2 = (dev2 / var.unsqueeze(3)).sum(-1).amax(3, keepdim=True)             # (B, Hkv, n, 1) farthest key
    margin = 1.0 + RADIUS_MARGIN + torch.finfo(dtype).eps                    # round-to-nearest stays >= r^2 v
    return Ellipsoid(centre, (r2 * var * margin).to(dtype))


@jit
def _ellipsoid_scores_kernel(
    q_ptr, c_ptr, a_ptr, out_ptr,
    N, Hkv, G, D,
    s_qb, s_qh, s_qd,
    s_eb, s_eh, s_ec, s_ed,
    s_ob, s_oh, s_og, s_oc,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (B * Hkv, cdiv(N, BLOCK_C)): one program bounds BLOCK_C chunks for every query head of a KV group.
    b, h, offs_c, offs_d, c_ok, cen, ax2 = chunk_tile_pair(c_ptr, a_ptr, N, Hkv, D, s_eb, s_eh, s_ec, s_ed,
                                                           BLOCK_C, BLOCK_D)   # (BLOCK_C, BLOCK_D) each
    for g in range(0, G):
        q_off = b.to(tl.int64) * s_qb + (h * G + g) * s_qh + offs_d * s_qd
        q = tl.load(q_ptr + q_off, mask=offs_d < D, other=0.0).to(tl.float32)[None, :]
        spread = tl.sqrt(tl.maximum(tl.sum(q * q * ax2, axis=1), 0.0))
        bound = tl.sum(q * cen, axis=1) + spread
        tl.store(out_ptr + b.to(tl.int64) * s_ob + h * s_oh + g * s_og + offs_c * s_oc, bound, mask=c_ok)


def ellipsoid_scores_fwd(q: torch.Tensor, ell: Ellipsoid, out: torch.Tensor) -> None:
    """Launch ``_ellipsoid_scores_kernel``: q (B, Hq, D), ell (B, Hkv, N, D), out (B, Hkv, G, N) float32."""
    B, Hq, D = q.shape
    _, H, N, _ = ell.centre.shape
    assert ell.centre.stride() == ell.axes2.stride() and out.shape == (B, H, Hq // H, N)
    BLOCK_C = min(64, max(16, next_pow2(N)))
    _ellipsoid_scores_kernel[(B * H, cdiv(N, BLOCK_C))](
        q, ell.centre, ell.axes2, out,
        N, H, Hq // H, D,
        *q.stride(), *ell.centre.stride(), *out.stride(),
        BLOCK_C=BLOCK_C, BLOCK_D=max(16, next_pow2(D)),
    )


def ellipsoid_scores(q: torch.Tensor, ell: Ellipsoid, *, backend: str | None = None) -> torch.Tensor:
    """Per query head upper bound of q.k over each chunk's keys: q (B, Hq, D) post-RoPE unscaled,
    ell (B, Hkv, N, D) -> (B, Hkv, G, N) float32, G = Hq // Hkv (query head h*G + g uses KV head h)."""
    B, Hq, D = q.shape
    if ell.centre.dim() != 4 or ell.centre.shape != ell.axes2.shape or ell.centre.shape[0] != B \
            or ell.centre.shape[3] != D or Hq % ell.centre.shape[1] != 0:
        raise ValueError(f"ellipsoids {tuple(ell.centre.shape)} / {tuple(ell.axes2.shape)} do not fit q "
                         f"{tuple(q.shape)}: need (B, Hkv, N, D) both, with Hq divisible by Hkv (from key_ellipsoids)")
    H, N = ell.centre.shape[1], ell.centre.shape[2]
    if pick_backend(_ellipsoid_scores_kernel, q, ell.centre, ell.axes2, backend=backend) == "triton" \
            and ell.centre.stride() == ell.axes2.stride() and N > 0:
        out = torch.empty(B, H, Hq // H, N, dtype=torch.float32, device=q.device)
        ellipsoid_scores_fwd(q, ell, out)
        return out
    return ellipsoid_scores_ref(q, ell.centre, ell.axes2)


def ellipsoid_rank(q: torch.Tensor, ell: Ellipsoid, *, backend: str | None = None) -> torch.Tensor:
    """The first stage's ranking key: each query head's bounds standardized over the chunks, max over
    the KV group. q (B, Hq, D), ell (B, Hkv, N, D) -> (B, Hkv, N) float32 (higher = sketch it first)."""
    e = ellipsoid_scores(q, ell, backend=backend)                            # (B, Hkv, G, N)
    std, mean = torch.std_mean(e, dim=-1, correction=0, keepdim=True)
    return ((e - mean) / std.clamp_min(torch.finfo(torch.float32).tiny)).amax(2)
