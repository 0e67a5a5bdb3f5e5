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
``TIERKV_CPU_ROW_KERNELS`` (read per call) "auto" (the default: bf16 and fp16 in models of 50M+
parameters, where the other C++ decode kernels are built too) or "on" (every dtype and model size,
fp32 too: the tests' way to compare tokens), not "off", and the kernel built (a failed build warns
once and the torch ops run). The three are one C++ library per (dtype, thread count), shapes and
strides passed per call, built on first use through inductor's C++ loader (``kernels.cpu_cpp``: a few
seconds once per machine, ~0.3 s from inductor's disk cache after).

Shapes: rows (M, K) as views of (..., K) tensors; the outputs are new contiguous tensors of the
input's shape; RoPE's x (..., H, D) with heads D apart and its tables (..., 1, D), one row per token.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from tierkv.kernels._select import env_choice
from tierkv.kernels.cpu_cpp import CTYPES, compile_kernel, cpp_prelude
from tierkv.kernels.cpu_gemv import kernels_allowed

__all__ = ["ROW_KERNELS_CHOICES", "ROW_KERNELS_VAR", "pick_row_kernels", "rms_norm_rows", "rope_rows",
           "rows_wanted", "silu_mul_rows"]

ROW_KERNELS_VAR = "TIERKV_CPU_ROW_KERNELS"
ROW_KERNELS_CHOICES = ("auto", "on", "off")
_AUTO_DTYPES = (torch.bfloat16, torch.float16)
# Elements below which a call stays on the calling thread (an OpenMP region costs ~1-10 us, more on a
# busy machine): a decode row of a small model is a few hundred to a few thousand values.
PARALLEL_MIN_ELEMENTS = 1 << 15

# After ``cpu_cpp.cpp_prelude``: the three ops in one library (one build per dtype and thread count: the
# prelude's headers are most of a build's ~2-5 s), shapes and strides as arguments. ``op``: ``_OPS``.
# rms_norm: a = x (M rows, SA apart) of K values, b = w (K,); silu_mul: a = g, b = u (M rows, SA and SB
# apart) of K values; rope: a = x (M tokens, SA apart) of H heads of K = D values (heads D apart), b = cos,
# c = sin (M, D) (SB apart). out (M, K) or (M, H, D) contiguous.
_SOURCE = r"""
static void rope_token(const T* xr0, const T* c, const T* s, T* o0, int64_t H, int64_t D) {
    const int64_t HALF = D / 2;
    for (int64_t h = 0; h < H; ++h) {
        const T* xr = xr0 + h * D;
        T* o = o0 + h * D;
        if (HALF %% L == 0) {
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
extern "C" void kernel(const T* a, const T* b, const T* c, T* out, int64_t op, int64_t M, int64_t K, int64_t H,
                       int64_t SA, int64_t SB, float eps)
{
    const int64_t work = op == 2 ? H * K : K;
    #pragma omp parallel for num_threads(%(THREADS)d) schedule(static) if(M * work >= %(PAR_MIN)d)
    for (int64_t m = 0; m < M; ++m) {
        if (op == 0) norm_row(a + m * SA, b, out + m * K, K, eps);
        else if (op == 1) silu_mul_row(a + m * SA, b + m * SB, out + m * K, K);
        else rope_token(a + m * SA, b + m * SB, c + m * SB, out + m * H * K, H, K);
    }
}
"""
_OPS = {"rms_norm": 0, "silu_mul": 1, "rope": 2}


def pick_row_kernels(choice: str | None = None) -> str:
    """``choice`` (one of ``ROW_KERNELS_CHOICES`` or None) else ``$TIERKV_CPU_ROW_KERNELS`` else "auto"."""
    return env_choice(choice, ROW_KERNELS_VAR, ROW_KERNELS_CHOICES, "the CPU row kernels")


