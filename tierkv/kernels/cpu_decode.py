"""Hand-written C++ matrix-vector products for one decode row, with the ops around them folded in.

Why this module exists: a resident decode step of a small model (the 135M: 30 layers of ~7 MB) is
~120 small products and ~1500 small ops per token, and per-call overhead, not bytes, set its speed
(docs/benchmarks.md, "Decode: one C++ call per product, norms and activations folded in"). Measured
here, one call of ``cpu_gemv``'s inductor-compiled loop costs 15-40 us more than the same loop
called through inductor's plain C++ binding (~1 us: ``CppPythonBindingsCodeCache``, as
``cpu_qgemv`` does), and each RMSNorm, SiLU x up and residual add between the products is a few
more aten ops of ~10-45 us each. So this module writes one loop in C++ per product, with:

- a prologue on the calling thread, before the one OpenMP region: none; "rmsnorm" (x normalised in
  fp32, rounded to x's dtype, times the norm weight: ``norm_rope.rms_norm_ref``'s values; the input
  norm folded into q/k/v, the post-attention norm into gate/up); "swiglu" (x = (gate, up) of 2K
  values, SiLU(gate) * up with eager's roundings: the MLP's activation folded into down);
- the rows split over the threads, in one of two loops (``Loop``, ``pick_loop``):
  "dot", for bf16 weights on a CPU with AVX512-BF16 (``cpu_qgemv.bf16_dot_cpu``: Zen 4, Sapphire
  Rapids) unless ``TIERKV_CPU_BF16_DOT=off``: x (already rounded to bf16 by the prologue) kept as a
  bf16 vector, ``DOT_ROWS`` weight rows per step sharing each load of 32 x values (the next step's rows'
  cache lines prefetched as the step reads its own: 1.15-1.35x over the hardware prefetchers alone), one fp32
  accumulator per row fed by ``_mm512_dpbf16_ps`` (VDPBF16PS), the last K % 32 values by masked
  loads; no widening of the weight: ~1.5x the FMA loop's rate on a quiet 2-core Sapphire Rapids,
  1.1-1.2x on a contended one (docs/benchmarks.md, "Decode: AVX512-BF16 dot products");
  "fma", every other case (fp16, fp32, CPUs without AVX512-BF16, or switched off): each row one
  sequential stream widened to fp32, two fp32 FMA accumulators (the loop shape ``cpu_qgemv``
  measured at the memory's rate on Zen 4);
- an epilogue per row: the product rounded to x's dtype, then + bias, then + residual, each rounded
  as the eager ops round (the o and down products' residual adds folded in).

Numerics: fp32 accumulation as ``torch.mv``'s reduced-precision path and the compiled loop; the
sums' order differs from aten's, so fp32 results differ by rounding only (tests compare tokens). In
the dot loop each bf16 x bf16 product is exact in fp32 and summed in fp32 (two per lane per
instruction, RNE), but VDPBF16PS treats denormal inputs as zero and flushes denormal results to zero
whatever MXCSR says: products or partial sums below ~1.2e-38 are lost, which the FMA loop keeps.

A kernel is specific to (N, K, the weight's row stride, dtype, prologue, bias, residual, threads, loop),
built once per process (~1-2 s with g++, ~0.3 s from inductor's disk cache). A build that fails
leaves ``DecodeKernel.fn`` None with the reason (one warning) and callers keep their aten ops.

Shapes: weight (N, K) with unit stride along K; x (K,) (swiglu: (2K,)); norm weight (K,); bias,
residual and the output (N,); all in one dtype (bf16, fp16 or fp32), contiguous vectors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from tierkv.errors import ArgumentError
from tierkv.kernels._select import env_choice
from tierkv.kernels.cpu_cpp import CTYPES, compile_kernel, cpp_prelude
from tierkv.kernels.cpu_qgemv import bf16_dot_cpu

__all__ = ["BF16_DOT_CHOICES", "BF16_DOT_VAR", "DOT_ROWS", "DecodeKernel", "FUSED_DECODE_VAR", "Loop", "PROLOGUES", "Prologue",
           "decode_kernel", "decode_kernel_supported", "pick_bf16_dot", "pick_loop", "run_decode_kernel"]

Prologue = Literal["none", "rmsnorm", "swiglu"]
PROLOGUES: tuple[Prologue, ...] = ("none", "rmsnorm", "swiglu")
Loop = Literal["dot", "fma"]                       # the rows' loop: bf16 dot products or fp32 FMAs
# Whether bf16 kernels use the dot-product loop where the CPU has it ("auto", the default) or the fp32
# FMA loop ("off"); read when a kernel is looked up, so a change takes effect at the next call.
BF16_DOT_VAR = "TIERKV_CPU_BF16_DOT"
FUSED_DECODE_VAR = "TIERKV_CPU_FUSED_DECODE"        # the fused decode path's switch (``decode_fusion``), named by a failed build
BF16_DOT_CHOICES = ("auto", "off")
DOT_ROWS = 8                                       # weight rows per step of the dot-product loop (measured)

# %(...)s: T the C++ element type, ARGS the extra parameters, PROLOGUE and EPILOGUE the folded ops, BODY
# the rows' loop (``_FMA_BODY`` or ``_DOT_BODY``), DOT the bf16 dot-product helper (empty for the FMA loop).
_SOURCE = r"""%(PRELUDE)s
constexpr int64_t N = %(N)d, K = %(K)d, RS = %(RS)d;
%(DOT)s
extern "C" void kernel(const %(T)s* x, const %(T)s* w%(ARGS)s, %(T)s* out)
{
%(XF)s%(PROLOGUE)s
%(BODY)s
}
"""

# fp32 FMAs: bf16/fp16 rows widened to fp32, two accumulators per row (any dtype, any AVX level).
_FMA_BODY = r"""    constexpr int64_t K2 = K - K %% (2 * L), K1 = K - K %% L;
    #pragma omp parallel for num_threads(%(THREADS)d) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const %(T)s* row = w + n * RS;
        V a0(0), a1(0);
        for (int64_t k = 0; k < K2; k += 2 * L) {
            a0 = at::vec::fmadd(load_f(row + k), V::loadu(xf + k), a0);
            a1 = at::vec::fmadd(load_f(row + k + L), V::loadu(xf + k + L), a1);
        }
        for (int64_t k = K2; k < K1; k += L) a0 = at::vec::fmadd(load_f(row + k), V::loadu(xf + k), a0);
        V a = a0 + a1;
        float y = at::vec::vec_reduce_all<float>([](V& p, V& q) { return p + q; }, a);
        for (int64_t k = K1; k < K; ++k) y += static_cast<float>(row[k]) * xf[k];
        y = round_t(y);
