"""The CPU row kernels (kernels/cpu_rows.py): eager's values for RMSNorm, SiLU x up and RoPE on any
row layout the model hands them, the switch and its fallbacks, and the same fp32 tokens with the
kernels on and off on every supported architecture (prefill pieces, ragged batches, decode)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import tierkv
from conftest import ARCH_VARIANTS
from placements import random_prompt
from tierkv.kernels import cpu_rows, norm_rope
from tierkv.kernels.cpu_gemv import compiled_gemv_allowed
from tierkv.kernels.cpu_rows import ROW_KERNELS_VAR, rms_norm_rows, rope_rows, silu_mul_rows
from tierkv.kernels.norm_rope import rms_norm_ref, rope_torch

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def _rows_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ROW_KERNELS_VAR, "on")


def _bits_or_rounding(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal bit for bit, or (a norm: fp32 sums in another order) within one rounding of the dtype."""
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    tol = 2 * torch.finfo(dtype).eps * want.float().abs().amax().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [576, 100, 7, 2048])
def test_rms_norm_rows_gives_hf_values(dtype: torch.dtype, k: int) -> None:
    torch.manual_seed(k)
    x = torch.randn(3, 37, k, dtype=dtype) * 3
    w = torch.randn(k, dtype=dtype)
    got = rms_norm_rows(x, w, 1e-5)
    assert got is not None
    _bits_or_rounding(got, rms_norm_ref(x, w, 1e-5), dtype)
    if dtype == torch.bfloat16:                       # the fp32 sum's order is lost in the bf16 rounding here
        assert torch.equal(got, rms_norm_ref(x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1536, 100, 9])
def test_silu_mul_rows_on_the_halves_of_a_fused_output_is_eagers(dtype: torch.dtype, k: int) -> None:
    torch.manual_seed(k)
    gate_up = torch.randn(2, 13, 2 * k, dtype=dtype) * 4
    gate, up = gate_up.split([k, k], dim=-1)                        # strided halves, rows 2k apart
    got = silu_mul_rows(gate, up)
    assert got is not None
    _same_but_the_exp(got, F.silu(gate) * up, dtype)
    apart = torch.randn(26, k, dtype=dtype), torch.randn(26, k, dtype=dtype)   # two separate tensors
    _same_but_the_exp(silu_mul_rows(*apart), F.silu(apart[0]) * apart[1], dtype)


def _same_but_the_exp(got: torch.Tensor | None, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Bit for bit in 16 bits; in fp32 within 2 ulp where eager's scalar tail took ``std::exp``."""
    assert got is not None
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2 * torch.finfo(dtype).eps, atol=1e-30)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,d", [(12, 64), (20, 128), (5, 24), (3, 6)])
def test_rope_rows_on_the_q_and_k_heads_of_a_fused_output_is_bit_exact(dtype: torch.dtype, heads: int, d: int) -> None:
    torch.manual_seed(d)
    qkv = torch.randn(2, 19, heads + 4, d, dtype=dtype)
    x = qkv[:, :, :heads]                                         # q and k heads side by side, rows apart
    cos, sin = torch.randn(2, 19, 1, d, dtype=dtype), torch.randn(2, 19, 1, d, dtype=dtype)
    got = rope_rows(x, cos, sin)
    assert got is not None and torch.equal(got, rope_torch(x, cos, sin))


def test_layouts_the_kernels_do_not_take_fall_back_to_the_torch_ops() -> None:
    x = torch.randn(4, 6, 64)
    cos, sin = torch.randn(1, 6, 1, 64), torch.randn(1, 6, 1, 64)
    assert rope_rows(x.view(4, 6, 1, 64).expand(4, 6, 2, 64), cos.expand(4, 6, 1, 64), sin.expand(4, 6, 1, 64)) is None
    assert rms_norm_rows(x.transpose(0, 1)[..., ::2], torch.randn(32), 1e-6) is None   # no unit stride
    assert rms_norm_rows(x.transpose(0, 1), torch.randn(64), 1e-6) is None           # rows not one stride apart
    assert silu_mul_rows(x, x[..., :32]) is None                                       # shapes differ
    assert rms_norm_rows(x.bfloat16(), torch.randn(64), 1e-6) is None                 # dtypes differ
    # and through norm_rope the torch ops give the values
    got = norm_rope.rms_norm(x.transpose(0, 1), torch.ones(64), 1e-6)
    assert torch.equal(got, norm_rope.rms_norm(x.transpose(0, 1), torch.ones(64), 1e-6, backend="torch"))


