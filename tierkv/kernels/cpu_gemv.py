"""A compiled matrix-vector product for 16-bit weights on the CPU: one pass over the weight at memory speed.

Why this module exists: a decode step at batch 1 multiplies every weight by one row, so its speed is
the rate at which the weight's bytes are read. On this project's CPU, PyTorch's reduced-precision
``torch.mv`` reads bf16 weights at 7-10 GB/s and oneDNN's M = 1 GEMM (``F.linear``) at 9-21 GB/s,
while one plain loop (bf16 rows loaded in vector registers, widened to fp32, multiplied and summed,
parallel over output rows) reads them at 22-30 GB/s, near what llama.cpp reaches (docs/benchmarks.md,
"Decode: compiled matrix-vector kernels"). PyTorch's inductor writes exactly that C++ loop for
``(w.float() * x.float()).sum(-1)``. This module compiles it once per weight layout straight from an
FX graph (``torch._inductor.compile``: no dynamo, so no guards to check per call) and keeps the
compiled kernels for the process, as Triton keeps its JIT kernels.

A kernel is specific to the weight's shape, strides and dtype and to the thread count (inductor
writes the OpenMP thread count into the loop), so those are its key. Building one took ~20 s for the
first kernel of a process with a cold cache on this machine (inductor's headers), 1-2 s for each
other one, ~0.3 s from inductor's on-disk cache. Inside a graph that ``torch.compile`` traces
(``tierkv.compiled``) the kernel is the opaque op ``tierkv::gemv``. When the build
fails (no C++ compiler, an inductor error) the caller falls back to ``torch.mv``; ``GemvKernel.error``
says why and one warning names the fix.

Where a whole batch-1 decoder layer runs on the CPU with fused q/k/v and gate/up weights,
``kernels.decode_fusion`` takes over from this loop: hand-written C++ (``kernels.cpu_decode``) called
through inductor's plain C++ binding costs ~1 us per call against this graph's ~15-40 us of Python
wrapper, and folds the norms, the activation and the residual adds in. This loop serves the other
one-row products (unfused layers, ``torch.compile``'s opaque op, transposed weights).

Quantized packs have their own kernels, hand-written C++ built by the same inductor loader
(``kernels.cpu_qgemv``): ``cpu_int8`` (an inductor graph over its bytes took two OpenMP regions and
two extra ops per call and ran at about bf16's time in the model) and ``cpu_int4`` int4 (an inductor
graph over the tinygemm layout gathered the interleaved per-row scales element by element and ran
at half PyTorch's op; the C++ kernel uses bf16 dot products). ``quant_gemv`` takes a ``QuantWeight``
and ``quant_gemv_supported`` says where a kernel applies.

Shapes: weight (N, K) (any strides; packed as its pack says), x (K,) 16-bit -> (N,) in x's dtype.
"""

from __future__ import annotations

import functools
import time
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from tierkv.kernels._select import inductor_imports
from tierkv.kernels.quant_cpu import cpu_layout
from tierkv.kernels.cpu_qgemv import QGemvKernel, int4_tinygemm_kernel, int8_channel_kernel, run_kernel
from tierkv.quantspec import QuantWeight

__all__ = ["GemvKernel", "compiled_gemv_allowed", "gemv", "gemv_graph", "gemv_kernel", "kernels_allowed", "quant_gemv",
           "quant_gemv_kernel", "quant_gemv_supported", "run_gemv", "run_quant_gemv"]

Spec = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]     # an input's (shape, strides, dtype)
# Whether the model being run may use the kernels (True unless a ``Runner`` of a small model says not:
# ``dense_linear.COMPILED_GEMV_MIN_PARAMS``); a ContextVar so that each thread's forward sees its own.
_ALLOWED: ContextVar[bool] = ContextVar("tierkv_compiled_gemv_allowed", default=True)


@contextmanager
def compiled_gemv_allowed(allowed: bool) -> Iterator[None]:
    """Within the block, "auto" takes the compiled kernels only if ``allowed`` (a forward of one model)."""
    token = _ALLOWED.set(allowed)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def kernels_allowed() -> bool:
    """Whether the kernels are allowed in this context (``compiled_gemv_allowed``)."""
    return _ALLOWED.get()


@dataclass(frozen=True)
class GemvKernel:
    """A compiled matrix-vector product for one input layout, or why there is none (``fn`` None)."""

    fn: Callable[..., object] | None
    compile_s: float
    error: str | None = None


