"""A hand-written C++ product of a few rows (one per live sequence) with a 16-bit weight on the CPU.

Why this module exists: a decode step of a batch multiplies every weight by M rows, one per live
sequence (2 <= M <= 32 here), and should take about the time of reading the weight once, as one row
does (``cpu_gemv``'s compiled loop: ~19 GB/s per core here). PyTorch's ops for a few rows do not:
``torch.mm(w, x^T)`` took ~4x the weight-read time at M = 2-8 and ``F.linear`` (oneDNN) about 3x at
M = 16 on this project's CPU (docs/benchmarks.md). This kernel reads each weight row once, as stored
(any row stride: a fused strided view, a streamed ring slot), and dots it with all M rows of x, which
stay in the cache:

Variants (``default_variant`` picks by the CPU's features; ``VARIANTS`` lists them):

- "amx", bf16 on CPUs with AMX tiles (Intel Sapphire Rapids+): the weight loaded into tiles of 16 rows x
  32 columns straight from where it is stored, x packed once per call into bf16 pairs, one tile product
  (16 weight rows x M x rows, fp32 sums) per 16 x 32 weight block; M up to 32 stays at the memory's
  rate (the tile unit has ~10x the work it needs), where the vector dot products below are
  compute-bound from M = 2-4 on;
- "bf16_dot", bf16 on CPUs with AVX512-BF16 (AMD Zen 4): x's bf16 pairs as stored, 32 weights a step
  into one bf16 dot product (``vdpbf16ps``: exact products, fp32 sums) per x row;
- "fma", every other case (fp16, fp32, bf16 on neither): x widened to fp32 once per call into a buffer,
  the weight widened a vector at a time, one fp32 fused multiply-add per x row.

In the vector variants up to 16 x rows share each weight vector in registers; larger M runs in equal
chunks of up to 16 over the same weight row (the row is in the L1 cache by then). One OpenMP region per
call, parallel over output rows with the thread count the kernel was built for. M, N, K and the
weight's row stride are arguments, so one kernel per (dtype, variant, thread count) serves every batch
size and weight.

Built like the other hand-written kernels (``cpu_cpp.compile_kernel``): inductor's
``CppPythonBindingsCodeCache`` (its compiler, flags, vector headers and on-disk cache). A build that
fails leaves ``MGemvKernel.fn`` None with the reason (one warning naming ``TIERKV_CPU_MGEMV=off``) and
the caller uses PyTorch's op.

Numerics: fp32 sums of exact products of the 16-bit values (fp32: fused multiply-adds), one rounding
to x's dtype at the end. The bf16 dot products (vector and tile) treat denormal inputs as zero and
flush denormal sums (the instructions' fixed behaviour), far below bf16 decode's precision.

Shapes: weight (N, K) with unit column stride, any row stride; x (M, K) contiguous in the weight's
dtype -> (M, N) contiguous in x's dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from tierkv.kernels.cpu_cpp import CTYPES, compile_kernel
from tierkv.kernels.cpu_qgemv import _cpu_flags, bf16_dot_cpu

__all__ = ["CPU_MGEMV_VAR", "MGEMV_MAX_M", "VARIANTS", "MGemvKernel", "amx_cpu", "bf16_dot_cpu", "cpu_class", "default_variant", "kernel_cpu_flags",
           "mgemv", "mgemv_kernel", "run_mgemv"]

MGEMV_MAX_M = 32              # rows of x the kernel takes (measured against F.linear: docs/benchmarks.md)
CPU_MGEMV_VAR = "TIERKV_CPU_MGEMV"   # "off" keeps decode batches on the aten ops (``dense_linear``)

# Both kernels first copy x into xp, blocks of L columns (one vector) with the M rows' pieces next to
# each other: xp (ceil(K / L), M, L), zero-padded. A step over K then reads M consecutive vectors of x,
# one sequential stream, where x's own rows (K apart: 4 KiB at K = 2048) fell into the same L1 sets.

# The vector kernels' loop over output rows, after x is packed into xp: equal chunks of up to 16 x rows per
# weight row (ROWS[mb], the kernel's own row function).
_ROW_CHUNKS = r"""
    const int64_t chunks = (M + 15) / 16, size = (M + chunks - 1) / chunks;
    #pragma omp parallel for num_threads(%(THREADS)d) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t m0 = 0; m0 < M; m0 += size) {
            const int64_t mb = M - m0 < size ? M - m0 : size;
            ROWS[mb](xp.get() + m0 * L, M * L, K, w + n * ldw, out + m0 * N + n, N);
        }
}
"""

# The portable kernel (inductor's at::vec): x widened to fp32 into xp, each weight vector widened once
# and fused-multiply-added into MB accumulators (one per x row of the chunk).
_FMA = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <memory>
#include <type_traits>
using T = %(T)s;
using V = at::vec::Vectorized<float>;
constexpr int64_t L = V::size();

static inline V wload(const T* p, int64_t count) {
    if constexpr (std::is_same_v<T, float>) return V::loadu(p, count);
    else return at::vec::convert<float>(at::vec::Vectorized<T>::loadu(p, count));
}

template <int MB>
static void rows(const float* xp, int64_t step, int64_t K, const T* wrow, T* out, int64_t N)
{
    V acc[MB];
    #pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) acc[i] = V(0);
    const int64_t K1 = K - K %% L;
    for (int64_t k = 0; k < K1; k += L, xp += step) {
        const V wv = wload(wrow + k, L);
        #pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) acc[i] = at::vec::fmadd(wv, V::loadu(xp + i * L), acc[i]);
    }
    if (K1 < K) {                          // the tail: a zero-filled partial load (xp is zero-padded)
        const V wv = wload(wrow + K1, K - K1);
        for (int i = 0; i < MB; ++i) acc[i] = at::vec::fmadd(wv, V::loadu(xp + i * L), acc[i]);
    }
    for (int i = 0; i < MB; ++i)
        out[i * N] = static_cast<T>(at::vec::vec_reduce_all<float>([](V& a, V& b) { return a + b; }, acc[i]));
}

using RowsFn = void (*)(const float*, int64_t, int64_t, const T*, T*, int64_t);
static const RowsFn ROWS[17] = {nullptr, rows<1>, rows<2>, rows<3>, rows<4>, rows<5>, rows<6>, rows<7>, rows<8>,
                                rows<9>, rows<10>, rows<11>, rows<12>, rows<13>, rows<14>, rows<15>, rows<16>};

extern "C" void kernel(const T* x, const T* w, T* out, int64_t M, int64_t N, int64_t K, int64_t ldw)
{
    const int64_t KB = (K + L - 1) / L;
    std::unique_ptr<float[]> xp(new float[KB * M * L]());                 // (KB, M, L), zero-padded
    for (int64_t m = 0; m < M; ++m)
        for (int64_t kb = 0; kb < KB; ++kb) {
            const int64_t c = K - kb * L < L ? K - kb * L : L;
            wload(x + m * K + kb * L, c).store(xp.get() + (kb * M + m) * L, c);
        }
""" + _ROW_CHUNKS

