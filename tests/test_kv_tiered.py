"""The tiered, chunked KV cache: lossless exact mode over device/host/disk, sparse selection,
adaptive chunk sizes, speculation, and clear errors for full or corrupt offload dirs.

Most cases run the torch references of the kernels (fast on a CPU); one engine-level sparse case
runs the Triton kernels through the interpreter. Until the engine calls ``make_kv_cache`` itself,
engine-level cases swap ``tierkv.engine.DenseKVCache`` for a factory of the cache under test.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import tierkv
from tierkv.config import ModelConfig, Policy
from tierkv.engine import Engine
from tierkv.kvroom import KVRoom
from tierkv.runner import Runner
from tierkv.io.kvstore import KVStoreError
from tierkv.pipeline.kv import (DenseKVCache, TieredKVCache, keeps_sketch, kv_budget_tokens, kv_bytes_per_token,
                                kv_device_minimum_bytes, layer_index_bytes, make_kv_cache)
from tierkv.pipeline.kv.moves import poll_writes
from tierkv.pipeline.kv.overflow import overflow_order
from tierkv.pipeline.kv.sizing import slot_bytes
from tierkv.pipeline.kv.table import KVBudgetError, Tier

B, HQ, HKV, D, LAYERS = 2, 4, 2, 16, 2
DEVICE, HOST, DISK = Tier.DEVICE, Tier.HOST, Tier.DISK


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny tensors: one intra-op thread is much faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERKV_KERNELS", "torch")


def _cfg(layers: int = LAYERS) -> ModelConfig:
    return ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=16, hidden_size=HQ * D,
                                      intermediate_size=8, num_hidden_layers=layers, num_attention_heads=HQ,
                                      num_key_value_heads=HKV, max_position_embeddings=8192))


def _device_bytes(cfg: ModelConfig, chunk: int, slots: int, batch: int, capacity: int, policy: Policy) -> int:
    """A device KV budget holding ``slots`` chunk slots per layer beside the abstracts (and key codes)."""
    slot = slot_bytes(cfg, torch.float32, chunk)
    index = layer_index_bytes(cfg, torch.float32, batch, capacity, chunk, keeps_sketch(policy))
    return cfg.num_layers * (slots * slot + index)


def _host_bytes(cfg: ModelConfig, chunk: int, chunks: int) -> int:
    return cfg.num_layers * chunks * slot_bytes(cfg, torch.float32, chunk)


def _tiered(cfg: ModelConfig, policy: Policy, capacity: int, tmp: Path, *, slots: int = 12, host_chunks: int = 6,
            batch: int = B, **kw: Any) -> TieredKVCache:
    chunk = policy.chunk_tokens or 16
    return TieredKVCache(cfg, policy, batch, capacity, torch.float32, "cpu",
                         kv_device_bytes=_device_bytes(cfg, chunk, slots, batch, capacity, policy),
                         kv_host_bytes=_host_bytes(cfg, chunk, host_chunks), offload_dir=tmp, **kw)


def _drive(caches: list[Any], pieces: list[int], windows: tuple[int | None, ...] = (None, None), seed: int = 0,
           make: Callable[[int, int, int], tuple[torch.Tensor, ...]] | None = None,
           check: Callable[..., None] | None = None) -> list[list[torch.Tensor]]:
    """Feed the same random q/k/v pieces (prefill pieces, then 1-token steps) to every cache."""
    g = torch.Generator().manual_seed(seed)
    outs: list[list[torch.Tensor]] = [[] for _ in caches]
    start = caches[0].length_tokens
    for t in pieces:
        pos = torch.arange(start, start + t)[None].expand(B, t)
        for layer in range(len(windows)):
            q, k, v = make(layer, start, t) if make else (torch.randn(B, n, t, D, generator=g) for n in (HQ, HKV, HKV))
            for i, cache in enumerate(caches):
                outs[i].append(cache.attend(layer, q, k, v, pos, windows[layer]))
            if check is not None:
                check(*[o[-1] for o in outs])
        for cache in caches:
            cache.advance(t)
        start += t
    return outs


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def _close_int8(a: torch.Tensor, b: torch.Tensor) -> None:
    """Attention over chunks that came back from int8 host/disk codes: within 0.02 of exact (unit-scale
    random K/V; measured up to 0.005: per element the codes are off by at most half a step, 1/510 of
    a row's or channel's range)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0.02)


CLOSE = {"none": _close, "int8": _close_int8}
SAME = {"none": lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0), "int8": _close_int8}   # exact vs dense


PIECES = [300, 200, 45] + [1] * 6   # chunked prefill (ragged), then decode


@pytest.mark.parametrize("kv_quant", ["none", "int8"])
def test_exact_equals_dense_with_kv_on_all_three_tiers(tmp_path: Path, torch_kernels: None, kv_quant: str) -> None:
    cfg, cap = _cfg(), sum(PIECES)
    dense = DenseKVCache(cfg, B, cap, torch.float32, torch.device("cpu"))
    tiered = _tiered(cfg, Policy(kv="exact", chunk_tokens=32, kv_quant=kv_quant), cap, tmp_path)
    with tiered:
        _drive([dense, tiered], PIECES, windows=(None, 100), check=SAME[kv_quant])
        assert tiered.check_invariants() == LAYERS * B * math.ceil(tiered.length_tokens / 32)
        st = tiered.stats()
        assert st["device_bytes"] > 0 and st["host_bytes"] > 0 and st["disk_bytes"] > 0
        assert st["bytes_read_disk"] > 0 and st["bytes_read_per_step"] > 0 and st["streamed_chunks"] > 0
        assert st["chunk_tokens"] == [32, 32] and tiered.length_tokens == cap
    assert not any(tmp_path.iterdir()), "close() deletes the cache's offload files"


