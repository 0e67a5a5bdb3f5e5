"""StreamingWeights: the layer loop's WeightSource for weights split across device, host and disk.

Why this module exists: when a model does not fit the device budget, each token's forward pass
must pull the missing layers through the links while earlier layers compute. This class turns a
placement (which layers are resident, which live in host memory, which stream from the store)
into the ``prefetch / wait / release`` protocol of ``pipeline.schedule``:

* device layers and the globals are read once into the device tier and returned as views, except an
  embedding the plan leaves in the store (``io.rows``: a step reads only the rows it embeds);
* host layers live in the host tier (pinned on CUDA) and are copied into a device ring slot on the
  copy stream; on a CPU-only machine they are used in place (host and "device" are the same RAM);
* disk layers are read by the store's reader threads into a ring of ``prefetch_depth + 1`` slots
  (on CUDA: pinned staging slots, then a copy into a device slot ordered by CUDA events); or, on a
  CPU-only machine with ``stream_pieces``, one CRC block at a time through a ring of that many
  4 MiB slots, the layer computed from row blocks as they land (``pipeline.pieces``: ``wait``
  returns a ``PieceLayer`` for those layers).

Every buffer is carved from a tier at construction, so memory stays within the budgets for the
whole run. Every move goes through one ``io.mover.Mover`` (disk->host and, on CPU, disk->device:
the disk tier's reader; host->device: the machine's copier); ``stats()`` reads its
per-link counters, and each move shows as a ``tierkv::move`` span in a profiler trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from tierkv.io.buffers import Slot, SlotPool, aligned_host_tensor
from tierkv.io.mover import DEVICE, DISK, HOST, MoveRecord, Mover, copy_handler
from tierkv.io.rows import MappedEmbedding
from tierkv.io.store import StoreError, WeightStore, layer_extent_name, tensors_from_buffer
from tierkv.io.tiers import DiskReadHandler, DiskTier, MemoryTier
from tierkv.kernels.quant import prepare_layer
from tierkv.pipeline.pieces import LayerPieces, PieceLayer, PieceRing, layer_pieces
from tierkv.quantspec import EMBED_WEIGHT

if TYPE_CHECKING:
    from tierkv.plan import Plan


def _piece_layers(store: WeightStore, kinds: list[str], slots: int, cuda: bool) -> dict[int, LayerPieces]:
    """The disk layers' ``LayerPieces`` when they stream in pieces (``slots`` > 0), else {}."""
    disk = [j for j, k in enumerate(kinds) if k == "disk"]
    if slots <= 0 or not disk:
        return {}
    pieces = layer_pieces(store, disk)
    if cuda or pieces is None:
        raise ValueError("streaming in pieces needs a CPU device and 16-bit or fp32 layers stored in their "
                         "math's order; pass stream_pieces=0, or build the source from a plan "
                         "(StreamingWeights.from_plan), which streams such layers a layer at a time")
    return pieces


def _make_mover(disk: DiskTier, device: torch.device) -> Mover:
    """The links weights use: disk reads into host (and, on CPU, device) RAM; host -> device copies."""
    mover, read = Mover(), DiskReadHandler(disk)
    mover.register(DISK, HOST, read)
    if device.type != "cuda":
        mover.register(DISK, DEVICE, read)      # the device tier is RAM: reads land in it directly
    mover.register(HOST, DEVICE, copy_handler(device))
    return mover


def weight_stats(tiers: dict[str, MemoryTier | DiskTier], kinds: list[str], mover: Mover) -> dict[str, float]:
    """Weight bytes per tier, layers per kind, then bytes / GB/s / busy and wait seconds per link."""
    out = {f"{name}_weight_bytes": float(tier.used_bytes) for name, tier in tiers.items()}
    out["layers_device"] = float(kinds.count("device"))
    out["layers_host"] = float(kinds.count("host"))
    out["layers_disk"] = float(kinds.count("disk") + kinds.count("pieces"))
    wait_s = 0.0
    for link, s in mover.stats().items():
        key = link.replace("->", "_to_")
        out.update({f"{key}_bytes": float(s["bytes"]), f"{key}_gbps": s["gbps"], f"{key}_busy_s": s["busy_s"],
                    f"{key}_wait_s": s["wait_s"]})
        wait_s += s["wait_s"]
    out["wait_s"] = wait_s
    return out


@dataclass
class _Flight:
    """A streamed layer between prefetch and release."""

    layer: int
    slot: Slot                          # device ring slot (CPU: the read lands here directly)
    stage: Slot | None = None           # CUDA disk layers: pinned staging slot
    read: MoveRecord | None = None      # disk -> staging slot (CUDA) or device slot (CPU)
    copy: MoveRecord | None = None      # host -> device slot (CUDA)


