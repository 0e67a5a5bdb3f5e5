"""Disk layers streamed in pieces: one CRC block at a time through a small ring, computed as they land.

Why this module exists: a layer ring holds whole layers (``prefetch_depth + 1`` slots of a layer each),
memory that could hold resident layers instead; and on the project's CPU machine reads that land in a
large buffer run slower than reads into a small reused one (docs/benchmarks.md, session 16: 3.0-3.3
GB/s into 16 MiB, 2.0-2.5 into 48-172 MiB). A 16-bit layer's matrices are stored in the order the layer
uses them (q, k, v, o, gate, up, down: ``io.store.plan_layout``) and a product's output rows are
independent, so a layer can be computed from row blocks of its matrices as they arrive:

* ``PieceRing`` reads the CRC blocks (4 MiB: ``io.store.CRC_BLOCK_BYTES``) of every layer it streams,
  in that order and cyclically (each pass wraps into the next), into a ring of a few slots, and
  starts the next read whenever the layer math is done with the oldest piece;
* ``PieceLayer`` hands the layer math (``model_pieces``) each matrix as row blocks (waiting for the
  pieces a block needs, releasing the ones behind it); its small tensors (norms, biases) are read
  once at construction and stay.

Row blocks sit on a fixed grid per matrix (``MatrixSpan.block_rows`` rows, at most one piece of bytes,
a multiple of 32 rows where a piece holds 64 or more: the GEMM runs faster on such blocks),
so the products see a few fixed shapes (each compiled CPU kernel is built once) and the same blocks on
every pass. A block spans at most two pieces; one that runs past the ring's end continues into a
scratch slot after it, into which its tail is copied from the ring's start.

CPU only: on CUDA the layer ring overlaps copies with compute on streams instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch

from tierkv.io.buffers import aligned_host_tensor, round_up
from tierkv.io.mover import DEVICE, DISK, MoveRecord, Mover
from tierkv.io.store import Extent, StoreError, WeightStore, layer_extent_name, piece_name
from tierkv.io.tiers import MemoryTier

__all__ = ["BLOCK_ROW_MULTIPLE", "MATRIX_ORDER", "PIECE_SLOTS", "LayerPieces", "MatrixSpan", "PieceLayer", "PieceRing",
           "block_rows", "piece_layout", "piece_ring_bytes", "small_tensor_bytes"]

# the layer's matrices in the order its math uses them; a layer streams in pieces only if stored so
MATRIX_ORDER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
PIECE_DTYPES = ("bfloat16", "float16", "float32")
PIECE_SLOTS = 8               # ring slots of 4 MiB: measured best on the 0.85B bench (4: 3.7, 8: 4.2-4.4, 16: 3.3-3.6 tok/s)
# block rows are a multiple of this where a piece holds at least two multiples: oneDNN's bf16 GEMM (AMX, 2
# threads, 384-512 rows of x) ran 1.2-1.3 TFLOP/s on 372-row blocks of a (2048, 5632) down_proj, 1.6-1.7 on 352
BLOCK_ROW_MULTIPLE = 32


@dataclass(frozen=True)
class MatrixSpan:
    """Where one (rows, cols) matrix sits in its extent and how it is cut into row blocks."""

    key: str
    offset: int                 # bytes from the extent's start
    rows: int
    cols: int
    dtype: torch.dtype
    row_bytes: int
    block_rows: int             # rows per block: as many as fit one piece (``block_rows``)


@dataclass(frozen=True)
class LayerPieces:
    """One layer's pieces: CRC blocks ``first`` .. ``last`` of its extent hold every matrix byte."""

    layer: int
    extent: str
    first: int
    last: int
    piece_bytes: int
    matrices: Mapping[str, MatrixSpan]
    small: tuple[str, ...]      # the other tensors (1-D: norms, biases), read once and kept

    @property
    def count(self) -> int:
        return self.last - self.first + 1


def piece_layout(extent: Extent, layer: int, piece_bytes: int) -> LayerPieces | None:
    """How layer ``layer``'s extent streams in ``piece_bytes`` pieces, or None where it cannot: a quantized
    tensor, a dtype outside ``PIECE_DTYPES``, matrices other than ``MATRIX_ORDER`` or stored out of that
    order, a tensor of more than two dimensions, a row longer than a piece."""
    matrices, small = {}, []
    for key, entry in extent.tensors.items():
        if entry.quant is not None or entry.dtype not in PIECE_DTYPES or len(entry.shape) > 2:
            return None
        if len(entry.shape) == 1:
            small.append(key)
            continue
        rows, cols = entry.shape
        row_bytes = entry.nbytes // max(1, rows)
        if key not in MATRIX_ORDER or row_bytes > piece_bytes:
            return None
        matrices[key] = MatrixSpan(key, entry.offset, rows, cols, getattr(torch, entry.dtype), row_bytes,
                                   block_rows(piece_bytes, row_bytes))
    offsets = [matrices[k].offset for k in MATRIX_ORDER if k in matrices]
    if set(matrices) != set(MATRIX_ORDER) or offsets != sorted(offsets):
        return None
    down = matrices[MATRIX_ORDER[-1]]
    end = down.offset + down.rows * down.row_bytes
    return LayerPieces(layer, extent.name, offsets[0] // piece_bytes, (end - 1) // piece_bytes, piece_bytes,
                       matrices, tuple(small))


