"""Decode attention over the selected KV chunks, read in place from a pool of chunk slots.

Why this module exists: after selection, the chunks a step needs sit in device memory wherever the
pipeline put them. Copying them into one contiguous K/V per step would cost a full extra pass over
the selected KV; instead attention reads them through a chunk table, like a paged KV cache.

Pool layout: K and V are each a pool of fixed-capacity chunk slots ``(N, Hkv, S, D)``; one slot
holds one chunk of one layer of one sequence for all KV heads, because chunks move between tiers
as a unit (one disk extent, one copy) and the chunk table in ``pipeline.kv.table`` counts bytes per
chunk. Per-KV-head slots would let each head keep only its own chunks resident, at the price of
Hkv times more, smaller transfers and table entries. Selection still differs per KV head: the
table ``(B, Hkv, M)`` lists, for each sequence and KV head, the slots to read; ``counts (B, Hkv)``
says how many entries are valid and ``slot_lens (N,)`` how many tokens each slot holds (S is the
capacity; variable chunk sizes and the open chunk are partial slots).

Flash-decoding split: the table entries of one (sequence, KV head) are cut into splits of
``ceil(split_tokens / S)`` chunks (default split_tokens = 512: a 128K context at a 5% budget gives
~13 splits per KV head, ~100 programs for 8 KV heads, about one per SM of a large GPU). Each
program handles all G query heads of its KV group at once (K/V read once per group) and keeps a
running max and sum (online softmax) in log2 space; a second kernel combines the splits. Split
count depends only on shapes, so nothing synchronises with the host.

Placement-invariant reduction (what the tiered cache uses): with one chunk per split
(``split_tokens <= S``, or ``decode_partials``) split p is table entry p, so its partial is that
chunk's alone, computed the same way whichever pool the chunk sits in and however many others are
computed beside it; ``combine_partials`` merges the entries in table order (selected chunk ids
ascending). A step whose chunks are partly off the device computes the resident entries over the
slot pool and the others over a temporary pool of the chunks read for that step, into one partials
buffer, and combines once: the same bits as if every chunk were resident. Cost against 512-token
splits: ~4x more (smaller) programs, better occupancy at short selections, and (B, Hq, M, D) fp32
partials written and read once (M selected chunks: a few percent of the K/V the step reads).
"""

from __future__ import annotations

import math

import torch

from tierkv.kernels._select import cdiv, jit, next_pow2, pick_backend, tl
from tierkv.kernels.reference import (Partials, combine_partials_ref, decode_partials_ref, empty_partials,
                                      sparse_decode_attention_ref)

__all__ = ["Partials", "combine_partials", "decode_partials", "empty_partials", "sparse_decode_attention",
           "sparse_decode_attention_fwd"]

_LOG2E = 1.4426950408889634


