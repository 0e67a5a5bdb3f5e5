"""The three storage tiers (device, host, disk), and the handler that reads the disk tier.

Why this module exists: placement code (planner, weight pipeline, later the KV cache) should say
*what* moves *where* ("layer.3, layer.4: disk -> host") and never branch on tier kinds itself.
Tiers only store (principle 1): named blocks and slot rings within a byte budget. Bytes move
through ``tierkv.io.mover`` (a table of handlers per (source, destination) tier, one record per
move); ``DiskReadHandler`` is the handler that reads weight-store extents from the disk tier into
host or (on a CPU-only machine) device buffers.

On a CPU-only machine the "device" tier is host RAM counted against the device budget; its
blocks are page-aligned so disk reads land in them directly.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch

from tierkv.config import format_size
from tierkv.errors import TierkvError
from tierkv.io.buffers import HostBuffer, SlotPool, pinning_available, round_up
from tierkv.io.mover import DEVICE, DISK, HOST, MoveRecord
from tierkv.io.reader import AlignedReader
from tierkv.io.store import Extent, WeightStore


class TierFullError(TierkvError, RuntimeError):
    """An allocation would exceed a tier's budget; the message names the tier, the sizes and the fix."""


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
    """The weight store on disk (read-only); ids are extent names (``layer.3``, ``embed``, ...) or pieces
    of them (``layer.3#2``).

    ``verify``: "always" checks the CRCs on every read; "first" only on the first read of each
    extent (or piece) by this tier (later reads of a verified one skip the CPU cost); "never" skips them.
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


class DiskReadHandler:
    """disk -> host and disk -> device (CPU-only): weight-store extents into memory buffers.

    ``whats`` are extent names or pieces of them (``io.store.piece_name``: one CRC block), ``sources``
    is None (the disk tier resolves the names), ``dests`` are uint8 CPU buffers of at least each one's
    size. The reads run on the disk tier's reader threads, one ``tierkv::move`` span per request;
    checksums are checked there as the tier's ``verify`` setting says, and a mismatch or I/O error is
    raised by the record's ``wait()``.
    """

    def __init__(self, disk: DiskTier) -> None:
        self.disk = disk

    def prepare(self, src: str, dst: str, whats: Sequence[str], sources: Sequence[Any] | None,
                dests: Sequence[Any] | None, after: Sequence[torch.cuda.Event]) -> list[MoveRecord]:
        assert sources is None and dests is not None and not after, "disk reads take extent names and buffers"
        store, records = self.disk.store, []
        for name, dest in zip(whats, dests):
            assert dest.device.type == "cpu", (name, dest.device)
            record = MoveRecord(src, dst, name, store.piece_range(name)[2])
            store.read_extent(self.disk.reader, name, dest, verify=self.disk.should_verify(name), record=record)
            records.append(record)
        return records

    def close(self) -> None:
        self.disk.close()


__all__ = ["DEVICE", "DISK", "HOST", "DiskReadHandler", "DiskTier", "MemoryTier", "TierFullError"]