# bf16 with AVX512-BF16: x's bf16 values as stored (copied into xp, L = 32), 32 weights per step, one
# vdpbf16ps per x row.
_BF16_DOT = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <immintrin.h>
#include <cstring>
#include <memory>
#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
constexpr int64_t L = 32;

template <int MB>
TARGET static void rows(const uint16_t* xp, int64_t step, int64_t K, const uint16_t* wrow, at::BFloat16* out,
                        int64_t N)
{
    __m512 acc[MB];
    #pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
    const int64_t K1 = K - K %% L;
    for (int64_t k = 0; k < K1; k += L, xp += step) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(wrow + k);
        #pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], wv, (__m512bh)_mm512_loadu_si512(xp + i * L));
    }
    if (K1 < K) {                          // the tail: a zero-filled masked load (xp is zero-padded)
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << (K - K1)) - 1), wrow + K1);
        for (int i = 0; i < MB; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], wv, (__m512bh)_mm512_loadu_si512(xp + i * L));
    }
    for (int i = 0; i < MB; ++i) out[i * N] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(acc[i]));
}

using RowsFn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, at::BFloat16*, int64_t);
static const RowsFn ROWS[17] = {nullptr, rows<1>, rows<2>, rows<3>, rows<4>, rows<5>, rows<6>, rows<7>, rows<8>,
                                rows<9>, rows<10>, rows<11>, rows<12>, rows<13>, rows<14>, rows<15>, rows<16>};