def test_sparse_full_budget_and_auto_below_threshold_equal_exact(tmp_path: Path, torch_kernels: None) -> None:
    cfg, cap = _cfg(), sum(PIECES)
    dense = DenseKVCache(cfg, B, cap, torch.float32, torch.device("cpu"))
    full = _tiered(cfg, Policy(kv="sparse", kv_budget=1.0, chunk_tokens=32), cap, tmp_path)
    exact = _tiered(cfg, Policy(kv="auto", kv_exact_max_tokens=cap, chunk_tokens=16), cap, tmp_path, slots=16)
    auto = _tiered(cfg, Policy(kv="auto", kv_exact_max_tokens=cap - 3, kv_budget=1.0, chunk_tokens=32), cap, tmp_path)
    with full, exact, auto:
        _drive([dense, full, exact, auto], PIECES, check=lambda a, *others: [_close(a, o) for o in others])
        assert full.stats()["sparse_layer_steps"] == 6 * LAYERS and full.stats()["selected_fraction"] == 1.0
        assert exact.stats()["sparse_layer_steps"] == 0
        assert auto.stats()["sparse_layer_steps"] == 3 * LAYERS     # sparse once the context passed the threshold
        for cache, chunk in ((full, 32), (exact, 16), (auto, 32)):
            assert cache.check_invariants() == LAYERS * B * math.ceil(cache.length_tokens / chunk)


def _needle(layer: int, start: int, t: int, needle_at: int = 160) -> tuple[torch.Tensor, ...]:
    """Keys that all point away from the query except the tokens of one chunk (the needle)."""
    g = torch.Generator().manual_seed(start * 7 + layer)
    k = torch.randn(B, HKV, t, D, generator=g) * 0.1
    k[..., 0] = -2.0
    pos = torch.arange(start, start + t)
    hit = (pos >= needle_at) & (pos < needle_at + 16)
    k[:, :, hit, 0] = 3.0
    q = torch.randn(B, HQ, t, D, generator=g) * 0.1
    q[..., 0] = 16.0
    return q, k, torch.randn(B, HKV, t, D, generator=g)


@pytest.mark.parametrize("kv_quant", ["none", "int8"])
def test_sparse_fetches_the_important_chunk_from_disk_and_speculates(tmp_path: Path, torch_kernels: None,
                                                                     kv_quant: str) -> None:
    cfg, cap = _cfg(), 800
    pieces = [400, 390] + [1] * 5
    dense = DenseKVCache(cfg, B, cap, torch.float32, torch.device("cpu"))
    sparse = _tiered(cfg, Policy(kv="sparse", kv_budget=64, chunk_tokens=16, kv_quant=kv_quant), cap, tmp_path,
                     slots=16, host_chunks=4 if kv_quant == "none" else 1)   # int8: 1 slot of host budget holds 3
    with sparse:
        outs = _drive([dense, sparse], pieces, make=_needle)
        for exact, approx in zip(outs[0][-10:], outs[1][-10:]):   # decode: attention mass is in the needle
            CLOSE[kv_quant](exact, approx)
        st = sparse.stats()
        assert sparse.check_invariants() == LAYERS * B * math.ceil(sparse.length_tokens / 16)
    assert st["selected_fraction"] < 0.15 and st["estimator_s"] > 0
    assert st["bytes_read_disk"] > 0 and st["spec_fetched_chunks"] > 0
    assert st["spec_hit_rate"] is not None and st["spec_hit_rate"] > 0     # layer 1 reuses layer 0's needle


def test_sparse_union_overflowing_the_device_keeps_what_fits_and_streams_the_rest(tmp_path: Path,
                                                                                  torch_kernels: None) -> None:
    """The KV heads' selections together need more chunks than the device slots hold: the output is
    still attention over exactly the selected (chunk, head) pairs, bit for bit the all-resident cache's, the slots fill with needed chunks,
    and the stats say how large the union was and that it overflowed."""
    cfg, cap = _cfg(), 700
    pieces = [300, 300] + [1] * 6
    policy = Policy(kv="sparse", kv_budget=64, chunk_tokens=16)
    roomy = TieredKVCache(cfg, policy, B, cap, torch.float32, "cpu")         # every chunk stays resident
    tight = _tiered(cfg, policy, cap, tmp_path, slots=12, host_chunks=8)     # 8 resident slots per layer
    with roomy, tight:
        _drive([roomy, tight], pieces, check=lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0))
        assert tight.check_invariants() == LAYERS * B * math.ceil(tight.length_tokens / 16)
        st, full = tight.stats(), roomy.stats()
        last = tight._st.layers[LAYERS - 1]                 # untouched since its attend (speculation is for layer 0)
        assert len(last.resident()) == last.geo.resident_slots and set(last.resident()) <= set(last.prev_needed)
        assert len(last.prev_needed) > last.geo.resident_slots
    assert st["sparse_overflow_steps"] == 6 * LAYERS and full["sparse_overflow_steps"] == 0
    assert st["sparse_union_tokens"] == full["sparse_union_tokens"] > st["device_room_tokens"][0] == 64
    assert st["selected_fraction"] == full["selected_fraction"] < 0.5
    assert st["bytes_read_disk"] > 0 and st["bytes_read_host"] > 0 and st["streamed_chunks"] > 0


