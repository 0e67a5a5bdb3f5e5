"""The movement layer: every transfer between tiers is prepared, recorded and completed here.

Why this module exists: weight streaming (and the KV cache, as it moves onto this layer) move bytes
disk -> host -> device and back on reader threads, worker threads and CUDA copy streams. Each of
them used to keep its own record type, its own stats and its own profiler names, and callers
branched on tier kinds. Here a move is said once -- *what* goes from *which tier* to *which tier*
-- and a table keyed by (source tier, destination tier) picks the handler that does it
(principle 1, after vLLM's ``kv_offload`` worker); every move is one ``MoveRecord`` that is polled
for completion (principle 2), feeds the per-link counters, and appears in any ``torch.profiler``
trace as a ``tierkv::move <src>-><dst> <what> <nbytes>B`` span on the thread that does the work
(``tierkv.trace.moves`` owns that format; ``tierkv trace`` sums the spans per link).

API:

* tiers are named by words: ``DISK``, ``HOST``, ``DEVICE`` ("disk", "host", "device").
* ``MoveRecord(src, dst, what, nbytes)``: one move. Handlers attach what it waits on
  (``add_future``; ``use_events`` for CUDA work) and run each piece of its work inside
  ``record.working(...)`` (the span, and the start/end times). ``done()`` polls, ``wait()`` blocks
  and re-raises the transfer's exception.
* ``MoveHandler`` (protocol): ``prepare(src, dst, whats, sources, dests, after) -> list[MoveRecord]``
  starts one move per id without blocking; ``close()`` releases its threads/streams (idempotent).
* ``Mover``: ``register(src, dst, handler)``; ``prepare(src, dst, whats, sources=None, dests=None,
  after=())`` -> records; ``poll(records)`` -> the finished ones, completed, never blocking;
  ``complete(records)`` blocks until all are done, re-raises the first failure, and folds each
  record into ``counters`` exactly once; ``stats()`` -> link -> {bytes, moves, busy_s, gbps,
  wait_s}; ``close()`` closes every handler once. A pair nobody registered raises
  ``MoveRouteError`` naming the registered links.
* Built-in handlers: ``ThreadHandler`` (each move's work on worker threads; on CUDA each thread has
  its own stream, ordered after the submitting stream), ``StreamCopyHandler`` (tensor copies queued
  on one CUDA copy stream, timed by events) and ``copy_handler(device)``, the right memory-to-memory
  copier for a machine. ``tiers.DiskReadHandler`` reads weight-store extents.

How a KV handler plugs in (the KV cache owns its Mover, so weight and KV counters stay apart; one
handler instance may be registered in several movers, which is why ``close`` must be idempotent):

* host -> device chunk copies and device -> host evictions: ``copy_handler(device)`` as it is, with
  ``whats`` = chunk keys as text (``"L3/s0/c12"``), ``sources``/``dests`` = the chunk tensors, and
  ``after`` = a CUDA event recorded on the compute stream once the chunk was written (eviction) or
  once the destination slot's last reader is done (fetch). The caller frees or reuses the source
  after ``poll``/``complete`` reports the record finished.
* disk reads/writes of KV chunk records: a ``ThreadHandler(run, size, threads, name, device)`` whose
  ``run(source, dest)`` reads or appends one chunk record in ``io.kvstore`` (``size`` gives its bytes),
  registered for ("disk", "host") and ("host", "disk"); or a class with its own ``prepare`` when one
  job serves many records (one ``store.append(records)``): create a ``MoveRecord`` per chunk, submit
  one job, ``add_future`` the job's future to each record, and inside the job enter every record's
  ``working()`` so each chunk's span and bytes show.
* The KV code then calls ``mover.prepare(...)`` where it submits jobs today and ``mover.poll``/
  ``mover.complete`` where it waits on futures; its stats read ``mover.stats()``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from tierkv.trace.moves import check_tier_name, move_span_name
from tierkv.openmp import serial_thread  # no OpenMP pool of its own: the engine thread keeps its spin

DEVICE, HOST, DISK = "device", "host", "disk"
WAIT_SPAN = "tierkv::wait"


class MoveRouteError(LookupError):
    """No handler is registered for a (source tier, destination tier) pair; the message names the fix."""


class CudaClock:
    """Maps CUDA event times onto the ``time.perf_counter()`` clock via one reference event."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.ref = torch.cuda.Event(enable_timing=True)
        self.ref.record(stream)
        self.ref.synchronize()
        self.t_ref_s = time.perf_counter()

    def host_time_s(self, event: torch.cuda.Event) -> float:
        return self.t_ref_s + self.ref.elapsed_time(event) / 1e3