%(EPILOGUE)s
        out[n] = static_cast<%(T)s>(y);
    }"""

# AVX512-BF16: R rows per step share each load of x's 32 bf16 values, one fp32 accumulator per row; the
# last K % 32 values by masked loads (zeros beyond K, so nothing past a row is read).
_DOT = r"""#include <immintrin.h>
constexpr int64_t R = %(ROWS)d, KV = K - K %% 32;
constexpr bool PREFETCH = %(PREFETCH)s;
constexpr __mmask32 TAIL = static_cast<__mmask32>((1ull << (K %% 32)) - 1);
template <int64_t RR>
__attribute__((noinline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
static void dot_rows(const at::BFloat16* rows, const at::BFloat16* xb, float* y) {
    __m512 a[RR];
    for (int64_t r = 0; r < RR; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < KV; k += 32) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + k);
        for (int64_t r = 0; r < RR; ++r)
            a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_loadu_si512(rows + r * RS + k), xv);
        // the same cache lines of the next RR rows (this thread's next step): the hardware prefetchers alone
        // keep too few lines in flight for RR interleaved streams (~1.15-1.35x measured)
        if constexpr (PREFETCH)
            for (int64_t r = RR; r < 2 * RR; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows + r * RS + k), _MM_HINT_T0);
    }
    if constexpr (K %% 32 != 0) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(TAIL, xb + KV);
        for (int64_t r = 0; r < RR; ++r)
            a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_maskz_loadu_epi16(TAIL, rows + r * RS + KV), xv);
    }
    for (int64_t r = 0; r < RR; ++r) y[r] = _mm512_reduce_add_ps(a[r]);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
