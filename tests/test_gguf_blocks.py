"""GGUF blocks -> tierkv groups, checked against llama.cpp's own reference (``gguf.quants``).

Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 must be bit-exact (blocks from ``gguf.quants.quantize`` of random weights and
random valid bytes); the K-quants are hand-built from random bytes with finite fp16 d/dmin covering
every 6-bit scale pattern: bit-exact where d*sc and dmin*m are fp16 numbers (the layout decoding),
within the fp16-rounding bound of ``tierkv.io.gguf_blocks`` otherwise; Q6_K equals tierkv's own int8
quantization of gguf's dequantized values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.quants import Q4_K, dequantize, quantize  # noqa: E402

import tierkv.io.gguf_blocks as gb  # noqa: E402
from tierkv.errors import ArgumentError  # noqa: E402
from tierkv.io.gguf_blocks import (BLOCK_SIZES, GGUF_SCHEMES, blocks_to_groups, conversion_error,  # noqa: E402
                                   groups_to_weights, gguf_scheme)
from tierkv.kernels.quant import dequantize_weight, pack_weight  # noqa: E402
from tierkv.kernels.quant_reference import quantize_weight_codes  # noqa: E402
from tierkv.quantspec import QuantWeight, TensorQuant  # noqa: E402
from scripts_util import load_script  # noqa: E402

SIMPLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
KQUANTS = ("Q4_K", "Q5_K", "Q6_K")
_SCALE_OFFSETS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2),
                  "Q5_0": (0,), "Q5_1": (0, 2)}


def _f16(rng: np.random.Generator, shape: tuple[int, ...], lo: int, hi: int, signed: bool = True) -> np.ndarray:
    """Finite fp16 numbers with random mantissas and exponents in [lo, hi]."""
    x = rng.uniform(1, 2, shape) * 2.0 ** rng.integers(lo, hi + 1, shape)
    return (x * (rng.choice([-1, 1], shape) if signed else 1)).astype(np.float16)


def _random_blocks(name: str, n: int, k: int, seed: int, lo: int = -14, hi: int = -4,
                   power_of_two: bool = False) -> np.ndarray:
    """(n, row_bytes) random bytes of ``name`` blocks with finite fp16 scales (exponents in [lo, hi]; exactly
    powers of two when asked, which makes every K-quant product d*sc, dmin*m an fp16 number)."""
    rng = np.random.default_rng(seed)
    per_block, block_bytes = BLOCK_SIZES[name]
    raw = rng.integers(0, 256, (n, k // per_block, block_bytes), dtype=np.uint8)
    for i, off in enumerate(_SCALE_OFFSETS[name]):
        d = _f16(rng, raw.shape[:2], lo, hi, signed=i == 0)
        if power_of_two:
            d = (np.sign(d.astype(np.float32)) * 2.0 ** np.floor(np.log2(np.abs(d.astype(np.float32))))).astype(
                np.float16)
        raw[..., off:off + 2] = d[..., None].view(np.uint8)
    flat = raw.reshape(-1, block_bytes)
    idx = np.arange(flat.shape[0])[:, None]
    if name in ("Q4_K", "Q5_K"):        # over 256 blocks, every 6-bit (sc, m) value at every position:
        x = ((idx + rng.integers(0, 256, 4)) % 256).astype(np.uint8)    # x per block and position 0-3
        ror2 = (x >> 2) | (x << 6)                                       # sc: x & 63, (x & 15) | (x >> 6) << 4
        flat[:, 4:16] = np.concatenate((x, ror2, x), axis=1)             # m: x >> 2, (x >> 4) | (x & 3) << 4
    elif name == "Q6_K":                # every signed 8-bit sub-block scale over 16 blocks
        flat[:, 192:208] = (idx * 16 + np.arange(16) + int(rng.integers(0, 256))) % 256
    return raw.reshape(n, -1)


def _gaussian_blocks(name: str, n: int, k: int, seed: int) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.02
    w[0, :32] = 0.0                                                 # a constant (all-zero) group
    return quantize(w, T[name])


def _ref(name: str, raw: np.ndarray, k: int) -> np.ndarray:
    return dequantize(raw, T[name]).reshape(raw.shape[0], k)


def test_block_sizes_and_schemes_match_gguf():
    for name, (scheme, group, exact) in GGUF_SCHEMES.items():
        assert GGML_QUANT_SIZES[T[name]] == BLOCK_SIZES[name], name
        assert group == 32 and scheme in ("int4", "int8")
        assert gguf_scheme(T[name]) == gguf_scheme(name.lower()) == GGUF_SCHEMES[name]
    assert [n for n, s in GGUF_SCHEMES.items() if s.exact] == list(SIMPLE)
    assert gguf_scheme(T.Q2_K) is None and gguf_scheme("F16") is None


@pytest.mark.parametrize("name", SIMPLE)
def test_simple_types_are_bit_exact_from_gguf_quantize(name):
    n, k = 37, 96                                                   # odd N, 3 blocks per row
    raw = _gaussian_blocks(name, n, k, seed=len(name))
    codes, qparams = blocks_to_groups(name, raw, k)
    assert codes.shape == (n, k) and codes.dtype == np.uint8
    assert qparams.shape == (k // 32, n, 2) and qparams.dtype == np.float16
    assert int(codes.max()) < (16 if GGUF_SCHEMES[name].scheme == "int4" else 256)
    np.testing.assert_array_equal(groups_to_weights(codes, qparams), _ref(name, raw, k))
    err = conversion_error(name, raw, k)
    assert err.max_abs == 0 and err.mismatched == 0 and err.weight_range > 0


@pytest.mark.parametrize("name", SIMPLE)
def test_simple_types_are_bit_exact_on_random_bytes(name):
    n, k = 33, 64
    raw = _random_blocks(name, n, k, seed=7, lo=-20, hi=8)         # subnormal to 512: -128d stays finite
    np.testing.assert_array_equal(groups_to_weights(*blocks_to_groups(name, raw, k)), _ref(name, raw, k))


def _k_scale_patterns(raw: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """gguf's own unpacking of the 6-bit (sc, m) of every super-block: (blocks, 8) each."""
    blocks = raw.reshape(-1, BLOCK_SIZES[name][1])
    return Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