# ---------------------------------------------------------------------------------------------
# the record of one move


class MoveRecord:
    """One asynchronous move of ``nbytes`` of ``what`` from tier ``src`` to tier ``dst``.

    It waits on futures (work on threads), on a pair of CUDA timing events (work queued on a
    stream), or both. Times are ``time.perf_counter()`` seconds: ``t_submit_s`` at creation,
    ``t_start_s`` when the first piece of work began, ``t_end_s`` when the last one ended (for CUDA
    work: the events' times, known once waited). ``wait_s`` is the time callers spent blocked in
    ``wait()``. ``completed`` is set by the Mover once the record is folded into its counters.
    """

    def __init__(self, src: str, dst: str, what: str, nbytes: int) -> None:
        assert nbytes >= 0, nbytes
        self.src, self.dst = check_tier_name(src), check_tier_name(dst)
        self.what, self.nbytes = what, nbytes
        self.t_submit_s = time.perf_counter()
        self.t_start_s: float | None = None
        self.t_end_s: float | None = None
        self.wait_s = 0.0
        self.completed = False
        self._futures: list[Future] = []
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._clock: CudaClock | None = None
        self._pieces_done = 0
        self._lock = threading.Lock()

    @property
    def link(self) -> str:
        return f"{self.src}->{self.dst}"

    def span_name(self, nbytes: int | None = None, part: int = 1, parts: int = 1) -> str:
        """The profiler name of this move, or of its piece ``part`` of ``parts`` holding ``nbytes``."""
        return move_span_name(self.src, self.dst, self.what, self.nbytes if nbytes is None else nbytes, part, parts)

    # -- what handlers call ------------------------------------------------------------------
    def add_future(self, future: Future) -> None:
        """Make the move wait for ``future`` too (its exception is the move's)."""
        self._futures.append(future)

    def use_events(self, start: torch.cuda.Event, end: torch.cuda.Event, clock: CudaClock) -> None:
        """The move is the stream work between ``start`` and ``end`` (timing events, both recorded)."""
        assert self._events is None, f"{self!r} already waits on events"
        self._events, self._clock = (start, end), clock

    @contextmanager
    def working(self, nbytes: int | None = None, part: int = 1, parts: int = 1) -> Iterator[None]:
        """Around one piece of the work, on the thread doing it: the profiler span and the times.

        ``parts`` pieces in all (each entered once, in any order, on any threads); the move's end
        time is set when the last one leaves, whether it succeeded or raised.
        """
        with self._lock:
            if self.t_start_s is None:
                self.t_start_s = time.perf_counter()
        try:
            with torch.profiler.record_function(self.span_name(nbytes, part, parts)):
                yield
        finally:
            with self._lock:
                self._pieces_done += 1
                if self._pieces_done == parts:
                    self.t_end_s = time.perf_counter()

    def mark_empty(self) -> None:
        """A move with no work to do (zero bytes): started and ended at submission."""
        self.t_start_s = self.t_end_s = self.t_submit_s

    # -- what consumers call -----------------------------------------------------------------
    def done(self) -> bool:
        """Whether all of the move's work finished (successfully or not); never blocks."""
        if not all(f.done() for f in self._futures):
            return False
        return self._events is None or self._events[1].query()

    def wait(self) -> "MoveRecord":
        """Block until done; re-raise the first failure of the work; add the blocked time to ``wait_s``."""
        t0 = time.perf_counter()
        with torch.profiler.record_function(WAIT_SPAN):
            for f in self._futures:
                f.result()
            if self._events is not None:
                self._events[1].synchronize()
        self.wait_s += time.perf_counter() - t0
        if self._events is not None and self.t_end_s is None and self._clock is not None:
            self.t_start_s = self._clock.host_time_s(self._events[0])
            self.t_end_s = self._clock.host_time_s(self._events[1])
        return self

    def ready_on(self, stream: torch.cuda.Stream | None) -> None:
        """Make ``stream`` wait for this move's stream work without blocking the host (CUDA); block
        until done when there is no stream work or no stream. Completing it stays the caller's job."""
        if self._events is not None and stream is not None and not self._futures:
            stream.wait_event(self._events[1])
        else:
            self.wait()

    @property
    def duration_s(self) -> float:
        assert self.t_end_s is not None, f"{self!r} is not finished; complete it first"
        return self.t_end_s - (self.t_start_s if self.t_start_s is not None else self.t_submit_s)

    def __repr__(self) -> str:
        state = "completed" if self.completed else "done" if self.done() else "in flight"
        return f"MoveRecord({self.link}, {self.what!r}, {self.nbytes} B, {state})"


