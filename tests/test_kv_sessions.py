"""Copy-out / copy-in of a KV cache, as sessions use it: ``read_kv`` gathers stored K/V from every tier,
``append_kv`` + ``advance`` store it in another cache built with the first one's ``geometry()``, and the
copy then decodes exactly like the original (same outputs; in sparse mode the same selections)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tierkv.config import ModelConfig, Policy
from tierkv.pipeline.kv import DenseKVCache, KVWorkers, TieredKVCache, chunk_tokens_for, make_kv_cache
from tierkv.pipeline.kv import sparse as sparse_mod

HQ, HKV, D, LAYERS = 4, 2, 16, 2
PROMPT = [300, 200, 45]


pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")   # tiny tensors: torch kernels, one thread


def _cfg() -> ModelConfig:
    return ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=16, hidden_size=HQ * D,
                                      intermediate_size=8, num_hidden_layers=LAYERS, num_attention_heads=HQ,
                                      num_key_value_heads=HKV, max_position_embeddings=8192))


def _forward(g: torch.Generator, t: int, skewed: bool) -> list[tuple[torch.Tensor, ...]]:
    """(q, k, v) per layer for t tokens of 2 sequences; ``skewed`` gives the layers different chunk sizes."""
    out = []
    for j in range(LAYERS):
        q, k, v = (torch.randn(2, n, t, D, generator=g) for n in (HQ, HKV, HKV))
        if skewed and j == 0:
            q = q * 0.0                         # flat attention: large chunks
        elif skewed:
            q, k[:, :, ::97] = q.abs() + 3.0, 6.0   # a few dominant keys: small chunks
        out.append((q, k, v))
    return out


def _attend(cache: Any, forward: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    t, start = forward[0][1].shape[2], cache.length_tokens
    pos = torch.arange(start, start + t)[None].expand(2, t)
    outs = [cache.attend(j, q, k, v, pos, None) for j, (q, k, v) in enumerate(forward)]
    cache.advance(t)
    return outs


def _copy(src: Any, dst: Any) -> None:
    """Every layer's K/V of ``src`` into ``dst`` through read_kv / append_kv, in two pieces."""
    n = src.length_tokens
    for lo, hi in ((0, n // 3), (n // 3, n)):
        for layer in range(LAYERS):
            dst.append_kv(layer, *src.read_kv(layer, lo, hi))
        dst.advance(hi - lo)


def _budgets(cap: int) -> dict[str, Any]:
    """A device holding 12 slots of 32 tokens per layer (smaller chunks: more) beside the chunk index and
    key codes, a host holding 6."""
    slot, codes = 2 * HKV * 32 * D * 4, 2 * HKV * (cap + 16) * D // 4    # key codes: D/4 bytes per key
    return dict(kv_device_bytes=LAYERS * (12 * slot + 2 * 2 * HKV * D * 4 * -(-cap // 16) + codes),
                kv_host_bytes=LAYERS * 6 * slot)


@pytest.mark.parametrize("policy", [Policy(kv="exact"), Policy(kv="sparse", kv_budget=96, chunk_tokens=16),
                                    Policy(kv="sparse", kv_budget=256, kv_sketch=True),   # 256: 8 chunks of 32
                                    Policy(kv="exact", kv_quant="int8"),
                                    # without key codes: a copy re-encodes them from the int8-approximate keys
                                    Policy(kv="sparse", kv_budget=96, chunk_tokens=16, kv_quant="int8",
                                           kv_sketch=False)],
                         ids=["exact-adaptive", "sparse", "sparse-codes-adaptive", "exact-int8", "sparse-int8"])
def test_a_copy_through_read_kv_and_append_kv_decodes_like_the_original(policy: Policy, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, g = _cfg(), torch.Generator().manual_seed(0)
    cap = sum(PROMPT) + 8
    selections: dict[int, list[torch.Tensor]] = {}
    real_select = sparse_mod.select

    def spy(st: Any, kv: Any, q0: torch.Tensor) -> Any:
        sel = real_select(st, kv, q0)
        selections.setdefault(id(st), []).append(sel.mask.clone())
        return sel

    monkeypatch.setattr(sparse_mod, "select", spy)
    with KVWorkers("cpu") as workers:
        a = TieredKVCache(cfg, policy, 2, cap, torch.float32, "cpu", offload_dir=tmp_path, workers=workers,
                          **_budgets(cap))
        fed = [_forward(g, t, skewed=True) for t in PROMPT]
        for forward in fed:
            _attend(a, forward)
        st = a.stats()
        assert st["device_bytes"] and st["host_bytes"] and st["disk_bytes"], "the prompt spans three tiers"
        geometry = json.loads(json.dumps(a.geometry()))           # JSON-able
        if policy.chunk_tokens is None:
            assert len(set(geometry["chunk_tokens"])) == 2, geometry
        # read_kv returns what was stored, from any tier: exactly, or within int8 codes' half step
        # (1/510 of a channel's or token's range: < 0.02 for these unit-scale keys with a few 6.0 spikes)
        atol = 0 if policy.kv_quant == "none" else 0.02
        for layer in range(LAYERS):
            k, v = a.read_kv(layer, 0, a.length_tokens)
            torch.testing.assert_close(k, torch.cat([f[layer][1] for f in fed], 2), rtol=0, atol=atol)
            torch.testing.assert_close(v, torch.cat([f[layer][2] for f in fed], 2), rtol=0, atol=atol)
        b = make_kv_cache(cfg, policy, 2, cap, torch.float32, "cpu", offload_dir=tmp_path, workers=workers,
                          geometry=geometry, **_budgets(cap))
        assert isinstance(b, TieredKVCache)
        _copy(a, b)
        assert b.geometry()["chunk_tokens"] == geometry["chunk_tokens"] and b.length_tokens == a.length_tokens
        assert b.check_invariants() == a.check_invariants()
        assert b.stats()["disk_bytes"] > 0 and b.stats()["host_bytes"] > 0, "the copy spilled on the append path"
        before = {id(a._st): len(selections.get(id(a._st), [])), id(b._st): len(selections.get(id(b._st), []))}
        for _ in range(5):
            forward = _forward(g, 1, skewed=False)
            for x, y in zip(_attend(a, forward), _attend(b, forward)):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        if policy.kv == "sparse":
            sel_a = selections[id(a._st)][before[id(a._st)]:]
            sel_b = selections[id(b._st)][before[id(b._st)]:]
            assert len(sel_a) == len(sel_b) == 5 * LAYERS
            assert all(torch.equal(x, y) for x, y in zip(sel_a, sel_b))
            assert a.stats()["selected_fraction"] < (0.5 if policy.chunk_tokens else 0.75)
        a.close()
        b.close()


def test_dense_copy_out_and_in_and_its_geometry(tmp_path: Path) -> None:
    cfg, g = _cfg(), torch.Generator().manual_seed(1)
    a = DenseKVCache(cfg, 2, 600, torch.float32, torch.device("cpu"))
    fed = [_forward(g, t, skewed=False) for t in (200, 100)]
    for forward in fed:
        _attend(a, forward)
    assert a.geometry() == {"kind": "dense"}
    b = make_kv_cache(cfg, Policy(kv="exact"), 2, 600, torch.float32, "cpu", geometry=a.geometry())
    assert isinstance(b, DenseKVCache)
    _copy(a, b)
    k, v = b.read_kv(1, 50, 250)
    torch.testing.assert_close(k, torch.cat([f[1][1] for f in fed], 2)[:, :, 50:250], rtol=0, atol=0)
    # a tiered cache can take a dense cache's K/V too (chunk sizes are then the policy's or the default,
    # within the 600-token capacity's cap of 600 // 16 -> 32)
    with TieredKVCache(cfg, Policy(kv="exact"), 2, 600, torch.float32, "cpu") as c:
        _copy(a, c)
        assert c.stats()["chunk_tokens"] == [chunk_tokens_for(Policy(kv="exact"), 600, None)] * 2 == [32, 32]
        forward = _forward(g, 1, skewed=False)
        for x, y in zip(_attend(a, forward), _attend(c, forward)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_a_geometry_that_does_not_match_the_model_is_refused() -> None:
    with pytest.raises(ValueError, match="not a tiered cache's geometry for 2 layers"):
        TieredKVCache(_cfg(), Policy(kv="exact"), 1, 100, torch.float32, "cpu",
                      geometry={"kind": "tiered", "chunk_tokens": [16], "sketch": False})