def test_k_quants_decode_bit_exact_when_products_are_fp16(name):
    n, k = 87, 768                                                  # odd N, 3 super-blocks per row
    raw = _random_blocks(name, n, k, seed=11, lo=-14, hi=-6, power_of_two=True)
    sc, m = _k_scale_patterns(raw, name)
    for pos in range(8):                                            # every 6-bit value at every position
        assert len(np.unique(sc[:, pos])) == 64 and len(np.unique(m[:, pos])) == 64
    codes, qparams = blocks_to_groups(name, raw, k)
    assert int(codes.max()) == (15 if name == "Q4_K" else 31)
    np.testing.assert_array_equal(groups_to_weights(codes, qparams), _ref(name, raw, k))


def _ulp16(x: np.ndarray) -> np.ndarray:
    """fp16's spacing at magnitude |x| (2**-24 below the normal range)."""
    e = np.floor(np.log2(np.maximum(np.abs(x), 2.0 ** -14)))
    return 2.0 ** (e - 10)


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
@pytest.mark.parametrize("lo,hi", [(-14, -6), (-24, 0)])           # normal fp16 scales; subnormal to large
def test_k_quants_within_fp16_rounding_of_d_sc_and_dmin_m(name, lo, hi):
    n, k = 17, 512
    raw = _random_blocks(name, n, k, seed=lo + 30, lo=lo, hi=hi)
    blocks = raw.reshape(n, k // 256, -1)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float64)         # (N, B, 1)
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float64)
    sc, m = (x.reshape(n, -1, 8).astype(np.float64) for x in _k_scale_patterns(raw, name))
    scale, minimum = (d * sc).reshape(n, -1, 1), (-dmin * m).reshape(n, -1, 1)     # (N, G, 1) exact
    center, top = (7.5, 15) if name == "Q4_K" else (15.5, 31)
    # scale rounds by <= half an fp16 step; the minimum absorbs it at the center code, then rounds once
    bound = center * _ulp16(scale) / 2 + _ulp16(np.abs(minimum) + center * _ulp16(scale)) / 2
    bound += 2.0 ** -22 * (top * np.abs(scale) + np.abs(minimum))         # fp32 arithmetic of both sides
    ours = groups_to_weights(*blocks_to_groups(name, raw, k)).reshape(n, -1, 32)
    err = np.abs(ours.astype(np.float64) - _ref(name, raw, k).reshape(n, -1, 32))
    assert (err <= bound * 1.001).all(), float((err / bound).max())
    assert not GGUF_SCHEMES[name].exact