# ---------------------------------------------------------------------------------------------
# counters fed by the records


class LinkCounters:
    """Bytes, moves, busy time (union of move intervals), GB/s and wait seconds per link. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[str, dict[str, float]] = {}
        self._open: dict[str, list[float]] = {}     # link -> current merged [start, end]

    def add(self, record: MoveRecord) -> None:
        """Fold one finished, waited record."""
        start = record.t_start_s if record.t_start_s is not None else record.t_submit_s
        end = record.t_end_s if record.t_end_s is not None else start
        with self._lock:
            link = self._links.setdefault(record.link, {"bytes": 0, "moves": 0, "busy_s": 0.0, "wait_s": 0.0})
            link["bytes"] += record.nbytes
            link["moves"] += 1
            link["wait_s"] += record.wait_s
            span = self._open.get(record.link)
            if span is not None and start <= span[1]:    # overlaps the open span (records fold roughly in order)
                span[0], span[1] = min(span[0], start), max(span[1], end)
            else:
                if span is not None:
                    link["busy_s"] += span[1] - span[0]
                self._open[record.link] = [start, end]

    def summary(self) -> dict[str, dict[str, float]]:
        """link -> {bytes, moves, busy_s, gbps, wait_s}."""
        with self._lock:
            out = {}
            for name, link in self._links.items():
                span = self._open.get(name)
                busy = link["busy_s"] + (span[1] - span[0] if span else 0.0)
                out[name] = dict(link, busy_s=busy, gbps=link["bytes"] / busy / 1e9 if busy > 0 else 0.0)
            return out


# ---------------------------------------------------------------------------------------------
# the table


class MoveHandler(Protocol):
    """Does the moves of the links it is registered for.

    ``prepare`` starts one move per id and returns their records (same order, ``src``/``dst`` as
    given) without waiting for the work; what ``sources`` and ``dests`` hold is the handler's
    contract (tensors, extents, chunk records; None where the handler resolves ids itself).
    ``after`` lists CUDA events the work must follow. ``close`` waits for its threads and drops
    them; it may be called more than once.
    """

    def prepare(self, src: str, dst: str, whats: Sequence[str], sources: Sequence[Any] | None,
                dests: Sequence[Any] | None, after: Sequence[torch.cuda.Event]) -> list[MoveRecord]: ...

    def close(self) -> None: ...


class Mover:
    """A table of handlers keyed by (source tier, destination tier), and the counters of their moves."""

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str], MoveHandler] = {}
        self.counters = LinkCounters()

    def register(self, src: str, dst: str, handler: MoveHandler) -> None:
        """Route moves ``src -> dst`` to ``handler`` (one handler per pair; the mover closes it)."""
        key = (check_tier_name(src), check_tier_name(dst))
        assert src != dst, f"{src}->{dst}: a move needs two tiers"
        assert key not in self._handlers, f"{src}->{dst} already has a handler ({self._handlers[key]!r})"
        self._handlers[key] = handler

    def links(self) -> list[str]:
        """The registered links, ``"src->dst"``, in registration order."""
        return [f"{a}->{b}" for a, b in self._handlers]

    def handler(self, src: str, dst: str) -> MoveHandler:
        """The handler of ``src -> dst``; ``MoveRouteError`` (naming what is registered) if none is."""
        handler = self._handlers.get((src, dst))
        if handler is None:
            known = ", ".join(self.links()) or "none"
            raise MoveRouteError(f"no handler moves {src}->{dst} in this mover (registered: {known}); "
                                 f"register one with mover.register({src!r}, {dst!r}, handler), or move "
                                 "through a tier both links reach (e.g. disk->host, then host->device)")
        return handler

    def prepare(self, src: str, dst: str, whats: Sequence[str], sources: Sequence[Any] | None = None,
                dests: Sequence[Any] | None = None, after: Sequence[torch.cuda.Event] = ()) -> list[MoveRecord]:
        """Start moving ``whats`` from ``src`` to ``dst``; one record per id, in order; never blocks."""
        assert sources is None or len(sources) == len(whats), (len(sources), len(whats))
        assert dests is None or len(dests) == len(whats), (len(dests), len(whats))
        records = self.handler(src, dst).prepare(src, dst, whats, sources, dests, after)
        assert len(records) == len(whats) and all(r.src == src and r.dst == dst for r in records), records
        return records

    def poll(self, records: Sequence[MoveRecord]) -> list[MoveRecord]:
        """The records whose work finished, completed (a failed one raises here); never blocks."""
        finished = [r for r in records if r.completed or r.done()]
        self.complete(finished)
        return finished

    def complete(self, records: Sequence[MoveRecord]) -> None:
        """Block until every record is done, re-raising the first failure; fold each into the counters once."""
        for r in records:
            if r.completed:
                continue
            r.wait()
            r.completed = True
            self.counters.add(r)

    def stats(self) -> dict[str, dict[str, float]]:
        """link -> {bytes, moves, busy_s, gbps, wait_s} over the completed moves."""
        return self.counters.summary()

    def close(self) -> None:
        """Close every registered handler once (each waits for its own threads)."""
        seen: set[int] = set()
        for handler in self._handlers.values():
            if id(handler) not in seen:
                seen.add(id(handler))
                handler.close()


# ---------------------------------------------------------------------------------------------
# built-in handlers


def copy_into(source: torch.Tensor, dest: torch.Tensor) -> None:
    """Copy contiguous ``source`` into the first ``source.numel()`` elements of contiguous ``dest``."""
    assert source.dtype == dest.dtype and source.numel() <= dest.numel(), (source.shape, dest.shape)
    dest.view(-1)[: source.numel()].copy_(source.view(-1), non_blocking=dest.device != source.device)


def tensor_nbytes(source: torch.Tensor, _: object = None) -> int:
    return source.numel() * source.element_size()


def thread_stream(local: threading.local, device: torch.device) -> "torch.cuda.Stream":
    """This worker thread's own CUDA stream on ``device`` (made on first use, kept in ``local``)."""
    stream = getattr(local, "stream", None)
    if stream is None:
        stream = local.stream = torch.cuda.Stream(device)
    return stream


