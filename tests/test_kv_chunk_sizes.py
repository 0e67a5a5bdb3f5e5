"""Chunk sizes that do not depend on placement (issue 12): the rule on numbers, and the tiered cache.

A layer's chunk size comes from its attention skew, the policy and the capacity only
(``sizing.chunk_tokens_for``), never from the device room: the same prompt is cut into the same
chunks (so a sparse step can pick the same tokens) whether its KV stays on the device, spills to
host memory or to disk. The device minimum is the worst case over every size a layer may pick, so
a budget at that minimum never fails at prefill; a layer whose sparse budget holds fewer than
``MIN_BUDGET_CHUNKS`` of its chunks stays exact under ``kv="auto"``, and says so under "sparse".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from tierkv.config import ModelConfig, Policy
from tierkv.pipeline.chunking import ChunkRule, chunk_tokens_for_entropy
from tierkv.pipeline.kv import (MIN_BUDGET_CHUNKS, DenseKVCache, TieredKVCache, budget_holds_chunks,
                                chunk_size_candidates, chunk_tokens_for, keeps_sketch, kv_budget_tokens,
                                kv_bytes_per_token,
                                kv_device_minimum_bytes)
from tierkv.pipeline.kv import sparse as sparse_mod
from tierkv.pipeline.kv.sizing import chunk_cap_tokens, layer_minimum_bytes, sparse_possible
from tierkv.pipeline.kv.table import KVBudgetError

B, HQ, HKV, D, LAYERS = 1, 4, 2, 16, 2

pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")


def _cfg() -> ModelConfig:
    return ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=16, hidden_size=HQ * D,
                                      intermediate_size=8, num_hidden_layers=LAYERS, num_attention_heads=HQ,
                                      num_key_value_heads=HKV, max_position_embeddings=8192))


# -- the rule on numbers ---------------------------------------------------------------------------


def test_the_issue_budget_of_51_tokens_gets_small_chunks_and_is_too_small_to_select_from() -> None:
    """5% of ~1K tokens is 51 tokens, which held under half a 128-token chunk: now the cap keeps the
    adaptive size at the rule's smallest (16) and the budget still holds < 8 of those."""
    sparse = Policy(kv="sparse", kv_budget=0.05)
    assert kv_budget_tokens(0.05, 1020) == 51
    assert chunk_cap_tokens(sparse, 1020) == 16 == chunk_tokens_for(sparse, 1020, 0.95)   # flat: 256 unless capped
    assert not budget_holds_chunks(0.05, 1020, 16) and budget_holds_chunks(0.25, 1020, 16)


@pytest.mark.parametrize("policy, capacity, cap", [
    (Policy(kv="sparse", kv_budget=0.05), 32768, 128),     # 1639 tokens of budget: 8 chunks of 128 (not 256)
    (Policy(kv="sparse", kv_budget=0.05), 131072, 256),    # the rule's largest
    (Policy(kv="sparse", kv_budget=512), 131072, 64),      # a token count: 512 // 8
    (Policy(kv="exact"), 700, 32),                         # no budget: the capacity holds 16 chunks (700 // 16)
    (Policy(kv="auto"), 4096, 16),                         # auto: the budget where it goes sparse (4097 tokens)
    (Policy(kv="auto", kv_budget=0.25), 1000, 32),         # 0.25 of 4097 would allow 128; the capacity 62
    (Policy(kv="auto"), 8192, 32),                         # beyond it: 5% of 8192 is 410 tokens, 410 // 8 = 51
])
def test_the_cap_follows_the_budget_and_the_capacity(policy: Policy, capacity: int, cap: int) -> None:
    assert chunk_cap_tokens(policy, capacity) == cap
    sizes = chunk_size_candidates(policy, capacity)
    assert max(sizes) == cap and min(sizes) == ChunkRule().min_chunk_tokens
    assert all(s & (s - 1) == 0 for s in sizes)
    for entropy in [None] + [i / 20 for i in range(21)]:  # every size the skew may ask for is a candidate
        size = chunk_tokens_for(policy, capacity, entropy)
        assert size in sizes and size == min(chunk_tokens_for_entropy(entropy), cap)
    if sparse_possible(policy, capacity):                  # the budget at the capacity holds 8 of the largest
        assert budget_holds_chunks(policy.kv_budget, capacity, cap)


def test_a_fixed_chunk_size_is_kept_and_capped_only_by_the_capacity() -> None:
    policy = Policy(kv="sparse", kv_budget=0.05, chunk_tokens=128)
    assert chunk_size_candidates(policy, 1000) == (128,) == (chunk_tokens_for(policy, 1000, 0.0),)
    assert chunk_size_candidates(policy, 100) == (100,)


@pytest.mark.parametrize("policy", [Policy(kv="exact"), Policy(kv="sparse"), Policy(kv="sparse", kv_budget=0.5),
                                    Policy(kv="auto"), Policy(kv="sparse", kv_budget=300)])
