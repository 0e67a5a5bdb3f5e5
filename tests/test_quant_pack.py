"""pack_weight: ready codes and qparams (as a GGUF file's blocks give them) -> every pack, read back exactly."""

from __future__ import annotations

import pytest
import torch

from tierkv.errors import ArgumentError
from tierkv.kernels.quant import dequantize_weight, pack_weight, quantize_weight
from tierkv.quantspec import CHANNEL, QuantWeight, TensorQuant

CASES = [("int4", 32, "plain"), ("int4", 32, "cpu_int4"), ("int4", 64, "cpu_int4"),
         ("int8", 32, "plain"), ("int8", 32, "cpu_int4"), ("int8", 128, "cpu_int4"),
         ("int8", CHANNEL, "plain"), ("int8", CHANNEL, "cpu_int8")]


def _codes(n: int, k: int, bits: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes over the whole range (both ends hit) and random fp16 [scale, minimum] (G, N, 2)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    codes[0, 0], codes[-1, -1] = 0, (1 << bits) - 1
    g = k // (k if group == CHANNEL else group)
    qparams = torch.stack((torch.rand(g, n, generator=gen) * 0.02 + 1e-4,
                           torch.randn(g, n, generator=gen)), dim=-1).to(torch.float16)
    return codes, qparams


@pytest.mark.parametrize("scheme,group,pack", CASES)
def test_pack_weight_reads_back_codes_times_scale_plus_min(scheme, group, pack):
    n, k = 48, 256
    bits = 4 if scheme == "int4" else 8
    codes, qparams = _codes(n, k, bits, group, seed=len(pack) + group + bits)
    tq = TensorQuant(scheme, group, pack)
    data, qp = pack_weight(codes, qparams, tq)
    assert (str(data.dtype).removeprefix("torch."), tuple(data.shape)) == tq.stored((n, k))[""]
    gl = k if group == CHANNEL else group
    params = qparams.float().transpose(0, 1).repeat_interleave(gl, dim=1)      # (N, K, 2)
    want = codes.float() * params[..., 0] + params[..., 1]
    got = dequantize_weight(QuantWeight(data, qp, tq), backend="torch")
    assert torch.equal(got, want)
    half = dequantize_weight(QuantWeight(data, qp, tq), torch.float16, backend="torch")
    assert torch.equal(half, want.to(torch.float16))


@pytest.mark.parametrize("scheme,group,pack", CASES)
def test_quantize_weight_is_its_codes_packed(scheme, group, pack):
    from tierkv.kernels.quant_reference import quantize_weight_codes
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    tq = TensorQuant(scheme, group, pack)
    codes, qparams = quantize_weight_codes(w, tq.bits, 128 if group == CHANNEL else group)
    data, qp = quantize_weight(w, tq)
    packed, qp2 = pack_weight(codes, qparams, tq)
    assert torch.equal(data, packed) and torch.equal(qp, qp2)


def test_bad_codes_are_refused_with_what_to_do():
    codes, qparams = _codes(32, 64, 8, 32, seed=1)
    with pytest.raises(ArgumentError, match="codes must be below 16.*pack them as int8"):
        pack_weight(codes, qparams, TensorQuant("int4", 32, "plain"))
    with pytest.raises(ArgumentError, match=r"must be \(2, 32, 2\) float16"):
        pack_weight(codes, qparams[:1], TensorQuant("int8", 32, "plain"))
    with pytest.raises(ArgumentError, match="must be .* float16"):
        pack_weight(codes, qparams.float(), TensorQuant("int8", 32, "plain"))
    with pytest.raises(ArgumentError, match=r"\(N, K\) uint8 codes"):
        pack_weight(codes.to(torch.int32), qparams, TensorQuant("int8", 32, "plain"))
    with pytest.raises(ArgumentError, match="group size 64 does not divide the input dimension 96"):
        pack_weight(torch.zeros(32, 96, dtype=torch.uint8), torch.zeros(1, 32, 2, dtype=torch.float16),
                    TensorQuant("int8", 64, "plain"))
    with pytest.raises(ArgumentError, match="divisible by 16.*plain pack"):
        pack_weight(codes[:24], qparams[:, :24], TensorQuant("int8", 32, "cpu_int4"))
