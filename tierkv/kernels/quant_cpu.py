"""The CPU packs: PyTorch's tinygemm layout (``cpu_int4``) and its int8 channel form (``cpu_int8``).

Why this module exists: on the CPU the fastest quantized matmul tierkv can call is the one PyTorch
ships, ``torch.ops.aten._weight_int4pack_mm_for_cpu``, and it reads weights only in the layout of
``torch.ops.aten._convert_weight_to_int4pack_for_cpu``. This module owns everything about that
layout: packing plain codes into it (at convert time, so nothing is repacked per token), the
op's scales-and-zeros tensor (``op_params``: derived from the stored qparams once when a weight is
placed to stay, ``quant.prepare``, else per call: G*N*2 values, one small matmul, still a sizeable
share of a 5632x2048 int4 matvec on 2 cores), the int8 scheme as two int4 planes, and unpacking
the layout back into codes.

``cpu_int8`` (int8 with one group per output row) runs ``torch.ops.aten._weight_int8pack_mm(x,
w_int8, scales)``, which computes ``x @ (w_int8 * scale)^T`` per output channel with no zero point.
With ``w = s*(q - 128) + (minimum + 128 s)`` the asymmetric minimum is a rank-1 correction:
``y = int8pack_mm(x, q - 128, s) + rowsum(x) (outer) (minimum + 128 s)``. The stored bytes are the
bits of ``q - 128`` (``q ^ 0x80``), read as int8. It reads 1 byte per weight once (the int4-plane
form of int8 runs two matmuls) and measured ~0.86 ms per 5632x2048 bf16 matvec with 48 distinct
weights in DRAM, 2 threads (bf16 ``F.linear`` 1.12 ms, two int4 planes 1.64 ms).

The op computes ``sum_k x_k * ((q - 8) * scale + zero)``. With tierkv's ``w = q*scale + minimum``
that is ``zero = minimum + 8*scale``. int8 codes are ``q = 16*hi + lo``: two int4 matmuls whose
outputs are summed, the hi plane with (scale 16s, zero minimum + 135.5s), the lo plane with
(s, 0.5s). That split puts the whole offset in the hi plane, so the lo plane's output is small:
each output is rounded to x's dtype, and a bf16 lo output as large as the hi one (the obvious split
(16s, 128s) + (s, minimum + 8s)) doubled the bf16 error.

Constraints of the op (checked by ``check_op_args``, torch 2.13): N divisible by 16 (the converter
refuses others: ``quantspec.choose_pack`` gives them ``plain``); group size 32, 64, 128 or 256
(tierkv's are 32/64/128); K divisible by the group size; x 2-D and contiguous (callers flatten
leading dims); x fp32, bf16 or fp16 with scales-and-zeros in x's dtype (mixed dtypes are
refused); any M, 0 included. Only the bf16 path is vectorised: on this 2-core AVX-512 machine the
fp32 and fp16 paths took ~25-35 ms per row of a 5632x2048 weight (bf16: ~1-8 ms at M=1), so
the wrapper dequantizes and calls ``F.linear`` for fp32/fp16 batches and larger bf16 ones
(``quant.CPU_DEQUANT_MIN_M``).

Accuracy against the fp32 reference (tests/test_quant_kernels.py): fp32 within 2e-5 of max |out|;
bf16 within 1e-2 (worst seen 0.5% int4, 0.7% int8: the op rounds its scales, zeros and each
plane's output to bf16; the bf16 reference itself is off by 0.3%).

The layout depends on the CPU capability the process dispatches to (``torch.backends.cpu.
get_cpu_capability()``: DEFAULT, AVX2, AVX512, settable with ATEN_CPU_CAPABILITY): rows come in
blocks of 64 (AVX512) or 32 (others), and within a full block AVX512 pairs row b with b+32 in
one byte, AVX2 row b with b+16, DEFAULT (and every partial block) rows 2j and 2j+1. A store packed
under one capability is wrong under another; ``cpu_layout()`` names the current one so callers
can record it. ``unpack_codes`` knows the three layouts (tests check each against the converter
in a subprocess per capability), so a plane packed under one can be repacked under another, and
reads any other layout of this process through the op itself.

Dynamic int8 activations (``pack_int8_dynamic``, ``int8_dynamic_mm``; opt-in, ``quant.prepare_layer``):
the weight-only ops above are compute-bound on 2 cores (int8 per channel ran at bf16's time,
int4 at half its bytes' rate). ``torch.ops.quantized.linear_dynamic`` quantizes x to 8 bits per
call (per tensor: over all M rows, asymmetric) and runs an int8 x int8 -> int32 GEMM (VNNI/AMX
through oneDNN or fbgemm, the "x86" engine), then applies the scales: the way llama.cpp computes on
CPUs. It needs the weight prepacked into the engine's own copy (N*K bytes or more: oneDNN also
keeps the original for unpacking), so it is for weights placed to stay. The cpu_int8 bytes ``q - 128`` with per-channel scale ``s``
are the symmetric weight it takes; the minimum is the same rank-1 correction as above. It changes
numerics (x rounded to 8 bits): ~0.7% of max |out| on random data against ~0.5% for the bf16
weight-only op (tests/test_quant_dynamic.py; model-level numbers: scripts/eval_quant_quality.py).
int4 and int8 in groups have no such op in PyTorch on x86 (per-group scales): weight-only only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from tierkv.errors import ArgumentError
from tierkv.quantspec import CPU_INT8_K_MULTIPLE, CPU_PACK_ROWS, QuantWeight

__all__ = ["OP_GROUP_SIZES", "OP_DTYPES", "check_op_args", "cpu_layout", "pack_codes", "scales_and_zeros",
           "int4pack_mm", "int8_channel_codes", "int8_channel_mm", "cpu_quant_matmul", "op_params", "unpack_codes",
           "dynamic_int8_engine", "pack_int8_dynamic", "int8_dynamic_mm", "rows_concatenate",
           "DynamicInt8Linear", "dynamic_ok", "dynamic_linear"]

OP_GROUP_SIZES = (32, 64, 128, 256)
OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK_N = {"AVX512": 64, "AVX2": 32, "DEFAULT": 32}    # rows per packed block, per capability
_PAIR_STRIDE = {"AVX512": 32, "AVX2": 16}                # full blocks: byte b holds rows b and b + stride
_IDENTITY_ROWS = 256                                      # rows of the identity per op call in the fallback


def cpu_layout() -> str:
    """The CPU capability that decides the tinygemm layout in this process ("AVX512", "AVX2", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes < 16 -> (N, K/2) uint8 in the tinygemm layout of this process."""
    n, k = codes.shape
    assert codes.dtype == torch.uint8 and k % 2 == 0, (codes.dtype, codes.shape)
    if n % CPU_PACK_ROWS:
        raise ArgumentError(f"the cpu_int4 pack needs the output dimension divisible by {CPU_PACK_ROWS}, got {n}; "
                            "use the plain pack for this weight (quantspec.choose_pack does)")
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


# [scale, minimum] @ _PLANE_MIX[plane] = the op's [scale, zero] (rows: scale, minimum)
_PLANE_MIX = {
    "int4": ((1.0, 8.0), (0.0, 1.0)),      # (s, minimum + 8s)
    "hi": ((16.0, 135.5), (0.0, 1.0)),     # (hi - 8) * 16s + zero = 16s*hi + minimum + 7.5s: w to within 7.5 steps
    "lo": ((1.0, 0.5), (0.0, 0.0)),        # (lo - 8) * s + 0.5s = s*lo - 7.5s: small, so its rounded output adds little
    "int8": ((1.0, 128.0), (0.0, 1.0)),    # cpu_int8: (s, center = minimum + 128s)
}


def scales_and_zeros(qparams: torch.Tensor, dtype: torch.dtype, plane: str = "int4") -> torch.Tensor:
    """(G, N, 2) float16 [scale, minimum] -> the op's (G, N, 2) [scale, zero] in ``dtype``, contiguous.

    plane: "int4" (the one plane of int4), "hi" or "lo" (the two planes of int8, q = 16*hi + lo).
    One fp32 (2, 2) matmul per call (fp32 so the zero ``minimum + c*s`` rounds once; ~1.6x faster
    than the per-column stack it replaced, same bits).
    """
    mix = torch.tensor(_PLANE_MIX[plane], dtype=torch.float32, device=qparams.device)
    return torch.matmul(qparams.float(), mix).to(dtype)


def int8_channel_codes(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes q -> the ``cpu_int8`` stored bytes: the bits of the int8 ``q - 128`` (and back)."""
    assert codes.dtype == torch.uint8 and codes.dim() == 2, (codes.dtype, codes.shape)
    if codes.shape[1] % CPU_INT8_K_MULTIPLE:
        raise ArgumentError(f"the cpu_int8 pack needs the input dimension divisible by {CPU_INT8_K_MULTIPLE}, got "
                            f"{codes.shape[1]}; use the plain pack for this weight (quantspec.choose_pack does)")
    return codes ^ 0x80


def op_params(qparams: torch.Tensor, dtype: torch.dtype, bits: int, pack: str) -> tuple[torch.Tensor, ...]:
    """The CPU op's parameters of a weight in compute ``dtype``, from its (G, N, 2) float16 qparams.

    cpu_int4 int4: (sz,), int8: (sz_hi, sz_lo), each (G, N, 2); cpu_int8: (scale (N,) in ``dtype``,
    center (N,) float32) with center = minimum + 128 * scale (kept fp32: the rank-1 correction is
    added in fp32, which halved the bf16 error against the reference).
    """
    if pack == "cpu_int8":
        assert qparams.shape[0] == 1, tuple(qparams.shape)
        sc = scales_and_zeros(qparams[0], torch.float32, "int8")              # (N, 2)
        return sc[:, 0].to(dtype).contiguous(), sc[:, 1].contiguous()     # the op ignores strides
    assert pack == "cpu_int4", pack
    if bits == 4:
        return (scales_and_zeros(qparams, dtype),)
    return scales_and_zeros(qparams, dtype, "hi"), scales_and_zeros(qparams, dtype, "lo")


def check_op_args(x2: torch.Tensor, n: int, k: int, group_size: int | None) -> None:
    """ArgumentError unless the op can run x2 (M, K) against a (N, K) weight in groups of ``group_size``
    (None: the per-channel int8 op, any N, K divisible by ``CPU_INT8_K_MULTIPLE``)."""
    if x2.device.type != "cpu":
        raise ArgumentError(f"the cpu_int4 pack computes on the CPU, but x is on {x2.device}; "
                            "convert the model for that device (the plain pack) or move x to the CPU")
    if x2.dtype not in OP_DTYPES:
        raise ArgumentError(f"quantized linear layers take float32, bfloat16 or float16 inputs, got {x2.dtype}")
    if group_size is None and k % CPU_INT8_K_MULTIPLE:
        raise ArgumentError(f"the CPU int8 matmul needs K divisible by {CPU_INT8_K_MULTIPLE}, got {k}: use the plain pack")
    if group_size is not None and (group_size not in OP_GROUP_SIZES or k % group_size or n % CPU_PACK_ROWS):
        raise ArgumentError(f"the CPU int4 matmul needs a group size in {OP_GROUP_SIZES} dividing K and N divisible "
                            f"by {CPU_PACK_ROWS}; got group {group_size}, (N, K) = ({n}, {k}): use the plain pack")
    assert x2.dim() == 2 and x2.shape[1] == k and x2.is_contiguous(), (tuple(x2.shape), k)


def int4pack_mm(x2: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) contiguous @ one packed int4 plane (N, K/2) with sz (G, N, 2) in x2's dtype -> (M, N)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, sz)


def int8_channel_mm(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) @ W^T for a cpu_int8 pack: data (N, K) uint8 (bits of q - 128), scale (N,) in x2's dtype,
    center (N,) float32 -> (M, N) in x2's dtype: ``int8pack_mm(x, q - 128, s) + rowsum(x) (outer) center``,
    the correction added in fp32."""
    out = torch.ops.aten._weight_int8pack_mm(x2, data.view(torch.int8), scale)   # (M, N)
    rowsum = x2.sum(dim=1, keepdim=True, dtype=torch.float32)                   # (M, 1)
    return torch.addmm(out.float(), rowsum, center.view(1, -1)).to(x2.dtype)


def cpu_quant_matmul(x2: torch.Tensor, data: torch.Tensor, qparams: torch.Tensor, bits: int, group_size: int,
                     pack: str = "cpu_int4", prepared: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """x2 (M, K) @ W^T for a CPU pack -> (M, N) in x2's dtype. cpu_int4: int4 data (N, K/2), int8 data
    (2, N, K/2); cpu_int8: data (N, K). ``prepared``: ``op_params`` in x2's dtype, or () to derive them."""
    n = qparams.shape[1]
    check_op_args(x2, n, x2.shape[-1], None if pack == "cpu_int8" else group_size)
    params = prepared if prepared and prepared[0].dtype == x2.dtype else op_params(qparams, x2.dtype, bits, pack)
    if pack == "cpu_int8":
        return int8_channel_mm(x2, data, *params)
    if bits == 4:
        return int4pack_mm(x2, data, group_size, params[0])
    assert bits == 8 and data.dim() == 3 and data.shape[0] == 2, (bits, tuple(data.shape))
    return int4pack_mm(x2, data[0], group_size, params[0]).add_(int4pack_mm(x2, data[1], group_size, params[1]))


def rows_concatenate(rows: list[int]) -> bool:
    """Whether cpu_int4 planes of these row counts, packed one by one, concatenated along N are the packing
    of the concatenated codes in this process's layout (every part but the last a whole number of blocks)."""
    block = _BLOCK_N.get(cpu_layout())
    return block is not None and all(n % block == 0 for n in rows[:-1])


def unpack_codes(packed: torch.Tensor, n: int, k: int, layout: str | None = None) -> torch.Tensor:
    """One packed plane (N, K/2) -> its (N, K) uint8 codes (< 16).

    layout: the ``cpu_layout()`` the plane was packed under (default: this process's), so a plane
    packed on another machine can be unpacked and packed again here (``pack_codes``).
    """
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8, (tuple(packed.shape), n, k)
    here = cpu_layout()
    layout = here if layout is None else layout
    if layout not in _BLOCK_N:
        if layout != here:
            raise ArgumentError(f"cannot read a cpu_int4 weight packed under CPU layout {layout!r} on this "
                                f"{here} machine; convert the model again here")
        return _codes_through_op(packed, n, k)
    block = _BLOCK_N[layout]
    flat = packed.reshape(-1)
    full = n // block
    parts = []
    if full:
        body = flat[: full * k * block // 2].view(full, k, block // 2)          # (NB, K, BLOCK/2)
        parts.append(_unpack_block(body, _PAIR_STRIDE.get(layout)))
    tail = n - full * block
    if tail:
        parts.append(_unpack_block(flat[full * k * block // 2:].view(1, k, tail // 2), None))
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def _unpack_block(body: torch.Tensor, pair_stride: int | None) -> torch.Tensor:
    """(NB, K, B/2) bytes of NB blocks of B rows -> (NB*B, K) codes.

    pair_stride None: byte j holds rows 2j (low nibble) and 2j+1; else rows j and j + pair_stride,
    which for full blocks is half the block (so the low nibbles are the first half of the rows).
    """
    low, high = body & 0x0F, body >> 4
    if pair_stride is None:
        rows = torch.stack((low, high), dim=-1).flatten(-2)                     # (NB, K, B)
    else:
        assert pair_stride == body.shape[-1], (pair_stride, tuple(body.shape))
        rows = torch.cat((low, high), dim=-1)                                   # (NB, K, B)
    return rows.transpose(1, 2).reshape(-1, body.shape[1])


def _codes_through_op(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Codes of an unknown layout, read through the op: identity rows, scale 1 and zero 8 give q exactly."""
    sz = torch.zeros(k // 32, n, 2, dtype=torch.bfloat16)                   # bf16: the vectorised path, exact here
    sz[..., 0], sz[..., 1] = 1.0, 8.0
    out = torch.empty(n, k, dtype=torch.uint8)
    for start in range(0, k, _IDENTITY_ROWS):
        rows = min(_IDENTITY_ROWS, k - start)
        eye = torch.zeros(rows, k, dtype=torch.bfloat16)
        eye[torch.arange(rows), start + torch.arange(rows)] = 1.0
        out[:, start:start + rows] = int4pack_mm(eye, packed, 32, sz).t().to(torch.uint8)
    return out


def dynamic_int8_engine() -> str | None:
    """The quantized engine ``pack_int8_dynamic`` packs for ("x86", else "fbgemm" or "onednn"), or None
    when this PyTorch has none (then only the weight-only ops run)."""
    if not hasattr(torch.ops.quantized, "linear_dynamic") or not hasattr(torch, "_make_per_channel_quantized_tensor"):
        return None
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm", "onednn") if e in engines), None)


def pack_int8_dynamic(data: torch.Tensor, scale: torch.Tensor) -> Any:
    """(N, K) uint8 cpu_int8 bytes (the bits of q - 128) and (N,) per-channel scales -> the engine's packed
    weight for ``int8_dynamic_mm`` (a copy: N*K bytes plus the engine's padding)."""
    engine = dynamic_int8_engine()
    if engine is None:
        raise ArgumentError("this PyTorch has no quantized dynamic linear (torch.ops.quantized.linear_dynamic); "
                            "use the weight-only CPU path (TIERKV_CPU_QLINEAR=weight_only)")
    n, k = data.shape
    assert data.dtype == torch.uint8 and scale.shape == (n,), (data.dtype, tuple(data.shape), tuple(scale.shape))
    previous = torch.backends.quantized.engine
    with warnings.catch_warnings():                     # quantized tensors are deprecated, the op is not replaced yet
        warnings.simplefilter("ignore")
        try:
            torch.backends.quantized.engine = engine    # the packed object remembers its engine; restored below
            qw = torch._make_per_channel_quantized_tensor(data.contiguous().view(torch.int8), scale.double(),
                                                          torch.zeros(n, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qw, None)
        finally:
            torch.backends.quantized.engine = previous


def int8_dynamic_mm(x2: torch.Tensor, packed: Any, center: torch.Tensor, reduce_range: bool = False) -> torch.Tensor:
    """x2 (M, K) @ W^T with x rounded to 8 bits per call: ``linear_dynamic(x, q - 128, s) + rowsum(x) (outer)
    center``, center (N,) float32 -> (M, N) in x2's dtype (fp32 inside: the op takes and returns fp32).
    reduce_range: 7-bit activations, for the fbgemm engine (its 16-bit pair sums can saturate)."""
    xf = x2.float()
    out = torch.ops.quantized.linear_dynamic(xf, packed, reduce_range)           # (M, N) fp32
    rowsum = xf.sum(dim=1, keepdim=True)                                          # (M, 1)
    return out.addmm_(rowsum, center.view(1, -1)).to(x2.dtype)


@dataclass(frozen=True)
class DynamicInt8Linear:
    """cpu_int8 weights (one, or a fused group along N) prepacked for ``int8_dynamic_mm``.

    ``center`` (N,) float32 = minimum + 128 * scale of every output row (the rank-1 correction);
    ``qparams`` (1, N, 2) float16 the parts' own, concatenated. Large batches run the weight-only math:
    on ``parts``, the stored weights in output order, or, when the layer owned them and they were
    dropped (``prepare_layer(owned=True)``: the packed copy is then the only one), on the codes
    unpacked from ``packed``.
    """

    packed: Any                       # the engine's packed (N, K) int8 weight (its own copy)
    center: torch.Tensor              # (N,) float32
    qparams: torch.Tensor             # (1, N, 2) float16 [scale, minimum]
    k: int
    parts: tuple[QuantWeight, ...]    # or () once dropped
    reduce_range: bool                # 7-bit activations (the fbgemm engine)

    @property
    def shape(self) -> tuple[int, int]:
        """The logical (N, K), N summed over the parts."""
        return self.center.numel(), self.k

    @property
    def device(self) -> torch.device:
        return self.center.device

    @property
    def extra_nbytes(self) -> int:
        """Bytes it holds beside its parts: the engine's int8 copy (N*K; what the engine adds to it, such as
        oneDNN's original kept for unpacking, is not visible here), center, qparams."""
        n, k = self.shape
        return n * k + self.center.numel() * self.center.element_size() + self.qparams.numel() * 2


def dynamic_ok(value: Any) -> bool:
    """A cpu_int8 (per channel) weight on the CPU: what ``DynamicInt8Linear`` packs."""
    return isinstance(value, QuantWeight) and value.quant.pack == "cpu_int8" and value.device.type == "cpu"


def dynamic_linear(parts: tuple[QuantWeight, ...], keep: bool = True) -> DynamicInt8Linear:
    """Pack cpu_int8 ``parts`` (same K) concatenated along N (a group's temporaries: one copy); ``keep``:
    hold the parts for large batches, else the unpacked codes serve them."""
    data = parts[0].data if len(parts) == 1 else torch.cat([p.data for p in parts])          # (N, K) uint8
    qparams = torch.cat([p.qparams for p in parts], dim=1)                                     # (1, N, 2)
    scale, minimum = qparams[0, :, 0].float(), qparams[0, :, 1].float()
    return DynamicInt8Linear(pack_int8_dynamic(data, scale), (minimum + 128.0 * scale).contiguous(),
                             qparams.contiguous(), data.shape[1], parts if keep else (),
                             dynamic_int8_engine() == "fbgemm")
