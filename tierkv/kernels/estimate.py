"""The default estimator in one call on the torch path: ellipsoid rank, candidate sketch, selection over the candidates.

Why this module exists: on the CPU (no Triton) the two-stage estimator (``importance``: key ellipsoids
rank the coded chunks, the best ``candidates`` get the 2-bit sketch bound, the rest are pruned) ran
as ``chunk_scores`` then ``select_chunks``: a few hundred small torch ops per layer and step, most of
them over every chunk (fill the pruned chunks' scores with -inf, scatter the candidates back, then a
stable sort of every chunk's score, a cumsum and a scatter over all of them, a second sort for the
ids). At 8K tokens that was 15-34% of the decode step, per-op overhead rather than arithmetic
(docs/benchmarks.md, issue 12). Here the selection runs over the live chunks only: the candidates
plus the uncoded (open) chunks, a few dozen instead of hundreds or thousands.

Same result as ``select_chunks(chunk_scores(q, kmin, kmax, sketch=sketch, candidates=K), ...)`` on the
torch path. Why it is the same: the selection takes chunks by descending score (ties: lower id first)
while their tokens fit; pruned chunks score -inf, so they rank after every live chunk and are taken
only when every live chunk fits. That is checked here (one host read, free on the CPU) and then the
general pair runs instead; it cannot happen when ``candidates`` comes from ``sketch_candidates``
(twice the chunks the budget holds). The live chunks keep their order by id before the stable sort,
so ties break as there.
"""

from __future__ import annotations

import torch

from tierkv.kernels._select import pick_backend
from tierkv.kernels.ellipsoid import Ellipsoid, ellipsoid_rank
from tierkv.kernels.importance import _select_chunks_kernel, chunk_scores, select_chunks
from tierkv.kernels.reference import Selection, chunk_scores_ref, forced_chunks_ref, sketch_scores_ref
from tierkv.kernels.sketch import KeySketch

__all__ = ["fused_applies", "select_two_stage"]


def fused_applies(q: torch.Tensor, sketch: KeySketch | None, candidates: int, backend: str | None = None) -> bool:
    """Whether ``select_two_stage`` serves this step: the torch references run (``backend``, else
    ``TIERKV_KERNELS``, else auto: CPU tensors without the Triton interpreter), ellipsoids kept, and
    0 < candidates < coded (two stages; otherwise nothing is pruned, or nothing is scored)."""
    return (sketch is not None and sketch.ellipsoid is not None and 0 < candidates < sketch.coded
            and pick_backend(_select_chunks_kernel, q, backend=backend) == "torch")


def select_two_stage(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, sketch: KeySketch, candidates: int, *,
                     budget_tokens: int, sink_chunks: int, recent_tokens: int) -> Selection:
    """The selection of the two-stage estimator with every chunk valid (no ragged batch).

    q (B, Hq, D) post-RoPE unscaled; kmin, kmax (B, Hkv, C, D) every chunk's abstract; sketch: codes and
    ellipsoids of the first ``sketch.coded`` chunks, ``chunk_tokens`` (C,) or (B, C); ``candidates``
    (0 < K < coded, ``sketch_candidates``) chunks per (sequence, KV head) get the sketch bound.
    Returns Selection(mask (B, Hkv, C), ids (B, Hkv, C) ascending then -1, counts (B, Hkv)), equal to
    ``select_chunks`` over ``chunk_scores`` (module docstring).
    """
    B, H, C, _ = kmin.shape
    N, ell = sketch.coded, sketch.ellipsoid
    assert ell is not None and 0 < candidates < N <= C, (candidates, N, C)
    sizes = sketch.chunk_tokens.expand(B, C)                                           # (B, C)
    rank = ellipsoid_rank(q, Ellipsoid(ell.centre[:, :, :N], ell.axes2[:, :, :N]), backend="torch")  # (B, Hkv, N)
    ids = rank.topk(candidates, dim=-1, sorted=False).indices.sort(dim=-1).values       # (B, Hkv, K) ascending
    live = sketch_scores_ref(q, kmin, kmax, sketch.codes[:, :, :C], sizes, ids)          # (B, Hkv, K)
    if N < C:                                           # the uncoded chunks (the open one): min/max bound
        ids = torch.cat([ids, torch.arange(N, C, device=q.device).expand(B, H, C - N)], -1)   # (B, Hkv, L)
        live = torch.cat([live, chunk_scores_ref(q, kmin[:, :, N:], kmax[:, :, N:], None)], -1)
    sz = sizes.long()
    forced = forced_chunks_ref(sz, sink_chunks, recent_tokens)                          # (B, C) bool
    remaining = budget_tokens - (sz * forced).sum(-1).view(B, 1, 1)                     # (B, 1, 1)
    flat = ids.view(B, -1)
    f_live = forced.gather(1, flat).view(ids.shape)                                      # (B, Hkv, L)
    order = live.masked_fill(f_live, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    run = sz.gather(1, flat).view(ids.shape).masked_fill_(f_live, 0).gather(-1, order).cumsum(-1)
    if bool((run[..., -1:] <= remaining).any()):        # every live chunk fits: pruned ones would be next
        scores = chunk_scores(q, kmin, kmax, sketch=sketch, candidates=candidates, backend="torch")
        return select_chunks(scores, sketch.chunk_tokens, budget_tokens=budget_tokens, sink_chunks=sink_chunks,
                             recent_tokens=recent_tokens, backend="torch")
    mask = torch.zeros(B, H, C, dtype=torch.bool, device=q.device)
    mask.scatter_(-1, ids.gather(-1, order), run <= remaining).logical_or_(forced.view(B, 1, C))
    arange = torch.arange(C, device=q.device, dtype=torch.int32)
    chosen = torch.where(mask, arange, C).sort(dim=-1).values                           # selected ids first
    return Selection(mask, chosen.masked_fill_(chosen == C, -1), mask.sum(-1, dtype=torch.int32))