static void to_bf16(const float* xf, at::BFloat16* xb) {    // exact: the prologue left bf16 values in xf
    constexpr int64_t K16 = K - K %% 16;
    for (int64_t k = 0; k < K16; k += 16)
        _mm256_storeu_si256((__m256i*)(xb + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xf + k)));
    for (int64_t k = K16; k < K; ++k) xb[k] = static_cast<at::BFloat16>(xf[k]);
}"""

_DOT_BODY = r"""%(XB)s
    #pragma omp parallel for num_threads(%(THREADS)d) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += R) {
        const int64_t rows = N - n0 < R ? N - n0 : R;
        float ys[R];
        if (rows == R) dot_rows<R>(w + n0 * RS, xb, ys);
        else for (int64_t i = 0; i < rows; ++i) dot_rows<1>(w + (n0 + i) * RS, xb, ys + i);
        for (int64_t i = 0; i < rows; ++i) {
            const int64_t n = n0 + i;
            float y = round_t(ys[i]);
%(EPILOGUE)s
            out[n] = static_cast<%(T)s>(y);
        }
    }"""

_XF = "    alignas(64) float xf[K];\n"
_XB_AS_IS = "    const at::BFloat16* xb = x;"
_XB_FROM_XF = "    alignas(64) at::BFloat16 xb[K];\n    to_bf16(xf, xb);"

_PROLOGUE = {
    "none": "    for (int64_t k = 0; k < K; ++k) xf[k] = static_cast<float>(x[k]);",
    # HF's RMSNorm and eager's SiLU(gate) * up, each rounded where eager rounds (``cpu_cpp.cpp_prelude``)
    "rmsnorm": "    norm_row(x, nw, xf, K, eps);",
    "swiglu": "    silu_mul_row(x, x + K, xf, K);",
}


@dataclass(frozen=True)
class DecodeKernel:
    """A built kernel for one layout and set of folded ops, or why there is none (``fn`` None)."""

    fn: Callable[..., None] | None
    compile_s: float
    prologue: Prologue = "none"
    bias: bool = False
    residual: bool = False
    error: str | None = None
    loop: Loop = "fma"


def pick_bf16_dot(choice: str | None = None) -> str:
    """``choice`` (one of ``BF16_DOT_CHOICES`` or None) else ``$TIERKV_CPU_BF16_DOT`` else "auto"."""
    return env_choice(choice, BF16_DOT_VAR, BF16_DOT_CHOICES, "the CPU decode kernels' bf16 dot-product loop")


def pick_loop(dtype: torch.dtype) -> Loop:
    """The rows' loop a kernel for ``dtype`` gets now: "dot" for bf16 on a CPU with AVX512-BF16 unless
    ``TIERKV_CPU_BF16_DOT`` is "off", else "fma"."""
    return "dot" if dtype == torch.bfloat16 and bf16_dot_cpu() and pick_bf16_dot() == "auto" else "fma"


def _source(n: int, k: int, row_stride: int, dtype: torch.dtype, prologue: Prologue, bias: bool, residual: bool,
            threads: int, loop: Loop, rows: int, prefetch: bool = True) -> tuple[str, list[str]]:
    """The C++ source of one kernel and its parameters' C types (x, w, then the extras, out last)."""
    ctype = CTYPES[dtype]
    params = []                      # (C type, name) of the parameters between w and out
    if prologue == "rmsnorm":
        params += [(f"const {ctype}*", "nw"), ("float", "eps")]
    if bias:
        params.append((f"const {ctype}*", "b"))
    if residual:
        params.append((f"const {ctype}*", "res"))
    pad = " " * (12 if loop == "dot" else 8)
    epilogue = [f"{pad}y = round_t(y + static_cast<float>(b[n]));"] if bias else []
    epilogue += [f"{pad}y = round_t(static_cast<float>(res[n]) + y);"] if residual else []
    fields = {"T": ctype, "THREADS": threads, "EPILOGUE": "\n".join(epilogue), "ROWS": rows,
              "PREFETCH": "true" if prefetch else "false",
              "XB": _XB_AS_IS if prologue == "none" else _XB_FROM_XF}
    body = (_DOT_BODY if loop == "dot" else _FMA_BODY) % fields
    direct = loop == "dot" and prologue == "none"      # the dot loop reads a plain x as it is: no fp32 copy
    source = _SOURCE % {"PRELUDE": cpp_prelude(dtype), "T": ctype, "N": n, "K": k, "RS": row_stride, "BODY": body,
                        "DOT": _DOT % fields if loop == "dot" else "", "XF": "" if direct else _XF,
                        "ARGS": "".join(f", {t} {name}" for t, name in params),
                        "PROLOGUE": "" if direct else _PROLOGUE[prologue]}
    return source, [f"const {ctype}*", f"const {ctype}*", *(t for t, _ in params), f"{ctype}*"]


