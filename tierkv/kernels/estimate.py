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

On CPU tensors those ~116 ops are one C++ call where it builds (``estimate_cpu``: the same selection,
0.27 vs 1.36 ms per layer-step at 8K and 0.35 vs 2.49 ms at 32K in one interleaved run,
docs/benchmarks.md); ``TIERKV_CPU_ESTIMATOR=torch`` keeps the ops below.
"""

from __future__ import annotations

import torch

from tierkv.kernels._select import pick_backend
from tierkv.kernels.ellipsoid import Ellipsoid, ellipsoid_rank
from tierkv.kernels.estimate_cpu import estimator_kernel, kernel_applies, pick_cpu_estimator, select_two_stage_cpu
from tierkv.kernels.importance import _select_chunks_kernel, chunk_scores, select_chunks
from tierkv.kernels.reference import Selection, chunk_scores_ref, forced_chunks_ref, gathered_rows, sketch_scores_ref
from tierkv.kernels.sketch import KeySketch

__all__ = ["full_chunk_sketch", "fused_applies", "prepare_estimator", "select_two_stage"]

_SHIFTS = (0, 2, 4, 6)       # the four bit pairs of a code byte
_PAIR_MASK = 0x03030303      # the low bit pair of each byte of an int32 word
# Most unpacked code values made at once; more go to the reference, which unpacks in blocks of chunks
# (at 127K, 48 candidates x 256 keys: one 12 MiB fp32 copy measured 1.0-1.2x the blocked reference's time).
UNBLOCKED_VALUES = 1 << 20


def fused_applies(q: torch.Tensor, sketch: KeySketch | None, candidates: int, backend: str | None = None) -> bool:
    """Whether ``select_two_stage`` serves this step: the torch references run (``backend``, else
    ``TIERKV_KERNELS``, else auto: CPU tensors without the Triton interpreter), ellipsoids kept, and
    0 < candidates < coded (two stages; otherwise nothing is pruned, or nothing is scored)."""
    return (sketch is not None and sketch.ellipsoid is not None and 0 < candidates < sketch.coded
            and pick_backend(_select_chunks_kernel, q, backend=backend) == "torch")


def prepare_estimator(device: torch.device) -> None:
    """Build the C++ kernel now where ``select_two_stage`` will use it on ``device`` (a CPU cache that keeps
    codes and ellipsoids, the torch path): its first build (~2-7 s) belongs to loading, not to a decode step."""
    if device.type == "cpu" and pick_cpu_estimator() == "auto" and \
            pick_backend(_select_chunks_kernel, torch.empty(0, device=device)) == "torch":
        estimator_kernel()


def select_two_stage(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, sketch: KeySketch, candidates: int, *,
                     budget_tokens: int, sink_chunks: int, recent_tokens: int, full_coded: bool = False) -> Selection:
    """The selection of the two-stage estimator with every chunk valid (no ragged batch).

    q (B, Hq, D) post-RoPE unscaled; kmin, kmax (B, Hkv, C, D) every chunk's abstract; sketch: codes and
    ellipsoids of the first ``sketch.coded`` chunks, ``chunk_tokens`` (C,) or (B, C); ``candidates``
    (0 < K < coded, ``sketch_candidates``) chunks per (sequence, KV head) get the sketch bound.
    ``full_coded``: the caller knows every coded chunk holds all S keys of its slot (the cache's closed
    chunks): then ``full_chunk_sketch`` bounds them without reading their sizes.
    Returns Selection(mask (B, Hkv, C), ids (B, Hkv, C) ascending then -1, counts (B, Hkv)), equal to
    ``select_chunks`` over ``chunk_scores`` (module docstring). On CPU tensors the whole selection is one
    C++ call (``estimate_cpu``, ``TIERKV_CPU_ESTIMATOR``) where it builds; the torch ops below otherwise.
    """
    if kernel_applies(q, kmin, kmax, sketch):
        return select_two_stage_cpu(q, kmin, kmax, sketch, candidates, budget_tokens=budget_tokens,
                                    sink_chunks=sink_chunks, recent_tokens=recent_tokens)
    B, H, C, _ = kmin.shape
    N, ell = sketch.coded, sketch.ellipsoid
    assert ell is not None and 0 < candidates < N <= C, (candidates, N, C)
    sizes = sketch.chunk_tokens.expand(B, C)                                           # (B, C)
    rank = ellipsoid_rank(q, Ellipsoid(ell.centre[:, :, :N], ell.axes2[:, :, :N]), backend="torch")  # (B, Hkv, N)
    ids = rank.topk(candidates, dim=-1, sorted=False).indices.sort(dim=-1).values       # (B, Hkv, K) ascending
    live = full_chunk_sketch(q, kmin, kmax, sketch.codes, ids) if full_coded \
        else sketch_scores_ref(q, kmin, kmax, sketch.codes[:, :, :C], sizes, ids)        # (B, Hkv, K)
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


def full_chunk_sketch(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, codes: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
    """``sketch_scores_ref`` at chunk ids (B, Hkv, K) whose S keys are all valid, in fewer ops: no size
    mask, and the codes unpacked four bytes at a time (an int32 word shifted by each bit pair and masked:
    (B, Hkv, K, S, 4, P) from one shift and one and); up to ``UNBLOCKED_VALUES`` values, else the
    reference. q (B, Hq, D); kmin, kmax (B, Hkv, C, D); codes
    (B, Hkv, >= C, S, P) uint8 -> (B, Hkv, K) float32, the same values as the reference's."""
    B, Hq, D = q.shape
    H, S, P = codes.shape[1], codes.shape[3], codes.shape[4]
    if P % 4 or 4 * P != D or B * H * ids.shape[2] * S * D > UNBLOCKED_VALUES:   # the reference, in blocks
        sizes = torch.full((B, kmin.shape[2]), S, dtype=torch.int32, device=q.device)
        return sketch_scores_ref(q, kmin, kmax, codes[:, :, :kmin.shape[2]], sizes, ids)
    lo, hi, cd = gathered_rows((kmin, kmax, codes), ids)                 # (B, Hkv, K, D) x2, (B, Hkv, K, S, P)
    K, G = ids.shape[2], Hq // H
    qg = q.float().view(B, H, G, D)                                      # (B, Hkv, G, D)
    lo = lo.float()
    w = (hi.float() - lo).mul_(0.25)                                     # (B, Hkv, K, D)
    base = torch.matmul(lo, qg.transpose(-1, -2)).add_(torch.matmul(w, qg.clamp(min=0).transpose(-1, -2)))
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=q.device).view(4, 1)
    words = cd.view(torch.int32).view(B, H, K, S, 1, P // 4)             # 4 code bytes per word
    part = ((words >> shifts) & _PAIR_MASK).view(torch.uint8).view(B, H, K, S, D).float()  # channel i*P + j
    tok = torch.matmul(qg.unsqueeze(2) * w.unsqueeze(3), part.transpose(-1, -2))           # (B, Hkv, K, G, S)
    return tok.amax(-1).add_(base).amax(-1)
