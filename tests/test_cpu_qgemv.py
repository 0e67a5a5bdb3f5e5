"""The C++ decode-row kernels of kernels/cpu_qgemv.py (cpu_int8 per channel, cpu_int4 int4 in the AVX512
tinygemm layout) match the stored weight's fp32 product on odd shapes, write every output of a NaN-poisoned
buffer, and are what ``quant_linear`` runs for one bf16 row of a large weight; elsewhere (fp32 x, other
layouts, N not a multiple of 64) PyTorch's op keeps the work."""

from __future__ import annotations

import pytest
import torch

from tierkv.kernels import cpu_gemv, cpu_qgemv, quant_cpu
from tierkv.kernels.quant import dequantize_weight, linear_path, quant_linear, quantize_weight
from tierkv.quantspec import CHANNEL, QuantWeight, TensorQuant

INT4_HERE = quant_cpu.cpu_layout() == "AVX512" and cpu_qgemv.int4_kernel_cpu()
needs_int4 = pytest.mark.skipif(not INT4_HERE, reason="the int4 kernel needs AVX-512 BF16/VBMI and the AVX512 layout")


def _quant(w: torch.Tensor, scheme: str, group: int, pack: str) -> QuantWeight:
    tq = TensorQuant(scheme, group, pack)
    return QuantWeight(*quantize_weight(w, tq), tq)


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.randn(n, k)
    w[:, : k // 4] *= 4.0                                         # groups (and rows) with different scales
    w[: n // 3] += 0.5                                            # rows with an offset: the minimum matters
    return w


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(7, 48), (33, 16), (130, 1040), (64, 2048)])
def test_int8_channel_kernel_matches_the_stored_weight(n: int, k: int, dtype: torch.dtype) -> None:
    qw = _quant(_weight(n, k, n + k), "int8", CHANNEL, "cpu_int8")
    x = (torch.randn(k) + 0.3).to(dtype)                          # a nonzero sum(x): the rank-1 term counts
    kernel = cpu_qgemv.int8_channel_kernel(qw.data, qw.qparams, dtype)
    assert kernel is not None and kernel.fn is not None, kernel
    out = torch.full((n,), float("nan"), dtype=dtype)
    got = cpu_qgemv.run_kernel(kernel, qw.data.view(torch.int8), qw.qparams, x, out=out)
    ref = dequantize_weight(qw, torch.float32) @ x.float()
    assert got is out and not out.isnan().any()
    # fp32 sums of exact products; the output is rounded once to x's dtype (bf16: 2^-8 of |y|)
    assert _rel(got, ref) < {torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]


@needs_int4
@pytest.mark.parametrize("n,k,group", [(64, 64, 64), (192, 96, 32), (128, 1024, 128), (320, 2048, 64)])
def test_int4_kernel_matches_the_stored_weight(n: int, k: int, group: int) -> None:
    qw = _quant(_weight(n, k, n * group), "int4", group, "cpu_int4")
    x = (torch.randn(k) + 0.3).bfloat16()
    kernel = cpu_qgemv.int4_tinygemm_kernel(qw.data, qw.qparams, group, torch.bfloat16, quant_cpu.cpu_layout())
    assert kernel is not None and kernel.fn is not None, kernel
    out = torch.full((n,), float("nan"), dtype=torch.bfloat16)
    got = cpu_qgemv.run_kernel(kernel, qw.data, qw.qparams, x, out=out)
    ref = dequantize_weight(qw, torch.float32) @ x.float()
    assert got is out and not out.isnan().any()
    assert _rel(got, ref) < 8e-3                                  # fp32 sums; one bf16 rounding of the output
    op = quant_cpu.cpu_quant_matmul(x.view(1, k), qw.data, qw.qparams, 4, group)[0]
    assert _rel(got, ref) <= _rel(op, ref) + 2e-3                 # no worse than PyTorch's op on the same bytes


@needs_int4
def test_int4_kernel_reads_nan_and_inf_activations_like_the_reference() -> None:
    qw = _quant(_weight(64, 128, 5), "int4", 64, "cpu_int4")
    x = torch.randn(128).bfloat16()
    x[3] = float("nan")
    got = cpu_gemv.quant_gemv(qw, x)
    assert got.isnan().all()                                      # every row reads x[3]


def test_quant_linear_runs_the_kernels_for_one_bf16_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERKV_CPU_MATVEC", "compiled")
    cases = [_quant(_weight(128, 256, 1), "int8", CHANNEL, "cpu_int8")]
    if INT4_HERE:
        cases.append(_quant(_weight(128, 256, 2), "int4", 64, "cpu_int4"))
    for qw in cases:
        one = torch.randn(1, 1, 256).bfloat16()
        bias = torch.randn(128).bfloat16()
        assert linear_path(one, qw) == "cpu_gemv"
        assert linear_path(one.float(), qw) != "cpu_gemv"
        assert linear_path(torch.randn(2, 256).bfloat16(), qw) != "cpu_gemv"
        got = quant_linear(one, qw, bias)
        ref = dequantize_weight(qw, torch.float32) @ one[0, 0].float() + bias.float()
        assert got.shape == (1, 1, 128) and got.dtype == torch.bfloat16
        assert _rel(got[0, 0], ref) < 1e-2
        assert torch.equal(quant_linear(one, qw, bias), got)      # deterministic: same bits every call


def test_layouts_the_int4_kernel_does_not_read_keep_the_op() -> None:
    w = _weight(64, 128, 9)
    qw = _quant(w, "int4", 32, "cpu_int4")
    assert cpu_qgemv.int4_tinygemm_kernel(qw.data, qw.qparams, 32, torch.bfloat16, "AVX2") is None
    assert cpu_qgemv.int4_tinygemm_kernel(qw.data, qw.qparams, 32, torch.float16, "AVX512") is None
    odd = _quant(_weight(80, 128, 9), "int4", 32, "cpu_int4")     # a partial block of 16 rows
    assert cpu_qgemv.int4_tinygemm_kernel(odd.data, odd.qparams, 32, torch.bfloat16, "AVX512") is None


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int8", "channel")])
def test_quantized_engines_decode_through_the_kernels_deterministically(tiny_llama_dir, monkeypatch, scheme,
                                                                       group) -> None:
    """A resident quantized engine takes the kernels for its decode rows when forced ("compiled": the tiny
    model's q_proj, o_proj and down_proj have N = 64) and gives the same greedy tokens on every run."""
    import tierkv
    import tierkv.kernels.quant as quant_module

    if scheme == "int4" and not INT4_HERE:
        pytest.skip("the int4 kernel needs AVX-512 BF16/VBMI and the AVX512 layout")
    calls = []
    real = quant_module.run_quant_gemv
    monkeypatch.setattr(quant_module, "run_quant_gemv",
                        lambda kernel, qw, x: calls.append(qw.quant.pack) or real(kernel, qw, x))
    monkeypatch.setenv("TIERKV_CPU_MATVEC", "compiled")
    prompt = [5, 17, 42, 9, 101, 3]
    runs = []
    for _ in range(2):
        with tierkv.load(tiny_llama_dir, device="cpu", dtype="bfloat16", quant=scheme, group_size=group) as engine:
            runs.append(engine.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids)
    assert calls and set(calls) == {"cpu_int4" if scheme == "int4" else "cpu_int8"}
    assert runs[0] == runs[1] and len(runs[0]) == 8
