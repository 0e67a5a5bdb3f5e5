"""The two-stage estimator's whole CPU selection as one hand-written C++ kernel.

Why this module exists: on the CPU the torch path of ``estimate.select_two_stage`` (ellipsoid rank,
``topk`` of the candidates, their 2-bit sketch bound, the selection over the live chunks) is ~116
small aten ops per layer and decode step, and inside a model's step each costs ~6-7 us: 20-28% of
the step at 8K, where the goal is 10% (docs/benchmarks.md, "Sparse KV estimator (issue 12)"). Its
arithmetic is small (at 127K: ~7M multiply-adds), and a torch.compile'd version ran 3-6x slower
than the torch ops (its loops were not vectorized over the reduction). Here the same selection is
one call, one thread (no OpenMP region: small parallel regions stall on a shared 2-core machine):

1. per (sequence, KV head): every coded chunk's ellipsoid bound q.c + sqrt(q^2 . a^2) per query head,
   standardized over the chunks (mean and deviation in double), max over the group;
2. the ``candidates`` best: the same ``std::partial_sort`` / ``std::nth_element`` call with the same
   comparator as ATen's CPU ``topk`` (``ATen/native/TopKImpl.h``), so ties pick the same chunks;
3. their sketch bound from the packed codes: each key's code bytes widened to int32 lanes, each bit
   pair taken by a shift and an ``and`` in vector registers, converted and multiplied with q * w
   (never an fp32 code tensor); the open (uncoded) chunks get the min/max bound;
4. the selection: forced sinks and recent window, then the live chunks by descending score (ties:
   lower id first, a stable sort), then the pruned ones by id, taken while their tokens fit.

Same ``Selection`` as the torch path up to fp32 rounding of the scores (sums in another order):
mask, ids and counts are equal wherever no two scores are within a rounding of each other, and ties
of equal inputs break as there (tests/test_kernels_estimate_cpu.py). The bound stays an upper bound:
every score is the bound's formula in fp32, as on the torch path.

Built once per process by inductor's loader (``CppPythonBindingsCodeCache``: the compiler, flags,
vector headers and on-disk cache of ``cpu_gemv`` and ``cpu_qgemv``), every (q dtype, cache dtype)
pair of fp32/bf16/fp16 in one library. A build that fails warns once and the torch path runs.
``TIERKV_CPU_ESTIMATOR`` (read per call): "auto" (default: this kernel for CPU tensors), "torch"
(the torch ops, never built).
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from tierkv.kernels._select import cpp_loader, env_choice
from tierkv.kernels.reference import Selection
from tierkv.kernels.sketch import KeySketch

__all__ = ["CPU_ESTIMATOR_CHOICES", "CPU_ESTIMATOR_VAR", "EstimatorKernel", "estimator_kernel", "kernel_applies",
           "pick_cpu_estimator", "select_two_stage_cpu"]

CPU_ESTIMATOR_VAR = "TIERKV_CPU_ESTIMATOR"
CPU_ESTIMATOR_CHOICES = ("auto", "torch")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)       # index = the kernel's dtype code

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace {
using V = at::vec::Vectorized<float>;
using VI = at::vec::Vectorized<int32_t>;
constexpr int64_t L = V::size();

struct Args {
    const void *q, *kmin, *kmax, *centre, *axes2;
    const uint8_t* codes;
    const int32_t* sizes;
    bool* mask;
    int32_t *ids, *counts;
    float* scores;
    int64_t B, H, G, D, P, S, C, N, K, budget, sink, recent;
    int64_t q_sb, q_sh, a_sb, a_sh, a_sc, e_sb, e_sh, e_sc, c_sb, c_sh, c_sc, z_sb;
};

inline int64_t padded(int64_t n) { return (n + L - 1) / L * L; }

// n values of a row (contiguous) as fp32 into dst, zeros up to padded(n).
template <typename T>
inline void widen(const T* src, int64_t n, float* dst) {
    int64_t k = 0;
    for (; k + L <= n; k += L) at::vec::convert<float>(at::vec::Vectorized<T>::loadu(src + k, L)).store(dst + k);
    for (; k < n; ++k) dst[k] = static_cast<float>(src[k]);
    for (int64_t e = padded(n); k < e; ++k) dst[k] = 0.f;
}

// sum a[i] * b[i] over n, a multiple of L, fp32 lanes
inline float dot(const float* a, const float* b, int64_t n) {
    V acc(0.f);
    for (int64_t i = 0; i < n; i += L) acc = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), acc);
    return at::vec::vec_reduce_all<float>([](V& x, V& y) { return x + y; }, acc);
}

// What ATen's CPU topk (TopKImpl.h, largest=true, sorted=false) leaves first: the same algorithm and comparator.
void topk_ids(const float* rank, int64_t n, int64_t k, std::vector<std::pair<double, int64_t>>& queue,
              std::vector<int64_t>& out) {
    using elem_t = std::pair<double, int64_t>;
    queue.resize(n);
    for (int64_t j = 0; j < n; ++j) queue[j] = elem_t(rank[j], j);
    auto greater = [](const elem_t& x, const elem_t& y) -> bool {
        return (std::isnan(x.first) && !std::isnan(y.first)) || (x.first > y.first);
    };
    if (k * 64 <= n) std::partial_sort(queue.begin(), queue.begin() + k, queue.end(), greater);
    else std::nth_element(queue.begin(), queue.begin() + k - 1, queue.end(), greater);
    out.resize(k);
    for (int64_t j = 0; j < k; ++j) out[j] = queue[j].second;
    std::sort(out.begin(), out.end());
}

struct Scratch {            // per call: fp32 rows, padded to the vector width
    std::vector<float> qf, q2, qr, qw, row0, row1, e, rank, score;
    std::vector<std::pair<double, int64_t>> queue;
    std::vector<int64_t> cand, order;
    std::vector<char> forced, live, taken;
};

// Stage 1: standardized ellipsoid rank of chunks 0..N-1 for KV head (b, h) into s.rank.
template <typename TK>
void ellipsoid_rank(const Args& a, int64_t b, int64_t h, Scratch& s) {
    const int64_t G = a.G, N = a.N, Dp = padded(a.D);
    const TK* cen = static_cast<const TK*>(a.centre) + b * a.e_sb + h * a.e_sh;
    const TK* ax = static_cast<const TK*>(a.axes2) + b * a.e_sb + h * a.e_sh;
    s.e.resize(G * N);
    for (int64_t n = 0; n < N; ++n) {
        widen(cen + n * a.e_sc, a.D, s.row0.data());
        widen(ax + n * a.e_sc, a.D, s.row1.data());
        for (int64_t g = 0; g < G; ++g) {
            const float spread = std::sqrt(std::max(dot(s.q2.data() + g * Dp, s.row1.data(), Dp), 0.f));
            s.e[g * N + n] = dot(s.qf.data() + g * Dp, s.row0.data(), Dp) + spread;
        }
    }
    s.rank.assign(N, 0.f);
    for (int64_t g = 0; g < G; ++g) {
        const float* e = s.e.data() + g * N;
        double sum = 0.0;
        for (int64_t n = 0; n < N; ++n) sum += e[n];
        const double mean = sum / N;
        double var = 0.0;
        for (int64_t n = 0; n < N; ++n) var += (e[n] - mean) * (e[n] - mean);
        const float mf = static_cast<float>(mean);
        const float sd = std::max(static_cast<float>(std::sqrt(var / N)), 1.17549435e-38f);   // finfo(float32).tiny
        for (int64_t n = 0; n < N; ++n) {
            const float z = (e[n] - mf) / sd;
            s.rank[n] = g == 0 ? z : std::max(s.rank[n], z);
        }
    }
}

// Stage 2: the sketch bound of coded chunk c (its first `keys` keys): max over keys and query heads of
// q.kmin + relu(q).w + (q*w).code, codes unpacked in registers.
template <typename TK>
float sketch_bound(const Args& a, int64_t b, int64_t h, int64_t c, int64_t keys, Scratch& s) {
    const int64_t G = a.G, D = a.D, P = a.P, Dp = padded(D), Pp = padded(P);
    const TK* lo_p = static_cast<const TK*>(a.kmin) + b * a.a_sb + h * a.a_sh + c * a.a_sc;
    const TK* hi_p = static_cast<const TK*>(a.kmax) + b * a.a_sb + h * a.a_sh + c * a.a_sc;
    float* lo = s.row0.data();
    float* w = s.row1.data();
    widen(lo_p, D, lo);
    widen(hi_p, D, w);
    for (int64_t d = 0; d < Dp; ++d) w[d] = (w[d] - lo[d]) * 0.25f;
    float best = -INFINITY;
    for (int64_t g = 0; g < G; ++g) {
        const float* qg = s.qf.data() + g * Dp;
        const float base = dot(lo, qg, Dp) + dot(w, s.qr.data() + g * Dp, Dp);
        float* qw = s.qw.data();                                  // (4, Pp): channel i*P + j at i*Pp + j
        for (int64_t i = 0; i < 4; ++i)
            for (int64_t j = 0; j < Pp; ++j) {
                const int64_t d = i * P + j;
                qw[i * Pp + j] = (j < P && d < D) ? qg[d] * w[d] : 0.f;
            }
        const uint8_t* row = a.codes + b * a.c_sb + h * a.c_sh + c * a.c_sc;
        float tok_best = -INFINITY;
        for (int64_t t = 0; t < keys; ++t, row += P) {
            V acc(0.f);
            for (int64_t j = 0; j < Pp; j += L) {
                const int64_t n = std::min(L, P - j);
                const VI x = at::vec::convert<int32_t>(at::vec::Vectorized<uint8_t>::loadu(row + j, n));
                for (int64_t i = 0; i < 4; ++i) {
                    const VI code = (x >> VI(static_cast<int32_t>(2 * i))) & VI(3);
                    acc = at::vec::fmadd(at::vec::convert<float>(code), V::loadu(qw + i * Pp + j), acc);
                }
            }
            tok_best = std::max(tok_best, at::vec::vec_reduce_all<float>([](V& x, V& y) { return x + y; }, acc));
        }
        best = std::max(best, tok_best + base);
    }
    return best;
}

// The min/max bound of chunk c (uncoded: the open chunk), max over the query heads.
template <typename TK>
float min_max_bound(const Args& a, int64_t b, int64_t h, int64_t c, Scratch& s) {
    const int64_t Dp = padded(a.D);
    float* lo = s.row0.data();
    float* wd = s.row1.data();
    widen(static_cast<const TK*>(a.kmin) + b * a.a_sb + h * a.a_sh + c * a.a_sc, a.D, lo);
    widen(static_cast<const TK*>(a.kmax) + b * a.a_sb + h * a.a_sh + c * a.a_sc, a.D, wd);
    for (int64_t d = 0; d < Dp; ++d) wd[d] -= lo[d];
    float best = -INFINITY;
    for (int64_t g = 0; g < a.G; ++g)
        best = std::max(best, dot(s.qf.data() + g * Dp, lo, Dp) + dot(s.qr.data() + g * Dp, wd, Dp));
    return best;
}

// Stage 3: forced chunks, then live by score, then the rest by id, while their tokens fit.
void choose(const Args& a, const int32_t* sz, int64_t remaining, int64_t b, int64_t h, Scratch& s) {
    const int64_t C = a.C;
    s.order.clear();
    for (int64_t c = 0; c < C; ++c)
        if (s.live[c] && !s.forced[c] && s.score[c] > -INFINITY) s.order.push_back(c);
    std::stable_sort(s.order.begin(), s.order.end(), [&](int64_t x, int64_t y) { return s.score[x] > s.score[y]; });
    for (int64_t c = 0; c < C; ++c)
        if (!s.forced[c] && !(s.live[c] && s.score[c] > -INFINITY)) s.order.push_back(c);
    s.taken.assign(C, 0);
    int64_t run = 0;
    for (size_t i = 0; i < s.order.size(); ++i) {
        run += sz[s.order[i]];
        if (run > remaining) break;
        s.taken[s.order[i]] = 1;
    }
    float* out = a.scores + (b * a.H + h) * C;
    for (int64_t c = 0; c < C; ++c) out[c] = s.live[c] ? s.score[c] : -INFINITY;
    bool* mask = a.mask + (b * a.H + h) * C;
    int32_t* ids = a.ids + (b * a.H + h) * C;
    int32_t count = 0;
    for (int64_t c = 0; c < C; ++c) {
        mask[c] = s.forced[c] || s.taken[c];
        if (mask[c]) ids[count++] = static_cast<int32_t>(c);
    }
    for (int64_t c = count; c < C; ++c) ids[c] = -1;
    a.counts[b * a.H + h] = count;
}

template <typename TQ, typename TK>
void run(const Args& a) {
    const int64_t G = a.G, D = a.D, C = a.C, Dp = padded(D), Pp = padded(a.P);
    Scratch s;
    s.qf.resize(G * Dp); s.q2.resize(G * Dp); s.qr.resize(G * Dp); s.qw.resize(4 * Pp);
    s.row0.resize(std::max(Dp, 4 * Pp)); s.row1.resize(std::max(Dp, 4 * Pp)); s.score.resize(C);
    for (int64_t b = 0; b < a.B; ++b) {
        const int32_t* sz = a.sizes + b * a.z_sb;
        int64_t total = 0;
        for (int64_t c = 0; c < C; ++c) total += sz[c];
        s.forced.assign(C, 0);
        int64_t forced_tokens = 0, seen = 0;
        for (int64_t c = 0; c < C; ++c) {
            seen += sz[c];
            s.forced[c] = c < a.sink || total - seen < a.recent;
            if (s.forced[c]) forced_tokens += sz[c];
        }
        const int64_t remaining = a.budget - forced_tokens;
        for (int64_t h = 0; h < a.H; ++h) {
            const TQ* q = static_cast<const TQ*>(a.q) + b * a.q_sb + h * G * a.q_sh;
            for (int64_t g = 0; g < G; ++g) {
                float* qf = s.qf.data() + g * Dp;
                widen(q + g * a.q_sh, D, qf);
                for (int64_t d = 0; d < Dp; ++d) {
                    s.q2[g * Dp + d] = qf[d] * qf[d];
                    s.qr[g * Dp + d] = std::max(qf[d], 0.f);
                }
            }
            ellipsoid_rank<TK>(a, b, h, s);
            topk_ids(s.rank.data(), a.N, a.K, s.queue, s.cand);
            s.live.assign(C, 0);
            for (int64_t c : s.cand) {
                s.live[c] = 1;
                s.score[c] = sketch_bound<TK>(a, b, h, c, std::min<int64_t>(sz[c], a.S), s);
            }
            for (int64_t c = a.N; c < C; ++c) {
                s.live[c] = 1;
                s.score[c] = min_max_bound<TK>(a, b, h, c, s);
            }
            choose(a, sz, remaining, b, h, s);
        }
    }
}

template <typename TQ>
void run_q(const Args& a, int64_t tk) {
    if (tk == 0) run<TQ, float>(a);
    else if (tk == 1) run<TQ, at::BFloat16>(a);
    else run<TQ, at::Half>(a);
}
}  // namespace

extern "C" void kernel(const void* q, const void* kmin, const void* kmax, const void* centre, const void* axes2,
                       const uint8_t* codes, const int32_t* sizes, bool* mask, int32_t* ids, int32_t* counts,
                       float* scores, int64_t dtypes, int64_t B, int64_t H, int64_t G, int64_t D, int64_t P,
                       int64_t S, int64_t C, int64_t N, int64_t K, int64_t budget, int64_t sink, int64_t recent,
                       int64_t q_sb, int64_t q_sh,
                       int64_t a_sb, int64_t a_sh, int64_t a_sc, int64_t e_sb, int64_t e_sh, int64_t e_sc,
                       int64_t c_sb, int64_t c_sh, int64_t c_sc, int64_t z_sb)
{
    const Args a{q, kmin, kmax, centre, axes2, codes, sizes, mask, ids, counts, scores, B, H, G, D, P, S, C, N, K,
                 budget, sink, recent, q_sb, q_sh, a_sb, a_sh, a_sc, e_sb, e_sh, e_sc, c_sb, c_sh, c_sc, z_sb};
    const int64_t tq = dtypes / 3, tk = dtypes % 3;
    if (tq == 0) run_q<float>(a, tk);
    else if (tq == 1) run_q<at::BFloat16>(a, tk);
    else run_q<at::Half>(a, tk);
}
"""
_TENSOR_ARGS = ("const void*",) * 5 + ("const uint8_t*", "const int32_t*", "bool*", "int32_t*", "int32_t*", "float*")
_INT_ARGS = 25


