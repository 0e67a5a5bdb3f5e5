"""The few-row C++ kernel (kernels/cpu_mgemv.py) computes x @ w^T as fp32 sums of exact products with one
rounding, for every M it takes, odd sizes (vector tails), strided weights, every variant and dtype; it is
``dense_linear``'s path for a decode batch of a large 16-bit weight; a build failure warns once and
falls back to mm_t; and a 16-bit engine's batch rows still decode their solo greedy tokens."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import tierkv
from placements import random_prompt
from tierkv.errors import ArgumentError
from tierkv.kernels import cpu_mgemv
from tierkv.kernels.cpu_gemv import compiled_gemv_allowed
from tierkv.kernels.dense_linear import (CPU_MATVEC_VAR, CPU_MGEMV_VAR, GEMV_MIN_ELEMENTS, LINEAR_FEW_ROWS,
                                         MGEMV_AUTO_ROWS, MM_T_MAX_M, dense_linear, linear_path)

VARIANTS = [(torch.bfloat16, "fma"), (torch.float16, "fma"), (torch.float32, "fma")]
if cpu_mgemv.bf16_dot_cpu():
    VARIANTS.append((torch.bfloat16, "bf16_dot"))
if cpu_mgemv.amx_cpu():
    VARIANTS.append((torch.bfloat16, "amx"))
_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}      # significand bits


def _check(got: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> None:
    """|got - x @ w^T| within fp32 summation error (K + 2 roundings of 2^-24 of sum |x w|) plus one rounding
    to the output dtype (half an ulp)."""
    ref = x.double() @ w.double().t()                                       # (M, N)
    sum_error = (w.shape[1] + 2) * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t())
    bound = 2.0 ** -_BITS[x.dtype] * (ref.abs() + sum_error) + sum_error + 1e-30
    assert got.shape == ref.shape and got.dtype == x.dtype
    excess = ((got.double() - ref).abs() - bound).max().item()
    assert excess <= 0, excess


@pytest.mark.parametrize("dtype,variant", VARIANTS)
@pytest.mark.parametrize("n,k", [(1, 1), (37, 99), (70, 64), (19, 300), (64, 77), (100, 32), (33, 130)])
def test_every_m_matches_the_fp64_reference_on_a_strided_weight(dtype: torch.dtype, variant: str, n: int,
                                                                 k: int) -> None:
    torch.manual_seed(n * k)
    buf = torch.randn(n + 3, k + 17).to(dtype)
    w = buf[2:2 + n, 5:5 + k]                                               # (N, K), row stride K + 17
    kernel = cpu_mgemv.mgemv_kernel(w, variant)
    assert kernel is not None and kernel.fn is not None, kernel and kernel.error
    for m in range(1, cpu_mgemv.MGEMV_MAX_M + 1):
        x = torch.randn(m, k).to(dtype)
        out = torch.full((m, n), float("nan"), dtype=dtype)                 # every entry must be written
        got = cpu_mgemv.run_mgemv(kernel, w, x, out)
        assert got.data_ptr() == out.data_ptr()
        _check(got, w, x)


def test_a_variant_this_cpu_lacks_is_none_and_the_default_is_the_best_it_has() -> None:
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    assert (cpu_mgemv.mgemv_kernel(w, "amx") is None) == (not cpu_mgemv.amx_cpu())
    assert cpu_mgemv.mgemv_kernel(w.half(), "amx") is None and cpu_mgemv.mgemv_kernel(w.half(), "bf16_dot") is None
    want = "amx" if cpu_mgemv.amx_cpu() else "bf16_dot" if cpu_mgemv.bf16_dot_cpu() else "fma"
    assert cpu_mgemv.default_variant(torch.bfloat16) == want and cpu_mgemv.default_variant(torch.float16) == "fma"
    assert cpu_mgemv.cpu_class() == {"amx": "amx", "bf16_dot": "avx512_bf16", "fma": "other"}[want]
    assert not cpu_mgemv.amx_cpu() or cpu_mgemv.bf16_dot_cpu()                 # AMX's kernel uses AVX512-BF16 too


def test_the_switch_keeps_batches_on_the_aten_ops_and_one_row_on_its_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(GEMV_MIN_ELEMENTS // 256, 256, dtype=torch.bfloat16)
    few, one = torch.randn(4, 256, dtype=torch.bfloat16), torch.randn(1, 256, dtype=torch.bfloat16)
    assert linear_path(few, w, "compiled") == "mgemv"
    monkeypatch.setenv(CPU_MGEMV_VAR, "off")
    assert linear_path(few, w, "compiled") == "mm_t" and linear_path(few, w) == "mm_t"
    assert linear_path(one, w, "compiled") == "gemv" and linear_path(one, w) == "gemv"
    monkeypatch.setenv(CPU_MGEMV_VAR, "sometimes")
    with pytest.raises(ArgumentError, match=CPU_MGEMV_VAR):
        linear_path(few, w)


def test_a_transposed_weight_is_not_the_kernels() -> None:
    w = torch.randn(64, 48, dtype=torch.bfloat16).t()                       # (48, 64), column stride 48
    assert cpu_mgemv.mgemv_kernel(w) is None
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(cpu_mgemv.mgemv(w, x), torch.mm(w, x.t()).t(), rtol=0, atol=0)
    assert linear_path(x, w, "compiled") == "mm_t"


def test_dense_linear_takes_the_kernel_for_a_decode_batch_of_a_large_16_bit_weight() -> None:
    k = 512
    torch.manual_seed(3)
    buf = torch.randn(3 * GEMV_MIN_ELEMENTS // k, k, dtype=torch.bfloat16)
    big = buf[GEMV_MIN_ELEMENTS // k: 2 * GEMV_MIN_ELEMENTS // k + 5]         # a fused part: a view in a buffer
    bias = torch.randn(big.shape[0], dtype=torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float16):
        w = big.to(dtype)
        rows = MGEMV_AUTO_ROWS.get((dtype, cpu_mgemv.cpu_class()))
        on = rows is not None
        first, last = rows or (0, -1)
        for m in range(2, min(last + 2, cpu_mgemv.MGEMV_MAX_M) + 1):
            x = torch.randn(2, m, k).to(dtype)[:1]                         # (1, M, K)
            mm_t = m <= MM_T_MAX_M and (dtype, cpu_mgemv.cpu_class()) not in LINEAR_FEW_ROWS
            want = "mgemv" if on and first <= m <= last else ("mm_t" if mm_t else "linear")
            assert linear_path(x, w) == want, (dtype, m)
            assert linear_path(x, w, "compiled") == "mgemv" and linear_path(x, w, "on") != "mgemv"
            got = dense_linear(x, w, bias.to(dtype), choice="compiled")
            assert got.shape == (1, m, w.shape[0]) and got.dtype == dtype
            torch.testing.assert_close(got.double(), F.linear(x.double(), w.double(), bias.double()),
                                       rtol=2e-2, atol=0.1)
    x = torch.randn(1, 2, k, dtype=torch.bfloat16)
    w32 = big.float()
    assert linear_path(x.float(), w32) == "linear" and linear_path(x.float(), w32, "compiled") == "mgemv"
    assert linear_path(x, big[:8]) == "mm_t"                                # too small to pay a build
    assert linear_path(x.half(), big, "compiled") == "mm_t"                 # x in another dtype
    with compiled_gemv_allowed(False):                                      # a small model's forward
        assert linear_path(x, big) == "mm_t"


def test_a_kernel_that_cannot_be_built_falls_back_to_mm_t_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    def fail(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(CppPythonBindingsCodeCache, "load_pybinding", fail)
    cpu_mgemv._build.cache_clear()
    try:
        w, x = torch.randn(11, 13, dtype=torch.bfloat16), torch.randn(3, 13, dtype=torch.bfloat16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = dense_linear(x, w, choice="compiled")
            again = dense_linear(x, w, choice="compiled")                  # the failure is kept: no second build
        assert [c for c in caught if "few-row" in str(c.message) and "TIERKV_CPU_MGEMV=off" in str(c.message)]
        assert len([c for c in caught if "few-row" in str(c.message)]) == 1
        assert torch.equal(got, torch.mm(w, x.t()).t()) and torch.equal(again, got)
        assert linear_path(x, w, "compiled") == "mm_t"
    finally:
        cpu_mgemv._build.cache_clear()                                      # later tests build real kernels again


@pytest.mark.usefixtures("torch_kernels_one_thread")
def test_16_bit_batch_rows_decode_their_solo_tokens(tiny_model_dir: Callable[..., Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 weights, "compiled": a solo run takes the one-row kernel, the batch of 3 the few-row kernel."""
    monkeypatch.setenv(CPU_MATVEC_VAR, "compiled")
    prompts = [random_prompt(n, seed=70 + n) for n in (9, 21, 5)]
    with tierkv.load(tiny_model_dir("llama"), device="cpu", dtype="bfloat16", kv="exact") as engine:
        solo = [engine.generate(p, max_new_tokens=8, ignore_eos=True).token_ids for p in prompts]
        batch = [o.token_ids for o in engine.generate(prompts, max_new_tokens=8, ignore_eos=True)]
    assert batch == solo


