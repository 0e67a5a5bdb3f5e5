"""The three storage tiers (device, host, disk) and the one place where bytes move between them.

Why this module exists: placement code (planner, weight pipeline, later the KV cache) should say
*what* moves *where* ("layer.3, layer.4: disk -> host") and get back records it can poll, never
branch on tier kinds itself. Tiers only store (principle 1); every move goes through
``Mover.move``, which looks up a route in a table keyed by (source tier, destination tier) and
returns one record per id (principle 2). The same records feed ``LinkStats`` (bytes and GB/s per
link, time spent waiting) and the profiler ranges ``tierkv::disk_read``, ``tierkv::h2d_copy`` and
``tierkv::wait``.

On a CPU-only machine the "device" tier is host RAM counted against the device budget; its
blocks are page-aligned so disk reads land in them directly.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Protocol, Sequence

import torch

from tierkv.config import format_size
from tierkv.errors import TierkvError
from tierkv.io.buffers import HostBuffer, SlotPool, pinning_available, round_up
from tierkv.io.reader import AlignedReader, ReadRecord
from tierkv.io.store import Extent, WeightStore

DEVICE, HOST, DISK = "device", "host", "disk"


class TierFullError(TierkvError, RuntimeError):
    """An allocation would exceed a tier's budget; the message names the tier, the sizes and the fix."""


class MoveRecord(Protocol):
    """What every asynchronous move returns (ReadRecord and CopyRecord both satisfy it)."""

    link: str           # "disk->host", "host->device", ...
    nbytes: int
    label: str | None   # the id that moved
    wait_s: float

    def done(self) -> bool: ...
    def wait(self) -> "MoveRecord": ...


# ---------------------------------------------------------------------------------------------
# tiers: they store, they never compute


class MemoryTier:
    """Device or host memory: named blocks (uint8 tensors) and slot pools within a byte budget.

    ``device`` is where the bytes live (``cpu`` for the host tier and for the device tier of a
    CPU-only machine). Host blocks are pinned when ``pinned`` (CUDA machines only).
    """

    def __init__(self, name: str, device: torch.device | str, capacity_bytes: int, pinned: bool = False) -> None:
        assert name in (DEVICE, HOST), name
        self.name = name
        self.device = torch.device(device)
        self.capacity_bytes = capacity_bytes
        self.pinned = pinned and self.device.type == "cpu"
        assert not self.pinned or pinning_available(), "pinned host memory needs CUDA"
        self._blocks: dict[str, torch.Tensor] = {}
        self._owners: dict[str, HostBuffer | torch.Tensor] = {}   # what keeps each block (and its pinning) alive
        self._pools: list[SlotPool] = []
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._blocks.values()) + sum(p.total_bytes for p in self._pools)

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def _reserve(self, nbytes: int, what: str) -> None:
        if nbytes > self.free_bytes:
            raise TierFullError(f"{self.name} tier: {what} needs {format_size(nbytes)} but only "
                                f"{format_size(self.free_bytes)} of its {format_size(self.capacity_bytes)} "
                                f"budget is free; raise --{self.name}-mem or place less on this tier")

    def _new_buffer(self, nbytes: int) -> HostBuffer | torch.Tensor:
        """A (round_up(nbytes),) uint8 buffer: page-aligned (and maybe pinned) host memory, or device memory."""
        if self.device.type == "cpu":
            return HostBuffer(nbytes, self.pinned)
        return torch.empty(round_up(nbytes), dtype=torch.uint8, device=self.device)

    def alloc(self, ids: Sequence[str], nbytes: Sequence[int]) -> list[torch.Tensor]:
        """One buffer of round_up(nbytes[i]) bytes per id; all or nothing against the budget."""
        assert len(ids) == len(nbytes) and not (set(ids) & set(self._blocks)), ids
        self._reserve(sum(round_up(n) for n in nbytes), f"{len(ids)} block(s) {list(ids)[:3]}")
        owners = [self._new_buffer(n) for n in nbytes]
        bufs = [o.tensor if isinstance(o, HostBuffer) else o for o in owners]
        with self._lock:
            self._blocks.update(zip(ids, bufs))
            self._owners.update(zip(ids, owners))
        return bufs

    def free(self, ids: Sequence[str]) -> None:
        with self._lock:
            for i in ids:
                assert i in self._blocks, f"{self.name} tier: free of unknown block {i!r}"
                del self._blocks[i]
                owner = self._owners.pop(i)
                if isinstance(owner, HostBuffer):
                    owner.close()

    def get(self, ids: Sequence[str]) -> list[torch.Tensor]:
        with self._lock:
            missing = [i for i in ids if i not in self._blocks]
            assert not missing, f"{self.name} tier holds no block(s) {missing}"
            return [self._blocks[i] for i in ids]

    def has(self, block_id: str) -> bool:
        with self._lock:
            return block_id in self._blocks

    def pool(self, n_slots: int, slot_bytes: int) -> SlotPool:
        """A ring of slots counted against this tier's budget for as long as the tier lives."""
        self._reserve(n_slots * round_up(slot_bytes), f"a ring of {n_slots} slots of {format_size(slot_bytes)}")
        pool = SlotPool(n_slots, slot_bytes, pinned=self.pinned, device=self.device)
        with self._lock:
            self._pools.append(pool)
        return pool


