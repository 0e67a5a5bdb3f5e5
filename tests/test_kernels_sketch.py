"""2-bit key sketch: encoding, the token-level bound (Triton interpreted vs torch reference), needles."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch

from tierkv.kernels import KeySketch, chunk_abstract, chunk_scores, encode_keys, select_chunks, sketch_candidates
from tierkv.kernels._select import HAS_TRITON
from tierkv.kernels.quality import plant_needle
from tierkv.kernels.importance import coarse_sketch_channels
from tierkv.kernels.reference import coarse_sketch_scores_ref
from tierkv.kernels.sketch import sketch_bytes_per_token

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]


def _chunked(B: int, H: int, C: int, S: int, D: int, seed: int, dtype=torch.float32):
    """Keys (B, H, C*S, D) with a few wide channels, their abstracts and codes."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, C * S, D, generator=gen)
    keys[..., : max(1, D // 16)] *= 4.0
    keys = keys.to(dtype)
    kmin, kmax = chunk_abstract(keys, torch.arange(0, C * S, S), backend="torch")
    return keys, kmin, kmax, encode_keys(keys.view(B, H, C, S, D), kmin, kmax)


def _decode(codes: torch.Tensor, D: int) -> torch.Tensor:
    """(…, P) packed bytes -> (…, D) codes 0..3, channel d = i*P + j in bits 2i of byte j."""
    parts = [(codes >> (2 * i)) & 3 for i in range(4)]
    return torch.cat(parts, dim=-1)[..., :D]


@pytest.mark.parametrize("D", [64, 40, 7])
def test_codes_place_every_key_in_its_cell(D):
    B, H, C, S = 2, 3, 5, 9
    keys, kmin, kmax, codes = _chunked(B, H, C, S, D, seed=D)
    assert codes.shape == (B, H, C, S, sketch_bytes_per_token(D)) and codes.dtype == torch.uint8
    code = _decode(codes, D).float()                                   # (B, H, C, S, D)
    w = ((kmax - kmin) / 4).unsqueeze(3)
    lo = kmin.unsqueeze(3) + code * w
    k = keys.view(B, H, C, S, D)
    assert ((k >= lo - 1e-5) & (k <= lo + w + 1e-5)).all()
    assert code.min() == 0 and code.max() == 3                         # the cells are all used


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,C,S,D", [(1, 2, 1, 4, 16, 64), (2, 6, 2, 7, 13, 40), (1, 3, 3, 3, 5, 7)])
def test_sketch_bound_holds_is_tighter_and_matches_the_reference(backend, dtype, B, Hq, Hkv, C, S, D):
    keys, kmin, kmax, codes = _chunked(B, Hkv, C, S, D, seed=C * S + D, dtype=dtype)
    q = torch.randn(B, Hq, D, generator=torch.Generator().manual_seed(D)).to(dtype)
    sizes = torch.full((C,), S, dtype=torch.int32)
    sizes[-1] = S - 2                                                  # a partial last chunk
    coded = C - 1                                                      # ... without codes: chunk bound
    coarse = chunk_scores(q, kmin, kmax, backend=backend)
    got = chunk_scores(q, kmin, kmax, sketch=KeySketch(codes, sizes, coded), backend=backend)
    ref = chunk_scores(q, kmin, kmax, sketch=KeySketch(codes, sizes, coded), backend="torch")
    scale = q.float().norm(dim=-1).max() * keys.float().abs().amax() * D**0.5
    assert ((got - ref).abs().max() / scale).item() < 1e-5
    logits = torch.einsum("bhgd,bhtd->bhgt", q.float().view(B, Hkv, Hq // Hkv, D), keys.float())
    peak = logits.amax(2).view(B, Hkv, C, S)                          # (B, Hkv, C, S) max over the group
    for c in range(C):
        n = int(sizes[c])
        assert (got[..., c] >= peak[..., c, :n].amax(-1) - 1e-3 * scale / D).all()   # still an upper bound
    assert (got <= coarse + 1e-3).all()
    assert torch.equal(got[..., coded:], coarse[..., coded:])
    assert (got[..., :coded] < coarse[..., :coded] - 1e-3).float().mean() > 0.9   # and a tighter one


def test_sketch_rejects_codes_that_do_not_fit():
    _, kmin, kmax, codes = _chunked(1, 2, 4, 8, 16, seed=0)
    q = torch.randn(1, 2, 16)
    with pytest.raises(ValueError, match="sketch codes must be"):
        chunk_scores(q, kmin, kmax, sketch=KeySketch(codes[..., :2], torch.full((4,), 8), 4))
    with pytest.raises(ValueError, match="coded=5"):
        chunk_scores(q, kmin, kmax, sketch=KeySketch(codes, torch.full((4,), 8), 5))


def _needle(seed: int, T: int = 2048, H: int = 2, G: int = 2, D: int = 64) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Random keys (two wide channels) and one key, per KV head, taking half of one query head's attention."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, H, T, D, generator=g)
    k[..., :2] *= 3.0
    q = torch.randn(1, H * G, D, generator=g)
    q = q / q.norm(dim=-1, keepdim=True) * math.sqrt(D)
    pos = int(torch.randint(64, T - 64, (1,), generator=g))
    for h in range(H):
        plant_needle(q[0, h * G], k[0, h], pos, 1, 0.5, D**-0.5)
    return q, k, pos


def test_a_single_token_needle_is_selected_with_the_sketch():
    backend = "torch"   # the Triton kernels equal it (above); interpreted they would take ~15 s here
    S, found = 64, {False: 0, True: 0}
    for seed in range(6):
        q, k, pos = _needle(seed)
        C = k.shape[2] // S
        kmin, kmax = chunk_abstract(k, torch.arange(0, k.shape[2], S), backend="torch")
        sizes = torch.full((C,), S, dtype=torch.int32)
        for use in (False, True):
            sketch = KeySketch(encode_keys(k.view(1, 2, C, S, -1), kmin, kmax), sizes, C) if use else None
            scores = chunk_scores(q, kmin, kmax, sketch=sketch, backend=backend)
            sel = select_chunks(scores, sizes, budget_tokens=k.shape[2] // 10, backend=backend)
            found[use] += int(sel.mask[0, :, pos // S].all())
    assert found[True] == 6            # always, within 10% of the tokens
    assert found[False] <= 2           # the min/max bound alone mostly misses it


# ---------------------------------------------------------------------------------------------
# the bound holds on adversarial keys; two stages (min/max prunes, the sketch ranks the candidates)

KINDS = ["random", "cell_edges", "aligned", "flat_and_wide"]


def _adversarial(kind: str, B: int, H: int, G: int, C: int, S: int, D: int, dtype: torch.dtype, seed: int):
    """q (B, H*G, D) and keys (B, H, C*S, D) built to stress the bound's rounding and its cells."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * G, D, generator=gen)
    keys = torch.randn(B, H, C * S, D, generator=gen)
    if kind == "cell_edges":      # every key on a cell boundary of its chunk's range (0, w, 2w, 3w, 4w)
        scale = torch.rand(1, 1, 1, D, generator=gen) * 3 + 0.1
        keys = torch.randint(0, 5, keys.shape, generator=gen).float() * scale / 4 - scale / 2
    elif kind == "aligned":       # one key per chunk along the first query of the group: the peak key
        keys[:, :, ::S] = q.view(B, H, G, D)[:, :, :1] * 3
    elif kind == "flat_and_wide":  # constant channels (w = 0) and one channel 300x wider than the rest
        keys[..., 1:3] = 0.5
        keys[..., 0] *= 300.0
    return q.to(dtype), keys.to(dtype)


def _true_peak(q: torch.Tensor, keys: torch.Tensor, C: int, S: int, sizes: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, C) max of q.k over each chunk's keys and the group's query heads, in float64."""
    B, Hq, D = q.shape
    H = keys.shape[1]
    logits = torch.einsum("bhgd,bhtd->bhgt", q.double().view(B, H, Hq // H, D), keys.double())
    logits = logits.amax(2).view(B, H, C, S)
    logits[..., torch.arange(S) >= sizes.view(C, 1)] = float("-inf")
    return logits.amax(-1)


def _magnitude(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, C) sum_d |q_d| (|kmin_d| + |kmax_d|), max over the group: what fp32 rounding scales with."""
    B, Hq, D = q.shape
    H = kmin.shape[1]
    a = q.float().abs().view(B, H, Hq // H, 1, D)
    return (a * (kmin.float().abs() + kmax.float().abs()).unsqueeze(2)).sum(-1).amax(2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D", [7, 33, 64])
def test_sketched_score_of_every_chunk_bounds_its_true_max(backend, dtype, kind, D):
    B, H, G, C, S = 1, 2, 2, 6, 8
    q, keys = _adversarial(kind, B, H, G, C, S, D, dtype, seed=D + len(kind))
    sizes = torch.full((C,), S, dtype=torch.int32)
    sizes[2] = 3                                                       # a short chunk (keys past it ignored)
    kmin, kmax = chunk_abstract(keys, torch.arange(0, C * S, S), backend="torch")
    slots = keys.view(B, H, C, S, D).clone()
    slots[:, :, 2, 3:] = 1e4                                           # padding past a chunk's size: never scored
    codes = encode_keys(slots, kmin, kmax)
    peak, tol = _true_peak(q, keys, C, S, sizes), 1e-5 * _magnitude(q, kmin, kmax).double()
    full = chunk_scores(q, kmin, kmax, sketch=KeySketch(codes, sizes, C), backend=backend)
    assert (full.double() >= peak - tol).all(), (full - peak).min()
    two = chunk_scores(q, kmin, kmax, sketch=KeySketch(codes, sizes, C), candidates=3, backend=backend)
    kept = torch.isfinite(two)
    assert (kept.sum(-1) == 3).all()
    assert (two.double()[kept] >= peak[kept] - tol[kept]).all()        # the candidates keep the bound
    assert torch.allclose(two[kept], full[kept], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_stages_sketch_the_best_chunks_by_the_coarse_bound_and_prune_the_rest(backend):
    B, Hq, Hkv, C, S, D = 2, 4, 2, 9, 6, 16
    keys, kmin, kmax, codes = _chunked(B, Hkv, C, S, D, seed=3)
    q = torch.randn(B, Hq, D, generator=torch.Generator().manual_seed(4))
    sizes = torch.full((C,), S, dtype=torch.int32)
    coded, K = C - 1, 4                                                # the open last chunk has no codes
    sketch = KeySketch(codes, sizes, coded)
    coarse = chunk_scores(q, kmin, kmax, backend=backend)
    full = chunk_scores(q, kmin, kmax, sketch=sketch, backend=backend)
    two = chunk_scores(q, kmin, kmax, sketch=sketch, candidates=K, backend=backend)
    ref = chunk_scores(q, kmin, kmax, sketch=sketch, candidates=K, backend="torch")
    rank = coarse_sketch_scores_ref(q, kmin[:, :, :coded], kmax[:, :, :coded], codes[:, :, :coded],
                                    sizes.expand(B, C), coarse_sketch_channels(D))
    assert (rank >= full[..., :coded] - 1e-4).all() and (rank <= coarse[..., :coded] + 1e-4).all()
    best = rank.topk(K, dim=-1).indices                                # (B, Hkv, K): the candidates
    cand = torch.zeros(B, Hkv, coded, dtype=torch.bool).scatter_(-1, best, True)
    assert torch.equal(torch.isfinite(two[..., :coded]), cand)         # the others are pruned: -inf
    assert torch.allclose(two[..., :coded][cand], full[..., :coded][cand], rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isfinite(ref), torch.isfinite(two))
    assert torch.allclose(two[torch.isfinite(two)], ref[torch.isfinite(ref)], rtol=1e-5, atol=1e-5)
    assert torch.equal(two[..., coded:], coarse[..., coded:])          # uncoded chunks keep the min/max bound
    everything = chunk_scores(q, kmin, kmax, sketch=sketch, candidates=coded, backend=backend)
    assert torch.allclose(everything, full, rtol=1e-5, atol=1e-5)      # as many candidates as coded: no pruning
    with pytest.raises(ValueError, match="candidates must be >= 0"):
        chunk_scores(q, kmin, kmax, sketch=sketch, candidates=-1, backend=backend)


@pytest.mark.parametrize("budget", [0.05, 0.10])
def test_the_default_two_stage_estimator_finds_what_exact_attention_finds(budget):
    """The needle holds half of one query head's attention (exact attention's top key): two stages
    without ellipsoids (the coarse sketch prunes to sketch_candidates, the sketch ranks them; the
    default, with ellipsoids, is in tests/test_kernels_ellipsoid.py) select its chunk.
    Chunks of 32 at 4K tokens: a 5% budget (205 tokens) holds four chunks beside the forced two."""
    S, T = 32, 4096
    budget_tokens = math.ceil(budget * T)
    for seed in range(12):
        q, k, pos = _needle(seed, T=T)
        C = T // S
        logits = torch.einsum("hd,htd->ht", q[0, ::2], k[0]) * 64**-0.5  # the planted heads (G = 2)
        assert (logits.softmax(-1)[:, pos] > 0.45).all()                   # exact attention finds it
        kmin, kmax = chunk_abstract(k, torch.arange(0, T, S), backend="torch")
        sizes = torch.full((C,), S, dtype=torch.int32)
        sketch = KeySketch(encode_keys(k.view(1, 2, C, S, -1), kmin, kmax), sizes, C - 1)   # last chunk open
        scores = chunk_scores(q, kmin, kmax, sketch=sketch, backend="torch",
                              candidates=sketch_candidates(budget_tokens - 2 * S, S, 2))
        sel = select_chunks(scores, sizes, budget_tokens=budget_tokens, recent_tokens=S, backend="torch")
        assert sel.mask[0, :, pos // S].all(), (seed, pos)


def test_sketch_candidates_counts_the_chunks_that_fit_times_the_factor():
    from tierkv.kernels.importance import MIN_SKETCH_CANDIDATES as M
    from tierkv.kernels.importance import SKETCH_CANDIDATE_FACTOR as F

    assert sketch_candidates(63, 64, 3) == 0             # nothing fits beside the forced chunks
    assert sketch_candidates(-5, 64, 3) == 0
    assert sketch_candidates(64, 64, 0) == max(F, M)     # small budgets: at least M candidates
    assert sketch_candidates(130, 64, 3) == max(2 * F, M) + 3
    big = 4 * M * 64
    assert sketch_candidates(big, 64, 2) == F * 4 * M + 2
    with pytest.raises(ValueError, match="chunk_tokens >= 1"):
        sketch_candidates(10, 0, 0)
