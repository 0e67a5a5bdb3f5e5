"""The tiered, chunked KV cache: the facade that composes the package's concerns.

Why this module exists: the engine sees one object with the ``model.KVCache`` protocol (``attend``,
``advance``, ``length_tokens``, ``nbytes``) plus ``stats``, ``close`` and the session calls
(``read_kv``, ``append_kv``, ``geometry``). Everything it does is a function of ``state.CacheState``
in a module of its own: ``append`` (new tokens, chunk close), ``moves`` (evictions, fetches,
write-behind), ``streamed`` (exact attention over any tier), ``sparse`` and ``overflow`` (selected
attention), ``speculate`` (prefetch for the next layer), ``stats``; sizes come from ``geometry``.

In one paragraph: per layer, every sequence's K/V is cut into chunks of S tokens (S per layer:
``Policy.chunk_tokens``, a given ``geometry``, or ``pipeline.chunking``'s pick from the first prefill
piece). New chunks are born in device slots; when those are full, the least recently selected
unprotected chunks go to the host while its budget lasts, then to disk (``io.kvstore``; closed
chunks are written behind as soon as they close when the context may outgrow device + host).
The per-layer chunk table (``table.KVChunkTable``) is the one record of which tier and slot holds
each chunk. ``offload_dir`` gets a private subdirectory per cache, deleted by ``close()``.
"""

from __future__ import annotations

import dataclasses
import uuid
import weakref
from pathlib import Path
from typing import Any, Mapping

import torch

from tierkv.config import ModelConfig, Policy, format_size
from tierkv.io.kvstore import KVStore, remove_abandoned
from tierkv.kernels.estimate import prepare_estimator
from tierkv.model import ATTENTION_SCRATCH_BYTES
from tierkv.pipeline.chunking import ChunkRule, attention_entropy
import tierkv.pipeline.kv.stats as stats_mod
from tierkv.pipeline.kv.append import append
from tierkv.pipeline.kv.geometry import CacheShape
from tierkv.pipeline.kv.layer import LayerKV
from tierkv.pipeline.kv.moves import poll_fetches, poll_writes
from tierkv.pipeline.kv.sizing import keeps_sketch
from tierkv.pipeline.kv.sparse import decode
from tierkv.pipeline.kv.speculate import speculate
from tierkv.pipeline.kv.state import CacheState
from tierkv.pipeline.kv.streamed import attend_streamed
from tierkv.pipeline.kv.transfer import read_kv
from tierkv.pipeline.kv.workers import KVWorkers, settle

__all__ = ["TieredKVCache"]

_CODES_OFF = ("off: the key codes do not fit the device KV budget beside the chunk slots (with them the cache "
              "needs {need} of device KV room); sparse selection uses the chunk bound only (raise --device-mem "
              "or --kv-device-tokens to keep them)")