class DiskTier:
    """The weight store on disk (read-only); ids are extent names (``layer.3``, ``embed``, ...).

    ``verify``: "always" checks the CRCs on every read; "first" only on the first read of each
    extent by this tier (later reads of a verified extent skip the CPU cost); "never" skips them.
    """

    name = DISK

    def __init__(self, store: WeightStore, threads: int = 4, direct: bool | None = None,
                 verify: str = "first") -> None:
        assert verify in ("first", "always", "never"), verify
        self.store = store
        self.reader: AlignedReader = store.open_reader(threads=threads, direct=direct)
        self.verify = verify
        self._verified: set[str] = set()

    def should_verify(self, extent_name: str) -> bool:
        """Whether this read of ``extent_name`` checks CRCs (a failed check raises, so it counts once)."""
        first = extent_name not in self._verified
        self._verified.add(extent_name)
        return self.verify == "always" or (self.verify == "first" and first)

    @property
    def used_bytes(self) -> int:
        return sum(e.padded_nbytes for e in self.store.extents.values())

    def extents(self, ids: Sequence[str]) -> list[Extent]:
        return [self.store.extents[i] for i in ids]

    def close(self) -> None:
        self.reader.close()


# ---------------------------------------------------------------------------------------------
# records of copies between memory tiers


class CopyRecord:
    """One asynchronous copy between memory tiers.

    On CUDA it is a pair of timing events on the copy stream (``ready_on(stream)`` orders a
    consumer stream after it without blocking the host); on CPU it is a future on a worker thread.
    ``t_start_s``/``t_end_s`` are on the ``time.perf_counter()`` clock in both cases.
    """

    def __init__(self, link: str, nbytes: int, label: str | None) -> None:
        self.link, self.nbytes, self.label = link, nbytes, label
        self.t_submit_s = time.perf_counter()
        self.t_start_s: float | None = None
        self.t_end_s: float | None = None
        self.wait_s = 0.0
        self._future: Future | None = None
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._clock: _CudaClock | None = None

    def done(self) -> bool:
        if self._future is not None:
            return self._future.done()
        assert self._events is not None
        return self._events[1].query()

    def wait(self) -> "CopyRecord":
        t0 = time.perf_counter()
        with torch.profiler.record_function("tierkv::wait"):
            if self._future is not None:
                self._future.result()
            else:
                assert self._events is not None
                self._events[1].synchronize()
        self.wait_s += time.perf_counter() - t0
        self._settle_times()
        return self

    def ready_on(self, stream: torch.cuda.Stream | None) -> None:
        """Make ``stream`` wait for this copy (CUDA), or block until it is done (CPU)."""
        if self._events is not None and stream is not None:
            stream.wait_event(self._events[1])
        else:
            self.wait()

    def _settle_times(self) -> None:
        if self._events is not None and self.t_end_s is None and self._clock is not None:
            self.t_start_s = self._clock.host_time_s(self._events[0])
            self.t_end_s = self._clock.host_time_s(self._events[1])

    def __repr__(self) -> str:
        return f"CopyRecord({self.link}, {self.label!r}, {self.nbytes} B, {'done' if self.done() else 'in flight'})"


class _CudaClock:
    """Maps CUDA event times onto the perf_counter clock via one reference event."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.ref = torch.cuda.Event(enable_timing=True)
        self.ref.record(stream)
        self.ref.synchronize()
        self.t_ref_s = time.perf_counter()

    def host_time_s(self, event: torch.cuda.Event) -> float:
        return self.t_ref_s + self.ref.elapsed_time(event) / 1e3


# ---------------------------------------------------------------------------------------------
# stats fed by the records


class LinkStats:
    """Bytes, busy time (union of move intervals), GB/s and wait seconds per link. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[str, dict[str, float]] = {}
        self._open: dict[str, list[float]] = {}     # link -> current merged [start, end]

    def add(self, record: MoveRecord) -> None:
        """Fold one finished record (call after it is done and waited)."""
        start = getattr(record, "t_start_s", None) or getattr(record, "t_submit_s", 0.0)
        end = getattr(record, "t_end_s", None) or start
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
# the route table


# route(ids, sources (extents or tensors), destination buffers, link="src->dst") -> one record per id
Route = Callable[..., list[MoveRecord]]


