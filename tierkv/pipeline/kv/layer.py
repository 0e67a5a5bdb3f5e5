"""One layer of a tiered KV cache: its tensors and the records of its moves in flight.

Why this module exists: each layer owns a device slot pool, host buffers, the always-resident chunk
index (abstracts, key codes and ellipsoids) and a chunk table. The table (``kv.table``) is the one record of
which tier holds each chunk and in which device slot / host buffer; the tensors here are storage,
and the device-side ``slot_map`` (what the attention kernel reads) is a mirror of the table.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch

from tierkv.io.buffers import ChunkArenas, pinning_available
from tierkv.kernels.ellipsoid import no_moments
from tierkv.kernels.sketch import sketch_bytes_per_token
from tierkv.pipeline.kv.codec import ChunkCodec
from tierkv.pipeline.kv.geometry import LayerGeometry
from tierkv.pipeline.kv.sizing import keeps_ellipsoids
from tierkv.pipeline.kv.table import ChunkKey, KVChunkTable, Tier
from tierkv.pipeline.kv.workers import KVMove

__all__ = ["Fetch", "LayerKV", "Wave", "Write"]

DEVICE, HOST, DISK = Tier.DEVICE, Tier.HOST, Tier.DISK
TierPair = tuple[Tier, Tier]


@dataclass(frozen=True, eq=False)
class Fetch:
    """Chunks being copied into resident slots (a table move from ``pair[0]`` to the device)."""

    pair: TierPair
    keys: tuple[ChunkKey, ...]
    slots: tuple[int, ...]
    records: tuple[KVMove, ...]   # one per chunk, all of one job

    @property
    def job(self) -> Future:
        return self.records[0].job


@dataclass(frozen=True, eq=False)
class Wave:
    """Chunks being streamed into scratch slots for one batch of attention (pinned, not moved)."""

    keys: tuple[ChunkKey, ...]
    slots: tuple[int, ...]
    records: tuple[KVMove, ...]   # one per chunk (host and disk chunks: two jobs)

    def entries(self) -> list[tuple[int, int, int]]:
        return [(k.seq, k.chunk, s) for k, s in zip(self.keys, self.slots)]


@dataclass(frozen=True, eq=False)
class Write:
    """A closed chunk (all sequences) being written behind to disk from a host snapshot."""

    keys: tuple[ChunkKey, ...]
    records: tuple[KVMove, ...]   # one per chunk, all of one job
    nbytes: int

    @property
    def job(self) -> Future:
        return self.records[0].job


class LayerKV:
    """One layer's chunks: device slot pool, host buffers, abstracts and the chunk table."""

    def __init__(self, layer: int, geo: LayerGeometry, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, host_bytes: int | None, disk: bool, sink_chunks: int, sketch: bool,
                 kv_quant: str) -> None:
        n, s, c = geo.resident_slots + geo.scratch_slots, geo.chunk_tokens, geo.max_chunks
        self.layer, self.geo, self.batch = layer, geo, batch
        self.k_pool = torch.zeros((n, kv_heads, s, head_dim), dtype=dtype, device=device)   # (N, Hkv, S, D)
        self.v_pool = torch.zeros_like(self.k_pool)
        self.slot_lens = torch.zeros(n, dtype=torch.int32, device=device)                   # (N,)
        self.slot_map = torch.full((batch, c), -1, dtype=torch.int32, device=device)        # (B, C_max) mirror
        self.kmin = torch.zeros((batch, kv_heads, c, head_dim), dtype=dtype, device=device)  # (B, Hkv, C_max, D)
        self.kmax = torch.zeros_like(self.kmin)
        self.chunk_sizes = torch.zeros(c, dtype=torch.int32, device=device)                  # (C_max,)
        self.codes = torch.zeros((batch, kv_heads, c, s, sketch_bytes_per_token(head_dim)), dtype=torch.uint8,
                                 device=device) if sketch else None                          # (B, Hkv, C_max, S, P)
        ellipsoids = sketch and keeps_ellipsoids(s)
        self.centre = torch.zeros_like(self.kmin) if ellipsoids else None                   # (B, Hkv, C_max, D)
        self.axes2 = torch.zeros_like(self.kmin) if ellipsoids else None                    # key ellipsoids
        self.moments = no_moments(batch, kv_heads, head_dim, device)                        # of the coded keys
        self.n_coded = 0                                                                     # chunks with codes
        self.free = list(range(geo.resident_slots))[::-1]     # resident slots no chunk holds
        self.scratch = list(range(geo.resident_slots, n))
        self.codec = ChunkCodec(kv_quant, kv_heads, s, head_dim, dtype)   # how chunks are held off the device
        assert self.codec.cold_bytes == geo.cold_bytes, (self.codec.cold_bytes, geo)
        self.host_bufs: list[torch.Tensor] = []               # host slot -> codec.host_view of host_pool
        self.host_free: list[int] = []                        # host slots no chunk holds
        self.host_pool = ChunkArenas(geo.cold_bytes, host_bytes, pinned=device.type == "cuda" and pinning_available())
        host_room = None if host_bytes is None else self.host_pool.capacity * geo.cold_bytes  # what really fits
        budgets = {DEVICE: geo.resident_slots * geo.slot_bytes, HOST: host_room, DISK: None if disk else 0}
        self.table = KVChunkTable(budgets, sink_chunks=sink_chunks, recent_tokens=s)
        self.n_chunks = 0
        self.tokens = 0
        self.fetching: dict[ChunkKey, Fetch] = {}
        self.writing: list[Write] = []
        self.prefetched: Wave | None = None
        self.prev_needed: list[ChunkKey] = []
        self.spec: set[ChunkKey] = set()

    def key(self, chunk: int, seq: int) -> ChunkKey:
        return ChunkKey(self.layer, chunk, seq)

    @property
    def nbytes(self) -> int:
        tensors = (self.k_pool, self.v_pool, self.slot_lens, self.slot_map, self.kmin, self.kmax, self.chunk_sizes,
                   self.codes, self.centre, self.axes2)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # -- residency, as the table records it --------------------------------------------------

    def slot_of(self, key: ChunkKey) -> int | None:
        """Device slot of a chunk on the device or being fetched into it; None otherwise."""
        return self.table.slot_of(key)

    def resident(self) -> list[ChunkKey]:
        """Chunks whose tier is the device (their data is in their slot)."""
        return self.table.on_tier(DEVICE)

    def all_resident(self) -> bool:
        return self.table.count(DEVICE) == self.batch * self.n_chunks

    def host_buf(self, key: ChunkKey) -> torch.Tensor:
        """Host buffer of a chunk on the host (``codec.host_view``: (2, Hkv, S, D), or packed codes)."""
        slot = self.table.host_slot_of(key)
        assert slot is not None, f"{key} is not on the host"
        return self.host_bufs[slot]

    def host_take(self) -> int:
        """A free host buffer (allocated from the arenas when none is free); returns its host slot."""
        if self.host_free:
            return self.host_free.pop()
        self.host_bufs.append(self.codec.host_view(self.host_pool.take()))
        return len(self.host_bufs) - 1

    def slot_pair(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) views (Hkv, S, D) of one device slot."""
        return self.k_pool[slot], self.v_pool[slot]

    def close(self) -> None:
        """Unpin and drop the host buffers; the layer holds nothing afterwards."""
        self.host_pool.close()
        self.host_bufs, self.host_free = [], []