def test_q6_k_is_tierkv_int8_of_the_exact_values():
    n, k = 19, 512
    raw = _random_blocks("Q6_K", n, k, seed=5, lo=-14, hi=-2)
    scales = raw.reshape(-1, 210)[:, 192:208].view(np.int8)
    assert len(np.unique(scales)) == 256                           # every signed 8-bit sub-block scale
    ref = _ref("Q6_K", raw, k)
    np.testing.assert_array_equal(gb.q6_k_values(raw.reshape(n, -1, 210)), ref)
    codes, qparams = blocks_to_groups("Q6_K", raw, k)
    want_codes, want_qp = quantize_weight_codes(torch.from_numpy(ref), 8, 32)
    np.testing.assert_array_equal(codes, want_codes.numpy())
    np.testing.assert_array_equal(qparams, want_qp.numpy())
    groups = ref.reshape(n, -1, 32).astype(np.float64)
    span = groups.max(-1, keepdims=True) - groups.min(-1, keepdims=True)
    err = np.abs(groups_to_weights(codes, qparams).reshape(groups.shape) - groups)
    # half a step of 1/255 of the range, the steps and minimum rounded to fp16
    bound = span / 510 * (1 + 2.0 ** -10) + _ulp16(span / 255) * 128 + _ulp16(groups.min(-1, keepdims=True))
    assert (err <= bound).all()
    assert conversion_error("Q6_K", raw, k).max_rel_group < 1 / 400


@pytest.mark.parametrize("name", SIMPLE + KQUANTS)
def test_chunked_rows_equal_one_pass(name, monkeypatch):
    n, k = 23, 512
    raw = _random_blocks(name, n, k, seed=3)
    whole = blocks_to_groups(name, raw, k)
    monkeypatch.setattr(gb, "_CHUNK_VALUES", 3 * k)                 # 3 rows a step, a short last one
    chunked = blocks_to_groups(name, raw, k)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name,pack", [("Q4_0", "cpu_int4"), ("Q4_K", "cpu_int4"), ("Q4_1", "plain"),
                                       ("Q8_0", "cpu_int4"), ("Q5_K", "cpu_int4"), ("Q6_K", "plain"),
                                       ("Q5_0", "plain")])
def test_blocks_pack_and_dequantize_like_gguf(name, pack):
    n, k = 32, 512                                                  # N divisible by 16: the cpu_int4 pack
    raw = _random_blocks(name, n, k, seed=9) if name in KQUANTS else _gaussian_blocks(name, n, k, seed=9)
    codes, qparams = blocks_to_groups(name, raw, k)
    tq = TensorQuant(GGUF_SCHEMES[name].scheme, 32, pack)
    data, qp = pack_weight(torch.from_numpy(codes), torch.from_numpy(qparams), tq)
    back = dequantize_weight(QuantWeight(data, qp, tq), backend="torch").numpy()
    np.testing.assert_array_equal(back, groups_to_weights(codes, qparams))
    if GGUF_SCHEMES[name].exact:
        np.testing.assert_array_equal(back, _ref(name, raw, k))


