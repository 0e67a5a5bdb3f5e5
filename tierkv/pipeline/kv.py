"""KV caches behind the ``model.KVCache`` protocol.

Why this module exists: attention code must not care where keys and values live. This module
holds the resident cache (every token's K/V preallocated on the compute device) and the tiered,
chunked cache of the KV issue, which implements the same ``attend`` so the engine can swap one for
the other without touching the model math; ``make_kv_cache`` picks one from the policy and budgets.

TieredKVCache, in one paragraph per concern:

- Chunks. Per layer, every sequence's K/V is cut into chunks of ``S`` tokens (``S`` per layer:
  ``Policy.chunk_tokens`` or chosen by ``pipeline.chunking`` from the first prefill piece's
  attention skew). A chunk of one (layer, sequence) holds all KV heads and moves as a unit; the
  last chunk is open and grows as tokens are appended. ``pipeline.kv_table.KVChunkTable`` (one per
  layer, pure bookkeeping) says which tier holds each chunk, pins chunks while they are in use,
  and orders evictions (least recently selected first; sink and recent chunks never leave).
- Device. Per layer a pool of chunk slots ``(N, Hkv, S, D)`` for K and for V: ``resident`` slots
  (chunks whose tier is the device) and a few ``scratch`` slots through which chunks that stay
  on a slower tier are streamed. Abstracts (min/max key per chunk, ``kernels.abstract``) are
  always on the device: ``(B, Hkv, C_max, D)``; so are, with ``Policy.kv_sketch`` outside exact
  mode, the 2-bit key codes of the closed chunks (``kernels.sketch``, ``(B, Hkv, C_max, S, D/4)``
  uint8, written when a chunk closes) that let sparse scoring bound each key, not only the chunk.
  ``kv_device_minimum_bytes`` is the least device room that works for a capacity (the index beside
  the fewest slots, at the best chunk size); the planner keeps at least that for the model's full
  context, so a small ``kv_device_tokens`` never fails a long prompt: the rest spills.
- Host and disk. Host chunks are ``(2, Hkv, S, D)`` tensors (pinned on CUDA); disk chunks are
  records in ``io.kvstore`` segments (K, V and abstract, checksummed). New chunks are born on the
  device; when it is full the least recently selected unprotected chunks go to the host while its
  budget lasts, then to disk. Closed chunks never change, so once the context is expected to
  outgrow device + host memory every closed chunk is written behind to disk on a writer thread
  as soon as it closes; evicting a chunk to disk is then free, and a failed write (full disk)
  leaves the chunk where it was and stops generation at the next call with ``KVStoreError``.
- Attention. Prefill pieces and exact decode attend to every chunk: chunks on the device are read
  in place, the others are streamed through the scratch slots (double-buffered on the reader
  thread) and combined with an online softmax in fp32. Sparse decode scores the abstracts against
  the query (``kernels.importance``, token-level through the key codes when kept, max over the query
  heads of a KV group), selects chunks within
  ``kv_budget`` tokens plus the sink chunk and the recent window, makes the selected chunks
  resident (evicting others) and runs ``kernels.attention.sparse_decode_attention`` over the slot
  pool through a chunk table. Scoring and selection never synchronise with the host; reading the
  selection back to fetch misses does, once per layer, and only when a chunk is off the device.
  A slot holds every KV head, so the device must hold the union of the KV heads' selections; when
  it does not (an *overflow*, counted in ``stats()``) the slots keep as much of it as they hold
  and the rest is read for that step only, in large batches on several reader threads, and
  combined exactly with an online softmax (``_decode_overflow``). Layers with a sliding window
  always attend exactly over their window.
- Speculation. After a layer attends, the chunks the next layer selected at the previous step
  (sparse) or its first wave of streamed chunks (exact) are fetched on the reader thread while the
  rest of this layer and the next layer's projections compute; selected chunks that were not
  prefetched are fetched on demand. ``stats()`` reports the hit rate.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from tierkv.config import ModelConfig, Policy, format_size
from tierkv.io.buffers import ChunkArenas, pinning_available
from tierkv.io.kvstore import KVChunk, KVStore, remove_abandoned
from tierkv.kernels import (KeySketch, Selection, abstract_append, chunk_abstract, chunk_scores, encode_keys,
                            select_chunks, sparse_decode_attention)
from tierkv.kernels.sketch import sketch_bytes_per_token
from tierkv.model import (ATTENTION_SCRATCH_BYTES, attention_block_rows, attention_pair_bytes, dense_attention,
                          visibility_mask)
from tierkv.pipeline.chunking import ChunkRule, attention_entropy, chunk_tokens_for_entropy, fit_chunk_tokens
from tierkv.pipeline.kv_table import ChunkKey, KVBudgetError, KVChunkTable, Tier

__all__ = ["DenseKVCache", "TieredKVCache", "make_kv_cache", "kv_bytes_per_token", "kv_budget_tokens",
           "kv_device_minimum_bytes", "max_kv_batch", "min_chunk_slots", "sketch_required"]

DEVICE, HOST, DISK = Tier.DEVICE, Tier.HOST, Tier.DISK
TierPair = tuple[Tier, Tier]
_MIN_BLOCK_ROWS = 64             # streamed attention: a batch of chunks leaves room for this many query rows
_SCRATCH_SLOTS_PER_SEQ = 2       # at least one streamed chunk per sequence in each half of the double buffer
_STREAM_BYTES = 32 << 20         # cap on the K/V a sparse step that overflows the device streams at once
_STREAM_THREADS = 4              # reader threads that read those chunks in parallel
WRITE_BEHIND_BYTES = 8 << 20     # cap on the host snapshots of closed chunks waiting for the writer thread
_HEAD_WORD_BITS = 63             # KV heads per int64 word of a chunk's "which heads picked it" bitmask


def _join_words(words: Sequence[int]) -> int:
    """63-bit words (low word first) -> one Python int: bit h set = KV head h picked the chunk."""
    return sum(int(w) << (_HEAD_WORD_BITS * i) for i, w in enumerate(words))


class DenseKVCache:
    """All K/V resident on one device, preallocated for ``capacity_tokens`` positions per sequence.

    Storage per layer: k, v (B, Hkv, capacity, D). Sequences in a batch share positions (equal
    lengths); ``attend`` writes the new K/V at their positions and attends over the prefix.
    """

    def __init__(self, cfg: ModelConfig, batch: int, capacity_tokens: int, dtype: torch.dtype,
                 device: torch.device, attention_scratch_bytes: int = ATTENTION_SCRATCH_BYTES) -> None:
        shape = (batch, cfg.num_kv_heads, capacity_tokens, cfg.head_dim)
        self.capacity_tokens = capacity_tokens
        self.attention_scratch_bytes = attention_scratch_bytes   # cap on one block of prefill attention
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.length_tokens = 0  # tokens stored so far (same for every layer once a forward finishes)
        self._key_pos = torch.arange(capacity_tokens, device=device)[None].expand(batch, -1)  # (B, cap)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, window_tokens: int | None) -> torch.Tensor:
        """q (B, Hq, T, D), k/v (B, Hkv, T, D), positions (B, T) -> (B, Hq, T, D)."""
        start, t = self.length_tokens, k.shape[2]
        end = start + t
        assert end <= self.capacity_tokens, f"KV cache full: {end} > {self.capacity_tokens} tokens"
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        lo = 0 if window_tokens is None else max(0, end - t - window_tokens + 1)  # oldest key any query can see
        return dense_attention(q, self.k[layer][:, :, lo:end], self.v[layer][:, :, lo:end],
                               positions, self._key_pos[:, lo:end], window_tokens, self.attention_scratch_bytes)

    def advance(self, t: int) -> None:
        """Mark ``t`` more tokens as stored (called once per forward, after the last layer)."""
        self.length_tokens += t


# ---------------------------------------------------------------------------------------------
# sizes and the factory


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V that one token of one sequence takes over all layers."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * _elt(dtype)


def keeps_sketch(policy: Policy, device: torch.device) -> bool:
    """Whether a tiered cache under ``policy`` keeps 2-bit key codes (only sparse selection reads them).

    Default (``policy.kv_sketch`` None): on CUDA, where scoring the codes reads 1/8 of the bytes of
    K and is a small part of a step; off on the CPU, where the same pass is as many multiply-adds
    as q.K over the context (measured 0.65-1.13x dense decode attention) and would cancel the
    sparse step's saving.
    """
    if policy.kv == "exact":
        return False
    return policy.kv_sketch if policy.kv_sketch is not None else device.type == "cuda"


def layer_index_bytes(cfg: ModelConfig, dtype: torch.dtype, batch: int, capacity_tokens: int, chunk_tokens: int,
                      sketch: bool) -> int:
    """Device bytes of one layer's chunk index for a context: abstracts (min/max key per chunk) and,
    with ``sketch``, the 2-bit key codes (``kernels.sketch``). Always resident, beside the slot pool."""
    chunks = -(-capacity_tokens // chunk_tokens)
    per_chunk = 2 * cfg.num_kv_heads * cfg.head_dim * _elt(dtype)
    if sketch:
        per_chunk += cfg.num_kv_heads * chunk_tokens * sketch_bytes_per_token(cfg.head_dim)
    return batch * chunks * per_chunk


def min_chunk_slots(batch: int, sink_chunks: int = 1) -> int:
    """Fewest device slots per layer a tiered cache works with: per sequence its sink chunks, two
    recent chunks and a new one resident, plus the scratch slots streamed chunks pass through."""
    return batch * (sink_chunks + 3 + _SCRATCH_SLOTS_PER_SEQ)


def chunk_size_candidates(policy: Policy, rule: ChunkRule = ChunkRule()) -> tuple[int, ...]:
    """Every chunk size a tiered cache under ``policy`` may choose (before capping at its capacity)."""
    if policy.chunk_tokens is not None:
        return (policy.chunk_tokens,)
    sizes, size = [], rule.min_chunk_tokens
    while size <= rule.max_chunk_tokens:
        sizes.append(size)
        size *= 2
    return tuple(sizes)


def layer_minimum_bytes(cfg: ModelConfig, dtype: torch.dtype, batch: int, capacity_tokens: int, chunk_tokens: int,
                        sketch: bool, sink_chunks: int = 1) -> int:
    """Fewest device bytes one layer of a tiered cache with chunks of ``chunk_tokens`` works with:
    the chunk index for the whole capacity beside the minimum of slots (or every chunk, if fewer)."""
    chunks = batch * -(-capacity_tokens // chunk_tokens)
    slot = 2 * cfg.num_kv_heads * chunk_tokens * cfg.head_dim * _elt(dtype)
    index = layer_index_bytes(cfg, dtype, batch, capacity_tokens, chunk_tokens, sketch)
    return index + slot * min(min_chunk_slots(batch, sink_chunks), chunks)


def kv_device_minimum_bytes(cfg: ModelConfig, policy: Policy, dtype: torch.dtype, batch: int, capacity_tokens: int,
                            sketch: bool, rule: ChunkRule = ChunkRule(), sink_chunks: int = 1) -> int:
    """Fewest device KV bytes (all layers) with which a ``TieredKVCache`` of ``batch`` x
    ``capacity_tokens`` runs: at the best chunk size, the per-chunk index (abstracts, and key codes
    with ``sketch``) for the whole capacity plus the fewest slots; the rest spills to host and disk.
    Never decreases with the capacity, so the minimum at the model's full context covers any prompt."""
    per_layer = min(layer_minimum_bytes(cfg, dtype, batch, capacity_tokens, min(size, capacity_tokens), sketch,
                                        sink_chunks)
                    for size in chunk_size_candidates(policy, rule))
    return cfg.num_layers * per_layer