def rows_wanted(*tensors: torch.Tensor) -> bool:
    """Whether the row kernels should compute on these tensors (the switch, the device, the dtype: one
    of ``CTYPES``, all alike), outside a ``torch.compile`` trace. "auto" takes them for 16-bit tensors in
    the forwards that may build C++ kernels (``cpu_gemv.kernels_allowed``: models of 50M+ parameters,
    as the compiled matrix-vector path): the library's one build (~10 s once per machine, ~2 s per
    process from inductor's cache with its ISA check) would cost a tiny model more than it saves."""
    dtype = tensors[0].dtype
    if any(t.device.type != "cpu" or t.dtype != dtype for t in tensors) or dtype not in CTYPES:
        return False                                  # (CUDA's calls stop here, before the switch is read)
    mode = pick_row_kernels()
    if mode == "off" or torch.compiler.is_compiling():
        return False
    return mode == "on" or (dtype in _AUTO_DTYPES and kernels_allowed())


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


@functools.lru_cache(maxsize=16)
def _build(dtype: torch.dtype, threads: int) -> Callable[..., None] | None:
    ctype = CTYPES[dtype]
    source = cpp_prelude(dtype) + _SOURCE % {"THREADS": threads, "PAR_MIN": PARALLEL_MIN_ELEMENTS}
    argtypes = [f"const {ctype}*"] * 3 + [f"{ctype}*"] + ["int64_t"] * 6 + ["float"]
    fn, _, _ = compile_kernel(argtypes, source, "row (RMSNorm, SiLU x up, RoPE)", ROW_KERNELS_VAR)
    return fn


def _kernel(kind: str, dtype: torch.dtype) -> Callable[..., None] | None:
    """The library's entry point for op ``kind`` (one of ``_OPS``), built on first use, or None."""
    assert kind in _OPS
    return _build(dtype, torch.get_num_threads())


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of x (..., K) with weight (K,) as ``norm_rope.rms_norm_ref`` computes it, or None where the
    row kernels do not apply (the caller runs the torch ops)."""
    if not rows_wanted(x, weight) or weight.dim() != 1 or not weight.is_contiguous():
        return None
    rows = _rows(x)
    if rows is None:
        return None
    fn = _kernel("rms_norm", x.dtype)
    if fn is None:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    fn(x, weight, weight, out, _OPS["rms_norm"], rows[0], x.shape[-1], 1, rows[1], 0, float(eps))
    return out


def silu_mul_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``F.silu(gate) * up`` for gate and up (..., K) of one shape (e.g. the two halves of a fused
    gate/up output), or None where the row kernels do not apply."""
    if gate.shape != up.shape or not rows_wanted(gate, up):
        return None
    g, u = _rows(gate), _rows(up)
    if g is None or u is None:
        return None
    fn = _kernel("silu_mul", gate.dtype)
    if fn is None:
        return None
    out = torch.empty(gate.shape, dtype=gate.dtype)
    fn(gate, up, up, out, _OPS["silu_mul"], g[0], gate.shape[-1], 1, g[1], u[1], 0.0)
    return out


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor | None:
    """``norm_rope.rope_torch(x, cos, sin_signed)`` for x (..., H, D) with its heads D apart and the
    tables (..., 1, D) of one row per token of x, or None where the row kernels do not apply."""
    d = x.shape[-1]
    if not rows_wanted(x, cos, sin_signed) or x.dim() < 2 or x.stride(-2) != d or cos.shape[-2] != 1 or \
            cos.shape[:-2] != x.shape[:-2] or cos.shape[-1] != d or sin_signed.stride() != cos.stride() or \
            sin_signed.shape != cos.shape or d % 2:
        return None
    rows, tables = _rows(x, tail=2), _rows(cos, tail=2)
    if rows is None or tables is None:
        return None
    fn = _kernel("rope", x.dtype)
    if fn is None:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    fn(x, cos, sin_signed, out, _OPS["rope"], rows[0], d, x.shape[-2], rows[1], tables[1], 0.0)
    return out