@functools.lru_cache(maxsize=256)
def _build(n: int, k: int, row_stride: int, dtype: torch.dtype, prologue: Prologue, bias: bool, residual: bool,
           threads: int, loop: Loop, rows: int, prefetch: bool) -> DecodeKernel:
    source, argtypes = _source(n, k, row_stride, dtype, prologue, bias, residual, threads, loop, rows, prefetch)
    fn, seconds, error = compile_kernel(argtypes, source, "decode matrix-vector", FUSED_DECODE_VAR)
    return DecodeKernel(fn, seconds, prologue, bias, residual, error, loop)


def decode_kernel_supported(weight: torch.Tensor) -> bool:
    """Whether ``decode_kernel`` takes this weight: a 2-D CPU tensor of a supported dtype, unit stride along K."""
    return weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype in CTYPES and \
        weight.stride(1) == 1 and weight.stride(0) >= weight.shape[1]


def decode_kernel(weight: torch.Tensor, prologue: Prologue = "none", bias: bool = False,
                  residual: bool = False, loop: Loop | None = None, rows: int = DOT_ROWS,
                  prefetch: bool = True) -> DecodeKernel | None:
    """The built kernel for ``weight`` (N, K) with these folded ops at the current thread count (built on
    first use), or None where ``decode_kernel_supported`` says no. ``loop`` None: ``pick_loop``'s; "dot"
    is refused (ArgumentError) unless the weight is bf16 and the CPU has AVX512-BF16; ``rows``: the dot
    loop's weight rows per step (1-16); ``prefetch``: the dot loop prefetches the next step's rows (False:
    the hardware prefetchers alone, an A/B of it)."""
    if not decode_kernel_supported(weight):
        return None
    loop = pick_loop(weight.dtype) if loop is None else loop
    if loop == "dot" and (weight.dtype != torch.bfloat16 or not bf16_dot_cpu()):
        raise ArgumentError(f"the bf16 dot-product loop needs bf16 weights (got {weight.dtype}) on a CPU with "
                            "AVX512-BF16; pass loop=None or \"fma\"")
    if not 1 <= rows <= 16:
        raise ArgumentError(f"rows per step of the dot-product loop must be 1-16, got {rows}")
    n, k = weight.shape
    return _build(n, k, weight.stride(0), weight.dtype, prologue, bias, residual, torch.get_num_threads(), loop,
                  rows if loop == "dot" else 0, prefetch and loop == "dot")


def run_decode_kernel(kernel: DecodeKernel, weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None,
                      eps: float = 0.0, bias: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight (N, K) @ prologue(x) (+ bias) (+ residual) -> (N,) in the weight's dtype through ``kernel``
    (a built ``decode_kernel(weight, ...)``; the tensors it folds in must be given, contiguous, in its
    dtype). x (K,), or (2K,) = (gate, up) for "swiglu"; norm_weight (K,) and eps for "rmsnorm"; ``out``
    (N,) contiguous in that dtype to write into (a new tensor if None)."""
    assert kernel.fn is not None
    extras: list[object] = []
    if kernel.prologue == "rmsnorm":
        assert norm_weight is not None
        extras += [norm_weight, float(eps)]
    if kernel.bias:
        assert bias is not None
        extras.append(bias)
    if kernel.residual:
        assert residual is not None
        extras.append(residual)
    if out is None:
        out = torch.empty(weight.shape[0], dtype=weight.dtype)
    assert out.shape == (weight.shape[0],) and out.dtype == weight.dtype and out.is_contiguous()
    kernel.fn(x, weight, *extras, out)
    return out