def sketch_required(policy: Policy) -> bool:
    """Whether the user asked for key codes (``kv_sketch=True`` outside exact mode): the planner then
    keeps device room for them at the model's full context. The default keeps them only where they fit."""
    return policy.kv != "exact" and policy.kv_sketch is True


def kv_budget_tokens(kv_budget: float | int, context_tokens: int) -> int:
    """Tokens a sparse step attends to: a float <= 1 is a fraction of the context, anything else a count."""
    if isinstance(kv_budget, float) and kv_budget <= 1.0:
        return max(1, math.ceil(kv_budget * context_tokens))
    return int(kv_budget)


def make_kv_cache(cfg: ModelConfig, policy: Policy, batch: int, capacity_tokens: int, dtype: torch.dtype,
                  device: torch.device | str, *, kv_device_bytes: int | None = None,
                  kv_host_bytes: int | None = None, offload_dir: str | Path | None = None,
                  offload_bytes: int | None = None,
                  attention_scratch_bytes: int = ATTENTION_SCRATCH_BYTES) -> "DenseKVCache | TieredKVCache":
    """The KV cache for one generation of ``batch`` sequences of up to ``capacity_tokens`` tokens.

    Returns the resident ``DenseKVCache`` when every step attends exactly (``kv="exact"``, or
    ``"auto"`` with capacity <= ``kv_exact_max_tokens``) and the whole KV fits the device budget
    (or none is given); otherwise a ``TieredKVCache`` over device, host (``kv_host_bytes``) and
    ``offload_dir`` (at most ``offload_bytes`` there; None = until the disk is full). Budgets are
    bytes for the KV cache alone; None = unbounded. ``attention_scratch_bytes`` caps the temporaries
    of one block of prefill (and streamed) attention (``Plan.attention_scratch_bytes``). Raises
    KVBudgetError when the budgets cannot work.
    """
    if _dense_fits(cfg, policy, batch, capacity_tokens, dtype, kv_device_bytes):
        return DenseKVCache(cfg, batch, capacity_tokens, dtype, torch.device(device), attention_scratch_bytes)
    return TieredKVCache(cfg, policy, batch, capacity_tokens, dtype, device, kv_device_bytes=kv_device_bytes,
                         kv_host_bytes=kv_host_bytes, offload_dir=offload_dir, offload_bytes=offload_bytes,
                         attention_scratch_bytes=attention_scratch_bytes)


def _dense_fits(cfg: ModelConfig, policy: Policy, batch: int, capacity_tokens: int, dtype: torch.dtype,
                kv_device_bytes: int | None) -> bool:
    """Whether ``make_kv_cache`` builds the resident cache: every step exact and all KV in the room."""
    sparse_possible = policy.kv == "sparse" or (policy.kv == "auto" and capacity_tokens > policy.kv_exact_max_tokens)
    need = kv_bytes_per_token(cfg, dtype) * batch * capacity_tokens
    return not sparse_possible and (kv_device_bytes is None or need <= kv_device_bytes)


def max_kv_batch(cfg: ModelConfig, policy: Policy, batch: int, capacity_tokens: int, dtype: torch.dtype,
                 kv_device_bytes: int | None) -> int:
    """Most sequences (<= ``batch``, at least 1) of ``capacity_tokens`` whose KV cache ``make_kv_cache``
    builds in the device room: resident, or tiered at or above ``kv_device_minimum_bytes`` (key codes
    are dropped before a tiered cache refuses, so they are not counted)."""
    if kv_device_bytes is None:
        return batch
    for b in range(batch, 1, -1):
        if _dense_fits(cfg, policy, b, capacity_tokens, dtype, kv_device_bytes) or \
                kv_device_minimum_bytes(cfg, policy, dtype, b, capacity_tokens, sketch=False) <= kv_device_bytes:
            return b
    return 1


# ---------------------------------------------------------------------------------------------
# attention over batches of keys


class _OnlineSoftmax:
    """Attention accumulated over batches of keys in fp32 (flash-attention style).

    State per (B, Hkv, G*T) query row (row r is query head g = r // T of the group, query t = r % T):
    running max ``m`` and sum ``l`` of exp(logit - m), and ``acc`` (..., D); after the last batch
    the output is acc / l. ``update`` goes through the rows in blocks whose temporaries fit
    ``scratch_bytes`` (``model.attention_block_rows``), so a prefill piece never holds its scores
    against a whole batch of keys at once.
    """

    def __init__(self, q: torch.Tensor, kv_heads: int, scratch_bytes: int = ATTENTION_SCRATCH_BYTES) -> None:
        b, hq, t, d = q.shape
        self.shape, self.dtype, self.group = q.shape, q.dtype, hq // kv_heads
        self.scratch_bytes = scratch_bytes
        self.q = (q.float() / math.sqrt(d)).reshape(b, kv_heads, self.group * t, d)   # (B, Hkv, G*T, D)
        self.m = torch.full(self.q.shape[:-1], float("-inf"), device=q.device)        # (B, Hkv, G*T)
        self.l = torch.zeros_like(self.m)
        self.acc = torch.zeros_like(self.q)

    def update(self, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
               key_ok: torch.Tensor | None, window_tokens: int | None) -> None:
        """k/v (B, Hkv, N, D); q_pos (B, T), k_pos (B, N); key_ok (B, 1 or Hkv, N) bool or None."""
        b, h, n, _ = k.shape
        t, rows_total = self.shape[2], self.q.shape[2]
        kt, vf = k.float().transpose(-1, -2), v.float()
        step = attention_block_rows(b, h, n, self.scratch_bytes)
        for a in range(0, rows_total, step):
            rows = slice(a, min(rows_total, a + step))
            row_pos = q_pos[:, torch.arange(rows.start, rows.stop, device=q_pos.device) % t]   # (B, R)
            allowed = visibility_mask(row_pos, k_pos, window_tokens)[:, None]                   # (B, 1, R, N)
            if key_ok is not None:
                allowed = allowed & key_ok[:, :, None, :]
            logits = (self.q[:, :, rows] @ kt).masked_fill_(~allowed, float("-inf"))          # (B, Hkv, R, N)
            self._accumulate(logits, vf, rows)

    def fold(self, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor) -> None:
        """Decode: k/v (B, Hkv, N, D) that every query may see; key_ok (B, Hkv, N) bool picks the keys
        each KV head attends to (no positions: a decode query comes after every stored key)."""
        logits = (self.q @ k.float().transpose(-1, -2)).masked_fill_(~key_ok[:, :, None], float("-inf"))
        self._accumulate(logits, v.float(), slice(None))

    def _accumulate(self, logits: torch.Tensor, v: torch.Tensor, rows: slice) -> None:
        """Fold masked logits (B, Hkv, R, N) of state rows ``rows`` and their values v (B, Hkv, N, D) fp32."""
        m = self.m[:, :, rows]
        m_new = torch.maximum(m, logits.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = logits.sub_(m_safe[..., None]).exp_()                       # in place: the logits are not needed again
        corr = torch.exp(m - m_safe)
        self.l[:, :, rows] = self.l[:, :, rows] * corr + p.sum(-1)
        self.acc[:, :, rows] = self.acc[:, :, rows] * corr[..., None] + p @ v
        self.m[:, :, rows] = m_new

    def result(self) -> torch.Tensor:
        """(B, Hq, T, D) in the query's dtype."""
        out = self.acc / self.l.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
        return out.reshape(self.shape).to(self.dtype)


Entries = Sequence[tuple[int, int, int]]  # (seq, chunk, slot)


def _slot_batches(entries: Entries, batch: int, per_batch: int) -> Iterator[tuple[list[list[int]], ...]]:
    """Rectangular (B, n) lists of slots, chunk ids and validity from (seq, chunk, slot) entries."""
    per_seq: list[list[tuple[int, int]]] = [[] for _ in range(batch)]
    for b, c, s in entries:
        per_seq[b].append((c, s))
    longest = max((len(x) for x in per_seq), default=0)
    for lo in range(0, longest, per_batch):
        rows = [x[lo:lo + per_batch] for x in per_seq]
        n = max(len(r) for r in rows)
        yield ([[s for _, s in r] + [0] * (n - len(r)) for r in rows],
               [[c for c, _ in r] + [0] * (n - len(r)) for r in rows],
               [[True] * len(r) + [False] * (n - len(r)) for r in rows])


# ---------------------------------------------------------------------------------------------
# background work


class _Jobs:
    """A reader and a writer thread for disk and host<->device moves, and ``_STREAM_THREADS``
    "stream" threads that read the chunks sparse steps need from disk (fetches and overflow
    remainders, split over the threads: parallel reads keep more of the disk busy).

    On CUDA each job runs on its thread's own stream after waiting for an event recorded when it
    was submitted, so it sees (and does not overwrite) what the compute stream was still using;
    the job's future completes only after its stream finished.
    """

    def __init__(self, device: torch.device) -> None:
        threads = {"read": 1, "write": 1, "stream": _STREAM_THREADS}
        self._pools = {kind: ThreadPoolExecutor(n, thread_name_prefix=f"tierkv-kv-{kind}")
                       for kind, n in threads.items()}
        self._device = device if device.type == "cuda" else None
        self._local = threading.local()   # .stream: the calling pool thread's CUDA stream

    def submit(self, kind: str, fn: Callable[[], Any]) -> Future:
        event = None
        if self._device is not None:
            event = torch.cuda.Event()
            event.record()
        return self._pools[kind].submit(self._run, fn, event)

    def _run(self, fn: Callable[[], Any], event: Any) -> Any:
        with torch.inference_mode():
            if self._device is None:
                return fn()
            stream = getattr(self._local, "stream", None)
            if stream is None:
                stream = self._local.stream = torch.cuda.Stream(self._device)
            with torch.cuda.stream(stream):
                stream.wait_event(event)
                out = fn()
            stream.synchronize()
            return out

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True)