@jit
def _attend_slot(
    q, k_base, v_base, n_tok, s_ks, s_kd, s_vs, s_vd, offs_d, d_ok, qk_scale, m_i, l_i, acc,
    BLOCK_S: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online-softmax update of (m_i, l_i, acc) with the n_tok tokens of one slot (one KV head)."""
    for t0 in range(0, n_tok, BLOCK_S):
        offs_t = t0 + tl.arange(0, BLOCK_S)
        t_ok = offs_t < n_tok
        kv_ok = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_t[:, None] * s_ks + offs_d[None, :] * s_kd, mask=kv_ok, other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong: compute in fp32 there
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_G, BLOCK_S)
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the block has a valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_t[:, None] * s_vs + offs_d[None, :] * s_vd, mask=kv_ok, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@jit
def _sparse_attention_split_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, counts_ptr, lens_ptr,
    m_ptr, l_ptr, acc_ptr,
    qk_scale, Hkv, G, D, CHUNKS_PER_SPLIT,
    s_qb, s_qh, s_qd,
    s_kn, s_kh, s_ks, s_kd,
    s_vn, s_vh, s_vs, s_vd,
    s_tb, s_th, s_tm,
    s_cb, s_ch,
    s_pb, s_ph, s_ps,
    s_ab, s_ah, s_as, s_ad,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # grid (B * Hkv, n_splits): one program = one KV group over one split of its table entries.
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    heads = h * G + offs_g  # query heads of this KV group
    gd_ok = (offs_g < G)[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b.to(tl.int64) * s_qb + heads[:, None] * s_qh + offs_d[None, :] * s_qd, mask=gd_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)  # (BLOCK_G, BLOCK_D)
    count = tl.load(counts_ptr + b * s_cb + h * s_ch)
    first = split * CHUNKS_PER_SPLIT
    last = tl.minimum(first + CHUNKS_PER_SPLIT, count)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(logit - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    attended = tl.full([], 0, tl.int32)  # entries of this split with a slot (table >= 0)
    for e in range(first, last):
        slot = tl.load(table_ptr + b.to(tl.int64) * s_tb + h * s_th + e * s_tm).to(tl.int64)
        has_slot = slot >= 0  # -1: the entry's chunk is not in this pool (another call writes it)
        slot = tl.maximum(slot, 0)
        attended += has_slot.to(tl.int32)
        m_i, l_i, acc = _attend_slot(
            q, k_ptr + slot * s_kn + h * s_kh, v_ptr + slot * s_vn + h * s_vh,
            tl.where(has_slot, tl.load(lens_ptr + slot), 0),
            s_ks, s_kd, s_vs, s_vd, offs_d, d_ok, qk_scale, m_i, l_i, acc, BLOCK_S, DOT_PRECISION, UPCAST,
        )
    keep = (offs_g * 0 + attended) > 0  # (BLOCK_G,): a split with no slot leaves its partial as it was
    g_ok = (offs_g < G) & keep
    gd_ok = gd_ok & keep[:, None]
    part = b.to(tl.int64) * s_pb + heads * s_ph + split * s_ps  # (BLOCK_G,)
    tl.store(m_ptr + part, m_i, mask=g_ok)
    tl.store(l_ptr + part, l_i, mask=g_ok)
    a_off = b.to(tl.int64) * s_ab + heads[:, None] * s_ah + split * s_as + offs_d[None, :] * s_ad
    tl.store(acc_ptr + a_off, acc, mask=gd_ok)


@jit
def _sparse_attention_combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    Hq, D, n_splits,
    s_pb, s_ph, s_ps,
    s_ab, s_ah, s_as, s_ad,
    s_ob, s_oh, s_od,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (B * Hq,): merge the partial softmaxes of all splits of one query head.
    pid = tl.program_id(0)
    b = pid // Hq
    hq = pid % Hq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    p_base = b.to(tl.int64) * s_pb + hq * s_ph
    a_base = b.to(tl.int64) * s_ab + hq * s_ah
    peak = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for p0 in range(0, n_splits, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        peak = tl.maximum(peak, tl.load(m_ptr + p_base + offs_p * s_ps, mask=offs_p < n_splits, other=float("-inf")))
    m_all = tl.max(peak, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # no token at all: weights 0, output 0
    den = tl.zeros([BLOCK_P], tl.float32)
    num = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    for p0 in range(0, n_splits, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < n_splits
        w = tl.exp2(tl.load(m_ptr + p_base + offs_p * s_ps, mask=p_ok, other=float("-inf")) - m_all)
        den += w * tl.load(l_ptr + p_base + offs_p * s_ps, mask=p_ok, other=0.0)
        a_off = a_base + offs_p[:, None] * s_as + offs_d[None, :] * s_ad
        a = tl.load(acc_ptr + a_off, mask=p_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_P, BLOCK_D)
        num += w[:, None] * a
    total = tl.sum(den, axis=0)
    out = tl.sum(num, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * s_ob + hq * s_oh + offs_d * s_od, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def decode_partials_fwd(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
    counts: torch.Tensor, slot_lens: torch.Tensor, scale: float, per_split: int, parts: Partials,
) -> None:
    """Launch the split kernel: partial of split p (table entries [p * per_split, (p + 1) * per_split))
    written at position p of ``parts`` (B, Hq, P[, D]); splits without a slot are left untouched."""
    B, Hq, D = q.shape
    _, Hkv, S, _ = k_pool.shape
    m, l, acc = parts
    upcast = q.device.type == "cpu" and q.dtype == torch.bfloat16
    _sparse_attention_split_kernel[(B * Hkv, m.shape[-1])](
        q, k_pool, v_pool, table, counts, slot_lens, m, l, acc,
        scale * _LOG2E, Hkv, Hq // Hkv, D, per_split,
        *q.stride(), *k_pool.stride(), *v_pool.stride(), *table.stride(), *counts.stride(),
        *m.stride(), *acc.stride(),
        BLOCK_G=max(16, next_pow2(Hq // Hkv)), BLOCK_S=min(64, max(16, next_pow2(S))), BLOCK_D=max(16, next_pow2(D)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else None, UPCAST=upcast,  # fp32: no TF32
    )


def combine_partials_fwd(parts: Partials, out: torch.Tensor) -> None:
    """Launch the combine kernel: (B, Hq, P[, D]) partials -> out (B, Hq, D)."""
    m, l, acc = parts
    B, Hq, P = m.shape
    D = out.shape[-1]
    _sparse_attention_combine_kernel[(B * Hq,)](
        m, l, acc, out, Hq, D, P,
        *m.stride(), *acc.stride(), *out.stride(),
        BLOCK_P=16 if P <= 16 else 32, BLOCK_D=max(16, next_pow2(D)),
    )


def sparse_decode_attention_fwd(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
    counts: torch.Tensor, slot_lens: torch.Tensor, scale: float, split_tokens: int, out: torch.Tensor,
) -> None:
    """Launch the split and combine kernels: q (B, Hq, D), k_pool/v_pool (N, Hkv, S, D),
    table (B, Hkv, M), counts (B, Hkv), slot_lens (N,), out (B, Hq, D)."""
    B, Hq, D = q.shape
    S, M = k_pool.shape[2], table.shape[-1]
    per_split = max(1, cdiv(split_tokens, S))
    parts = empty_partials(B, Hq, max(1, cdiv(M, per_split)), D, q.device)
    decode_partials_fwd(q, k_pool, v_pool, table, counts, slot_lens, scale, per_split, parts)
    combine_partials_fwd(parts, out)


def _check_attention_args(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
    counts: torch.Tensor, slot_lens: torch.Tensor,
) -> None:
    """User errors in shapes, dtypes and devices, as one clear message each."""
    if q.dim() != 3 or k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(
            "need q (B, Hq, D) and k_pool/v_pool (N, Hkv, S, D) of one shape; "
            f"got {tuple(q.shape)}, {tuple(k_pool.shape)}, {tuple(v_pool.shape)}"
        )
    B, Hq, D = q.shape
    N, Hkv, S, Dk = k_pool.shape
    if Dk != D or Hq % Hkv != 0:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit pool {tuple(k_pool.shape)}: need the same D and Hq divisible by Hkv"
        )
    if q.dtype != k_pool.dtype or q.dtype != v_pool.dtype:
        raise ValueError(f"q, k_pool and v_pool must share one dtype, got {q.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    if table.dim() != 3 or table.shape[:2] != (B, Hkv) or counts.shape != (B, Hkv) or slot_lens.shape != (N,):
        raise ValueError(
            f"need table ({B}, {Hkv}, M), counts ({B}, {Hkv}), slot_lens ({N},); "
            f"got {tuple(table.shape)}, {tuple(counts.shape)}, {tuple(slot_lens.shape)}"
        )
    for name, t in (("table", table), ("counts", counts), ("slot_lens", slot_lens)):
        if t.is_floating_point() or t.dtype == torch.bool or t.device != q.device:
            raise ValueError(f"{name} must be an integer tensor on {q.device}, got {t.dtype} on {t.device}")


def sparse_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    counts: torch.Tensor,
    slot_lens: torch.Tensor,
    *,
    scale: float | None = None,
    split_tokens: int = 512,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of one decode query per head over the chunk slots its KV head selected.

    q:            (B, Hq, D) query, Hq = G * Hkv (query head i reads KV head i // G).
    k_pool:       (N, Hkv, S, D) key slots (post-RoPE), same dtype as q.
    v_pool:       (N, Hkv, S, D) value slots.
    table:        (B, Hkv, M) int slot ids per sequence and KV head, in any order; entries
                  before counts[b, h] must be valid slot ids (not checked: that would
                  synchronise), later ones are ignored (padding such as -1 is fine there).
    counts:       (B, Hkv) int, valid table entries per row (e.g. ``Selection.counts``).
    slot_lens:    (N,) int, valid tokens held by each slot (<= S).
    scale:        softmax scale; default 1 / sqrt(D).
    split_tokens: tokens per flash-decoding split (rounded up to whole chunks).
    out:          optional (B, Hq, D) buffer in q's dtype.
    Returns (B, Hq, D) in q's dtype; a row with no token at all gives zeros. With every chunk of a
    sequence selected it equals dense attention over that sequence.
    """
    _check_attention_args(q, k_pool, v_pool, table, counts, slot_lens)
    if split_tokens < 1:
        raise ValueError(f"split_tokens must be >= 1, got {split_tokens}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    tensors = (q, k_pool, v_pool, table, counts, slot_lens)
    if pick_backend(_sparse_attention_split_kernel, *tensors, backend=backend) == "triton":
        sparse_decode_attention_fwd(q, k_pool, v_pool, table, counts, slot_lens, scale, split_tokens, out)
    else:
        out.copy_(sparse_decode_attention_ref(q, k_pool, v_pool, table, counts, slot_lens, scale))
    return out


def decode_partials(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    counts: torch.Tensor,
    slot_lens: torch.Tensor,
    parts: Partials,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> None:
    """Per-chunk softmax partials of decode attention, one per table entry, written into ``parts``.

    Arguments as ``sparse_decode_attention``, except that a table entry may be -1 (its chunk is not
    in this pool: another call, over another pool, writes it) and that the output is ``parts``
    (``empty_partials(B, Hq, M, D)``: (B, Hq, M) m and l, (B, Hq, M, D) acc): entry (b, h, e) with
    e < counts[b, h] and a slot is written at position e for the query heads of KV head h; other
    positions keep what they hold. An entry's partial depends only on its chunk and its query, not
    on the pool or the other entries, so partials of one step may come from several calls over
    several pools (resident slots, chunks read from the host or disk for that step) and
    ``combine_partials`` then gives the same bits wherever each chunk was.
    """
    _check_attention_args(q, k_pool, v_pool, table, counts, slot_lens)
    B, Hq, D = q.shape
    if parts.m.shape != (B, Hq, table.shape[-1]) or parts.acc.shape != (B, Hq, table.shape[-1], D):
        raise ValueError(f"parts must be empty_partials({B}, {Hq}, {table.shape[-1]}, {D}), "
                         f"got {tuple(parts.m.shape)}, {tuple(parts.acc.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    tensors = (q, k_pool, v_pool, table, counts, slot_lens)
    if pick_backend(_sparse_attention_split_kernel, *tensors, backend=backend) == "triton":
        decode_partials_fwd(q, k_pool, v_pool, table, counts, slot_lens, scale, 1, parts)
    else:
        decode_partials_ref(q, k_pool, v_pool, table, counts, slot_lens, scale, parts)


def combine_partials(parts: Partials, dtype: torch.dtype, *, backend: str | None = None) -> torch.Tensor:
    """Merge (B, Hq, P[, D]) partials over P in one fixed order -> (B, Hq, D) in ``dtype``; rows
    without a token give zeros."""
    B, Hq, P, D = parts.acc.shape
    if pick_backend(_sparse_attention_combine_kernel, parts.m, parts.acc, backend=backend) == "triton":
        out = torch.empty((B, Hq, D), dtype=dtype, device=parts.m.device)
        combine_partials_fwd(parts, out)
        return out
    return combine_partials_ref(parts).to(dtype)