@pytest.mark.parametrize("sketch", [False, True])
def test_the_device_minimum_is_the_worst_size_and_never_falls_with_the_capacity(policy: Policy,
                                                                                 sketch: bool) -> None:
    cfg, dt, last = _cfg(), torch.float32, 0
    for capacity in [1, 7, 15, 16, 100, 255, 256, 257, 1000, 2047, 4096, 4097, 5000, 8192, 20000, 65536]:
        need = kv_device_minimum_bytes(cfg, policy, dt, 2, capacity, sketch)
        assert need == LAYERS * max(layer_minimum_bytes(cfg, dt, 2, capacity, s, sketch)
                                    for s in chunk_size_candidates(policy, capacity))
        assert need >= last, (capacity, need, last)
        last = need


# -- the cache: same chunks wherever the KV lives --------------------------------------------------


def _skewed(layer: int, start: int, t: int) -> tuple[torch.Tensor, ...]:
    """q, k, v of one piece: layer 0 attends flat (the largest size), layer 1 to a few keys (16)."""
    g = torch.Generator().manual_seed(1000 * layer + start)
    k, v = torch.randn(B, HKV, t, D, generator=g), torch.randn(B, HKV, t, D, generator=g)
    if layer == 0:
        return torch.zeros(B, HQ, t, D), k, v
    k[:, :, ::97] = 6.0
    return torch.full((B, HQ, t, D), 3.0) + 0.1 * torch.randn(B, HQ, t, D, generator=g), k, v


def _drive(cache: Any, pieces: list[int], make: Callable[..., tuple[torch.Tensor, ...]] = _skewed
           ) -> list[torch.Tensor]:
    outs, start = [], cache.length_tokens
    for t in pieces:
        pos = torch.arange(start, start + t)[None]
        for layer in range(LAYERS):
            outs.append(cache.attend(layer, *make(layer, start, t), pos, None))
        cache.advance(t)
        start += t
    return outs


PIECES = [700, 500, 100] + [1] * 5
CAP = sum(PIECES)


def _placements(cfg: ModelConfig, policy: Policy, tmp: Path) -> dict[str, TieredKVCache]:
    """The same cache on three placements: every chunk on the device; the device at the minimum with
    the rest on the host; the device at the minimum, a host of 4 chunks, the rest on disk."""
    per_token = kv_bytes_per_token(cfg, torch.float32)
    room = kv_device_minimum_bytes(cfg, policy, torch.float32, B, CAP, keeps_sketch(policy))
    return {"device": TieredKVCache(cfg, policy, B, CAP, torch.float32, "cpu"),
            "host": TieredKVCache(cfg, policy, B, CAP, torch.float32, "cpu", kv_device_bytes=room),
            "disk": TieredKVCache(cfg, policy, B, CAP, torch.float32, "cpu", kv_device_bytes=room,
                                  kv_host_bytes=4 * 64 * per_token, offload_dir=tmp)}


@pytest.mark.parametrize("policy", [Policy(kv="exact"), Policy(kv="sparse", kv_budget=0.5),
                                    Policy(kv="sparse", kv_budget=0.5, kv_sketch=True)],
                         ids=["exact", "sparse", "sparse-codes"])