@dataclass(frozen=True, eq=False)
class _Fetch:
    """Chunks being copied into resident slots (a table move from ``pair[0]`` to the device)."""

    pair: TierPair
    keys: tuple[ChunkKey, ...]
    slots: tuple[int, ...]
    future: Future


@dataclass(frozen=True, eq=False)
class _Wave:
    """Chunks being streamed into scratch slots for one batch of attention (pinned, not moved)."""

    keys: tuple[ChunkKey, ...]
    slots: tuple[int, ...]
    future: Future

    def entries(self) -> list[tuple[int, int, int]]:
        return [(k.seq, k.chunk, s) for k, s in zip(self.keys, self.slots)]


@dataclass(frozen=True, eq=False)
class _Write:
    """A closed chunk (all sequences) being written behind to disk from a host snapshot."""

    keys: tuple[ChunkKey, ...]
    future: Future
    nbytes: int


@dataclass
class _Counters:
    """Running totals reported by ``TieredKVCache.stats`` (bytes, chunk counts, seconds)."""

    forwards: int = 0
    decode_steps: int = 0
    host_read_bytes: int = 0
    disk_read_bytes: int = 0
    decode_read_bytes: int = 0
    disk_write_bytes: int = 0
    evicted_chunks: int = 0
    streamed_chunks: int = 0
    spec_fetched_chunks: int = 0
    spec_hits: int = 0
    spec_misses: int = 0
    spec_unused_chunks: int = 0
    sparse_layer_steps: int = 0
    overflow_steps: int = 0       # sparse layer-steps whose selection (union over KV heads) exceeded the device slots
    exact_layer_steps: int = 0
    estimator_s: float = 0.0
    selectable_tokens: int = 0


# ---------------------------------------------------------------------------------------------
# one layer's chunks


@dataclass(frozen=True)
class _Geometry:
    """Sizes chosen for one layer when its first prefill piece arrives."""

    chunk_tokens: int          # S
    max_chunks: int            # C_max = ceil(capacity / S)
    resident_slots: int
    scratch_slots: int
    slot_bytes: int            # K + V of one chunk of one sequence
    entropy: float | None      # measured attention skew (None: fixed size or not measurable)
    spill_expected: bool       # the context may outgrow device + host: write closed chunks behind


class _LayerKV:
    """One layer's chunks: device slot pool, host copies, abstracts and the chunk table."""

    def __init__(self, layer: int, geo: _Geometry, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, host_bytes: int | None, disk: bool, sink_chunks: int, sketch: bool) -> None:
        n, s, c = geo.resident_slots + geo.scratch_slots, geo.chunk_tokens, geo.max_chunks
        self.layer, self.geo, self.batch = layer, geo, batch
        self.k_pool = torch.zeros((n, kv_heads, s, head_dim), dtype=dtype, device=device)   # (N, Hkv, S, D)
        self.v_pool = torch.zeros_like(self.k_pool)
        self.slot_lens = torch.zeros(n, dtype=torch.int32, device=device)                   # (N,)
        self.slot_map = torch.full((batch, c), -1, dtype=torch.int32, device=device)        # (B, C_max)
        self.kmin = torch.zeros((batch, kv_heads, c, head_dim), dtype=dtype, device=device)  # (B, Hkv, C_max, D)
        self.kmax = torch.zeros_like(self.kmin)
        self.chunk_sizes = torch.zeros(c, dtype=torch.int32, device=device)                  # (C_max,)
        self.codes = torch.zeros((batch, kv_heads, c, s, sketch_bytes_per_token(head_dim)), dtype=torch.uint8,
                                 device=device) if sketch else None                          # (B, Hkv, C_max, S, P)
        self.n_coded = 0                                                                     # chunks with codes
        self.free = list(range(geo.resident_slots))[::-1]
        self.scratch = list(range(geo.resident_slots, n))
        self.slot_of: dict[ChunkKey, int] = {}      # resident chunks and fetches in flight
        self.resident: set[ChunkKey] = set()        # tier is the device and the data is in its slot
        self.host: dict[ChunkKey, torch.Tensor] = {}  # (2, Hkv, S, D) views of host_pool chunks
        self.host_pool = ChunkArenas(geo.slot_bytes, host_bytes, pinned=device.type == "cuda" and pinning_available())
        host_room = None if host_bytes is None else self.host_pool.capacity * geo.slot_bytes  # what really fits
        budgets = {DEVICE: geo.resident_slots * geo.slot_bytes, HOST: host_room, DISK: None if disk else 0}
        self.table = KVChunkTable(budgets, sink_chunks=sink_chunks, recent_tokens=s)
        self.n_chunks = 0
        self.tokens = 0
        self.fetching: dict[ChunkKey, _Fetch] = {}
        self.writing: list[_Write] = []
        self.prefetched: _Wave | None = None
        self.prev_needed: list[ChunkKey] = []
        self.spec: set[ChunkKey] = set()

    def key(self, chunk: int, seq: int) -> ChunkKey:
        return ChunkKey(self.layer, chunk, seq)

    @property
    def nbytes(self) -> int:
        tensors = (self.k_pool, self.v_pool, self.slot_lens, self.slot_map, self.kmin, self.kmax, self.chunk_sizes,
                   self.codes)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def all_resident(self) -> bool:
        return len(self.resident) == self.batch * self.n_chunks

    def host_put(self, key: ChunkKey, slot: int) -> None:
        """Copy a resident slot's K/V into a host buffer for ``key``."""
        buf = self.host_pool.take().view(self.k_pool.dtype).view(2, *self.k_pool.shape[1:])   # (2, Hkv, S, D)
        buf[0].copy_(self.k_pool[slot])
        buf[1].copy_(self.v_pool[slot])
        self.host[key] = buf

    def host_release(self, key: ChunkKey) -> None:
        self.host_pool.give(self.host.pop(key).view(-1).view(torch.uint8))


def _release(jobs: _Jobs, store: KVStore | None) -> None:
    """Stop the worker threads (after their queued work) and delete the cache's offload files."""
    jobs.close()
    if store is not None:
        store.close(delete=True)


def _copy_host(kv: _LayerKV, sources: Sequence[tuple[int, torch.Tensor]]) -> None:
    """Reader thread: host chunk buffers (2, Hkv, S, D) -> device slots."""
    for slot, buf in sources:
        kv.k_pool[slot].copy_(buf[0], non_blocking=True)
        kv.v_pool[slot].copy_(buf[1], non_blocking=True)


def _copy_disk(kv: _LayerKV, slots: Sequence[int], chunks: Sequence[KVChunk]) -> None:
    """Reader thread: chunks read back from the store (checksums verified) -> device slots."""
    for slot, chunk in zip(slots, chunks):
        n = chunk.n_tokens
        kv.k_pool[slot, :, :n].copy_(chunk.k)
        kv.v_pool[slot, :, :n].copy_(chunk.v)



# ---------------------------------------------------------------------------------------------
# the tiered cache


