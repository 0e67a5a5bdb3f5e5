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

The same loop serves the CPU packs of quantized weights (``quantspec``: ``cpu_int8`` per channel,
``cpu_int4`` int4 and two-plane int8 in PyTorch's tinygemm layout), where PyTorch's weight-only ops
are compute-bound on 2 cores (int4 at ~12 GB/s of its bytes, int8 per channel at bf16's time): the
graph reads the packed bytes as stored, unpacks nibbles and dequantizes in registers (w = q * scale
+ minimum, fp32, the (G, N, 2) float16 qparams read as stored), and never writes a dequantized
weight. ``quant_gemv`` takes a ``QuantWeight``; ``quant_gemv_supported`` says where it applies.

Shapes: weight (N, K) (any strides; packed as its pack says), x (K,) 16-bit -> (N,) in x's dtype.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from tierkv.quantspec import CHANNEL, QuantWeight

__all__ = ["GemvKernel", "gemv", "gemv_graph", "gemv_kernel", "quant_gemv", "quant_gemv_supported"]

# the tinygemm layout's full blocks per CPU capability: (rows per block, pair stride = rows / 2);
# byte j of a block's K-th column holds rows j (low nibble) and j + stride (high): kernels/quant_cpu.py
_TINYGEMM_BLOCKS = {"AVX512": 64, "AVX2": 32}
Spec = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]     # an input's (shape, strides, dtype)


@dataclass(frozen=True)
class GemvKernel:
    """A compiled matrix-vector product for one input layout, or why there is none (``fn`` None)."""

    fn: Callable[..., object] | None
    compile_s: float
    error: str | None = None


def gemv_graph(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the dense kernel computes: fp32 products summed along K, cast back. w (N, K), x (K,) -> (N,)."""
    return (w.float() * x.float()).sum(-1).to(w.dtype)


def _int8_channel_graph(data: torch.Tensor, qparams: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """cpu_int8: data (N, K) int8 (q - 128), qparams (1, N, 2) -> (N,): with w = s*(q - 128) + (m + 128 s),
    y = s * sum(x * (q - 128)) + (m + 128 s) * sum(x), in fp32."""
    xf = x.float()
    scale, minimum = qparams[0, :, 0].float(), qparams[0, :, 1].float()
    return ((data.float() * xf).sum(-1) * scale + (minimum + 128.0 * scale) * xf.sum()).to(x.dtype)


def _tinygemm_graph(bits: int, blocks: int, groups: int, group_size: int, half: int) -> Callable[..., torch.Tensor]:
    """cpu_int4 (full blocks of 2 * ``half`` rows): data (N, K/2) uint8 for int4, (2, N, K/2) (hi, lo
    planes, q = 16 hi + lo) for int8; qparams (G, N, 2) -> (N,). Rows j and j + half of a block share
    byte j of each K column (NB, K, half); w = q * scale + minimum per (group, row)."""

    def graph(data: torch.Tensor, qparams: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = (blocks, groups, group_size, half)                              # (NB, G, GS, half)
        if bits == 4:
            b = data.view(shape)
            low, high = (b & 15).float(), (b >> 4).float()
        else:
            hi, lo = data[0].view(shape), data[1].view(shape)
            low, high = ((hi & 15) * 16 + (lo & 15)).float(), ((hi >> 4) * 16 + (lo >> 4)).float()
        per_row = (groups, blocks, 2, half)
        scale = qparams[..., 0].float().view(per_row).permute(1, 0, 2, 3)[:, :, None]    # (NB, G, 1, 2, half)
        minimum = qparams[..., 1].float().view(per_row).permute(1, 0, 2, 3)[:, :, None]
        xg = x.float().view(1, groups, group_size, 1)
        y_low = ((low * scale[..., 0, :] + minimum[..., 0, :]) * xg).sum((1, 2))            # (NB, half)
        y_high = ((high * scale[..., 1, :] + minimum[..., 1, :]) * xg).sum((1, 2))
        return torch.stack((y_low, y_high), 1).reshape(-1).to(x.dtype)

    return graph


def _graph(kind: str, consts: tuple[int, ...]) -> Callable[..., torch.Tensor]:
    if kind == "dense":
        return gemv_graph
    if kind == "int8_channel":
        return _int8_channel_graph
    assert kind == "tinygemm", kind
    return _tinygemm_graph(*consts)


@functools.lru_cache(maxsize=256)
def _build(kind: str, specs: tuple[Spec, ...], consts: tuple[int, ...], threads: int) -> GemvKernel:
    """Compile the ``kind`` graph for inputs of these layouts (example tensors, never the weights).
    ``threads`` is in the key only: inductor writes the current thread count into the loop."""
    t0 = time.perf_counter()
    try:
        from torch._inductor import compile as inductor_compile
        from torch._inductor import config as inductor_config

        graph = torch.fx.symbolic_trace(_graph(kind, consts))
        examples = [torch.empty_strided(shape, stride, dtype=dtype).zero_() for shape, stride, dtype in specs]
        with inductor_config.patch(compile_threads=1), warnings.catch_warnings():   # in this process: no
            warnings.simplefilter("ignore", UserWarning)     # pool of workers; inductor's notes (mixed 16-bit
            fn = inductor_compile(graph, examples)             # inputs) are not the user's business
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
    return _build("dense", (_spec(weight), x), (), torch.get_num_threads())


def gemv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (N, K) @ x (K,) -> (N,) through the compiled kernel, else ``torch.mv``. Inside a function
    that ``torch.compile`` traces (``tierkv.compiled``), the formula itself, for inductor to fuse."""
    if torch.compiler.is_compiling():
        return gemv_graph(weight, x)
    kernel = gemv_kernel(weight)
    if kernel.fn is None:
        return torch.mv(weight, x)
    return _run(kernel, weight, x.contiguous())


def _quant_case(qw: QuantWeight, x_dtype: torch.dtype) -> tuple[str, tuple[torch.Tensor, torch.Tensor],
                                                                tuple[int, ...]] | None:
    """(graph kind, its weight inputs, constants) for ``qw``, or None where no graph reads its pack."""
    if x_dtype not in (torch.bfloat16, torch.float16) or qw.device.type != "cpu":
        return None
    n, k = qw.shape
    tq = qw.quant
    if tq.pack == "cpu_int8":
        return "int8_channel", (qw.data.view(torch.int8), qw.qparams), ()
    block = _TINYGEMM_BLOCKS.get(torch.backends.cpu.get_cpu_capability())
    if tq.pack != "cpu_int4" or block is None or n % block or tq.group_size == CHANNEL or tq.bits not in (4, 8):
        return None
    return "tinygemm", (qw.data, qw.qparams), (tq.bits, n // block, k // tq.group_size, tq.group_size, block // 2)


def _quant_kernel(qw: QuantWeight, x_dtype: torch.dtype) -> tuple[GemvKernel, tuple[torch.Tensor, ...]] | None:
    case = _quant_case(qw, x_dtype)
    if case is None:
        return None
    kind, inputs, consts = case
    x = (qw.shape[1],), (1,), x_dtype
    return _build(kind, (*map(_spec, inputs), x), consts, torch.get_num_threads()), inputs


def quant_gemv_supported(qw: QuantWeight, x_dtype: torch.dtype) -> bool:
    """Whether ``quant_gemv`` computes ``qw`` for an x of ``x_dtype``: a CPU pack it reads (cpu_int8;
    cpu_int4 int4/int8 whose rows fill whole blocks of this CPU's layout), 16-bit x, a kernel that built."""
    found = _quant_kernel(qw, x_dtype)
    return found is not None and found[0].fn is not None


def quant_gemv(qw: QuantWeight, x: torch.Tensor) -> torch.Tensor:
    """The quantized (N, K) weight ``qw`` @ x (K,) -> (N,) in x's dtype (``quant_gemv_supported`` first)."""
    found = _quant_kernel(qw, x.dtype)
    assert found is not None, "quant_gemv_supported(qw, x.dtype) is False: use quant.quant_linear"
    kernel, inputs = found
    return _run(kernel, *inputs, x.contiguous())
