"""Hand-written C++ matrix-vector products for the CPU quantized packs at decode (M = 1).

Why this module exists: one decode row of a quantized weight reads 1 byte (int8) or half a byte
(int4) per weight against bf16's 2, so it should take half or a quarter of bf16's time; on this
project's 2-core Zen 4 CPU PyTorch's weight-only ops are compute-bound at M = 1 (int8 per channel
at about bf16's time, int4 at ~12 GB/s), and so was inductor's graph over the int8 bytes inside the
model's step (two OpenMP regions per call, one for ``sum(x)``, plus an fp32 copy of x and a cast of
the output as separate ops). These kernels stream the stored bytes as they are (no repacking, no
dequantized weight, no temporaries), one OpenMP region per call, output written in x's dtype:

- ``cpu_int8`` (per channel), bf16 or fp16 x: x widened into an fp32 buffer and summed once on the
  calling thread; each row one sequential stream of its int8 bytes, 32 per step, two accumulators.
- ``cpu_int4`` (int4, the AVX512 tinygemm layout), bf16 x, N a multiple of 64, CPUs with AVX512-BF16
  and VBMI: codes turned into exact bf16 values by a byte permute and one logic op, multiplied with
  x's bf16 pairs by bf16 dot products into fp32 (layout and math at ``_INT4_TINYGEMM``).

The loops' shape was measured, not guessed (docs/benchmarks.md, "Resident quantized decode: C++
matrix-vector kernels"): here a row loop reading 16-32 bytes per step with one or two accumulators
streams at the memory's rate (~18 GB/s per core, a plain byte sum's rate), while four accumulators
over 64 bytes per step, or two rows at once, ran 1.5-2x slower.

The kernels are C++ built by inductor's own loader (``CppPythonBindingsCodeCache``: the same
compiler, flags, vector headers and on-disk cache as ``cpu_gemv``'s compiled loops), once per
weight shape, x dtype and thread count, as inductor specialises its loops. A build that fails leaves
``QGemvKernel.fn`` None with the reason (one warning), and the caller uses PyTorch's op instead.

Numerics (both): fp32 sums of exact products of x's 16-bit values and the codes, scales and minimums
from the stored fp16 qparams in fp32, one rounding to x's dtype at the end. int8:
y = s * sum(x * (q - 128)) + (minimum + 128 s) * sum(x).

Shapes: int8 data (N, K) int8 (the bits of q - 128), qparams (1, N, 2) float16; int4 data (N, K/2)
uint8 (tinygemm), qparams (G, N, 2) float16; all contiguous; x (K,) -> (N,) in x's dtype.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from tierkv.kernels._select import cpp_loader, inductor_imports

__all__ = ["INT4_BLOCK_ROWS", "QGemvKernel", "bf16_dot_cpu", "int4_kernel_cpu", "int4_tinygemm_kernel", "int8_channel_kernel", "vector_width",
           "run_kernel"]

_CTYPES = {torch.bfloat16: "at::BFloat16", torch.float16: "at::Half"}

_INT8_CHANNEL = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C" void kernel(const %(T)s* x, const int8_t* w, const at::Half* qp, %(T)s* out)
{
    constexpr int64_t N = %(N)d, K = %(K)d;
    using V = at::vec::Vectorized<float>;
    constexpr int64_t L = V::size();
    constexpr int64_t K2 = K - K %% (2 * L);
    alignas(64) float xf[K];
    V xsv(0);
    for (int64_t k = 0; k < K; k += L) {
        V v = at::vec::convert<float>(at::vec::Vectorized<%(T)s>::loadu(x + k, L));
        v.store(xf + k);
        xsv = xsv + v;
    }
    const float xsum = at::vec::vec_reduce_all<float>([](V& a, V& b) { return a + b; }, xsv);
    #pragma omp parallel for num_threads(%(THREADS)d) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const int8_t* row = w + n * K;
        V a0(0), a1(0);
        for (int64_t k = 0; k < K2; k += 2 * L) {
            a0 = a0 + at::vec::convert<float>(at::vec::Vectorized<int8_t>::loadu(row + k, L)) * V::loadu(xf + k);
            a1 = a1 + at::vec::convert<float>(at::vec::Vectorized<int8_t>::loadu(row + k + L, L))
                      * V::loadu(xf + k + L);
        }
        for (int64_t k = K2; k < K; k += L)
            a0 = a0 + at::vec::convert<float>(at::vec::Vectorized<int8_t>::loadu(row + k, L)) * V::loadu(xf + k);
        V a = a0 + a1;
        const float dot = at::vec::vec_reduce_all<float>([](V& p, V& q) { return p + q; }, a);
        const float s = static_cast<float>(qp[2 * n]), m = static_cast<float>(qp[2 * n + 1]);
        out[n] = static_cast<%(T)s>(dot * s + (m + 128.0f * s) * xsum);
    }
}
"""

