"""The KV chunk table: which tier holds each KV chunk, what may move, and what must move next.

Why this module exists: the tiered KV cache keeps every layer's KV in chunks spread over device
memory, host memory and disk, and each decode step selects a few chunks per layer that must be on
the device. Deciding where chunks are, which ones may be evicted and which copies to issue is pure
bookkeeping, so it lives here with no tensors and no device (DESIGN principle 5): it is tested on
any machine and the pipeline only executes the plans it returns.

Model:
- A chunk is keyed by ``ChunkKey(layer, chunk, seq)``; chunks of one (seq, layer) are added in
  order (chunk ids 0, 1, 2...), the last one is the open chunk that decode appends to.
- Each chunk sits on one tier, with its size in tokens and bytes per tier (``nbytes`` on the device,
  ``cold_nbytes`` on the host and disk: smaller when the cold tiers hold it quantized), and where on that tier: its
  device slot (set while it is on the device or being fetched into it) and its host slot (set
  while it is on the host). This table is the one record of residency; the cache's slot pool,
  host buffers and device-side slot map follow it. Per-tier byte budgets (None = unbounded) are
  never exceeded; a chunk in flight counts on both its source and destination until the move
  finishes.
- Pins count users of a chunk (a copy in flight, a kernel reading it); pinned chunks never move.
- Eviction order on the device: least recently selected first. Never evicted: pinned chunks, the
  first ``sink_chunks`` chunks of each (seq, layer), and its recent window (the last chunks holding
  ``recent_tokens`` tokens), the same protection that ``kernels.importance`` forces into every
  selection, plus whatever the current step selected.
- ``plan_moves(selected)`` returns the batched moves that make ``selected`` device-resident:
  evictions first (device -> host while the host budget lasts, else device -> disk), then fetches
  (host -> device, disk -> device), as tuples of keys per (source, destination) tier pair.
  ``begin(moves, slots)`` pins, reserves and records the device slots fetched chunks land in;
  ``finish(moves, host_slots)`` commits (recording the host slots evicted chunks went to) and unpins.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Mapping, NamedTuple

from tierkv.errors import TierkvError

__all__ = ["Tier", "ChunkKey", "MovePlan", "KVBudgetError", "KVChunkTable"]


class Tier(str, Enum):
    """Where a chunk's bytes live, fastest first. Members equal and hash as their names, so they
    work as keys next to the plain "device"/"host"/"disk" names of ``tierkv.io.tiers``."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value


class ChunkKey(NamedTuple):
    """One KV chunk: ``chunk`` is its index within (seq, layer), counting from 0."""

    layer: int
    chunk: int
    seq: int = 0


class KVBudgetError(TierkvError):
    """A byte budget cannot hold what is asked; the message gives the sizes and what to change."""


TierPair = tuple[Tier, Tier]


@dataclass(frozen=True)
class MovePlan:
    """Batched moves for one step: run every eviction, then every fetch.

    evict: (Tier.DEVICE, dst) -> keys leaving the device to make room.
    fetch: (src, Tier.DEVICE) -> keys the step selected that are not on the device yet.
    """

    evict: Mapping[TierPair, tuple[ChunkKey, ...]]
    fetch: Mapping[TierPair, tuple[ChunkKey, ...]]

    def moves(self) -> list[tuple[TierPair, tuple[ChunkKey, ...]]]:
        """All (src, dst) batches in execution order (evictions before fetches)."""
        return [*self.evict.items(), *self.fetch.items()]

    def __bool__(self) -> bool:
        return bool(self.evict or self.fetch)


@dataclass
class _Chunk:
    tier: Tier
    tokens: int
    nbytes: int               # on the device
    cold: int                 # on the host or disk
    pins: int = 0
    dest: Tier | None = None  # set while a move is in flight
    slot: int | None = None   # device slot: on the device, or being fetched into it
    host_slot: int | None = None  # host buffer: on the host (until a fetch from it finishes)