def test_bad_input_says_what_to_do():
    raw = _gaussian_blocks("Q4_0", 4, 64, seed=1)
    with pytest.raises(ArgumentError, match="Q2_K has no direct conversion.*gguf.quants.dequantize"):
        blocks_to_groups(T.Q2_K, np.zeros((4, 84), np.uint8), 256)
    with pytest.raises(ArgumentError, match="F16 has no direct conversion"):
        blocks_to_groups("F16", raw, 64)
    with pytest.raises(ArgumentError, match=r"rows of 64 values are 36 bytes \(2 blocks of 18\), got 35"):
        blocks_to_groups("Q4_0", raw[:, :35], 64)
    with pytest.raises(ArgumentError, match="k = 48 is not a multiple"):
        blocks_to_groups("Q4_0", raw, 48)
    with pytest.raises(ArgumentError, match=r"Q4_K rows of 512 values are 288 bytes"):
        blocks_to_groups("Q4_K", np.zeros((2, 144), np.uint8), 512)
    with pytest.raises(ArgumentError, match=r"\(N, row_bytes\) uint8 numpy array"):
        blocks_to_groups("Q4_0", raw.reshape(-1), 64)
    with pytest.raises(ArgumentError, match=r"\(N, row_bytes\) uint8 numpy array"):
        blocks_to_groups("Q4_0", raw.astype(np.int16), 64)
    with pytest.raises(ArgumentError, match="pass its name"):
        blocks_to_groups(2, raw, 64)


@pytest.mark.parametrize("name,value", [("Q8_0", 1000.0), ("Q4_0", np.nan), ("Q4_K", np.inf), ("Q6_K", np.nan),
                                        ("Q6_K", 60000.0)])
def test_scales_that_fp16_cannot_hold_are_refused(name, value):
    k = 256
    raw = _random_blocks(name, 3, k, seed=2).reshape(3, -1, BLOCK_SIZES[name][1])
    off = _SCALE_OFFSETS[name][0]
    raw[1, -1, off:off + 2] = np.array([value], np.float16).view(np.uint8)
    with pytest.raises(ArgumentError, match=f"{name} block scales of row 1, .*not finite as float16.*16-bit"):
        blocks_to_groups(name, raw.reshape(3, -1), k)


def _write_gguf(path, blocks: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, raw in blocks.items():
        writer.add_tensor(f"w.{name}", raw, raw_dtype=T[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tensors_read_back_from_a_gguf_file(tmp_path):
    """The reader's (N, row_bytes) memmap and its GGMLQuantizationType go in as they come."""
    n, k = 48, 512
    blocks = {"Q4_0": _gaussian_blocks("Q4_0", n, k, seed=4), "Q4_K": _random_blocks("Q4_K", n, k, seed=4),
              "Q6_K": _random_blocks("Q6_K", n, k, seed=4)}
    _write_gguf(tmp_path / "t.gguf", blocks)
    for t in gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors:
        assert [int(x) for x in t.shape] == [k, n] and t.data.shape == blocks[t.tensor_type.name].shape
        codes, qparams = blocks_to_groups(t.tensor_type, t.data, int(t.shape[0]))
        want = blocks_to_groups(t.tensor_type.name, blocks[t.tensor_type.name], k)
        np.testing.assert_array_equal(codes, want[0])
        np.testing.assert_array_equal(qparams, want[1])


def test_eval_script_measures_a_file(tmp_path):
    script = load_script("eval_gguf_blocks")
    n, k = 32, 256
    _write_gguf(tmp_path / "m-Q.gguf", {"Q4_0": _gaussian_blocks("Q4_0", n, k, seed=8),
                                        "Q4_K": _random_blocks("Q4_K", n, k, seed=8)})
    acc: dict = {}
    script.from_files([str(tmp_path / "m-Q.gguf")], acc)
    q40, q4k = acc["Q4_0 (m)"], acc["Q4_K (m)"]
    assert (q40["max_abs"], q40["exact"], q40["n"]) == (0.0, 1.0, n * k) and q40["via16_rel_range"] > 0.01
    assert 0 < q4k["rel_range"] < 1e-3 < q4k["via16_rel_range"] and q4k["exact"] < 1