def test_the_switch_decides_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    x32, w32 = torch.randn(8, 64), torch.randn(64)
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    assert rms_norm_rows(x32, w32, 1e-6) is not None                          # "on": every dtype
    monkeypatch.setenv(ROW_KERNELS_VAR, "auto")
    assert rms_norm_rows(x32, w32, 1e-6) is None and rms_norm_rows(x16, w16, 1e-6) is not None
    with compiled_gemv_allowed(False):                                        # a small model's forward
        assert rms_norm_rows(x16, w16, 1e-6) is None
        monkeypatch.setenv(ROW_KERNELS_VAR, "on")
        assert rms_norm_rows(x16, w16, 1e-6) is not None
    monkeypatch.setenv(ROW_KERNELS_VAR, "auto")
    monkeypatch.setenv(ROW_KERNELS_VAR, "off")
    assert rms_norm_rows(x16, w16, 1e-6) is None
    monkeypatch.setenv(ROW_KERNELS_VAR, "sometimes")
    with pytest.raises(Exception, match=ROW_KERNELS_VAR):
        rms_norm_rows(x16, w16, 1e-6)


def test_a_kernel_that_does_not_build_leaves_the_torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_rows._build.cache_clear()
    monkeypatch.setattr(cpu_rows, "compile_kernel", lambda *a, **k: (None, 0.0, "no compiler"))
    try:
        x, w = torch.randn(5, 48).bfloat16(), torch.randn(48).bfloat16()
        assert rms_norm_rows(x, w, 1e-6) is None
        assert torch.equal(norm_rope.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    finally:
        cpu_rows._build.cache_clear()


def test_nan_poisoned_outputs_are_all_written() -> None:
    x = torch.randn(33, 200).bfloat16()
    torch.manual_seed(1)
    real_empty = torch.empty
    try:
        torch.empty = lambda *a, **k: real_empty(*a, **k).fill_(float("nan"))   # type: ignore[assignment]
        out = rms_norm_rows(x, torch.ones(200).bfloat16(), 1e-6)
        act = silu_mul_rows(x, x)
    finally:
        torch.empty = real_empty                                             # type: ignore[assignment]
    assert out is not None and act is not None and not out.isnan().any() and not act.isnan().any()


@pytest.mark.parametrize("variant", list(ARCH_VARIANTS))
def test_fp32_tokens_are_the_same_with_the_row_kernels_on_and_off(tiny_model_dir: Callable[..., Path],
                                                                  monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    monkeypatch.setenv("TIERKV_KERNELS", "torch")
    calls: list[str] = []
    build = cpu_rows._kernel
    monkeypatch.setattr(cpu_rows, "_kernel", lambda kind, *a: calls.append(kind) or build(kind, *a))
    prompts = [random_prompt(n, seed=70 + n) for n in (23, 9, 40)]
    got = {}
    for mode in ("off", "on"):
        monkeypatch.setenv(ROW_KERNELS_VAR, mode)
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)                  # no kernel failed to build
            with tierkv.load(tiny_model_dir(variant), device="cpu", dtype="float32", kv="exact",
                             prefill_chunk_tokens=16) as engine:
                solo = engine.generate(prompts[0], max_new_tokens=6, ignore_eos=True).token_ids
                batch = [o.token_ids for o in engine.generate(prompts, max_new_tokens=6, ignore_eos=True)]
        got[mode] = solo, batch
        assert ({"rms_norm", "silu_mul", "rope"} <= set(calls)) == (mode == "on"), (mode, set(calls))
    assert got["on"] == got["off"]
    assert got["on"][1][0] == got["on"][0]


def test_a_failed_build_warns_once_naming_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no compiler here")

    cpu_rows._build.cache_clear()
    monkeypatch.setattr(CppPythonBindingsCodeCache, "load_pybinding", fail)
    try:
        x, w = torch.randn(5, 40).bfloat16(), torch.randn(40).bfloat16()
        with pytest.warns(RuntimeWarning, match=f"{ROW_KERNELS_VAR}=off"):
            assert rms_norm_rows(x, w, 1e-6) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert rms_norm_rows(x, w, 1e-6) is None                          # built once: no second warning
    finally:
        cpu_rows._build.cache_clear()
