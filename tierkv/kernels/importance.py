"""Score KV chunks against the decode query and pick the ones attention should read.

Why this module exists: at each decode step only a small fraction of a long context matters. We
bound, per chunk, how large the attention logit q.k of any key in the chunk can be, from the
chunk's abstract (min/max key per channel) alone: for each channel d, q_d * k_d is at most
max(q_d * kmin_d, q_d * kmax_d), so ``score = sum_d max(q_d*kmin_d, q_d*kmax_d)`` >= q.k for
every key k of the chunk. High bound = the chunk may hold keys this query attends to.

GQA combine (max): the G query heads of a KV group share one selection, because a chunk is moved
and gathered per KV head. We combine their bounds by max: then the group score is still an upper
bound on every logit any of its heads can produce, and a chunk that one head needs sharply is
kept even if the other heads ignore it. The alternative, sum (or mean), ranks chunks by how much
the group needs them on average, but it lets several heads' lukewarm interest outvote one head's
peak and is no longer a bound on any logit. Softmax is dominated by its largest logits, so losing
one head's peak costs more than keeping a chunk the other heads ignore: max is the safer choice.

Selection rule (per sequence and KV head, all on the device, no host synchronisation):
1. Forced: the first ``sink_chunks`` chunks (attention sinks) and the recent window, i.e. the
   shortest run of last chunks holding at least ``recent_tokens`` tokens (chunk c is recent when
   the chunks after it hold fewer than ``recent_tokens`` tokens). Forced chunks are kept even when
   they alone exceed the budget.
2. Others, by descending score (ties: lower chunk id first), are taken while the running total of
   their tokens stays within ``budget_tokens`` minus the forced tokens; selection stops at the
   first chunk that does not fit (a prefix of the ranking, so the result never exceeds the budget
   and is the same on every backend; it does not skip a big chunk to fit a smaller one after it).
Two stages with the key sketch (``tierkv.kernels.sketch``), so that its token-level bound is on by
default on every device without a full pass over the codes at every step:
1. Every coded chunk is ranked without reading its codes: by its key ellipsoid
   (``tierkv.kernels.ellipsoid``: mean key and squared semi-axes per chunk, an upper bound
   q.c + sqrt(q^2.a^2) on the chunk's logits, standardized per query head, max over the group),
   two matmuls over the chunks' (D,) summaries. Without ellipsoids (``KeySketch.ellipsoid`` None)
   a coarse sketch bound ranks them instead: per KV head the ``COARSE_SKETCH_FRACTION`` of the
   channels that weigh most are read from every key's codes (``reference.coarse_sketch_scores_ref``).
2. The ``candidates`` best of them per (sequence, KV head) (``sketch_candidates``:
   ``SKETCH_CANDIDATE_FACTOR`` x the chunks the budget holds, at least ``MIN_SKETCH_CANDIDATES``,
   plus the forced chunks) get the full sketch bound (the Triton kernel, a grid over the
   candidates, or its torch reference); the other coded chunks score -inf: pruned, never selected
   over a sketched one.
Candidates are a ``topk`` on the device (no host sync). Why not the min/max bound as the first
stage: on the needle set of tests/test_kernels_sketch.py (one key holding half of a head's
attention) it ranks the needle's chunk as low as 108th of 128, and a 4x pool lost the needle in
5 of 12 contexts at a 5% budget. The ellipsoid ranks it first or second at 4K tokens (chunks of
32) and first at 8K (24 contexts each), and on the eval's needle set (outlier channels) within
the first 11 of 256, so a 2x pool (at least 16) found every needle at 5% and 10%. Cost on the CPU: the first stage is O(C D) per KV head instead of the
coarse sketch's pass over every token; the sketch reads 2x the budget's tokens (docs/benchmarks.md).

The Triton kernel runs one program per (sequence, KV head) and computes each chunk's rank as a
pairwise count (no sort): O(C^2) comparisons per row, about 4M at C = 2048, and writes mask,
compact ids and counts in one launch. The torch reference sorts instead.
"""

from __future__ import annotations

import math

import torch