def test_the_same_prompt_is_cut_into_the_same_chunks_on_every_placement(policy: Policy, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk sizes (and so, in sparse mode, every selection) are the same with all KV on the device,
    spilled to the host, or spilled to disk; exact outputs equal the dense cache's."""
    cfg = _cfg()
    masks: dict[int, list[torch.Tensor]] = {}
    real_select = sparse_mod.select

    def spy(st: Any, kv: Any, q0: torch.Tensor) -> Any:
        sel = real_select(st, kv, q0)
        masks.setdefault(id(st), []).append(sel.mask.clone())
        return sel

    monkeypatch.setattr(sparse_mod, "select", spy)
    dense = DenseKVCache(cfg, B, CAP, torch.float32, torch.device("cpu"))
    want = _drive(dense, PIECES)
    caches = _placements(cfg, policy, tmp_path)
    stats, outs = {}, {}
    for name, cache in caches.items():
        with cache:
            outs[name] = _drive(cache, PIECES)
            stats[name] = cache.stats()
    assert stats["device"]["host_bytes"] == stats["device"]["disk_bytes"] == 0
    assert stats["host"]["host_bytes"] > 0 and stats["host"]["disk_bytes"] == 0
    assert stats["disk"]["host_bytes"] > 0 and stats["disk"]["disk_bytes"] > 0
    # 0.5 of 1305 tokens holds 8 chunks of 64 and the capacity 16 of 81: flat takes 64, skewed 16
    assert stats["device"]["chunk_tokens"] == stats["host"]["chunk_tokens"] == stats["disk"]["chunk_tokens"] \
        == [64, 16]
    assert len({st["sketch"] for st in stats.values()}) == 1
    for name in caches:
        for a, b in zip(want if policy.kv == "exact" else outs["device"], outs[name]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    if policy.kv == "sparse":
        runs = [masks[id(cache._st)] for cache in caches.values()]
        assert len(runs[0]) == 5 * LAYERS and all(len(r) == len(runs[0]) for r in runs)
        for picked in zip(*runs):
            assert all(torch.equal(picked[0], m) for m in picked[1:])


@pytest.mark.parametrize("sketch", [False, True])
def test_a_device_room_at_the_minimum_holds_the_largest_and_the_smallest_size(sketch: bool, tmp_path: Path) -> None:
    """At exactly ``kv_device_minimum_bytes`` a flat layer (the largest size the rule may pick) and a
    skewed one (the smallest) both prefill and decode; the minimum is not that of either alone."""
    cfg, policy = _cfg(), Policy(kv="sparse", kv_budget=0.5, kv_sketch=sketch)
    room = kv_device_minimum_bytes(cfg, policy, torch.float32, B, CAP, sketch)
    per_size = {s: LAYERS * layer_minimum_bytes(cfg, torch.float32, B, CAP, s, sketch) for s in (16, 64)}
    assert room == max(per_size.values()) and min(per_size.values()) < room
    with TieredKVCache(cfg, policy, B, CAP, torch.float32, "cpu", kv_device_bytes=room, kv_host_bytes=0,
                       offload_dir=tmp_path) as cache:
        _drive(cache, PIECES)
        st = cache.stats()
    assert st["chunk_tokens"] == [64, 16] and st["disk_bytes"] > 0 and st["decode_steps"] == 5
    assert st["sketch"] == ("on" if sketch else "off")
    with pytest.raises(KVBudgetError, match=r"needs at least 6 per layer"):
        TieredKVCache(cfg, Policy(kv="sparse", kv_budget=0.5, kv_sketch=False), B, CAP, torch.float32, "cpu",
                      kv_device_bytes=min(per_size.values()), offload_dir=tmp_path)


# -- budgets that cannot hold a few chunks ---------------------------------------------------------


def test_auto_stays_exact_where_the_budget_holds_too_few_chunks_and_sparse_says_so(tmp_path: Path) -> None:
    """kv="auto" beyond kv_exact_max_tokens with a budget of 51 tokens and 16-token chunks: every
    step exact (what it selects from would be 3 chunks); kv="sparse" selects anyway and stats say
    why that is coarse. 0.25 of the context holds enough: auto goes sparse."""
    cfg, pieces = _cfg(), [1000, 1, 1, 1]
    flat = lambda j, s, t: (torch.randn(B, HQ, t, D), torch.randn(B, HKV, t, D), torch.randn(B, HKV, t, D))  # noqa
    runs = {}
    for kv, budget in (("auto", 0.05), ("sparse", 0.05), ("auto", 0.25)):
        policy = Policy(kv=kv, kv_budget=budget, kv_exact_max_tokens=500, chunk_tokens=16)
        with TieredKVCache(cfg, policy, B, 1003, torch.float32, "cpu") as cache:
            _drive(cache, pieces, flat)
            runs[kv, budget] = cache.stats()
    auto, sparse, roomy = runs["auto", 0.05], runs["sparse", 0.05], runs["auto", 0.25]
    assert auto["sparse_layer_steps"] == 0 and auto["exact_layer_steps"] == 4 * LAYERS
    assert sparse["sparse_layer_steps"] == 3 * LAYERS and roomy["sparse_layer_steps"] == 3 * LAYERS
    note = "budget 51 tokens holds < 8 chunks of 16 tokens in layers 0, 1"
    assert auto["kv_budget_note"].startswith(note) and "attend exactly" in auto["kv_budget_note"]
    assert sparse["kv_budget_note"].startswith(note) and "coarse" in sparse["kv_budget_note"]
    assert "raise kv_budget (--kv-budget) to at least 128 tokens" in sparse["kv_budget_note"]
    assert roomy["kv_budget_note"] is None


def test_auto_decides_per_layer_from_each_layers_chunk_size(tmp_path: Path) -> None:
    """A capacity far beyond the context: 0.1 of 4000 tokens allows 32-token chunks, but at 1300
    tokens the budget (130) holds 8 of the skewed layer's 16-token chunks and not of the flat
    layer's 32: the flat layer stays exact, the skewed one selects."""
    cfg = _cfg()
    policy = Policy(kv="auto", kv_budget=0.1, kv_exact_max_tokens=1000)
    assert chunk_cap_tokens(policy, 4000) == 32 and MIN_BUDGET_CHUNKS * 16 <= kv_budget_tokens(0.1, 1301) < 8 * 32
    with TieredKVCache(cfg, policy, B, 4000, torch.float32, "cpu") as cache:
        _drive(cache, [1300, 1, 1])
        st = cache.stats()
    assert st["chunk_tokens"] == [32, 16]
    assert st["sparse_layer_steps"] == 2 and st["exact_layer_steps"] == LAYERS + 2   # prefill, then layer 0
    assert "in layers 0," in st["kv_budget_note"] and "attend exactly" in st["kv_budget_note"]