@dataclass(frozen=True)
class EstimatorKernel:
    """The built selection kernel, or why there is none (``fn`` None)."""

    fn: Callable[..., None] | None
    compile_s: float
    error: str | None = None


def pick_cpu_estimator(choice: str | None = None) -> str:
    """``choice`` (one of ``CPU_ESTIMATOR_CHOICES`` or None) else ``$TIERKV_CPU_ESTIMATOR`` else "auto"."""
    return env_choice(choice, CPU_ESTIMATOR_VAR, CPU_ESTIMATOR_CHOICES, "the CPU sparse-KV estimator")


@functools.lru_cache(maxsize=1)
def estimator_kernel() -> EstimatorKernel:
    """The kernel, built on first use (one warning and ``fn`` None when it cannot be built)."""
    t0 = time.perf_counter()
    try:
        fn = cpp_loader().load_pybinding([*_TENSOR_ARGS, *("int64_t",) * _INT_ARGS], _SOURCE,
                                                       needs_vec_isa=True)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path instead
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(f"tierkv: the C++ sparse-KV estimator kernel could not be built ({reason}); decode selects "
                      "with torch ops instead. Install a C++ compiler (g++) for inductor, or set "
                      f"{CPU_ESTIMATOR_VAR}=torch to use them without trying.", RuntimeWarning, stacklevel=3)
        return EstimatorKernel(None, time.perf_counter() - t0, reason)
    return EstimatorKernel(fn, time.perf_counter() - t0)


