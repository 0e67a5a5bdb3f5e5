"""KV caches as the step-scheduling engine uses them: one cache per sequence (batch 1), many alive at
once on shared engine-lifetime workers, each with its own allotment and offload subdirectory; what
``kv_device_want_bytes`` / ``kv_host_want_bytes`` promise; and ``close()`` freeing one cache's
chunks on every tier while the others keep running.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from tierkv.config import ModelConfig, Policy
from tierkv.pipeline.kv import (DenseKVCache, KVWorkers, TieredKVCache, kv_bytes_per_token, kv_device_want_bytes,
                                kv_host_want_bytes, make_kv_cache)

HQ, HKV, D, LAYERS, CHUNK = 4, 2, 16, 2, 32
PIECES = [300, 200] + [1] * 5


pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")   # tiny tensors: torch kernels, one thread


def _cfg() -> ModelConfig:
    return ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=16, hidden_size=HQ * D,
                                      intermediate_size=8, num_hidden_layers=LAYERS, num_attention_heads=HQ,
                                      num_key_value_heads=HKV, max_position_embeddings=8192))


def _slot() -> int:
    return 2 * HKV * CHUNK * D * 4


def _small(cfg: ModelConfig, policy: Policy, tmp: Path, workers: KVWorkers | None = None,
           capacity: int = sum(PIECES)) -> TieredKVCache:
    """A batch-1 cache whose device holds 8 chunk slots per layer and whose host holds 4 chunks."""
    index = 2 * HKV * D * 4 * -(-capacity // CHUNK)
    return TieredKVCache(cfg, policy, 1, capacity, torch.float32, "cpu",
                         kv_device_bytes=LAYERS * (8 * _slot() + index), kv_host_bytes=LAYERS * 4 * _slot(),
                         offload_dir=tmp, workers=workers)


def _pieces(seed: int) -> list[list[tuple[torch.Tensor, ...]]]:
    """Per forward, per layer: (q, k, v) of one sequence."""
    g = torch.Generator().manual_seed(seed)
    return [[tuple(torch.randn(1, n, t, D, generator=g) for n in (HQ, HKV, HKV)) for _ in range(LAYERS)]
            for t in PIECES]


def _run_solo(cache: Any, pieces: list[list[tuple[torch.Tensor, ...]]]) -> list[torch.Tensor]:
    outs, start = [], cache.length_tokens
    for forward in pieces:
        t = forward[0][1].shape[2]
        pos = torch.arange(start, start + t)[None]
        outs += [cache.attend(j, q, k, v, pos, None) for j, (q, k, v) in enumerate(forward)]
        cache.advance(t)
        start += t
    return outs


@pytest.mark.parametrize("policy", [Policy(kv="exact", chunk_tokens=CHUNK),
                                    Policy(kv="sparse", kv_budget=96, chunk_tokens=CHUNK)], ids=["exact", "sparse"])
def test_three_sequence_caches_alive_at_once_equal_each_alone(policy: Policy, tmp_path: Path) -> None:
    """Three batch-1 caches with small allotments, interleaved layer by layer on shared workers: each one
    spills to host and disk in its own subdirectory and gives exactly its solo outputs."""
    cfg = _cfg()
    data = [_pieces(seed) for seed in range(3)]
    with KVWorkers("cpu") as workers:
        solo = []
        for pieces in data:
            with _small(cfg, policy, tmp_path / "solo", workers) as cache:
                solo.append(_run_solo(cache, pieces))
        caches = [_small(cfg, policy, tmp_path / "live", workers) for _ in data]
        outs: list[list[torch.Tensor]] = [[] for _ in data]
        start = 0
        for step, t in enumerate(PIECES):
            pos = torch.arange(start, start + t)[None]
            for j in range(LAYERS):
                for i, cache in enumerate(caches):        # every cache's layer j before any layer j + 1
                    q, k, v = data[i][step][j]
                    outs[i].append(cache.attend(j, q, k, v, pos, None))
            for cache in caches:
                cache.advance(t)
            start += t
        dirs = sorted(p.name for p in (tmp_path / "live").glob("kv-*"))
        for cache in caches:
            st = cache.stats()
            assert st["device_bytes"] > 0 and st["host_bytes"] > 0 and st["disk_bytes"] > 0, st
            assert cache.check_invariants() == LAYERS * -(-sum(PIECES) // CHUNK)
            cache.close()
        assert len(dirs) == 3, "each cache has a private offload subdirectory"
        assert not any((tmp_path / "live").glob("kv-*")), "close() deletes each subdirectory"
    for got, want in zip(outs, solo):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _kv_threads() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.name.startswith("tierkv-kv-") and t.ident is not None}


def test_caches_share_the_engine_workers_and_closing_one_leaves_the_other_working(tmp_path: Path) -> None:
    cfg, policy = _cfg(), Policy(kv="exact", chunk_tokens=CHUNK)
    data = _pieces(5)
    with _small(cfg, policy, tmp_path / "ref") as ref:
        want = _run_solo(ref, data)
    assert ref.workers.closed, "a cache made without workers closes its own"
    before = _kv_threads()
    workers = KVWorkers("cpu")
    a, b = _small(cfg, policy, tmp_path, workers), _small(cfg, policy, tmp_path, workers)
    assert a.workers is b.workers is workers
    _run_solo(a, data[:1])
    got = _run_solo(b, data[:1])
    used = _kv_threads() - before
    assert 0 < len(used) <= 6, "one reader, one writer and four stream threads serve both caches"
    assert len(list(tmp_path.glob("kv-*"))) == 2
    a.close()
    assert not workers.closed and len(list(tmp_path.glob("kv-*"))) == 1
    got += _run_solo(b, data[1:])              # b spills and fetches on the shared threads after a closed
    alive = _kv_threads() - before             # pools start their threads as work arrives
    assert used <= alive and len(alive) <= 6 and b.stats()["bytes_read_disk"] > 0
    b.close()
    assert not workers.closed
    workers.close()
    assert workers.closed and not (_kv_threads() & alive)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_close_frees_the_chunks_on_every_tier(tmp_path: Path) -> None:
    cfg = _cfg()
    with KVWorkers("cpu") as workers:
        cache = _small(cfg, Policy(kv="exact", chunk_tokens=CHUNK), tmp_path, workers)
        _run_solo(cache, _pieces(1))
        st = cache.stats()
        subdir = next(tmp_path.glob("kv-*"))
        assert st["device_bytes"] and st["host_allocated_bytes"] and st["disk_file_bytes"] and cache.nbytes
        assert any(subdir.iterdir())
        cache.close()
        st = cache.stats()
        assert cache.nbytes == 0 and not subdir.exists()
        assert st["device_bytes"] == st["host_bytes"] == st["host_allocated_bytes"] == st["disk_bytes"] == 0
        assert st["disk_file_bytes"] == 0 and st["chunk_tokens"] == [None] * LAYERS
        with pytest.raises(RuntimeError, match="closed TieredKVCache"):
            cache.check_invariants()


# -- what the sizing functions promise --------------------------------------------------------------


def _skewed(seed: int, t: int) -> list[tuple[torch.Tensor, ...]]:
    """Layer 0 flat attention (large chunks), layer 1 a few dominant keys (small chunks)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(LAYERS):
        k = torch.randn(1, HKV, t, D, generator=g)
        q = torch.zeros(1, HQ, t, D) if j == 0 else torch.full((1, HQ, t, D), 3.0)
        if j:
            k[:, :, ::97] = 6.0
        out.append((q, k, torch.randn(1, HKV, t, D, generator=g)))
    return out


