"""Quantized linear layers computed on the compressed form: quantize, dequantize, and x @ W^T.

Why this module exists: a quantized weight must stay quantized on every link and as far into the
compute as possible, or the bytes saved on the disk and the host-to-device link are spent again
inflating it. This is the kernel triplet for quantized linear layers (``tierkv.quantspec`` says
what the stored tensors are; ``quant_reference`` holds the torch references):

- Triton ``_quant_matmul_kernel`` (launcher ``quant_matmul_fwd``): a fused dequantize-matmul over
  the ``plain`` int4 and int8 packs. Each K step is one quantization group: its codes are loaded
  and dequantized in registers (one scale and minimum per output row), rounded to x's dtype as
  the reference rounds its weight, and multiplied with fp32 accumulation; the dequantized weight
  never exists in memory. No split-K: decode (M=1) gets occupancy from narrow N tiles (unmeasured).
- Triton ``_dequant_kernel`` (launcher ``dequantize_fwd``): the weight rebuilt into a (N, K)
  buffer, so a large batch (prefill) can call cuBLAS on it: per-call scratch from torch's caching
  allocator, freed when the layer's call returns.
- The ``cpu_int4`` pack runs PyTorch's fused CPU int4 matmul (``quant_cpu``); int8 is two of them.
  The ``cpu_int8`` pack (int8 per channel) runs PyTorch's int8 matmul plus a rank-1 correction.
  One decode row (M = 1) of either runs ``kernels.cpu_qgemv``'s C++ kernels where they apply (below):
  PyTorch's ops are compute-bound at M = 1 on this project's 2-core CPU, the kernels stream the bytes.
- ``prepare(qw, dtype)`` derives the CPU ops' parameters once for weights that stay put (resident
  and host-tier layers); streamed layers (views of ring slots) derive them per call.

Per-channel weights (``quantspec.CHANNEL``, int8 only) in the plain pack have one group spanning
K; the Triton kernels tile it as groups of the largest of 128, 64, 32 that divides K, reading the
one (scale, minimum) through a stride-0 view of qparams (K divisible by none: the reference).

``quant_linear`` picks the path per call (``linear_path`` says which, for tests and traces):

- cpu_int8 with a 16-bit x, or cpu_int4 int4 (AVX512 tinygemm layout, N a multiple of 64) with a bf16
  x, M = 1: "cpu_gemv", a C++ loop over the stored bytes (``cpu_gemv.quant_gemv``, ``kernels.cpu_qgemv``)
  where it reads the pack and builds, for weights as large as ``dense_linear.compiled_gemv_wanted``
  says (``TIERKV_CPU_MATVEC``: "compiled" always, "on"/"off" never);
- cpu_int4 / cpu_int8, M < ``CPU_DEQUANT_MIN_M[x.dtype]``: "cpu_fused", the CPU op(s);
- cpu_int4 / cpu_int8, larger M: "cpu_dequant", the weight unpacked into x's dtype, then ``F.linear``;
- plain, Triton picked (``_select.pick_backend``), M < ``DEQUANT_MIN_M``: "triton_fused";
- plain, Triton picked, larger M: "triton_dequant", ``dequantize_fwd`` into scratch, then cuBLAS;
- plain, torch picked (CPU without the interpreter, or forced): "torch", ``quant_linear_ref``,
  which rebuilds the weight every call (correct, slow: CPU stores should hold cpu_int4 packs).

The ``TIERKV_KERNELS`` override (and ``backend=``) chooses between Triton and the reference for
the ``plain`` pack only; the CPU packs have one weight-only implementation each, PyTorch's ops.

Resident layers (``prepare_layer``, for weights placed to stay):

- ``TIERKV_CPU_QLINEAR`` (``_select.pick_cpu_qlinear``; default "auto"): with "auto" (torchao's kernel
  here and self-checked, a dict that owns its tensors) or "torchao", int4 cpu_int4 weights become
  ``quant_torchao.Da8w4Linear`` (x rounded to 8 bits per row, path "cpu_da8w4"; that module says more).
  With "dynamic_int8", cpu_int8 weights become ``DynamicInt8Linear``, x rounded to 8 bits per call and an int8 GEMM
  (``quant_cpu.int8_dynamic_mm``), path "cpu_dynamic" for M < ``DYNAMIC_MAX_M``; larger M (prefill)
  runs the weight-only math ("cpu_dequant"), so prefill numerics stay weight-only. The engine's
  packed copy of each weight (N*K bytes) sits beside the stored one in a store buffer; a dict that
  owns its tensors (``owned``) drops the stored one, and large batches dequantize the packed codes.
  Measured: the in-memory 0.85B int8 model's RSS 2937 MiB against 2441 weight-only (the engine keeps
  more than its packed N*K: oneDNN holds the original weight for unpacking); the planner does not
  count any of it (``quantspec.TensorQuant.prepared_nbytes`` has no dynamic term).
- ``TIERKV_FUSE_LINEARS`` (``_select.fuse_linears``; default "1": 16-bit and quantized weights, "quant"
  quantized weights only, "0" none): q/k/v and gate/up as one linear
  each (``FUSED_LINEARS``; ``model.attention``/``model.mlp`` split the output) where that leaves one
  copy: 16-bit weights back to back in a layer's store buffer become one strided view;
  ``dynamic_int8`` groups are packed together; in a dict that owns its tensors (``owned``: the
  in-memory resident model) any pack is concatenated and its parts become row slices of it.
  Weight-only packs in a store buffer stay separate (data and qparams interleave there: fusing
  would copy the weights). The parts stay in the dict, unprepared (derived per call if used),
  except owned ``dynamic_int8`` groups (dropped: the packed copy is the weight).
  Measured (bench_quant, 2 threads): a few percent at most, the calls' overhead; the op time per
  weight byte is the same at N = 3072 or 11264 as at the separate widths.

Shapes: x (..., K) with any leading dims, M = their product; weight (N, K) in groups of
``group_size`` along K, G = K / group_size; qparams (G, N, 2) float16 [scale, minimum].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tierkv.errors import ArgumentError
from tierkv.kernels import quant_cpu
from tierkv.kernels.cpu_gemv import quant_gemv_kernel, run_quant_gemv
from tierkv.kernels.cpu_qgemv import QGemvKernel
from tierkv.kernels.dense_linear import compiled_gemv_wanted
from tierkv.kernels.quant_cpu import DynamicInt8Linear, dynamic_ok as _dynamic_ok, dynamic_linear as _dynamic_linear
from tierkv.kernels._select import cdiv, fuse_linears, jit, pick_backend, pick_cpu_qlinear, tl
from tierkv.kernels.quant_torchao import Da8w4Linear, da8w4_mm, da8w4_ok, pack_da8w4, require_da8w4
from tierkv.kernels.quant_reference import dequantize_weight_plain, pack_nibbles, quant_linear_ref, \
    quantize_weight_codes
from tierkv.quantspec import CHANNEL, QuantWeight, TensorQuant, WeightQuant, check_divides, group_len

__all__ = ["CPU_DEQUANT_MIN_M", "DEQUANT_MIN_M", "DYNAMIC_MAX_M", "FUSED_LINEARS", "PACKED_LINEARS", "DynamicInt8Linear",
           "Da8w4Linear", "dequantize_fwd",
           "dequantize_rows", "dequantize_weight", "layer_nbytes", "linear_path", "pack_weight", "prepare",
           "prepare_layer", "quant_linear", "quant_matmul_fwd", "quantize_weight"]

# Batches of at least this many rows take dequantize-then-cuBLAS instead of the fused Triton
# matmul (prefill; decode is M = 1). UNMEASURED until a GPU run: scripts/bench_quant_kernels.py
# --device cuda times both paths at M = 1, 16, 64, 256; set this from its crossover.
DEQUANT_MIN_M = 64
# The same switch for the cpu_int4 pack, per input dtype. PyTorch's op is vectorised for bf16
# only; its fp32/fp16 paths cost ~25-35 ms per row of a 5632x2048 weight on the 2-core test
# machine, so fp32/fp16 batches dequantize from M = 2. bf16, first readings of
# scripts/bench_quant_kernels.py on that machine (noisy: other jobs ran): the fused int4 op wins
# clearly at M <= 4 (e.g. 1.0 vs 11 ms at M = 4), dequantize (~10-20 ms) + F.linear wins from
# M = 16-64 on most shapes, so bf16 switches at 32. Re-measure on a quiet machine.
CPU_DEQUANT_MIN_M = {torch.bfloat16: 32, torch.float32: 2, torch.float16: 2}
_DTYPES = quant_cpu.OP_DTYPES
_TILE_GROUPS = (128, 64, 32)  # Triton K steps for a per-channel plain weight (powers of two)
_CPU_PACKS = ("cpu_int4", "cpu_int8")
_DEQUANT_ROWS = 256           # rows per step of the CPU dequantize (fp32 scratch of 256 x K: ~2 MB at K = 2048)
# DynamicInt8Linear: batches below this many rows round x to 8 bits (per tensor: one scale over the
# rows, so a long prefill would share one); larger ones run the weight-only path of each part.
DYNAMIC_MAX_M = 32
# fused linear -> the layer linears it concatenates along N, in output order (keys without ".weight")
FUSED_LINEARS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


# ---------------------------------------------------------------------------------------------
# Triton


@jit
def _dequant_tile(codes, scale, minimum, dtype: tl.constexpr):
    """``codes * scale + minimum`` in fp32 (scale/minimum broadcast per output row), rounded to ``dtype``."""
    return (codes.to(tl.float32) * scale + minimum).to(dtype)


@jit
def _quant_matmul_kernel(
    x_ptr, w_ptr, qp_ptr, bias_ptr, out_ptr,
    M, N, K,
    s_xm, s_xk, s_wn, s_wk, s_qg, s_qn, s_qc, s_om, s_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)): one program = one output tile; each K step is one
    # quantization group (GROUP inputs sharing one scale and minimum per output row). int4 bytes are
    # loaded once as a (GROUP/2, BLOCK_N) tile and split into the even-k and odd-k codes, each
    # multiplied with the matching (strided) half of x's group.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * s_xm                        # (BLOCK_M, 1)
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * s_wn                        # (1, BLOCK_N)
    dtype = tl.float32 if UPCAST else x_ptr.dtype.element_ty                    # the interpreter's 16-bit dots are
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)                              # wrong: fp32 there, same rounding
    for g in range(0, K // GROUP):
        k0 = g * GROUP
        params = qp_ptr + g * s_qg + offs_n * s_qn
        scale = tl.load(params, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        minimum = tl.load(params + s_qc, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if BITS == 4:
            offs_j = tl.arange(0, GROUP // 2)
            byte = tl.load(w_cols + (k0 // 2 + offs_j)[:, None] * s_wk, mask=n_ok[None, :], other=0)  # (GROUP/2, BN)
            x_even = tl.load(x_rows + (k0 + 2 * offs_j)[None, :] * s_xk, mask=m_ok[:, None], other=0.0)
            x_odd = tl.load(x_rows + (k0 + 2 * offs_j + 1)[None, :] * s_xk, mask=m_ok[:, None], other=0.0)
            w_even = _dequant_tile(byte & 0xF, scale, minimum, x_ptr.dtype.element_ty).to(dtype)
            w_odd = _dequant_tile(byte >> 4, scale, minimum, x_ptr.dtype.element_ty).to(dtype)
            acc += tl.dot(x_even.to(dtype), w_even, input_precision=DOT_PRECISION)
            acc += tl.dot(x_odd.to(dtype), w_odd, input_precision=DOT_PRECISION)
        else:
            offs_k = tl.arange(0, GROUP)
            codes = tl.load(w_cols + (k0 + offs_k)[:, None] * s_wk, mask=n_ok[None, :], other=0)  # (GROUP, BN)
            x = tl.load(x_rows + (k0 + offs_k)[None, :] * s_xk, mask=m_ok[:, None], other=0.0)  # (BLOCK_M, GROUP)
            w = _dequant_tile(codes, scale, minimum, x_ptr.dtype.element_ty).to(dtype)
            acc += tl.dot(x.to(dtype), w, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None].to(tl.int64) * s_om + offs_n[None, :] * s_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@jit
def _dequant_kernel(
    w_ptr, qp_ptr, out_ptr, N,
    s_wn, s_wk, s_qg, s_qn, s_qc, s_on, s_ok,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid (cdiv(N, BLOCK_N), G): one program = BLOCK_N rows of one quantization group, written as a
    # (BLOCK_N, GROUP) tile of the (N, K) output, contiguous along K (int4: the low and high nibbles
    # of each byte interleaved back into k order).
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = w_ptr + offs_n[:, None].to(tl.int64) * s_wn                          # (BLOCK_N, 1)
    params = qp_ptr + g * s_qg + offs_n * s_qn
    scale = tl.load(params, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    minimum = tl.load(params + s_qc, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    dtype = out_ptr.dtype.element_ty
    if BITS == 4:
        offs_j = tl.arange(0, GROUP // 2)
        byte = tl.load(rows + (g * (GROUP // 2) + offs_j)[None, :] * s_wk, mask=n_ok[:, None], other=0)
        w = tl.interleave(_dequant_tile(byte & 0xF, scale, minimum, dtype),
                          _dequant_tile(byte >> 4, scale, minimum, dtype))      # (BLOCK_N, GROUP)
    else:
        codes = tl.load(rows + (g * GROUP + tl.arange(0, GROUP))[None, :] * s_wk, mask=n_ok[:, None], other=0)
        w = _dequant_tile(codes, scale, minimum, dtype)
    out = out_ptr + offs_n[:, None].to(tl.int64) * s_on + (g * GROUP + tl.arange(0, GROUP))[None, :] * s_ok
    tl.store(out, w, mask=n_ok[:, None])


def quant_matmul_fwd(x2: torch.Tensor, data: torch.Tensor, qparams: torch.Tensor, bits: int, group_size: int,
                     bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """Launch ``_quant_matmul_kernel``: x2 (M, K), plain data (N, K/2 or K) uint8, qparams (G, N, 2),
    bias (N,) or None, out (M, N) in x2's dtype."""
    M, K = x2.shape
    N = qparams.shape[1]
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 32 if M <= 16 else 64                         # narrow tiles: more programs for decode
    upcast = x2.device.type == "cpu" and x2.dtype != torch.float32
    _quant_matmul_kernel[(cdiv(M, block_m), cdiv(N, block_n))](
        x2, data, qparams, bias if bias is not None else x2, out, M, N, K,
        *x2.stride(), *data.stride(), *qparams.stride(), *out.stride(),
        BITS=bits, GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 or upcast else None, UPCAST=upcast,  # fp32: no TF32
    )


