"""GGUF quantized blocks -> tierkv's group-wise codes and qparams, without going through 16-bit.

Why this module exists: a GGUF file's Q4_0/Q4_1/Q4_K weights already are 4-bit codes with a scale and
a minimum per 32 inputs, and Q5/Q6/Q8 codes fit 8 bits, so a converter can keep them compressed
(``w = q * scale + minimum`` with fp16 [scale, minimum] per group of 32 along K: tierkv's asymmetric
scheme, ``tierkv.quantspec``) instead of dequantizing to 16-bit and quantizing again. This module
decodes the block layouts (those of llama.cpp's ``gguf-py`` ``gguf/quants.py``, written here again
as whole-array numpy) into codes (N, K) uint8 and qparams (K/32, N, 2) float16, ready for
``tierkv.kernels.quant.pack_weight``. It computes in numpy (Q6_K's re-quantization calls tierkv's
own int8 rule, ``kernels.quant_reference``, on a zero-copy torch view) and needs the ``gguf``
package only for ``conversion_error``'s reference.

Per type (d, dmin: the block's fp16 scales; arithmetic of both sides in fp32):

- Q8_0 ``d*x``, x int8: int8 codes x + 128, scale d, minimum -128d. Bit-exact.
- Q4_0 ``d*(q-8)``: int4, scale d, minimum -8d; Q5_0 ``d*(q-16)``: int8 (codes < 32), minimum -16d.
  Bit-exact (a power-of-two multiple of an fp16 is an fp16; q*d and its difference are exact in fp32).
- Q4_1 ``d*q + m``: int4; Q5_1: int8 (codes < 32); scale d, minimum m as stored. Bit-exact.
- Q4_K ``(d*sc)*q - dmin*m`` per 32 of a 256 super-block (6-bit sc, m): int4, codes q; Q5_K the
  same with 5-bit q: int8. d*sc and dmin*m have up to 17 significant bits, fp16 holds 11, so the
  scale is rounded to fp16 and the minimum absorbs the scale's rounding at the middle code
  (``minimum = fp16(-dmin*m + c*(d*sc - scale))``, c = 7.5 / 15.5; this halves the error of
  rounding both on their own): per weight the error is at most ``|q - c| * |scale - d*sc|`` plus
  half an fp16 step of the minimum, i.e. at most about two fp16 steps of the group's largest
  |weight| (measured on llama.cpp-made files: <= 1.94 steps, <= 5.7e-4 of the group's range),
  below the bf16 rounding (up to 4 fp16 steps) of those largest weights themselves. Scales below
  fp16's normal range (6.1e-5) lose relative precision (fp16 subnormals).
- Q6_K ``d*s_j*(q-32)`` with a signed 8-bit s_j per 16 values: one 32-group holds two scales, which
  one fp16 scale cannot hold exactly (d*s_j has up to 18 significant bits and s_a/s_b is arbitrary),
  so each 32 is re-quantized from its exact fp32 values by tierkv's int8 rule (the same codes as
  dequantizing and quantizing with tierkv's int8 g32): error at most half a step of 1/255 of the
  group's range (1/510 = 1.96e-3) plus fp16 rounding of [scale, minimum], i.e. <= ~1/8 of Q6_K's own
  largest step in that group (its own rounding error is up to 1/2 step).

``GGUF_SCHEMES`` says which scheme and whether the conversion is bit-exact; ``conversion_error``
measures it against ``gguf.quants.dequantize`` (``scripts/eval_gguf_blocks.py``: per type, on real files).
Memory: rows are decoded ``_CHUNK_VALUES`` values at a time (whole rows, vectorized), so beyond the
output codes (N*K bytes) and qparams the temporaries stay a few MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, NamedTuple

import numpy as np

from tierkv.errors import ArgumentError

GROUP = 32                      # the tierkv group size every GGUF block type maps to
_CHUNK_VALUES = 1 << 21         # values decoded per step (whole rows; at least one row)
_K_CENTER = {"Q4_K": 7.5, "Q5_K": 15.5}     # middle code: where the scale's fp16 rounding is absorbed


class GGUFScheme(NamedTuple):
    """How one GGUF block type is stored in tierkv: scheme, group size, and whether bit-exact."""

    scheme: str                 # "int4" | "int8"
    group_size: int             # always GROUP
    exact: bool                 # codes*scale+minimum in fp32 equals gguf's dequantize bit for bit


GGUF_SCHEMES: dict[str, GGUFScheme] = {
    "Q8_0": GGUFScheme("int8", GROUP, True),
    "Q4_0": GGUFScheme("int4", GROUP, True),
    "Q4_1": GGUFScheme("int4", GROUP, True),
    "Q5_0": GGUFScheme("int8", GROUP, True),
    "Q5_1": GGUFScheme("int8", GROUP, True),
    "Q4_K": GGUFScheme("int4", GROUP, False),   # fp16 rounding of d*sc and dmin*m
    "Q5_K": GGUFScheme("int8", GROUP, False),   # fp16 rounding of d*sc and dmin*m
    "Q6_K": GGUFScheme("int8", GROUP, False),   # re-quantized per 32 from the exact fp32 values
}

# values per block, bytes per block (llama.cpp's block_q* structs; tests check gguf's GGML_QUANT_SIZES)
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "Q8_0": (32, 2 + 32), "Q4_0": (32, 2 + 16), "Q4_1": (32, 2 + 2 + 16), "Q5_0": (32, 2 + 4 + 16),
    "Q5_1": (32, 2 + 2 + 4 + 16), "Q4_K": (256, 2 + 2 + 12 + 128), "Q5_K": (256, 2 + 2 + 12 + 32 + 128),
    "Q6_K": (256, 128 + 64 + 16 + 2),
}


def type_name(ggml_type: str | Enum) -> str:
    """The ggml type's name ("Q4_K") from a name or a ``gguf.GGMLQuantizationType``."""
    if isinstance(ggml_type, Enum):
        return ggml_type.name
    if isinstance(ggml_type, str):
        return ggml_type.upper()
    raise ArgumentError(f"ggml type {ggml_type!r}: pass its name (\"Q4_K\") or a gguf.GGMLQuantizationType")