def gemv_graph(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the dense kernel computes: fp32 products summed along K, cast back. w (N, K), x (K,) -> (N,)."""
    return (w.float() * x.float()).sum(-1).to(w.dtype)


def _graph(kind: str) -> Callable[..., torch.Tensor]:
    assert kind == "dense", kind
    return gemv_graph


@functools.lru_cache(maxsize=256)
def _build(kind: str, specs: tuple[Spec, ...], threads: int) -> GemvKernel:
    """Compile the ``kind`` graph for inputs of these layouts (example tensors, never the weights).
    ``threads`` is in the key only: inductor writes the current thread count into the loop."""
    t0 = time.perf_counter()
    try:
        with inductor_imports():    # without Triton where it cannot launch (the build imports more)
            from torch._inductor import compile as inductor_compile
            from torch._inductor import config as inductor_config

            graph = torch.fx.symbolic_trace(_graph(kind))
            examples = [torch.empty_strided(shape, stride, dtype=dtype).zero_() for shape, stride, dtype in specs]
            with inductor_config.patch(compile_threads=1), warnings.catch_warnings():   # in this process: no
                warnings.simplefilter("ignore", UserWarning)     # pool of workers; inductor's notes (mixed
                fn = inductor_compile(graph, examples)             # 16-bit inputs) are not the user's business
            fn(*examples)                                       # the first call loads the built library
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the aten op instead
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(f"tierkv: a compiled CPU matrix-vector kernel could not be built ({reason}); decode uses "
                      "the aten op instead. Install a C++ compiler (g++) for inductor, or set "
                      "TIERKV_CPU_MATVEC=on to use the aten ops without trying.", RuntimeWarning, stacklevel=3)
        return GemvKernel(None, time.perf_counter() - t0, reason)
    return GemvKernel(fn, time.perf_counter() - t0)


def _spec(t: torch.Tensor) -> Spec:
    return tuple(t.shape), tuple(t.stride()), t.dtype


def _run(kernel: GemvKernel, *args: torch.Tensor) -> torch.Tensor:
    assert kernel.fn is not None
    out = kernel.fn(*args)
    return out[0] if isinstance(out, (list, tuple)) else out


def gemv_kernel(weight: torch.Tensor) -> GemvKernel:
    """The compiled kernel for a 16-bit ``weight``'s layout at the current thread count (built on first use)."""
    x = (weight.shape[1],), (1,), weight.dtype
    return _build("dense", (_spec(weight), x), torch.get_num_threads())


def run_gemv(kernel: GemvKernel, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (N, K) @ x (K,) -> (N,) through ``kernel``, a built ``gemv_kernel(weight)`` (a caller that
    has looked it up already: ``dense_linear``)."""
    return _run(kernel, weight, x.contiguous())


def _eager_gemv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    kernel = gemv_kernel(weight)
    return torch.mv(weight, x) if kernel.fn is None else run_gemv(kernel, weight, x)


@torch.library.custom_op("tierkv::gemv", mutates_args=())
def _gemv_op(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The kernel as an op ``torch.compile`` keeps opaque: traced as the formula, inductor fused it with
    the ops that make x (RMSNorm) and recomputed them per output row, at 0.4-0.75x the kernel's speed.
    The model-size rule is asked here, at run time (a small model's graph gets ``torch.mv``)."""
    return _eager_gemv(weight, x) if kernels_allowed() else torch.mv(weight, x)


@_gemv_op.register_fake
def _gemv_op_shape(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight.new_empty(weight.shape[0])


def gemv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (N, K) @ x (K,) -> (N,) through the compiled kernel, else ``torch.mv``; inside a function
    that ``torch.compile`` traces (``tierkv.compiled``), as the opaque op ``tierkv::gemv``."""
    if torch.compiler.is_compiling():
        return torch.ops.tierkv.gemv(weight, x)
    return _eager_gemv(weight, x)


def quant_gemv_kernel(qw: QuantWeight, x_dtype: torch.dtype) -> QGemvKernel | None:
    """The built ``cpu_qgemv`` kernel for ``qw`` and an x of ``x_dtype``, or None where none reads its pack
    or it did not build (one lookup: ``quant.quant_linear`` keeps it for ``run_quant_gemv``)."""
    if qw.device.type != "cpu":
        return None
    kernel = None
    if qw.quant.pack == "cpu_int8":
        kernel = int8_channel_kernel(qw.data, qw.qparams, x_dtype)
    elif qw.quant.pack == "cpu_int4" and qw.quant.bits == 4:
        kernel = int4_tinygemm_kernel(qw.data, qw.qparams, qw.quant.group_size, x_dtype, cpu_layout())
    return kernel if kernel is not None and kernel.fn is not None else None


def run_quant_gemv(kernel: QGemvKernel, qw: QuantWeight, x: torch.Tensor) -> torch.Tensor:
    """``qw`` @ x (K,) -> (N,) in x's dtype through ``kernel``, a built ``quant_gemv_kernel(qw, x.dtype)``."""
    data = qw.data.view(torch.int8) if qw.quant.pack == "cpu_int8" else qw.data
    return run_kernel(kernel, data, qw.qparams, x)


def quant_gemv_supported(qw: QuantWeight, x_dtype: torch.dtype) -> bool:
    """Whether ``quant_gemv`` computes ``qw`` for an x of ``x_dtype``: the cpu_int8 pack (contiguous), 16-bit x,
    a kernel that built."""
    return quant_gemv_kernel(qw, x_dtype) is not None


def quant_gemv(qw: QuantWeight, x: torch.Tensor) -> torch.Tensor:
    """The quantized (N, K) weight ``qw`` @ x (K,) -> (N,) in x's dtype (``quant_gemv_supported`` first)."""
    kernel = quant_gemv_kernel(qw, x.dtype)
    assert kernel is not None, "quant_gemv_supported(qw, x.dtype) is False: use quant_linear"
    return run_quant_gemv(kernel, qw, x)