from tierkv.kernels._select import cdiv, jit, next_pow2, pick_backend, tl
from tierkv.kernels._tiles import chunk_tile_pair
from tierkv.kernels.reference import Selection, chunk_scores_ref, coarse_sketch_scores_ref, select_chunks_ref
from tierkv.kernels.ellipsoid import Ellipsoid, ellipsoid_rank
from tierkv.kernels.sketch import KeySketch, sketch_scores

__all__ = ["COARSE_SKETCH_FRACTION", "MIN_SKETCH_CANDIDATES", "SKETCH_CANDIDATE_FACTOR", "Selection", "coarse_sketch_channels", "chunk_scores", "chunk_scores_fwd", "select_chunks",
           "select_chunks_fwd", "sketch_candidates"]

SKETCH_CANDIDATE_FACTOR = 2     # fully sketched chunks per chunk the budget holds (the rest are pruned)
MIN_SKETCH_CANDIDATES = 16      # ... and at least this many (small budgets: the ranking's margin)
COARSE_SKETCH_FRACTION = 1 / 4  # share of each key's channels the first stage reads (those weighing most)


def sketch_candidates(free_tokens: int, chunk_tokens: int, forced_chunks: int) -> int:
    """Chunks per (sequence, KV head) the full sketch scores: ``SKETCH_CANDIDATE_FACTOR`` x the chunks of
    ``chunk_tokens`` that fit in ``free_tokens`` (the budget left after the forced chunks), at least
    ``MIN_SKETCH_CANDIDATES``, plus the ``forced_chunks`` (sinks, recent window) that may rank among
    them. 0 when no chunk fits: then the selection is the forced chunks whatever the scores."""
    if chunk_tokens < 1 or forced_chunks < 0:
        raise ValueError(f"need chunk_tokens >= 1 and forced_chunks >= 0, got {chunk_tokens}, {forced_chunks}")
    fit = max(0, free_tokens) // chunk_tokens
    return max(SKETCH_CANDIDATE_FACTOR * fit, MIN_SKETCH_CANDIDATES) + forced_chunks if fit else 0


