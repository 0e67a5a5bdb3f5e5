"""The quantized-linear Triton kernels compiled on CUDA against fp32 math, at the ~0.85B model's shapes and odd ones.

Why this file exists: tests/test_quant_kernels.py runs the kernels through the CPU interpreter on
small shapes; what only a GPU shows is the compiled code (bf16 dots on tensor cores, nibble
shifts on uint8 loads, masked tails) at decode and prefill sizes. As in tests/test_kernels_gpu.py
the session's kernel module was decorated under TRITON_INTERPRET=1, so the fixture loads a fresh
copy of ``tierkv.kernels.quant`` with it off and puts the session's module back. Marked ``gpu``:
skipped without CUDA; ``scripts/gpu_check.sh`` runs it.

Tolerances: the fused matmul against fp32 math on the weight rounded as the kernel rounds it
(to x's dtype): fp32 within 1e-4 of max |ref| (no TF32), bf16 within 1e-2; the dequantize kernel
within one unit in the last place of the reference.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from tierkv.kernels.quant_reference import dequantize_weight_plain
from tierkv.quantspec import BITS, QuantWeight, TensorQuant

pytestmark = pytest.mark.gpu
MODULE = "tierkv.kernels.quant"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}        # x max |ref|
BF16, FP32 = torch.bfloat16, torch.float32
# (M, N, K, group, dtype): decode, a batch, the dequantize path, odd shapes. Few distinct kernel
# variants (group, dtype, tile): each costs a compile inside gpu_check.sh's time share.
CASES = [(1, 5632, 2048, 64, BF16), (16, 2048, 5632, 64, BF16), (300, 5632, 2048, 64, BF16),
         (3, 40, 96, 32, FP32), (17, 56, 384, 128, BF16)]


@pytest.fixture(scope="module")
def quant() -> ModuleType:
    """A copy of tierkv.kernels.quant whose kernels were compiled, not interpreted."""
    from tierkv.kernels._select import HAS_TRITON

    if not HAS_TRITON:
        pytest.fail("triton is not installed: the compiled kernels cannot be checked (pip install triton)")
    saved, env = sys.modules.pop(MODULE, None), os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        mod = importlib.import_module(MODULE)
    finally:
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env
        if saved is not None:
            sys.modules[MODULE] = saved
    assert type(mod._quant_matmul_kernel).__name__ == "JITFunction"
    return mod


@pytest.fixture(autouse=True)
def _cuda_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("TIERKV_KERNELS", raising=False)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32


def _qw(quant: ModuleType, n: int, k: int, scheme: str, group: int) -> QuantWeight:
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    tq = TensorQuant(scheme, group, "plain")
    return QuantWeight(*quant.quantize_weight(w, tq), tq)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("M,N,K,group,dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_compiled_quant_linear_matches_fp32_math(quant, dtype, scheme, M, N, K, group):
    qw = _qw(quant, N, K, scheme, group)
    x = torch.randn(M, K, device="cuda").to(dtype)
    bias = torch.randn(N, device="cuda").to(dtype)
    path = quant.linear_path(x, qw)
    assert path == ("triton_dequant" if M >= quant.DEQUANT_MIN_M else "triton_fused")
    got = quant.quant_linear(x, qw, bias)
    w = dequantize_weight_plain(qw.data, qw.qparams, BITS[scheme], dtype).float()
    ref = F.linear(x.float(), w, bias.float())
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert ((got.float() - ref).abs().max() / ref.abs().max()).item() < TOL[dtype]
    if path == "triton_fused":                                  # the fused launcher writes every element
        out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
        quant.quant_matmul_fwd(x, qw.data, qw.qparams, BITS[scheme], group, bias, out)
        torch.testing.assert_close(out, got, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("n,k,group,dtype", [(5632, 2048, 64, BF16), (40, 160, 32, FP32), (40, 160, 32, torch.float16)],
                         ids=lambda v: str(v).removeprefix("torch."))
def test_compiled_dequantize_matches_reference(quant, dtype, scheme, n, k, group):
    qw = _qw(quant, n, k, scheme, group)
    out = torch.full((n, k), float("nan"), dtype=dtype, device="cuda")
    quant.dequantize_fwd(qw.data, qw.qparams, BITS[scheme], group, out)
    ref = dequantize_weight_plain(qw.data, qw.qparams, BITS[scheme], dtype)
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]   # FMA may round apart
    torch.testing.assert_close(out, ref, rtol=ulp, atol=1e-6)