@pytest.mark.usefixtures("torch_kernels_one_thread")
@pytest.mark.parametrize("variant", ["llama", "qwen2-bias"])
def test_fp32_ragged_batches_through_the_kernel_decode_the_aten_tokens(tiny_model_dir: Callable[..., Path],
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       variant: str) -> None:
    """fp32, "compiled": ragged batches of 2 and 5 (prompts of different lengths) take the few-row kernel for
    every projection and decode the tokens of F.linear ("off") and of each prompt's solo run."""
    from tierkv.kernels import dense_linear as dl

    calls: list[int] = []
    run = dl.run_mgemv
    monkeypatch.setattr(dl, "run_mgemv", lambda kernel, w, x, *a: calls.append(x.shape[0]) or run(kernel, w, x, *a))
    monkeypatch.setenv("TIERKV_CPU_FUSED_DECODE", "off")
    prompts = [random_prompt(n, seed=90 + n) for n in (13, 4, 30, 7, 18)]
    got = {}
    for mode in ("off", "compiled"):
        monkeypatch.setenv(CPU_MATVEC_VAR, mode)
        calls.clear()
        with tierkv.load(tiny_model_dir(variant), device="cpu", dtype="float32", kv="exact") as engine:
            solo = [engine.generate(p, max_new_tokens=6, ignore_eos=True).token_ids for p in prompts]
            batches = [[o.token_ids for o in engine.generate(group, max_new_tokens=6, ignore_eos=True)]
                       for group in (prompts[:2], prompts)]
        got[mode] = (solo, batches)
        assert (2 in calls and 5 in calls) == (mode == "compiled"), (mode, sorted(set(calls)))
    assert got["compiled"] == got["off"]
    assert got["off"][1] == [got["off"][0][:2], got["off"][0]]
