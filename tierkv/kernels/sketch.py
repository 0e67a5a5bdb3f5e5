"""A 2-bit key sketch that tightens the chunk upper bound to the token level.

Why this module exists: the min/max abstract bounds q.k over a chunk by taking, channel by
channel, the extreme key of the chunk, and those extremes come from different keys. Over 64 keys
and 128 channels the bound sits far above any real logit, so one key that is aligned with the
query (a "needle") lifts its chunk's bound only in the few channels where |q_d| is largest, and
the chunk ranks anywhere (measured: a single-token needle holding half of a head's attention was
found in 49% of trials at chunk 64 and a 10% budget; its chunk ranked as low as the 83rd
percentile). Scoring only a subset of channels, or sub-chunk abstracts, did not fix it (<= 0.94).

The sketch keeps, per key and channel, which quarter of the chunk's [kmin, kmax] range the key
falls in: 2 bits, D/4 bytes per key and KV head (1/16 of a bf16 K+V). For a key with code c the
channel lies in the cell [kmin + c*w, kmin + (c+1)*w], w = (kmax - kmin) / 4, so

    q.k <= sum_d max(q_d*lo_d, q_d*hi_d) = q.kmin + relu(q).w + sum_d (q_d*w_d) * c_d

is still an upper bound on the key's logit, per key, and never looser than the chunk bound. The
chunk's score is the max over its keys (and over the query heads of the KV group, as in
``importance``). Measured on the needle set: found in 100% of 96 trials at chunks 32 and 64.

Cost: one pass over the codes per decode step, the same multiply-adds as q.K over the context
but 8x fewer bytes than a bf16 K (bandwidth-bound on a GPU). Chunks are coded when they close
(their abstract is final); the open last chunk, always forced into the selection, keeps the
plain chunk bound.

Layout: codes (B, Hkv, C, S, P) uint8 with P = ceil(D / 4); channel d = i*P + j sits in bits
2i..2i+1 of byte j (so each bit pair unpacks to a contiguous block of P channels).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tierkv.kernels._select import cdiv, jit, next_pow2, pick_backend, tl
from tierkv.kernels.ellipsoid import Ellipsoid
from tierkv.kernels.reference import sketch_scores_ref

__all__ = ["KeySketch", "encode_keys", "sketch_bytes_per_token", "sketch_scores", "sketch_scores_fwd"]

LEVELS = 4  # 2 bits per channel


class KeySketch(NamedTuple):
    """Codes of the closed chunks, handed to ``chunk_scores``.

    codes:        (B, Hkv, C, S, P) uint8 from ``encode_keys`` (chunk slots past ``coded`` unused).
    chunk_tokens: (C,) or (B, C) int, tokens per chunk (keys past it in a slot are ignored).
    coded:        chunks 0..coded-1 have codes; later chunks keep the plain min/max bound.
    ellipsoid:    the coded chunks' key ellipsoids ((B, Hkv, >= coded, D), ``tierkv.kernels.ellipsoid``),
                  which rank them for the two-stage estimator without reading the codes; None:
                  the coarse sketch ranks them (it reads a quarter of every key's codes).
    """

    codes: torch.Tensor
    chunk_tokens: torch.Tensor
    coded: int
    ellipsoid: Ellipsoid | None = None


def sketch_bytes_per_token(head_dim: int) -> int:
    """Bytes of sketch per key and KV head: P = ceil(D / 4)."""
    return cdiv(head_dim, LEVELS)


def encode_keys(keys: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Codes of the keys of some chunks against those chunks' abstracts.

    keys: (B, Hkv, n, S, D) post-RoPE keys of n chunks, any strides; kmin, kmax: (B, Hkv, n, D) the
    same chunks' abstracts as stored (the cache's dtype: scoring reads those values back).
    Returns (B, Hkv, n, S, P) uint8. Keys outside the abstract (padding) clamp to the end cells.
    Element-wise per chunk, so n chunks coded in one call get the codes n calls would: the cache
    codes every chunk a prefill piece closes at once. Plain torch on whatever device the tensors are.
    """
    B, H, n, S, D = keys.shape
    P = sketch_bytes_per_token(D)
    lo = kmin.float().unsqueeze(3)                                   # (B, Hkv, n, 1, D)
    w = (kmax.float().unsqueeze(3) - lo) * (1.0 / LEVELS)
    cell = torch.where(w > 0, (keys.float() - lo) / w, torch.zeros_like(w))
    code = cell.floor_().clamp_(0, LEVELS - 1).to(torch.uint8)        # (B, Hkv, n, S, D)
    if LEVELS * P != D:
        code = torch.nn.functional.pad(code, (0, LEVELS * P - D))
    code = code.reshape(B, H, n, S, LEVELS, P)                         # a copy only for strided keys
    packed = code[..., 0, :].clone()
    for i in range(1, LEVELS):
        packed |= code[..., i, :] << (2 * i)
    return packed


@jit
def _channel_block(q_row, s_qd, kmin_row, kmax_row, s_ad, i, P, D, offs_p):
    """Channels i*P .. i*P + P - 1 (bit pair i of each code byte): q, kmin and the quarter width w."""
    d = i * P + offs_p
    ok = (offs_p < P) & (d < D)
    qd = tl.load(q_row + d * s_qd, mask=ok, other=0.0).to(tl.float32)
    lo = tl.load(kmin_row + d * s_ad, mask=ok, other=0.0).to(tl.float32)
    hi = tl.load(kmax_row + d * s_ad, mask=ok, other=0.0).to(tl.float32)
    return qd, lo, (hi - lo) * 0.25


@jit
def _sketch_scores_kernel(
    q_ptr, kmin_ptr, kmax_ptr, codes_ptr, size_ptr, ids_ptr, out_ptr,
    Hkv, G, D, P, S,
    s_qb, s_qh, s_qd,
    s_ab, s_ah, s_ac, s_ad,
    s_cb, s_ch, s_cc, s_cs, s_cp,
    s_zb, s_zc,
    s_ib, s_ih, s_ik,
    s_ob, s_oh, s_oc,
    HAS_IDS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grid (B * Hkv, chunks or candidates): one program bounds every key of one chunk for one KV
    # group; with HAS_IDS the chunk is the k-th candidate of that (sequence, KV head).
    pid_bh = tl.program_id(0)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    if HAS_IDS:
        c = tl.load(ids_ptr + b.to(tl.int64) * s_ib + h * s_ih + tl.program_id(1) * s_ik).to(tl.int64)
    else:
        c = tl.program_id(1).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    offs_s = tl.arange(0, BLOCK_S)
    a_base = b.to(tl.int64) * s_ab + h * s_ah + c * s_ac
    c_base = b.to(tl.int64) * s_cb + h * s_ch + c * s_cc
    n_tok = tl.load(size_ptr + b.to(tl.int64) * s_zb + c * s_zc).to(tl.int32)
    best = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for g in range(0, G):
        q_base = b.to(tl.int64) * s_qb + (h * G + g) * s_qh
        base = tl.zeros([BLOCK_P], tl.float32)  # q.kmin + relu(q).w, per lane of P channels
        for i in tl.static_range(4):
            qd, lo, w = _channel_block(q_ptr + q_base, s_qd, kmin_ptr + a_base, kmax_ptr + a_base, s_ad, i, P, D,
                                       offs_p)
            base += qd * lo + tl.maximum(qd, 0.0) * w
        for s0 in range(0, S, BLOCK_S):
            s = s0 + offs_s
            x = tl.load(codes_ptr + c_base + s[:, None] * s_cs + offs_p[None, :] * s_cp,
                        mask=(s < S)[:, None] & (offs_p < P)[None, :], other=0)  # (BLOCK_S, BLOCK_P)
            acc = tl.zeros([BLOCK_S], tl.float32)
            for i in tl.static_range(4):
                qd, lo, w = _channel_block(q_ptr + q_base, s_qd, kmin_ptr + a_base, kmax_ptr + a_base, s_ad, i, P,
                                           D, offs_p)
                code = ((x >> (2 * i)) & 3).to(tl.float32)
                acc += tl.sum(code * (qd * w)[None, :], axis=1)
            tok = tl.where(s < n_tok, acc + tl.sum(base, axis=0), float("-inf"))
            best = tl.maximum(best, tok)
    tl.store(out_ptr + b.to(tl.int64) * s_ob + h * s_oh + c * s_oc, tl.max(best, axis=0))


def sketch_scores_fwd(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, sketch: KeySketch,
                      out: torch.Tensor, ids: torch.Tensor | None = None) -> None:
    """Launch ``_sketch_scores_kernel``: q (B, Hq, D), kmin/kmax (B, Hkv, C, D), out (B, Hkv, C) float32;
    writes the first ``sketch.coded`` chunks of ``out``, or with ids (B, Hkv, K) int the chunks listed."""
    B, Hq, D = q.shape
    H = kmin.shape[1]
    codes, sizes = sketch.codes, sketch.chunk_tokens.expand(B, kmin.shape[2])
    S, P = codes.shape[3], codes.shape[4]
    assert kmin.stride() == kmax.stride() and sketch.coded > 0
    n = sketch.coded if ids is None else ids.shape[2]
    _sketch_scores_kernel[(B * H, n)](
        q, kmin, kmax, codes, sizes, ids if ids is not None else out, out,
        H, Hq // H, D, P, S,
        *q.stride(), *kmin.stride(), *codes.stride(), *sizes.stride(),
        *(ids.stride() if ids is not None else (0, 0, 0)), *out.stride(),
        HAS_IDS=ids is not None, BLOCK_S=min(64, max(16, next_pow2(S))), BLOCK_P=max(16, next_pow2(P)),
    )


def _check_sketch(sketch: KeySketch, kmin: torch.Tensor) -> None:
    B, H, C, D = kmin.shape
    codes = sketch.codes
    if not 0 <= sketch.coded <= C:
        raise ValueError(f"sketch.coded={sketch.coded} must be within 0..{C} (the chunks scored)")
    if (codes.dim() != 5 or codes.dtype != torch.uint8 or tuple(codes.shape[:2]) != (B, H)
            or codes.shape[2] < sketch.coded or codes.shape[4] != sketch_bytes_per_token(D)
            or codes.device != kmin.device):
        raise ValueError(
            f"sketch codes must be (B={B}, Hkv={H}, >= {sketch.coded} chunks, S, {sketch_bytes_per_token(D)}) "
            f"uint8 on {kmin.device} (from encode_keys), got {tuple(codes.shape)} {codes.dtype} on {codes.device}")
    if sketch.chunk_tokens.shape not in ((C,), (B, C)) or sketch.chunk_tokens.is_floating_point():
        raise ValueError(f"sketch.chunk_tokens must be an int tensor of shape ({C},) or ({B}, {C}), "
                         f"got {tuple(sketch.chunk_tokens.shape)} {sketch.chunk_tokens.dtype}")


def sketch_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, sketch: KeySketch, out: torch.Tensor,
                  *, ids: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Overwrite chunks of ``out`` (B, Hkv, C) with their token-level bound: the first ``sketch.coded``,
    or with ``ids`` (B, Hkv, K) int (each < ``sketch.coded``) the chunks each KV head lists.

    q (B, Hq, D) post-RoPE unscaled; kmin/kmax (B, Hkv, C, D). Called by ``chunk_scores``, which
    checks q against the abstracts and chooses the candidates; the other chunks of ``out`` are left
    as they are.
    """
    _check_sketch(sketch, kmin)
    B, H = kmin.shape[:2]
    if ids is not None and (ids.dim() != 3 or tuple(ids.shape[:2]) != (B, H) or ids.is_floating_point()
                            or ids.device != kmin.device):
        raise ValueError(f"ids must be a (B={B}, Hkv={H}, K) int tensor on {kmin.device}, "
                         f"got {tuple(ids.shape)} {ids.dtype} on {ids.device}")
    if sketch.coded == 0 or (ids is not None and ids.shape[2] == 0):
        return out
    sizes = sketch.chunk_tokens.to(kmin.device)
    sketch = sketch._replace(chunk_tokens=sizes)
    if pick_backend(_sketch_scores_kernel, q, kmin, kmax, sketch.codes, backend=backend) == "triton" \
            and kmin.stride() == kmax.stride():
        sketch_scores_fwd(q, kmin, kmax, sketch, out, ids)
    elif ids is None:
        n = sketch.coded
        out[:, :, :n] = sketch_scores_ref(q, kmin[:, :, :n], kmax[:, :, :n], sketch.codes[:, :, :n],
                                          sizes.expand(B, kmin.shape[2])[:, :n])
    else:
        got = sketch_scores_ref(q, kmin, kmax, sketch.codes[:, :, :kmin.shape[2]], sizes.expand(B, kmin.shape[2]), ids)
        out.scatter_(2, ids.long(), got)
    return out