def dequantize_fwd(data: torch.Tensor, qparams: torch.Tensor, bits: int, group_size: int,
                   out: torch.Tensor) -> None:
    """Launch ``_dequant_kernel``: plain data (N, K/2 or K) uint8, qparams (G, N, 2) -> out (N, K)."""
    G, N, _ = qparams.shape
    block_n = 64
    _dequant_kernel[(cdiv(N, block_n), G)](
        data, qparams, out, N, *data.stride(), *qparams.stride(), *out.stride(),
        BITS=bits, GROUP=group_size, BLOCK_N=block_n,
    )


# ---------------------------------------------------------------------------------------------
# public


def quantize_weight(w: torch.Tensor, tq: TensorQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (data, qparams), the stored tensors of ``tq`` (``TensorQuant.stored``).

    The codes and qparams of ``quant_reference.quantize_weight_codes`` (G = 1 per channel), packed
    by ``pack_weight``.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ArgumentError(f"quantize_weight takes a 2-D float (N, K) weight, got {w.dtype} {tuple(w.shape)}")
    check_divides("weight", tuple(w.shape), WeightQuant(tq.scheme, tq.group_size))
    on_cpu = tq.pack in _CPU_PACKS
    codes, qparams = quantize_weight_codes(w.detach().cpu() if on_cpu else w, tq.bits,
                                           group_len(tq.group_size, w.shape[1]))
    return pack_weight(codes, qparams, tq)


def pack_weight(codes: torch.Tensor, qparams: torch.Tensor, tq: TensorQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """Ready codes (N, K) uint8 < 2**bits and qparams (G, N, 2) float16 [scale, minimum] -> (data, qparams),
    the stored tensors of ``tq`` (``TensorQuant.stored``), for codes that did not come from ``quantize_weight``
    (a GGUF file's blocks, ``tierkv.io.gguf_blocks``).

    plain: int4 two codes per byte (low nibble = even k), int8 the codes. cpu_int4: the tinygemm
    layout of this process (``quant_cpu.cpu_layout()``): int4 (N, K/2), int8 (2, N, K/2) as the hi
    and lo nibble planes. cpu_int8: (N, K), the bits of q - 128. The CPU packs are built on the CPU.
    """
    _check_codes(codes, qparams, tq)
    if tq.pack in _CPU_PACKS:
        codes, qparams = codes.cpu(), qparams.cpu()
    if tq.pack == "cpu_int8":
        data = quant_cpu.int8_channel_codes(codes)
    elif tq.pack == "cpu_int4":
        data = quant_cpu.pack_codes(codes) if tq.bits == 4 else \
            torch.stack((quant_cpu.pack_codes(codes >> 4), quant_cpu.pack_codes(codes & 0x0F)))
    else:
        data = pack_nibbles(codes) if tq.bits == 4 else codes
    want = tq.stored(tuple(codes.shape))
    assert (str(data.dtype).removeprefix("torch."), tuple(data.shape)) == want[""], (data.dtype, data.shape, want)
    return data, qparams


def _check_codes(codes: torch.Tensor, qparams: torch.Tensor, tq: TensorQuant) -> None:
    """ArgumentError unless codes (N, K) uint8 < 2**bits and qparams (G, N, 2) float16 fit ``tq``."""
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ArgumentError(f"pack_weight takes (N, K) uint8 codes, got {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    check_divides("weight", (n, k), WeightQuant(tq.scheme, tq.group_size))
    want = (k // group_len(tq.group_size, k), n, 2)
    if tuple(qparams.shape) != want or qparams.dtype != torch.float16:
        raise ArgumentError(f"qparams of a ({n}, {k}) {tq.scheme} weight in groups of {group_len(tq.group_size, k)} "
                            f"must be {want} float16 [scale, minimum], got {qparams.dtype} {tuple(qparams.shape)}")
    if tq.bits < 8 and codes.numel() and int(codes.max()) >= 1 << tq.bits:
        raise ArgumentError(f"{tq.scheme} codes must be below {1 << tq.bits}, got {int(codes.max())}: "
                            "pack them as int8, or quantize again")


def dequantize_weight(qw: QuantWeight, dtype: torch.dtype = torch.float32, backend: str | None = None) -> torch.Tensor:
    """The (N, K) weight of ``qw`` in ``dtype`` (fp32 math): ``q * scale + minimum``.

    plain: the Triton ``_dequant_kernel`` where ``pick_backend`` picks Triton, else the reference.
    cpu_int4: the codes unpacked from the tinygemm layout (``quant_cpu.unpack_codes``); cpu_int8:
    the codes are the stored bytes ^ 0x80.
    """
    n, k = qw.shape
    tq = qw.quant
    if tq.pack == "plain":
        tiled = _triton_groups(qw)
        if tiled is not None and pick_backend(_dequant_kernel, qw.data, qw.qparams, backend=backend) == "triton":
            out = torch.empty(n, k, dtype=dtype, device=qw.device)
            dequantize_fwd(qw.data, tiled[0], tq.bits, tiled[1], out)
            return out
        return dequantize_weight_plain(qw.data, qw.qparams, tq.bits, dtype)
    if tq.pack == "cpu_int8":
        return _dequantize_codes(quant_cpu.int8_channel_codes(qw.data), qw.qparams, k, dtype)
    if tq.bits == 4:
        codes = quant_cpu.unpack_codes(qw.data, n, k)
    else:
        codes = quant_cpu.unpack_codes(qw.data[0], n, k) * 16 + quant_cpu.unpack_codes(qw.data[1], n, k)
    return _dequantize_codes(codes, qw.qparams, tq.group_size, dtype)


def dequantize_rows(qw: QuantWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` (any shape, int64) of a ``plain`` (N, K) weight -> (*ids.shape, K) in ``dtype``: an embedding
    lookup gathering only those rows' codes and (scale, minimum) pairs, then the reference's fp32 math, so
    it equals ``dequantize_weight(qw, dtype)[ids]`` bit for bit."""
    if qw.quant.pack != "plain":
        raise ArgumentError(f"row lookups read the plain pack, not {qw.quant.pack}; store the embedding plain "
                            "(io.store.plan_layout does)")
    k = qw.shape[1]
    flat = ids.reshape(-1)
    rows = dequantize_weight_plain(qw.data[flat], qw.qparams[:, flat], qw.quant.bits, dtype)   # (M, K)
    return rows.view(*ids.shape, k)


def _dequantize_codes(codes: torch.Tensor, qparams: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) uint8 codes -> (N, K) ``q * scale + minimum`` in ``dtype``, the reference's fp32 math and rounding,
    ``_DEQUANT_ROWS`` rows at a time so the fp32 temporaries stay in cache (~14x faster than whole on 2 cores)."""
    n, k = codes.shape
    params = qparams.transpose(0, 1).float()                                    # (N, G, 2)
    out = torch.empty(n, k, dtype=dtype, device=codes.device)
    scratch = torch.empty(min(n, _DEQUANT_ROWS), k // group_size, group_size, device=codes.device)
    for r0 in range(0, n, _DEQUANT_ROWS):
        r1 = min(n, r0 + _DEQUANT_ROWS)
        tile = scratch[: r1 - r0]
        tile.copy_(codes[r0:r1].view(r1 - r0, -1, group_size))
        tile.mul_(params[r0:r1, :, 0:1]).add_(params[r0:r1, :, 1:2])
        out[r0:r1].copy_(tile.view(r1 - r0, k))
    return out


def _triton_groups(qw: QuantWeight) -> tuple[torch.Tensor, int] | None:
    """(qparams, group) the Triton kernels read for a plain weight: its own, or for a per-channel one a
    stride-0 (K/group, N, 2) view of its one group with group the largest of ``_TILE_GROUPS`` dividing K
    (None when none does: the reference computes it)."""
    if qw.quant.group_size != CHANNEL:
        return qw.qparams, qw.quant.group_size
    n, k = qw.shape
    fits = [g for g in _TILE_GROUPS if k % g == 0]
    return (qw.qparams.expand(k // fits[0], n, 2), fits[0]) if fits else None


def prepare(qw: QuantWeight, dtype: torch.dtype) -> QuantWeight:
    """``qw`` with its CPU op parameters derived once for compute ``dtype`` (``QuantWeight.prepared``), for
    weights placed to stay (resident and host-tier layers); plain packs and other dtypes need none:
    ``qw`` itself. ``quant_linear`` gives the same bits with or without (it derives the same way per call)."""
    if qw.quant.pack not in _CPU_PACKS or dtype not in _DTYPES or qw.device.type != "cpu":
        return qw
    return QuantWeight(qw.data, qw.qparams, qw.quant, quant_cpu.op_params(qw.qparams, dtype, qw.quant.bits,
                                                                          qw.quant.pack))


def prepare_layer(tensors: dict[str, Any], dtype: torch.dtype, qlinear: str | None = None,
                  fuse: bool | None = None, owned: bool = False) -> dict[str, Any]:
    """A layer's (or the globals') weight dict made ready to stay, in place: every ``QuantWeight``
    ``prepare``d for ``dtype``; with ``fuse`` (default ``$TIERKV_FUSE_LINEARS``: every kind) the ``FUSED_LINEARS``
    added where no second copy results; with ``qlinear`` (default ``$TIERKV_CPU_QLINEAR``) "dynamic_int8"
    cpu_int8 weights on the CPU as ``DynamicInt8Linear``, "torchao" (or "auto", see ``_packed_kind``) int4
    ones as ``Da8w4Linear`` (fused groups packed together).

    owned: the dict's tensors are its own allocations (not views of a store buffer), so a fused weight
    may be a new tensor whose row slices replace its parts (one copy in the end, any pack).
    """
    kind = _packed_kind(pick_cpu_qlinear(qlinear), tensors, owned)
    mode = fuse_linears(fuse)
    if mode != "none":
        for fused, parts in FUSED_LINEARS.items():
            _fuse_group(tensors, fused, parts, kind, owned, sixteen=mode == "all")
    grouped = {f"{p}.weight" for fused, parts in FUSED_LINEARS.items() if f"{fused}.weight" in tensors
               for p in parts}
    for key, value in tensors.items():
        if isinstance(value, QuantWeight) and key not in grouped:     # a fused group's parts: per call if used
            tensors[key] = prepare(value, dtype)
    if kind is not None:
        ok, pack = _PACKERS[kind]
        for key, value in tensors.items():
            if key not in grouped and ok(value):
                tensors[key] = pack((value,), keep=not owned)
    return tensors


def _packed_kind(choice: str, tensors: dict[str, Any], owned: bool) -> str | None:
    """The packed linears ``prepare_layer`` makes: "dynamic_int8", "torchao" or None (weight-only, also
    what "auto" means: resident layers then compute exactly as streamed ones). "torchao" asked for when
    the kernel is missing or fails ``check_da8w4`` raises ArgumentError naming the fix."""
    if choice == "dynamic_int8":
        return choice if quant_cpu.dynamic_int8_engine() is not None else None
    if choice != "torchao" or not any(da8w4_ok(v) for v in tensors.values()):
        return None
    require_da8w4()
    return choice


def layer_nbytes(tensors: dict[str, Any]) -> int:
    """Bytes of a ``prepare_layer``d dict, each weight once: a fused 16-bit or weight-only entry shares its
    parts' memory (not counted again); a ``PACKED_LINEARS`` entry adds its ``extra_nbytes`` (and its parts
    when they are no longer in the dict). Prepared op parameters are not counted (``QuantWeight.nbytes``)."""
    total = 0
    for key, value in tensors.items():
        fused = key.endswith(".weight") and key.removesuffix(".weight") in FUSED_LINEARS
        if isinstance(value, PACKED_LINEARS):
            total += value.extra_nbytes + (0 if fused else sum(p.nbytes for p in value.parts))
        elif not fused:
            total += value.nbytes
    return total


def _dynamic_dequantized(dyn: DynamicInt8Linear, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) weight in ``dtype`` from the packed copy: the weight-only path's codes and math."""
    qint = torch.ops.quantized.linear_unpack(dyn.packed)[0]                     # (N, K) qint8 of q - 128
    codes = quant_cpu.int8_channel_codes(qint.int_repr().view(torch.uint8))     # (N, K) uint8 q
    return _dequantize_codes(codes, dyn.qparams, dyn.k, dtype)


PACKED_LINEARS = (DynamicInt8Linear, Da8w4Linear)    # prepared linears that hold a packed copy of their weights
_PACKERS = {"dynamic_int8": (_dynamic_ok, _dynamic_linear), "torchao": (da8w4_ok, pack_da8w4)}  # (takes, packs)


def _fuse_group(tensors: dict[str, Any], fused: str, parts: tuple[str, ...], kind: str | None, owned: bool,
                sixteen: bool = True) -> None:
    """Add ``fused``.weight (and .bias) to ``tensors`` when every part is there and fusing leaves one copy:
    16-bit weights back to back in memory (a view; only with ``sixteen``); parts that the packed ``kind``
    takes (packed together); with ``owned``, any parts of one kind (concatenated; the parts become row slices)."""
    keys = [f"{p}.weight" for p in parts]
    weights = [tensors.get(key) for key in keys]
    biases = [tensors.get(f"{p}.bias") for p in parts]
    if any(w is None for w in weights) or (any(b is None for b in biases) and not all(b is None for b in biases)):
        return
    ok, pack = _PACKERS.get(kind or "", (None, None))
    if ok and pack and all(ok(w) for w in weights) and len({(w.shape[1], w.quant) for w in weights}) == 1:
        tensors[f"{fused}.weight"] = pack(tuple(weights), keep=not owned)
        for key in keys if owned else ():             # the packed copy serves every batch: one copy held
            del tensors[key]
    elif all(isinstance(w, torch.Tensor) for w in weights):
        if not sixteen:
            return
        view = _adjacent_rows(weights)
        if view is None and owned and _same_kind(weights):
            view = torch.cat(weights)                                           # (sum N, K)
            rows = [0] + [w.shape[0] for w in weights]
            for i, key in enumerate(keys):
                tensors[key] = view[sum(rows[: i + 1]): sum(rows[: i + 2])]
        if view is None:
            return
        tensors[f"{fused}.weight"] = view
    elif owned and all(isinstance(w, QuantWeight) for w in weights) and _quant_concatenates(weights):
        tensors[f"{fused}.weight"], slices = _cat_quant(weights)
        tensors.update(zip(keys, slices))
    else:
        return
    if biases[0] is not None:
        tensors[f"{fused}.bias"] = torch.cat(biases)


def _same_kind(weights: list[torch.Tensor]) -> bool:
    first = weights[0]
    return all(w.dim() == 2 and w.shape[1] == first.shape[1] and w.dtype == first.dtype and w.device == first.device
               for w in weights)


def _quant_concatenates(weights: list[QuantWeight]) -> bool:
    """Same scheme, pack, K and device, and (cpu_int4) a layout in which packed planes concatenate."""
    first = weights[0]
    if any(w.quant != first.quant or w.shape[1] != first.shape[1] or w.device != first.device for w in weights):
        return False
    return first.quant.pack != "cpu_int4" or quant_cpu.rows_concatenate([w.shape[0] for w in weights])


def _cat_quant(weights: list[QuantWeight]) -> tuple[QuantWeight, list[QuantWeight]]:
    """Quantized (N_i, K) weights -> the (sum N, K) one (data and qparams concatenated along N) and each
    part as row slices of it (prepared: none, derived per call if ever used alone)."""
    n_dim = 1 if weights[0].data.dim() == 3 else 0                          # cpu_int4 int8: (2, N, K/2) planes
    data = torch.cat([w.data for w in weights], dim=n_dim)
    qparams = torch.cat([w.qparams for w in weights], dim=1)                  # (G, sum N, 2)
    fused = QuantWeight(data, qparams, weights[0].quant)
    slices, start = [], 0
    for w in weights:
        n = w.shape[0]
        part = data.narrow(n_dim, start, n)
        slices.append(QuantWeight(part, qparams[:, start:start + n], w.quant))
        start += n
    return fused, slices


def _adjacent_rows(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """One (sum N, K) view over contiguous (N_i, K) tensors of one dtype that follow each other in memory,
    else None."""
    first = weights[0]
    k = first.shape[1]
    end = first.data_ptr()
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k or w.dtype != first.dtype or not w.is_contiguous() or \
                w.device != first.device or w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or \
                w.data_ptr() != end:
            return None
        end += w.numel() * w.element_size()
    rows = sum(w.shape[0] for w in weights)
    return first.as_strided((rows, k), (k, 1), first.storage_offset())


def linear_path(x: torch.Tensor, qw: QuantWeight | DynamicInt8Linear | Da8w4Linear, backend: str | None = None) -> str:
    """Which implementation ``quant_linear(x, qw, backend=backend)`` runs (listed in the module docstring)."""
    return _choose(x, qw, backend)[0]


def _choose(x: torch.Tensor, qw: QuantWeight | DynamicInt8Linear | Da8w4Linear, backend: str | None
            ) -> tuple[str, QGemvKernel | None]:
    """(``linear_path``'s answer, the built C++ kernel of a "cpu_gemv", else None)."""
    m = x.numel() // max(1, x.shape[-1])
    if isinstance(qw, Da8w4Linear):
        return ("cpu_da8w4" if m < DYNAMIC_MAX_M or not qw.parts else "cpu_dequant"), None
    if isinstance(qw, DynamicInt8Linear):
        return ("cpu_dynamic" if m < DYNAMIC_MAX_M else "cpu_dequant"), None
    if qw.quant.pack in _CPU_PACKS:
        n, k = qw.shape
        kernel = quant_gemv_kernel(qw, x.dtype) if m == 1 and compiled_gemv_wanted(n * k) else None
        if kernel is not None:
            return "cpu_gemv", kernel
        return ("cpu_dequant" if m >= CPU_DEQUANT_MIN_M.get(x.dtype, 1) else "cpu_fused"), None
    if _triton_groups(qw) is None or \
            pick_backend(_quant_matmul_kernel, x, qw.data, qw.qparams, backend=backend) == "torch":
        return "torch", None
    return ("triton_dequant" if m >= DEQUANT_MIN_M else "triton_fused"), None


def quant_linear(x: torch.Tensor, qw: QuantWeight | DynamicInt8Linear | Da8w4Linear, bias: torch.Tensor | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a quantized (N, K) weight, without a 16-bit copy of W where it can.

    x:       (..., K) float32, bfloat16 or float16, any leading dims (M = their product, 0 included).
    qw:      the stored weight (``quantspec.QuantWeight``), on x's device, or one of ``PACKED_LINEARS``.
    bias:    optional (N,), cast to x's dtype.
    backend: "torch" | "triton" | "auto" | None, for the plain pack (see the module docstring).
    Returns (..., N) in x's dtype.
    """
    n, k = qw.shape
    bias = _check_linear_args(x, qw, bias)
    x2 = x.reshape(-1, k).contiguous()                                          # (M, K)
    path, kernel = _choose(x2, qw, backend)
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n)
    if isinstance(qw, PACKED_LINEARS):
        if path == "cpu_da8w4":
            out = da8w4_mm(x2, qw)
        elif path == "cpu_dynamic":
            out = quant_cpu.int8_dynamic_mm(x2, qw.packed, qw.center, qw.reduce_range)
        elif qw.parts:
            out = torch.cat([quant_linear(x2, part) for part in qw.parts], dim=-1)
        else:
            out = F.linear(x2, _dynamic_dequantized(qw, x.dtype))
        out = out if bias is None else out.add_(bias)
    elif path == "cpu_gemv":
        assert kernel is not None
        out = run_quant_gemv(kernel, qw, x2[0]).view(1, n)
        out = out if bias is None else out.add_(bias)
    elif path == "cpu_fused":
        out = quant_cpu.cpu_quant_matmul(x2, qw.data, qw.qparams, qw.quant.bits, qw.quant.group_size, qw.quant.pack,
                                         qw.prepared)
        out = out if bias is None else out.add_(bias)
    elif path == "triton_fused":
        out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
        tiled = _triton_groups(qw)
        assert tiled is not None
        qparams, group = tiled
        quant_matmul_fwd(x2, qw.data, qparams, qw.quant.bits, group, bias, out)
    elif path == "torch":
        out = quant_linear_ref(x2, qw.data, qw.qparams, qw.quant.bits, bias)
    else:  # "cpu_dequant" | "triton_dequant": a scratch (N, K) weight in x's dtype, then a dense GEMM
        out = F.linear(x2, dequantize_weight(qw, x.dtype, backend="triton" if path == "triton_dequant" else None),
                       bias)
    return out.view(*x.shape[:-1], n)


def _check_linear_args(x: torch.Tensor, qw: QuantWeight | DynamicInt8Linear | Da8w4Linear,
                       bias: torch.Tensor | None) -> torch.Tensor | None:
    """ArgumentError for inputs a caller got wrong; returns the bias in x's dtype."""
    n, k = qw.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ArgumentError(f"x {tuple(x.shape)} does not fit a quantized ({n}, {k}) weight: its last dim must be {k}")
    if x.dtype not in _DTYPES:
        raise ArgumentError(f"quantized linear layers take float32, bfloat16 or float16 inputs, got {x.dtype}")
    if x.device != qw.device:
        raise ArgumentError(f"x is on {x.device} but the quantized weight on {qw.device}: move one of them")
    pack = "cpu_int8" if isinstance(qw, DynamicInt8Linear) else "cpu_int4" if isinstance(qw, Da8w4Linear) \
        else qw.quant.pack
    if pack in _CPU_PACKS and x.device.type != "cpu":
        raise ArgumentError(f"the {pack} pack computes on the CPU only, not on {x.device}; convert the model "
                            "again for this device (it gets the plain pack)")
    if bias is None:
        return None
    if bias.shape != (n,) or bias.device != x.device:
        raise ArgumentError(f"bias must be ({n},) on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    return bias.to(x.dtype)