class TieredKVCache:
    """Chunked KV over device, host and disk, with exact or importance-selected (sparse) attention.

    Same protocol as ``DenseKVCache`` (``attend``, ``advance``, ``length_tokens``, ``nbytes``) plus
    ``stats()`` and ``close()``. Budgets are bytes for the KV cache alone, split evenly over layers;
    None = unbounded. ``offload_dir`` gets a private subdirectory, deleted by ``close()``.
    Sequences of a batch share positions (equal lengths); each has its own chunks and selection.
    """

    def __init__(self, cfg: ModelConfig, policy: Policy, batch: int, capacity_tokens: int, dtype: torch.dtype,
                 device: torch.device | str, *, kv_device_bytes: int | None = None, kv_host_bytes: int | None = None,
                 offload_dir: str | Path | None = None, offload_bytes: int | None = None,
                 chunk_rule: ChunkRule = ChunkRule(), sink_chunks: int = 1, durable: bool = True,
                 attention_scratch_bytes: int = ATTENTION_SCRATCH_BYTES) -> None:
        self.cfg, self.policy, self.batch = cfg, policy, batch
        self._scratch = attention_scratch_bytes   # cap on one block of streamed attention's temporaries
        self.capacity_tokens, self.dtype, self.device = capacity_tokens, dtype, torch.device(device)
        self.sink_chunks, self._rule = sink_chunks, chunk_rule
        self._sketch = keeps_sketch(policy, self.device)
        self._sketch_note = "on" if self._sketch else "off"
        n = cfg.num_layers
        self._device_layer_bytes = None if kv_device_bytes is None else kv_device_bytes // n
        self._host_layer_bytes = None if kv_host_bytes is None else kv_host_bytes // n
        self._layers: list[_LayerKV | None] = [None] * n
        self._length = 0
        self._decoding = False
        self._hint: tuple[int, list[ChunkKey]] | None = None   # (chunk tokens, keys) the last layer selected
        self._c = _Counters()
        self._selected_tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        self._union_tokens = torch.zeros((), dtype=torch.float64, device=self.device)  # sparse steps' union sizes
        self._head_bits = 2 ** torch.arange(_HEAD_WORD_BITS, device=self.device)           # (63,) int64
        self._closed = False
        spill = self._check_budgets(offload_dir)
        self._store = None
        if spill:
            remove_abandoned(Path(offload_dir))  # type: ignore[arg-type]  # left by killed processes
            root = Path(offload_dir) / f"kv-{uuid.uuid4().hex[:12]}"  # type: ignore[arg-type]
            self._store = KVStore(root, budget_bytes=offload_bytes, durable=durable)
        self._jobs = _Jobs(self.device)
        self._finalizer = weakref.finalize(self, _release, self._jobs, self._store)  # if close() is forgotten

    # -- protocol ----------------------------------------------------------------------------

    @property
    def length_tokens(self) -> int:
        """Tokens stored per sequence (same for every layer once a forward finishes)."""
        return self._length

    @property
    def nbytes(self) -> int:
        """Bytes allocated on the compute device (slot pools, abstracts, tables)."""
        return sum(layer.nbytes for layer in self._layers if layer is not None)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, window_tokens: int | None) -> torch.Tensor:
        """q (B, Hq, T, D), k/v (B, Hkv, T, D) post-RoPE, positions (B, T) -> (B, Hq, T, D)."""
        assert not self._closed, "TieredKVCache used after close()"
        assert k.shape[0] == self.batch, f"batch {k.shape[0]} != the cache's {self.batch}"
        t = k.shape[2]
        assert self._length + t <= self.capacity_tokens, \
            f"KV cache full: {self._length + t} > {self.capacity_tokens} tokens"
        self._decoding, self._hint = t == 1, None
        self._poll_writes(wait=False)
        kv = self._layers[layer] or self._init_layer(layer, q, k, positions, window_tokens)
        assert kv.tokens == self._length, f"layer {layer} attended twice in one forward"
        self._poll_fetches(kv, wait=False)
        if t == 1:
            self._append(kv, k, v)
            out = self._decode(kv, q, positions, window_tokens)
        else:
            self._c.exact_layer_steps += 1
            out = self._attend_streamed(kv, q, positions, kv.tokens, window_tokens, new_kv=(k, v))
            self._append(kv, k, v)
        self._speculate((layer + 1) % len(self._layers), sparse=t == 1 and self._sparse_now())
        return out

    def advance(self, t: int) -> None:
        """Mark ``t`` more tokens as stored (called once per forward, after the last layer)."""
        self._length += t
        self._c.forwards += 1
        self._c.decode_steps += t == 1
        assert all(layer is None or layer.tokens == self._length for layer in self._layers), \
            "advance() before every layer attended"

    # -- setup -------------------------------------------------------------------------------

    def _slot_bytes(self, chunk_tokens: int) -> int:
        return 2 * self.cfg.num_kv_heads * chunk_tokens * self.cfg.head_dim * _elt(self.dtype)

    def _slots_for(self, chunk_tokens: int) -> int:
        """Chunk slots of this size that one layer's device budget holds beside the abstracts."""
        chunks = -(-self.capacity_tokens // chunk_tokens)
        if self._device_layer_bytes is None:
            return self.batch * chunks
        abstracts = layer_index_bytes(self.cfg, self.dtype, self.batch, self.capacity_tokens, chunk_tokens,
                                      self._sketch)
        return max(0, (self._device_layer_bytes - abstracts) // self._slot_bytes(chunk_tokens))

    def _min_slots(self) -> int:
        """Fewest slots per layer that work: sinks, two recent chunks and a new one resident, plus scratch."""
        return min_chunk_slots(self.batch, self.sink_chunks)

    def _pick_size(self, wanted_tokens: int) -> tuple[int, bool]:
        """(chunk size, whether the device budget holds enough slots of it): the size nearest the
        wanted one that fits, else the size with the smallest working set (which fits whenever any does)."""
        fixed = self.policy.chunk_tokens is not None
        smallest = wanted_tokens if fixed else min(wanted_tokens, self._rule.min_chunk_tokens)
        need = self._min_slots()

        def usable_slots(size: int) -> int:  # a budget that holds the whole context is always enough
            slots = self._slots_for(size)
            return need if slots >= self.batch * -(-self.capacity_tokens // size) else slots

        largest = wanted_tokens if fixed else max(wanted_tokens, self._rule.max_chunk_tokens)
        size = fit_chunk_tokens(min(wanted_tokens, self.capacity_tokens), usable_slots, need, smallest,
                                min(largest, self.capacity_tokens))
        if usable_slots(size) < need:
            size = min((min(c, self.capacity_tokens) for c in chunk_size_candidates(self.policy, self._rule)),
                       key=self._layer_minimum)
        return size, usable_slots(size) >= need

    def _layer_minimum(self, chunk_tokens: int) -> int:
        return layer_minimum_bytes(self.cfg, self.dtype, self.batch, self.capacity_tokens, chunk_tokens,
                                   self._sketch, self.sink_chunks)

    def _geometry(self, wanted_tokens: int, entropy: float | None) -> _Geometry:
        """Chunk size and slot counts for one layer (``_pick_size``); KVBudgetError naming the minimum
        when no chunk size fits the device budget."""
        size, fits = self._pick_size(wanted_tokens)
        slots, chunks, slot_bytes = self._slots_for(size), -(-self.capacity_tokens // size), self._slot_bytes(size)
        if not fits:
            raise self._too_small_error(size, slots)
        host_slots = math.inf if self._host_layer_bytes is None else \
            ChunkArenas(slot_bytes, self._host_layer_bytes).capacity   # allocates nothing until take()
        if slots >= self.batch * chunks:
            return _Geometry(size, chunks, self.batch * chunks, 0, slot_bytes, entropy, False)
        pair = _SCRATCH_SLOTS_PER_SEQ * self.batch
        scratch = max(pair, (slots // 4) // pair * pair)   # about a quarter of the slots, in whole pairs
        spill = self.batch * chunks > slots - scratch + host_slots
        return _Geometry(size, chunks, slots - scratch, scratch, slot_bytes, entropy, spill)

    def _too_small_error(self, size: int, slots: int) -> KVBudgetError:
        need = self._layer_minimum(size)
        return KVBudgetError(
            f"the device KV budget ({format_size(self._device_layer_bytes or 0)} per layer) holds {slots} chunks "
            f"of {size} tokens, but batch {self.batch} x {self.capacity_tokens} tokens needs at least "
            f"{self._min_slots()} per layer beside the chunk index: {format_size(need)} per layer, "
            f"{format_size(need * self.cfg.num_layers)} in all ({need * self.cfg.num_layers} bytes); raise "
            "--device-mem or --kv-device-tokens, lower the batch or the context"
            + (", or try another --chunk-tokens" if self.policy.chunk_tokens is not None else ""))

    def _check_budgets(self, offload_dir: str | Path | None) -> bool:
        """Fail early when the budgets cannot work; True when chunks may go to disk (a store is needed).

        Key codes grow with the context (D/4 bytes per token and KV head, whatever the chunk size):
        when they leave too little device room for the slots, the cache runs without them (chunk
        bound only) rather than refusing the context, and ``stats()["sketch"]`` says so.
        """
        start = self.policy.chunk_tokens or self._rule.min_chunk_tokens
        if self._sketch and not self._pick_size(start)[1]:
            self._sketch, self._sketch_note = False, (
                "off: the key codes do not fit the device KV budget beside the chunk slots; sparse selection "
                "uses the chunk bound only (raise --device-mem or --kv-device-tokens to keep them)")
        geo = self._geometry(start, None)
        if geo.spill_expected and offload_dir is None:
            raise self._no_offload_error()
        return offload_dir is not None and self._device_layer_bytes is not None

    def _no_offload_error(self) -> KVBudgetError:
        need = kv_bytes_per_token(self.cfg, self.dtype) * self.batch * self.capacity_tokens
        return KVBudgetError(
            f"the KV cache for {self.batch} x {self.capacity_tokens} tokens needs {format_size(need)}, more than "
            "the device and host KV budgets hold; give an offload dir (--offload-dir), raise --device-mem "
            "or --host-mem, or lower the context")

    def _init_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                    window_tokens: int | None) -> _LayerKV:
        """Choose the layer's chunk size from its first piece (adaptive) or the policy, and allocate."""
        entropy, wanted = None, self.policy.chunk_tokens
        if wanted is None:
            entropy = attention_entropy(q, k, positions, positions, window_tokens, self._rule)
            wanted = chunk_tokens_for_entropy(entropy, self._rule)
        geo = self._geometry(wanted, entropy)
        if geo.spill_expected and self._store is None:
            raise self._no_offload_error()
        kv = _LayerKV(layer, geo, self.batch, self.cfg.num_kv_heads, self.cfg.head_dim, self.dtype, self.device,
                      self._host_layer_bytes, self._store is not None, self.sink_chunks, self._sketch)
        self._layers[layer] = kv
        return kv

    def _sparse_now(self) -> bool:
        """Whether this decode step selects chunks (policy.kv, with auto switching on context length)."""
        mode = self.policy.kv
        return mode == "sparse" or (mode == "auto" and self._length + 1 > self.policy.kv_exact_max_tokens)

    # -- appending new tokens ----------------------------------------------------------------

    def _append(self, kv: _LayerKV, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k/v (B, Hkv, T, D) after the layer's last token: fill the open chunk, open new ones."""
        segments = self._segments(kv, k.shape[2])
        self._update_abstracts(kv, k, segments)
        for c, fill, pos, take in segments:
            if fill == 0:
                self._new_chunk(kv, take)
            else:
                for b in range(self.batch):
                    kv.table.grow(kv.key(c, b), fill + take, kv.geo.slot_bytes)
            slots = torch.tensor([kv.slot_of[kv.key(c, b)] for b in range(self.batch)], device=self.device)
            kv.k_pool[slots, :, fill:fill + take] = k[:, :, pos:pos + take]
            kv.v_pool[slots, :, fill:fill + take] = v[:, :, pos:pos + take]
            kv.slot_lens[slots] = fill + take
            kv.tokens += take
            if fill + take == kv.geo.chunk_tokens:
                self._encode(kv, c, slots)
                self._write_behind(kv, c)

    def _encode(self, kv: _LayerKV, c: int, slots: torch.Tensor) -> None:
        """Chunk ``c`` just closed (its abstract is final): write its keys' 2-bit codes, if kept."""
        if kv.codes is not None:
            keys = kv.k_pool[slots].unsqueeze(2)                                      # (B, Hkv, 1, S, D)
            kv.codes[:, :, c:c + 1] = encode_keys(keys, kv.kmin[:, :, c:c + 1], kv.kmax[:, :, c:c + 1])
            kv.n_coded = c + 1

    def _segments(self, kv: _LayerKV, t: int) -> list[tuple[int, int, int, int]]:
        """How ``t`` new tokens split over chunks: (chunk, tokens already in it, offset in the piece, tokens)."""
        s, out, pos = kv.geo.chunk_tokens, [], 0
        c, fill = kv.n_chunks - 1, (kv.tokens - (kv.n_chunks - 1) * s if kv.n_chunks else s)
        while pos < t:
            if fill == s:
                c, fill = c + 1, 0
            take = min(s - fill, t - pos)
            out.append((c, fill, pos, take))
            fill, pos = fill + take, pos + take
        assert out[-1][0] < kv.geo.max_chunks, f"layer {kv.layer}: more tokens than the cache's capacity"
        return out

    def _new_chunk(self, kv: _LayerKV, tokens: int) -> None:
        """Open chunk ``n_chunks`` on the device for every sequence, evicting to make room."""
        self._make_room(kv, self.batch)
        c = kv.n_chunks
        slots = [kv.free.pop() for _ in range(self.batch)]
        for b, slot in enumerate(slots):
            key = kv.key(c, b)
            kv.table.add(key, tokens, kv.geo.slot_bytes, DEVICE)
            kv.slot_of[key] = slot
            kv.resident.add(key)
        kv.slot_map[:, c] = torch.tensor(slots, dtype=torch.int32, device=self.device)
        kv.n_chunks += 1

    def _update_abstracts(self, kv: _LayerKV, k: torch.Tensor, segments: list[tuple[int, int, int, int]]) -> None:
        """Fold the appended keys into the abstracts and sizes of the chunks they go to (before placing them)."""
        s = kv.geo.chunk_tokens
        first, last = segments[0][0], segments[-1][0]
        kv.chunk_sizes[first:last + 1] = s
        kv.chunk_sizes[last] = segments[-1][1] + segments[-1][3]
        if len(segments) == 1:
            c, fill, pos, take = segments[0]
            abstract_append(kv.kmin, kv.kmax, k[:, :, pos:pos + take], c, fresh=fill == 0)
            return
        end = segments[-1][2] + segments[-1][3]
        starts = torch.tensor([pos for _, _, pos, _ in segments], device=self.device)
        lo, hi = chunk_abstract(k[:, :, :end], starts)                            # (B, Hkv, n, D)
        if segments[0][1] > 0:  # the first segment continued a chunk opened earlier
            lo[:, :, 0] = torch.minimum(lo[:, :, 0], kv.kmin[:, :, first])
            hi[:, :, 0] = torch.maximum(hi[:, :, 0], kv.kmax[:, :, first])
        kv.kmin[:, :, first:last + 1] = lo
        kv.kmax[:, :, first:last + 1] = hi

    # -- moving chunks -----------------------------------------------------------------------

    def _make_room(self, kv: _LayerKV, n_slots: int) -> None:
        """Free ``n_slots`` resident slots by evicting least recently selected unprotected chunks."""
        while len(kv.free) < n_slots:
            victims = kv.table.eviction_order(DEVICE)[:n_slots - len(kv.free)]
            if victims:
                self._evict(kv, self._eviction_moves(kv, victims))
            elif kv.fetching:
                self._poll_fetches(kv, wait=True)
            else:
                raise KVBudgetError(f"layer {kv.layer}: every resident KV chunk is a sink or recent chunk; "
                                    "raise --device-mem or use smaller chunk_tokens")

    def _eviction_moves(self, kv: _LayerKV, victims: Sequence[ChunkKey]) -> dict[TierPair, list[ChunkKey]]:
        """Destinations for evicted chunks: the host while its budget lasts, then disk."""
        room = kv.table.free_bytes(HOST)
        moves: dict[TierPair, list[ChunkKey]] = {}
        for key in victims:
            dst = HOST if room >= kv.geo.slot_bytes else DISK
            if dst is DISK and self._store is None:
                raise KVBudgetError("the host KV budget is full and there is no offload dir; give --offload-dir "
                                    "or raise --host-mem")
            room -= kv.geo.slot_bytes if dst is HOST else 0
            moves.setdefault((DEVICE, dst), []).append(key)
        return moves

    def _evict(self, kv: _LayerKV, moves: Mapping[TierPair, Sequence[ChunkKey]]) -> None:
        """Run device -> host/disk moves now. Disk needs the chunk persisted (normally written behind
        already); if the write fails nothing has moved."""
        for (src, dst), keys in moves.items():
            assert src is DEVICE, f"only device chunks are evicted, not {src.value}"
            if dst is DISK:
                assert self._store is not None
                if any(key in w.keys for w in kv.writing for key in keys):
                    self._poll_writes(wait=True)
                self._write_now(kv, [key for key in keys if key not in self._store])
            kv.table.begin({(src, dst): keys})
            for key in keys:
                slot = kv.slot_of.pop(key)
                kv.resident.discard(key)
                if dst is HOST:
                    kv.host_put(key, slot)
                kv.free.append(slot)
            kv.slot_map[[k.seq for k in keys], [k.chunk for k in keys]] = -1
            kv.table.finish({(src, dst): keys})
            self._c.evicted_chunks += len(keys)

    def _chunk_record(self, kv: _LayerKV, key: ChunkKey, snapshot: bool) -> KVChunk:
        """A resident chunk as a store record; ``snapshot`` copies it to host memory first."""
        slot = kv.slot_of[key]
        tensors = (kv.k_pool[slot], kv.v_pool[slot], kv.kmin[key.seq, :, key.chunk], kv.kmax[key.seq, :, key.chunk])
        if snapshot:
            tensors = tuple(t.to("cpu", copy=True) for t in tensors)
        return KVChunk(kv.layer, key.chunk, key.seq, key.chunk * kv.geo.chunk_tokens, *tensors)

    def _write_now(self, kv: _LayerKV, keys: Sequence[ChunkKey]) -> None:
        if keys:
            assert self._store is not None
            self._store.append([self._chunk_record(kv, key, snapshot=False) for key in keys])
            self._c.disk_write_bytes += len(keys) * kv.geo.slot_bytes

    def _write_behind(self, kv: _LayerKV, chunk: int) -> None:
        """Persist a just-closed chunk from a host snapshot on the writer thread, if the KV may spill.

        The chunk itself stays free to move; evicting it to disk waits for this write first.
        """
        if self._store is None or not kv.geo.spill_expected or chunk < self.sink_chunks:
            return
        keys = tuple(kv.key(chunk, b) for b in range(self.batch))
        self._make_write_room(len(keys) * kv.geo.slot_bytes)
        records = [self._chunk_record(kv, key, snapshot=True) for key in keys]
        store = self._store
        future = self._jobs.submit("write", lambda: store.append(records))
        kv.writing.append(_Write(keys, future, len(keys) * kv.geo.slot_bytes))

    def _make_write_room(self, nbytes: int) -> None:
        """Keep the snapshots waiting for the writer within ``WRITE_BEHIND_BYTES`` (one write may be
        larger alone): when the disk is slower than the layers close chunks, wait for earlier writes
        instead of piling up host copies outside every budget."""
        self._poll_writes(wait=False)
        pending = [w for kv in self._layers if kv is not None for w in kv.writing]
        queued = sum(w.nbytes for w in pending)
        for w in pending:                       # in each layer's submission order; any order frees room
            if queued + nbytes <= WRITE_BEHIND_BYTES:
                break
            wait_futures([w.future])
            queued -= w.nbytes
        self._poll_writes(wait=False)

    def _poll_writes(self, wait: bool) -> None:
        """Retire finished write-behinds; after a failure wait for all and raise it (chunks stay put)."""
        pending = [(kv, w) for kv in self._layers if kv is not None for w in kv.writing]
        wait = wait or any(w.future.done() and w.future.exception() is not None for _, w in pending)
        error: BaseException | None = None
        for kv, w in pending:
            if not wait and not w.future.done():
                continue
            exc = w.future.exception()
            kv.writing.remove(w)
            if exc is None:
                self._c.disk_write_bytes += w.nbytes
            error = error or exc
        if error is not None:
            raise error

    def _start_fetches(self, kv: _LayerKV, fetch: Mapping[TierPair, Sequence[ChunkKey]]) -> list[_Fetch]:
        """Begin host/disk -> device moves into free resident slots: host copies on the reader thread,
        disk reads split over the stream threads (parallel reads keep more of the disk busy)."""
        started = []
        for pair, all_keys in fetch.items():
            parts = max(1, min(_STREAM_THREADS, len(all_keys))) if pair[0] is DISK else 1
            for t in range(parts):
                keys = tuple(all_keys[t::parts])
                kv.table.begin({pair: keys})
                assert len(kv.free) >= len(keys), "the chunk table and the free slots disagree"
                slots = tuple(kv.free.pop() for _ in keys)
                for key, slot in zip(keys, slots):
                    kv.slot_of[key] = slot
                future = self._submit_load(kv, keys, slots, "stream" if pair[0] is DISK else "read")
                fetch_rec = _Fetch(pair, keys, slots, future)
                for key in keys:
                    kv.fetching[key] = fetch_rec
                started.append(fetch_rec)
        return started

    def _finish_fetch(self, kv: _LayerKV, f: _Fetch) -> None:
        """Commit a finished fetch (waiting for it); on failure undo it and raise."""
        exc = f.future.exception()
        for key in f.keys:
            del kv.fetching[key]
        if exc is not None:
            kv.table.abort({f.pair: f.keys})
            for key, slot in zip(f.keys, f.slots):
                del kv.slot_of[key]
                kv.free.append(slot)
            raise exc
        kv.table.finish({f.pair: f.keys})
        for key in f.keys:
            kv.resident.add(key)
            if f.pair[0] is HOST:
                kv.host_release(key)
        kv.slot_map[[k.seq for k in f.keys], [k.chunk for k in f.keys]] = torch.tensor(
            f.slots, dtype=torch.int32, device=self.device)

    def _poll_fetches(self, kv: _LayerKV, wait: bool, keys: Sequence[ChunkKey] | None = None) -> None:
        """Commit finished fetches of a layer (all, or those of ``keys``, waiting when asked)."""
        chosen = kv.fetching.values() if keys is None else [kv.fetching[k] for k in keys if k in kv.fetching]
        for f in list({id(f): f for f in chosen}.values()):
            if wait or f.future.done():
                self._finish_fetch(kv, f)

    def _submit_load(self, kv: _LayerKV, keys: Sequence[ChunkKey], slots: Sequence[int], pool: str = "read") -> Future:
        """Copy chunks from the host or disk into device slots on a ``pool`` thread; sets slot lengths."""
        tokens = [kv.table.tokens_of(key) for key in keys]
        kv.slot_lens[list(slots)] = torch.tensor(tokens, dtype=torch.int32, device=self.device)
        host = [(slot, kv.host[key]) for key, slot in zip(keys, slots) if kv.table.tier_of(key) is HOST]
        disk = [(slot, key) for key, slot in zip(keys, slots) if kv.table.tier_of(key) is DISK]
        assert len(host) + len(disk) == len(keys), "only host and disk chunks are loaded"
        self._c.host_read_bytes += len(host) * kv.geo.slot_bytes
        self._c.disk_read_bytes += len(disk) * kv.geo.slot_bytes
        if self._decoding:
            self._c.decode_read_bytes += len(keys) * kv.geo.slot_bytes
        store = self._store

        def job() -> None:
            _copy_host(kv, host)
            if disk:
                assert store is not None, "disk chunks without a store"
                _copy_disk(kv, [slot for slot, _ in disk], store.read([key for _, key in disk]))

        return self._jobs.submit(pool, job)

    # -- attention ---------------------------------------------------------------------------

    def _decode(self, kv: _LayerKV, q: torch.Tensor, positions: torch.Tensor,
                window_tokens: int | None) -> torch.Tensor:
        """One new token per sequence, already appended: sparse, or exact over every chunk."""
        if window_tokens is None and self._sparse_now():
            self._c.sparse_layer_steps += 1
            return self._decode_sparse(kv, q, positions)
        self._c.exact_layer_steps += 1
        if window_tokens is None and kv.all_resident() and kv.prefetched is None:
            c = kv.n_chunks
            ids = torch.arange(c, dtype=torch.int32, device=self.device).expand(self.batch, self.cfg.num_kv_heads, c)
            counts = torch.full((self.batch, self.cfg.num_kv_heads), c, dtype=torch.int32, device=self.device)
            return self._kernel(kv, q, ids, counts)
        return self._attend_streamed(kv, q, positions, kv.tokens - 1, window_tokens)

    def _decode_sparse(self, kv: _LayerKV, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Score chunks, select within the token budget, make the selection resident, attend.

        A slot holds a chunk for every KV head, so what must be on the device is the union of the
        KV heads' selections; when it does not fit the resident slots the step overflows
        (``_decode_overflow``: as much as fits becomes resident, the rest streams).
        """
        self._drain_prefetch(kv)
        sel = self._select(kv, q[:, :, 0])
        union = sel.mask.any(1)                                                       # (B, C)
        self._union_tokens += (union * kv.chunk_sizes[:kv.n_chunks]).sum()
        if kv.all_resident():
            kv.prev_needed = []
            return self._kernel(kv, q, sel.ids, sel.counts)
        words = self._head_words(sel.mask)                                            # (B, W, C)
        idx = union.nonzero()
        rows = torch.cat([idx, words[idx[:, 0], :, idx[:, 1]]], 1).tolist()          # the one host sync
        picked = {kv.key(c, b): _join_words(ws) for b, c, *ws in rows}
        needed = list(picked)
        kv.prev_needed = needed
        self._hint = (kv.geo.chunk_tokens, needed)
        self._count_speculation(kv, needed)
        if len(needed) <= kv.geo.resident_slots and self._make_resident(kv, needed):
            return self._kernel(kv, q, sel.ids, sel.counts)
        return self._decode_overflow(kv, q, picked)

    def _head_words(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (B, Hkv, C) bool -> (B, W, C) int64: bit j of word w set = KV head 63*w + j picked the chunk.

        Words of 63 bits, so any head count fits without int64 overflow (2**63 does not fit int64).
        """
        b, h, c = mask.shape
        n_words = -(-h // _HEAD_WORD_BITS)
        padded = mask.new_zeros((b, n_words * _HEAD_WORD_BITS, c))
        padded[:, :h] = mask
        bits = padded.view(b, n_words, _HEAD_WORD_BITS, c) * self._head_bits[:, None]
        return bits.sum(2)

    def _select(self, kv: _LayerKV, q0: torch.Tensor) -> Selection:
        """Importance selection on the device: q0 (B, Hq, D) -> Selection over the layer's chunks."""
        c = kv.n_chunks
        t0 = time.perf_counter()
        sketch = None if kv.codes is None else KeySketch(kv.codes, kv.chunk_sizes[:c], kv.n_coded)
        scores = chunk_scores(q0, kv.kmin[:, :, :c], kv.kmax[:, :, :c], sketch=sketch)  # (B, Hkv, C)
        budget = kv_budget_tokens(self.policy.kv_budget, kv.tokens)
        sel = select_chunks(scores, kv.chunk_sizes[:c], budget_tokens=budget, sink_chunks=self.sink_chunks,
                            recent_tokens=kv.geo.chunk_tokens)
        self._c.estimator_s += time.perf_counter() - t0
        self._selected_tokens += (sel.mask * kv.chunk_sizes[:c]).sum()
        self._c.selectable_tokens += self.batch * self.cfg.num_kv_heads * kv.tokens
        # Trim the id table (B, Hkv, C) to the most chunks a selection can hold, without a host sync:
        # every chunk but the open last one holds S tokens, so the budget admits at most budget // S
        # unforced chunks, beside the sinks and at most two recent chunks. The attention kernel's
        # cost grows with the table's width (the torch reference gathers all of it), not the counts.
        width = min(c, self.sink_chunks + 2 + budget // kv.geo.chunk_tokens)
        assert self.device.type != "cpu" or int(sel.counts.max()) <= width, "selection wider than its bound"
        return sel._replace(ids=sel.ids[..., :width])

    def _kernel(self, kv: _LayerKV, q: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Decode attention through the slot pool: ids (B, Hkv, M) chunk ids -> (B, Hq, 1, D)."""
        b, h, m = ids.shape
        table = kv.slot_map.gather(1, ids.clamp(min=0).long().reshape(b, h * m)).view(b, h, m)   # slot ids
        return sparse_decode_attention(q[:, :, 0], kv.k_pool, kv.v_pool, table, counts, kv.slot_lens).unsqueeze(2)

    def _make_resident(self, kv: _LayerKV, keys: Sequence[ChunkKey]) -> bool:
        """Move ``keys`` to the device (evicting others); False when they do not fit together."""
        self._poll_fetches(kv, wait=True, keys=keys)
        plan = None
        for _ in range(2):
            try:
                plan = kv.table.plan_moves(keys)
                break
            except KVBudgetError:
                if not kv.fetching:
                    return False
                self._poll_fetches(kv, wait=True)   # speculative fetches hold slots: let them land
        if plan is None:
            return False
        self._evict(kv, plan.evict)
        for f in self._start_fetches(kv, plan.fetch):
            self._finish_fetch(kv, f)
        return True

    # -- sparse steps whose selection does not fit the device ----------------------------------

    def _decode_overflow(self, kv: _LayerKV, q: torch.Tensor, picked: Mapping[ChunkKey, int]) -> torch.Tensor:
        """Sparse attention when the union of the KV heads' selections exceeds the resident slots.

        ``picked`` maps each needed chunk to the KV heads that selected it (bit h = head h). As
        many needed chunks as the resident slots hold become resident (``_overflow_order`` says
        which), evicting only chunks the step does not need; the rest, the remainder, is read from
        the host or disk for this step only and never placed.

        Attention is exact over the selected (chunk, KV head) pairs: an fp32 online softmax folds
        the needed chunks already resident (each KV head through a slot table of the chunks it
        selected, as the attention kernel reads them) while reader threads fetch the new resident
        chunks and read the remainder; then the fetched chunks; then the remainder, one fold per
        group. A group is one K/V buffer (B, Hkv, n*S, D) of up to ``_STREAM_BYTES // 2`` (usually
        the whole remainder) that ``_STREAM_THREADS`` jobs fill in parallel straight from host
        buffers and disk records (parallel reads keep more of the disk busy); the next group is
        read while one is folded. Groups do not go through the scratch slots: those hold a couple
        of chunks, and every scratch wave costs a reader round trip and a fold of its own (measured
        ~0.5 ms per wave on a CPU, against ~40 us of attention per 256-token chunk). They are
        transient activations: two groups in flight stay within half the attention scratch.
        """
        self._c.overflow_steps += 1
        self._poll_fetches(kv, wait=True)                   # fetches in flight hold slots: let them land
        order = self._overflow_order(kv, picked)
        kv.prev_needed = order
        fetches = self._fit_resident(kv, order)
        rest = sorted((key for key in order if key not in kv.slot_of),
                      key=lambda key: (kv.table.tier_of(key) is DISK, key.seq, key.chunk))
        state = _OnlineSoftmax(q, self.cfg.num_kv_heads, self._scratch)
        todo = self._stream_groups(kv, rest)
        inflight: list[tuple[list[Future], torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def submit() -> None:
            if todo:
                inflight.append(self._submit_group(kv, todo.pop(0), picked))

        kv.table.pin(rest)
        try:
            submit()
            submit()                                        # double-buffered: read group i+1 while folding i
            self._fold_slots(state, kv, [key for key in order if key in kv.resident], picked)
            for f in fetches:
                self._finish_fetch(kv, f)
            self._fold_slots(state, kv, [key for f in fetches for key in f.keys], picked)
            while inflight:
                futures, k, v, key_ok = inflight.pop(0)
                for future in futures:
                    future.result()
                state.fold(k, v, key_ok)
                submit()
        finally:
            wait_futures([f for group in inflight for f in group[0]])
            kv.table.unpin(rest)
        self._c.streamed_chunks += len(rest)
        return state.result()

    def _overflow_order(self, kv: _LayerKV, picked: Mapping[ChunkKey, int]) -> list[ChunkKey]:
        """The needed chunks, those most worth a resident slot first.

        1. Chunks already on the device: keeping them costs no copy.
        2. Chunks selected by more KV heads: a slot holds every head, so one slot serves more
           (chunk, head) pairs, and a chunk many heads want is the likeliest to be selected again
           (the next step of this layer, and the next layer, which speculation fetches for).
        3. Chunks on disk before chunks on the host: all cost one read now, but a later step that
           selects the chunk again saves the slower read if it stayed resident.
        4. Newer chunks first (nearer the recent window, which every step attends to).
        """
        def rank(key: ChunkKey) -> tuple[bool, int, bool, int]:
            return key not in kv.slot_of, -picked[key].bit_count(), kv.table.tier_of(key) is not DISK, -key.chunk

        return sorted(picked, key=rank)

    def _fit_resident(self, kv: _LayerKV, order: Sequence[ChunkKey]) -> list[_Fetch]:
        """Make the longest prefix of ``order`` that fits the resident slots resident, evicting chunks not
        in ``order``. Returns the fetches started (the caller finishes them)."""
        wanted = set(order)
        stuck = sum(1 for key in kv.slot_of if key not in wanted and kv.table.protected(key))
        for n in range(min(len(order), kv.geo.resident_slots - stuck), 0, -1):
            try:
                plan = kv.table.plan_moves(order[:n])
            except KVBudgetError:
                continue                                    # pinned or protected chunks hold slots: fewer
            self._evict(kv, plan.evict)
            return self._start_fetches(kv, plan.fetch)
        return []

    def _fold_slots(self, state: _OnlineSoftmax, kv: _LayerKV, keys: Sequence[ChunkKey],
                    picked: Mapping[ChunkKey, int]) -> None:
        """Fold resident chunks into ``state``; each KV head reads only the chunks it selected."""
        if not keys:
            return
        b, h, s, d = self.batch, self.cfg.num_kv_heads, kv.geo.chunk_tokens, self.cfg.head_dim
        rows: list[list[list[int]]] = [[[] for _ in range(h)] for _ in range(b)]
        for key in keys:
            slot, bits = kv.slot_of[key], picked[key]
            for j in range(h):
                if bits >> j & 1:
                    rows[key.seq][j].append(slot)
        m = max(len(r) for row in rows for r in row)
        table = torch.tensor([[r + [-1] * (m - len(r)) for r in row] for row in rows],
                             device=self.device)                                        # (B, Hkv, m) slots
        slots = table.clamp(min=0)
        heads = torch.arange(h, device=self.device).view(1, h, 1)
        k = kv.k_pool[slots, heads].view(b, h, m * s, d)                               # (B, Hkv, m*S, D)
        v = kv.v_pool[slots, heads].view(b, h, m * s, d)
        key_ok = (torch.arange(s, device=self.device) < kv.slot_lens[slots][..., None]) & (table >= 0)[..., None]
        state.fold(k, v, key_ok.view(b, h, m * s))

    def _stream_groups(self, kv: _LayerKV, keys: Sequence[ChunkKey]) -> list[list[list[ChunkKey]]]:
        """Off-device chunks cut into groups of up to min(``_STREAM_BYTES``, half the attention scratch) // 2
        (two are in flight): per group, per sequence, up to n chunks (the same n for every sequence)."""
        per_seq: list[list[ChunkKey]] = [[] for _ in range(self.batch)]
        for key in keys:
            per_seq[key.seq].append(key)
        longest = max(len(row) for row in per_seq)
        n = max(1, min(_STREAM_BYTES, self._scratch // 2) // 2 // (self.batch * kv.geo.slot_bytes))
        return [[row[lo:lo + n] for row in per_seq] for lo in range(0, longest, n)]

    def _submit_group(self, kv: _LayerKV, rows: Sequence[Sequence[ChunkKey]], picked: Mapping[ChunkKey, int]
                      ) -> tuple[list[Future], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Start copying a group of host/disk chunks into one K/V (B, Hkv, n*S, D), split over the
        stream threads (disk reads round-robin, so they run in parallel).

        Returns (futures, k, v, key_ok (B, Hkv, n*S)): key_ok marks the tokens each KV head selected.
        """
        b, h, s, d = self.batch, self.cfg.num_kv_heads, kv.geo.chunk_tokens, self.cfg.head_dim
        n = max(len(row) for row in rows)
        k = torch.empty((b, h, n, s, d), dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        host, disk, blank = [], [], []
        for i, row in enumerate(rows):
            for j, key in enumerate(row):
                if kv.table.tier_of(key) is HOST:
                    host.append((i, j, kv.host[key]))
                else:
                    disk.append((i, j, key))
            blank += [(i, j) for j in range(len(row), n)]
        assert all(kv.table.tier_of(key) is DISK for *_, key in disk), "only host and disk chunks stream"
        self._c.host_read_bytes += len(host) * kv.geo.slot_bytes
        self._c.disk_read_bytes += len(disk) * kv.geo.slot_bytes
        self._c.decode_read_bytes += (len(host) + len(disk)) * kv.geo.slot_bytes
        store = self._store

        def job(host: list[tuple[int, int, torch.Tensor]], disk: list[tuple[int, int, ChunkKey]],
                blank: list[tuple[int, int]]) -> None:
            for i, j in blank:                  # K there is masked; V must hold no NaN (0 * NaN)
                v[i, :, j].zero_()
            for i, j, buf in host:
                k[i, :, j].copy_(buf[0], non_blocking=True)
                v[i, :, j].copy_(buf[1], non_blocking=True)
            if disk:
                assert store is not None, "disk chunks without a store"
                for (i, j, _), rec in zip(disk, store.read([key for *_, key in disk])):
                    t = rec.n_tokens
                    k[i, :, j, :t].copy_(rec.k)
                    v[i, :, j, :t].copy_(rec.v)
                    v[i, :, j, t:].zero_()

        parts = max(1, min(_STREAM_THREADS, len(disk)))
        futures = [self._jobs.submit("stream", lambda t=t: job(host[t::parts], disk[t::parts], blank[t::parts]))
                   for t in range(parts)]
        sel = [[[bool(picked[key] >> j & 1) for key in row] + [False] * (n - len(row)) for j in range(h)]
               for row in rows]                                                                  # (B, Hkv, n)
        lens = [[kv.table.tokens_of(key) for key in row] + [0] * (n - len(row)) for row in rows]  # (B, n)
        key_ok = ((torch.arange(s, device=self.device) < torch.tensor(lens, device=self.device)[:, None, :, None])
                  & torch.tensor(sel, device=self.device)[..., None])                           # (B, Hkv, n, S)
        return futures, k.view(b, h, n * s, d), v.view(b, h, n * s, d), key_ok.view(b, h, n * s)

    def _attend_streamed(self, kv: _LayerKV, q: torch.Tensor, positions: torch.Tensor, q_first: int,
                         window_tokens: int | None,
                         new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Exact attention over every chunk (of the window) on any tier, plus ``new_kv``.

        Resident chunks are read in place; the others stream through the scratch slots. q_first is
        the position of the first query; new_kv (B, Hkv, T, D) are the queries' own keys/values.
        """
        state = _OnlineSoftmax(q, self.cfg.num_kv_heads, self._scratch)
        lo = 0 if window_tokens is None else max(0, q_first - window_tokens + 1) // kv.geo.chunk_tokens
        keys = [kv.key(c, b) for b in range(self.batch) for c in range(lo, kv.n_chunks)]
        self._poll_fetches(kv, wait=True, keys=keys)
        resident = [(k.seq, k.chunk, kv.slot_of[k]) for k in keys if k in kv.resident]
        per_batch = self._chunks_per_batch(kv, q)
        for batch in _slot_batches(resident, self.batch, per_batch):
            self._update_from_slots(state, kv, batch, positions, window_tokens)
        self._stream(kv, state, [k for k in keys if k not in kv.resident], positions, window_tokens)
        if new_kv is not None:
            state.update(new_kv[0], new_kv[1], positions, positions, None, window_tokens)
        return state.result()

    def _chunks_per_batch(self, kv: _LayerKV, q: torch.Tensor) -> int:
        """Chunks folded at once: their gathered K/V (and fp32 copies) plus the scores of a block of
        ``_MIN_BLOCK_ROWS`` query rows fit the attention scratch (``_OnlineSoftmax.update`` then takes
        as many rows per block as fit)."""
        b, hq, t, _ = q.shape
        h, d = self.cfg.num_kv_heads, self.cfg.head_dim
        rows = min(hq // h * t, _MIN_BLOCK_ROWS)
        per_key = attention_pair_bytes(b, h) * rows + b * h * d * (2 * _elt(self.dtype) + 8)
        return max(1, self._scratch // (per_key * kv.geo.chunk_tokens))

    def _update_from_slots(self, state: _OnlineSoftmax, kv: _LayerKV, batch: tuple[list[list[int]], ...],
                           positions: torch.Tensor, window_tokens: int | None) -> None:
        """Fold one rectangular batch of slots (B, n) into the softmax state."""
        slots, cids, ok = (torch.tensor(x, device=self.device) for x in batch)
        b, n = slots.shape
        s, h, d = kv.geo.chunk_tokens, self.cfg.num_kv_heads, self.cfg.head_dim
        k = kv.k_pool[slots].permute(0, 2, 1, 3, 4).reshape(b, h, n * s, d)          # (B, Hkv, n*S, D)
        v = kv.v_pool[slots].permute(0, 2, 1, 3, 4).reshape(b, h, n * s, d)
        offs = torch.arange(s, device=self.device)
        k_pos = (cids[..., None] * s + offs).reshape(b, n * s)                         # (B, n*S)
        key_ok = (offs < kv.slot_lens[slots][..., None]) & ok[..., None]              # (B, n, S)
        key_ok = key_ok.reshape(b, 1, n * s)
        state.update(k, v, positions, k_pos, key_ok, window_tokens)

    def _stream(self, kv: _LayerKV, state: _OnlineSoftmax, keys: Sequence[ChunkKey], positions: torch.Tensor,
                window_tokens: int | None) -> None:
        """Attend to chunks off the device through the scratch slots, loading one wave ahead."""
        pre, kv.prefetched = kv.prefetched, None
        taken = set(pre.keys) if pre is not None else set()
        rest = [k for k in keys if k not in taken]
        if pre is None and not rest:
            return
        half = len(kv.scratch) // 2
        assert half > 0, f"layer {kv.layer}: chunks off the device but no scratch slots"
        plan = [rest[i:i + half] for i in range(0, len(rest), half)]
        waves = [pre] if pre is not None else []
        if pre is None and plan:
            waves.append(self._submit_wave(kv, plan.pop(0), 0))
        done = 0
        try:
            while done < len(waves):
                if plan:
                    waves.append(self._submit_wave(kv, plan.pop(0), len(waves) % 2))
                wave = waves[done]
                wave.future.result()
                for batch in _slot_batches(wave.entries(), self.batch, len(wave.keys)):
                    self._update_from_slots(state, kv, batch, positions, window_tokens)
                done += 1
        finally:
            wait_futures([w.future for w in waves])
            for wave in waves:
                kv.table.unpin(wave.keys)
        self._c.streamed_chunks += sum(len(w.keys) for w in waves)

    def _submit_wave(self, kv: _LayerKV, keys: Sequence[ChunkKey], buffer: int) -> _Wave:
        """Pin chunks and load them into scratch half ``buffer`` (0 or 1) on the reader thread."""
        half = len(kv.scratch) // 2
        slots = kv.scratch[buffer * half: buffer * half + len(keys)]
        assert len(slots) == len(keys), "a wave is larger than half the scratch slots"
        kv.table.pin(keys)
        return _Wave(tuple(keys), tuple(slots), self._submit_load(kv, keys, slots))

    def _drain_prefetch(self, kv: _LayerKV) -> None:
        """Drop a streamed wave prefetched for exact attention (the step turned sparse)."""
        if kv.prefetched is not None:
            wait_futures([kv.prefetched.future])
            kv.table.unpin(kv.prefetched.keys)
            kv.prefetched = None

    # -- speculation -------------------------------------------------------------------------

    def _speculate(self, layer: int, sparse: bool) -> None:
        """Start fetching what layer ``layer`` will most likely need next, while this one computes."""
        kv = self._layers[layer]
        if kv is None:
            return
        self._poll_fetches(kv, wait=False)
        window = self.cfg.sliding_window_tokens[layer] if self.cfg.sliding_window_tokens else None
        if sparse and window is None:
            self._speculate_sparse(kv)
        elif kv.prefetched is None and kv.scratch:
            q_first = kv.tokens
            lo = 0 if window is None else max(0, q_first - window + 1) // kv.geo.chunk_tokens
            off = [kv.key(c, b) for b in range(self.batch) for c in range(lo, kv.n_chunks)
                   if kv.key(c, b) not in kv.slot_of]
            if off:
                kv.prefetched = self._submit_wave(kv, off[:len(kv.scratch) // 2], 0)

    def _speculate_sparse(self, kv: _LayerKV) -> None:
        """Prefetch what this layer selected at the previous step (temporal locality) and the token
        ranges the layer before it selected just now (adjacent layers attend to similar tokens)."""
        self._drain_prefetch(kv)
        kv.spec = set()
        guess = list(dict.fromkeys([*kv.prev_needed, *self._map_hint(kv)]))[:kv.geo.resident_slots // 2]
        cand = [k for k in guess if k not in kv.slot_of]
        if not cand:
            return
        try:
            plan = kv.table.plan_moves(guess)
        except KVBudgetError:
            return
        self._evict(kv, plan.evict)
        self._start_fetches(kv, plan.fetch)
        kv.spec = set(cand)
        self._c.spec_fetched_chunks += len(cand)

    def _map_hint(self, kv: _LayerKV) -> list[ChunkKey]:
        """The chunks of ``kv`` covering the tokens of the chunks the previous layer just selected."""
        if self._hint is None:
            return []
        from_tokens, keys = self._hint
        to_tokens, out = kv.geo.chunk_tokens, []
        for key in keys:
            last = min(kv.n_chunks - 1, ((key.chunk + 1) * from_tokens - 1) // to_tokens)
            out.extend(kv.key(c, key.seq) for c in range(key.chunk * from_tokens // to_tokens, last + 1))
        return out

    def _count_speculation(self, kv: _LayerKV, needed: Sequence[ChunkKey]) -> None:
        spec, kv.spec = kv.spec, set()
        for key in needed:
            if key in spec:
                self._c.spec_hits += 1
            elif key not in kv.slot_of:
                self._c.spec_misses += 1
        self._c.spec_unused_chunks += len(spec.difference(needed))

    # -- reporting and lifetime --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """What the cache did: chunk sizes, bytes per tier, reads per decode step, speculation, estimator time."""
        layers = [kv for kv in self._layers if kv is not None]
        c = self._c
        judged = c.spec_hits + c.spec_misses
        return {
            "kv_mode": self.policy.kv,
            "chunk_tokens": [kv.geo.chunk_tokens if kv else None for kv in self._layers],
            "attention_entropy": [kv.geo.entropy if kv else None for kv in self._layers],
            "device_bytes": sum(kv.table.used_bytes(DEVICE) for kv in layers),
            "host_bytes": sum(kv.table.used_bytes(HOST) for kv in layers),
            "host_allocated_bytes": sum(kv.host_pool.allocated_bytes for kv in layers),
            "disk_bytes": sum(kv.table.used_bytes(DISK) for kv in layers),
            "disk_file_bytes": self._store.used_bytes if self._store is not None else 0,
            "device_allocated_bytes": self.nbytes,
            "bytes_read_host": c.host_read_bytes,
            "bytes_read_disk": c.disk_read_bytes,
            "bytes_read_per_step": c.decode_read_bytes / c.decode_steps if c.decode_steps else 0.0,
            "bytes_written_disk": c.disk_write_bytes,
            "evicted_chunks": c.evicted_chunks,
            "streamed_chunks": c.streamed_chunks,
            "spec_hit_rate": c.spec_hits / judged if judged else None,
            "spec_fetched_chunks": c.spec_fetched_chunks,
            "spec_unused_chunks": c.spec_unused_chunks,
            "estimator_s": c.estimator_s,
            "sketch": self._sketch_note,
            "sketch_bytes": sum(kv.codes.numel() for kv in layers if kv.codes is not None),
            "selected_fraction": float(self._selected_tokens) / c.selectable_tokens if c.selectable_tokens else None,
            "sparse_layer_steps": c.sparse_layer_steps,
            # sizing the device KV room for sparse decode: the union of the KV heads' selections (tokens
            # per sequence, mean over sparse layer-steps) must fit device_room_tokens, else the step
            # overflows and streams the rest (raise --kv-device-tokens / --device-mem)
            "sparse_union_tokens": (float(self._union_tokens) / (c.sparse_layer_steps * self.batch)
                                    if c.sparse_layer_steps else None),
            "sparse_overflow_steps": c.overflow_steps,
            "device_room_tokens": [kv.geo.resident_slots * kv.geo.chunk_tokens // self.batch if kv else None
                                   for kv in self._layers],
            "exact_layer_steps": c.exact_layer_steps,
            "decode_steps": c.decode_steps,
        }

    def check_invariants(self) -> int:
        """Assert that the chunk tables, the slots, the host buffers and the store agree (tests,
        debugging); returns how many chunks it checked. A closed cache has nothing left to check,
        so calling it after ``close()`` is refused rather than passing vacuously."""
        if self._closed:
            raise RuntimeError("check_invariants() on a closed TieredKVCache checks nothing: call it before "
                               "close() (inside the `with` block, or before the engine ends the generation)")
        checked = 0
        for kv in self._layers:
            if kv is None:
                continue
            for b in range(self.batch):
                keys = kv.table.chunks(kv.layer, b)
                assert len(keys) == kv.n_chunks, f"layer {kv.layer} seq {b}: {len(keys)} chunks in the table"
                checked += len(keys)
                for key in keys:
                    tier = kv.table.tier_of(key)
                    if key in kv.fetching:
                        assert tier is not DEVICE and key in kv.slot_of, f"{key} is being fetched from {tier.value}"
                        continue
                    assert (tier is DEVICE) == (key in kv.resident) == (key in kv.slot_of), f"{key} on {tier.value}"
                    assert (tier is HOST) == (key in kv.host), f"{key} on {tier.value}: host copy mismatch"
                    if tier is DISK:
                        assert self._store is not None and key in self._store, f"{key} is on disk but not stored"
            assert len(kv.free) + len(kv.slot_of) == kv.geo.resident_slots, f"layer {kv.layer}: slots leak"
            assert len(set(kv.slot_of.values())) == len(kv.slot_of), f"layer {kv.layer}: a slot is shared"
        return checked

    def close(self) -> None:
        """Finish background work, delete this cache's offload files and free its memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)    # no copy from a host chunk is in flight when it is unpinned
        for kv in self._layers:
            if kv is not None:
                kv.host_pool.close()
        self._layers = [None] * len(self._layers)

    def __enter__(self) -> "TieredKVCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
