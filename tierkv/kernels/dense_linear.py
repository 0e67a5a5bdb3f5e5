"""16-bit (and fp32) dense linear layers on the CPU at decode: the fastest aten op for a few rows.

Why this module exists: a decode step multiplies each weight by one row (or a few: one per live
sequence), a memory-bound matrix-vector product, and which aten op computes it decides how much of
the memory bandwidth it reaches. For bf16 on this project's CPU, ``F.linear(x, w)`` (oneDNN's GEMM
with M = 1) reaches 9-21 GB/s while ``torch.mv(w, x)`` (PyTorch's reduced-precision gemv: one fp32
dot product per output row) is 1.2-1.5x faster on the same weight (docs/benchmarks.md,
"Decode per-step overhead"). Both accumulate in fp32; fp32 weights gain nothing (both reach the
fp32 bandwidth), so fp32 keeps ``F.linear`` unless asked. Weights are used as stored (a resident
tensor, a fused strided view, a view of a streamed ring slot): no repacking, no copy.

Paths (``linear_path`` says which; ``dense_linear`` runs it):

- "gemv": one row (M = 1) of a 16-bit weight of at least ``GEMV_MIN_ELEMENTS`` in a model of at least
  ``COMPILED_GEMV_MIN_PARAMS``: the compiled loop of ``kernels.cpu_gemv`` (22-30 GB/s here, 1.2-3x
  ``torch.mv``), where it builds; else "mv";
- "mv": one row: ``torch.mv(w, x)`` (``torch.addmv`` with a bias);
- "mgemv": a few rows (a decode batch: M in ``MGEMV_AUTO_ROWS[dtype, cpu_class]`` under "auto", every M
  from 2 to ``cpu_mgemv.MGEMV_MAX_M`` under "compiled") of a weight where "gemv" would run: the C++ kernel of
  ``kernels.cpu_mgemv`` (each weight row read once and dotted with all M rows), where it builds and
  the weight's columns are contiguous; else the path below;
- "mm_t": 2 <= M <= ``MM_T_MAX_M`` (not for the ``LINEAR_FEW_ROWS`` pairs): ``torch.mm(w, x^T)^T``, the
  weight as the left operand;
- "linear": anything else, and every tensor off the CPU (cuBLAS stays on CUDA), ``F.linear``.

``TIERKV_CPU_MATVEC`` (read per call; ``pick_cpu_matvec``): "auto" (default: "gemv"/"mgemv"/"mv"/"mm_t"
for bf16 and fp16 weights on the CPU, ``F.linear`` for fp32), "compiled" ("gemv"/"mgemv" for every
dtype and size: the tests' way to compare them on fp32 tokens), "on" ("mv"/"mm_t", also for fp32,
never a compiled kernel), "off" (``F.linear`` always). ``TIERKV_CPU_MGEMV=off`` keeps decode batches
off the few-row kernel (their aten op instead) and leaves one-row products as they are. Inside a
``torch.compile`` trace a few rows take "mm_t" (the few-row kernel is no traced op).

Shapes: x (..., K) with M = the product of the leading dims, weight (N, K), bias (N,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tierkv.kernels._select import env_choice
from tierkv.kernels.cpu_gemv import GemvKernel, compiled_gemv_allowed, gemv, gemv_kernel, kernels_allowed, run_gemv
from tierkv.kernels.cpu_mgemv import CPU_MGEMV_VAR, MGEMV_MAX_M, MGemvKernel, cpu_class, mgemv_kernel, run_mgemv

__all__ = ["COMPILED_GEMV_MIN_PARAMS", "CPU_MATVEC_CHOICES", "CPU_MATVEC_VAR", "CPU_MGEMV_VAR", "GEMV_MIN_ELEMENTS",
           "LINEAR_FEW_ROWS", "MGEMV_AUTO_ROWS", "MM_T_MAX_M",
           "compiled_gemv_allowed", "compiled_gemv_wanted", "dense_linear", "linear_path", "pick_cpu_matvec"]

CPU_MATVEC_VAR = "TIERKV_CPU_MATVEC"
CPU_MATVEC_CHOICES = ("auto", "compiled", "on", "off")
# "off" keeps a decode batch (M >= 2) on the aten ops whatever TIERKV_CPU_MATVEC says (an A/B of the
# few-row kernel alone: one-row products keep their path); "auto": as TIERKV_CPU_MATVEC picks.
# Weights below this many elements keep torch.mv under "auto": a kernel build for a matrix that
# takes microseconds does not pay.
GEMV_MIN_ELEMENTS = 1 << 18
# Models below this many parameters keep torch.mv under "auto" (``Runner`` says so per forward): the
# first build of the kernels costs seconds (~20 s cold for the first, ~1.6 s each after, ~0.3 s each
# from inductor's disk cache, plus ~3 s to import inductor), more than a small model's whole reply.
COMPILED_GEMV_MIN_PARAMS = 50_000_000
_AUTO_DTYPES = (torch.bfloat16, torch.float16)    # where the gemv paths measured faster than F.linear
# Rows up to which mm(w, x^T) beats F.linear for bf16 (decode batches); larger M is a GEMM (prefill).
MM_T_MAX_M = 8
# (dtype, ``cpu_mgemv.cpu_class()``) where F.linear beat mm_t at every few-row M: fp16 on the AMX CPU
# (oneDNN's AVX512-FP16 GEMM: 8.5-10.7 GB/s at M 2-8 against mm_t's 7.4; docs/benchmarks.md).
LINEAR_FEW_ROWS = frozenset({(torch.float16, "amx")})
# Rows (first, last) for which the few-row kernel (kernels.cpu_mgemv) beat both mm_t and F.linear under
# "auto", per (weight dtype, ``cpu_mgemv.cpu_class()``) (docs/benchmarks.md, "Batched decode: the
# few-row kernel"); a pair not here keeps the aten ops. "amx" (Intel Sapphire Rapids, 2 cores): bf16 AMX
# tiles memory-bound at every M to 32, ahead of oneDNN's AMX GEMM; fp16 (fp32 FMAs) ahead of oneDNN's
# AVX512-FP16 GEMM up to M = 4 only. "avx512_bf16" (AMD Zen 4): bf16 dot products up to M = 3
# (compute-bound from 4 on, oneDNN's GEMM less so); fp16 M 3-8. bf16 on other CPUs (the fp32 FMA
# kernel) lost to F.linear at every M on both.
MGEMV_AUTO_ROWS = {(torch.bfloat16, "amx"): (2, MGEMV_MAX_M), (torch.float16, "amx"): (2, 4),
                   (torch.bfloat16, "avx512_bf16"): (2, 3), (torch.float16, "avx512_bf16"): (3, 8)}


def pick_cpu_matvec(choice: str | None = None) -> str:
    """``choice`` (one of ``CPU_MATVEC_CHOICES`` or None) else ``$TIERKV_CPU_MATVEC`` else "auto"."""
    return env_choice(choice, CPU_MATVEC_VAR, CPU_MATVEC_CHOICES, "the CPU matrix-vector path")


def compiled_gemv_wanted(elements: int, choice: str | None = None) -> bool:
    """Whether a one-row product with a weight of ``elements`` values should take a compiled kernel of
    ``kernels.cpu_gemv`` (16-bit or quantized; the caller checks the dtype): "compiled" always, "auto"
    from ``GEMV_MIN_ELEMENTS`` up unless ``compiled_gemv_allowed(False)`` is in force, "on"/"off" never."""
    mode = pick_cpu_matvec(choice)
    if mode == "compiled":
        return True
    # inside a graph torch.compile traces (tierkv.compiled) the op tierkv::gemv is traced and asks at run
    # time (dynamo cannot trace ContextVar.get)
    allowed = torch.compiler.is_compiling() or kernels_allowed()
    return mode == "auto" and elements >= GEMV_MIN_ELEMENTS and allowed


def linear_path(x: torch.Tensor, weight: torch.Tensor, choice: str | None = None) -> str:
    """Which op ``dense_linear(x, weight, choice=choice)`` runs: "gemv", "mgemv", "mv", "mm_t" or "linear"
    (a "gemv" whose kernel does not build runs as "mv", an "mgemv" as "mm_t" or "linear")."""
    return _choose(x, weight, choice)[0]


def _choose(x: torch.Tensor, weight: torch.Tensor,
            choice: str | None) -> tuple[str, GemvKernel | MGemvKernel | None]:
    """(``linear_path``'s answer, the built kernel of a "gemv" or "mgemv" outside a ``torch.compile``
    trace, else None)."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return "linear", None
    mode = pick_cpu_matvec(choice)
    if mode == "off" or (mode == "auto" and weight.dtype not in _AUTO_DTYPES):
        return "linear", None
    m = x.numel() // max(1, x.shape[-1])
    if m == 1:
        if not compiled_gemv_wanted(weight.numel(), mode):
            return "mv", None
        if torch.compiler.is_compiling():
            return "gemv", None
        kernel = gemv_kernel(weight)
        return ("gemv", kernel) if kernel.fn is not None else ("mv", None)
    compiling = torch.compiler.is_compiling()      # a traced graph: aten ops only, no CPU probing
    few = 2 <= m <= MM_T_MAX_M and (compiling or (weight.dtype, cpu_class()) not in LINEAR_FEW_ROWS)
    aten = "mm_t" if few else "linear"
    if compiling or not _mgemv_rows(m, weight.dtype, mode) or x.dtype != weight.dtype or \
            not compiled_gemv_wanted(weight.numel(), mode):
        return aten, None
    kernel = mgemv_kernel(weight)
    return ("mgemv", kernel) if kernel is not None and kernel.fn is not None else (aten, None)


