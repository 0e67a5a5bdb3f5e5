"""The KV cache's movement handlers, made once per engine and shared by all its caches.

Why this module exists: a tiered KV cache moves chunks between device slots, host buffers and disk
segments, mostly off the compute thread. Every such move goes through ``io.mover`` (handlers per
(source tier, destination tier); each batch of chunks one job moves is one ``MoveRecord`` and a
``tierkv::move`` profiler span, so ``tierkv trace`` sees KV traffic as it sees weight reads). Starting threads per
cache would cost a pool per sequence (the engine makes one cache per sequence): ``KVWorkers`` owns
the handlers and their threads, is created once, hands each cache a ``Mover`` of its own (so each
cache's link counters stay its own) and is closed by its owner. A cache made without one owns a
private ``KVWorkers`` and closes it with itself.

Links and what each move's ``sources`` / ``dests`` list per chunk of its batch (a move = one batch):

    host -> device    (codec, host buffer)        -> (k, v) pair of (Hkv, S, D) device views   reader thread
    disk -> device    (codec, store, key)         -> (k, v) pair (tokens past the record zeroed) 4 stream threads
    host -> disk      io.kvstore.KVChunk snapshot -> the store (one append per batch)          writer thread
    device -> disk    KVChunk of device views     -> the store                                 the calling thread
    device -> host    (codec, k, v, tokens)       -> host buffer                               the calling thread

The layer's ``codec.ChunkCodec`` turns a device chunk into its cold form and back: a copy, or
int8/int4 codes quantized as the chunk leaves the device (device -> host here, and the records
``moves.chunk_record`` makes for disk) and dequantized into the device slot as it comes back (host
-> device and disk -> device here). Each move counts the bytes that cross its link (cold bytes).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, Callable, Sequence

import torch

from tierkv.io.kvstore import KVChunk
from tierkv.io.mover import DEVICE, DISK, HOST, MoveRecord, Mover, thread_stream
from tierkv.pipeline.kv.codec import ChunkCodec, decode_record
from tierkv.openmp import serial_thread  # no OpenMP pool of its own: the engine thread keeps its spin

__all__ = ["KVMove", "KVWorkers", "STREAM_THREADS", "complete", "settle"]

STREAM_THREADS = 4               # threads that read disk chunks in parallel (parallel reads keep the disk busy)
Run = Callable[[Sequence[Any], Sequence[Any]], None]     # (sources, dests) -> None: one batch of chunks


class KVMove(MoveRecord):
    """One move of a batch of chunks; ``job`` is the future of the work doing it."""

    job: Future

    def attach(self, job: Future) -> "KVMove":
        self.job = job
        self.add_future(job)
        return self


def complete(mover: Mover, records: Sequence[KVMove]) -> None:
    """Block until the records' jobs ended, re-raise the first failure, and complete the records: each
    is marked completed and folded into ``mover``'s counters once.

    What ``Mover.complete`` does, minus the ``tierkv::wait`` span it opens per record: that span is a
    dispatcher call (and a GIL handoff to the copy threads) on the compute thread, and an exact decode
    step over offloaded KV completes dozens of streamed waves per layer (measured: exact tiered decode
    ~1.3x slower on a 2-core CPU with it). The moves' own spans are unchanged.
    """
    for r in records:
        r.job.result()
    for r in records:
        if not r.completed:
            r.completed = True
            mover.counters.add(r)


def settle(mover: Mover, records: Sequence[KVMove]) -> None:
    """Wait until every record's work ended (so no thread still writes its buffers) without raising;
    complete those that succeeded (a failure is raised where the caller completes it, or never)."""
    wait_futures({r.job for r in records})
    complete(mover, [r for r in records if r.job.exception() is None])


class _BatchHandler:
    """Per move, one job ``run(sources, dests)`` over its batch of chunks on a worker pool, inside the
    move's span; ``threads=0`` runs the jobs on the calling thread.

    On CUDA each worker thread runs on its own stream after waiting for an event recorded on the
    submitting stream (it sees, and does not overwrite, what the compute stream was still using);
    the job ends only after its stream finished.
    """

    def __init__(self, run: Run, size: Callable[[Any, Any], int], threads: int, name: str,
                 device: torch.device) -> None:
        self.run, self.size = run, size
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"tierkv-kv-{name}",
                                        initializer=serial_thread) if threads else None
        self._cuda = device if device.type == "cuda" else None
        self._local = threading.local()   # .stream: the calling pool thread's CUDA stream

    def prepare(self, src: str, dst: str, whats: Sequence[str], sources: Sequence[Any] | None,
                dests: Sequence[Any] | None, after: Sequence[torch.cuda.Event]) -> list[MoveRecord]:
        assert sources is not None and dests is not None and not after, "KV moves give sources and dests"
        event = None
        if self._cuda is not None and self._pool is not None:
            event = torch.cuda.Event()
            event.record()
        records = []
        for what, batch_sources, batch_dests in zip(whats, sources, dests):
            record = KVMove(src, dst, what, sum(map(self.size, batch_sources, batch_dests)))
            if self._pool is None:              # on the calling thread: done (or raised) on return
                self._work(record, batch_sources, batch_dests, None)
                job: Future = Future()
                job.set_result(None)
            else:
                job = self._pool.submit(self._work, record, batch_sources, batch_dests, event)
            records.append(record.attach(job))
        return list(records)

    def _work(self, record: KVMove, sources: Sequence[Any], dests: Sequence[Any], event: Any) -> None:
        with torch.inference_mode(), record.working():
            if self._cuda is None or self._pool is None:
                self.run(sources, dests)
                return
            stream = thread_stream(self._local, self._cuda)
            with torch.cuda.stream(stream):
                stream.wait_event(event)
                self.run(sources, dests)
            stream.synchronize()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _cold_bytes(source: tuple[Any, ...], _: Any) -> int:
    """Bytes a host/disk <-> device move of one chunk carries: its cold form (the source starts with its codec)."""
    codec = source[0]
    assert isinstance(codec, ChunkCodec), type(codec)
    return codec.cold_bytes


def _record_bytes(chunk: KVChunk, _: Any) -> int:
    if chunk.packed is not None:
        return chunk.packed.data.numel()
    assert chunk.k is not None and chunk.v is not None
    return chunk.k.numel() * chunk.k.element_size() + chunk.v.numel() * chunk.v.element_size()


def _copy_from_host(sources: Sequence[tuple[ChunkCodec, torch.Tensor]],
                    dests: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for (codec, buf), (k, v) in zip(sources, dests):
        codec.decode(buf, k, v)


def _read_from_disk(sources: Sequence[tuple[ChunkCodec, Any, Any]],
                    dests: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Read records back (checksums verified) into (k, v) views; V past the record is zeroed (0 * NaN)."""
    store = sources[0][1]
    for (k, v), chunk in zip(dests, store.read([key for _, _, key in sources])):
        decode_record(chunk, k, v)


