"""One OpenMP thread pool in the process while the engine thread computes.

Why this module exists: PyTorch's CPU build (and every hand-written kernel here, which inductor links
against the same runtime) uses GNU OpenMP, and libgomp keeps one pool of worker threads per thread
that ever started a parallel region: the main thread that loaded the model, the engine thread that
runs the steps, a helper thread that once copied a large tensor. Their sleeping workers all count as
"managed threads", and once there are more of those than CPUs, libgomp throttles the spin-wait of its
barriers to a few iterations (its oversubscription rule): the engine thread's workers fall asleep
between two products and every region then starts with a futex wake. Measured on a 2-core VM (2026-12-07): a
576x576 bf16 decode product took 14.7 us on the main thread and 64-68 us on a second thread once the
main thread had a pool; releasing the main thread's pool brought it back to 14.5-14.9 us.

So:

- ``release_pool()``: the calling thread gives its pool back (``omp_pause_resource_all``, OpenMP 5.0;
  libgomp frees the pool of the calling thread). A caller of the engine calls it before it hands a
  step to the engine thread and waits (``core.EngineCore.run_step``): while it waits it has no use for
  workers, and a later parallel region of its own starts a new pool (a thread start, ~50 us).
- ``serial_thread()``: a helper thread (I/O, KV movers) runs its own parallel regions on one thread, so
  it never starts a pool; for a ``ThreadPoolExecutor``'s ``initializer``. Their work is reads, copies
  and small conversions beside the engine's compute on the same cores.

Both are no-ops where the process has no libgomp (another runtime, e.g. LLVM's libomp on macOS, is left
as it is).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import sys
from pathlib import Path

__all__ = ["openmp_runtime", "release_pool", "serial_thread"]

_PAUSE_SOFT = 1                      # omp_pause_soft: the runtime may free the pool's threads


@functools.lru_cache(maxsize=1)
def openmp_runtime() -> ctypes.CDLL | None:
    """The libgomp the process has loaded (torch's own), or None (not Linux, not loaded, too old)."""
    if not sys.platform.startswith("linux"):
        return None
    importlib.import_module("torch")    # loads torch's libgomp if torch is not loaded yet

    try:
        paths = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                 if "libgomp" in line and line.split()[-1].startswith("/")}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource_all") and hasattr(lib, "omp_set_num_threads"):
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            return lib
    return None


def release_pool() -> bool:
    """Free the calling thread's OpenMP worker threads, if it has any; False where nothing was done
    (no libgomp, or called inside a parallel region)."""
    lib = openmp_runtime()
    return lib is not None and lib.omp_pause_resource_all(_PAUSE_SOFT) == 0


def serial_thread() -> None:
    """Make the calling thread's own parallel regions (torch ops, kernels) run on this thread alone."""
    lib = openmp_runtime()
    if lib is not None:
        torch = importlib.import_module("torch")
        torch.get_num_threads()       # torch's once-per-thread setup sets the thread count: let it run first
        lib.omp_set_num_threads(1)