def _mgemv_rows(m: int, dtype: torch.dtype, mode: str) -> bool:
    """Whether M = ``m`` rows of a ``dtype`` weight are the few-row kernel's under ``mode``."""
    if env_choice(None, CPU_MGEMV_VAR, ("auto", "off"), "the few-row kernel switch") == "off":
        return False
    if mode == "compiled":
        return 2 <= m <= MGEMV_MAX_M
    first, last = MGEMV_AUTO_ROWS.get((dtype, cpu_class()), (0, -1))
    return first <= m <= last


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 choice: str | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the op ``linear_path`` picks.

    x:      (..., K) in the weight's dtype.
    weight: (N, K), any strides (a view of a store buffer included).
    bias:   optional (N,).
    choice: "auto" | "compiled" | "on" | "off" | None (``pick_cpu_matvec``).
    Returns (..., N) in x's dtype.
    """
    path, kernel = _choose(x, weight, choice)
    if path == "linear":
        return F.linear(x, weight, bias)
    n, k = weight.shape
    x2 = x.reshape(-1, k)                                                     # (M, K)
    if path == "gemv":
        out = gemv(weight, x2[0]) if kernel is None else run_gemv(kernel, weight, x2[0])   # (N,)
        out = out if bias is None else out.add_(bias)
    elif path == "mgemv":
        assert isinstance(kernel, MGemvKernel)
        out = run_mgemv(kernel, weight, x2)                                   # (M, N)
        out = out if bias is None else out.add_(bias)
    elif path == "mv":
        row = x2[0]
        out = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)   # (N,)
    else:
        out = torch.mm(weight, x2.t()).t().contiguous()                      # (N, M) -> (M, N)
        out = out if bias is None else out.add_(bias)
    return out.view(*x.shape[:-1], n)