def _size(chunk: _Chunk, tier: Tier) -> int:
    return chunk.nbytes if tier is Tier.DEVICE else chunk.cold


def _fmt(nbytes: int | None) -> str:
    if nbytes is None:
        return "unbounded"
    return f"{nbytes / 2**20:.1f}MiB" if nbytes >= 2**20 else f"{nbytes}B"


class KVChunkTable:
    """Tier, pins and eviction order of every KV chunk; plans the moves each step needs.

    Not thread-safe: one table belongs to one engine's schedule loop.
    """

    def __init__(
        self, budgets_bytes: Mapping[Tier, int | None], *, sink_chunks: int = 1, recent_tokens: int = 1
    ) -> None:
        """budgets_bytes: byte budget per tier (missing or None = unbounded); sink_chunks and
        recent_tokens: chunks protected from eviction, as in ``kernels.importance``."""
        given = {Tier(t): budget for t, budget in budgets_bytes.items()}  # "host" works as well as Tier.HOST
        for tier, budget in given.items():
            if budget is not None and budget < 0:
                raise ValueError(f"budget for {tier.value} must be >= 0 bytes, got {budget}")
        if sink_chunks < 0 or recent_tokens < 0:
            raise ValueError(f"sink_chunks and recent_tokens must be >= 0, got {sink_chunks}, {recent_tokens}")
        self._budget = {t: given.get(t) for t in Tier}
        self._used = {t: 0 for t in Tier}  # bytes, in-flight destinations included
        self._chunks: dict[ChunkKey, _Chunk] = {}
        self._order: dict[tuple[int, int], list[int]] = {}  # (seq, layer) -> chunk ids in order
        self._lru: dict[Tier, OrderedDict[ChunkKey, None]] = {t: OrderedDict() for t in Tier}
        self.sink_chunks = sink_chunks
        self.recent_tokens = recent_tokens

    # -- queries -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, key: object) -> bool:
        return key in self._chunks

    def _get(self, key: ChunkKey) -> _Chunk:
        try:
            return self._chunks[key]
        except KeyError:
            raise KeyError(f"unknown KV chunk {key}; add() it first") from None

    def tier_of(self, key: ChunkKey) -> Tier:
        return self._get(key).tier

    def tokens_of(self, key: ChunkKey) -> int:
        return self._get(key).tokens

    def pins_of(self, key: ChunkKey) -> int:
        return self._get(key).pins

    def in_flight(self, key: ChunkKey) -> bool:
        return self._get(key).dest is not None

    def slot_of(self, key: ChunkKey) -> int | None:
        """The device slot holding the chunk (or receiving it, while fetched); None off the device."""
        return self._get(key).slot

    def host_slot_of(self, key: ChunkKey) -> int | None:
        """The host buffer holding the chunk; None when it is not on the host."""
        return self._get(key).host_slot

    def on_tier(self, tier: Tier) -> list[ChunkKey]:
        """Chunks whose tier is ``tier`` (moves in flight count on their source), least recently selected first."""
        return list(self._lru[tier])

    def count(self, tier: Tier) -> int:
        """How many chunks ``on_tier(tier)`` holds."""
        return len(self._lru[tier])

    def keys(self) -> list[ChunkKey]:
        return list(self._chunks)

    def chunks(self, layer: int, seq: int = 0) -> list[ChunkKey]:
        """Keys of one (seq, layer) in chunk order."""
        return [ChunkKey(layer, c, seq) for c in self._order.get((seq, layer), [])]

    def used_bytes(self, tier: Tier) -> int:
        return self._used[tier]

    def budget_bytes(self, tier: Tier) -> int | None:
        return self._budget[tier]

    def free_bytes(self, tier: Tier) -> float:
        """Bytes still free on ``tier`` (inf when unbounded)."""
        budget = self._budget[tier]
        return float("inf") if budget is None else budget - self._used[tier]

    def by_tier(self, keys: Iterable[ChunkKey]) -> dict[Tier, list[ChunkKey]]:
        """Group keys by the tier holding them."""
        groups: dict[Tier, list[ChunkKey]] = {}
        for key in keys:
            groups.setdefault(self._get(key).tier, []).append(key)
        return groups

    def protected(self, key: ChunkKey) -> bool:
        """True for sink and recent-window chunks of the key's (seq, layer)."""
        ids = self._order[(key.seq, key.layer)]
        if key.chunk in ids[: self.sink_chunks]:
            return True
        later = 0
        for cid in reversed(ids):  # the recent window is a suffix of the chunks
            if later >= self.recent_tokens:
                return False
            if cid == key.chunk:
                return True
            later += self._chunks[ChunkKey(key.layer, cid, key.seq)].tokens
        return False

    def eviction_order(self, tier: Tier = Tier.DEVICE) -> list[ChunkKey]:
        """Chunks on ``tier`` that may leave it, least recently selected first."""
        return [k for k in self._lru[tier] if self._evictable(k)]

    def _evictable(self, key: ChunkKey) -> bool:
        chunk = self._chunks[key]
        return chunk.pins == 0 and chunk.dest is None and not self.protected(key)

    # -- mutations -----------------------------------------------------------------------------

    def _charge(self, tier: Tier, nbytes: int, what: str) -> None:
        """Count nbytes more on tier, or raise KVBudgetError naming the sizes."""
        if nbytes > self.free_bytes(tier):
            raise KVBudgetError(
                f"{what} needs {_fmt(nbytes)} on {tier.value} but only {_fmt(int(self.free_bytes(tier)))} "
                f"of {_fmt(self._budget[tier])} is free; raise the {tier.value} budget or use smaller chunks"
            )
        self._used[tier] += nbytes

    def add(self, key: ChunkKey, tokens: int, nbytes: int, tier: Tier = Tier.DEVICE, *, slot: int | None = None,
            host_slot: int | None = None, cold_nbytes: int | None = None) -> None:
        """Register a new chunk on ``tier`` (at device ``slot`` / ``host_slot`` when the cache has
        slots); chunk ids of a (seq, layer) must come in order 0, 1, 2... ``nbytes`` is its size on
        the device, ``cold_nbytes`` on the host and disk (default: the same)."""
        if key in self._chunks:
            raise KeyError(f"KV chunk {key} already exists")
        ids = self._order.setdefault((key.seq, key.layer), [])
        if key.chunk != len(ids):
            raise ValueError(
                f"chunks of (seq {key.seq}, layer {key.layer}) must be added in order: "
                f"expected chunk {len(ids)}, got {key.chunk}"
            )
        cold = nbytes if cold_nbytes is None else cold_nbytes
        if tokens < 1 or nbytes < 0 or cold < 0:
            raise ValueError(f"a chunk needs tokens >= 1 and nbytes >= 0, got {tokens}, {nbytes}, {cold}")
        chunk = _Chunk(tier, tokens, nbytes, cold, slot=slot if tier is Tier.DEVICE else None,
                       host_slot=host_slot if tier is Tier.HOST else None)
        self._charge(tier, _size(chunk, tier), f"new KV chunk {key}")
        ids.append(key.chunk)
        self._chunks[key] = chunk
        self._lru[tier][key] = None

    def grow(self, key: ChunkKey, tokens: int, nbytes: int, cold_nbytes: int | None = None) -> None:
        """Set the new size of the open (last) chunk after decode appended tokens to it (sizes as in ``add``)."""
        chunk = self._get(key)
        assert key.chunk == self._order[(key.seq, key.layer)][-1], f"only the open chunk grows, not {key}"
        assert chunk.dest is None, f"chunk {key} grew while in flight"
        cold = nbytes if cold_nbytes is None else cold_nbytes
        if tokens < chunk.tokens or nbytes < chunk.nbytes or cold < chunk.cold:
            raise ValueError(
                f"chunk {key} can only grow: {chunk.tokens} -> {tokens} tokens, {chunk.nbytes} -> {nbytes} bytes"
            )
        self._charge(chunk.tier, _size(_Chunk(chunk.tier, tokens, nbytes, cold), chunk.tier) - _size(chunk, chunk.tier),
                     f"growing KV chunk {key}")
        chunk.tokens, chunk.nbytes, chunk.cold = tokens, nbytes, cold

    def drop_sequence(self, seq: int) -> list[ChunkKey]:
        """Forget every chunk of a finished sequence; returns their keys (for the stores to free)."""
        keys = [k for k in self._chunks if k.seq == seq]
        for key in keys:
            chunk = self._chunks[key]
            assert chunk.pins == 0 and chunk.dest is None, f"dropping pinned or moving chunk {key}"
        for key in keys:
            chunk = self._chunks.pop(key)
            self._used[chunk.tier] -= _size(chunk, chunk.tier)
            del self._lru[chunk.tier][key]
        for seq_layer in [sl for sl in self._order if sl[0] == seq]:
            del self._order[seq_layer]
        return keys

    def pin(self, keys: Iterable[ChunkKey]) -> None:
        """Mark chunks as in use (a copy or kernel reads them): they cannot move until unpinned."""
        for key in keys:
            self._get(key).pins += 1

    def unpin(self, keys: Iterable[ChunkKey]) -> None:
        """Undo one pin per key; unpinning a chunk that is not pinned is a bug."""
        for key in keys:
            chunk = self._get(key)
            assert chunk.pins > 0, f"unpin of KV chunk {key} that is not pinned"
            chunk.pins -= 1

    # -- planning ------------------------------------------------------------------------------

    def plan_moves(self, selected: Iterable[ChunkKey]) -> MovePlan:
        """Moves that make every selected chunk device-resident within the device budget.

        Also records the selection for the eviction order (selected chunks become most recent).
        Raises KVBudgetError when the selection alone exceeds the device budget, or when pinned
        and protected chunks leave no room.
        """
        keys = list(dict.fromkeys(selected))
        chunks = [self._get(k) for k in keys]
        for key, chunk in zip(keys, chunks):
            if chunk.dest not in (None, Tier.DEVICE):
                raise RuntimeError(f"selected KV chunk {key} is moving to {chunk.dest.value}; finish() that move first")
        budget = self._budget[Tier.DEVICE]
        total = sum(c.nbytes for c in chunks)
        if budget is not None and total > budget:
            raise KVBudgetError(
                f"the selected KV chunks need {_fmt(total)} but the device KV budget is {_fmt(budget)}; "
                "lower the KV token budget or raise --device-mem"
            )
        for key, chunk in zip(keys, chunks):
            self._lru[chunk.tier].move_to_end(key)
        fetch = [k for k, c in zip(keys, chunks) if c.tier is not Tier.DEVICE and c.dest is None]
        deficit = sum(self._chunks[k].nbytes for k in fetch) - self.free_bytes(Tier.DEVICE)
        evict = self._pick_victims(deficit, set(keys)) if deficit > 0 else {}
        by_src: dict[TierPair, list[ChunkKey]] = {}
        for key in fetch:
            by_src.setdefault((self._chunks[key].tier, Tier.DEVICE), []).append(key)
        order = sorted(by_src, key=lambda pair: list(Tier).index(pair[0]))  # host before disk
        return MovePlan(evict=evict, fetch={pair: tuple(by_src[pair]) for pair in order})

    def _pick_victims(self, deficit: float, selected: set[ChunkKey]) -> dict[TierPair, tuple[ChunkKey, ...]]:
        """Least recently selected evictable device chunks freeing >= deficit bytes, with destinations."""
        room = {Tier.HOST: self.free_bytes(Tier.HOST), Tier.DISK: self.free_bytes(Tier.DISK)}
        groups: dict[TierPair, list[ChunkKey]] = {}
        freed = 0
        for key in self._lru[Tier.DEVICE]:
            if freed >= deficit:
                break
            if key in selected or not self._evictable(key):
                continue
            chunk = self._chunks[key]
            dst = Tier.HOST if chunk.cold <= room[Tier.HOST] else Tier.DISK
            if chunk.cold > room[dst]:
                raise KVBudgetError(
                    f"no room to evict KV chunk {key} ({_fmt(chunk.cold)}): host and disk budgets are full; "
                    "raise --host-mem or give --offload-dir more space"
                )
            room[dst] -= chunk.cold
            groups.setdefault((Tier.DEVICE, dst), []).append(key)
            freed += chunk.nbytes
        if freed < deficit:
            raise KVBudgetError(
                f"the device KV budget {_fmt(self._budget[Tier.DEVICE])} cannot take {_fmt(int(deficit))} more: "
                "the rest is pinned, in flight, or sink/recent chunks; raise --device-mem or lower the KV token budget"
            )
        return {pair: tuple(ks) for pair, ks in groups.items()}

    # -- executing a plan ----------------------------------------------------------------------

    def _items(self, moves: Mapping[TierPair, Iterable[ChunkKey]]) -> list[tuple[Tier, Tier, ChunkKey, _Chunk]]:
        return [(src, dst, key, self._get(key)) for (src, dst), keys in moves.items() for key in keys]

    def begin(self, moves: Mapping[TierPair, Iterable[ChunkKey]], slots: Mapping[ChunkKey, int] | None = None) -> None:
        """Start moves (``plan.evict``, then after they finish ``plan.fetch``): pin each chunk and
        reserve its bytes on the destination; a chunk moving to the device gets its device slot from
        ``slots`` (when given). Raises KVBudgetError (changing nothing) if they do not fit."""
        items = self._items(moves)
        need = {t: 0 for t in Tier}
        for src, dst, key, chunk in items:
            assert chunk.tier is src and src is not dst, f"KV chunk {key} is on {chunk.tier.value}, not {src.value}"
            assert chunk.dest is None and chunk.pins == 0, f"KV chunk {key} is pinned or already in flight"
            need[dst] += _size(chunk, dst)
        for tier, nbytes in need.items():
            if nbytes > self.free_bytes(tier):
                raise KVBudgetError(
                    f"moves need {_fmt(nbytes)} on {tier.value}, only {_fmt(int(self.free_bytes(tier)))} free; "
                    "finish the evictions before starting the fetches"
                )
        for src, dst, key, chunk in items:
            chunk.dest, chunk.pins = dst, chunk.pins + 1
            self._used[dst] += _size(chunk, dst)
            if dst is Tier.DEVICE and slots is not None:
                chunk.slot = slots[key]

    def finish(self, moves: Mapping[TierPair, Iterable[ChunkKey]],
               host_slots: Mapping[ChunkKey, int] | None = None) -> None:
        """Commit moves whose copies completed: the chunk now lives on its destination only (a chunk
        that reached the host is in its buffer ``host_slots[key]``, when given)."""
        for src, dst, key, chunk in self._items(moves):
            assert chunk.tier is src and chunk.dest is dst, f"KV chunk {key} was not moving {src.value} -> {dst.value}"
            assert chunk.pins > 0
            self._used[src] -= _size(chunk, src)
            del self._lru[src][key]
            self._lru[dst][key] = None
            chunk.tier, chunk.dest, chunk.pins = dst, None, chunk.pins - 1
            if src is Tier.DEVICE:
                chunk.slot = None
            if src is Tier.HOST:
                chunk.host_slot = None
            if dst is Tier.HOST and host_slots is not None:
                chunk.host_slot = host_slots[key]

    def abort(self, moves: Mapping[TierPair, Iterable[ChunkKey]]) -> None:
        """Cancel moves that were begun but will not complete: release reservations and pins."""
        for src, dst, key, chunk in self._items(moves):
            assert chunk.tier is src and chunk.dest is dst, f"KV chunk {key} was not moving {src.value} -> {dst.value}"
            self._used[dst] -= _size(chunk, dst)
            chunk.dest, chunk.pins = None, chunk.pins - 1
            if dst is Tier.DEVICE:
                chunk.slot = None
