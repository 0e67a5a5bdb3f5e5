"""KV chunk segments on disk: round trips, alignment, crash recovery, checksums, full disks."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from tierkv.io.kvstore import RECORD_ALIGN_BYTES, KVChunk, KVStore, KVStoreError


def _chunk(layer: int, chunk: int, seq: int = 0, n: int = 7, dtype: torch.dtype = torch.float32,
           heads: int = 2, dim: int = 12) -> KVChunk:
    g = torch.Generator().manual_seed(layer * 1000 + chunk * 10 + seq)
    k = torch.randn(heads, n, dim, generator=g).to(dtype)
    v = torch.randn(heads, n, dim, generator=g).to(dtype)
    return KVChunk(layer, chunk, seq, chunk * n, k, v, k.amin(1), k.amax(1))


def _same(a: KVChunk, b: KVChunk) -> bool:
    return (a.key == b.key and a.start_token == b.start_token
            and all(torch.equal(x, y) for x, y in ((a.k, b.k), (a.v, b.v), (a.kmin, b.kmin), (a.kmax, b.kmax))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_several_at_once_in_any_order(tmp_path: Path, dtype: torch.dtype) -> None:
    chunks = [_chunk(layer, c, seq, n=5 + c, dtype=dtype) for layer in (0, 3) for c in range(3) for seq in (0, 1)]
    with KVStore(tmp_path / "kv") as store:
        store.append(chunks[:5])
        store.append(chunks[5:])
        wanted = [chunks[7], chunks[0], chunks[11], chunks[3]]
        got = store.read([c.key for c in wanted])
        assert all(_same(a, b) for a, b in zip(wanted, got))
        assert got[0].k.dtype == dtype and got[0].n_tokens == wanted[0].n_tokens
        assert len(store) == len(chunks) and chunks[4].key in store


def test_records_are_4k_aligned_one_segment_per_layer(tmp_path: Path) -> None:
    with KVStore(tmp_path) as store:
        store.append([_chunk(0, 0, n=3), _chunk(1, 0, n=300), _chunk(0, 1, n=40)])
        offsets = [e.offset for e in store._index.values()]
        assert all(off % RECORD_ALIGN_BYTES == 0 for off in offsets)
        sizes = [store.segment_path(j).stat().st_size for j in (0, 1)]
        assert all(s % RECORD_ALIGN_BYTES == 0 for s in sizes) and store.used_bytes == sum(sizes)
        assert sorted(p.name for p in tmp_path.glob("*.kvseg")) == ["layer0000.kvseg", "layer0001.kvseg"]


def test_reopen_rebuilds_the_index_and_drops_a_torn_last_record(tmp_path: Path) -> None:
    chunks = [_chunk(2, c) for c in range(3)]
    with KVStore(tmp_path) as store:
        store.append(chunks)
        path = store.segment_path(2)
    whole = path.stat().st_size
    with open(path, "r+b") as f:           # a crash in the middle of the third record's write
        f.truncate(whole - 100)
    with KVStore(tmp_path) as store:
        assert len(store) == 2 and chunks[2].key not in store
        assert path.stat().st_size == 2 * (whole // 3)       # the torn tail was cut off
        assert all(_same(a, b) for a, b in zip(chunks[:2], store.read([c.key for c in chunks[:2]])))
        store.append([chunks[2]])                             # appends continue cleanly
    with KVStore(tmp_path) as store:
        assert _same(store.read([chunks[2].key])[0], chunks[2])


def test_reopen_ignores_a_zero_filled_tail(tmp_path: Path) -> None:
    with KVStore(tmp_path) as store:
        store.append([_chunk(0, 0)])
        path = store.segment_path(0)
    with open(path, "ab") as f:            # blocks allocated but never written before a crash
        f.write(b"\0" * 2 * RECORD_ALIGN_BYTES)
    with KVStore(tmp_path) as store:
        assert len(store) == 1 and path.stat().st_size == RECORD_ALIGN_BYTES


def test_corrupt_payload_is_detected_and_named(tmp_path: Path) -> None:
    chunks = [_chunk(1, c) for c in range(3)]
    with KVStore(tmp_path) as store:
        store.append(chunks)
        entry = store._index[chunks[1].key]
        path = store.segment_path(1)
        with open(path, "r+b") as f:
            f.seek(entry.offset + entry.header["payload_offset"] + 5)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x40]))
        with pytest.raises(KVStoreError, match="checksum") as err:
            store.read([chunks[0].key, chunks[1].key])
        assert str(path) in str(err.value) and f"offset {entry.offset}" in str(err.value)
        assert "chunk 1" in str(err.value)
        assert _same(store.read([chunks[2].key])[0], chunks[2])   # the other records are fine


def test_corrupt_header_in_the_middle_refuses_to_open(tmp_path: Path) -> None:
    with KVStore(tmp_path) as store:
        store.append([_chunk(0, c) for c in range(3)])
        second = store._index[(0, 1, 0)].offset
        path = store.segment_path(0)
    with open(path, "r+b") as f:
        f.seek(second + 20)
        f.write(b"garbage")
    with pytest.raises(KVStoreError, match="corrupt at offset"):
        KVStore(tmp_path)


def test_budget_full_is_clear_and_changes_nothing(tmp_path: Path) -> None:
    with KVStore(tmp_path / "kv", budget_bytes=3 * RECORD_ALIGN_BYTES) as store:
        store.append([_chunk(0, 0), _chunk(0, 1)])
        before = store.used_bytes
        message = r"offload dir .*kv full after 0\.0 MiB of KV.*free space or lower the context"
        with pytest.raises(KVStoreError, match=message):
            store.append([_chunk(0, 2), _chunk(0, 3)])
        assert store.used_bytes == before and (0, 2, 0) not in store
        assert store.segment_path(0).stat().st_size == before
        assert _same(store.read([(0, 1, 0)])[0], _chunk(0, 1))


def test_disk_full_truncates_the_failed_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = KVStore(tmp_path)
    store.append([_chunk(0, 0)])
    real = os.pwrite
    calls = []

    def full_after_one(fd: int, data: bytes, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 1:                                   # second record: half written, then ENOSPC
            real(fd, bytes(data)[: len(data) // 2], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_after_one)
    with pytest.raises(KVStoreError, match="full after"):
        store.append([_chunk(0, 1), _chunk(0, 2)])
    monkeypatch.setattr(os, "pwrite", real)
    assert len(store) == 1 and store.used_bytes == RECORD_ALIGN_BYTES
    assert store.segment_path(0).stat().st_size == RECORD_ALIGN_BYTES
    store.append([_chunk(0, 1)])
    assert _same(store.read([(0, 1, 0)])[0], _chunk(0, 1))
    store.close()
    assert len(KVStore(tmp_path)) == 2


def test_unknown_chunk_and_delete(tmp_path: Path) -> None:
    store = KVStore(tmp_path / "kv")
    store.append([_chunk(0, 0)])
    with pytest.raises(KeyError, match="not in"):
        store.read([(0, 5, 0)])
    store.close(delete=True)
    assert not (tmp_path / "kv").exists()
