"""int4 weights with 8-bit activations through torchao's da8w4 CPU kernel (``kernels.quant_torchao``).

The kernel is optional (torchao is an extra, and its x86 wheels ship no CPU kernels), so this file
checks both sides: without it, "auto" keeps the weight-only op and "torchao" is refused naming the
fix; with it (tests skipped otherwise), ``Da8w4Linear`` against the fp32 weight-only reference of
the stored codes. Tolerance: 2% of max |out| (8-bit activations per row; measured 0.5-0.9% on
N(0, 1) inputs, the 8-bit activations of ``test_quant_dynamic`` ~0.7%); the rest term ``r`` makes
the weight exact, so the error is the activations' alone.
"""

from __future__ import annotations

import pytest
import torch

import tierkv
from tierkv.errors import ArgumentError
from tierkv.kernels import quant_torchao
from tierkv.kernels._select import CPU_QLINEAR_VAR, pick_cpu_qlinear
from tierkv.kernels.quant import DYNAMIC_MAX_M, Da8w4Linear, layer_nbytes, linear_path, prepare_layer, quant_linear, \
    quantize_weight
from tierkv.kernels.quant_reference import quant_linear_ref, quantize_weight_plain
from tierkv.quantspec import QuantWeight, TensorQuant

HAVE_KERNEL = quant_torchao.da8w4_status() is None
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL, reason="torchao with its CPU kernels is not installed")
TOL = 0.02          # of max |out|


def _qw(n: int, k: int, group: int = 64, seed: int = 0) -> tuple[QuantWeight, torch.Tensor]:
    """A stored cpu_int4 (N, K) weight and the fp32 weight its codes stand for."""
    tq = TensorQuant("int4", group, "cpu_int4")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    plain, plain_qp = quantize_weight_plain(w, 4, group)
    return QuantWeight(*quantize_weight(w, tq), tq), quant_linear_ref(torch.eye(k), plain, plain_qp, 4, None).t()


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


def test_without_the_kernel_auto_stays_weight_only_and_torchao_is_refused_with_the_fix(monkeypatch):
    qw, _ = _qw(64, 128)
    monkeypatch.setattr(quant_torchao, "da8w4_status", lambda: "torchao is not installed: build it")
    monkeypatch.delenv(CPU_QLINEAR_VAR, raising=False)
    assert pick_cpu_qlinear() == "auto"
    layer = prepare_layer({"a.weight": qw}, torch.bfloat16, owned=True)
    assert isinstance(layer["a.weight"], QuantWeight) and layer["a.weight"].prepared
    with pytest.raises(ArgumentError, match=r"TIERKV_CPU_QLINEAR=torchao cannot run: torchao is not installed: build it"):
        prepare_layer({"a.weight": qw}, torch.bfloat16, qlinear="torchao")
    assert isinstance(prepare_layer({"a.weight": qw}, torch.bfloat16, qlinear="weight_only")["a.weight"], QuantWeight)


def test_status_names_the_install_when_torchao_is_missing(monkeypatch):
    monkeypatch.setattr(quant_torchao.importlib.util, "find_spec", lambda name: None)
    why = quant_torchao.da8w4_status()
    assert why is not None and "torchao is not installed" in why and "USE_CPU_KERNELS=1" in why


def test_only_int4_cpu_weights_in_the_kernels_groups_qualify():
    assert quant_torchao.da8w4_ok(_qw(64, 128)[0]) and quant_torchao.da8w4_ok(_qw(96, 256, 128)[0])
    assert not quant_torchao.da8w4_ok(_qw(48, 128)[0])                 # N not a multiple of 32
    int8 = QuantWeight(*quantize_weight(torch.randn(64, 128), TensorQuant("int8", 64, "cpu_int4")),
                       TensorQuant("int8", 64, "cpu_int4"))
    assert not quant_torchao.da8w4_ok(int8) and not quant_torchao.da8w4_ok(torch.randn(64, 128))


