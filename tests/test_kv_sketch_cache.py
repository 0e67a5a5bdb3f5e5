"""The tiered cache's key codes: written as chunks close, read by its sparse selection, budgeted."""

import math

import pytest
import torch

from tierkv.config import ModelConfig, Policy
from tierkv.kernels.quality import plant_needle
from tierkv.pipeline.kv import TieredKVCache
from tierkv.pipeline.kv.sparse import select

HQ, HKV, D, T, S = 4, 2, 64, 2048, 64


pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")


def _cfg() -> ModelConfig:
    return ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=16, hidden_size=HQ * D,
                                      intermediate_size=8, num_hidden_layers=1, num_attention_heads=HQ,
                                      num_key_value_heads=HKV, max_position_embeddings=8192))


def _needle_context(seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Decode query (1, Hq, D) and keys (1, Hkv, T, D): one key per KV head takes half of one query's attention."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, HKV, T, D, generator=g)
    k[..., :2] *= 3.0                                   # two wide channels loosen the min/max bound
    q = torch.randn(1, HQ, D, generator=g)
    q = q / q.norm(dim=-1, keepdim=True) * math.sqrt(D)
    pos = int(torch.randint(2 * S, T - 2 * S, (1,), generator=g))
    for h in range(HKV):
        plant_needle(q[0, h * (HQ // HKV)], k[0, h], pos, 1, 0.5, D**-0.5)
    return q, k, pos


def _needle_selected(seed: int, sketch: bool) -> bool:
    """Prefill the needle context through the cache, then ask its own selection for the needle query."""
    q, k, pos = _needle_context(seed)
    policy = Policy(kv="sparse", kv_budget=0.1, chunk_tokens=S, kv_sketch=sketch)
    with TieredKVCache(_cfg(), policy, 1, T + 4, torch.float32, "cpu") as cache:
        positions = torch.arange(T).view(1, T)
        cache.attend(0, torch.randn(1, HQ, T, D), k, torch.randn(1, HKV, T, D), positions, None)
        cache.advance(T)
        kv = cache._st.layers[0]
        assert kv is not None and kv.n_coded == (T // S if sketch else 0)
        assert (cache.stats()["sketch_bytes"] > 0) == sketch
        found = bool(select(cache._st, kv, q).mask[0, :, pos // S].all())
        out = cache.attend(0, q.unsqueeze(2), k[:, :, -1:], torch.randn(1, HKV, 1, D), torch.tensor([[T]]), None)
        cache.advance(1)
        assert out.shape == (1, HQ, 1, D) and torch.isfinite(out).all()
        assert kv.n_coded == (T // S if sketch else 0)   # the new token opened a chunk: not coded yet
        assert cache.check_invariants() == T // S + 1   # layer 0 only: the coded chunks and the open one
    return found


def test_the_cache_codes_closed_chunks_and_its_selection_finds_the_needle() -> None:
    with_codes = [_needle_selected(seed, True) for seed in range(3)]
    without = [_needle_selected(seed, False) for seed in range(3)]
    assert all(with_codes)
    assert sum(without) <= 1


@pytest.mark.parametrize("budget", [0.05, 0.10])
def test_the_default_estimator_finds_the_needle_at_small_budgets(budget: float) -> None:
    """The default policy (no kv_sketch given) keeps key codes on the CPU too, and its two-stage
    selection finds the key exact attention finds, at 5% and 10% of a 4K context in chunks of 32."""
    g = torch.Generator().manual_seed(int(budget * 100))
    T4, S4 = 4096, 32
    for seed in range(4):
        k = torch.randn(1, HKV, T4, D, generator=g)
        k[..., :2] *= 3.0
        q = torch.randn(1, HQ, D, generator=g)
        q = q / q.norm(dim=-1, keepdim=True) * math.sqrt(D)
        pos = int(torch.randint(2 * S4, T4 - 2 * S4, (1,), generator=g))
        for h in range(HKV):
            plant_needle(q[0, h * (HQ // HKV)], k[0, h], pos, 1, 0.5, D**-0.5)
        policy = Policy(kv="sparse", kv_budget=budget, chunk_tokens=S4)
        with TieredKVCache(_cfg(), policy, 1, T4 + 4, torch.float32, "cpu") as cache:
            cache.attend(0, torch.randn(1, HQ, T4, D), k, torch.randn(1, HKV, T4, D), torch.arange(T4).view(1, T4), None)
            cache.advance(T4)
            kv = cache._st.layers[0]
            assert cache.stats()["sketch"] == "on" and kv is not None and kv.n_coded == T4 // S4
            assert bool(select(cache._st, kv, q).mask[0, :, pos // S4].all()), (seed, pos)


def test_stats_report_the_estimator_share_of_sparse_steps() -> None:
    policy = Policy(kv="sparse", kv_budget=0.1, chunk_tokens=S)
    q, k, _ = _needle_context(0)
    with TieredKVCache(_cfg(), policy, 1, T + 8, torch.float32, "cpu") as cache:
        cache.attend(0, torch.randn(1, HQ, T, D), k, torch.randn(1, HKV, T, D), torch.arange(T).view(1, T), None)
        cache.advance(T)
        assert cache.stats()["estimator_share"] is None            # prefill only: no sparse step yet
        for i in range(3):
            cache.attend(0, q.unsqueeze(2), k[:, :, -1:], torch.randn(1, HKV, 1, D), torch.tensor([[T + i]]), None)
            cache.advance(1)
        st = cache.stats()
        assert st["sparse_layer_steps"] == 3 and st["estimator_s"] > 0
        assert 0 < st["estimator_share"] <= 1 and st["sparse_step_s"] >= st["estimator_s"]


@pytest.mark.parametrize("tokens", [1, 64, 65, 127, 128, 129, 640, 700])
@pytest.mark.parametrize("sink", [0, 1, 2])
def test_forced_tokens_match_the_forced_chunks_of_the_selection(tokens: int, sink: int) -> None:
    from tierkv.kernels import select_chunks
    from tierkv.pipeline.kv.sparse import forced_tokens

    c = -(-tokens // S)
    sizes = torch.full((c,), S, dtype=torch.int32)
    sizes[-1] = tokens - (c - 1) * S
    sel = select_chunks(torch.zeros(1, 1, c), sizes, budget_tokens=0, sink_chunks=sink, recent_tokens=S,
                        backend="torch")                         # a zero budget keeps the forced chunks only
    assert forced_tokens(c, S, tokens, sink) == (int((sel.mask[0, 0] * sizes).sum()), int(sel.counts[0, 0]))


def test_the_cache_keeps_key_ellipsoids_from_32_token_chunks_the_same_under_any_prefill_split() -> None:
    """Chunks of 32+ tokens keep ellipsoids (the context's causal variances as axis weights), equal
    to ``key_ellipsoids`` of the closed chunks and bit-identical whatever pieces the prompt came in;
    16-token chunks keep none (``sizing.keeps_ellipsoids``: the index would grow by half)."""
    from tierkv.kernels import key_ellipsoids
    from tierkv.kernels.ellipsoid import causal_variances, no_moments

    q, k, _ = _needle_context(1)
    got = []
    for pieces in ((T,), (700, 300, T - 1000)):
        with TieredKVCache(_cfg(), Policy(kv="sparse", kv_budget=0.1, chunk_tokens=S), 1, T + 4, torch.float32,
                           "cpu") as cache:
            a = 0
            for n in pieces:
                cache.attend(0, torch.randn(1, HQ, n, D), k[:, :, a:a + n], torch.randn(1, HKV, n, D),
                             torch.arange(a, a + n).view(1, n), None)
                cache.advance(n)
                a += n
            kv = cache._st.layers[0]
            assert kv is not None and kv.centre is not None and kv.axes2 is not None
            got.append((kv.centre.clone(), kv.axes2.clone()))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    chunks = k.view(1, HKV, T // S, S, D)
    want = key_ellipsoids(chunks, torch.float32, causal_variances(chunks, no_moments(1, HKV, D, "cpu"))[0])
    assert torch.allclose(got[0][0][:, :, :T // S], want.centre) and torch.allclose(got[0][1][:, :, :T // S], want.axes2)
    with TieredKVCache(_cfg(), Policy(kv="sparse", kv_budget=0.1, chunk_tokens=16), 1, 256, torch.float32,
                       "cpu") as small:
        small.attend(0, torch.randn(1, HQ, 64, D), k[:, :, :64], torch.randn(1, HKV, 64, D),
                     torch.arange(64).view(1, 64), None)
        small.advance(64)
        kv = small._st.layers[0]
        assert kv is not None and kv.codes is not None and kv.centre is None
        assert bool(select(small._st, kv, q).mask.any())                  # the coarse sketch ranks instead