def _append_to_disk(sources: Sequence[Any], dests: Sequence[Any]) -> None:
    dests[0].append(list(sources))


def _copy_to_host(sources: Sequence[tuple[ChunkCodec, torch.Tensor, torch.Tensor, int]],
                  dests: Sequence[torch.Tensor]) -> None:
    for (codec, k, v, tokens), buf in zip(sources, dests):
        codec.encode(k, v, tokens, buf)


class KVWorkers:
    """The handlers (and threads) every KV cache of an engine moves its chunks with. Thread-safe:
    any number of caches prepare moves at once; ``mover()`` gives each cache its own counters."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        d = self.device
        self._links = {
            (HOST, DEVICE): _BatchHandler(_copy_from_host, _cold_bytes, 1, "read", d),
            (DISK, DEVICE): _BatchHandler(_read_from_disk, _cold_bytes, STREAM_THREADS, "stream", d),
            (HOST, DISK): _BatchHandler(_append_to_disk, _record_bytes, 1, "write", d),
            (DEVICE, DISK): _BatchHandler(_append_to_disk, _record_bytes, 0, "write-now", d),
            (DEVICE, HOST): _BatchHandler(_copy_to_host, _cold_bytes, 0, "evict", d),
        }
        self.closed = False

    def mover(self) -> Mover:
        """A Mover routing every KV link to these handlers; closing it is this object's job, not the cache's."""
        assert not self.closed, "KVWorkers used after close()"
        mover = Mover()
        for (src, dst), handler in self._links.items():
            mover.register(src, dst, handler)
        return mover

    def close(self) -> None:
        """Finish queued work and stop the threads (idempotent)."""
        self.closed = True
        for handler in self._links.values():
            handler.close()

    def __enter__(self) -> "KVWorkers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