class Mover:
    """Moves batches of ids between tiers through a table of routes keyed by (source, destination).

    Routes: disk->host, disk->device (CPU-only machines: the device tier is RAM; on CUDA stage
    through host), host->device and device->host. Every record is folded into ``stats`` when it is
    waited through ``Mover.wait``. ``copy_stream`` is the CUDA stream that copies run on.
    """

    def __init__(self, tiers: dict[str, MemoryTier | DiskTier], copy_threads: int = 1) -> None:
        self.tiers = tiers
        self.stats = LinkStats()
        device = tiers[DEVICE].device if DEVICE in tiers else torch.device("cpu")
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._clock = _CudaClock(self.copy_stream) if self.cuda else None
        self._copy_pool = None if self.cuda else ThreadPoolExecutor(copy_threads, thread_name_prefix="tierkv-copy")
        self.routes: dict[tuple[str, str], Route] = {
            (DISK, HOST): self._read,
            (HOST, DEVICE): self._copy,
            (DEVICE, HOST): self._copy,
        }
        if not self.cuda:
            self.routes[(DISK, DEVICE)] = self._read

    def move(self, ids: Sequence[str], src: str, dst: str, into: Sequence[torch.Tensor] | None = None,
             sources: Sequence[torch.Tensor] | None = None,
             after: Sequence[torch.cuda.Event] = ()) -> list[MoveRecord]:
        """Start moving ``ids`` from tier ``src`` to tier ``dst``; one record per id.

        ``into``: destination buffers (e.g. ring slots); default: new blocks allocated in ``dst``.
        ``sources``: source buffers for memory tiers; default: the blocks ``src`` holds for ``ids``.
        ``after``: CUDA events the copy stream waits for first (e.g. "the slot's last reader is done").
        """
        route = self.routes.get((src, dst))
        if route is None:
            known = ", ".join(f"{a}->{b}" for a, b in self.routes)
            raise KeyError(f"no route {src}->{dst} on this machine (routes: {known})")
        src_items = self._sources(ids, src, sources)
        if into is None:
            sizes = [s.padded_nbytes if isinstance(s, Extent) else s.numel() for s in src_items]
            into = self.tiers[dst].alloc(ids, sizes)
        assert len(into) == len(ids), (len(into), len(ids))
        if self.copy_stream is not None:
            for ev in after:
                self.copy_stream.wait_event(ev)
        return route(ids, src_items, into, link=f"{src}->{dst}")

    def _sources(self, ids: Sequence[str], src: str, sources: Sequence[torch.Tensor] | None) -> list[object]:
        if sources is not None:
            assert len(sources) == len(ids)
            return list(sources)
        tier = self.tiers[src]
        return tier.extents(ids) if isinstance(tier, DiskTier) else tier.get(ids)

    def _read(self, ids: Sequence[str], extents: Sequence[object], into: Sequence[torch.Tensor],
              link: str) -> list[MoveRecord]:
        disk = self.tiers[DISK]
        assert isinstance(disk, DiskTier)
        records = []
        for name, extent, dest in zip(ids, extents, into):
            assert isinstance(extent, Extent) and dest.device.type == "cpu", (name, dest.device)
            record: ReadRecord = disk.store.read_extent(disk.reader, name, dest, verify=disk.should_verify(name))
            record.link = link
            records.append(record)
        return records

    def _copy(self, ids: Sequence[str], sources: Sequence[object], into: Sequence[torch.Tensor],
              link: str) -> list[MoveRecord]:
        records: list[MoveRecord] = []
        for name, src, dst in zip(ids, sources, into):
            assert isinstance(src, torch.Tensor) and src.numel() <= dst.numel(), (name, dst.numel())
            rec = CopyRecord(link, src.numel(), name)
            with torch.profiler.record_function("tierkv::h2d_copy" if link == "host->device" else "tierkv::copy"):
                if self.copy_stream is not None:
                    rec._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                    rec._clock = self._clock
                    with torch.cuda.stream(self.copy_stream):
                        rec._events[0].record()
                        dst[: src.numel()].copy_(src, non_blocking=True)
                        rec._events[1].record()
                else:
                    assert self._copy_pool is not None
                    rec._future = self._copy_pool.submit(_timed_copy, rec, src, dst)
            records.append(rec)
        return records

    def wait(self, records: Sequence[MoveRecord]) -> None:
        """Block until every record is done (re-raising failures) and fold them into ``stats``."""
        for r in records:
            r.wait()
            self.stats.add(r)

    def close(self) -> None:
        if self._copy_pool is not None:
            self._copy_pool.shutdown(wait=True)
        disk = self.tiers.get(DISK)
        if isinstance(disk, DiskTier):
            disk.close()


def _timed_copy(rec: CopyRecord, src: torch.Tensor, dst: torch.Tensor) -> None:
    rec.t_start_s = time.perf_counter()
    with torch.profiler.record_function("tierkv::h2d_copy" if rec.link == "host->device" else "tierkv::copy"):
        dst[: src.numel()].copy_(src)
    rec.t_end_s = time.perf_counter()


__all__ = ["DEVICE", "DISK", "HOST", "CopyRecord", "DiskTier", "LinkStats", "MemoryTier", "MoveRecord", "Mover",
           "TierFullError"]