def gguf_scheme(ggml_type: str | Enum) -> GGUFScheme | None:
    """``GGUF_SCHEMES`` entry of a type (name or enum), None for types converted another way."""
    return GGUF_SCHEMES.get(type_name(ggml_type))


def blocks_to_groups(ggml_type: str | Enum, raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A quantized GGUF tensor's rows -> (codes (N, K) uint8, qparams (K/32, N, 2) float16 [scale, minimum]).

    raw: (N, row_bytes) uint8, the tensor's data as stored (a memmap is fine; read chunk by chunk);
    k: values per row (the tensor's K). ``w = codes * scale + minimum`` (``GGUF_SCHEMES`` says the
    scheme and whether it is exact). ArgumentError for an unknown type, a wrong row size, or block
    scales that are not finite in fp16.
    """
    name = type_name(ggml_type)
    decode = _DECODERS.get(name)
    if decode is None:
        raise ArgumentError(f"GGUF type {name} has no direct conversion (those with one: {', '.join(GGUF_SCHEMES)}); "
                            "dequantize it with gguf.quants.dequantize and quantize it with tierkv's int4/int8, "
                            "or keep it 16-bit")
    per_block, block_bytes = BLOCK_SIZES[name]
    raw = _check_raw(name, raw, k, per_block, block_bytes)
    n = raw.shape[0]
    codes = np.empty((n, k), dtype=np.uint8)
    qparams = np.empty((k // GROUP, n, 2), dtype=np.float16)
    step = max(1, _CHUNK_VALUES // max(1, k))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        blocks = np.ascontiguousarray(raw[r0:r1]).reshape(r1 - r0, k // per_block, block_bytes)
        c, qp = decode(blocks)                             # (R, K) uint8, (R, G, 2) float16
        codes[r0:r1] = c
        qparams[:, r0:r1] = qp.transpose(1, 0, 2)
    _check_finite(name, qparams)
    return codes, qparams


def _check_raw(name: str, raw: np.ndarray, k: int, per_block: int, block_bytes: int) -> np.ndarray:
    """raw as a 2-D uint8 array of whole blocks, or ArgumentError saying what to pass."""
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2:
        got = f"{raw.dtype} {raw.shape}" if isinstance(raw, np.ndarray) else type(raw).__name__
        raise ArgumentError(f"{name} blocks must be a (N, row_bytes) uint8 numpy array (the tensor's data as the "
                            f"GGUF reader gives it, reshaped to one row per output), got {got}")
    if k <= 0 or k % per_block:
        raise ArgumentError(f"a {name} row holds whole blocks of {per_block} values; k = {k} is not a multiple: "
                            "pass the tensor's number of values per row (its first GGUF dim)")
    want = k // per_block * block_bytes
    if raw.shape[1] != want:
        raise ArgumentError(f"{name} rows of {k} values are {want} bytes ({k // per_block} blocks of {block_bytes}), "
                            f"got {raw.shape[1]} bytes per row: check k and that raw is (N, row_bytes) of this tensor")
    return raw


def _check_finite(name: str, qparams: np.ndarray) -> None:
    """ArgumentError when a group's [scale, minimum] is not finite in fp16 (a damaged file, or scales past 65504)."""
    bad = ~np.isfinite(qparams).all(axis=-1)                        # (G, N)
    if bad.any():
        g, row = (int(i[0]) for i in np.nonzero(bad))
        raise ArgumentError(f"{name} block scales of row {row}, inputs {g * GROUP}..{g * GROUP + GROUP - 1}, are not "
                            f"finite as float16 (got {qparams[g, row].tolist()}): the file is damaged or its scales "
                            "exceed float16; keep this tensor 16-bit (dequantized) instead")


# ---------------------------------------------------------------------------------------------
# decoders: blocks (R, B, block_bytes) uint8 -> codes (R, K) uint8, qparams (R, G, 2) float16


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian fp16 at ``offset`` of every block -> (R, B) float32."""
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., m) bytes -> (..., 2m): the m low nibbles, then the m high nibbles (ggml's order)."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def _params(scale: np.ndarray, minimum: np.ndarray) -> np.ndarray:
    """(R, G) scale and minimum (any float dtype, values already fp16-exact or to be rounded) -> (R, G, 2) fp16."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.stack((scale.astype(np.float16), minimum.astype(np.float16)), axis=-1)


def _rows(codes: np.ndarray) -> np.ndarray:
    """(R, B, per_block) codes -> (R, K) uint8."""
    return codes.reshape(codes.shape[0], -1).astype(np.uint8, copy=False)


def _q8_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = _f16(b, 0)                                                  # (R, B): one group per block
    return _rows(b[..., 2:] ^ 0x80), _params(d, d * -128)            # bits of int8 x, +128


def _q4_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = _f16(b, 0)
    return _rows(_nibbles(b[..., 2:])), _params(d, d * -8)


def _q4_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _rows(_nibbles(b[..., 4:])), _params(_f16(b, 0), _f16(b, 2))


def _five_bit(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: (R, B, 4) high bits (bit j = value j) and (R, B, 16) nibbles -> (R, B, 32) codes < 32."""
    return _nibbles(qs) | (np.unpackbits(qh, axis=-1, bitorder="little") << 4)


def _q5_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = _f16(b, 0)
    return _rows(_five_bit(b[..., 2:6], b[..., 6:])), _params(d, d * -16)


def _q5_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _rows(_five_bit(b[..., 4:8], b[..., 8:])), _params(_f16(b, 0), _f16(b, 2))


def k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: (..., 12) packed bytes -> the 8 six-bit (sc, m) per super-block, each (..., 8) uint8.

    Bytes 0-3: sc 0-3 (low 6 bits), 4-7: m 0-3; bytes 8-11: sc 4-7 low nibble, m 4-7 high nibble,
    their top two bits in the top bits of bytes 0-3 (sc) and 4-7 (m)."""
    lo_sc, lo_m, mix = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate((lo_sc & 0x3F, (mix & 0x0F) | ((lo_sc >> 2) & 0x30)), axis=-1)
    m = np.concatenate((lo_m & 0x3F, (mix >> 4) | ((lo_m >> 2) & 0x30)), axis=-1)
    return sc, m


def _k_params(b: np.ndarray, center: float) -> np.ndarray:
    """Q4_K/Q5_K super-block header -> (R, B*8, 2) fp16 [scale, minimum], the minimum absorbing the scale's
    rounding at code ``center`` (module docstring)."""
    d, dmin = _f16(b, 0).astype(np.float64), _f16(b, 2).astype(np.float64)
    sc, m = k_scale_min(b[..., 4:16])
    scale = d[..., None] * sc                                       # (R, B, 8) exact
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = scale.astype(np.float16)
        minimum = -dmin[..., None] * m + center * (scale - rounded.astype(np.float64))
    r = b.shape[0]
    return _params(rounded.reshape(r, -1), minimum.reshape(r, -1))


def _q4_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    qs = b[..., 16:].reshape(*b.shape[:2], 4, 32)                   # 32 bytes = sub-blocks 2i (low), 2i+1 (high)
    return _rows(_nibbles(qs)), _k_params(b, _K_CENTER["Q4_K"])


def _q5_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    qh = b[..., 16:48][..., None, :]                                # (R, B, 1, 32): bit j = sub-block j
    qs = b[..., 48:].reshape(*b.shape[:2], 4, 32)
    high = (qh >> np.arange(8, dtype=np.uint8)[:, None]) & 1         # (R, B, 8, 32)
    low = _nibbles(qs).reshape(*b.shape[:2], 8, 32)
    return _rows(low | (high << 4)), _k_params(b, _K_CENTER["Q5_K"])


def q6_k_values(b: np.ndarray) -> np.ndarray:
    """Q6_K blocks (R, B, 210) -> their (R, B*256) values in fp32, exact (d*s_j*(q-32) has <= 24 bits)."""
    r, nb = b.shape[:2]
    ql = b[..., 0:128].reshape(r, nb, 2, 64)                        # halves of 128 values: low nibbles then high
    qh = b[..., 128:192].reshape(r, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    q = _nibbles(ql).reshape(r, nb, 256) | ((qh & 3).reshape(r, nb, 256) << 4)   # (R, B, 256) < 64
    s = b[..., 192:208].view(np.int8).astype(np.float32)           # (R, B, 16)
    d = _f16(b, 208)                                                # (R, B)
    w = (d[..., None] * s)[..., None] * (q.reshape(r, nb, 16, 16).astype(np.float32) - 32)
    return w.reshape(r, nb * 256)


def _q6_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from tierkv.kernels.quant_reference import quantize_weight_codes

    w = q6_k_values(b)                      # non-finite or past-fp16 values give non-finite qparams: refused
    codes, qparams = quantize_weight_codes(torch.from_numpy(w), 8, GROUP)   # (R, K), (G, R, 2)
    return codes.numpy(), qparams.numpy().transpose(1, 0, 2)


_DECODERS: dict[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
assert set(_DECODERS) == set(GGUF_SCHEMES) == set(BLOCK_SIZES)


# ---------------------------------------------------------------------------------------------
# measured error


@dataclass(frozen=True)
class ConversionError:
    """codes*scale+minimum (fp32) against ``gguf.quants.dequantize`` of the same blocks."""

    max_abs: float              # max |ours - gguf| over the tensor
    weight_range: float         # max - min of gguf's dequantized tensor
    max_rel_range: float        # max_abs / weight_range (0 when the range is 0)
    max_rel_group: float        # max over groups of 32 of (max |ours - gguf|) / (the group's range); constant
                                # groups count their abs error over the tensor's range
    mismatched: float           # fraction of weights not bit-identical


def groups_to_weights(codes: np.ndarray, qparams: np.ndarray) -> np.ndarray:
    """(N, K) codes and (G, N, 2) qparams -> (N, K) fp32 ``codes * scale + minimum`` (tierkv's reference math)."""
    n, k = codes.shape
    p = qparams.astype(np.float32).transpose(1, 0, 2)               # (N, G, 2)
    w = codes.reshape(n, -1, k // p.shape[1]).astype(np.float32) * p[..., 0:1] + p[..., 1:2]
    return w.reshape(n, k)


def conversion_error(ggml_type: str | Enum, raw: np.ndarray, k: int) -> ConversionError:
    """How far ``blocks_to_groups`` of these blocks is from ``gguf.quants.dequantize`` (needs ``gguf``)."""
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError as e:            # pragma: no cover - the test extra installs it
        raise ArgumentError("measuring the conversion error needs the gguf package: pip install 'gguf>=0.10'") from e
    name = type_name(ggml_type)
    codes, qparams = blocks_to_groups(name, raw, k)
    ours = groups_to_weights(codes, qparams)
    ref = dequantize(raw, GGMLQuantizationType[name]).reshape(ours.shape)
    if not ref.size:
        return ConversionError(0.0, 0.0, 0.0, 0.0, 0.0)
    diff = np.abs(ours.astype(np.float64) - ref).reshape(ref.shape[0], -1, GROUP)     # (N, G, 32)
    span = float(ref.max()) - float(ref.min())
    groups = ref.reshape(diff.shape)
    group_span = (groups.max(-1).astype(np.float64) - groups.min(-1))               # (N, G)
    per_group = diff.max(-1) / np.where(group_span > 0, group_span, span if span > 0 else 1.0)
    worst = float(diff.max())
    return ConversionError(worst, span, worst / span if span > 0 else 0.0, float(per_group.max()),
                           float((ours != ref).mean()))


__all__ = ["BLOCK_SIZES", "ConversionError", "GGUFScheme", "GGUF_SCHEMES", "GROUP", "blocks_to_groups",
           "conversion_error", "groups_to_weights", "gguf_scheme", "k_scale_min", "q6_k_values", "type_name"]
