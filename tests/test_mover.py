"""The movement layer without a model: the handler table, prepare/poll/complete, records, counters, spans."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch._C._profiler import _ExperimentalConfig

from tierkv.io.buffers import aligned_host_tensor
from tierkv.io.mover import (DEVICE, DISK, HOST, MoveRecord, MoveRouteError, Mover, ThreadHandler, copy_handler,
                             copy_into)
from tierkv.io.reader import AlignedReader
from tierkv.trace.moves import move_span_name, parse_move_span


def _profile():
    """A CPU profiler that also records spans on worker threads."""
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                  experimental_config=_ExperimentalConfig(profile_all_threads=True))


def _move_spans(prof) -> list:
    return [s for s in (parse_move_span(e.name) for e in prof.events()) if s is not None]


class _Gated:
    """A copy that waits for ``gate`` first, so a test can look at a move while it is in flight."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def __call__(self, source: torch.Tensor, dest: torch.Tensor) -> None:
        assert self.gate.wait(10.0)
        copy_into(source, dest)


def test_register_routes_by_pair_and_names_the_fix_for_a_missing_one():
    mover = Mover()
    copy = copy_handler("cpu")
    mover.register(HOST, DEVICE, copy)
    mover.register(DEVICE, HOST, copy)
    assert mover.links() == ["host->device", "device->host"] and mover.handler(HOST, DEVICE) is copy
    with pytest.raises(MoveRouteError) as err:
        mover.prepare(DISK, DEVICE, ["x"], dests=[torch.empty(1)])
    msg = str(err.value)
    assert "no handler moves disk->device" in msg and "registered: host->device, device->host" in msg
    assert "mover.register('disk', 'device', handler)" in msg
    with pytest.raises(AssertionError, match="already has a handler"):
        mover.register(HOST, DEVICE, copy)
    with pytest.raises(AssertionError, match="must be a word"):
        mover.register("host tier", DEVICE, copy)
    mover.close()
    with pytest.raises(MoveRouteError, match="registered: none"):
        Mover().handler(HOST, DISK)


def test_prepare_then_complete_moves_the_bytes_and_counts_each_move_once():
    mover = Mover()
    mover.register(HOST, DEVICE, copy_handler("cpu", threads=2))
    sources = [torch.arange(n, dtype=torch.float32) for n in (10, 1000)]
    dests = [torch.full((n + 3,), float("nan")) for n in (10, 1000)]
    records = mover.prepare(HOST, DEVICE, ["a", "b"], sources=sources, dests=dests)
    assert [(r.what, r.link, r.nbytes) for r in records] == [("a", "host->device", 40), ("b", "host->device", 4000)]
    mover.complete(records)
    mover.complete(records)                               # idempotent: folded once
    for source, dest in zip(sources, dests):
        assert torch.equal(dest[: source.numel()], source) and dest[source.numel():].isnan().all()
    for r in records:
        assert r.completed and r.done() and r.t_submit_s <= r.t_start_s <= r.t_end_s and r.duration_s >= 0
    stats = mover.stats()
    assert list(stats) == ["host->device"]
    link = stats["host->device"]
    assert link["bytes"] == 4040 and link["moves"] == 2 and link["busy_s"] > 0 and link["gbps"] > 0
    mover.close()


def test_poll_never_blocks_and_completes_what_finished():
    gated = _Gated()
    mover = Mover()
    mover.register(DEVICE, HOST, ThreadHandler(gated, threads=1, name="evict"))
    (record,) = mover.prepare(DEVICE, HOST, ["chunk 0"], sources=[torch.ones(8)], dests=[torch.zeros(8)])
    assert mover.poll([record]) == [] and not record.done() and not record.completed
    assert "in flight" in repr(record) and mover.stats() == {}
    gated.gate.set()
    while not mover.poll([record]):
        pass
    assert record.completed and mover.stats()["device->host"]["moves"] == 1
    assert mover.poll([record]) == [record] and mover.stats()["device->host"]["moves"] == 1
    mover.close()


def test_a_failing_transfer_raises_at_complete_and_is_not_counted():
    def broken(source: torch.Tensor, dest: torch.Tensor) -> None:
        raise OSError(5, "disk gone")

    mover = Mover()
    mover.register(HOST, DISK, ThreadHandler(broken, name="write"))
    (record,) = mover.prepare(HOST, DISK, ["chunk 7"], sources=[torch.ones(4)], dests=[None])
    with pytest.raises(OSError, match="disk gone"):
        mover.complete([record])
    assert not record.completed and record.done() and record.t_end_s is not None
    with pytest.raises(OSError, match="disk gone"):
        mover.poll([record])                             # done, so poll completes it: the error again
    assert mover.stats() == {}
    mover.close()


def test_moves_are_profiler_spans_on_the_worker_thread_with_their_bytes():
    mover = Mover()
    mover.register(HOST, DEVICE, copy_handler("cpu"))
    source, dest = torch.ones(1024, dtype=torch.uint8), torch.zeros(4096, dtype=torch.uint8)
    with _profile() as prof:
        mover.complete(mover.prepare(HOST, DEVICE, ["layer.3"], sources=[source], dests=[dest]))
    mover.close()
    threads = {e.name: e.thread for e in prof.events()}
    moves = [n for n in threads if parse_move_span(n) is not None]
    assert moves == ["tierkv::move host->device layer.3 1024B"]
    assert threads[moves[0]] != threads["tierkv::wait"]      # the copy thread did the work; the caller waited


