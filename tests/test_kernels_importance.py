"""Chunk scores and selection: Triton (interpreted on the CPU) against the torch reference, and the rule."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch

from tierkv.kernels import Selection, chunk_abstract, chunk_scores, select_chunks
from tierkv.kernels._select import HAS_TRITON
from tierkv.kernels.reference import chunk_scores_ref, select_chunks_ref

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}  # on fp32 math, relative to |q||k|


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("B,Hq,Hkv,C,D", [(1, 1, 1, 1, 16), (2, 8, 2, 70, 40), (1, 6, 3, 5, 128)])
def test_scores_match_reference(backend, dtype, B, Hq, Hkv, C, D):
    gen = torch.Generator().manual_seed(C * 31 + D)
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    kmin = torch.randn(B, Hkv, C, D, generator=gen)
    kmax = (kmin + torch.rand(B, Hkv, C, D, generator=gen)).to(dtype)
    kmin = kmin.to(dtype)
    n_chunks = torch.tensor([max(1, C - 3 * b) for b in range(B)], dtype=torch.int32)
    out = torch.full((B, Hkv, C), float("nan"))
    got = chunk_scores(q, kmin, kmax, n_chunks=n_chunks, out=out, backend=backend)
    ref = chunk_scores_ref(q, kmin, kmax, n_chunks)
    assert got is out
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = torch.isfinite(ref)
    scale = (q.float().norm(dim=-1).max() * kmax.float().abs().amax().clamp_min(1)) * D**0.5
    assert ((got - ref)[finite].abs().max() / scale).item() < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_bounds_every_logit_and_takes_group_max(backend):
    B, Hq, Hkv, D, sizes = 2, 4, 2, 24, [9, 16, 3, 20]
    keys = torch.randn(B, Hkv, sum(sizes), D)
    starts = torch.tensor([0, 9, 25, 28])
    kmin, kmax = chunk_abstract(keys, starts, backend=backend)
    q = torch.randn(B, Hq, D)
    scores = chunk_scores(q, kmin, kmax, backend=backend)  # (B, Hkv, C)
    logits = torch.einsum("bkgd,bktd->bkgt", q.view(B, Hkv, 2, D), keys)  # (B, Hkv, G, T)
    for c, (s, n) in enumerate(zip(starts.tolist(), sizes)):
        peak = logits[..., s : s + n].amax(-1)  # (B, Hkv, G)
        assert (scores[..., c] >= peak.amax(-1) - 1e-4).all()  # bound holds for every head
    one_head = chunk_scores(q[:, ::2].contiguous(), kmin, kmax, backend=backend)  # G = 1 per group
    assert (scores >= one_head).all()


def _check_rule(sel: Selection, scores, sizes, budget, sink, recent, n):
    """Forced chunks present; the others are a prefix of the score ranking that fits the budget."""
    B, H, C = scores.shape
    for b in range(B):
        nb = n[b]
        sz = sizes[b][:nb].tolist()
        after = [sum(sz[c + 1 :]) for c in range(nb)]
        forced = [c < sink or after[c] < recent for c in range(nb)]
        for h in range(H):
            mask = sel.mask[b, h].tolist()
            ids = sel.ids[b, h].tolist()
            count = int(sel.counts[b, h])
            assert ids[:count] == [c for c in range(C) if mask[c]] and ids[count:] == [-1] * (C - count)
            assert not any(mask[nb:]) and all(mask[c] for c in range(nb) if forced[c])
            room = budget - sum(s for s, f in zip(sz, forced) if f)
            cands = sorted((c for c in range(nb) if not forced[c]), key=lambda c: (-float(scores[b, h, c]), c))
            taken = [c for c in cands if mask[c]]
            assert taken == cands[: len(taken)]  # a prefix of the ranking
            used = sum(sz[c] for c in taken)
            assert used <= max(room, 0)
            if len(taken) < len(cands):
                assert used + sz[cands[len(taken)]] > room  # stopped at the first that does not fit


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B,H,C,budget,sink,recent,ties",
    [
        (2, 3, 1, 10, 1, 1, False),
        (2, 2, 70, 300, 2, 40, True),
        (1, 4, 9, 0, 1, 0, False),
        (1, 1, 12, 10**9, 0, 1, True),
    ],
)
def test_selection_rule_and_reference(backend, B, H, C, budget, sink, recent, ties):
    gen = torch.Generator().manual_seed(C + budget % 97)
    scores = torch.randn(B, H, C, generator=gen)
    if ties:  # integer scores make many ties: both backends must break them by chunk id
        scores = scores.mul(2).round()
    sizes = torch.randint(1, 33, (B, C), generator=gen, dtype=torch.int32)
    n = torch.tensor([C - (b % 2) * (C // 3) for b in range(B)], dtype=torch.int32)
    out = Selection(
        torch.ones(B, H, C, dtype=torch.bool),
        torch.full((B, H, C), -7, dtype=torch.int32),
        torch.full((B, H), -7, dtype=torch.int32),
    )
    sel = select_chunks(
        scores, sizes, budget_tokens=budget, sink_chunks=sink, recent_tokens=recent, n_chunks=n, out=out, backend=backend
    )
    ref = select_chunks_ref(scores, sizes, budget, sink, recent, n)
    assert all(torch.equal(a, b) for a, b in zip(sel, ref))
    _check_rule(sel, scores, sizes, budget, sink, recent, n.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_sizes_and_limits(backend):
    scores = torch.randn(2, 2, 6)
    sizes = torch.tensor([8, 8, 8, 8, 8, 3])
    everything = select_chunks(scores, sizes, budget_tokens=43, sink_chunks=1, recent_tokens=1, backend=backend)
    assert everything.mask.all() and (everything.counts == 6).all()
    forced_only = select_chunks(scores, sizes, budget_tokens=0, sink_chunks=1, recent_tokens=5, backend=backend)
    assert forced_only.counts.tolist() == [[3, 3], [3, 3]]  # sink + last two chunks (3 < 5 <= 3 + 8)
    assert forced_only.ids[0, 0, :3].tolist() == [0, 4, 5]
    best = scores[..., 1:4].argmax(-1) + 1
    one_more = select_chunks(scores, sizes, budget_tokens=27, sink_chunks=1, recent_tokens=5, backend=backend)
    assert torch.equal(one_more.mask[..., 1:4], torch.nn.functional.one_hot(best - 1, 3).bool())


def test_bad_arguments_raise():
    scores = torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match="chunk_tokens"):
        select_chunks(scores, torch.ones(5, dtype=torch.int32), budget_tokens=4)
    with pytest.raises(ValueError, match=">= 0"):
        select_chunks(scores, torch.ones(4, dtype=torch.int32), budget_tokens=-1)
    with pytest.raises(ValueError, match="divisible"):
        chunk_scores(torch.randn(1, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="n_chunks"):
        chunk_scores(torch.randn(1, 2, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), n_chunks=torch.ones(2))
