"""Hand-written C++ row kernels for a layer's element-wise ops on the CPU: RMSNorm, SiLU x up, RoPE.

Why this module exists: in a prefill piece (and a decode batch) the products run through oneDNN at the
machine's rate, and what is left is a dozen element-wise torch ops per layer, each a full pass over
its rows with its own OpenMP region and temporaries: RMSNorm is four (fp32 copy, norm, cast, weight),
SiLU x up two (on the strided halves of the fused gate/up output), RoPE four or five (two products,
a roll, the add). On a 135M model's 512-token prefill those passes cost more than the matmuls left
over and made the whole prefill slower than HF's (docs/benchmarks.md, "Prefill: one pass per
element-wise op"). Here each of the three is one loop over the rows, parallel over the rows, with
every rounding eager's ops make:

- ``rms_norm_rows``: y = round(w * round(x * r)), r = 1 / sqrt(mean(x^2) + eps) in fp32
  (``norm_rope.rms_norm_ref``'s values; fp32 sums in another order than aten's);
- ``silu_mul_rows``: y = round(round(SiLU(g)) * u) (``F.silu(g) * u``; the vector exp eager uses, on
  every element: eager's scalar tail of a contiguous tensor may differ from it in fp32's last bit);
- ``rope_rows``: y = round(round(x * cos) + round(roll(x, D/2) * sin_signed)) (``norm_rope.rope_torch``).

When they apply (``rows_wanted``; otherwise the callers in ``tierkv.model`` run the torch ops): CPU
tensors outside a ``torch.compile`` trace, unit stride along the row and one stride between rows,
``TIERKV_CPU_ROW_KERNELS`` (read per call) "auto" (the default: bf16 and fp16) or "on" (every dtype,
fp32 too: the tests' way to compare tokens), not "off", and the kernel built (a failed build warns
once and the torch ops run). Kernels are specific to (row length, dtype, threads), built once per
process through inductor's C++ loader like ``kernels.cpu_decode``'s (~0.3 s from its disk cache).

Shapes: rows (M, K) as views of (..., K) tensors; the outputs are new contiguous tensors of the
input's shape; RoPE's x (..., H, D) with heads D apart and its tables (..., 1, D), one row per token.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from tierkv.kernels._select import env_choice
from tierkv.kernels.cpu_cpp import CTYPES, compile_kernel, cpp_prelude

__all__ = ["ROW_KERNELS_CHOICES", "ROW_KERNELS_VAR", "pick_row_kernels", "rms_norm_rows", "rope_rows",
           "rows_wanted", "silu_mul_rows"]

ROW_KERNELS_VAR = "TIERKV_CPU_ROW_KERNELS"
ROW_KERNELS_CHOICES = ("auto", "on", "off")
_AUTO_DTYPES = (torch.bfloat16, torch.float16)
# Elements below which a call stays on the calling thread (an OpenMP region costs ~1-10 us, more on a
# busy machine): a decode row of a small model is a few hundred to a few thousand values.
PARALLEL_MIN_ELEMENTS = 1 << 15

# after ``cpu_cpp.cpp_prelude``: the rows of a call split over the threads when there is enough work
_PARALLEL = r"""
#define PARALLEL _Pragma("omp parallel for num_threads(%(THREADS)d) schedule(static) if(M * %(WORK)d >= %(PAR_MIN)d)")
"""

# x (M rows, RS apart) of K values, w (K,), out (M, K) contiguous
_RMS_NORM = r"""
extern "C" void kernel(const T* x, const T* w, T* out, int64_t M, int64_t RS, float eps)
{
    constexpr int64_t K = %(K)d;
    PARALLEL
    for (int64_t m = 0; m < M; ++m) norm_row(x + m * RS, w, out + m * K, K, eps);
}
"""

# g and u (M rows, GS and US apart) of K values, out (M, K) contiguous
_SILU_MUL = r"""
extern "C" void kernel(const T* g, const T* u, T* out, int64_t M, int64_t GS, int64_t US)
{
    constexpr int64_t K = %(K)d;
    PARALLEL
    for (int64_t m = 0; m < M; ++m) silu_mul_row(g + m * GS, u + m * US, out + m * K, K);
}
"""

# x (M tokens, XS apart) of H heads of D values (heads D apart), cos/sin (M, D) (CS apart), out (M, H, D)
_ROPE = r"""
extern "C" void kernel(const T* x, const T* cs, const T* sn, T* out, int64_t M, int64_t XS, int64_t CS)
{
    constexpr int64_t H = %(H)d, D = %(D)d, HALF = D / 2;
    constexpr bool VEC = HALF %% L == 0;
    PARALLEL
    for (int64_t m = 0; m < M; ++m) {
        const T* c = cs + m * CS;
        const T* s = sn + m * CS;
        for (int64_t h = 0; h < H; ++h) {
            const T* xr = x + m * XS + h * D;
            T* o = out + (m * H + h) * D;
            if constexpr (VEC) {
                for (int64_t j = 0; j < D; j += L) {
                    const V a = round_v(load_f(xr + j) * load_f(c + j));
                    const V b = round_v(load_f(xr + (j + HALF) %% D) * load_f(s + j));
                    store_t(o + j, round_v(a + b));
                }
            } else {
                for (int64_t j = 0; j < D; ++j) {
                    const float a = round_t(static_cast<float>(xr[j]) * static_cast<float>(c[j]));
                    const float b = round_t(static_cast<float>(xr[(j + HALF) %% D]) * static_cast<float>(s[j]));
                    o[j] = static_cast<T>(a + b);
                }
            }
        }
    }
}
"""


def pick_row_kernels(choice: str | None = None) -> str:
    """``choice`` (one of ``ROW_KERNELS_CHOICES`` or None) else ``$TIERKV_CPU_ROW_KERNELS`` else "auto"."""
    return env_choice(choice, ROW_KERNELS_VAR, ROW_KERNELS_CHOICES, "the CPU row kernels")


def rows_wanted(*tensors: torch.Tensor) -> bool:
    """Whether the row kernels should compute on these tensors (the switch, the device, the dtype: one
    of ``CTYPES``, all alike; "auto" only for 16-bit ones), outside a ``torch.compile`` trace."""
    mode = pick_row_kernels()
    if mode == "off" or torch.compiler.is_compiling():
        return False
    dtype = tensors[0].dtype
    if any(t.device.type != "cpu" or t.dtype != dtype for t in tensors) or dtype not in CTYPES:
        return False
    return mode == "on" or dtype in _AUTO_DTYPES


def _rows(x: torch.Tensor, tail: int = 1) -> tuple[int, int] | None:
    """(M, the stride between rows) where x's leading dims (all but the last ``tail``) are rows one
    stride apart and the last dim has unit stride, else None."""
    if x.dim() <= tail or x.stride(-1) != 1:
        return None
    lead = x.shape[:-tail]
    m, stride = 1, None
    for size, st in zip(reversed(lead), reversed(x.stride()[:-tail])):
        if size == 1:
            continue
        if stride is None:
            stride, want = st, st * size
        elif st != want:
            return None
        else:
            want = st * size
        m *= size
    return m, (stride if stride is not None else 0)


@functools.lru_cache(maxsize=128)
def _build(kind: str, dtype: torch.dtype, threads: int, shape: tuple[int, ...]) -> Callable[..., None] | None:
    ctype = CTYPES[dtype]
    if kind == "rope":
        h, d = shape
        body, work, params = _ROPE % {"H": h, "D": d}, h * d, [f"const {ctype}*"] * 3
        extra = ["int64_t"] * 3
    else:
        (k,) = shape
        body, work = (_RMS_NORM if kind == "rms_norm" else _SILU_MUL) % {"K": k}, k
        params = [f"const {ctype}*"] * 2
        extra = ["int64_t", "int64_t", "float"] if kind == "rms_norm" else ["int64_t"] * 3
    source = cpp_prelude(dtype) + _PARALLEL % {"THREADS": threads, "WORK": work, "PAR_MIN": PARALLEL_MIN_ELEMENTS} + body
    fn, _, _ = compile_kernel([*params, f"{ctype}*", *extra], source, f"row ({kind})", ROW_KERNELS_VAR)
    return fn


def _kernel(kind: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Callable[..., None] | None:
    return _build(kind, dtype, torch.get_num_threads(), shape)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of x (..., K) with weight (K,) as ``norm_rope.rms_norm_ref`` computes it, or None where the
    row kernels do not apply (the caller runs the torch ops)."""
    rows = _rows(x)
    if rows is None or not rows_wanted(x, weight) or weight.dim() != 1 or not weight.is_contiguous():
        return None
    fn = _kernel("rms_norm", x.dtype, (x.shape[-1],))
    if fn is None:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    fn(x, weight, out, rows[0], rows[1], float(eps))
    return out