@jit
def _chunk_scores_kernel(
    q_ptr, kmin_ptr, kmax_ptr, nch_ptr, out_ptr,
    C, Hkv, G, D,
    s_qb, s_qh, s_qd,
    s_ab, s_ah, s_ac, s_ad,
    s_ob, s_oh, s_oc,
    HAS_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (B * Hkv, cdiv(C, BLOCK_C)): one program scores BLOCK_C chunks for one KV group.
    b, h, offs_c, offs_d, c_ok, lo, hi = chunk_tile_pair(kmin_ptr, kmax_ptr, C, Hkv, D, s_ab, s_ah, s_ac, s_ad,
                                                         BLOCK_C, BLOCK_D)   # (BLOCK_C, BLOCK_D) each
    best = tl.full([BLOCK_C], float("-inf"), tl.float32)
    for g in range(0, G):
        q_off = b.to(tl.int64) * s_qb + (h * G + g) * s_qh + offs_d * s_qd
        q = tl.load(q_ptr + q_off, mask=offs_d < D, other=0.0).to(tl.float32)[None, :]
        best = tl.maximum(best, tl.sum(tl.maximum(q * lo, q * hi), axis=1))
    if HAS_N:
        best = tl.where(offs_c < tl.load(nch_ptr + b), best, float("-inf"))
    tl.store(out_ptr + b.to(tl.int64) * s_ob + h * s_oh + offs_c * s_oc, best, mask=c_ok)


def chunk_scores_fwd(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, n_chunks: torch.Tensor | None, out: torch.Tensor
) -> None:
    """Launch ``_chunk_scores_kernel``: q (B, Hq, D), kmin/kmax (B, Hkv, C, D), n_chunks (B,)|None, out (B, Hkv, C)."""
    B, Hq, D = q.shape
    _, H, C, _ = kmin.shape
    assert kmin.stride() == kmax.stride() and out.shape == (B, H, C)
    BLOCK_C = min(64, max(16, next_pow2(C)))
    _chunk_scores_kernel[(B * H, cdiv(C, BLOCK_C))](
        q, kmin, kmax, n_chunks if n_chunks is not None else out, out,
        C, H, Hq // H, D,
        *q.stride(), *kmin.stride(), *out.stride(),
        HAS_N=n_chunks is not None, BLOCK_C=BLOCK_C, BLOCK_D=max(16, next_pow2(D)),
    )


def _check_n_chunks(n_chunks: torch.Tensor | None, B: int, device: torch.device) -> None:
    if n_chunks is not None and (n_chunks.shape != (B,) or n_chunks.device != device or n_chunks.is_floating_point()):
        raise ValueError(
            f"n_chunks must be a ({B},) int tensor on {device}, "
            f"got {tuple(n_chunks.shape)} {n_chunks.dtype} on {n_chunks.device}"
        )


def chunk_scores(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    *,
    sketch: KeySketch | None = None,
    candidates: int | None = None,
    n_chunks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Upper bound of the attention logit of each chunk, max over each KV group's query heads.

    q:          (B, Hq, D) decode query (post-RoPE, unscaled), Hq = G * Hkv; query head i uses KV
                head i // G as in HF transformers.
    kmin, kmax: (B, Hkv, C, D) chunk abstracts from ``chunk_abstract``.
    sketch:     optional 2-bit key codes of the first ``sketch.coded`` chunks (``tierkv.kernels.sketch``):
                those chunks get the tighter token-level bound (max over their keys), the rest
                the min/max bound. None = the min/max bound everywhere.
    candidates: with ``sketch``, how many coded chunks per (sequence, KV head) get the sketch bound:
                those with the highest coarse sketch bound (stage 1 above; ``sketch_candidates``); the
                other coded chunks score -inf (pruned). None = every coded chunk is sketched (no pruning).
    n_chunks:   optional (B,) int, chunks per sequence (ragged batches); later chunks score -inf.
    out:        optional (B, Hkv, C) float32 buffer.
    Returns (B, Hkv, C) float32 scores.
    """
    if q.dim() != 3 or kmin.dim() != 4 or kmin.shape != kmax.shape:
        raise ValueError(
            "need q (B, Hq, D) and matching kmin/kmax (B, Hkv, C, D); "
            f"got {tuple(q.shape)}, {tuple(kmin.shape)}, {tuple(kmax.shape)}"
        )
    B, Hq, D = q.shape
    _, H, C, _ = kmin.shape
    if kmin.shape[0] != B or kmin.shape[3] != D or Hq % H != 0:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit abstracts {tuple(kmin.shape)}: need the same B and D "
            "and Hq divisible by Hkv"
        )
    _check_n_chunks(n_chunks, B, q.device)
    if out is None:
        out = torch.empty(B, H, C, dtype=torch.float32, device=q.device)
    elif out.shape != (B, H, C) or out.dtype != torch.float32:
        raise ValueError(f"out must be ({B}, {H}, {C}) float32, got {tuple(out.shape)} {out.dtype}")
    # Two stages overwrite every coded chunk (sketched or pruned): the min/max bound is only needed past them.
    first = sketch.coded if sketch is not None and candidates is not None and 0 <= candidates < sketch.coded else 0
    if first < C:
        _min_max_scores(q, kmin[:, :, first:], kmax[:, :, first:], None if first else n_chunks, out[:, :, first:],
                        backend)
    if sketch is not None:
        _sketch_stage(q, kmin, kmax, sketch, candidates, out, backend)
        if n_chunks is not None:  # chunks past a ragged sequence's end stay out of every selection
            out.masked_fill_(torch.arange(C, device=q.device) >= n_chunks.view(B, 1, 1), float("-inf"))
    return out


def _min_max_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, n_chunks: torch.Tensor | None,
                    out: torch.Tensor, backend: str | None) -> None:
    """The min/max bound of chunks kmin/kmax (B, Hkv, C', D) into out (B, Hkv, C'), Triton or torch."""
    use_triton = pick_backend(_chunk_scores_kernel, q, kmin, kmax, backend=backend) == "triton"
    if use_triton and kmin.stride() == kmax.stride():
        chunk_scores_fwd(q, kmin, kmax, n_chunks, out)
    else:
        out.copy_(chunk_scores_ref(q, kmin, kmax, n_chunks))


def coarse_sketch_channels(head_dim: int) -> int:
    """Channels per key the first stage reads from the codes: ``COARSE_SKETCH_FRACTION`` of D, at least 1."""
    return max(1, math.ceil(COARSE_SKETCH_FRACTION * head_dim))


def _sketch_stage(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, sketch: KeySketch,
                  candidates: int | None, out: torch.Tensor, backend: str | None) -> None:
    """The sketch bound for every coded chunk, or two stages: the ellipsoids (or the coarse sketch)
    rank the coded chunks, the ``candidates`` best get the full sketch bound in ``out`` (B, Hkv, C),
    the rest -inf."""
    if candidates is not None and candidates < 0:
        raise ValueError(f"candidates must be >= 0 (or None for every coded chunk), got {candidates}")
    coded = sketch.coded
    if candidates is None or candidates >= coded:
        sketch_scores(q, kmin, kmax, sketch, out, backend=backend)
        return
    if candidates > 0:
        rank = _first_stage(q, kmin, kmax, sketch, backend)                          # (B, Hkv, coded)
        ids = rank.topk(candidates, dim=-1, sorted=False).indices                    # (B, Hkv, K) int64
    out[:, :, :coded] = float("-inf")
    if candidates > 0:
        sketch_scores(q, kmin, kmax, sketch, out, ids=ids, backend=backend)


def _first_stage(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, sketch: KeySketch,
                 backend: str | None) -> torch.Tensor:
    """The ranking of the coded chunks (B, Hkv, coded): by their ellipsoids, else by the coarse sketch."""
    coded, ell = sketch.coded, sketch.ellipsoid
    if ell is not None:
        if ell.centre.shape[2] < coded:
            raise ValueError(f"sketch.ellipsoid holds {ell.centre.shape[2]} chunks, fewer than coded={coded}")
        return ellipsoid_rank(q, Ellipsoid(ell.centre[:, :, :coded], ell.axes2[:, :, :coded]), backend=backend)
    sizes = sketch.chunk_tokens.to(q.device).expand(q.shape[0], kmin.shape[2])
    return coarse_sketch_scores_ref(q, kmin[:, :, :coded], kmax[:, :, :coded], sketch.codes[:, :, :coded],
                                    sizes, coarse_sketch_channels(q.shape[-1]))


@jit
def _mark_forced(size_base, s_zc, mask_row, n, C, sink, recent, BLOCK: tl.constexpr):
    """Pass 1-2 of selection: store forced flags (sinks + recent window) in mask_row; return their tokens."""
    ar = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.int32)
    for c0 in range(0, C, BLOCK):
        offs = c0 + ar
        acc += tl.load(size_base + offs * s_zc, mask=offs < n, other=0).to(tl.int32)
    total = tl.sum(acc, axis=0)  # tokens of the valid chunks
    seen = tl.zeros([BLOCK], tl.int32)
    forced_acc = tl.zeros([BLOCK], tl.int32)
    for c0 in range(0, C, BLOCK):
        offs = c0 + ar
        sz = tl.load(size_base + offs * s_zc, mask=offs < n, other=0).to(tl.int32)
        after = total - (tl.sum(seen, axis=0) + tl.cumsum(sz, axis=0))  # tokens in later chunks
        forced = (offs < n) & ((offs < sink) | (after < recent))
        tl.store(mask_row + offs, forced.to(tl.int8), mask=offs < C)
        forced_acc += tl.where(forced, sz, 0)
        seen += sz
    return tl.sum(forced_acc, axis=0)


@jit
def _rank_and_pick(score_base, s_sc, size_base, s_zc, mask_row, sel_row, n, C, remaining, BLOCK: tl.constexpr):
    """Pass 3: a candidate is picked when its tokens plus those of all better candidates fit."""
    ar = tl.arange(0, BLOCK)
    for i0 in range(0, C, BLOCK):
        oi = i0 + ar
        si = tl.load(score_base + oi * s_sc, mask=oi < n, other=float("-inf")).to(tl.float32)
        zi = tl.load(size_base + oi * s_zc, mask=oi < n, other=0).to(tl.int32)
        fi = tl.load(mask_row + oi, mask=oi < C, other=0) != 0
        ahead = tl.zeros([BLOCK], tl.int32)  # tokens of candidates ranked before chunk i
        for j0 in range(0, C, BLOCK):
            oj = j0 + ar
            sj = tl.load(score_base + oj * s_sc, mask=oj < n, other=float("-inf")).to(tl.float32)
            zj = tl.load(size_base + oj * s_zc, mask=oj < n, other=0).to(tl.int32)
            cj = (oj < n) & (tl.load(mask_row + oj, mask=oj < C, other=0) == 0)
            tie = (sj[None, :] == si[:, None]) & (oj[None, :] < oi[:, None])
            better = ((sj[None, :] > si[:, None]) | tie) & cj[None, :]
            ahead += tl.sum(tl.where(better, zj[None, :], 0), axis=1)
        sel = fi | ((oi < n) & (ahead + zi <= remaining))
        tl.store(sel_row + oi, sel.to(tl.int32), mask=oi < C)


@jit
def _compact(mask_row, ids_row, C, BLOCK: tl.constexpr):
    """Pass 4: move the selection parked in ids_row to mask_row, write ascending ids, -1 padding."""
    ar = tl.arange(0, BLOCK)
    count = tl.zeros([BLOCK], tl.int32)
    for c0 in range(0, C, BLOCK):
        offs = c0 + ar
        sel = tl.load(ids_row + offs, mask=offs < C, other=0)
        tl.debug_barrier()  # every lane has read its flag before any id overwrites it
        tl.store(mask_row + offs, sel.to(tl.int8), mask=offs < C)
        pos = tl.sum(count, axis=0) + tl.cumsum(sel, axis=0) - sel  # < c0 + BLOCK: later flags intact
        tl.store(ids_row + pos, offs, mask=(offs < C) & (sel != 0))
        count += sel
    tl.debug_barrier()
    n_sel = tl.sum(count, axis=0)
    for c0 in range(0, C, BLOCK):
        offs = c0 + ar
        tl.store(ids_row + offs, tl.full([BLOCK], -1, tl.int32), mask=(offs < C) & (offs >= n_sel))
    return n_sel


@jit
def _select_chunks_kernel(
    scores_ptr, sizes_ptr, nch_ptr, mask_ptr, ids_ptr, counts_ptr,
    C, Hkv, budget, sink, recent,
    s_sb, s_sh, s_sc,
    s_zb, s_zc,
    HAS_N: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid (B * Hkv,): one program selects for one (sequence, KV head). mask/ids are contiguous
    # (B, Hkv, C) and double as scratch: forced flags wait in mask, the selection waits in ids.
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv
    row = pid.to(tl.int64) * C
    if HAS_N:
        n = tl.minimum(tl.load(nch_ptr + b).to(tl.int32), C)
    else:
        n = C
    size_base = sizes_ptr + b.to(tl.int64) * s_zb
    score_base = scores_ptr + b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh
    forced_tokens = _mark_forced(size_base, s_zc, mask_ptr + row, n, C, sink, recent, BLOCK)
    tl.debug_barrier()
    remaining = budget - forced_tokens
    _rank_and_pick(score_base, s_sc, size_base, s_zc, mask_ptr + row, ids_ptr + row, n, C, remaining, BLOCK)
    tl.debug_barrier()
    tl.store(counts_ptr + pid, _compact(mask_ptr + row, ids_ptr + row, C, BLOCK))


def select_chunks_fwd(
    scores: torch.Tensor,
    chunk_tokens: torch.Tensor,
    budget_tokens: int,
    sink_chunks: int,
    recent_tokens: int,
    n_chunks: torch.Tensor | None,
    out: Selection,
) -> None:
    """Launch ``_select_chunks_kernel``: scores (B, Hkv, C), chunk_tokens (B, C), n_chunks (B,)|None,
    out.mask (B, Hkv, C) bool, out.ids (B, Hkv, C) int32, out.counts (B, Hkv) int32, all contiguous."""
    B, H, C = scores.shape
    assert chunk_tokens.shape == (B, C) and all(t.is_contiguous() for t in out)
    int32_max = 2**31 - 1
    _select_chunks_kernel[(B * H,)](
        scores, chunk_tokens, n_chunks if n_chunks is not None else out.counts,
        out.mask.view(torch.int8), out.ids, out.counts,
        C, H, min(budget_tokens, int32_max), min(sink_chunks, int32_max), min(recent_tokens, int32_max),
        *scores.stride(), *chunk_tokens.stride(),
        HAS_N=n_chunks is not None, BLOCK=min(64, max(16, next_pow2(C))),
    )


def _selection_buffers(B: int, H: int, C: int, device: torch.device, out: Selection | None) -> Selection:
    """Fresh output buffers, or the caller's after checking them."""
    if out is None:
        return Selection(
            torch.empty(B, H, C, dtype=torch.bool, device=device),
            torch.empty(B, H, C, dtype=torch.int32, device=device),
            torch.empty(B, H, dtype=torch.int32, device=device),
        )
    want = ((B, H, C, torch.bool), (B, H, C, torch.int32), (B, H, torch.int32))
    for t, (*shape, dtype) in zip(out, want):
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(
                "out must be Selection(mask (B, Hkv, C) bool, ids (B, Hkv, C) int32, counts (B, Hkv) int32), "
                f"contiguous; got {tuple(t.shape)} {t.dtype}"
            )
    return out


def select_chunks(
    scores: torch.Tensor,
    chunk_tokens: torch.Tensor,
    *,
    budget_tokens: int,
    sink_chunks: int = 1,
    recent_tokens: int = 1,
    n_chunks: torch.Tensor | None = None,
    out: Selection | None = None,
    backend: str | None = None,
) -> Selection:
    """Pick the chunks each KV head attends to this step (rule in the module docstring).

    scores:        (B, Hkv, C) float scores from ``chunk_scores``.
    chunk_tokens:  (C,) or (B, C) int, tokens per chunk (variable sizes; last may be partial).
    budget_tokens: tokens of KV to attend to per (sequence, KV head), forced chunks included.
    sink_chunks:   number of leading chunks always kept.
    recent_tokens: the last chunks holding at least this many tokens are always kept (1 = the
                   open chunk; 0 = no recent window).
    n_chunks:      optional (B,) int, chunks per sequence (ragged batches); later ones are ignored.
    out:           optional Selection of buffers (mask (B, Hkv, C) bool, ids (B, Hkv, C) int32,
                   counts (B, Hkv) int32).
    Returns Selection(mask, ids, counts): ids lists the selected chunk ids ascending, then -1.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be (B, Hkv, C), got {tuple(scores.shape)}")
    B, H, C = scores.shape
    if (
        chunk_tokens.shape not in ((C,), (B, C))
        or chunk_tokens.is_floating_point()
        or chunk_tokens.device != scores.device
    ):
        raise ValueError(
            f"chunk_tokens must be an int tensor of shape ({C},) or ({B}, {C}) on {scores.device}, "
            f"got {tuple(chunk_tokens.shape)} {chunk_tokens.dtype} on {chunk_tokens.device}"
        )
    if min(budget_tokens, sink_chunks, recent_tokens) < 0:
        raise ValueError(
            "budget_tokens, sink_chunks and recent_tokens must be >= 0, "
            f"got {budget_tokens}, {sink_chunks}, {recent_tokens}"
        )
    _check_n_chunks(n_chunks, B, scores.device)
    out = _selection_buffers(B, H, C, scores.device, out)
    sizes = chunk_tokens.expand(B, C)  # (B, C), stride 0 over B when shared
    if pick_backend(_select_chunks_kernel, scores, chunk_tokens, backend=backend) == "triton":
        select_chunks_fwd(scores, sizes, budget_tokens, sink_chunks, recent_tokens, n_chunks, out)
    else:
        ref = select_chunks_ref(scores, sizes, budget_tokens, sink_chunks, recent_tokens, n_chunks)
        for dst, src in zip(out, ref):
            dst.copy_(src)
    return out