class ThreadHandler:
    """Runs each move's ``run(source, dest)`` on ``threads`` worker threads (``size`` gives its bytes).

    On CUDA (``device`` a CUDA device) each worker runs on its own stream, first waiting for an event
    recorded on the submitting thread's current stream at ``prepare`` and for ``after``, and the move
    finishes only once that stream did: the work sees everything queued before it and nothing it
    writes is read early.
    """

    def __init__(self, run: Callable[[Any, Any], None], size: Callable[[Any, Any], int] = tensor_nbytes,
                 threads: int = 1, name: str = "move", device: torch.device | None = None) -> None:
        self.run, self.size = run, size
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"tierkv-{name}", initializer=serial_thread)
        self._device = device if device is not None and device.type == "cuda" else None
        self._local = threading.local()      # .stream: this worker thread's CUDA stream

    def prepare(self, src: str, dst: str, whats: Sequence[str], sources: Sequence[Any] | None,
                dests: Sequence[Any] | None, after: Sequence[torch.cuda.Event]) -> list[MoveRecord]:
        assert sources is not None and dests is not None, "a ThreadHandler needs sources and dests"
        assert self._device is not None or not after, "CUDA events to wait for, but this handler runs on the CPU"
        events = list(after)
        if self._device is not None:
            submitted = torch.cuda.Event()
            submitted.record()
            events.append(submitted)
        records = []
        for what, source, dest in zip(whats, sources, dests):
            record = MoveRecord(src, dst, what, self.size(source, dest))
            record.add_future(self._pool.submit(self._work, record, source, dest, events))
            records.append(record)
        return records

    def _work(self, record: MoveRecord, source: Any, dest: Any, events: list[torch.cuda.Event]) -> None:
        with torch.inference_mode(), record.working():
            if self._device is None:
                self.run(source, dest)
                return
            stream = thread_stream(self._local, self._device)
            with torch.cuda.stream(stream):
                for event in events:
                    stream.wait_event(event)
                self.run(source, dest)
            stream.synchronize()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class StreamCopyHandler:
    """Tensor copies (``copy_into``) queued on one CUDA copy stream, each between two timing events.

    ``prepare`` never blocks the host: the copy stream first waits for ``after``; the span covers
    the enqueue on the calling thread (the copy itself shows as a memcpy in a CUDA trace).
    """

    def __init__(self, device: torch.device) -> None:
        assert device.type == "cuda", device
        self.stream = torch.cuda.Stream(device)
        self.clock = CudaClock(self.stream)

    def prepare(self, src: str, dst: str, whats: Sequence[str], sources: Sequence[Any] | None,
                dests: Sequence[Any] | None, after: Sequence[torch.cuda.Event]) -> list[MoveRecord]:
        assert sources is not None and dests is not None, "a copy needs sources and dests"
        for event in after:
            self.stream.wait_event(event)
        records = []
        for what, source, dest in zip(whats, sources, dests):
            record = MoveRecord(src, dst, what, tensor_nbytes(source))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.profiler.record_function(record.span_name()), torch.cuda.stream(self.stream):
                start.record()
                copy_into(source, dest)
                end.record()
            record.use_events(start, end, self.clock)
            records.append(record)
        return records

    def close(self) -> None:
        self.stream.synchronize()


def copy_handler(device: torch.device | str, threads: int = 1) -> ThreadHandler | StreamCopyHandler:
    """The memory-to-memory copier for ``device``: a CUDA copy stream, or ``threads`` CPU copy threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return StreamCopyHandler(device)
    return ThreadHandler(copy_into, tensor_nbytes, threads=threads, name="copy")


__all__ = ["DEVICE", "DISK", "HOST", "CudaClock", "LinkCounters", "MoveHandler", "MoveRecord", "MoveRouteError",
           "Mover", "StreamCopyHandler", "ThreadHandler", "WAIT_SPAN", "copy_handler", "copy_into", "tensor_nbytes"]
