"""The compiled CPU matrix-vector kernel (kernels/cpu_gemv.py) computes what ``torch.mv`` computes, on
every layout a weight comes in (contiguous, a strided view, odd sizes, fp16/bf16/fp32, with a bias),
is the default for one decode row of a large 16-bit weight, and falls back to ``torch.mv`` with one
warning naming the fix when it cannot be built."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tierkv.kernels import cpu_gemv
from tierkv.kernels.cpu_mgemv import cpu_class
from tierkv.kernels.dense_linear import GEMV_MIN_ELEMENTS, MGEMV_AUTO_ROWS, dense_linear, linear_path
from tierkv.quantspec import QuantWeight


def _reference(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.mv(w.double(), x.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (96, 64), (130, 1000)])
def test_gemv_matches_the_reference(dtype: torch.dtype, n: int, k: int) -> None:
    torch.manual_seed(n * k)
    w, x = torch.randn(n, k).to(dtype), torch.randn(k).to(dtype)
    got = cpu_gemv.gemv(w, x)
    assert got.shape == (n,) and got.dtype == dtype
    assert cpu_gemv.gemv_kernel(w).fn is not None, cpu_gemv.gemv_kernel(w).error
    ref = _reference(w, x)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_gemv_reads_strided_views_in_place() -> None:
    """A view into a larger buffer (a fused q/k/v weight's part, a transposed weight) gets its own kernel."""
    torch.manual_seed(1)
    buf = torch.randn(64, 80, dtype=torch.bfloat16)
    x = torch.randn(48, dtype=torch.bfloat16)
    for w in (buf[8:40, 16:64], buf[:48, :32].t()):                       # (32, 48) row stride 80; (32, 48) transposed
        assert not w.is_contiguous()
        assert cpu_gemv.gemv_kernel(w).fn is not None, cpu_gemv.gemv_kernel(w).error
        torch.testing.assert_close(cpu_gemv.gemv(w, x).double(), _reference(w, x), rtol=1e-2, atol=0.05)


def test_dense_linear_picks_the_compiled_kernel_for_one_row_of_a_large_16_bit_weight() -> None:
    k = 512
    big = torch.randn(GEMV_MIN_ELEMENTS // k, k, dtype=torch.bfloat16)
    small = torch.randn(8, k, dtype=torch.bfloat16)
    one, few = torch.randn(1, 1, k, dtype=torch.bfloat16), torch.randn(1, 3, k, dtype=torch.bfloat16)
    assert linear_path(one, big) == "gemv" and linear_path(one, small) == "mv"
    batch_kernel = (torch.bfloat16, cpu_class()) in MGEMV_AUTO_ROWS       # kernels/cpu_mgemv.py
    assert linear_path(few, big) == ("mgemv" if batch_kernel else "mm_t")
    assert linear_path(one, big.float()) == "linear" and linear_path(one, small.float(), "compiled") == "gemv"
    assert linear_path(one, big, "on") == "mv" and linear_path(one, big, "off") == "linear"
    bias = torch.randn(big.shape[0], dtype=torch.bfloat16)
    got = dense_linear(one, big, bias)
    assert got.shape == (1, 1, big.shape[0])
    ref = F.linear(one.double(), big.double(), bias.double())
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=0.05)


def test_a_kernel_that_cannot_be_built_falls_back_to_mv_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor

    def fail(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch._inductor, "compile", fail)
    cpu_gemv._build.cache_clear()
    try:
        w, x = torch.randn(11, 13, dtype=torch.bfloat16), torch.randn(13, dtype=torch.bfloat16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kernel = cpu_gemv.gemv_kernel(w)
            got = cpu_gemv.gemv(w, x)                                    # the failure is kept: no second build
        assert kernel.fn is None and "no C++ compiler" in (kernel.error or "")
        assert len([c for c in caught if "TIERKV_CPU_MATVEC=on" in str(c.message)]) == 1
        assert torch.equal(got, torch.mv(w, x))
        assert linear_path(x[None], w, "compiled") == "mv"
    finally:
        cpu_gemv._build.cache_clear()                                     # later tests build real kernels again


def test_inside_torch_compile_the_formula_is_traced_without_a_graph_break() -> None:
    """A layer function that ``torch.compile`` traces (``tierkv.compiled``) calls the kernel as the opaque
    op ``tierkv::gemv`` (a plain call into the prebuilt kernel would break the graph)."""
    torch.manual_seed(2)
    w = torch.randn(GEMV_MIN_ELEMENTS // 256, 256, dtype=torch.bfloat16)
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    compiled = torch.compile(lambda a: dense_linear(a, w) * 2, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), dense_linear(x, w) * 2, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# quantized packs: the compiled loop reads cpu_int8 and cpu_int4 bytes as stored


def _quant(w: torch.Tensor, scheme: str, group: int, pack: str) -> QuantWeight:
    from tierkv.kernels.quant import quantize_weight
    from tierkv.quantspec import TensorQuant

    tq = TensorQuant(scheme, group, pack)
    return QuantWeight(*quantize_weight(w, tq), tq)


@pytest.mark.parametrize("scheme,group,pack,n,dtype", [("int8", "channel", "cpu_int8", 192, torch.bfloat16),
                                                       ("int8", "channel", "cpu_int8", 7, torch.float16)])
def test_quant_gemv_matches_the_dequantized_weight(scheme: str, group: int | str, pack: str, n: int,
                                                   dtype: torch.dtype) -> None:
    from tierkv.kernels.quant import dequantize_weight
    from tierkv.quantspec import CHANNEL

    torch.manual_seed(n)
    k = 256
    w = torch.randn(n, k)
    w[:, : k // 8] *= 3.0                                          # groups with different scales
    qw = _quant(w, scheme, CHANNEL if group == "channel" else group, pack)
    x = torch.randn(k).to(dtype)
    assert cpu_gemv.quant_gemv_supported(qw, dtype)
    got = cpu_gemv.quant_gemv(qw, x)
    ref = dequantize_weight(qw, torch.float32) @ x.float()         # the stored weight, exactly, in fp32
    assert got.shape == (n,) and got.dtype == dtype
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert ((got.float() - ref).abs().max() / ref.abs().max()).item() < tol


def test_quant_gemv_applies_only_where_it_reads_the_pack() -> None:
    from tierkv.kernels import cpu_qgemv, quant_cpu
    from tierkv.quantspec import CHANNEL

    w = torch.randn(64, 128)
    assert cpu_gemv.quant_gemv_supported(_quant(w, "int8", CHANNEL, "cpu_int8"), torch.bfloat16)
    assert not cpu_gemv.quant_gemv_supported(_quant(w, "int8", CHANNEL, "cpu_int8"), torch.float32)   # fp32 x: the op
    assert not cpu_gemv.quant_gemv_supported(_quant(w, "int8", CHANNEL, "plain"), torch.bfloat16)
    int4 = _quant(w, "int4", 32, "cpu_int4")
    assert cpu_gemv.quant_gemv_supported(int4, torch.bfloat16) == (quant_cpu.cpu_layout() == "AVX512" and
                                                                   cpu_qgemv.int4_kernel_cpu())
    assert not cpu_gemv.quant_gemv_supported(int4, torch.float16)        # its x pairs feed bf16 dot products
    assert not cpu_gemv.quant_gemv_supported(_quant(torch.randn(80, 128), "int4", 32, "cpu_int4"), torch.bfloat16)


def test_quant_linear_takes_the_compiled_loop_for_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    from tierkv.kernels.dense_linear import CPU_MATVEC_VAR
    from tierkv.kernels.quant import linear_path as quant_path, quant_linear

    torch.manual_seed(3)
    from tierkv.quantspec import CHANNEL

    small = _quant(torch.randn(64, 256), "int8", CHANNEL, "cpu_int8")
    big = _quant(torch.randn(GEMV_MIN_ELEMENTS // 256, 256), "int8", CHANNEL, "cpu_int8")
    one, few = torch.randn(1, 1, 256).bfloat16(), torch.randn(1, 3, 256).bfloat16()
    bias = torch.randn(64).bfloat16()
    assert quant_path(one, big) == "cpu_gemv" and quant_path(one, small) == "cpu_fused"
    assert quant_path(few, big) == "cpu_fused"
    monkeypatch.setenv(CPU_MATVEC_VAR, "compiled")
    assert quant_path(one, small) == "cpu_gemv"
    got = quant_linear(one, small, bias)
    monkeypatch.setenv(CPU_MATVEC_VAR, "on")
    assert quant_path(one, small) == "cpu_fused"
    ref = quant_linear(one, small, bias)
    assert got.shape == ref.shape == (1, 1, 64)
    assert ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item() < 1e-2


def test_small_models_keep_torch_mv_under_auto(tiny_llama_dir) -> None:
    """The Runner of a model below COMPILED_GEMV_MIN_PARAMS turns the compiled kernels off for its forwards
    (their one-time build would cost more than its replies); "compiled" still forces them."""
    import tierkv
    from tierkv.kernels.dense_linear import COMPILED_GEMV_MIN_PARAMS, compiled_gemv_allowed

    big = torch.randn(GEMV_MIN_ELEMENTS // 256, 256, dtype=torch.bfloat16)
    one = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    with compiled_gemv_allowed(False):
        assert linear_path(one, big) == "mv" and linear_path(one, big, "compiled") == "gemv"
    assert linear_path(one, big) == "gemv"
    with tierkv.load(tiny_llama_dir, device="cpu", dtype="bfloat16") as engine:
        assert engine.config.param_count() < COMPILED_GEMV_MIN_PARAMS and not engine.runner.compiled_gemv


def test_a_large_model_keeps_its_kernels_in_the_offload_dir(tiny_llama_dir, tmp_path, monkeypatch) -> None:
    """Engines of models that take the compiled kernels point inductor's cache at the offload directory
    (it outlives a reboot, /tmp does not), unless the user chose a directory."""
    import tierkv
    import tierkv.runner
    from tierkv.compiled import CACHE_DIR_VAR

    monkeypatch.setattr(tierkv.runner, "COMPILED_GEMV_MIN_PARAMS", 0)      # the tiny model counts as large
    monkeypatch.setenv("TIERKV_CPU_MATVEC", "on")                            # no kernel build in this test
    monkeypatch.setenv(CACHE_DIR_VAR, "")
    with tierkv.load(tiny_llama_dir, device="cpu", dtype="bfloat16", offload_dir=tmp_path) as engine:
        assert engine.runner.compiled_gemv
    assert Path(os.environ[CACHE_DIR_VAR]) == (tmp_path / "inductor").resolve()
    monkeypatch.setenv(CACHE_DIR_VAR, str(tmp_path / "mine"))
    with tierkv.load(tiny_llama_dir, device="cpu", dtype="bfloat16", offload_dir=tmp_path):
        pass
    assert os.environ[CACHE_DIR_VAR] == str(tmp_path / "mine")
