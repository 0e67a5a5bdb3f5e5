"""Key ellipsoids: every key inside, the bound above every logit (adversarial keys too), Triton = torch,
and the two-stage estimator they rank for (needles found at 5% and 10% budgets)."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch

from tierkv.kernels import Ellipsoid, KeySketch, chunk_abstract, chunk_scores, encode_keys, key_ellipsoids, select_chunks
from tierkv.kernels import sketch_candidates
from tierkv.kernels._select import HAS_TRITON
from tierkv.kernels.ellipsoid import KeyMoments, causal_variances, ellipsoid_rank, ellipsoid_scores, no_moments
from tierkv.kernels.quality import plant_needle

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]
KINDS = ["random", "needle", "flat_and_wide", "identical", "far_offset", "two_clusters"]


def _keys(kind: str, B: int, H: int, G: int, C: int, S: int, D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H*G, D) and chunked keys (B, H, C, S, D) built to stress the ellipsoid's axes and rounding."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * G, D, generator=g)
    k = torch.randn(B, H, C, S, D, generator=g)
    if kind == "needle":           # one key per chunk far out along the group's first query: r^2 is set by it
        k[:, :, :, 0] = q.view(B, H, G, D)[:, :, :1] * 8
    elif kind == "flat_and_wide":  # constant channels (zero variance) and one channel 300x wider
        k[..., 1:3] = 0.5
        k[..., 0] *= 300.0
    elif kind == "identical":      # every key of a chunk the same: a point, the bound is its logit
        k[:] = k[:, :, :, :1]
    elif kind == "far_offset":     # small spread around a large centre: the stored centre's rounding matters
        k = 1000.0 + 0.01 * k
    elif kind == "two_clusters":   # half the keys at +v, half at -v: the mean sits between them, near no key
        k[:, :, :, : S // 2] += 5.0
        k[:, :, :, S // 2:] -= 5.0
    return q, k


def _peak(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, H, G, C) max of q.k over each chunk's keys, per query head, in float64."""
    B, Hq, D = q.shape
    H = k.shape[1]
    return torch.einsum("bhgd,bhcsd->bhgcs", q.double().view(B, H, Hq // H, D), k.double()).amax(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_every_key_lies_inside_its_chunks_ellipsoid(kind, dtype):
    q, k = _keys(kind, 2, 2, 1, 5, 9, 24, seed=len(kind))
    k = k.to(dtype)
    ell = key_ellipsoids(k, dtype)
    assert ell.centre.dtype == dtype and ell.axes2.dtype == dtype and ell.centre.shape == (2, 2, 5, 24)
    axes2, dev2 = ell.axes2.double().unsqueeze(3), (k.double() - ell.centre.double().unsqueeze(3)) ** 2
    if kind != "identical" and dtype == torch.float32:                    # (16-bit far_offset keys are identical)
        assert (axes2 > 0).all()                                           # no axis collapses (flat channels)
    assert (dev2[(axes2 == 0).expand_as(dev2)] == 0).all()                 # a zero axis only where no key strays
    dist = torch.where(axes2 > 0, dev2 / axes2, torch.zeros_like(dev2)).sum(-1)
    assert (dist <= 1.0).all(), dist.max()                                 # the stored values hold every key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D", [7, 64])
def test_the_bound_is_above_every_logit_of_its_chunk(backend, dtype, kind, D):
    B, H, G, C, S = 1, 2, 2, 6, 8
    q, k = _keys(kind, B, H, G, C, S, D, seed=D + len(kind))
    q, k = q.to(dtype), k.to(dtype)
    ell = key_ellipsoids(k, dtype)
    got = ellipsoid_scores(q, ell, backend=backend)                        # (B, H, G, C)
    ref = ellipsoid_scores(q, ell, backend="torch")
    peak = _peak(q, k)
    mag = (q.double().abs().view(B, H, G, 1, D) * ell.centre.double().abs().unsqueeze(2)).sum(-1) + peak.abs()
    assert got.shape == (B, H, G, C) and got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)
    assert (got.double() >= peak - 1e-5 * mag).all(), (got.double() - peak).min()
    if kind == "identical":                                                # a point: the bound is its logit
        assert torch.allclose(got.double(), peak, rtol=1e-2, atol=1e-2 * float(mag.max()) if dtype != torch.float32
                              else 1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_causal_weights_keep_every_key_inside_and_do_not_depend_on_the_split(kind):
    q, k = _keys(kind, 1, 2, 2, 6, 8, 16, seed=7)
    whole, after = causal_variances(k, no_moments(1, 2, 16, "cpu"))
    head, mid = causal_variances(k[:, :, :2], no_moments(1, 2, 16, "cpu"))
    tail, end = causal_variances(k[:, :, 2:], mid)
    assert torch.equal(torch.cat([head, tail], 2), whole) and after.count == end.count == 48
    assert torch.equal(after.s1, end.s1) and torch.equal(after.s2, end.s2)
    flat = k.reshape(1, 2, 48, 16).double()
    assert torch.allclose(whole[:, :, -1].double(), flat.var(2, correction=0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(whole[:, :, 0].double(), flat[:, :, :8].var(2, correction=0), rtol=1e-5, atol=1e-6)
    ell = key_ellipsoids(k, torch.float32, whole)
    dev2 = (k.double() - ell.centre.double().unsqueeze(3)) ** 2
    axes2 = ell.axes2.double().unsqueeze(3)
    assert (torch.where(axes2 > 0, dev2 / axes2, torch.zeros_like(dev2)).sum(-1) <= 1.0).all()
    peak = _peak(q, k)
    assert (ellipsoid_scores(q, ell).double() >= peak - 1e-5 * (peak.abs() + 1)).all()
    assert isinstance(after, KeyMoments)


def test_bad_ellipsoids_raise():
    q = torch.randn(1, 4, 16)
    good = key_ellipsoids(torch.randn(1, 2, 3, 4, 16), torch.float32)
    with pytest.raises(ValueError, match="do not fit q"):
        ellipsoid_scores(q, Ellipsoid(good.centre[..., :8], good.axes2[..., :8]))
    with pytest.raises(ValueError, match="do not fit q"):
        ellipsoid_scores(torch.randn(1, 3, 16), good)
    codes = encode_keys(torch.randn(1, 2, 3, 4, 16), *chunk_abstract(torch.randn(1, 2, 12, 16), torch.arange(0, 12, 4)))
    kmin, kmax = chunk_abstract(torch.randn(1, 2, 12, 16), torch.arange(0, 12, 4))
    short = Ellipsoid(good.centre[:, :, :1], good.axes2[:, :, :1])
    with pytest.raises(ValueError, match="fewer than coded=3"):
        chunk_scores(q, kmin, kmax, sketch=KeySketch(codes, torch.full((3,), 4), 3, short), candidates=1)


def test_rank_standardizes_each_query_head_before_the_group_max():
    """A head with large bounds everywhere does not hide the one chunk another head peaks on."""
    ell = key_ellipsoids(torch.randn(1, 1, 8, 4, 6, generator=torch.Generator().manual_seed(0)), torch.float32)
    q = torch.randn(1, 2, 6, generator=torch.Generator().manual_seed(1))
    e = ellipsoid_scores(q, ell)                                           # (1, 1, 2, 8)
    z = (e - e.mean(-1, keepdim=True)) / e.std(-1, correction=0, keepdim=True)
    assert torch.allclose(ellipsoid_rank(q, ell), z.amax(2), atol=1e-5)
    loud = q.clone()
    loud[0, 0] *= 100.0                                                    # head 0's bounds 100x larger:
    assert torch.allclose(ellipsoid_rank(loud, ell), ellipsoid_rank(q, ell), atol=1e-4)   # the same ranking
    raw = ellipsoid_scores(loud, ell).amax(2)                              # the raw max follows head 0 alone
    assert torch.equal(raw.argsort(-1), ellipsoid_scores(loud, ell)[:, :, 0].argsort(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_stages_sketch_the_chunks_the_ellipsoids_rank_best(backend):
    B, Hq, Hkv, C, S, D = 2, 4, 2, 9, 6, 16
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(B, Hkv, C * S, D, generator=g)
    kmin, kmax = chunk_abstract(keys, torch.arange(0, C * S, S), backend="torch")
    chunked = keys.view(B, Hkv, C, S, D)
    q = torch.randn(B, Hq, D, generator=g)
    sizes = torch.full((C,), S, dtype=torch.int32)
    coded, K = C - 1, 3                                                    # the open last chunk has no codes
    ell = key_ellipsoids(chunked, torch.float32)
    sketch = KeySketch(encode_keys(chunked, kmin, kmax), sizes, coded, ell)
    full = chunk_scores(q, kmin, kmax, sketch=sketch, backend=backend)
    two = chunk_scores(q, kmin, kmax, sketch=sketch, candidates=K, backend=backend)
    best = ellipsoid_rank(q, Ellipsoid(ell.centre[:, :, :coded], ell.axes2[:, :, :coded])).topk(K, -1).indices
    cand = torch.zeros(B, Hkv, coded, dtype=torch.bool).scatter_(-1, best, True)
    assert torch.equal(torch.isfinite(two[..., :coded]), cand)             # the others are pruned: -inf
    assert torch.allclose(two[..., :coded][cand], full[..., :coded][cand], rtol=1e-5, atol=1e-5)
    assert torch.equal(two[..., coded:], chunk_scores(q, kmin, kmax, backend=backend)[..., coded:])
    peak = _peak(q, chunked).amax(2)                                       # (B, Hkv, C)
    assert (two.double()[torch.isfinite(two)] >= peak[torch.isfinite(two)] - 1e-4).all()  # still upper bounds


def _needle(seed: int, T: int, span: int, H: int = 2, G: int = 2, D: int = 64):
    """Random keys (two wide channels); ``span`` keys per KV head take half of one query head's attention."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, H, T, D, generator=g)
    k[..., :2] *= 3.0
    q = torch.randn(1, H * G, D, generator=g)
    q = q / q.norm(dim=-1, keepdim=True) * math.sqrt(D)
    pos = int(torch.randint(64, T - 64 - span, (1,), generator=g))
    for h in range(H):
        plant_needle(q[0, h * G], k[0, h], pos, span, 0.5, D**-0.5)
    return q, k, pos


@pytest.mark.parametrize("budget", [0.05, 0.10])
@pytest.mark.parametrize("T", [4096, 8192])
def test_the_ellipsoid_estimator_finds_what_exact_attention_finds(budget, T):
    """A key holding half of one query head's attention (exact attention's top key): the default two
    stages (ellipsoids rank, 2x the budget's chunks get the sketch) select its chunk, chunks of 32."""
    S = 32
    budget_tokens, C = math.ceil(budget * T), T // S
    sizes = torch.full((C,), S, dtype=torch.int32)
    for seed in range(12):
        q, k, pos = _needle(seed, T, 1)
        logits = torch.einsum("hd,htd->ht", q[0, ::2], k[0]) * 64**-0.5      # the planted heads (G = 2)
        assert (logits.softmax(-1)[:, pos] > 0.45).all()                       # exact attention finds it
        kmin, kmax = chunk_abstract(k, torch.arange(0, T, S), backend="torch")
        chunked = k.view(1, 2, C, S, -1)
        variance = causal_variances(chunked, no_moments(1, 2, chunked.shape[-1], "cpu"))[0]   # as the cache does
        sketch = KeySketch(encode_keys(chunked, kmin, kmax), sizes, C - 1, key_ellipsoids(chunked, k.dtype, variance))
        scores = chunk_scores(q, kmin, kmax, sketch=sketch, backend="torch",
                              candidates=sketch_candidates(budget_tokens - 2 * S, S, 2))
        sel = select_chunks(scores, sizes, budget_tokens=budget_tokens, recent_tokens=S, backend="torch")
        assert sel.mask[0, :, pos // S].all(), (seed, pos)