# adaptive: a budget of half the context (the default 0.05 of 700 tokens holds 8 chunks of no more than
# 16 tokens, so every layer would take 16); at 0.5 a flat layer takes 32 and a skewed one 16
@pytest.mark.parametrize("policy", [Policy(kv="sparse", chunk_tokens=CHUNK), Policy(kv="sparse", kv_budget=0.5),
                                    Policy(kv="sparse", kv_budget=0.5, kv_sketch=True)],
                         ids=["fixed", "adaptive", "codes"])
def test_device_want_bytes_bound_what_an_unbounded_cache_allocates_and_never_spill(policy: Policy,
                                                                                   tmp_path: Path) -> None:
    cfg, cap = _cfg(), 700
    want = kv_device_want_bytes(cfg, policy, torch.float32, cap)
    with TieredKVCache(cfg, policy, 1, cap, torch.float32, "cpu") as roomy:
        _run_solo(roomy, [_skewed(0, 600)])
        sizes = roomy.stats()["chunk_tokens"]
        if policy.chunk_tokens is not None:
            assert want == roomy.nbytes, "a fixed chunk size: the want is exactly what it allocates"
        else:
            assert len(set(sizes)) == 2 and roomy.nbytes <= want
    with TieredKVCache(cfg, policy, 1, cap, torch.float32, "cpu", kv_device_bytes=want, kv_host_bytes=0) as held:
        _run_solo(held, [_skewed(0, 600), _skewed(1, 99)])      # no offload dir, no host: all on the device
        st = held.stats()
        assert st["chunk_tokens"] == sizes and st["host_bytes"] == st["disk_bytes"] == 0
        assert st["device_allocated_bytes"] <= want


