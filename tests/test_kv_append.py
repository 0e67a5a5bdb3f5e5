"""The tiered cache's append path, per piece: any split of the same tokens into pieces gives the same
chunk index (abstracts, key codes, sizes), K/V, placement and disk records as one token-exact reference.

A prefill piece closes many chunks at once (``pipeline.kv.append``): one ``piece_abstract`` for the
chunks it reaches, then waves of chunks placed, written, coded (``encode_keys`` over all of a wave's
closed chunks) and written behind together. These tests feed the same K/V in odd pieces (single
tokens, pieces ending inside a chunk, chunks straddling pieces, pieces longer than the device slots
hold) and compare with the whole sequence's abstracts from ``chunk_abstract_ref`` and its codes
made chunk by chunk.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from pathlib import Path
from typing import Any

import pytest
import torch

from tierkv.config import ModelConfig, Policy
from tierkv.kernels import chunk_abstract, encode_keys
from tierkv.kernels._select import HAS_TRITON
from tierkv.kernels.abstract import piece_abstract
from tierkv.kernels.reference import chunk_abstract_ref
from tierkv.pipeline.kv import TieredKVCache
from tierkv.pipeline.kv.sizing import layer_index_bytes, slot_bytes
from tierkv.pipeline.kv.table import Tier

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
B, HQ, HKV, D, LAYERS, S = 2, 4, 2, 20, 2, 16          # D = 20: the codes' last byte holds padding channels
SPLITS = {
    "one pass": [700],
    "chunk by chunk": [S] * (700 // S) + [700 % S],
    "odd pieces": [1, 7, 33, 64, 130, 5, 1, 1, 200, 17, 241],
    "straddling": [S - 3, 2 * S + 6, 1, S - 4, 5 * S + 1, 700 - (9 * S + 1)],
}


def _pieces(sizes: list[int], total: int) -> list[tuple[int, int]]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    assert sum(sizes) == total
    return [(a, a + n) for a, n in zip(starts, sizes) if n]


# -- kernels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", list(SPLITS))
def test_piece_abstract_over_any_split_equals_the_whole_sequence(backend: str, dtype: torch.dtype,
                                                                 split: str) -> None:
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(B, HKV, 700, D, generator=g).to(dtype)
    C = -(-700 // S)
    kmin = torch.full((B, HKV, C + 2, D), float("nan"), dtype=dtype)   # chunks past the keys stay untouched
    kmax = kmin.clone()
    for a, z in _pieces(SPLITS[split], 700):
        piece_abstract(kmin, kmax, keys[:, :, a:z], a // S, a % S, S, backend=backend)
    ref_min, ref_max = chunk_abstract_ref(keys, torch.arange(0, 700, S))
    assert torch.equal(kmin[:, :, :C], ref_min) and torch.equal(kmax[:, :, :C], ref_max)   # min/max are exact
    assert kmin[:, :, C:].isnan().all() and kmax[:, :, C:].isnan().all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_piece_abstract_reads_strided_keys(backend: str) -> None:
    keys = torch.randn(2, 50, 3, 24).transpose(1, 2)                  # (B, H, T, D) view of (B, T, H, D)
    kmin, kmax = torch.zeros(2, 3, 5, 24), torch.zeros(2, 3, 5, 24)
    piece_abstract(kmin, kmax, keys[:, :, :9], 0, 0, 16, backend=backend)
    piece_abstract(kmin, kmax, keys[:, :, 9:], 0, 9, 16, backend=backend)
    ref = chunk_abstract(keys.contiguous(), torch.tensor([0, 16, 32, 48]), backend="torch")
    assert torch.equal(kmin[:, :, :4], ref[0]) and torch.equal(kmax[:, :, :4], ref[1])


@pytest.mark.parametrize("args,error,match", [
    (dict(fill=16), ValueError, "fill"),
    (dict(first=3), IndexError, "reaches chunk 4"),
    (dict(keys=torch.zeros(2, 3, 0, 8)), ValueError, "T>=1"),
    (dict(keys=torch.zeros(2, 3, 5, 7)), ValueError, "keys must be"),
])
def test_piece_abstract_rejects_pieces_that_do_not_fit(args: dict[str, Any], error: type, match: str) -> None:
    call = dict(keys=torch.zeros(2, 3, 20, 8), first=0, fill=0, chunk_tokens=16) | args
    with pytest.raises(error, match=match):
        piece_abstract(torch.zeros(2, 3, 4, 8), torch.zeros(2, 3, 4, 8), **call)


def test_encode_keys_of_many_chunks_equals_chunk_by_chunk() -> None:
    g = torch.Generator().manual_seed(2)
    pool = torch.randn(9, HKV, S, D, generator=g)                     # (N, Hkv, S, D) slots, as in the cache
    slots = torch.tensor([[4, 0, 7], [2, 8, 5]])                        # (B, n): 3 chunks per sequence
    keys = pool[slots].transpose(1, 2)                                  # (B, Hkv, n, S, D), not contiguous
    kmin, kmax = keys.amin(3), keys.amax(3)
    kmin[0, 1, 2, 3] = kmax[0, 1, 2, 3] = keys[0, 1, 2, 0, 3]           # a channel of zero width
    together = encode_keys(keys, kmin, kmax)
    one_by_one = torch.cat([encode_keys(keys[:, :, c:c + 1].contiguous(), kmin[:, :, c:c + 1], kmax[:, :, c:c + 1])
                            for c in range(3)], dim=2)
    assert together.shape == (B, HKV, 3, S, (D + 3) // 4) and torch.equal(together, one_by_one)


# -- the cache -------------------------------------------------------------------------------


def _cfg() -> ModelConfig:
    return ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=16, hidden_size=HQ * D,
                                      intermediate_size=8, num_hidden_layers=LAYERS, num_attention_heads=HQ,
                                      num_key_value_heads=HKV, max_position_embeddings=8192))


def _cache(tmp: Path, capacity: int, slots: int, kv_quant: str = "none") -> TieredKVCache:
    """Sparse tiered cache with key codes, chunks of S, ``slots`` chunk slots per layer on the device and
    room for 6 chunks per layer on the host: the rest of a long prompt goes to disk."""
    cfg = _cfg()
    policy = Policy(kv="sparse", chunk_tokens=S, kv_sketch=True, kv_quant=kv_quant)
    index = layer_index_bytes(cfg, torch.float32, B, capacity, S, sketch=True)
    device = LAYERS * (slots * slot_bytes(cfg, torch.float32, S) + index)
    host = LAYERS * 6 * slot_bytes(cfg, torch.float32, S)
    return TieredKVCache(cfg, policy, B, capacity, torch.float32, "cpu", kv_device_bytes=device,
                         kv_host_bytes=host, offload_dir=tmp)


def _feed(cache: TieredKVCache, k: torch.Tensor, v: torch.Tensor, sizes: list[int]) -> None:
    """append_kv every layer's K/V (LAYERS, B, Hkv, T, D) in pieces of ``sizes`` tokens."""
    for a, z in _pieces(sizes, k.shape[3]):
        for layer in range(LAYERS):
            cache.append_kv(layer, k[layer][:, :, a:z], v[layer][:, :, a:z])
        cache.advance(z - a)