def test_a_read_in_pieces_gives_one_span_per_request_adding_up_to_the_move(tmp_path: Path):
    payload = os.urandom(3 * 8192 + 100)
    (tmp_path / "f.bin").write_bytes(payload)
    dest = aligned_host_tensor(len(payload))
    with AlignedReader(tmp_path / "f.bin", threads=2, request_bytes=8192) as reader, _profile() as prof:
        record = MoveRecord(DISK, DEVICE, "f", len(payload))
        assert reader.submit(0, len(payload), dest, record=record) is record
        record.wait()
    assert bytes(dest[: len(payload)].numpy()) == payload and record.t_end_s >= record.t_start_s
    spans = sorted(_move_spans(prof), key=lambda s: s.part)
    assert [(s.link, s.what, s.part, s.parts) for s in spans] == [("disk->device", "f", p, 4) for p in (1, 2, 3, 4)]
    assert sum(s.nbytes for s in spans) == len(payload) and [s.starts_move for s in spans] == [True] + [False] * 3


def test_record_times_follow_the_last_piece_of_work():
    record = MoveRecord(HOST, DISK, "x", 10)
    with record.working(4, 1, 2):
        pass
    assert record.t_start_s is not None and record.t_end_s is None
    with pytest.raises(ValueError):
        with record.working(6, 2, 2):
            raise ValueError("failed piece")
    assert record.t_end_s >= record.t_start_s
    empty = MoveRecord(DISK, HOST, "nothing", 0)
    empty.mark_empty()
    assert empty.done() and empty.duration_s == 0.0


class _BatchWriter:
    """A KV-style handler: one job writes a batch of chunks, one record (and span) per chunk."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1)
        self.written: list[str] = []
        self.closes = 0

    def prepare(self, src, dst, whats, sources, dests, after):
        records = [MoveRecord(src, dst, what, s.numel()) for what, s in zip(whats, sources)]
        future = self.pool.submit(self._job, records, whats)
        for r in records:
            r.add_future(future)
        return records

    def _job(self, records: list[MoveRecord], whats: list[str]) -> None:
        for r, what in zip(records, whats):
            with r.working():
                self.written.append(what)

    def close(self) -> None:
        self.closes += 1
        self.pool.shutdown(wait=True)


def test_a_custom_handler_plugs_in_and_is_closed_once_per_mover():
    writer = _BatchWriter()
    mover = Mover()
    mover.register(HOST, DISK, writer)
    mover.register(DEVICE, DISK, writer)
    with _profile() as prof:
        records = mover.prepare(HOST, DISK, ["L0/c1", "L0/c2"], sources=[torch.ones(3), torch.ones(5)], dests=None)
        mover.complete(records)
    assert writer.written == ["L0/c1", "L0/c2"] and mover.stats()["host->disk"]["bytes"] == 8
    assert {(s.what, s.nbytes) for s in _move_spans(prof)} == {("L0/c1", 3), ("L0/c2", 5)}
    mover.close()
    assert writer.closes == 1


@pytest.mark.parametrize("what, nbytes, part, parts", [("layer.3", 4096, 1, 1), ("L2 s0 c5", 0, 2, 3),
                                                         ("embed", 12, 3, 3)])
def test_span_names_round_trip(what, nbytes, part, parts):
    span = parse_move_span(move_span_name("disk", "host", what, nbytes, part, parts))
    assert (span.link, span.what, span.nbytes, span.part, span.parts) == ("disk->host", what, nbytes, part, parts)
    assert parse_move_span("tierkv::wait") is None and parse_move_span("tierkv::move disk->host x") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_on_the_copy_stream_and_on_worker_streams():
    """host->device on the copy stream (timed by events, ordered into the consumer stream without a host
    wait), then device->host on a worker thread's own stream after an event of the compute stream."""
    from tierkv.io.buffers import HostBuffer

    dev = torch.device("cuda")
    mover = Mover()
    mover.register(HOST, DEVICE, copy_handler(dev))
    mover.register(DEVICE, HOST, ThreadHandler(copy_into, threads=2, name="evict", device=dev))
    buffer = HostBuffer(1 << 20, pinned=True)                  # keep it: it holds the pinning
    pinned = buffer.tensor
    pinned.copy_(torch.arange(1 << 20, dtype=torch.int64).to(torch.uint8))
    slot = torch.zeros(2 << 20, dtype=torch.uint8, device=dev)
    (up,) = mover.prepare(HOST, DEVICE, ["chunk"], sources=[pinned], dests=[slot])
    up.ready_on(torch.cuda.current_stream())
    doubled = slot[: 1 << 20] * 2                               # compute stream, after the copy
    written = torch.cuda.Event()
    written.record()
    back = torch.zeros(1 << 20, dtype=torch.uint8)
    (down,) = mover.prepare(DEVICE, HOST, ["chunk"], sources=[doubled], dests=[back], after=[written])
    mover.complete([up, down])
    assert torch.equal(back, pinned * 2) and up.t_end_s >= up.t_start_s and down.duration_s >= 0
    assert mover.stats()["host->device"]["bytes"] == 1 << 20 == mover.stats()["device->host"]["bytes"]
    mover.close()