def kernel_applies(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, sketch: KeySketch) -> bool:
    """Whether ``select_two_stage_cpu`` serves these inputs: ``pick_cpu_estimator()`` is "auto", CPU tensors
    of fp32/bf16/fp16 with ellipsoids of the abstracts' dtype, and the kernel built."""
    ell = sketch.ellipsoid
    if ell is None or pick_cpu_estimator() != "auto" or q.device.type != "cpu" or kmin.device.type != "cpu":
        return False
    if q.dtype not in _DTYPES or kmin.dtype not in _DTYPES or not (kmax.dtype == ell.centre.dtype
                                                                    == ell.axes2.dtype == kmin.dtype):
        return False
    return estimator_kernel().fn is not None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride on its last dim (a copy only when it has not)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def select_two_stage_cpu(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, sketch: KeySketch,
                         candidates: int, *, budget_tokens: int, sink_chunks: int, recent_tokens: int,
                         scores: torch.Tensor | None = None) -> Selection:
    """``estimate.select_two_stage`` in the C++ kernel (``kernel_applies`` first; shapes as there):
    q (B, Hq, D); kmin, kmax (B, Hkv, C, D); sketch with codes (B, Hkv, >= coded, S, P) and ellipsoids
    (B, Hkv, >= coded, D); 0 < candidates < coded -> Selection(mask, ids, counts) (B, Hkv, C).
    ``scores``: a contiguous (B, Hkv, C) float32 buffer that gets what ``chunk_scores`` would return (the
    candidates' sketch bound, the uncoded chunks' min/max bound, -inf for the pruned ones)."""
    fn = estimator_kernel().fn
    assert fn is not None and sketch.ellipsoid is not None
    B, Hq, D = q.shape
    _, H, C, _ = kmin.shape
    N = sketch.coded
    assert 0 < candidates < N <= C, (candidates, N, C)
    q, kmin = _rows(q), _rows(kmin)
    if kmax.stride() != kmin.stride():
        kmin, kmax = kmin.contiguous(), kmax.contiguous()
    centre, axes2 = _rows(sketch.ellipsoid.centre), _rows(sketch.ellipsoid.axes2)
    if centre.stride() != axes2.stride():
        centre, axes2 = centre.contiguous(), axes2.contiguous()
    codes = sketch.codes
    S, P = codes.shape[3], codes.shape[4]
    if codes.stride(4) != 1 or codes.stride(3) != P:
        codes = codes.contiguous()
    sizes = sketch.chunk_tokens.to(torch.int32)
    sizes = sizes.view(1, C) if sizes.dim() == 1 else sizes.contiguous()
    z_sb = sizes.stride(0) if sizes.shape[0] > 1 else 0
    if scores is None:
        scores = torch.empty(B, H, C, dtype=torch.float32)
    assert scores.shape == (B, H, C) and scores.dtype == torch.float32 and scores.is_contiguous()
    mask = torch.empty(B, H, C, dtype=torch.bool)
    table = torch.empty(B * H * (C + 1), dtype=torch.int32)         # ids (B, Hkv, C), then counts (B, Hkv)
    ids, counts = table[:B * H * C].view(B, H, C), table[B * H * C:].view(B, H)
    fn(q, kmin, kmax, centre, axes2, codes, sizes, mask, ids, counts, scores,
       _DTYPES.index(q.dtype) * 3 + _DTYPES.index(kmin.dtype), B, H, Hq // H, D, P, S, C, N, candidates,
       budget_tokens, sink_chunks, recent_tokens, q.stride(0), q.stride(1), *kmin.stride()[:3], *centre.stride()[:3],
       *codes.stride()[:3], z_sb)
    return Selection(mask, ids, counts)