class TieredKVCache:
    """Chunked KV over device, host and disk, with exact or importance-selected (sparse) attention.

    Budgets are bytes for this cache alone, split evenly over layers; None = unbounded. Sequences
    of a batch share positions (equal lengths); each has its own chunks and selection. ``workers``
    (shared by an engine's caches) runs the copies; without one the cache starts and closes its own.
    ``geometry`` (another cache's ``geometry()``) fixes every layer's chunk size before the first K/V.
    ``sketch_note``: why key codes the policy would keep are off (the planner found no device room
    for them and built ``policy`` without them); ``stats()["sketch"]`` reports it.
    """

    def __init__(self, cfg: ModelConfig, policy: Policy, batch: int, capacity_tokens: int, dtype: torch.dtype,
                 device: torch.device | str, *, kv_device_bytes: int | None = None, kv_host_bytes: int | None = None,
                 offload_dir: str | Path | None = None, offload_bytes: int | None = None,
                 chunk_rule: ChunkRule = ChunkRule(), sink_chunks: int = 1, durable: bool = True,
                 attention_scratch_bytes: int = ATTENTION_SCRATCH_BYTES, workers: KVWorkers | None = None,
                 geometry: Mapping[str, Any] | None = None, sketch_note: str | None = None) -> None:
        device = torch.device(device)
        n = cfg.num_layers
        self._fixed = _fixed_sizes(geometry, n)
        sketch = bool(geometry["sketch"]) if geometry is not None else keeps_sketch(policy)
        shape = CacheShape(cfg, policy, dtype, batch, capacity_tokens,
                           None if kv_device_bytes is None else kv_device_bytes // n,
                           None if kv_host_bytes is None else kv_host_bytes // n, sink_chunks, chunk_rule, sketch)
        shape, note, spill = self._check_budgets(shape, offload_dir, sketch_note)
        if shape.sketch:
            prepare_estimator(device)          # the CPU estimator kernel's build: here, not in the first decode step
        store = None
        if spill:
            remove_abandoned(Path(offload_dir))  # type: ignore[arg-type]  # left by killed processes
            root = Path(offload_dir) / f"kv-{uuid.uuid4().hex[:12]}"  # type: ignore[arg-type]
            store = KVStore(root, budget_bytes=offload_bytes, durable=durable)
        owned = workers is None
        self._st = CacheState(shape, device, attention_scratch_bytes, workers or KVWorkers(device), store,
                              [None] * n, sketch_note=note)
        self._finalizer = weakref.finalize(self, _release, self._st, owned)   # if close() is forgotten

    @property
    def length_tokens(self) -> int:
        """Tokens stored per sequence (same for every layer once a forward finishes)."""
        return self._st.length

    @property
    def nbytes(self) -> int:
        """Bytes allocated on the compute device (slot pools, abstracts, tables)."""
        return sum(layer.nbytes for layer in self._st.live_layers())

    @property
    def closed(self) -> bool:
        return self._st.closed

    @property
    def workers(self) -> KVWorkers:
        return self._st.workers

    # -- protocol ----------------------------------------------------------------------------

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, window_tokens: int | None) -> torch.Tensor:
        """q (B, Hq, T, D), k/v (B, Hkv, T, D) post-RoPE, positions (B, T) -> (B, Hq, T, D)."""
        st, t = self._st, k.shape[2]
        kv = self._begin(layer, k, q, positions, window_tokens)
        st.decoding, st.hint = t == 1, None
        poll_fetches(st, kv, wait=False)
        if t == 1:
            append(st, kv, k, v)
            out = decode(st, kv, q, positions, window_tokens)
        else:
            st.c.exact_layer_steps += 1
            out = attend_streamed(st, kv, q, positions, kv.tokens, window_tokens, new_kv=(k, v))
            append(st, kv, k, v)
        speculate(st, (layer + 1) % len(st.layers), sparse=t == 1 and st.sparse_now())
        return out

    def advance(self, t: int) -> None:
        """Mark ``t`` more tokens as stored (called once per forward, after the last layer)."""
        st = self._st
        st.length += t
        st.c.forwards += 1
        st.c.decode_steps += st.decoding
        stats_mod.note_step(st)
        assert all(layer.tokens == st.length for layer in st.live_layers()), "advance() before every layer attended"

    # -- copy-out / copy-in (sessions) -------------------------------------------------------

    def read_kv(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions [start, end): each (B, Hkv, end - start, D) in the cache dtype, gathered
        synchronously from whatever tier holds each chunk."""
        assert not self._st.closed, "TieredKVCache used after close()"
        kv = self._st.layers[layer]
        assert kv is not None or start == end == 0, f"layer {layer} holds no K/V"
        if kv is None:
            shape = (self._st.batch, self._st.kv_heads, 0, self._st.head_dim)
            return (torch.empty(shape, dtype=self._st.dtype, device=self._st.device),) * 2
        return read_kv(self._st, kv, start, end)

    def append_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v (B, Hkv, n, D) at the next positions without attending (the normal append path:
        chunk close, abstracts, key codes, spilling); ``advance(n)`` follows once every layer got its
        K/V. A layer without a fixed chunk size (policy or geometry) gets the rule's default size."""
        kv = self._begin(layer, k, None, None, None)
        self._st.decoding, self._st.hint = False, None
        append(self._st, kv, k, v)

    def geometry(self) -> dict[str, Any]:
        """What fixes this cache's chunking (JSON-able): per-layer chunk tokens (None: no K/V yet) and
        measured attention entropy, and whether key codes are kept. Pass it to ``make_kv_cache`` (or
        this class) as ``geometry=`` to build a cache whose chunks line up with this one's."""
        layers = self._st.layers
        return {"kind": "tiered",
                "chunk_tokens": [kv.geo.chunk_tokens if kv else f for kv, f in zip(layers, self._fixed)],
                "attention_entropy": [kv.geo.entropy if kv else None for kv in layers],
                "sketch": self._st.shape.sketch}

    # -- reporting and lifetime --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """What the cache did: chunk sizes, bytes per tier, reads per decode step, speculation, estimator time."""
        return stats_mod.stats(self._st, self.nbytes)

    def check_invariants(self) -> int:
        """Assert that slots, the slot map, host buffers and the store follow the chunk tables; returns
        the chunks checked. Refused after ``close()`` (it would check nothing)."""
        return stats_mod.check_invariants(self._st)

    def close(self) -> None:
        """Wait for this cache's background work and free its chunks on every tier: device slots, host
        buffers and its offload subdirectory. Shared workers keep running. Idempotent."""
        if self._st.closed:
            return
        self._st.closed = True
        self._finalizer()

    def __enter__(self) -> "TieredKVCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup -------------------------------------------------------------------------------

    def _check_budgets(self, shape: CacheShape, offload_dir: str | Path | None,
                       sketch_note: str | None) -> tuple[CacheShape, str, bool]:
        """Fail early when the budgets cannot work at some chunk size a layer may choose (its size
        follows its attention skew, known only at prefill, so every such size must fit). Returns the
        shape (key codes dropped when they leave too little device room for the slots: the cache then
        runs on the chunk bound rather than refusing the context), the ``stats()["sketch"]`` note, and
        whether chunks may go to disk (a store is needed)."""
        sizes = shape.sizes(self._fixed)
        note = "on" if shape.sketch else (sketch_note or "off")
        if shape.sketch and not all(shape.fits(size) for size in sizes):
            need = shape.cfg.num_layers * max(shape.layer_minimum(size) for size in sizes)
            shape, note = dataclasses.replace(shape, sketch=False), _CODES_OFF.format(need=format_size(need))
        if not all(shape.fits(size) for size in sizes):
            raise shape.too_small_error(sizes)
        if offload_dir is None and any(shape.layer_geometry(size, None).spill_expected for size in sizes):
            raise shape.no_offload_error()
        return shape, note, offload_dir is not None and shape.device_layer_bytes is not None

    def _begin(self, layer: int, k: torch.Tensor, q: torch.Tensor | None, positions: torch.Tensor | None,
               window_tokens: int | None) -> LayerKV:
        """Checks common to attend/append_kv; the layer, allocated on its first K/V."""
        st = self._st
        assert not st.closed, "TieredKVCache used after close()"
        assert k.shape[0] == st.batch, f"batch {k.shape[0]} != the cache's {st.batch}"
        assert st.length + k.shape[2] <= st.shape.capacity_tokens, \
            f"KV cache full: {st.length + k.shape[2]} > {st.shape.capacity_tokens} tokens"
        poll_writes(st, wait=False)
        kv = st.layers[layer] or self._init_layer(layer, q, k, positions, window_tokens)
        assert kv.tokens == st.length, f"layer {layer} got K/V twice in one forward"
        return kv

    def _init_layer(self, layer: int, q: torch.Tensor | None, k: torch.Tensor, positions: torch.Tensor | None,
                    window_tokens: int | None) -> LayerKV:
        """Choose the layer's chunk size (a given geometry, else ``CacheShape.chunk_tokens``: the policy's,
        or adaptive from the attention skew of its first piece, the rule's default without queries) and
        allocate it. The budgets never change the size; they were checked for every size at build."""
        st, shape = self._st, self._st.shape
        entropy, size = None, self._fixed[layer]
        if size is None and shape.policy.chunk_tokens is None and q is not None and positions is not None:
            entropy = attention_entropy(q, k, positions, positions, window_tokens, shape.rule)
        size = shape.chunk_tokens(entropy) if size is None else min(size, shape.capacity_tokens)
        geo = shape.layer_geometry(size, entropy)
        if geo.spill_expected and st.store is None:
            raise shape.no_offload_error()
        kv = LayerKV(layer, geo, st.batch, st.kv_heads, st.head_dim, st.dtype, st.device, shape.host_layer_bytes,
                     st.store is not None, shape.sink_chunks, shape.sketch, shape.policy.kv_quant)
        st.layers[layer] = kv
        return kv


def _fixed_sizes(geometry: Mapping[str, Any] | None, layers: int) -> list[int | None]:
    """Per-layer chunk sizes a given geometry fixes (None: chosen as usual)."""
    if geometry is None:
        return [None] * layers
    sizes = list(geometry["chunk_tokens"])
    if geometry.get("kind") != "tiered" or len(sizes) != layers:
        raise ValueError(f"geometry {dict(geometry)} is not a tiered cache's geometry for {layers} layers")
    return sizes


def _release(st: CacheState, owns_workers: bool) -> None:
    """Wait for the cache's jobs, free its layers and delete its offload files; stop its own workers."""
    pending = [r for kv in st.live_layers() for f in [*kv.fetching.values(), *kv.writing] for r in f.records]
    pending += [r for kv in st.live_layers() if kv.prefetched is not None for r in kv.prefetched.records]
    settle(st.mover, pending)
    if owns_workers:
        st.workers.close()
    if st.device.type == "cuda":
        torch.cuda.synchronize(st.device)    # no copy from a host chunk is in flight when it is unpinned
    for kv in st.live_layers():
        kv.close()
    st.layers = [None] * len(st.layers)
    if st.store is not None:
        st.store.close(delete=True)
        st.store = None
    st.closed = True
