"""One C++ call for a batch-1 decode token's RoPE, KV append and attention over the resident cache.

Why this module exists: between a layer's q/k/v product and its o product, eager decode runs a
dozen small ops per layer (views, RoPE's four ops, two slice copies into the cache, slicing, the
grouped SDPA call), ~100 us a layer on this project's CPU for a few kilobytes of work, 3-4 ms of a
135M model's ~24 ms token (docs/benchmarks.md, "Decode: one C++ call per product, norms and
activations folded in"). This kernel takes the fused projection's output and does all of it:

1. q and k heads rotated (rotate-half, the signed sine table of ``model.step_inputs``) with eager's
   roundings: round(round(x * cos) + round(roll(x) * sin)) in the compute dtype;
2. the rotated k and the v written into the layer's cache at the token's position;
3. per query head (GQA: head h reads KV head h // (Hq / Hkv)), softmax(q k^T / sqrt(D)) v over the
   positions 0 .. pos, an online softmax in fp32, the heads split over the threads once the context
   is long enough to pay for the OpenMP region (``PARALLEL_MIN_SCORES``).

It applies only to one token of one sequence over a dense cache (``pipeline.kv.dense``) with no
window cutting its context, models without q/k norms (``kernels.decode_fusion`` decides).

Shapes: qkv ((Hq + 2 Hkv) D,), cos/sin (D,), K/V cache of one layer (Hkv, CAP, D) contiguous,
out (Hq D,); all in one dtype; pos the token's position (the cache's stored length).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from tierkv.kernels.cpu_cpp import CTYPES, compile_kernel, cpp_prelude
from tierkv.kernels.cpu_decode import FUSED_DECODE_VAR
from tierkv.kernels.cpu_qgemv import vector_width

__all__ = ["PARALLEL_MIN_SCORES", "AttendKernel", "attend_kernel", "run_attend_kernel"]

# after ``cpu_cpp.cpp_prelude`` (PRELUDE: includes, ``round_t``, ``load_f``)
_SOURCE = r"""%(PRELUDE)s
extern "C" void kernel(const %(T)s* qkv, const %(T)s* cs, const %(T)s* sn, %(T)s* kc, %(T)s* vc, %(T)s* out,
                       int64_t pos)
{
    constexpr int64_t HQ = %(HQ)d, HKV = %(HKV)d, D = %(D)d, CAP = %(CAP)d, G = HQ / HKV, HALF = D / 2;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    alignas(64) float qf[HQ * D];
    for (int64_t h = 0; h < HQ + HKV; ++h) {
        const %(T)s* x = qkv + h * D;
        for (int64_t d = 0; d < D; ++d) {
            const float c = static_cast<float>(cs[d]), s = static_cast<float>(sn[d]);
            const float r = round_t(round_t(static_cast<float>(x[d]) * c) +
                                    round_t(static_cast<float>(x[(d + HALF) %% D]) * s));
            if (h < HQ) qf[h * D + d] = r;
            else kc[((h - HQ) * CAP + pos) * D + d] = static_cast<%(T)s>(r);
        }
    }
    for (int64_t h = 0; h < HKV; ++h)
        for (int64_t d = 0; d < D; ++d) vc[(h * CAP + pos) * D + d] = qkv[(HQ + HKV + h) * D + d];
    const int64_t S = pos + 1;
    using V = at::vec::Vectorized<float>;
    constexpr int64_t L = V::size(), DV = D / L, BK = 64;
    #pragma omp parallel for num_threads(%(THREADS)d) schedule(static) if(HQ * S >= %(PAR_MIN)d)
    for (int64_t h = 0; h < HQ; ++h) {
        const float* q = qf + h * D;
        const %(T)s* kh = kc + (h / G) * CAP * D;
        const %(T)s* vh = vc + (h / G) * CAP * D;
        V qv[DV], acc[DV];
        for (int64_t j = 0; j < DV; ++j) { qv[j] = V::loadu(q + j * L) * V(scale); acc[j] = V(0); }
        float m = -INFINITY, l = 0.f;
        alignas(64) float sc[BK];
        for (int64_t s0 = 0; s0 < S; s0 += BK) {       // a block of keys: scores, one rescale, the weighted values
            const int64_t nb = std::min(BK, S - s0);
            float bm = -INFINITY;
            for (int64_t i = 0; i < nb; ++i) {
                const %(T)s* kr = kh + (s0 + i) * D;
                V a = qv[0] * load_f(kr);
                for (int64_t j = 1; j < DV; ++j) a = at::vec::fmadd(qv[j], load_f(kr + j * L), a);
                sc[i] = at::vec::vec_reduce_all<float>([](V& x, V& y) { return x + y; }, a);
                bm = std::max(bm, sc[i]);
            }
            if (bm > m) {
                const float f = std::exp(m - bm);
                l *= f;
                for (int64_t j = 0; j < DV; ++j) acc[j] = acc[j] * V(f);
                m = bm;
            }
            for (int64_t i = 0; i < nb; ++i) {
                const float p = std::exp(sc[i] - m);
                l += p;
                const V pv(p);
                const %(T)s* vr = vh + (s0 + i) * D;
                for (int64_t j = 0; j < DV; ++j) acc[j] = at::vec::fmadd(pv, load_f(vr + j * L), acc[j]);
            }
        }
        alignas(64) float o[D];
        for (int64_t j = 0; j < DV; ++j) (acc[j] / V(l)).store(o + j * L);
        for (int64_t d = 0; d < D; ++d) out[h * D + d] = static_cast<%(T)s>(o[d]);
    }
}
"""


# Query heads x keys below which the attention runs on the calling thread alone (no OpenMP region): at a
# 135M model's 9 heads, 16-128 keys took 7.6-19 us on one thread against 9.5-40 us on two, and on a busy
# machine the two-thread region's barrier waited milliseconds for a core (scratch script, 22:45 UTC, load 5).
PARALLEL_MIN_SCORES = 4096


@dataclass(frozen=True)
class AttendKernel:
    """A built kernel for one (heads, head dim, cache capacity, dtype, threads), or why there is none."""

    fn: Callable[..., None] | None
    compile_s: float
    error: str | None = None


@functools.lru_cache(maxsize=64)
def _build(hq: int, hkv: int, d: int, capacity: int, dtype: torch.dtype, threads: int) -> AttendKernel:
    ctype = CTYPES[dtype]
    source = _SOURCE % {"PRELUDE": cpp_prelude(dtype), "T": ctype, "HQ": hq, "HKV": hkv, "D": d, "CAP": capacity, "THREADS": threads,
                        "PAR_MIN": PARALLEL_MIN_SCORES}
    argtypes = [f"const {ctype}*"] * 3 + [f"{ctype}*"] * 3 + ["int64_t"]
    return AttendKernel(*compile_kernel(argtypes, source, "decode attention", FUSED_DECODE_VAR))


def attend_kernel(hq: int, k_cache: torch.Tensor) -> AttendKernel | None:
    """The built kernel for ``hq`` query heads over one layer's K (or V) cache (Hkv, CAP, D), or None where it
    does not apply (not a contiguous CPU tensor of a supported dtype, Hq not a multiple of Hkv, D not a
    multiple of the CPU's fp32 vector width, or no vector ISA)."""
    if k_cache.device.type != "cpu" or k_cache.dim() != 3 or k_cache.dtype not in CTYPES or \
            not k_cache.is_contiguous() or hq % k_cache.shape[0] or \
            not vector_width() or k_cache.shape[2] % vector_width():
        return None
    hkv, capacity, d = k_cache.shape
    kernel = _build(hq, hkv, d, capacity, k_cache.dtype, torch.get_num_threads())
    return kernel if kernel.fn is not None else None


def run_attend_kernel(kernel: AttendKernel, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, hq: int) -> torch.Tensor:
    """RoPE, the KV append at ``pos`` and attention over positions 0 .. pos -> (Hq D,) through ``kernel`` (built
    by ``attend_kernel(hq, k_cache)``). qkv ((Hq + 2 Hkv) D,), cos/sin (D,) contiguous in the cache's dtype."""
    assert kernel.fn is not None and 0 <= pos < k_cache.shape[1]
    out = torch.empty(hq * k_cache.shape[2], dtype=k_cache.dtype)
    kernel.fn(qkv, cos, sin, k_cache, v_cache, out, pos)
    return out