def _index(cache: TieredKVCache, layer: int) -> dict[str, Any]:
    kv = cache._st.layers[layer]
    assert kv is not None
    table = kv.table
    return {"kmin": kv.kmin, "kmax": kv.kmax, "codes": kv.codes, "centre": kv.centre, "axes2": kv.axes2,
            "sizes": kv.chunk_sizes, "coded": kv.n_coded,
            "chunks": kv.n_chunks, "tiers": {key: table.tier_of(key) for key in table.keys()}}


@pytest.mark.usefixtures("torch_kernels_one_thread")
@pytest.mark.parametrize("kv_quant", ["none", "int8"])
def test_any_split_into_pieces_gives_the_same_index_kv_and_placement(tmp_path: Path, kv_quant: str) -> None:
    g = torch.Generator().manual_seed(3)
    T = 700
    k = torch.randn(LAYERS, B, HKV, T, D, generator=g)
    v = torch.randn(LAYERS, B, HKV, T, D, generator=g)
    C = -(-T // S)
    seen: dict[str, list[dict[str, Any]]] = {}
    for name, sizes in SPLITS.items():
        with _cache(tmp_path / name.replace(" ", "-"), T + 8, slots=14, kv_quant=kv_quant) as cache:
            assert cache._st.layers[0] is None
            _feed(cache, k, v, sizes)
            kv0 = cache._st.layers[0]
            assert kv0 is not None and kv0.geo.resident_slots < 130 // S * B   # pieces outgrow the device slots
            seen[name] = [_index(cache, layer) for layer in range(LAYERS)]
            assert cache.check_invariants() == LAYERS * B * C
            tiers = {t for layer in seen[name] for t in layer["tiers"].values()}
            assert tiers == {Tier.DEVICE, Tier.HOST, Tier.DISK}
            for layer in range(LAYERS):
                got_k, got_v = cache.read_kv(layer, 0, T)
                if kv_quant == "none":
                    assert torch.equal(got_k, k[layer]) and torch.equal(got_v, v[layer])
                else:
                    seen[name][layer]["kv"] = (got_k, got_v)
                    torch.testing.assert_close(got_k, k[layer], rtol=0, atol=0.05)
    for layer in range(LAYERS):
        ref = seen["one pass"][layer]
        ref_min, ref_max = chunk_abstract_ref(k[layer], torch.arange(0, T, S))
        assert torch.equal(ref["kmin"][:, :, :C], ref_min) and torch.equal(ref["kmax"][:, :, :C], ref_max)
        closed = T // S
        keys = k[layer][:, :, :closed * S].reshape(B, HKV, closed, S, D)
        codes = torch.cat([encode_keys(keys[:, :, c:c + 1], ref_min[:, :, c:c + 1], ref_max[:, :, c:c + 1])
                           for c in range(closed)], dim=2)
        assert ref["coded"] == closed and torch.equal(ref["codes"][:, :, :closed], codes)
        assert ref["centre"] is None and ref["axes2"] is None       # 16-token chunks keep no key ellipsoids
        assert ref["sizes"][:C].tolist() == [S] * closed + [T % S]
        for name in SPLITS:
            got = seen[name][layer]
            for key in ("kmin", "kmax", "codes", "sizes"):
                assert torch.equal(got[key], ref[key]), (name, key)
            assert (got["coded"], got["chunks"]) == (ref["coded"], ref["chunks"]), name
            if name == "chunk by chunk" or name == "one pass":   # whole waves evict what one chunk at a time did
                assert got["tiers"] == seen["chunk by chunk"][layer]["tiers"], name
            if kv_quant != "none":
                for a, b in zip(got["kv"], seen["chunk by chunk"][layer]["kv"]):
                    assert torch.equal(a, b), name


@pytest.mark.usefixtures("torch_kernels_one_thread")
def test_chunks_written_behind_in_one_batch_hold_their_own_kv_and_abstracts(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(4)
    T = 400
    k = torch.randn(LAYERS, B, HKV, T, D, generator=g)
    v = torch.randn(LAYERS, B, HKV, T, D, generator=g)
    with _cache(tmp_path, T, slots=14) as cache:
        _feed(cache, k, v, [T])
        st = cache._st
        assert st.store is not None
        for layer in range(LAYERS):
            kv = st.layers[layer]
            assert kv is not None
            written = [key for key in kv.table.keys() if key in st.store]
            assert len(written) > 2 * B, "the prompt's closed chunks are written behind"
            for key, rec in zip(written, st.store.read(written)):
                rows = slice(key.chunk * S, (key.chunk + 1) * S)
                assert torch.equal(rec.k, k[layer][key.seq, :, rows]) and torch.equal(rec.v, v[layer][key.seq, :, rows])
                assert torch.equal(rec.kmin, kv.kmin[key.seq, :, key.chunk])
                assert torch.equal(rec.kmax, kv.kmax[key.seq, :, key.chunk])
