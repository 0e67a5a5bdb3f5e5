"""A hand-written C++ matrix-vector product for the ``cpu_int8`` pack (int8 per channel) at decode.

Why this module exists: one decode row of a per-channel int8 weight reads 1 byte per weight, half of
bf16, so it should take about half of bf16's time. Inductor's loop over the same bytes
(``(q.float() * x).sum(-1) * s + ...``, which ``cpu_gemv`` used before) ran at ~23-28 GB/s alone
but at about bf16's time inside the model's step: each call was two OpenMP regions (one for
``sum(x)``), plus an fp32 copy of x and a cast of the output as separate ops around it. This
kernel is one OpenMP region per call: x (bf16 or fp16) is widened into an fp32 buffer and summed once
on the calling thread, then the rows are split over the threads; each row is one sequential
stream of its int8 bytes, 32 at a time with two fp32 accumulators, and its output is written
in x's dtype. No dequantized weight, no temporaries.

Its shape was measured, not guessed (docs/benchmarks.md, "Resident quantized decode, session 12"):
on this project's 2-core Zen 4 machine a row loop reading 16-32 bytes per step with one or two
accumulators streams at the memory's rate (~18 GB/s per core, a plain byte sum's rate), while
four accumulators over 64 bytes per step, or two rows at once, ran 1.5-2x slower.

The kernel is C++ built by inductor's own loader (``CppPythonBindingsCodeCache``: the same
compiler, flags, vector headers and on-disk cache as ``cpu_gemv``'s compiled loops), once per
(N, K, x dtype, thread count), as inductor specialises its loops. A build that fails leaves
``QGemvKernel.fn`` None with the reason, and the caller uses PyTorch's op instead.

Numerics: y = s * sum(x * (q - 128)) + (minimum + 128 s) * sum(x), all in fp32 from the stored fp16
(scale, minimum), x's 16-bit values exactly; one rounding to x's dtype at the end.

Shapes: data (N, K) int8 (the bits of q - 128, contiguous), qparams (1, N, 2) float16 (contiguous),
x (K,) bf16/fp16 -> (N,) in x's dtype.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["QGemvKernel", "int8_channel_kernel", "run_int8_channel"]

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
            a1 = a1 + at::vec::convert<float>(at::vec::Vectorized<int8_t>::loadu(row + k + L, L)) * V::loadu(xf + k + L);
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


@dataclass(frozen=True)
class QGemvKernel:
    """A built kernel for one (N, K, dtype, threads), or why there is none (``fn`` None)."""

    fn: Callable[..., None] | None
    compile_s: float
    error: str | None = None


def _vector_width() -> int:
    """fp32 lanes of inductor's vector ISA here (16 with AVX-512, 8 with AVX2), 0 without one."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    return isa.nelements(torch.float32) if isa else 0


@functools.lru_cache(maxsize=256)
def _build_int8_channel(n: int, k: int, dtype: torch.dtype, threads: int) -> QGemvKernel:
    t0 = time.perf_counter()
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        lanes = _vector_width()
        if not lanes or k % lanes:
            raise RuntimeError(f"K = {k} is not a multiple of the vector width {lanes or 'none'}")
        ctype = _CTYPES[dtype]
        source = _INT8_CHANNEL % {"T": ctype, "N": n, "K": k, "THREADS": threads}
        fn = CppPythonBindingsCodeCache.load_pybinding([f"const {ctype}*", "const int8_t*", "const at::Half*",
                                                        f"{ctype}*"], source, needs_vec_isa=True)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the aten op instead
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(f"tierkv: the C++ int8 matrix-vector kernel could not be built ({reason}); decode uses "
                      "PyTorch's int8 op instead. Install a C++ compiler (g++) for inductor, or set "
                      "TIERKV_CPU_MATVEC=on to use the aten ops without trying.", RuntimeWarning, stacklevel=3)
        return QGemvKernel(None, time.perf_counter() - t0, reason)
    return QGemvKernel(fn, time.perf_counter() - t0)


def int8_channel_kernel(data: torch.Tensor, qparams: torch.Tensor, dtype: torch.dtype) -> QGemvKernel | None:
    """The kernel for a cpu_int8 weight (data (N, K), qparams (1, N, 2)) and an x of ``dtype`` at the current
    thread count (built on first use), or None where it does not apply (another dtype, a non-contiguous
    weight): the caller then uses PyTorch's op."""
    if dtype not in _CTYPES or not (data.is_contiguous() and qparams.is_contiguous()) or data.device.type != "cpu":
        return None
    n, k = data.shape
    return _build_int8_channel(n, k, dtype, torch.get_num_threads())


def run_int8_channel(kernel: QGemvKernel, data: torch.Tensor, qparams: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """data (N, K) int8 view @ x (K,) -> (N,) in x's dtype through a built ``int8_channel_kernel``."""
    assert kernel.fn is not None
    out = torch.empty(data.shape[0], dtype=x.dtype)
    kernel.fn(x.contiguous(), data, qparams, out)
    return out