def test_overflow_keeps_resident_then_most_heads_then_disk_chunks(tmp_path: Path, torch_kernels: None) -> None:
    cfg, cap = _cfg(), 400
    cache = _tiered(cfg, Policy(kv="sparse", kv_budget=64, chunk_tokens=16), cap, tmp_path, slots=12, host_chunks=4)
    with cache:
        _drive([cache], [cap - 10])
        kv = cache._st.layers[0]
        on = {tier: [k for k in kv.table.chunks(0, 1) if kv.table.tier_of(k) is tier] for tier in (DEVICE, HOST, DISK)}
        resident, host, disk = on[DEVICE][0], on[HOST][:2], on[DISK][:2]
        picked = {host[0]: 0b11, host[1]: 0b01, disk[0]: 0b01, disk[1]: 0b11, resident: 0b01}
        assert overflow_order(kv, picked) == [resident, disk[1], host[0], disk[0], host[1]]


def test_adaptive_chunk_sizes_follow_attention_skew(tmp_path: Path, torch_kernels: None) -> None:
    cfg, cap = _cfg(), 4096          # a capacity of 16 chunks of 256 tokens or more lets a flat layer take 256

    def skewed(layer: int, start: int, t: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(start)
        k = torch.randn(B, HKV, t, D, generator=g)
        if layer == 0:
            q = torch.zeros(B, HQ, t, D)              # flat attention -> large chunks
        else:
            q = torch.full((B, HQ, t, D), 3.0)        # a few keys dominate -> small chunks
            k[:, :, ::97] = 6.0
        return q, k, torch.randn(B, HKV, t, D, generator=g)

    dense = DenseKVCache(cfg, B, cap, torch.float32, torch.device("cpu"))
    adaptive = TieredKVCache(cfg, Policy(kv="exact"), B, cap, torch.float32, "cpu")
    with adaptive:
        _drive([dense, adaptive], [600, 1, 1], make=skewed, check=_close)
        st = adaptive.stats()
    assert st["chunk_tokens"] == [256, 16]
    assert st["attention_entropy"][0] > 0.9 > 0.5 > st["attention_entropy"][1]


def test_adaptive_sizes_ignore_the_device_budget_and_a_budget_below_every_size_is_refused(tmp_path: Path,
                                                                                           torch_kernels: None) -> None:
    """Flat attention asks for large chunks; a device budget that would hold more slots of smaller ones
    does not shrink them (sizes never follow the budget): the cache is refused when it is built,
    naming the minimum at the largest size it may choose, and at that minimum it takes that size."""
    cfg, cap = _cfg(), 2000                     # adaptive sizes here: 16..64 (2000 holds 16 chunks of 64 tokens)
    budget = _device_bytes(cfg, 32, 12, B, cap, Policy(kv="exact"))   # 12 slots of 32 tokens, only 6 of 64
    with pytest.raises(KVBudgetError, match="of 64 tokens .* the adaptive size that needs the most room") as err:
        TieredKVCache(cfg, Policy(kv="exact"), B, cap, torch.float32, "cpu", kv_device_bytes=budget,
                      offload_dir=tmp_path)
    named = int(re.search(r"\((\d+) bytes\)", str(err.value)).group(1))  # type: ignore[union-attr]
    cache = TieredKVCache(cfg, Policy(kv="exact"), B, cap, torch.float32, "cpu", kv_device_bytes=named,
                          offload_dir=tmp_path)
    with cache:
        _drive([cache], [300, 1], make=lambda j, s, t: (torch.zeros(B, HQ, t, D), torch.randn(B, HKV, t, D),
                                                        torch.randn(B, HKV, t, D)))
        assert cache.stats()["chunk_tokens"] == [64, 64]   # flat attention: the largest size, not a fitted one


def test_factory_picks_dense_or_tiered(tmp_path: Path) -> None:
    cfg, dt = _cfg(), torch.float32
    need = kv_bytes_per_token(cfg, dt) * B * 1000
    assert need == 2 * LAYERS * HKV * D * 4 * B * 1000
    assert isinstance(make_kv_cache(cfg, Policy(kv="exact"), B, 1000, dt, "cpu"), DenseKVCache)
    assert isinstance(make_kv_cache(cfg, Policy(kv="auto"), B, 1000, dt, "cpu", kv_device_bytes=need), DenseKVCache)
    for policy, kw in [(Policy(kv="sparse"), {}), (Policy(kv="auto", kv_exact_max_tokens=500), {}),
                       (Policy(kv="exact"), dict(kv_device_bytes=need // 2, offload_dir=tmp_path))]:
        cache = make_kv_cache(cfg, policy, B, 1000, dt, "cpu", **kw)
        assert isinstance(cache, TieredKVCache)
        cache.close()


def test_budget_errors_name_the_fix(tmp_path: Path) -> None:
    cfg = _cfg()
    plain, coded = Policy(chunk_tokens=32, kv_sketch=False), Policy(chunk_tokens=32, kv_sketch=True)
    with pytest.raises(KVBudgetError, match="needs at least 12 per layer.*raise --device-mem"):
        TieredKVCache(cfg, plain, B, 1000, torch.float32, "cpu",
                      kv_device_bytes=_device_bytes(cfg, 32, 11, B, 1000, plain), offload_dir=tmp_path)
    # the key codes are dropped (and the stats say why) before the budget is refused
    with TieredKVCache(cfg, coded, B, 1000, torch.float32, "cpu",
                       kv_device_bytes=_device_bytes(cfg, 32, 12, B, 1000, plain), offload_dir=tmp_path) as cache:
        assert cache.stats()["sketch"].startswith("off: the key codes do not fit")
    with TieredKVCache(cfg, coded, B, 1000, torch.float32, "cpu",
                       kv_device_bytes=_device_bytes(cfg, 32, 12, B, 1000, coded), offload_dir=tmp_path) as cache:
        assert cache.stats()["sketch"] == "on"
    with TieredKVCache(cfg, Policy(chunk_tokens=32), B, 1000, torch.float32, "cpu",
                       kv_device_bytes=_device_bytes(cfg, 32, 12, B, 1000, coded), offload_dir=tmp_path) as cache:
        assert cache.stats()["sketch"] == "on"   # the default, CPU included
    with pytest.raises(KVBudgetError, match="give an offload dir"):
        TieredKVCache(cfg, Policy(chunk_tokens=32), B, 1000, torch.float32, "cpu",
                      kv_device_bytes=_device_bytes(cfg, 32, 12, B, 1000, Policy()), kv_host_bytes=0)
    assert kv_budget_tokens(0.05, 1000) == 50 and kv_budget_tokens(1.0, 999) == 999 and kv_budget_tokens(64, 10) == 64


def test_full_offload_dir_stops_with_a_clear_error_and_a_consistent_cache(tmp_path: Path, torch_kernels: None) -> None:
    cfg, cap = _cfg(), 700
    cache = _tiered(cfg, Policy(kv="exact", chunk_tokens=32), cap, tmp_path, offload_bytes=4 * 12288)
    with cache:
        full = r"offload dir .* full after .* MiB of KV.*free space or lower the context"
        with pytest.raises(KVStoreError, match=full):
            _drive([cache], [300, 300, 1, 1])
        assert cache.check_invariants() > 0     # every chunk is where the table says; nothing half-moved
        st = cache.stats()
        assert st["disk_file_bytes"] <= 4 * 12288


def test_corrupt_segment_is_detected_and_named(tmp_path: Path, torch_kernels: None) -> None:
    cfg, cap = _cfg(), 600
    cache = _tiered(cfg, Policy(kv="exact", chunk_tokens=32), cap, tmp_path)
    with cache:
        _drive([cache], [500])
        poll_writes(cache._st, wait=True)
        segment = next(tmp_path.glob("kv-*/layer0000.kvseg"))
        data = bytearray(segment.read_bytes())
        for off in range(0, len(data), 4096):         # flip a byte in every record's payload
            if data[off:off + 4] == b"TKVC":
                data[off + 1024] ^= 0xFF
        segment.write_bytes(bytes(data))
        with pytest.raises(KVStoreError, match="checksum") as err:
            _drive([cache], [1], seed=1)
        assert "layer0000.kvseg" in str(err.value)
        assert cache.check_invariants() == LAYERS * B * math.ceil(500 / 32)


def test_check_invariants_catches_a_leaked_slot_and_refuses_a_closed_cache(tmp_path: Path,
                                                                            torch_kernels: None) -> None:
    """The checker is only worth its calls if it can fail: a slot both used and free trips it, and after
    close() (which empties the layers) it refuses to run instead of passing over nothing."""
    cfg = _cfg()
    cache = _tiered(cfg, Policy(kv="exact", chunk_tokens=32), 400, tmp_path)
    with cache:
        _drive([cache], [300])
        assert cache.check_invariants() == LAYERS * B * math.ceil(300 / 32)
        kv = cache._st.layers[0]
        kv.free.append(kv.slot_of(kv.resident()[0]))         # a used slot handed out again
        with pytest.raises(AssertionError, match="layer 0: slots leak"):
            cache.check_invariants()
        kv.free.pop()
        sink = kv.resident()[0]
        kv.slot_map[sink.seq, sink.chunk] += 1               # the kernel's slot map disagrees with the table
        with pytest.raises(AssertionError, match="slot map says"):
            cache.check_invariants()
        kv.slot_map[sink.seq, sink.chunk] -= 1
        on_host = kv.table.on_tier(HOST)[0]
        kv.host_free.append(kv.table.host_slot_of(on_host))  # a host buffer in use handed out again
        with pytest.raises(AssertionError, match="layer 0: host buffers leak"):
            cache.check_invariants()
        kv.host_free.pop()
        assert cache.check_invariants() == LAYERS * B * math.ceil(300 / 32)
    with pytest.raises(RuntimeError, match=r"closed TieredKVCache checks nothing: call it before close\(\)"):
        cache.check_invariants()


# -- through the engine -------------------------------------------------------------------------


def _generate(model_dir: Path, policy: Policy, prompts: list[list[int]], factory: Callable[..., Any] | None,
              monkeypatch: pytest.MonkeyPatch, new_tokens: int = 6) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """Token ids per prompt, and the KV stats of each generation that used a cache ``factory`` made.
    Each such cache's invariants are checked when the engine closes it (while it still holds the
    generation's chunks), and must have covered every chunk of its context."""
    made: list[Any] = []
    checked: list[tuple[int, int]] = []                # (chunks checked, chunks expected) per cache

    def build(room: KVRoom, capacity: int, device_bytes: int | None, host_bytes: int | None,
              geometry: dict[str, Any] | None = None) -> Any:
        cache = factory(room.cfg, 1, capacity, room.dtype, room.device)  # type: ignore[misc]
        close = cache.close

        def check_then_close() -> None:
            if not cache.closed:
                sizes = cache.stats()["chunk_tokens"]
                expected = sum(math.ceil(cache.length_tokens / size) for size in sizes)   # one sequence per cache
                checked.append((cache.check_invariants(), expected))
            close()

        cache.close = check_then_close
        made.append(cache)
        return cache

    with monkeypatch.context() as patch:
        if factory is not None:
            patch.setattr(KVRoom, "make_cache", build)
        with Engine(model_dir, policy) as engine:
            outs = engine.generate(prompts, max_new_tokens=new_tokens)
    assert len(checked) == len(made), "the engine closes each cache when its generation ends"
    assert all(n == expected > 0 for n, expected in checked), checked
    stats = list({id(o.stats): o.stats.kv for o in outs}.values()) if factory is not None else []
    return [o.token_ids for o in outs], stats


def _spilling(policy: Policy, tmp: Path, slots: int = 8, host_chunks: int = 6,
              chunk: int = 32) -> Callable[..., TieredKVCache]:
    """A cache factory whose device and host hold a few chunks of ``chunk`` tokens per sequence and layer."""
    def build(cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> TieredKVCache:
        return TieredKVCache(cfg, policy, batch, capacity, dtype, device,
                             kv_device_bytes=_device_bytes(cfg, chunk, slots * batch, batch, capacity, policy),
                             kv_host_bytes=_host_bytes(cfg, chunk, host_chunks * batch), offload_dir=tmp)
    return build


@pytest.fixture(scope="module")
def long_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama (GQA) and a Mistral with a 300-token sliding window, both with room for long prompts."""
    from conftest import build_hf_model, save_hf_model
    return {arch: save_hf_model(build_hf_model(arch, max_position_embeddings=4096, **kw),
                                tmp_path_factory.mktemp(f"long-{arch}"))
            for arch, kw in (("llama", {}), ("mistral", dict(sliding_window=300)))}


def _prompts(n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 211, (length,), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("arch, batch, chunk_tokens, kv_quant", [("llama", 2, 32, "none"), ("mistral", 1, None, "none"),
                                                                ("llama", 2, 32, "int8")])
def test_engine_exact_tiered_is_lossless(long_models: dict[str, Path], tmp_path: Path, torch_kernels: None,
                                         monkeypatch: pytest.MonkeyPatch, arch: str, batch: int,
                                         chunk_tokens: int | None, kv_quant: str) -> None:
    """Greedy tokens of the tiered cache (KV on device, host and disk) equal the resident engine's
    (with int8 chunks on host and disk too: the same tokens on these models)."""
    model, prompts = long_models[arch], _prompts(batch, 1500)
    policy = Policy(prefill_chunk_tokens=512, kv="exact", chunk_tokens=chunk_tokens, kv_quant=kv_quant)
    dense, _ = _generate(model, policy, prompts, None, monkeypatch)
    host_chunks = 6 if kv_quant == "none" else 2       # int8 chunks: a host budget of 2 exact chunks holds 7
    spilling = _spilling(policy, tmp_path, chunk=chunk_tokens or 64, host_chunks=host_chunks)
    tiered, made = _generate(model, policy, prompts, spilling, monkeypatch)
    assert tiered == dense
    st = made[0]
    assert st["disk_bytes"] > st["host_bytes"] > 0 and st["device_bytes"] > 0
    if chunk_tokens is None:
        assert all(size is not None and size <= 64 for size in st["chunk_tokens"])   # adaptive, within 1505 // 16
    sparse_policy = Policy(prefill_chunk_tokens=512, kv="sparse", kv_budget=1.0, chunk_tokens=chunk_tokens,
                           kv_quant=kv_quant)
    sparse, made = _generate(model, sparse_policy, prompts,
                             _spilling(sparse_policy, tmp_path, chunk=chunk_tokens or 64, host_chunks=host_chunks),
                             monkeypatch)
    assert sparse == dense
    if arch == "llama":   # every chunk selected, more than the device holds: each sparse step overflows
        assert made[0]["sparse_overflow_steps"] == made[0]["sparse_layer_steps"] > 0


def test_engine_sparse_small_budget_with_triton_kernels(long_models: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from tierkv.kernels._select import HAS_TRITON, pick_backend
    from tierkv.kernels.importance import _chunk_scores_kernel
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    assert pick_backend(_chunk_scores_kernel, torch.zeros(1)) == "triton"   # the interpreter runs the kernels
    policy = Policy(prefill_chunk_tokens=512, kv="sparse", kv_budget=0.1, chunk_tokens=32)
    tokens, made = _generate(long_models["llama"], policy, _prompts(1, 1200), _spilling(policy, tmp_path, slots=16),
                             monkeypatch, new_tokens=4)
    assert len(tokens[0]) == 4
    st = made[0]
    assert 0 < st["selected_fraction"] < 0.2 and st["estimator_s"] > 0 and st["sparse_layer_steps"] == 3 * LAYERS
    assert st["disk_bytes"] > 0 and st["spec_hit_rate"] is not None and st["decode_steps"] == 3


@pytest.mark.parametrize("kv_quant", ["none", "int8"])
def test_budgets_through_load_spill_kv_and_stay_lossless(long_models: dict[str, Path], tmp_path: Path,
                                                         torch_kernels: None, kv_quant: str) -> None:
    """The public path: tierkv.load budgets -> the plan's KV room -> a cache over all three tiers
    (with int8 host/disk chunks: the same greedy tokens on this model, fewer bytes moved)."""
    from tierkv.plan import make_plan, reserve_bytes

    model, prompt = long_models["llama"], _prompts(1, 1500)[0]
    with tierkv.load(model, device="cpu", kv="exact") as eng:
        dense = eng.generate(prompt, max_new_tokens=6)
        cfg = eng.config
    policy = Policy(dtype="float32", device="cpu", kv="exact", chunk_tokens=32, kv_device_tokens=256,
                    prefill_chunk_tokens=512)                     # a fixed piece: the reserve does not follow the budget
    roomy = make_plan(cfg, tierkv.Budget(), policy)
    weights = roomy.globals_bytes + cfg.num_layers * roomy.layer_bytes
    per_token = kv_bytes_per_token(cfg, torch.float32)
    device_mem = weights + reserve_bytes(cfg, torch.float32, policy, 256, 1)      # every layer + 256 tokens of KV
    host_tokens = 400 if kv_quant == "none" else 150      # int8 chunks: 150 tokens' exact bytes hold ~530 tokens
    with tierkv.load(model, device="cpu", kv="exact", chunk_tokens=32, kv_device_tokens=256, prefill_chunk_tokens=512,
                     device_mem=device_mem, host_mem=host_tokens * per_token, offload_dir=tmp_path,
                     kv_quant=kv_quant) as eng:
        # the room is 256 tokens' KV, raised to what chunks of 32 need at the model's 4096-token context
        # (6 slots + 128 abstracts per layer = 320 tokens' worth); the 1500-token prompt spills
        assert not eng.plan.disk_layers and eng.plan.kv_device_bytes == 320 * per_token
        tiered = eng.generate(prompt, max_new_tokens=6)
    assert tiered.token_ids == dense.token_ids
    kv = tiered.stats.kv
    assert kv["disk_bytes"] > 0 and kv["host_bytes"] > 0 and kv["device_bytes"] > 0, kv
    assert kv["kv_quant"] == kv_quant and all(r == 1.0 if kv_quant == "none" else 0.2 < r < 0.3
                                              for r in kv["cold_chunk_ratio"]), kv   # fp32 cache: int8 ~0.27x


def test_a_long_context_in_a_small_device_room_is_refused_with_the_minimum_or_runs_with_fixed_chunks(
        tmp_path: Path) -> None:
    """32K-64K tokens with 2K tokens of device room: 16-token chunks (which the skew may ask for)
    need more for their abstracts alone, so the cache is refused naming that minimum, which then
    works; a fixed --chunk-tokens 256 fits the 2K room. (Before, the adaptive size grew to fit the
    room, so the budget changed the chunking and with it the sparse selection.)"""
    cfg = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], hidden_size=512, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=4, intermediate_size=64,
                                     vocab_size=64, max_position_embeddings=131072))
    per_token = kv_bytes_per_token(cfg, torch.float32)
    for capacity in (32768, 65536):
        dirs = tmp_path / str(capacity)
        with pytest.raises(KVBudgetError, match="holds 0 chunks of 16 tokens") as err:
            TieredKVCache(cfg, Policy(kv="sparse"), 1, capacity, torch.float32, "cpu",
                          kv_device_bytes=2048 * per_token, kv_host_bytes=4096 * per_token, offload_dir=dirs)
        named = int(re.search(r"\((\d+) bytes\)", str(err.value)).group(1))  # type: ignore[union-attr]
        assert named == kv_device_minimum_bytes(cfg, Policy(kv="sparse"), torch.float32, 1, capacity, False)
        TieredKVCache(cfg, Policy(kv="sparse"), 1, capacity, torch.float32, "cpu", kv_device_bytes=named,
                      kv_host_bytes=4096 * per_token, offload_dir=dirs).close()
        TieredKVCache(cfg, Policy(kv="sparse", chunk_tokens=256), 1, capacity, torch.float32, "cpu",
                      kv_device_bytes=2048 * per_token, kv_host_bytes=4096 * per_token, offload_dir=dirs).close()


def test_sparse_overflow_with_64_or_more_kv_heads_reads_each_heads_own_chunks(
        tmp_path: Path, torch_kernels: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """66 KV heads: the per-chunk "which heads picked it" sets the overflow path works from equal the
    selection's mask for every head (an int64 bitmask of 2**h overflowed from head 63 on), and the
    output equals the all-resident cache's bit for bit."""
    hkv, d, b, cap = 66, 4, 1, 400
    cfg = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=16, hidden_size=hkv * d,
                                     intermediate_size=8, num_hidden_layers=1, num_attention_heads=hkv,
                                     num_key_value_heads=hkv, max_position_embeddings=8192))
    policy = Policy(kv="sparse", kv_budget=96, chunk_tokens=16)
    roomy = TieredKVCache(cfg, policy, b, cap, torch.float32, "cpu")
    tight = TieredKVCache(cfg, policy, b, cap, torch.float32, "cpu", offload_dir=tmp_path,
                          kv_device_bytes=_device_bytes(cfg, 16, 10, b, cap, policy),
                          kv_host_bytes=_host_bytes(cfg, 16, 40))
    masks: list[torch.Tensor] = []
    picks: list[dict[Any, int]] = []
    from tierkv.pipeline.kv import sparse as sparse_mod
    select, overflow = sparse_mod.select, sparse_mod.decode_overflow

    def spy_select(st: Any, kv: Any, q0: torch.Tensor) -> Any:
        sel = select(st, kv, q0)
        if st is tight._st:
            masks.append(sel.mask.clone())
        return sel

    def spy_overflow(st: Any, kv: Any, q: torch.Tensor, picked: Any, sel: Any) -> torch.Tensor:
        picks.append(dict(picked))
        return overflow(st, kv, q, picked, sel)

    monkeypatch.setattr(sparse_mod, "select", spy_select)
    monkeypatch.setattr(sparse_mod, "decode_overflow", spy_overflow)
    g = torch.Generator().manual_seed(3)
    with roomy, tight:
        start = 0
        for t in [300, 1, 1, 1]:
            pos = torch.arange(start, start + t)[None]
            q, k, v = (torch.randn(b, hkv, t, d, generator=g) for _ in range(3))
            assert torch.equal(roomy.attend(0, q, k, v, pos, None), tight.attend(0, q, k, v, pos, None))
            roomy.advance(t)
            tight.advance(t)
            start += t
    assert len(picks) == len(masks) == 3, "every decode step overflowed the device slots"
    for mask, picked in zip(masks, picks):
        heads_of = {key.chunk: {h for h in range(hkv) if bits >> h & 1} for key, bits in picked.items()}
        want = {c: {h for h in range(hkv) if mask[0, h, c]} for c in range(mask.shape[2]) if mask[0, :, c].any()}
        assert heads_of == want and any(h >= 63 for hs in want.values() for h in hs)


def test_host_chunks_come_from_arenas_whose_real_size_is_within_the_host_budget(tmp_path: Path,
                                                                                torch_kernels: None) -> None:
    """Chunks evicted to the host live in page-aligned arenas (pinned exactly on CUDA, never through
    torch's power-of-two pinned allocator): the bytes really allocated are what the stats count, the host
    tier is filled, and the allocation stays within the host KV budget."""
    cfg, cap = _cfg(), sum(PIECES)
    host_budget = _host_bytes(cfg, 32, 6) + 5000                 # not a whole number of chunks or pages
    cache = TieredKVCache(cfg, Policy(kv="exact", chunk_tokens=32), B, cap, torch.float32, "cpu",
                          kv_device_bytes=_device_bytes(cfg, 32, 12, B, cap, Policy(kv="exact")),
                          kv_host_bytes=host_budget, offload_dir=tmp_path)
    with cache:
        _drive([cache], PIECES)
        st = cache.stats()
        views = [kv.host_buf(key) for kv in cache._st.live_layers() for key in kv.table.on_tier(HOST)]
        real = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in views}
        assert views and st["host_allocated_bytes"] == sum(real.values())
        assert st["host_bytes"] <= st["host_allocated_bytes"] <= host_budget and st["disk_bytes"] > 0
        assert st["host_bytes"] == len(views) * cache._st.layers[0].geo.slot_bytes


def test_logits_follow_the_plan_kv_room_and_pieces_and_equal_one_unbudgeted_pass(
        long_models: dict[str, Path], tmp_path: Path, torch_kernels: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine.logits() makes the KV cache generation would (the plan's room: this 1500-token prompt spills
    to host and disk) and runs the plan's 512-token pieces; its (T, V) logits equal one whole-prompt
    pass on a dense cache (what logits() computed before)."""
    from tierkv.plan import reserve_bytes

    model, prompt = long_models["llama"], _prompts(1, 1500)[0]
    with tierkv.load(model, device="cpu", kv="exact", prefill_chunk_tokens=4096) as eng:
        whole = eng.logits(prompt)
        cfg = eng.config
    policy = Policy(dtype="float32", device="cpu", kv="exact", chunk_tokens=32, kv_device_tokens=256,
                    prefill_chunk_tokens=512)
    per_token = kv_bytes_per_token(cfg, torch.float32)
    roomy = tierkv.plan.make_plan(cfg, tierkv.Budget(), policy)
    device_mem = roomy.globals_bytes + cfg.num_layers * roomy.layer_bytes + reserve_bytes(cfg, torch.float32, policy,
                                                                                           256, 1)
    made: list[Any] = []
    pieces: list[int] = []
    stats: list[dict[str, Any]] = []
    make, hidden = KVRoom.make_cache, Runner.hidden

    def spy_make(self: KVRoom, *args: Any, **kw: Any) -> Any:
        cache = make(self, *args, **kw)
        close = cache.close
        cache.close = lambda: (stats.append(cache.stats()), close())   # the stats before close() empties it
        made.append(cache)
        return cache

    monkeypatch.setattr(KVRoom, "make_cache", spy_make)
    monkeypatch.setattr(Runner, "hidden", lambda self, feeds: pieces.append(sum(len(f.ids) for f in feeds)) or
                        hidden(self, feeds))
    with tierkv.load(model, device="cpu", kv="exact", chunk_tokens=32, kv_device_tokens=256, prefill_chunk_tokens=512,
                     device_mem=device_mem, host_mem=400 * per_token, offload_dir=tmp_path) as eng:
        budgeted = eng.logits(prompt)
    assert isinstance(made[0], TieredKVCache) and pieces == [512, 512, 476]
    assert stats[0]["disk_bytes"] > 0 and stats[0]["host_bytes"] > 0, stats
    assert budgeted.shape == whole.shape == (1500, cfg.vocab_size) and budgeted.dtype == torch.float32
    torch.testing.assert_close(budgeted, whole, rtol=1e-4, atol=1e-4)


def test_a_batch_of_long_prompts_prefills_in_pieces_within_the_activation_reserve(
        long_models: dict[str, Path], tmp_path: Path, torch_kernels: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan reserves one 512-token piece's activations for one sequence; four 1200-token prompts share
    the steps (the KV room holds them): each step packs whole pieces and decode rows within the step's
    token budget, whose activations fit the reserve, and each sequence gets its solo tokens."""
    from tierkv.engine import step_limits
    from tierkv.plan import activation_bytes

    model, prompts = long_models["llama"], _prompts(4, 1200)
    with tierkv.load(model, device="cpu", kv="exact", prefill_chunk_tokens=512) as eng:
        solo = [eng.generate(p, max_new_tokens=3).token_ids for p in prompts]
        cfg = eng.config
    policy = Policy(dtype="float32", device="cpu", kv="exact", prefill_chunk_tokens=512)
    roomy = tierkv.plan.make_plan(cfg, tierkv.Budget(), policy)
    kv_room = 4 * 1300 * kv_bytes_per_token(cfg, torch.float32)
    device_mem = roomy.globals_bytes + cfg.num_layers * roomy.layer_bytes + roomy.activation_bytes + kv_room
    steps: list[list[int]] = []
    hidden = Runner.hidden
    monkeypatch.setattr(Runner, "hidden", lambda self, feeds: steps.append([len(f.ids) for f in feeds]) or
                        hidden(self, feeds))
    with tierkv.load(model, device="cpu", kv="exact", prefill_chunk_tokens=512, device_mem=device_mem,
                     offload_dir=tmp_path) as eng:
        plan = eng.plan
        assert not plan.disk_layers and plan.prefill_chunk_tokens == 512 and plan.kv_device_bytes >= kv_room
        out = eng.generate(prompts, max_new_tokens=3)
        limits, _ = step_limits(cfg, eng.dtype, eng.policy, plan, 512, plan.attention_scratch_bytes)
    assert [o.token_ids for o in out] == solo
    assert all(o.stats.batch_size >= 2 for o in out)    # each shared steps: its decode beside another's piece
    assert sorted(n for rows in steps for n in rows if n > 1) == [176] * 4 + [512] * 8   # whole pieces only
    assert all(sum(rows) <= limits.token_budget for rows in steps)
    context = min(4096, cfg.max_position_embeddings)
    assert limits.token_budget == 512 or activation_bytes(cfg, torch.float32, limits.token_budget,
                                                          plan.attention_scratch_bytes, context, 1,
                                                          policy=policy) <= \
        max(plan.activation_bytes, activation_bytes(cfg, torch.float32, 512, plan.attention_scratch_bytes, context, 1,
                                                    policy=policy))


def test_write_behind_snapshots_stay_within_their_cap_when_the_disk_is_slow(tmp_path: Path, torch_kernels: None,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Closed chunks are snapshotted for the writer thread; a disk slower than the layers must make the
    cache wait for earlier writes, not pile up host copies outside every budget."""
    import time as time_mod

    from tierkv.io.kvstore import KVStore

    cfg, cap = _cfg(), sum(PIECES)
    slot = slot_bytes(cfg, torch.float32, 32)
    real_append = KVStore.append
    monkeypatch.setattr(KVStore, "append", lambda self, chunks: (time_mod.sleep(0.02), real_append(self, chunks))[1])
    dense = DenseKVCache(cfg, B, cap, torch.float32, torch.device("cpu"))
    tiered = _tiered(cfg, Policy(kv="exact", chunk_tokens=32), cap, tmp_path)
    queued: list[int] = []
    tiered._st.write_behind_bytes = 2 * B * slot                           # two closed chunks' snapshots
    real_prepare = tiered._st.mover.prepare

    def spy(src: str, dst: str, *args: Any) -> Any:
        if (src, dst) == ("host", "disk"):
            queued.append(sum(w.nbytes for kv in tiered._st.live_layers() for w in kv.writing
                              if not w.job.done()))
        return real_prepare(src, dst, *args)

    monkeypatch.setattr(tiered._st.mover, "prepare", spy)
    with tiered:
        _drive([dense, tiered], PIECES, windows=(None, 100), check=_close)
        assert tiered.check_invariants() > 0
    assert len(queued) > 4, "the prompt closes chunks that are written behind"
    assert max(queued) + B * slot <= 2 * B * slot, queued