@needs_kernel
@pytest.mark.parametrize("n,k,group", [(96, 256, 32), (64, 384, 128), (160, 192, 64)])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_da8w4_matches_the_reference_on_odd_shapes(n, k, group, m, dtype):
    qw, w = _qw(n, k, group)
    (lin,) = prepare_layer({"x.weight": qw}, dtype, qlinear="torchao").values()
    assert isinstance(lin, Da8w4Linear) and lin.shape == (n, k) and len(lin.parts) == 1
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert linear_path(x, lin) == "cpu_da8w4"
    out = quant_linear(x, lin, bias=torch.ones(n))
    assert out.dtype == dtype and out.shape == (m, n) and torch.isfinite(out).all()
    assert _err(out, x.float() @ w.t() + 1.0) < TOL
    assert quant_linear(x[:0], lin).shape == (0, n)
    assert quant_torchao.check_da8w4() is None


@needs_kernel
def test_large_batches_run_the_weight_only_parts_and_an_owned_layer_keeps_only_the_packed_copy():
    rows = {"mlp.gate_proj.weight": 64, "mlp.up_proj.weight": 64, "mlp.down_proj.weight": 128}
    layer = {key: _qw(n, 128 if key != "mlp.down_proj.weight" else 64, seed=i)[0] for i, (key, n) in enumerate(rows.items())}
    exact = dict(layer)
    kept = prepare_layer(dict(layer), torch.bfloat16, qlinear="torchao", fuse=True)
    fused = kept["mlp.gate_up_proj.weight"]
    assert isinstance(fused, Da8w4Linear) and fused.shape == (128, 128) and len(fused.parts) == 2
    big = torch.randn(DYNAMIC_MAX_M + 1, 128).bfloat16()
    assert linear_path(big, fused) == "cpu_dequant"
    want = torch.cat([quant_linear(big, exact[k]) for k in list(rows)[:2]], dim=-1)
    torch.testing.assert_close(quant_linear(big, fused), want, rtol=0, atol=0)
    prepare_layer(layer, torch.bfloat16, qlinear="torchao", fuse=True, owned=True)   # owned: the parts go
    assert sorted(layer) == ["mlp.down_proj.weight", "mlp.gate_up_proj.weight"]
    gate_up, down = layer["mlp.gate_up_proj.weight"], layer["mlp.down_proj.weight"]
    assert isinstance(down, Da8w4Linear) and gate_up.parts == () and down.parts == ()
    assert layer_nbytes(layer) == gate_up.extra_nbytes + down.extra_nbytes
    assert linear_path(big, gate_up) == "cpu_da8w4"                                  # every batch, rows rounded alone
    assert _err(quant_linear(big, gate_up), want.float()) < TOL


@needs_kernel
def test_torchao_in_the_resident_engine_tracks_the_weight_only_engine(tiny_model_dir, monkeypatch):
    """The in-memory resident int4 model (it owns its tensors): torchao packs its layers for the kernel;
    logits close to the weight-only engine's, greedy tokens mostly the same."""
    ckpt = tiny_model_dir("llama", hidden_size=128, intermediate_size=256)
    prompt = [3, 17, 42, 5, 99, 23, 8, 61, 120, 7, 33, 150]
    monkeypatch.setenv(CPU_QLINEAR_VAR, "weight_only")
    with tierkv.load(ckpt, device="cpu", quant="int4", group_size=32) as engine:
        exact_tokens = engine.generate(prompt, max_new_tokens=12).token_ids
        exact = engine.logits(prompt + exact_tokens)
    monkeypatch.setenv(CPU_QLINEAR_VAR, "torchao")
    with tierkv.load(ckpt, device="cpu", quant="int4", group_size=32) as engine:
        layer = engine._weights.wait(0)
        assert isinstance(layer["self_attn.qkv_proj.weight"], Da8w4Linear)
        assert isinstance(layer["mlp.down_proj.weight"], Da8w4Linear)
        tokens = engine.generate(prompt, max_new_tokens=12).token_ids
        got = engine.logits(prompt + exact_tokens)
    assert float((got - exact).norm() / exact.norm()) < 0.05
    assert sum(a == b for a, b in zip(tokens, exact_tokens)) >= 9
