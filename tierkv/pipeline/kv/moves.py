"""Moving a tiered cache's chunks between device slots, host buffers and disk segments.

Why this module exists: every change of a chunk's tier goes through here, as the chunk table's
begin/finish (or abort) around the copy, so the table stays the one record of residency: evictions
(device -> host while its budget lasts, then disk), fetches (host/disk -> device slots, on the
worker threads), and the write-behind of closed chunks to disk that makes later evictions free.
Every copy is a move of the cache's ``io.mover.Mover`` (``workers`` lists the links): one record and
one profiler span per batch of chunks a job moves, completed where the cache waits for its jobs.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from tierkv.io.kvstore import KVChunk
from tierkv.pipeline.kv.layer import Fetch, LayerKV, Write
from tierkv.pipeline.kv.state import CacheState
from tierkv.pipeline.kv.table import ChunkKey, KVBudgetError, Tier
from tierkv.pipeline.kv.workers import STREAM_THREADS, KVMove, complete, settle

__all__ = ["chunk_name", "chunk_record", "move", "evict", "eviction_moves", "finish_fetch", "load", "make_room",
           "poll_fetches", "poll_writes", "snapshot_records", "start_fetches", "write_behind"]

DEVICE, HOST, DISK = Tier.DEVICE, Tier.HOST, Tier.DISK
TierPair = tuple[Tier, Tier]


def chunk_name(keys: Sequence[ChunkKey]) -> str:
    """What a move record (and its profiler span) calls a batch of chunks moved together:
    ``L<layer>/s<seq>/c<chunk>`` of the first, then ``+<n>`` for the n others."""
    first = keys[0]
    more = f"+{len(keys) - 1}" if len(keys) > 1 else ""
    return f"L{first.layer}/s{first.seq}/c{first.chunk}{more}"


def move(st: CacheState, src: Tier, dst: Tier, keys: Sequence[ChunkKey], sources: Sequence[object],
         dests: Sequence[object]) -> list[KVMove]:
    """Start moving a batch of chunks (one job, one record) on the cache's mover (``workers`` lists
    what ``sources`` and ``dests`` are per link)."""
    return st.mover.prepare(src.value, dst.value, [chunk_name(keys)], [list(sources)],   # type: ignore[return-value]
                            [list(dests)])


def make_room(st: CacheState, kv: LayerKV, n_slots: int) -> None:
    """Free ``n_slots`` resident slots by evicting least recently selected unprotected chunks."""
    while len(kv.free) < n_slots:
        victims = kv.table.eviction_order(DEVICE)[:n_slots - len(kv.free)]
        if victims:
            evict(st, kv, eviction_moves(st, kv, victims))
        elif kv.fetching:
            poll_fetches(st, kv, wait=True)
        else:
            raise KVBudgetError(f"layer {kv.layer}: every resident KV chunk is a sink or recent chunk; "
                                "raise --device-mem or use smaller chunk_tokens")


def eviction_moves(st: CacheState, kv: LayerKV, victims: Sequence[ChunkKey]) -> dict[TierPair, list[ChunkKey]]:
    """Destinations for evicted chunks: the host while its budget lasts, then disk."""
    room = kv.table.free_bytes(HOST)
    moves: dict[TierPair, list[ChunkKey]] = {}
    for key in victims:
        dst = HOST if room >= kv.geo.cold_bytes else DISK
        if dst is DISK and st.store is None:
            raise KVBudgetError("the host KV budget is full and there is no offload dir; give --offload-dir "
                                "or raise --host-mem")
        room -= kv.geo.cold_bytes if dst is HOST else 0
        moves.setdefault((DEVICE, dst), []).append(key)
    return moves


def evict(st: CacheState, kv: LayerKV, moves: Mapping[TierPair, Sequence[ChunkKey]]) -> None:
    """Run device -> host/disk moves now. Disk needs the chunk persisted (normally written behind
    already); if the write fails nothing has moved."""
    for (src, dst), keys in moves.items():
        assert src is DEVICE, f"only device chunks are evicted, not {src.value}"
        if dst is DISK:
            assert st.store is not None
            if any(key in w.keys for w in kv.writing for key in keys):
                poll_writes(st, wait=True)
            write_now(st, kv, [key for key in keys if key not in st.store])
        slots = [kv.slot_of(key) for key in keys]
        kv.table.begin({(src, dst): keys})
        host_slots = None
        if dst is HOST:
            host_slots = {key: kv.host_take() for key in keys}
            sources = [(kv.codec, *kv.slot_pair(slot), kv.table.tokens_of(key)) for key, slot in zip(keys, slots)]
            complete(st.mover, move(st, DEVICE, HOST, keys, sources, [kv.host_bufs[host_slots[key]] for key in keys]))
        kv.table.finish({(src, dst): keys}, host_slots)
        kv.free.extend(slots)
        kv.slot_map[[k.seq for k in keys], [k.chunk for k in keys]] = -1
        st.c.evicted_chunks += len(keys)


def chunk_record(kv: LayerKV, key: ChunkKey, snapshot: bool) -> KVChunk:
    """A resident chunk as a store record in its cold form (``kv.codec``: quantized here when the
    cold tiers hold codes); ``snapshot`` copies it to host memory first."""
    slot = kv.slot_of(key)
    assert slot is not None, f"{key} is not resident"
    tensors = (kv.k_pool[slot], kv.v_pool[slot], kv.kmin[key.seq, :, key.chunk], kv.kmax[key.seq, :, key.chunk])
    return kv.codec.record(kv.layer, key.chunk, key.seq, tensors, kv.table.tokens_of(key), snapshot)


def write_now(st: CacheState, kv: LayerKV, keys: Sequence[ChunkKey]) -> None:
    if keys:
        assert st.store is not None
        records = [chunk_record(kv, key, snapshot=False) for key in keys]
        complete(st.mover, move(st, DEVICE, DISK, keys, records, [st.store] * len(keys)))
        st.c.disk_write_bytes += len(keys) * kv.geo.cold_bytes


def write_behind(st: CacheState, kv: LayerKV, chunks: range) -> None:
    """Persist just-closed chunks (every sequence's) on the writer thread, if the KV may spill: from
    host snapshots taken now, one write per group of chunks whose snapshots fit ``st.write_behind_bytes``.

    The chunks themselves stay free to move; evicting one to disk waits for its write first.
    """
    if st.store is None or not kv.geo.spill_expected:
        return
    keys = [kv.key(c, b) for c in chunks if c >= st.shape.sink_chunks for b in range(st.batch)]
    group = max(st.batch, st.write_behind_bytes // kv.geo.cold_bytes // st.batch * st.batch)   # whole chunks
    for lo in range(0, len(keys), group):
        part = tuple(keys[lo:lo + group])
        _make_write_room(st, len(part) * kv.geo.cold_bytes)
        moves = move(st, HOST, DISK, part, snapshot_records(kv, part), [st.store] * len(part))
        kv.writing.append(Write(part, tuple(moves), len(part) * kv.geo.cold_bytes))


def snapshot_records(kv: LayerKV, keys: Sequence[ChunkKey]) -> list[KVChunk]:
    """Store records of resident chunks copied to host memory (their slots may be reused before the
    writer runs): exact chunks from one gather of their K, V and abstracts, quantized ones coded on
    the device one by one (``chunk_record``)."""
    if kv.codec.layout is not None:
        return [chunk_record(kv, key, snapshot=True) for key in keys]
    slots = torch.tensor([kv.slot_of(key) for key in keys], device=kv.k_pool.device)
    seqs, chunks = [key.seq for key in keys], [key.chunk for key in keys]
    k, v = kv.k_pool[slots].to("cpu"), kv.v_pool[slots].to("cpu")            # (n, Hkv, S, D), fresh copies
    lo, hi = kv.kmin[seqs, :, chunks].to("cpu"), kv.kmax[seqs, :, chunks].to("cpu")   # (n, Hkv, D)
    return [kv.codec.record(kv.layer, key.chunk, key.seq, (k[i], v[i], lo[i], hi[i]), kv.table.tokens_of(key),
                            snapshot=False) for i, key in enumerate(keys)]


def _make_write_room(st: CacheState, nbytes: int) -> None:
    """Keep the snapshots waiting for the writer within ``st.write_behind_bytes`` (one write may be
    larger alone): when the disk is slower than the layers close chunks, wait for earlier writes
    instead of piling up host copies outside every budget."""
    poll_writes(st, wait=False)
    pending = [w for kv in st.live_layers() for w in kv.writing]
    queued = sum(w.nbytes for w in pending)
    for w in pending:                       # in each layer's submission order; any order frees room
        if queued + nbytes <= st.write_behind_bytes:
            break
        settle(st.mover, w.records)
        queued -= w.nbytes
    poll_writes(st, wait=False)


def poll_writes(st: CacheState, wait: bool) -> None:
    """Retire finished write-behinds; after a failure wait for all and raise it (chunks stay put)."""
    pending = [(kv, w) for kv in st.live_layers() for w in kv.writing]
    wait = wait or any(w.job.done() and w.job.exception() is not None for _, w in pending)
    error: BaseException | None = None
    for kv, w in pending:
        if not wait and not w.job.done():
            continue
        exc = w.job.exception()
        kv.writing.remove(w)
        if exc is None:
            complete(st.mover, w.records)
            st.c.disk_write_bytes += w.nbytes
        error = error or exc
    if error is not None:
        raise error


def start_fetches(st: CacheState, kv: LayerKV, fetch: Mapping[TierPair, Sequence[ChunkKey]]) -> list[Fetch]:
    """Begin host/disk -> device moves into free resident slots: host copies on the reader thread,
    disk reads split over the stream threads (parallel reads keep more of the disk busy)."""
    started = []
    for pair, all_keys in fetch.items():
        parts = max(1, min(STREAM_THREADS, len(all_keys))) if pair[0] is DISK else 1
        for t in range(parts):
            keys = tuple(all_keys[t::parts])
            assert len(kv.free) >= len(keys), "the chunk table and the free slots disagree"
            slots = tuple(kv.free[len(kv.free) - len(keys):][::-1])
            kv.table.begin({pair: keys}, dict(zip(keys, slots)))
            del kv.free[len(kv.free) - len(keys):]
            record = Fetch(pair, keys, slots, tuple(load(st, kv, keys, slots)))
            for key in keys:
                kv.fetching[key] = record
            started.append(record)
    return started


def finish_fetch(st: CacheState, kv: LayerKV, f: Fetch) -> None:
    """Commit a finished fetch (waiting for it); on failure undo it and raise."""
    exc = f.job.exception()
    for key in f.keys:
        del kv.fetching[key]
    if exc is not None:
        kv.table.abort({f.pair: f.keys})
        kv.free.extend(f.slots)
        raise exc
    complete(st.mover, f.records)
    freed = [kv.table.host_slot_of(key) for key in f.keys] if f.pair[0] is HOST else []
    kv.table.finish({f.pair: f.keys})
    kv.host_free.extend(freed)   # type: ignore[arg-type]  # host chunks always have a host slot
    kv.slot_map[[k.seq for k in f.keys], [k.chunk for k in f.keys]] = torch.tensor(
        f.slots, dtype=torch.int32, device=kv.slot_map.device)


def poll_fetches(st: CacheState, kv: LayerKV, wait: bool, keys: Sequence[ChunkKey] | None = None) -> None:
    """Commit finished fetches of a layer (all, or those of ``keys``, waiting when asked)."""
    chosen = kv.fetching.values() if keys is None else [kv.fetching[k] for k in keys if k in kv.fetching]
    for f in list({id(f): f for f in chosen}.values()):
        if wait or f.job.done():
            finish_fetch(st, kv, f)


def load(st: CacheState, kv: LayerKV, keys: Sequence[ChunkKey], slots: Sequence[int]) -> list[KVMove]:
    """Start copying chunks from the host or disk into device slots (host copies on the reader
    thread, disk reads on a stream thread); sets the slots' lengths. One record per chunk."""
    tokens = [kv.table.tokens_of(key) for key in keys]
    kv.slot_lens[list(slots)] = torch.tensor(tokens, dtype=torch.int32, device=st.device)
    host = [(key, slot) for key, slot in zip(keys, slots) if kv.table.tier_of(key) is HOST]
    disk = [(key, slot) for key, slot in zip(keys, slots) if kv.table.tier_of(key) is DISK]
    assert len(host) + len(disk) == len(keys), "only host and disk chunks are loaded"
    st.c.host_read_bytes += len(host) * kv.geo.cold_bytes
    st.c.disk_read_bytes += len(disk) * kv.geo.cold_bytes
    if st.decoding:
        st.c.decode_read_bytes += len(keys) * kv.geo.cold_bytes
    return load_into(st, kv, [(key, kv.host_buf(key)) for key, _ in host], [key for key, _ in disk],
                     [kv.slot_pair(slot) for _, slot in host], [kv.slot_pair(slot) for _, slot in disk])


def load_into(st: CacheState, kv: LayerKV, host: Sequence[tuple[ChunkKey, torch.Tensor]], disk: Sequence[ChunkKey],
              host_dests: Sequence[tuple[torch.Tensor, torch.Tensor]],
              disk_dests: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[KVMove]:
    """Start copying host buffers and disk chunks of layer ``kv`` into (k, v) device views (Hkv, S, D),
    decoded there by the layer's codec (dequantized when the cold tiers hold codes)."""
    moves: list[KVMove] = []
    if host:
        moves += move(st, HOST, DEVICE, [key for key, _ in host], [(kv.codec, buf) for _, buf in host], host_dests)
    if disk:
        assert st.store is not None, "disk chunks without a store"
        moves += move(st, DISK, DEVICE, disk, [(kv.codec, st.store, key) for key in disk], disk_dests)
    return moves
