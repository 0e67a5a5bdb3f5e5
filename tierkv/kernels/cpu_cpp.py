"""What tierkv's hand-written CPU kernels share: the C++ loader, the element types, the row helpers.

Why this module exists: the decode-row products (``kernels.cpu_decode``), the decode attention call
(``kernels.cpu_decode_attention``) and the row kernels of prefill pieces and batches
(``kernels.cpu_rows``) are C++ sources built by inductor's plain C++ binding
(``CppPythonBindingsCodeCache``: its compiler, flags and on-disk cache; ~1 us per call). They build
them the same way, fail the same way (one warning naming the switch that turns them off, the aten
ops instead), and two of them compute the same element-wise math on a row: HF's RMSNorm and eager's
SiLU(gate) x up, each rounded where the eager ops round. That math is written once here
(``cpp_prelude``) and included by both, so a prologue folded into a decode product and a prefill
piece's norm give the same values.

The prelude defines, for the element type ``T`` it is made for: ``V`` (fp32 vectors of ``L`` lanes),
``load_f``/``store_t`` (T <-> fp32 vectors, ``n`` < L lanes for a tail: partial loads read nothing
past it), ``round_t``/``round_v`` (a value rounded to T and back), and per row of K values
``norm_row`` (y = round(w * round(x * r)), r = 1 / sqrt(mean(x^2) + eps) in fp32) and
``silu_mul_row`` (y = round(round(SiLU(g)) * u), with the vector exp eager uses), writing T or fp32.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable

import torch

from tierkv.kernels._select import cpp_loader

__all__ = ["CTYPES", "compile_kernel", "cpp_prelude"]

CTYPES = {torch.bfloat16: "at::BFloat16", torch.float16: "at::Half", torch.float32: "float"}

_PRELUDE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <algorithm>
#include <cmath>
using T = @T@;
using V = at::vec::Vectorized<float>;
constexpr int64_t L = V::size();
static inline float round_t(float v) { return static_cast<float>(static_cast<T>(v)); }
static inline V load_f(const float* p, int64_t n = L) { return V::loadu(p, n); }
template <typename U> static inline V load_f(const U* p, int64_t n = L) {
    return at::vec::convert<float>(at::vec::Vectorized<U>::loadu(p, n));
}
static inline void store_t(float* p, V v, int64_t n = L) { v.store(p, n); }
template <typename U> static inline void store_t(U* p, V v, int64_t n = L) { at::vec::convert<U>(v).store(p, n); }
static inline V round_v(V v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else return at::vec::convert<float>(at::vec::convert<T>(v));
}
// HF's RMSNorm of one row of K values: fp32 mean square, x * r rounded to T, times the weight, rounded
template <typename U> static inline void norm_row(const T* x, const T* w, U* o, int64_t K, float eps) {
    V a(0);
    for (int64_t k = 0; k < K; k += L) { const V v = load_f(x + k, std::min(L, K - k)); a = at::vec::fmadd(v, v, a); }
    const float ss = at::vec::vec_reduce_all<float>([](V& p, V& q) { return p + q; }, a);
    const V inv(1.0f / std::sqrt(ss / K + eps));
    for (int64_t k = 0; k < K; k += L) {
        const int64_t n = std::min(L, K - k);
        store_t(o + k, round_v(load_f(w + k, n) * round_v(load_f(x + k, n) * inv)), n);
    }
}
// eager's F.silu(g) * u over one row of K values: SiLU rounded to T, the product rounded to T
template <typename U> static inline void silu_mul_row(const T* g, const T* u, U* o, int64_t K) {
    for (int64_t k = 0; k < K; k += L) {
        const int64_t n = std::min(L, K - k);
        const V gv = load_f(g + k, n);
        const V s = round_v(gv / (V(1.0f) + gv.neg().exp()));
        store_t(o + k, round_v(s * load_f(u + k, n)), n);
    }
}
"""


def cpp_prelude(dtype: torch.dtype) -> str:
    """The shared C++ prelude (includes, helpers, ``norm_row``, ``silu_mul_row``) for element type ``dtype``:
    put it first in a kernel's source (it holds no ``%`` formatting of its own)."""
    return _PRELUDE.replace("@T@", CTYPES[dtype])


def compile_kernel(argtypes: list[str], source: str, what: str,
                   switch: str | None) -> tuple[Callable[..., None] | None, float, str | None]:
    """(the built C++ function ``kernel`` of ``source``, seconds, None) or (None, seconds, why) after one warning
    naming ``what`` and the fixes (a compiler; ``switch``=off, unless None: nothing to switch): inductor's C++ loader
    (``CppPythonBindingsCodeCache``), its compiler and cache. ``argtypes``: the C types of ``kernel``'s
    parameters, in order."""
    t0 = time.perf_counter()
    try:
        fn = cpp_loader().load_pybinding(argtypes, source, needs_vec_isa=True)
    except Exception as exc:  # noqa: BLE001 - any build failure means: keep the aten ops
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        off = f", or set {switch}=off to use the aten ops without trying" if switch else ""
        warnings.warn(f"tierkv: a C++ {what} kernel could not be built ({reason}); tierkv uses "
                      f"the aten ops instead. Install a C++ compiler (g++) for inductor{off}.", RuntimeWarning,
                      stacklevel=4)
        return None, time.perf_counter() - t0, reason
    return fn, time.perf_counter() - t0, None