class StreamingWeights:
    """WeightSource over a WeightStore with layers placed on device, host or disk.

    ``device_layers``/``host_layers`` list layer indices; every other layer streams from disk.
    ``device_budget_bytes`` bounds globals + resident layers + the device ring;
    ``host_budget_bytes`` bounds host layers + the staging ring (CUDA). ``verify``: "first"
    checks each extent's CRCs the first time it is read in this process, "always" on every read.
    ``lookup_embedding``: the embedding stays in the store, mapped (``io.rows``), outside both budgets
    (its CRCs checked once, at construction, unless ``verify`` is "never"). ``stream_pieces`` (CPU only, every
    disk layer 16-bit or fp32 as ``pipeline.pieces.piece_layout`` needs): disk layers stream in CRC blocks
    through a ring of that many slots instead of the layer ring.
    """

    def __init__(self, store: WeightStore, device: torch.device | str, device_layers: Sequence[int],
                 host_layers: Sequence[int], prefetch_depth: int, device_budget_bytes: int,
                 host_budget_bytes: int, reader_threads: int = 4, verify: str = "first",
                 direct: bool | None = None, progress: Callable[[int, int], None] | None = None,
                 lookup_embedding: bool = False, stream_pieces: int = 0) -> None:
        assert prefetch_depth >= 0 and not set(device_layers) & set(host_layers)
        self.store, self.device = store, torch.device(device)
        self.num_layers, self.prefetch_depth = store.config.num_layers, prefetch_depth
        self.cuda = self.device.type == "cuda"
        self._kind = ["disk"] * self.num_layers
        for j in host_layers:
            self._kind[j] = "host"
        for j in device_layers:
            self._kind[j] = "device"
        self._piece_layers = _piece_layers(store, self._kind, stream_pieces, self.cuda)
        for j in self._piece_layers:
            self._kind[j] = "pieces"
        self.tiers = {DEVICE: MemoryTier(DEVICE, self.device, device_budget_bytes),
                      HOST: MemoryTier(HOST, "cpu", host_budget_bytes, pinned=self.cuda),
                      DISK: DiskTier(store, threads=reader_threads, direct=direct, verify=verify)}
        self.mover = _make_mover(self.tiers[DISK], self.device)
        self.pieces: PieceRing | None = None
        self._open_pieces: PieceLayer | None = None
        self._flights: dict[int, _Flight] = {}
        self._copies: list[tuple[MoveRecord, Slot | None]] = []     # CUDA copies not yet reaped
        self._slot_free_event: dict[int, torch.cuda.Event] = {}   # device slot -> its last reader is done
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        streamed = [j for j, k in enumerate(self._kind) if k == "disk" or (k == "host" and self.cuda)]
        # layer -> the first streamed layer at or after it, cyclically (-1: nothing streams)
        self._next_streamed = [min(streamed, key=lambda s: (s - j) % self.num_layers) if streamed else -1
                               for j in range(self.num_layers)]
        self._globals: dict[str, torch.Tensor] = {}
        self._embedding: MappedEmbedding | None = None
        try:
            self.ring, self.staging = self._make_rings()    # reserve the rings first: fail fast
            if self._piece_layers:
                self.pieces = PieceRing(store, self.mover, self.tiers[DEVICE], self._piece_layers, stream_pieces)
            if lookup_embedding:
                self._embedding = MappedEmbedding(store, verify=verify != "never")
                self._globals[EMBED_WEIGHT] = self._embedding.table
            self._load_resident(progress or (lambda done, total: None))
            if self.pieces is not None:
                self.pieces.start()
        except BaseException:
            if self.pieces is not None:
                self.pieces.close()
            self.mover.close()
            if self._embedding is not None:
                self._embedding.close()
            raise

    @classmethod
    def from_plan(cls, store: WeightStore, plan: "Plan", **options: object) -> "StreamingWeights":
        """The source a Plan describes (options: reader_threads, verify, direct, progress: bytes of the
        resident extents loaded so far, and their total)."""
        return cls(store, plan.device, plan.device_layers, plan.host_layers, plan.prefetch_depth,
                   plan.device_weight_budget_bytes, plan.host_weight_budget_bytes,
                   lookup_embedding=plan.embedding_lookup_bytes > 0, stream_pieces=plan.stream_pieces,
                   **options)  # type: ignore[arg-type]

    # -- construction ------------------------------------------------------------------------
    def _load_resident(self, progress: Callable[[int, int], None]) -> None:
        """Globals and device layers into the device tier; host layers into the host tier. Their quantized
        weights stay put, so the CPU ops' parameters are prepared once here (``kernels.quant.prepare``).
        ``progress(done_bytes, total_bytes)`` after each extent."""
        names = [e.name for e in self.store.global_extents() if not (e.name == "embed" and self._embedding)]
        names += [layer_extent_name(j) for j, k in enumerate(self._kind) if k == "device"]
        hosted = [j for j, kind in enumerate(self._kind) if kind == "host"]
        total = sum(self.store.extents[n].padded_nbytes for n in names + [layer_extent_name(j) for j in hosted])
        done = 0
        for name in names:
            tensors = prepare_layer(self._load_into(DEVICE, name), self.store.dtype)
            if name.startswith("layer."):
                self._resident[int(name.split(".")[1])] = tensors
            else:
                self._globals.update(tensors)
            done += self.store.extents[name].padded_nbytes
            progress(done, total)
        for j in hosted:
            tensors = prepare_layer(self._load_into(HOST, layer_extent_name(j)), self.store.dtype)
            if not self.cuda:                       # CPU: host RAM is as close as it gets
                self._resident[j] = tensors
            done += self.store.extents[layer_extent_name(j)].padded_nbytes
            progress(done, total)

    def _load_into(self, tier: str, name: str) -> dict[str, torch.Tensor]:
        """One extent into a new block of ``tier`` (CUDA device: through a temporary host buffer)."""
        extent = self.store.extents[name]
        (block,) = self.tiers[tier].alloc([name], [extent.padded_nbytes])
        if tier == HOST or not self.cuda:
            self.mover.complete(self.mover.prepare(DISK, tier, [name], dests=[block]))
        else:
            staged = aligned_host_tensor(extent.padded_nbytes)      # plain host memory, dropped after the copy
            self.mover.complete(self.mover.prepare(DISK, HOST, [name], dests=[staged]))
            self.mover.complete(self.mover.prepare(HOST, DEVICE, [name], sources=[staged], dests=[block]))
        return tensors_from_buffer(extent, block)

    def _make_rings(self) -> tuple[SlotPool | None, SlotPool | None]:
        streamed = [j for j, k in enumerate(self._kind) if k == "disk" or (k == "host" and self.cuda)]
        if not streamed:
            return None, None
        slot_bytes = max(self.store.layer(j).padded_nbytes for j in streamed)
        n = self.prefetch_depth + 1
        ring = self.tiers[DEVICE].pool(n, slot_bytes)
        staging = None
        if self.cuda and "disk" in self._kind:
            staging = self.tiers[HOST].pool(n, slot_bytes)
        return ring, staging

    # -- WeightSource ----------------------------------------------------------------------------
    def globals(self) -> dict[str, torch.Tensor]:
        return self._globals

    def prefetch(self, j: int) -> None:
        """Start moving layer j; for a resident j, the next streamed layer instead (wrapping into
        the next step). A resident layer inside the loop's window ``ahead(j, depth)`` would
        otherwise leave the disk idle while it computes (measured: busy 87-89% of a depth-1 step
        with 5 of 16 layers resident, 98-101% with this). It never needs more than depth + 1
        ring slots: the layers started from ``ahead(j, depth)`` are among the next ``depth``
        streamed layers after j."""
        j = self._next_streamed[j]
        if j < 0:
            return
        if j in self._flights:
            if not self.cuda:
                self._fill_ring(j)
            return
        assert self.ring is not None
        self._pump()
        self._start(j)
        if not self.cuda:
            self._fill_ring(j)

    def _fill_ring(self, j: int) -> None:
        """CPU: start the streamed layers after streamed layer ``j`` (in flight) while ring slots are free.

        The loop's window holds ``depth`` layers beside the one computing; while a resident layer
        computes, none of the ring's ``depth + 1`` slots is computing, so one stayed empty and the disk
        idle once the next layer had landed (measured: a batch-1 pass under load waited 0.49 s and
        computed 0.33 s of its 0.82 s, where the reads alone take 0.51 s). Reads land straight in the
        slot on the CPU; on CUDA the staging ring would bind first, so it keeps the window."""
        assert self.ring is not None
        while self.ring.n_free > 0:
            j = self._next_streamed[(j + 1) % self.num_layers]
            if j in self._flights:
                return
            self._start(j)

    def _start(self, j: int) -> None:
        """Move streamed layer ``j`` into a free ring slot (and a staging slot on CUDA)."""
        assert self.ring is not None
        name = layer_extent_name(j)
        flight = _Flight(j, self.ring.acquire(name))
        if self._kind[j] == "host":               # CUDA only: CPU host layers are resident
            flight.copy = self._copy_to_device(flight, self.tiers[HOST].get([name])[0], stage=None)
        elif self.cuda:
            flight.stage = self._acquire_stage(name)
            flight.read = self._read(name, flight.stage.tensor, HOST)
        else:
            flight.read = self._read(name, flight.slot.tensor, DEVICE)
        self._flights[j] = flight

    def wait(self, j: int) -> dict[str, torch.Tensor] | PieceLayer:  # type: ignore[override]
        if j in self._resident:
            return self._resident[j]
        if j in self._piece_layers:
            assert self.pieces is not None
            self._open_pieces = self.pieces.open(j)
            return self._open_pieces
        if j not in self._flights:                # prefetch_depth 0: nothing was started early
            self.prefetch(j)
        flight = self._flights[j]
        if self.cuda:
            if flight.copy is None:
                self._start_copy(flight)          # blocks until the disk read landed
            assert flight.copy is not None
            flight.copy.ready_on(torch.cuda.current_stream(self.device))
        elif flight.read is not None:
            self.mover.complete([flight.read])
        return tensors_from_buffer(self.store.layer(j), flight.slot.tensor)

    def release(self, j: int) -> None:
        if j in self._piece_layers:
            assert self._open_pieces is not None and self._open_pieces.layer == j, f"release({j}) without wait({j})"
            self._open_pieces.close()
            self._open_pieces = None
            return
        flight = self._flights.pop(j, None)
        if flight is None:
            assert j in self._resident, f"release({j}) without wait({j})"
            return
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._slot_free_event[flight.slot.index] = done
        assert self.ring is not None
        self.ring.release(flight.slot)

    # -- moves -------------------------------------------------------------------------------
    def _read(self, name: str, dest: torch.Tensor, dst_tier: str) -> MoveRecord:
        (record,) = self.mover.prepare(DISK, dst_tier, [name], dests=[dest])
        return record

    def _copy_to_device(self, flight: _Flight, source: torch.Tensor, stage: Slot | None) -> MoveRecord:
        """Copy ``source`` into the flight's device slot once the slot's last reader is done."""
        nbytes = self.store.layer(flight.layer).padded_nbytes
        free = self._slot_free_event.get(flight.slot.index)
        (record,) = self.mover.prepare(HOST, DEVICE, [layer_extent_name(flight.layer)], sources=[source[:nbytes]],
                                       dests=[flight.slot.tensor], after=[free] if free is not None else [])
        self._copies.append((record, stage))
        return record

    def _start_copy(self, flight: _Flight) -> None:
        """CUDA disk layer: wait for its read, then copy the staging slot to the device slot."""
        assert flight.read is not None and flight.stage is not None and flight.copy is None
        self.mover.complete([flight.read])
        flight.copy = self._copy_to_device(flight, flight.stage.tensor, stage=flight.stage)
        flight.stage = None                       # the copy entry hands it back when done

    def _reap(self, block_oldest: bool) -> None:
        """Fold finished copies into stats and free their staging slots (optionally wait for the oldest)."""
        keep = []
        for i, (record, stage) in enumerate(self._copies):
            if record.done() or (block_oldest and i == 0):
                self.mover.complete([record])
                if stage is not None:
                    assert self.staging is not None
                    self.staging.release(stage)
            else:
                keep.append((record, stage))
        self._copies = keep

    def _pump(self) -> None:
        """CUDA: start copies whose reads landed; reap finished copies."""
        if not self.cuda:
            return
        for flight in self._flights.values():
            if flight.read is not None and flight.copy is None and flight.read.done():
                self._start_copy(flight)
        self._reap(block_oldest=False)

    def _acquire_stage(self, name: str) -> Slot:
        """A pinned staging slot, waiting for the oldest pending copy (or read) if none is free."""
        assert self.staging is not None
        while self.staging.n_free == 0:
            if self._copies:
                self._reap(block_oldest=True)
            else:
                pending = [f for f in self._flights.values() if f.stage is not None]
                assert pending, "staging ring exhausted with nothing in flight"
                self._start_copy(min(pending, key=lambda f: f.read.t_submit_s if f.read else 0.0))
        return self.staging.acquire(name)

    # -- reporting and teardown ----------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Weight bytes per tier, then bytes / GB/s / busy and wait seconds per link (``weight_stats``)."""
        return weight_stats(self.tiers, self._kind, self.mover)

    def close(self) -> None:
        """Let in-flight moves finish, then drop every buffer and close the reader."""
        records = [r for f in self._flights.values() for r in (f.read, f.copy) if r is not None]
        records += [r for r, _ in self._copies]
        try:
            for record in records:
                try:
                    record.wait()
                except (StoreError, OSError):
                    # A read that failed (checksum mismatch, already recorded as damage; or an I/O
                    # error) stays in its flight: either wait() raised it to the layer loop, which
                    # is unwinding now and closes us, or it was a prefetch never consumed. Raising it
                    # again here would hide the error the caller is handling. Other exceptions are bugs.
                    continue
        finally:
            if self.pieces is not None:
                self.pieces.close()
            self._flights.clear()
            self._copies.clear()
            self.mover.close()
            self._resident.clear()
            self._globals.clear()
            if self._embedding is not None:
                self._embedding.close()
