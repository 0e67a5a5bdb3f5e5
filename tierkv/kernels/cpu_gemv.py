"""A compiled matrix-vector product for 16-bit weights on the CPU: one pass over the weight at memory speed.

Why this module exists: a decode step at batch 1 multiplies every weight by one row, so its speed is
the rate at which the weight's bytes are read. On this project's CPU, PyTorch's reduced-precision
``torch.mv`` reads bf16 weights at 7-10 GB/s and oneDNN's M = 1 GEMM (``F.linear``) at 9-21 GB/s,
while one plain loop (bf16 rows loaded in vector registers, widened to fp32, multiplied and summed,
parallel over output rows) reads them at 22-30 GB/s, what llama.cpp reaches (docs/benchmarks.md,
"Decode per-step overhead"). PyTorch's inductor writes exactly that C++ loop for
``(w.float() * x.float()).sum(-1)``. This module compiles it once per weight layout straight from an
FX graph (``torch._inductor.compile``: no dynamo, so no guards to check per call) and keeps the
compiled kernels for the process, as Triton keeps its JIT kernels.

A kernel is specific to the weight's shape, strides and dtype and to the thread count (inductor
writes the OpenMP thread count into the loop), so those are its key. Building one takes about 1-3 s
the first time on this machine and ~0.1 s once inductor's on-disk cache holds it. When the build
fails (no C++ compiler, an inductor error) the caller falls back to ``torch.mv``; ``GemvKernel.error``
says why and one warning names the fix.

Shapes: weight (N, K) 16-bit (any strides), x (K,) in the weight's dtype -> (N,) in that dtype.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["GemvKernel", "gemv", "gemv_graph", "gemv_kernel"]


@dataclass(frozen=True)
class GemvKernel:
    """A compiled ``w @ x`` for one weight layout, or why there is none (``fn`` None, ``error`` set)."""

    fn: Callable[[torch.Tensor, torch.Tensor], object] | None
    compile_s: float
    error: str | None = None


def gemv_graph(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes: fp32 products summed along K, cast back. w (N, K), x (K,) -> (N,)."""
    return (w.float() * x.float()).sum(-1).to(w.dtype)


@functools.lru_cache(maxsize=256)
def _build(shape: tuple[int, int], stride: tuple[int, int], dtype: torch.dtype, threads: int) -> GemvKernel:
    """Compile ``gemv_graph`` for one weight layout (example tensors of that layout, never the weight)."""
    t0 = time.perf_counter()
    try:
        from torch._inductor import compile as inductor_compile
        from torch._inductor import config as inductor_config

        graph = torch.fx.symbolic_trace(gemv_graph)
        w = torch.empty_strided(shape, stride, dtype=dtype).zero_()
        x = torch.zeros(shape[1], dtype=dtype)
        with inductor_config.patch(compile_threads=1):     # in this process: no pool of compile workers
            fn = inductor_compile(graph, [w, x])
        fn(w, x)                                            # the first call loads the built library
    except Exception as exc:  # noqa: BLE001 - any build failure means: use torch.mv instead
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(f"tierkv: the compiled CPU matrix-vector kernel could not be built ({reason}); decode uses "
                      "torch.mv instead. Install a C++ compiler (g++) for inductor, or set TIERKV_CPU_MATVEC=on "
                      "to use torch.mv without trying.", RuntimeWarning, stacklevel=3)
        return GemvKernel(None, time.perf_counter() - t0, reason)
    return GemvKernel(fn, time.perf_counter() - t0)


def gemv_kernel(weight: torch.Tensor) -> GemvKernel:
    """The compiled kernel for ``weight``'s layout at the current thread count (built on first use)."""
    return _build(tuple(weight.shape), tuple(weight.stride()), weight.dtype, torch.get_num_threads())


def gemv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (N, K) @ x (K,) -> (N,) through the compiled kernel, else ``torch.mv``. Inside a function
    that ``torch.compile`` traces (``tierkv.compiled``), the formula itself, for inductor to fuse."""
    if torch.compiler.is_compiling():
        return gemv_graph(weight, x)
    kernel = gemv_kernel(weight)
    if kernel.fn is None:
        return torch.mv(weight, x)
    out = kernel.fn(weight, x.contiguous())
    return out[0] if isinstance(out, (list, tuple)) else out

