"""Memory-efficient prefill attention: query blocks bounded by a scratch cap equal the reference.

Covers ``model.dense_attention`` (the resident cache and the planner probe: its query blocks, and
its fused path for pieces that end the context, ``model.causal_tail_attention``) and the tiered
cache's online softmax (``pipeline.kv._OnlineSoftmax``) on odd shapes, sliding windows, pieces
starting mid-context and GQA, and checks that no mask or score tensor spans the whole (T, S) piece.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tierkv import model as model_mod
from tierkv.model import attention_block_rows, attention_pair_bytes, dense_attention
from tierkv.pipeline.kv.streamed import OnlineSoftmax as _OnlineSoftmax

# (B, Hq, Hkv, T new queries, S keys, D, window, scratch bytes)
CASES = [
    (1, 4, 2, 37, 37, 16, None, 4096),       # first piece, odd length, GQA
    (2, 6, 3, 13, 50, 8, 7, 1024),           # piece mid-context with a window, batch of two
    (1, 8, 8, 5, 101, 24, None, 1 << 14),    # MHA, short piece at the end of a long context
    (1, 4, 1, 64, 64, 16, 5, 512),           # GQA 4, window shorter than a block, one-row blocks
    (1, 3, 1, 1, 40, 16, 9, 1 << 20),        # a decode query with a window narrower than the context
    (2, 6, 2, 29, 80, 8, 80, 1024),          # a window as long as the context: the fused path, batch of two
]


def _reference(q, k, v, q_pos, k_pos, window):
    """Plain fp64 softmax attention with the full (T, S) mask."""
    group = q.shape[1] // k.shape[1]
    kf, vf = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    allowed = (diff >= 0) & (diff < window if window is not None else True)
    logits = (q.double() @ kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), -1) @ vf


def _inputs(b, hq, hkv, t, s, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    k_pos = torch.arange(s)[None].expand(b, -1)
    q_pos = torch.arange(s - t, s)[None].expand(b, -1)                   # the piece ends the context
    return q, k, v, q_pos, k_pos


@pytest.mark.parametrize("b,hq,hkv,t,s,d,window,scratch", CASES)
def test_blocked_dense_attention_equals_the_reference(b, hq, hkv, t, s, d, window, scratch):
    q, k, v, q_pos, k_pos = _inputs(b, hq, hkv, t, s, d)
    out = dense_attention(q, k, v, q_pos, k_pos, window, scratch_bytes=scratch)
    assert out.shape == q.shape
    assert (out.double() - _reference(q, k, v, q_pos, k_pos, window)).abs().max() < 2e-5


@pytest.mark.parametrize("b,hq,hkv,t,s,d,window,scratch", CASES)
def test_blocked_online_softmax_equals_the_reference(b, hq, hkv, t, s, d, window, scratch):
    q, k, v, q_pos, k_pos = _inputs(b, hq, hkv, t, s, d, seed=1)
    state = _OnlineSoftmax(q, hkv, scratch_bytes=scratch)
    for lo in range(0, s, 17):                                           # keys arrive in uneven batches
        state.update(k[:, :, lo:lo + 17], v[:, :, lo:lo + 17], q_pos, k_pos[:, lo:lo + 17], None, window)
    assert (state.result().double() - _reference(q, k, v, q_pos, k_pos, window)).abs().max() < 2e-5


def test_bfloat16_blocks_agree_with_one_call():
    q, k, v, q_pos, k_pos = (x.bfloat16() if x.is_floating_point() else x for x in _inputs(1, 4, 2, 96, 160, 32))
    small = dense_attention(q, k, v, q_pos, k_pos, 150, scratch_bytes=2048)
    whole = dense_attention(q, k, v, q_pos, k_pos, 150, scratch_bytes=1 << 30)
    assert (small.float() - whole.float()).abs().max() < 3e-2
    fused = dense_attention(q, k, v, q_pos, k_pos, None)
    assert (fused.double() - _reference(q, k, v, q_pos, k_pos, None)).abs().max() < 3e-2


@pytest.mark.parametrize("b,hq,hkv,s,d", [(1, 16, 4, 300, 32), (2, 9, 3, 77, 16), (1, 6, 6, 50, 8), (3, 8, 1, 129, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_groups_query_heads_per_kv_head(b, hq, hkv, s, d, dtype):
    """A decode query (T = 1) attends through ``decode_attention``: GQA's query heads of one KV head go
    in as rows of one call (MHA as it is), with the reference's result for a query given as the model
    gives it (a transposed view) and keys sliced out of a longer cache."""
    q, k, v, q_pos, k_pos = _inputs(b, hq, hkv, 1, s, d, seed=2)
    cache_k = torch.zeros(b, hkv, s + 40, d).to(dtype)
    cache_v = torch.zeros(b, hkv, s + 40, d).to(dtype)
    cache_k[:, :, :s], cache_v[:, :, :s] = k, v
    q_view = q.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)              # (B, Hq, 1, D), strided as in the model
    out = dense_attention(q_view, cache_k[:, :, :s], cache_v[:, :, :s], q_pos, k_pos, None)
    assert out.shape == q.shape and out.dtype == dtype
    ref = _reference(q.to(dtype), cache_k[:, :, :s], cache_v[:, :, :s], q_pos, k_pos, None)
    assert (out.double() - ref).abs().max() < (2e-5 if dtype == torch.float32 else 2e-2)
    gqa = F.scaled_dot_product_attention(q_view, cache_k[:, :, :s], cache_v[:, :, :s], enable_gqa=hq != hkv)
    assert (out.double() - gqa.double()).abs().max() < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("q_offset", [0, 3])
def test_the_fused_path_serves_exactly_the_pieces_that_end_the_context(q_offset):
    """Queries at the last T key positions (no window cutting the span) take the fused path; queries
    elsewhere (here: positions shifted off the keys') or under a narrower window do not."""
    q, k, v, q_pos, k_pos = _inputs(1, 4, 2, 20, 50, 16)
    q_pos = q_pos - q_offset
    assert model_mod.tail_queries_see_all(q, q_pos, k_pos, None) == (q_offset == 0)
    assert not model_mod.tail_queries_see_all(q, q_pos, k_pos, 49)
    assert not model_mod.tail_queries_see_all(q.double(), q_pos, k_pos, None)
    out = dense_attention(q, k, v, q_pos, k_pos, None)
    assert (out.double() - _reference(q, k, v, q_pos, k_pos, None)).abs().max() < 2e-5


def test_the_fused_path_holds_no_score_tensor(monkeypatch):
    """A prefill piece after a cached prefix runs the fused kernel only: no SDPA call (whose math
    fallback would build scores) and no allocation as large as one head's (T, S) fp32 scores."""
    from torch.profiler import ProfilerActivity, profile

    b, hq, hkv, t, s, d = 1, 4, 2, 300, 500, 16
    q, k, v, q_pos, k_pos = _inputs(b, hq, hkv, t, s, d)

    def no_sdpa(*args, **kw):
        raise AssertionError("the fused path called scaled_dot_product_attention")

    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", no_sdpa)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = dense_attention(q, k, v, q_pos, k_pos, None, scratch_bytes=64 << 10)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest < t * s * 4
    assert (out.double() - _reference(q, k, v, q_pos, k_pos, None)).abs().max() < 2e-5


def test_no_mask_or_score_tensor_spans_the_whole_piece(monkeypatch):
    """Every SDPA call of a long prefill piece under a sliding window (the blocked path) sees at most
    a block of queries, and a block's mask fits the scratch cap; the tiered path's score blocks fit it too."""
    b, hq, hkv, t, s, d, scratch, window = 1, 4, 2, 300, 300, 16, 64 << 10, 280
    q, k, v, q_pos, k_pos = _inputs(b, hq, hkv, t, s, d)
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q_, k_, v_, attn_mask=None, **kw):
        seen.append((q_.shape[2], k_.shape[2], None if attn_mask is None else attn_mask.numel()))
        return real_sdpa(q_, k_, v_, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", spy)
    dense_attention(q, k, v, q_pos, k_pos, window, scratch_bytes=scratch)
    rows = attention_block_rows(b, hq, s, scratch)
    assert len(seen) > 1 and all(r <= rows for r, _, _ in seen)
    assert all(n is not None and n * attention_pair_bytes(b, hq) <= scratch for *_, n in seen)
    assert sum(n for *_, n in seen) < t * s * 0.6                        # causal blocks skip keys they cannot see

    real_matmul = torch.Tensor.__matmul__
    sizes = []

    def matmul_spy(a, other):
        out = real_matmul(a, other)
        sizes.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul_spy)
    state = _OnlineSoftmax(q, hkv, scratch_bytes=scratch)
    state.update(k, v, q_pos, k_pos, None, None)
    assert max(sizes) * 3 <= scratch                                     # three fp32 score copies per block