def silu_mul_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``F.silu(gate) * up`` for gate and up (..., K) of one shape (e.g. the two halves of a fused
    gate/up output), or None where the row kernels do not apply."""
    g, u = _rows(gate), _rows(up)
    if g is None or u is None or gate.shape != up.shape or not rows_wanted(gate, up):
        return None
    fn = _kernel("silu_mul", gate.dtype, (gate.shape[-1],))
    if fn is None:
        return None
    out = torch.empty(gate.shape, dtype=gate.dtype)
    fn(gate, up, out, g[0], g[1], u[1])
    return out


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor | None:
    """``norm_rope.rope_torch(x, cos, sin_signed)`` for x (..., H, D) with its heads D apart and the
    tables (..., 1, D) of one row per token of x, or None where the row kernels do not apply."""
    d = x.shape[-1]
    rows, tables = _rows(x, tail=2), _rows(cos, tail=2)
    if rows is None or tables is None or x.dim() < 2 or x.stride(-2) != d or cos.shape[-2] != 1 or \
            cos.shape[:-2] != x.shape[:-2] or cos.shape[-1] != d or sin_signed.stride() != cos.stride() or \
            sin_signed.shape != cos.shape or d % 2 or not rows_wanted(x, cos, sin_signed):
        return None
    fn = _kernel("rope", x.dtype, (x.shape[-2], d))
    if fn is None:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    fn(x, cos, sin_signed, out, rows[0], rows[1], tables[1])
    return out