extern "C" void kernel(const at::BFloat16* xb, const at::BFloat16* wb, at::BFloat16* out, int64_t M, int64_t N,
                       int64_t K, int64_t ldw)
{
    const uint16_t* x = reinterpret_cast<const uint16_t*>(xb);
    const uint16_t* w = reinterpret_cast<const uint16_t*>(wb);
    const int64_t KB = (K + L - 1) / L;
    std::unique_ptr<uint16_t[]> xp(new uint16_t[KB * M * L]());            // (KB, M, L), zero-padded
    for (int64_t m = 0; m < M; ++m)
        for (int64_t kb = 0; kb < KB; ++kb) {
            const int64_t c = K - kb * L < L ? K - kb * L : L;
            std::memcpy(xp.get() + (kb * M + m) * L, x + m * K + kb * L, c * sizeof(uint16_t));
        }
""" + _ROW_CHUNKS

# bf16 with AMX (Intel Sapphire Rapids+): the weight read as stored into tiles of 16 rows x 32 columns
# (A, one tile load per 16 rows: no repacking), x packed once per call into bf16 pairs (B: 16 pairs of
# columns x M rows, xp (KB, 16, M, 2), zero-padded), one tile product (16 x M fp32 sums) per 16 weight
# rows and 32 columns. Blocks of 32 weight rows (two A tiles) share each B tile; M > 16 takes a second B
# tile. The last partial block of rows, and each block's last partial 32 columns, are copied into
# zero-padded buffers first (a few KiB), so every tile is full.
_AMX = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <immintrin.h>
#include <cstring>
#include <memory>
#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))
constexpr int64_t L = 32, NB = 32;                     // columns per tile step, weight rows per block

struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// tiles 0-1: C of x rows [0, m0) for weight rows [0, 16) and [16, 32); 2-3: x rows [m0, M); 4-5: A; 6-7: B
TARGET static void configure(int m0, int m1) {
    TileConfig c;
    std::memset(&c, 0, sizeof(c));
    c.palette = 1;
    const int mb[2] = {m0, m1};
    for (int t = 0; t < 2; ++t) {
        if (!mb[t]) continue;
        c.rows[2 * t] = c.rows[2 * t + 1] = 16;
        c.colsb[2 * t] = c.colsb[2 * t + 1] = mb[t] * 4;
        c.rows[6 + t] = 16;
        c.colsb[6 + t] = mb[t] * 4;
    }
    c.rows[4] = c.rows[5] = 16;
    c.colsb[4] = c.colsb[5] = 64;
    _tile_loadconfig(&c);
}

TARGET static void release() { _tile_release(); }

// 32 weight rows (row stride ldw) x all M rows: out[m * N + r] for r < rows. tail: the rows' last partial
// 32 columns, zero-padded (NB x L), or null when K is a multiple of L.
template <bool TWO>
TARGET static void block(const uint16_t* w, int64_t ldw, const uint16_t* xp, int64_t M, int64_t m0, int64_t K,
                         const uint16_t* tail, at::BFloat16* out, int64_t N, int64_t rows)
{
    _tile_zero(0); _tile_zero(1);
    if constexpr (TWO) { _tile_zero(2); _tile_zero(3); }
    const int64_t KB = (K + L - 1) / L, K1 = K / L, xstep = 16 * M * 2;
    for (int64_t kb = 0; kb < KB; ++kb) {
        const uint16_t* a = kb < K1 ? w + kb * L : tail;
        const int64_t lda = (kb < K1 ? ldw : L) * 2;
        _tile_loadd(4, a, lda);
        _tile_loadd(5, a + 16 * (lda / 2), lda);
        _tile_loadd(6, xp + kb * xstep, M * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if constexpr (TWO) {
            _tile_loadd(7, xp + kb * xstep + m0 * 2, M * 4);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    float c[4][16][16];                                 // [tile][weight row][x row]
    _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64);
    if constexpr (TWO) { _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64); }
    for (int64_t m = 0; m < M; ++m) {
        const int t = m < m0 ? 0 : 2, j = m < m0 ? m : m - m0;
        for (int64_t r = 0; r < rows; ++r)
            out[m * N + r] = static_cast<at::BFloat16>(c[t + r / 16][r %% 16][j]);
    }
}

extern "C" void kernel(const at::BFloat16* xb, const at::BFloat16* wb, at::BFloat16* out, int64_t M, int64_t N,
                       int64_t K, int64_t ldw)
{
    const uint16_t* x = reinterpret_cast<const uint16_t*>(xb);
    const uint16_t* w = reinterpret_cast<const uint16_t*>(wb);
    const int64_t KB = (K + L - 1) / L, K1 = K / L * L, m0 = M < 16 ? M : 16, blocks = (N + NB - 1) / NB;
    std::unique_ptr<uint16_t[]> xp(new uint16_t[KB * 16 * M * 2]);         // (KB, 16, M, 2), zero-padded
    #pragma omp parallel num_threads(%(THREADS)d)
    {
        #pragma omp for schedule(static)
        for (int64_t kb = 0; kb < KB; ++kb)
            for (int64_t r = 0; r < 16; ++r)
                for (int64_t m = 0; m < M; ++m)
                    for (int64_t j = 0; j < 2; ++j) {
                        const int64_t k = kb * L + 2 * r + j;
                        xp[((kb * 16 + r) * M + m) * 2 + j] = k < K ? x[m * K + k] : 0;
                    }
        configure(m0, M - m0);
        alignas(64) uint16_t tail[NB * L];
        std::unique_ptr<uint16_t[]> last;               // the last partial block of rows, (NB, KB * L) zero-padded
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t n0 = b * NB, rows = N - n0 < NB ? N - n0 : NB;
            const uint16_t* wr = w + n0 * ldw;
            int64_t ld = ldw;
            if (rows < NB) {
                last.reset(new uint16_t[NB * KB * L]());
                for (int64_t r = 0; r < rows; ++r) std::memcpy(last.get() + r * KB * L, wr + r * ldw, K * 2);
                wr = last.get();
                ld = KB * L;
            }
            const bool partial = K1 < K && rows == NB;
            if (partial) {
                std::memset(tail, 0, sizeof(tail));
                for (int64_t r = 0; r < NB; ++r) std::memcpy(tail + r * L, wr + r * ld + K1, (K - K1) * 2);
            }
            const int64_t kk = rows < NB ? KB * L : K;  // the padded copy has no partial columns
            if (M > 16) block<true>(wr, ld, xp.get(), M, m0, kk, partial ? tail : nullptr, out + n0, N, rows);
            else block<false>(wr, ld, xp.get(), M, m0, kk, partial ? tail : nullptr, out + n0, N, rows);
        }
        release();
    }
}
"""


_BF16_DOT_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"})
_AMX_FLAGS = frozenset({"amx_tile", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def amx_cpu() -> bool:
    """Whether the AMX bf16 kernel runs here: the CPU has AMX tiles and bf16 tile products (and AVX512-BF16)
    and Linux lets this process use the tile registers (PyTorch's ``_init_amx``: the arch_prctl request)."""
    if not (_AMX_FLAGS | _BF16_DOT_FLAGS) <= _cpu_flags():
        return False
    init = getattr(torch._C._cpu, "_init_amx", None)
    return bool(init is not None and init())


def kernel_cpu_flags() -> frozenset[str]:
    """The /proc/cpuinfo flags this module's kernels look for that this CPU has (for benchmark records)."""
    return (_AMX_FLAGS | _BF16_DOT_FLAGS) & _cpu_flags()


def cpu_class() -> str:
    """Which of the measured CPU kinds this is, by features: "amx" (AMX bf16 tiles: Intel Sapphire Rapids+),
    "avx512_bf16" (AVX512-BF16 dot products, no AMX: AMD Zen 4+), else "other"."""
    return "amx" if amx_cpu() else ("avx512_bf16" if bf16_dot_cpu() else "other")


def default_variant(dtype: torch.dtype) -> str:
    """The variant a ``dtype`` weight takes here: for bf16 "amx" on an "amx" ``cpu_class``, "bf16_dot" on an
    "avx512_bf16" one; "fma" otherwise."""
    if dtype != torch.bfloat16:
        return "fma"
    return {"amx": "amx", "avx512_bf16": "bf16_dot"}.get(cpu_class(), "fma")


_SOURCES = {"amx": _AMX, "bf16_dot": _BF16_DOT, "fma": _FMA}
VARIANTS = tuple(_SOURCES)


@dataclass(frozen=True)
class MGemvKernel:
    """A built kernel for one (dtype, variant, threads), or why there is none (``fn`` None)."""

    fn: Callable[..., None] | None
    compile_s: float
    variant: str = ""
    error: str | None = None


@functools.lru_cache(maxsize=32)
def _build(dtype: torch.dtype, variant: str, threads: int) -> MGemvKernel:
    ctype = CTYPES[dtype]
    source = _SOURCES[variant] % {"T": ctype, "THREADS": threads}
    argtypes = [f"const {ctype}*", f"const {ctype}*", f"{ctype}*", "int64_t", "int64_t", "int64_t", "int64_t"]
    fn, seconds, error = compile_kernel(argtypes, source, "few-row matrix", CPU_MGEMV_VAR)
    return MGemvKernel(fn, seconds, variant, error)


def mgemv_kernel(weight: torch.Tensor, variant: str | None = None) -> MGemvKernel | None:
    """The kernel for products with ``weight`` (N, K) at the current thread count (built on first use), or
    None where it does not apply (off the CPU, a dtype other than bf16/fp16/fp32, a column stride other
    than 1): the caller then uses PyTorch's op. ``variant``: "bf16_dot" or "fma" (a test's or a benchmark's
    choice; default: "bf16_dot" for bf16 on CPUs with AVX512-BF16, else "fma")."""
    if weight.device.type != "cpu" or weight.dim() != 2 or weight.dtype not in CTYPES or \
            (weight.stride(1) != 1 and weight.shape[1] > 1):
        return None
    variant = variant or default_variant(weight.dtype)
    if variant != "fma" and (weight.dtype != torch.bfloat16 or not (amx_cpu() if variant == "amx" else bf16_dot_cpu())):
        return None
    return _build(weight.dtype, variant, torch.get_num_threads())


def run_mgemv(kernel: MGemvKernel, weight: torch.Tensor, x: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T -> (M, N) in x's dtype through ``kernel``, a built ``mgemv_kernel(weight)``;
    1 <= M <= ``MGEMV_MAX_M``, x in the weight's dtype; written into ``out`` ((M, N) contiguous) when given."""
    assert kernel.fn is not None
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and x.dtype == weight.dtype and 1 <= m <= MGEMV_MAX_M, (x.shape, weight.shape)
    out = torch.empty(m, n, dtype=x.dtype) if out is None else out
    assert out.shape == (m, n) and out.dtype == x.dtype and out.is_contiguous(), (out.shape, out.dtype)
    if n and k:
        kernel.fn(x.contiguous(), weight, out, m, n, k, weight.stride(0))
    elif n:
        out.zero_()
    return out


def mgemv(weight: torch.Tensor, x: torch.Tensor, variant: str | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T -> (M, N) through the kernel, else ``torch.mm(weight, x^T)^T``."""
    kernel = mgemv_kernel(weight, variant)
    if kernel is None or kernel.fn is None:
        return torch.mm(weight, x.t()).t().contiguous()
    return run_mgemv(kernel, weight, x)