def block_rows(piece_bytes: int, row_bytes: int) -> int:
    """Rows per block of a matrix with ``row_bytes`` rows: as many as one piece holds, rounded down to a
    multiple of ``BLOCK_ROW_MULTIPLE`` where the piece holds at least two multiples."""
    rows = piece_bytes // row_bytes
    return rows // BLOCK_ROW_MULTIPLE * BLOCK_ROW_MULTIPLE if rows >= 2 * BLOCK_ROW_MULTIPLE else rows


def small_tensor_bytes(extent: Extent, keys: Sequence[str]) -> int:
    """The block a layer's small tensors take once copied out (each 64-byte aligned, rounded to 4 KiB)."""
    return round_up(sum(round_up(extent.tensors[k].nbytes, 64) for k in keys))


def piece_ring_bytes(piece_bytes: int, slots: int = PIECE_SLOTS) -> int:
    """The ring's memory: ``slots`` pieces and the scratch slot a block past the ring's end continues in."""
    return (slots + 1) * piece_bytes


class PieceRing:
    """Reads the pieces of ``layers`` (layer -> its ``LayerPieces``) in layer order, cyclically, into
    ``slots`` slots of the ``tier`` (the device tier on a CPU-only machine), through ``mover``'s disk link.

    Sequence number s holds piece ``order[s % len(order)]`` in slot ``s % slots``; pieces are released
    oldest first (``release_until``), each release starting the next read. ``open(j)`` returns layer j's
    ``PieceLayer`` for this pass; a pass that did not reach j in order (an error ended the previous pass
    mid-layer) waits for the reads in flight and restarts the stream at j.
    """

    def __init__(self, store: WeightStore, mover: Mover, tier: MemoryTier, layers: Mapping[int, LayerPieces],
                 slots: int = PIECE_SLOTS) -> None:
        assert layers and slots >= 2, (len(layers), slots)
        self.store, self.mover, self.slots = store, mover, slots
        self.piece_bytes = store.crc_block_bytes
        self.layers = dict(layers)
        (self.buffer,) = tier.alloc(["pieces"], [piece_ring_bytes(self.piece_bytes, slots)])
        self.order = [(j, p) for j in sorted(self.layers) for p in range(self.layers[j].first, self.layers[j].last + 1)]
        self._start_of = {}
        for i, (j, p) in enumerate(self.order):
            self._start_of.setdefault(j, i)
        self._head = self._next = 0               # oldest unreleased / next to read (sequence numbers)
        self._records: dict[int, MoveRecord] = {}
        self.small = {j: self._load_small(tier, lp) for j, lp in self.layers.items()}

    # -- construction ------------------------------------------------------------------------
    def _load_small(self, tier: MemoryTier, lp: LayerPieces) -> dict[str, torch.Tensor]:
        """Layer ``lp``'s small tensors, read (verified as the disk tier says) and copied into a block of ``tier``."""
        extent = self.store.extents[lp.extent]
        if not lp.small:
            return {}
        (block,) = tier.alloc([f"{lp.extent}.small"], [small_tensor_bytes(extent, lp.small)])
        pieces: dict[int, torch.Tensor] = {}
        out, pos = {}, 0
        for key in lp.small:
            entry = extent.tensors[key]
            lo, hi = entry.offset // self.piece_bytes, (entry.offset + entry.nbytes - 1) // self.piece_bytes
            for p in range(lo, hi + 1):
                if p not in pieces:
                    pieces[p] = self._read_now(lp.extent, p)
            held = pieces[lo] if lo == hi else torch.cat([pieces[p] for p in range(lo, hi + 1)])   # rarely two
            raw = held[entry.offset - lo * self.piece_bytes:][:entry.nbytes]
            dest = block[pos:pos + entry.nbytes]
            dest.copy_(raw)
            out[key] = dest.view(getattr(torch, entry.dtype)).view(entry.shape)
            pos += round_up(entry.nbytes, 64)
        return out

    def _read_now(self, extent_name: str, p: int) -> torch.Tensor:
        """Piece ``p`` of an extent into a temporary buffer (construction only), waited for."""
        name = piece_name(extent_name, p)
        nbytes = self.store.piece_range(name)[2]
        buf = aligned_host_tensor(nbytes)
        self.mover.complete(self.mover.prepare(DISK, DEVICE, [name], dests=[buf]))
        return buf[:nbytes]

    # -- the stream --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the first reads (the stream then runs as pieces are released)."""
        self._pump()

    def _pump(self) -> None:
        while self._next - self._head < self.slots:
            j, p = self.order[self._next % len(self.order)]
            name = piece_name(self.layers[j].extent, p)
            slot = (self._next % self.slots) * self.piece_bytes
            dest = self.buffer[slot:slot + self.store.piece_range(name)[2]]
            (self._records[self._next],) = self.mover.prepare(DISK, DEVICE, [name], dests=[dest])
            self._next += 1

    def open(self, j: int) -> "PieceLayer":
        """Layer j's pieces for this pass (restarting the stream at j when it is not next in order)."""
        start = self._start_of[j]
        if self._head % len(self.order) != start:
            self._restart(start)
        return PieceLayer(self, self.layers[j], self._head, self.small[j])

    def _restart(self, start: int) -> None:
        self._drain()
        self._head = self._next = self._next + (start - self._next) % len(self.order)
        self._pump()

    def wait_through(self, seq: int) -> None:
        """Block until pieces up to ``seq`` have landed (re-raising a failed read: a checksum mismatch)."""
        assert self._head <= seq < self._next, (self._head, seq, self._next)
        self.mover.complete([self._records[s] for s in range(self._head, seq + 1)])

    def release_until(self, seq: int) -> None:
        """Pieces before ``seq`` are done with: their slots take the next reads."""
        while self._head < seq:
            record = self._records.pop(self._head)
            if not record.completed:          # released unread (the pass left the layer early)
                self._settle(record)
            self._head += 1
        self._pump()

    def view(self, seq: int, start: int, nbytes: int) -> torch.Tensor:
        """Bytes [start, start + nbytes) from the start of piece ``seq`` (landed, as the following one if the
        range runs into it), contiguous: past the ring's end the tail is copied into the scratch slot."""
        lo = (seq % self.slots) * self.piece_bytes + start
        end, ring_end = lo + nbytes, self.slots * self.piece_bytes
        if end > ring_end:
            self.buffer[ring_end:end].copy_(self.buffer[:end - ring_end])
        return self.buffer[lo:end]

    def _settle(self, record: MoveRecord) -> None:
        """Wait for a read nobody will use; its failure (recorded as damage already) is not raised here."""
        try:
            self.mover.complete([record])
        except (StoreError, OSError):
            record.completed = True

    def _drain(self) -> None:
        for seq in sorted(self._records):
            self._settle(self._records.pop(seq))
        self._head = self._next

    def close(self) -> None:
        self._drain()


