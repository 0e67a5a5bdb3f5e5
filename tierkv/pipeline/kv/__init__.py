"""KV caches behind the ``model.KVCache`` protocol: resident (``DenseKVCache``) or chunked over
device, host and disk (``TieredKVCache``), picked by ``make_kv_cache`` from the policy and budgets.

Why this package exists: attention code must not care where keys and values live. One module per
concern (see each module's docstring):

    sizing     pure byte counts (per token, minimum and most device/host bytes, batch that fits)
    geometry   per-layer chunk size and slot counts from the budgets (pure arithmetic)
    table      the pure chunk table: the one record of each chunk's tier and slot, pins, eviction order
    dense      the resident cache
    layer      one layer's tensors (slot pool, host buffers, chunk index) and in-flight records
    state      the small state object the functions below share
    append     new tokens: open/close chunks, abstracts, key codes
    moves      evictions, fetches, write-behind to disk (every change of tier)
    streamed   exact attention over any tier with an online softmax
    sparse     decode: importance selection and the slot-pool kernel (or exact)
    overflow   sparse steps whose selection does not fit the device
    speculate  prefetch for the next layer
    transfer   copy-out (read_kv) for sessions
    stats      stats() and check_invariants()
    workers    KVWorkers: the engine-lifetime threads every cache's copies run on
    tiered     the TieredKVCache facade
    factory    make_kv_cache
"""

from tierkv.pipeline.kv.dense import DenseKVCache
from tierkv.pipeline.kv.factory import make_kv_cache
from tierkv.pipeline.kv.sizing import (MIN_BUDGET_CHUNKS, budget_holds_chunks, chunk_size_candidates, chunk_tokens_for,
                                       cold_chunk_bytes, keeps_sketch, kv_budget_tokens, kv_bytes_per_token,
                                       kv_device_minimum_bytes, kv_device_want_bytes, kv_host_want_bytes,
                                       layer_index_bytes, max_kv_batch, min_chunk_slots)
from tierkv.pipeline.kv.table import ChunkKey, KVBudgetError, KVChunkTable, Tier
from tierkv.pipeline.kv.tiered import TieredKVCache
from tierkv.pipeline.kv.workers import KVWorkers

__all__ = ["ChunkKey", "DenseKVCache", "KVBudgetError", "KVChunkTable", "KVWorkers", "MIN_BUDGET_CHUNKS",
           "TieredKVCache", "Tier", "budget_holds_chunks", "chunk_size_candidates", "chunk_tokens_for",
           "cold_chunk_bytes", "keeps_sketch", "kv_budget_tokens", "kv_bytes_per_token", "kv_device_minimum_bytes", "kv_device_want_bytes",
           "kv_host_want_bytes", "layer_index_bytes", "make_kv_cache", "max_kv_batch", "min_chunk_slots"]