# cpu_int4 (int4, tinygemm layout of an AVX512 process): blocks of 64 rows, each K x 32 bytes; byte j at
# column k holds row j's code (low nibble) and row j + 32's (high nibble). One block per step of the
# thread loop; per pair of columns (k, k+1: 64 contiguous bytes), one byte permute puts each row's two
# codes into a 32-bit lane, one ternary-logic op makes them the bf16 pair (128 + q_k, 128 + q_k+1)
# (exact: 0x4300 | q), and one AVX512-BF16 dot product multiplies them with x's (x_k, x_k+1) pair in fp32:
# 4 dot products feed the block's 64 rows. Per group, the rows' (scale, minimum) pairs (qparams
# (G, N, 2) fp16) are widened and split: y = sum_g s_g * D_g + (m_g - 128 s_g) * X_g, with D_g the
# group's dot product of (128 + q) and x, X_g = sum of x over the group (fp32, once per call).
_INT4_TINYGEMM = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <immintrin.h>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16")))
static void run(const at::BFloat16* x, const uint8_t* w, const at::Half* qp, at::BFloat16* out)
{
    constexpr int64_t N = %(N)d, K = %(K)d, GS = %(GS)d, G = K / GS;
    alignas(64) float xs[G];
    for (int64_t g = 0; g < G; ++g) {
        float sum = 0.f;
        for (int64_t k = g * GS; k < (g + 1) * GS; ++k) sum += static_cast<float>(x[k]);
        xs[g] = sum;
    }
    const uint32_t* xpairs = reinterpret_cast<const uint32_t*>(x);       // (x_2i, x_2i+1) as one 32-bit word
    #pragma omp parallel for num_threads(%(THREADS)d) schedule(static)
    for (int64_t nb = 0; nb < N / 64; ++nb) {
        alignas(64) uint8_t pick[2][64];     // byte 4j (2): row j's (16 + j's) code byte of column k (k + 1)
        for (int h = 0; h < 2; ++h)
            for (int j = 0; j < 16; ++j) {
                pick[h][4 * j] = 16 * h + j; pick[h][4 * j + 1] = 0;
                pick[h][4 * j + 2] = 32 + 16 * h + j; pick[h][4 * j + 3] = 0;
            }
        const __m512i pick0 = _mm512_load_si512(pick[0]), pick1 = _mm512_load_si512(pick[1]);
        const __mmask64 keep = 0x5555555555555555ULL;
        const __m512i nibbles = _mm512_set1_epi32(0x000F000F), bias = _mm512_set1_epi32(0x43004300);
        const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
        const uint8_t* blk = w + nb * K * 32;
        __m512 t[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t g = 0; g < G; ++g) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t k = g * GS; k < (g + 1) * GS; k += 2) {
                const __m512i z = _mm512_loadu_si512(blk + k * 32);
                const __m512bh xk = (__m512bh)_mm512_set1_epi32(static_cast<int>(xpairs[k / 2]));
                const __m512i p0 = _mm512_maskz_permutexvar_epi8(keep, pick0, z);     // rows 0-15 | 32-47
                const __m512i p1 = _mm512_maskz_permutexvar_epi8(keep, pick1, z);     // rows 16-31 | 48-63
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_ternarylogic_epi32(p0, nibbles, bias, 0xEA), xk);
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_ternarylogic_epi32(p1, nibbles, bias, 0xEA), xk);
                const __m512i h0 = _mm512_srli_epi32(p0, 4), h1 = _mm512_srli_epi32(p1, 4);   // the high nibbles
                a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_ternarylogic_epi32(h0, nibbles, bias, 0xEA), xk);
                a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_ternarylogic_epi32(h1, nibbles, bias, 0xEA), xk);
            }
            const __m512 acc[4] = {a0, a1, a2, a3};
            const uint16_t* pairs = reinterpret_cast<const uint16_t*>(qp) + (g * N + nb * 64) * 2;
            const __m512 xg = _mm512_set1_ps(xs[g]), c128 = _mm512_set1_ps(128.0f);
            for (int i = 0; i < 4; ++i) {              // rows 16 i .. 16 i + 15: 16 (scale, minimum) pairs
                const __m256i* src = reinterpret_cast<const __m256i*>(pairs + 32 * i);
                const __m512 q0 = _mm512_cvtph_ps(_mm256_loadu_si256(src));
                const __m512 q1 = _mm512_cvtph_ps(_mm256_loadu_si256(src + 1));
                const __m512 s = _mm512_permutex2var_ps(q0, even, q1), m = _mm512_permutex2var_ps(q0, odd, q1);
                t[i] = _mm512_fmadd_ps(acc[i], s, _mm512_fmadd_ps(_mm512_fnmadd_ps(s, c128, m), xg, t[i]));
            }
        }
        alignas(64) float o[64];
        for (int i = 0; i < 4; ++i) _mm512_store_ps(o + 16 * i, t[i]);
        for (int i = 0; i < 64; ++i) out[nb * 64 + i] = static_cast<at::BFloat16>(o[i]);
    }
}
extern "C" void kernel(const at::BFloat16* x, const uint8_t* w, const at::Half* qp, at::BFloat16* out)
{
    run(x, w, qp, out);
}
"""
INT4_BLOCK_ROWS = 64            # rows per block of the AVX512 tinygemm layout that the int4 kernel reads


@dataclass(frozen=True)
class QGemvKernel:
    """A built kernel for one (N, K, dtype, threads), or why there is none (``fn`` None)."""

    fn: Callable[..., None] | None
    compile_s: float
    error: str | None = None


BF16_DOT_CPU_FLAG = "avx512_bf16"                    # /proc/cpuinfo name of AVX512-BF16 (VDPBF16PS)
_INT4_CPU_FLAGS = (BF16_DOT_CPU_FLAG, "avx512vbmi")  # what the int4 kernel uses


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere, so the int4 kernel is not built)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def bf16_dot_cpu() -> bool:
    """Whether this CPU has AVX-512 with BF16 dot products (``_mm512_dpbf16_ps``: Zen 4, Sapphire Rapids+)."""
    return vector_width() == 16 and BF16_DOT_CPU_FLAG in _cpu_flags()


@functools.lru_cache(maxsize=1)
def int4_kernel_cpu() -> bool:
    """Whether this CPU has what the int4 kernel uses (AVX-512 with BF16 dot products and byte permutes)."""
    return vector_width() == 16 and all(flag in _cpu_flags() for flag in _INT4_CPU_FLAGS)


@functools.lru_cache(maxsize=1)
def vector_width() -> int:
    """fp32 lanes of inductor's vector ISA here (16 with AVX-512, 8 with AVX2), 0 without one."""
    with inductor_imports():        # without Triton where it cannot launch: the probe itself imports more of
        from torch._inductor.cpu_vec_isa import pick_vec_isa    # inductor (its code cache, whose autotune cache

        isa = pick_vec_isa()                                     # imports triton), not only the import above
    return isa.nelements(torch.float32) if isa else 0