class PieceLayer:
    """One pass's view of a streamed layer: its small tensors, and each matrix as row blocks that land."""

    def __init__(self, ring: PieceRing, pieces: LayerPieces, base: int, small: dict[str, torch.Tensor]) -> None:
        self.ring, self.pieces, self.base, self.small = ring, pieces, base, small

    @property
    def layer(self) -> int:
        return self.pieces.layer

    def shape(self, key: str) -> tuple[int, int]:
        m = self.pieces.matrices[key]
        return m.rows, m.cols

    def _seq(self, piece: int) -> int:
        return self.base + piece - self.pieces.first

    def blocks(self, key: str) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(r0, r1, rows (r1 - r0, cols)) of matrix ``key``, block after block as the pieces land. A block is
        valid until the next one is asked for: the pieces behind it are released then. Matrices must be
        asked for in ``MATRIX_ORDER``."""
        m, size = self.pieces.matrices[key], self.pieces.piece_bytes
        for r0 in range(0, m.rows, m.block_rows):
            r1 = min(m.rows, r0 + m.block_rows)
            lo, hi = m.offset + r0 * m.row_bytes, m.offset + r1 * m.row_bytes
            first = self._seq(lo // size)
            self.ring.release_until(first)
            self.ring.wait_through(self._seq((hi - 1) // size))
            raw = self.ring.view(first, lo - (lo // size) * size, hi - lo)
            yield r0, r1, raw.view(m.dtype).view(r1 - r0, m.cols)

    def close(self) -> None:
        """The layer's compute is finished: every piece of it is released."""
        self.ring.release_until(self._seq(self.pieces.last) + 1)


def layer_pieces(store: WeightStore, layers: Sequence[int]) -> dict[int, LayerPieces] | None:
    """``piece_layout`` of each of ``layers`` in ``store`` (its CRC blocks as pieces), or None if any cannot."""
    out = {}
    for j in layers:
        lp = piece_layout(store.extents[layer_extent_name(j)], j, store.crc_block_bytes)
        if lp is None:
            return None
        out[j] = lp
    return out
