"""Bounds on the memory that the CPU libraries under torch keep between steps.

Why this module exists: a plan counts weights, KV and one step's activations, and the cap it is
checked against (a cgroup, a machine's RAM) counts everything the process keeps. Two layers below
torch keep memory of their own that grows with the shapes an engine sees, outside any count:

- **oneDNN's primitive cache.** Torch's CPU matrix products (bf16 and fp16 among them) run as oneDNN
  primitives, one per shape, cached for reuse, and each cached primitive holds its own scratch memory:
  measured here (2026-12-07, Xeon with AMX, torch 2.13.0), 60 bf16 products (M x 2048) @ (2048 x 5632),
  M = 200..259, kept 152 MiB after they ended with the default cache of 1024 primitives, and 61 MiB with
  16. Every prefill step that packs a new number of rows adds a primitive per projection shape, so a
  batch-16 job on a 0.85B model kept 120 MiB more after its end, and a server that sees new prompt
  lengths all day keeps growing until 1024 primitives are cached. ``bound_onednn_cache`` sets
  ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` to ``ONEDNN_CACHE_PRIMITIVES`` unless the user set it: a step uses
  at most about eight shapes (the four projections and the head, per micro-batch), which all stay cached
  through the step's layers, so no step builds a primitive twice. Measured on that batch-16 job: the
  same wall time (22.6 against 22.7 s) with 8 or 16, and 2.4x slower with 0 (rebuilt on every call).
  oneDNN reads the variable when it makes its first primitive, so ``tierkv`` sets it at import; a
  process that ran a CPU matrix product before it imported tierkv keeps oneDNN's default.
- **glibc's heaps.** A prefill step frees activations of many sizes, and glibc keeps the freed memory
  in its heaps (resident) where the next, differently sized allocations often cannot reuse it. On that
  job (16 new tokens, uncapped) 13 sequences in, the process held 1.46 GB after a prefill step against
  1.35 GB with ``release_freed`` after each step, and its peak fell from 1.63 to 1.50 GB. ``release_freed`` (``malloc_trim(0)``: every arena's free pages
  go back to the system) runs after each step that fed a prompt piece (``core.EngineCore``); decode
  steps reuse the same sizes and skip it. A no-op without glibc.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

__all__ = ["ONEDNN_CACHE_PRIMITIVES", "bound_onednn_cache", "release_freed"]

ONEDNN_CACHE_PRIMITIVES = 16
_ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def bound_onednn_cache() -> str:
    """Set oneDNN's primitive cache capacity unless the user has; -> the capacity now asked for."""
    return os.environ.setdefault(_ONEDNN_CACHE_ENV, str(ONEDNN_CACHE_PRIMITIVES))


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> "ctypes._CFuncPtr | None":
    """glibc's ``malloc_trim``, or None (not Linux, or another C library without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim       # the process's own C library, as io.buffers finds madvise
    except AttributeError:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed() -> bool:
    """Give the memory glibc's heaps hold free back to the system; whether any was given back."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
