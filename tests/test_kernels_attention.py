"""Sparse decode attention through a chunk table: Triton (interpreted on the CPU), reference, dense SDPA."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import math

import pytest
import torch
import torch.nn.functional as F

from tierkv.kernels import (chunk_abstract, chunk_scores, combine_partials, decode_partials, empty_partials,
                            select_chunks, sparse_decode_attention)
from tierkv.kernels._select import HAS_TRITON
from tierkv.kernels.reference import chunk_partials_ref, sparse_decode_attention_ref

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # max abs error, outputs are O(1)


def _pool(keys, values, S):
    """Cut (B, Hkv, T, D) K/V into slots of capacity S; slots of sequence b are b*per .. b*per+per-1."""
    B, H, T, D = keys.shape
    per = math.ceil(T / S)
    pad = per * S - T
    k = F.pad(keys, (0, 0, 0, pad), value=float("nan")).view(B, H, per, S, D)
    v = F.pad(values, (0, 0, 0, pad), value=float("nan")).view(B, H, per, S, D)
    k_pool = k.permute(0, 2, 1, 3, 4).reshape(B * per, H, S, D).contiguous()  # (N, Hkv, S, D)
    v_pool = v.permute(0, 2, 1, 3, 4).reshape(B * per, H, S, D).contiguous()
    lens = torch.full((per,), S, dtype=torch.int32)
    lens[-1] = T - (per - 1) * S
    return k_pool, v_pool, lens.repeat(B), per


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize(
    "B,Hq,Hkv,T,S,D,split",
    [(2, 8, 2, 77, 16, 40, 20), (1, 3, 3, 5, 8, 64, 512), (1, 4, 1, 300, 4, 16, 1)],  # last: 75 splits
)
def test_all_chunks_selected_equals_dense(backend, dtype, B, Hq, Hkv, T, S, D, split):
    gen = torch.Generator().manual_seed(T + D)
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    keys = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
    values = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
    k_pool, v_pool, lens, per = _pool(keys, values, S)
    table = (torch.arange(B).view(B, 1, 1) * per + torch.arange(per).view(1, 1, per)).expand(B, Hkv, per)
    table = table.flip(-1).to(torch.int32).contiguous()  # order in the table must not matter
    counts = torch.full((B, Hkv), per, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    got = sparse_decode_attention(
        q, k_pool, v_pool, table, counts, lens, scale=0.3, split_tokens=split, out=out, backend=backend
    )
    G = Hq // Hkv
    dense = F.scaled_dot_product_attention(
        q.float().unsqueeze(2), keys.float().repeat_interleave(G, 1), values.float().repeat_interleave(G, 1), scale=0.3
    ).squeeze(2)  # (B, Hq, D)
    assert got is out
    assert (got.float() - dense).abs().max().item() < TOL[dtype]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_random_tables_match_reference(dtype):
    gen = torch.Generator().manual_seed(7)
    B, Hq, Hkv, N, S, D, M = 2, 6, 2, 20, 16, 24, 12
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    k_pool = torch.randn(N, Hkv, S, D, generator=gen).to(dtype)
    v_pool = torch.randn(N, Hkv, S, D, generator=gen).to(dtype)
    table = torch.randint(0, N, (B, Hkv, M), generator=gen, dtype=torch.int32)
    counts = torch.randint(1, M + 1, (B, Hkv), generator=gen, dtype=torch.int32)
    counts[0, 1] = 0  # a row with nothing selected gives zeros
    table[torch.arange(M).view(1, 1, M) >= counts.unsqueeze(-1)] = -1  # padding past counts
    lens = torch.randint(1, S + 1, (N,), generator=gen, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    got = sparse_decode_attention(q, k_pool, v_pool, table, counts, lens, split_tokens=32, out=out, backend="triton")
    ref = sparse_decode_attention_ref(q, k_pool, v_pool, table, counts, lens, 1 / math.sqrt(D))
    assert torch.isfinite(got).all() and (got[0, 3:6] == 0).all()
    assert (got.float() - ref.float()).abs().max().item() < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_selected_pipeline_equals_dense_over_selected(backend):
    B, Hq, Hkv, S, D, T = 1, 4, 2, 8, 32, 61
    keys, values, q = torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hq, D)
    k_pool, v_pool, lens, per = _pool(keys, values, S)
    starts = torch.arange(0, T, S)
    kmin, kmax = chunk_abstract(keys, starts, backend=backend)
    scores = chunk_scores(q, kmin, kmax, backend=backend)
    sel = select_chunks(scores, lens, budget_tokens=24, recent_tokens=8, backend=backend)
    got = sparse_decode_attention(q, k_pool, v_pool, sel.ids, sel.counts, lens, backend=backend)  # slot id = chunk id
    for h in range(Hkv):
        keep = sel.mask[0, h].repeat_interleave(S)[:T]  # (T,) tokens of the selected chunks
        assert keep[:S].all() and keep[-1]  # sink and recent chunks
        for g in range(Hq // Hkv):
            dense = F.scaled_dot_product_attention(q[:, h * 2 + g, None], keys[:, h, keep], values[:, h, keep])
            assert torch.allclose(got[:, h * 2 + g], dense[:, 0], atol=1e-5)


def test_bad_arguments_raise():
    q, pool = torch.randn(1, 4, 8), torch.randn(3, 2, 4, 8)
    table, counts = torch.zeros(1, 2, 3, dtype=torch.int32), torch.ones(1, 2, dtype=torch.int32)
    lens = torch.ones(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="dtype"):
        sparse_decode_attention(q.half(), pool, pool, table, counts, lens)
    with pytest.raises(ValueError, match="table"):
        sparse_decode_attention(q, pool, pool, table[:, :1], counts, lens)
    with pytest.raises(ValueError, match="integer"):
        sparse_decode_attention(q, pool, pool, table.float(), counts, lens)
    with pytest.raises(ValueError, match="split_tokens"):
        sparse_decode_attention(q, pool, pool, table, counts, lens, split_tokens=0)


# -- the placement-invariant reduction: per-chunk partials, one combine ------------------------------


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("G,S,D", [(1, 16, 16), (4, 64, 64), (3, 128, 128)])
def test_a_chunk_partial_does_not_depend_on_the_chunks_computed_beside_it(threads, G, S, D):
    """What the tiered cache's placement invariance rests on (CPU path): ``chunk_partials_ref`` gives
    each chunk the same bits alone, in a batch of any size, at any position, with 1 or 2 threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(G * S + D)
        N = 300
        q, k, v = (torch.randn(N, *shape, generator=gen) for shape in ((G, D), (S, D), (S, D)))
        lens = torch.randint(1, S + 1, (N,), generator=gen)
        full = chunk_partials_ref(q, k.bfloat16(), v.bfloat16(), lens, 0.125)
        perm = torch.randperm(N, generator=gen)
        shuffled = chunk_partials_ref(q[perm], k.bfloat16()[perm], v.bfloat16()[perm], lens[perm], 0.125)
        assert all(torch.equal(a[perm], b) for a, b in zip(full, shuffled))
        for lo, n in ((0, 1), (5, 2), (17, 63), (100, 200)):
            part = chunk_partials_ref(q[lo:lo + n], k[lo:lo + n].bfloat16(), v[lo:lo + n].bfloat16(),
                                      lens[lo:lo + n], 0.125)
            assert all(torch.equal(a[lo:lo + n], b) for a, b in zip(full, part)), (lo, n)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partials_from_two_pools_combine_to_the_one_pool_bits(backend, dtype):
    """A step whose selection is split between the slot pool and a temporary pool of chunks read for
    it (entries -1 in each call's table where the chunk is in the other pool) gives the bits of the
    all-resident call with one chunk per split."""
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, N, S, D, M = 2, 6, 2, 20, 16, 24, 9
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    k_pool, v_pool = (torch.randn(N, Hkv, S, D, generator=gen).to(dtype) for _ in range(2))
    lens = torch.randint(1, S + 1, (N,), generator=gen, dtype=torch.int32)
    table = torch.stack([torch.randperm(N, generator=gen)[:M] for _ in range(B * Hkv)]).view(B, Hkv, M).int()
    counts = torch.randint(1, M + 1, (B, Hkv), generator=gen, dtype=torch.int32)
    whole = sparse_decode_attention(q, k_pool, v_pool, table, counts, lens, split_tokens=1, backend=backend)
    away = torch.arange(N) % 3 == 0                                   # these slots' chunks are "off the device"
    moved = away.nonzero().view(-1)
    temp_k = torch.full((len(moved) + 2, Hkv, S, D), float("nan"), dtype=dtype)   # another layout, NaN padding
    temp_v = torch.full_like(temp_k, float("nan"))
    temp_k[2:], temp_v[2:] = k_pool[moved], v_pool[moved]
    temp_lens = torch.zeros(len(moved) + 2, dtype=torch.int32)
    temp_lens[2:] = lens[moved]
    where = torch.full((N,), -1, dtype=torch.int32)
    where[moved] = torch.arange(2, len(moved) + 2, dtype=torch.int32)
    parts = empty_partials(B, Hq, M, D, q.device)
    decode_partials(q, k_pool, v_pool, torch.where(away[table.long()], -1, table), counts, lens, parts,
                    backend=backend)
    decode_partials(q, temp_k, temp_v, where[table.long()], counts, temp_lens, parts, backend=backend)
    got = combine_partials(parts, dtype, backend=backend)
    assert torch.equal(got, whole)
    assert (got.float() - sparse_decode_attention_ref(q, k_pool, v_pool, table, counts, lens,
                                                      1 / math.sqrt(D)).float()).abs().max() < TOL[dtype]
