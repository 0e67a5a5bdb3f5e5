"""Aligned reader (O_DIRECT and buffered fallback), slot pools, memory tiers and the move table."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from tierkv.io import reader as reader_mod
from tierkv.io.buffers import (ChunkArenas, HostBuffer, SlotPool, aligned_host_tensor, arena_capacity,
                               pinning_available, round_up)
from tierkv.io.reader import AlignedReader, ReadError, measure_disk_read_gbps
from tierkv.io.convert import convert
from tierkv.io.store import StoreError, WeightStore, tensors_from_buffer
from tierkv.io.mover import MoveRouteError, Mover, copy_handler
from tierkv.io.tiers import DEVICE, DISK, HOST, DiskReadHandler, DiskTier, MemoryTier, TierFullError

TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=128)


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    payload = os.urandom((3 << 20) + 12345)
    path = tmp_path / "data.bin"
    path.write_bytes(payload)
    return path, payload


@pytest.fixture
def store(make_checkpoint, tmp_path) -> WeightStore:
    _, ckpt_dir = make_checkpoint("llama", **TINY)
    return WeightStore.open(convert(ckpt_dir, tmp_path / "store"))


def _read_all(reader: AlignedReader, ranges: list[tuple[int, int]]) -> list[bytes]:
    out = []
    for offset, n in ranges:
        dest = aligned_host_tensor(n)
        record = reader.submit(offset, n, dest)
        record.wait()
        assert record.done() and record.t_end_s >= record.t_start_s >= record.t_submit_s
        out.append(bytes(dest[:n].numpy()))
    return out


RANGES = [(0, 1 << 20), (4096, (2 << 20) + 8192), (100, 5000), ((3 << 20), 12345), (0, (3 << 20) + 12345)]


def test_direct_and_buffered_reads_give_identical_bytes(data_file, monkeypatch):
    path, payload = data_file
    expected = [payload[o:o + n] for o, n in RANGES]
    with AlignedReader(path, threads=3, request_bytes=256 << 10) as r:
        assert _read_all(r, RANGES) == expected
    with AlignedReader(path, threads=2, direct=False) as r:
        assert not r.direct and _read_all(r, RANGES) == expected
    real_open = os.open

    def no_direct(p, flags, *a):   # what tmpfs and some network filesystems answer
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)
    monkeypatch.setattr(reader_mod.os, "open", no_direct)
    with AlignedReader(path) as r:
        assert not r.direct and _read_all(r, RANGES) == expected
    with pytest.raises(ReadError, match="does not support O_DIRECT"):
        AlignedReader(path, direct=True)


def test_many_requests_in_flight_and_verifier_runs_per_request(data_file):
    path, payload = data_file
    seen = []
    dest = aligned_host_tensor(len(payload))
    with AlignedReader(path, threads=4, request_bytes=64 << 10) as r:
        rec = r.submit(0, len(payload), dest, verify=lambda start, view: seen.append((start, len(view))))
        rec.wait()
    assert bytes(dest[:len(payload)].numpy()) == payload
    assert sorted(seen)[0] == (0, 64 << 10) and sum(n for _, n in seen) == len(payload)
    assert rec.nbytes == len(payload) and rec.duration_s > 0


def test_short_file_and_failing_verifier_raise_on_wait(data_file):
    path, payload = data_file
    dest = aligned_host_tensor(1 << 20)
    with AlignedReader(path) as r:
        with pytest.raises(ReadError, match="truncated"):
            r.submit(len(payload) - 4096, 1 << 20, dest).wait()

        def bad(start: int, view: memoryview) -> None:
            raise StoreError("checksum mismatch")
        with pytest.raises(StoreError, match="checksum"):
            r.submit(0, 8192, dest, verify=bad).wait()


def test_measure_disk_read_gbps(data_file):
    path, _ = data_file
    assert measure_disk_read_gbps(path, nbytes=2 << 20) > 0.0


def test_the_disk_probe_reads_through_a_window_of_the_size_asked(data_file, monkeypatch):
    """window_bytes sets the one buffer every read lands in (rounded up to 4 KiB); the reads cover the bytes asked."""
    path, _ = data_file
    seen: list[tuple[int, int, int]] = []
    real = AlignedReader.read

    def spy(self, offset, nbytes, dest, verify=None):
        seen.append((offset, nbytes, dest.untyped_storage().nbytes()))
        return real(self, offset, nbytes, dest, verify)

    monkeypatch.setattr(AlignedReader, "read", spy)
    assert measure_disk_read_gbps(path, nbytes=2 << 20, window_bytes=(768 << 10) + 100) > 0.0
    window = (768 << 10) + 4096
    assert [(o, n) for o, n, _ in seen] == [(0, window), (window, window), (2 * window, (2 << 20) - 2 * window)]
    assert {size for _, _, size in seen} == {window}


def test_slot_pool_alignment_and_misuse():
    pool = SlotPool(2, 10_000)
    assert pool.slot_bytes == 12288 and pool.n_free == 2
    a, b = pool.acquire("layer.0"), pool.acquire("layer.1")
    assert a.tensor.data_ptr() % 4096 == 0 and b.tensor.data_ptr() % 4096 == 0
    a.view(100).fill_(7)
    with pytest.raises(AssertionError, match="all 2 slots are held"):
        pool.acquire()
    pool.release(a)
    with pytest.raises(AssertionError, match="released twice"):
        pool.release(a)
    with pytest.raises(AssertionError, match="used after release"):
        a.tensor
    with pytest.raises(AssertionError, match="another pool"):
        SlotPool(1, 4096).release(b)
    with pytest.raises(AssertionError, match="do not fit"):
        b.view(pool.slot_bytes + 1)
    assert pool.acquire().index == 0


@pytest.mark.skipif(pinning_available(), reason="checks the CPU-only fallback")
def test_pinned_needs_cuda():
    with pytest.raises(AssertionError, match="needs CUDA"):
        SlotPool(1, 4096, pinned=True)


@pytest.mark.gpu
@pytest.mark.skipif(not pinning_available(), reason="needs CUDA")
def test_pinned_buffers_are_exact_size_and_page_locked():
    buf = HostBuffer(3 * 4096 + 1, pinned=True)
    assert buf.nbytes == 4 * 4096 and buf.tensor.data_ptr() % 4096 == 0 and buf.tensor.is_pinned()
    view = buf.tensor[:4096]
    buf.close()
    assert not buf.tensor.is_pinned()
    view.fill_(1)                                    # unpinned, but the memory is still valid
    pool = SlotPool(2, 5000, pinned=True)
    assert pool.acquire().tensor.is_pinned()


def test_memory_tier_budget():
    tier = MemoryTier(HOST, "cpu", capacity_bytes=5 * 4096)
    bufs = tier.alloc(["a", "b"], [4096, 100])
    assert [b.numel() for b in bufs] == [4096, 4096] and tier.used_bytes == 8192
    with pytest.raises(TierFullError, match="host tier.*budget.*--host-mem"):
        tier.alloc(["c"], [4 * 4096])
    tier.pool(3, 4096)
    assert tier.free_bytes == 0
    tier.free(["a"])
    assert tier.free_bytes == 4096 and not tier.has("a") and tier.has("b")
    with pytest.raises(AssertionError):
        tier.free(["a"])


def _weights_mover(tiers) -> Mover:
    mover, read, copy = Mover(), DiskReadHandler(tiers[DISK]), copy_handler("cpu")
    for src, dst, handler in ((DISK, HOST, read), (DISK, DEVICE, read), (HOST, DEVICE, copy)):
        mover.register(src, dst, handler)
    return mover


def test_mover_moves_store_extents_between_tiers(store):
    tiers = {DEVICE: MemoryTier(DEVICE, "cpu", 1 << 20), HOST: MemoryTier(HOST, "cpu", 1 << 20),
             DISK: DiskTier(store, threads=2)}
    mover = _weights_mover(tiers)
    try:
        names = ["layer.0", "layer.2"]
        blocks = tiers[HOST].alloc(names, [store.extents[n].padded_nbytes for n in names])
        mover.complete(mover.prepare(DISK, HOST, names, dests=blocks))
        ring = tiers[DEVICE].pool(2, store.max_layer_padded_bytes())
        slots = [ring.acquire(n) for n in names]
        mover.complete(mover.prepare(HOST, DEVICE, names, sources=blocks, dests=[s.tensor for s in slots]))
        (direct,) = tiers[DEVICE].alloc(["layer.1"], [store.extents["layer.1"].padded_nbytes])
        mover.complete(mover.prepare(DISK, DEVICE, ["layer.1"], dests=[direct]))   # CPU-only: the device tier is RAM
        for name, buf in [*zip(names, [s.tensor for s in slots]), ("layer.1", direct)]:
            got = tensors_from_buffer(store.extents[name], buf)
            want = store.load([name])[name]
            assert all(torch.equal(got[k], want[k]) for k in want)
        stats = mover.stats()
        assert stats["disk->host"]["bytes"] == sum(store.extents[n].padded_nbytes for n in names)
        assert stats["host->device"]["moves"] == 2 and stats["disk->device"]["moves"] == 1
        assert all(link["gbps"] > 0 for link in stats.values())
        with pytest.raises(MoveRouteError, match=r"no handler moves device->disk.*mover\.register\('device', 'disk'"):
            mover.prepare(DEVICE, DISK, ["layer.0"])
    finally:
        mover.close()
    assert tiers[DISK].reader._closed


def test_profiler_sees_reads_copies_and_waits(store):
    from torch._C._profiler import _ExperimentalConfig

    from tierkv.trace.moves import parse_move_span

    tiers = {HOST: MemoryTier(HOST, "cpu", 1 << 20), DEVICE: MemoryTier(DEVICE, "cpu", 1 << 20),
             DISK: DiskTier(store, threads=1)}
    mover = _weights_mover(tiers)
    nbytes = store.extents["layer.0"].padded_nbytes
    host, dev = tiers[HOST].alloc(["a"], [nbytes])[0], tiers[DEVICE].alloc(["b"], [nbytes])[0]
    config = _ExperimentalConfig(profile_all_threads=True)    # reader threads are not profiled otherwise
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], experimental_config=config) as prof:
        mover.complete(mover.prepare(DISK, HOST, ["layer.0"], dests=[host]))
        mover.complete(mover.prepare(HOST, DEVICE, ["layer.0"], sources=[host], dests=[dev]))
    mover.close()
    names = {e.name for e in prof.events()}
    moves = {parse_move_span(n) for n in names} - {None}
    assert {(m.link, m.what, m.nbytes) for m in moves} == {("disk->host", "layer.0", nbytes),
                                                           ("host->device", "layer.0", nbytes)}
    assert "tierkv::wait" in names


def _storage_bytes(chunks: list[torch.Tensor]) -> int:
    """Bytes of the distinct allocations behind ``chunks`` (what the process really holds for them)."""
    storages = {c.untyped_storage().data_ptr(): c.untyped_storage().nbytes() for c in chunks}
    return sum(storages.values())


@pytest.mark.parametrize("chunk_bytes, per_arena_bytes, budget", [(33792, 8 << 20, 1_000_000), (5000, 12000, 50_000),
                                                                   (4096, 16384, 16384), (70000, 8 << 20, 200_000),
                                                                   (70000, 8 << 20, 69999)])
def test_chunk_arenas_allocate_exactly_what_they_account_within_the_budget(chunk_bytes, per_arena_bytes, budget):
    """Take every chunk the budget admits: the accounted bytes are the bytes of the allocations behind
    the chunks, within the budget, and the capacity is every whole chunk that fits beside page padding."""
    pool = ChunkArenas(chunk_bytes, budget, arena_bytes=per_arena_bytes)
    assert pool.capacity == arena_capacity(chunk_bytes, pool.per_arena, budget)
    chunks = [pool.take() for _ in range(pool.capacity)]
    assert all(c.numel() == chunk_bytes for c in chunks)
    assert len({c.data_ptr() for c in chunks}) == len(chunks), "chunks do not overlap"
    assert pool.allocated_bytes == _storage_bytes(chunks) <= budget
    assert pool.capacity >= (budget - round_up(chunk_bytes)) // chunk_bytes - budget // (pool.per_arena * chunk_bytes)
    with pytest.raises(AssertionError, match="host chunks are in use"):
        pool.take()
    if chunks:
        pool.give(chunks.pop())
        assert pool.take().numel() == chunk_bytes and pool.allocated_bytes <= budget     # reused, nothing new
    pool.close()


def test_chunk_arenas_unbounded_grow_one_arena_at_a_time():
    pool = ChunkArenas(5000, None, arena_bytes=12000)
    chunks = [pool.take() for _ in range(5)]
    assert pool.capacity is None and pool.per_arena == 2
    assert pool.allocated_bytes == 3 * round_up(2 * 5000) == _storage_bytes(chunks)


@pytest.mark.gpu
def test_chunk_arenas_pin_exactly_their_pages_on_cuda():
    """torch's pinned allocator would round each chunk up to a power of two; arenas are registered as they are."""
    pool = ChunkArenas(33792, 1_000_000, pinned=True)
    chunks = [pool.take() for _ in range(pool.capacity)]
    assert all(c.is_pinned() for c in chunks)
    assert pool.allocated_bytes == _storage_bytes(chunks) <= 1_000_000
    dev = torch.ones(33792, dtype=torch.uint8, device="cuda")
    chunks[-1].copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    assert int(chunks[-1].sum()) == 33792
    pool.close()
    assert not chunks[0].is_pinned()