def test_dense_want_bytes_are_the_dense_cache(tmp_path: Path) -> None:
    cfg, policy = _cfg(), Policy(kv="exact")
    want = kv_device_want_bytes(cfg, policy, torch.float32, 1000, batch=2)
    cache = make_kv_cache(cfg, policy, 2, 1000, torch.float32, "cpu")
    assert isinstance(cache, DenseKVCache) and cache.nbytes == want == 2 * 1000 * kv_bytes_per_token(cfg, torch.float32)
    assert isinstance(make_kv_cache(cfg, policy, 2, 1000, torch.float32, "cpu", kv_device_bytes=want), DenseKVCache)


@pytest.mark.parametrize("policy", [Policy(kv="exact", chunk_tokens=CHUNK), Policy(kv="exact")],
                         ids=["fixed", "adaptive"])
def test_host_want_bytes_hold_every_chunk_without_a_disk(policy: Policy) -> None:
    cfg, cap = _cfg(), 1500
    host = kv_host_want_bytes(cfg, policy, torch.float32, cap)
    # 8 slots of 64 tokens per layer (64: the largest adaptive size at 1500 tokens) beside 16-token abstracts
    small = LAYERS * (16 * _slot() + 2 * HKV * D * 4 * -(-cap // 16))
    with TieredKVCache(cfg, policy, 1, cap, torch.float32, "cpu", kv_device_bytes=small,
                       kv_host_bytes=host) as cache:              # no offload dir: the host must hold the rest
        _run_solo(cache, [_skewed(2, 1000), _skewed(3, 499), _skewed(4, 1)])
        st = cache.stats()
        assert st["host_bytes"] > 0 and st["disk_bytes"] == 0 and st["host_allocated_bytes"] <= host


# -- KV traffic through the movement layer --------------------------------------------------------


def test_kv_moves_are_mover_records_and_profiler_spans(tmp_path: Path) -> None:
    """Every batch of chunks the cache moves (fetches, streamed waves, sparse overflow reads, evictions, write-behind)
    is a record of its mover: the per-link bytes equal the cache's own counters, and a profiler trace shows
    a ``tierkv::move`` span per batch of chunks with its bytes."""
    from torch._C._profiler import _ExperimentalConfig

    from tierkv.trace.moves import parse_move_span

    cfg = _cfg()
    with KVWorkers("cpu") as workers:
        exact = _small(cfg, Policy(kv="exact", chunk_tokens=CHUNK), tmp_path, workers)
        sparse = _small(cfg, Policy(kv="sparse", kv_budget=192, chunk_tokens=CHUNK), tmp_path, workers)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    experimental_config=_ExperimentalConfig(profile_all_threads=True)) as prof:
            for cache in (exact, sparse):
                _run_solo(cache, _pieces(7))
        for cache in (exact, sparse):
            cache.close()                                 # completes the moves still in flight (prefetches)
        stats = [cache.stats() for cache in (exact, sparse)]
    spans = [s for s in (parse_move_span(e.name) for e in prof.events()) if s is not None]
    for st in stats:
        moves = st["moves"]
        assert moves["host->device"]["bytes"] == st["bytes_read_host"] > 0
        assert moves["disk->device"]["bytes"] == st["bytes_read_disk"] > 0
        assert moves["host->disk"]["bytes"] + moves.get("device->disk", {"bytes": 0})["bytes"] == \
            st["bytes_written_disk"] > 0
        assert moves["device->host"]["bytes"] > 0 and moves["device->host"]["moves"] > 0
    assert stats[1]["sparse_overflow_steps"] > 0, "the sparse cache's selections overflow its slots"
    links = {s.link for s in spans}
    assert {"host->device", "disk->device", "device->host", "host->disk"} <= links
    chunk = 2 * HKV * CHUNK * D * 4
    assert all(s.nbytes % chunk == 0 and s.nbytes and s.what.startswith("L") for s in spans)   # batches of chunks
    assert any(s.what.endswith("+1") for s in spans), "a batch names its first chunk and how many others"
    traced = sum(s.nbytes for s in spans if s.link == "disk->device")
    assert traced == sum(st["moves"]["disk->device"]["bytes"] for st in stats)