@functools.lru_cache(maxsize=256)
def _build_int8_channel(n: int, k: int, dtype: torch.dtype, threads: int) -> QGemvKernel:
    t0 = time.perf_counter()
    try:
        ctype = _CTYPES[dtype]
        source = _INT8_CHANNEL % {"T": ctype, "N": n, "K": k, "THREADS": threads}
        fn = cpp_loader().load_pybinding([f"const {ctype}*", "const int8_t*", "const at::Half*",
                                                        f"{ctype}*"], source, needs_vec_isa=True)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the aten op instead
        return _failed("int8", exc, t0)
    return QGemvKernel(fn, time.perf_counter() - t0)


@functools.lru_cache(maxsize=256)
def _build_int4_tinygemm(n: int, k: int, group: int, threads: int) -> QGemvKernel:
    t0 = time.perf_counter()
    try:
        source = _INT4_TINYGEMM % {"N": n, "K": k, "GS": group, "THREADS": threads}
        fn = cpp_loader().load_pybinding(["const at::BFloat16*", "const uint8_t*", "const at::Half*",
                                                        "at::BFloat16*"], source, needs_vec_isa=True)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the aten op instead
        return _failed("int4", exc, t0)
    return QGemvKernel(fn, time.perf_counter() - t0)


def int4_tinygemm_kernel(data: torch.Tensor, qparams: torch.Tensor, group: int, dtype: torch.dtype,
                         layout: str) -> QGemvKernel | None:
    """The kernel for a cpu_int4 int4 weight (data (N, K/2) in the tinygemm ``layout``, qparams (G, N, 2)) and
    an x of ``dtype``, or None where it does not apply (a layout other than "AVX512", N not a multiple of
    ``INT4_BLOCK_ROWS``, x not bf16 (its pairs feed the bf16 dot products as they are), non-contiguous
    tensors, a CPU without ``int4_kernel_cpu``): the caller then uses PyTorch's op."""
    n = qparams.shape[1]
    if not int4_kernel_cpu() or layout != "AVX512" or n % INT4_BLOCK_ROWS or dtype != torch.bfloat16 or \
            data.device.type != "cpu" or data.dim() != 2 or not (data.is_contiguous() and qparams.is_contiguous()):
        return None
    return _build_int4_tinygemm(n, data.shape[1] * 2, group, torch.get_num_threads())


def run_kernel(kernel: QGemvKernel, data: torch.Tensor, qparams: torch.Tensor, x: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """A built kernel of this module on its weight (data, qparams as its builder took them) @ x (K,) -> (N,) in
    x's dtype, written into ``out`` ((N,) contiguous in x's dtype) when given."""
    assert kernel.fn is not None
    out = torch.empty(qparams.shape[1], dtype=x.dtype) if out is None else out
    assert out.shape == (qparams.shape[1],) and out.dtype == x.dtype and out.is_contiguous(), (out.shape, out.dtype)
    kernel.fn(x.contiguous(), data, qparams, out)
    return out


def _failed(what: str, exc: Exception, t0: float) -> QGemvKernel:
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    warnings.warn(f"tierkv: the C++ {what} matrix-vector kernel could not be built ({reason}); decode uses "
                  "PyTorch's op instead. Install a C++ compiler (g++) for inductor, or set "
                  "TIERKV_CPU_MATVEC=on to use the aten ops without trying.", RuntimeWarning, stacklevel=4)
    return QGemvKernel(None, time.perf_counter() - t0, reason)


def int8_channel_kernel(data: torch.Tensor, qparams: torch.Tensor, dtype: torch.dtype) -> QGemvKernel | None:
    """The kernel for a cpu_int8 weight (data (N, K), qparams (1, N, 2)) and an x of ``dtype`` at the current
    thread count (built on first use), or None where it does not apply (another dtype, a non-contiguous
    weight, no vector ISA for inductor or K not a multiple of its width): the caller then uses PyTorch's op."""
    if dtype not in _CTYPES or not (data.is_contiguous() and qparams.is_contiguous()) or data.device.type != "cpu":
        return None
    n, k = data.shape
    lanes = vector_width()
    if not lanes or k % lanes:             # the loop steps over K a vector at a time
        return None
    return _build_int8_channel(n, k, dtype, torch.get_num_threads())
