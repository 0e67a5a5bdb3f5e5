"""Resident-layer preparation: dynamic int8 activations for cpu_int8 linears, fused q/k/v and gate/up.

``kernels.quant.prepare_layer`` may replace per-channel int8 weights with ``DynamicInt8Linear`` (x
rounded to 8 bits per call, an int8 GEMM: ``TIERKV_CPU_QLINEAR=dynamic_int8``) and add fused
linears (``TIERKV_FUSE_LINEARS``). Checked here against the fp32 reference of the stored codes
(``quant_reference``), against the weight-only path, and end to end against the 16-bit engine.
Tolerances: the dynamic op within 2% of max |out| (measured ~0.7% on N(0, 1) inputs; the bf16
weight-only op ~0.5%); fused 16-bit linears equal to the separate ones to fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch

import tierkv
from tierkv.errors import ArgumentError
from tierkv.kernels import quant_cpu
from tierkv.kernels._select import CPU_QLINEAR_VAR, FUSE_VAR, fuse_linears, pick_cpu_qlinear
from tierkv.kernels.quant import DYNAMIC_MAX_M, DynamicInt8Linear, layer_nbytes, linear_path, prepare_layer, \
    quant_linear, quantize_weight
from tierkv.kernels.quant_reference import quant_linear_ref, quantize_weight_plain
from tierkv.model import mlp
from tierkv.quantspec import CHANNEL, QuantWeight, TensorQuant

pytestmark = pytest.mark.skipif(quant_cpu.dynamic_int8_engine() is None, reason="no quantized engine in this torch")
INT8_CHANNEL = TensorQuant("int8", CHANNEL, "cpu_int8")
INT4 = TensorQuant("int4", 64, "cpu_int4")
DYN_TOL = 0.02          # of max |out|


def _qw(n: int, k: int, tq: TensorQuant = INT8_CHANNEL, seed: int = 0) -> tuple[QuantWeight, torch.Tensor]:
    """A stored (N, K) weight of ``tq`` and the fp32 weight its codes stand for."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    data, qparams = quantize_weight(w, tq)
    plain, plain_qp = quantize_weight_plain(w, tq.bits, k if tq.group_size == CHANNEL else tq.group_size)
    eye = torch.eye(k)
    return QuantWeight(data, qparams, tq), quant_linear_ref(eye, plain, plain_qp, tq.bits, None).t()  # (N, K)


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("n,k", [(48, 64), (100, 208), (512, 256)])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dynamic_int8_matches_the_reference_on_odd_shapes(n, k, m, dtype):
    qw, w = _qw(n, k)
    (dyn,) = prepare_layer({"x.weight": qw}, dtype, qlinear="dynamic_int8").values()
    assert isinstance(dyn, DynamicInt8Linear) and dyn.shape == (n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert linear_path(x, dyn) == "cpu_dynamic"
    out = quant_linear(x, dyn, bias=torch.ones(n))
    assert out.dtype == dtype and out.shape == (m, n) and torch.isfinite(out).all()
    ref = x.float() @ w.t() + 1.0
    assert _err(out, ref) < DYN_TOL, _err(out, ref)
    assert quant_linear(x[:0], dyn).shape == (0, n)


def test_large_batches_run_the_exact_weight_only_parts():
    """M >= DYNAMIC_MAX_M (prefill): each stored part through the weight-only path, bit for bit."""
    parts = {f"mlp.{p}_proj.weight": _qw(96, 128, seed=i)[0] for i, p in enumerate(("gate", "up"))}
    layer = prepare_layer(dict(parts), torch.bfloat16, qlinear="dynamic_int8", fuse=True)
    fused = layer["mlp.gate_up_proj.weight"]
    assert isinstance(fused, DynamicInt8Linear) and fused.shape == (192, 128)
    assert [p.data.data_ptr() for p in fused.parts] == [q.data.data_ptr() for q in parts.values()]
    assert all(isinstance(layer[key], QuantWeight) for key in parts), "a fused group's parts stay as stored"
    x = torch.randn(DYNAMIC_MAX_M, 128).bfloat16()
    assert linear_path(x, fused) == "cpu_dequant"
    exact = torch.cat([quant_linear(x, layer[key]) for key in parts], dim=-1)
    assert torch.equal(quant_linear(x, fused), exact)
    one = x[:1]
    ref = torch.cat([one.float() @ _qw(96, 128, seed=i)[1].t() for i in range(2)], dim=-1)
    assert _err(quant_linear(one, fused), ref) < DYN_TOL


def test_only_per_channel_int8_on_the_cpu_goes_dynamic_and_weight_only_is_the_default(monkeypatch):
    int4, _ = _qw(64, 128, INT4)
    int8, _ = _qw(64, 128)
    dense = torch.randn(64, 128)
    layer = prepare_layer({"a.weight": int4, "b.weight": int8, "c.weight": dense}, torch.bfloat16,
                          qlinear="dynamic_int8")
    assert isinstance(layer["a.weight"], QuantWeight) and layer["a.weight"].prepared
    assert isinstance(layer["b.weight"], DynamicInt8Linear)
    assert layer["c.weight"] is dense
    monkeypatch.delenv(CPU_QLINEAR_VAR, raising=False)
    assert isinstance(prepare_layer({"b.weight": int8}, torch.bfloat16)["b.weight"], QuantWeight)
    monkeypatch.setenv(CPU_QLINEAR_VAR, "dynamic_int8")
    assert isinstance(prepare_layer({"b.weight": int8}, torch.bfloat16)["b.weight"], DynamicInt8Linear)
    monkeypatch.setenv(CPU_QLINEAR_VAR, "int2")
    with pytest.raises(ArgumentError, match="weight_only"):
        pick_cpu_qlinear()
    monkeypatch.setenv(FUSE_VAR, "yes")
    with pytest.raises(ArgumentError, match="0, 1, quant"):
        fuse_linears()
    monkeypatch.delenv(FUSE_VAR)
    assert fuse_linears() == "all"                      # 16-bit weights fuse by default (kernels.dense_linear)
    monkeypatch.setenv(FUSE_VAR, "quant")
    assert fuse_linears() == "quant"
    monkeypatch.setenv(FUSE_VAR, "1")
    assert (fuse_linears(), fuse_linears(False)) == ("all", "none")


def test_16bit_weights_fuse_unless_asked_not_to(monkeypatch):
    monkeypatch.delenv(FUSE_VAR, raising=False)
    assert "mlp.gate_up_proj.weight" in prepare_layer(_dense_layer(adjacent=True), torch.float32)
    monkeypatch.setenv(FUSE_VAR, "quant")
    assert "mlp.gate_up_proj.weight" not in prepare_layer(_dense_layer(adjacent=True), torch.float32)


def _dense_layer(adjacent: bool, bias: str = "none") -> dict[str, torch.Tensor]:
    """gate/up (96, 64) fp32 weights, back to back in one buffer (as the store writes them) or apart;
    bias "none", "all" or "some"."""
    gen = torch.Generator().manual_seed(3)
    buf = torch.randn(2 * 96 * 64 + (0 if adjacent else 64), generator=gen) * 0.1
    gate = buf[: 96 * 64].view(96, 64)
    start = 96 * 64 + (0 if adjacent else 64)
    layer = {"mlp.gate_proj.weight": gate, "mlp.up_proj.weight": buf[start: start + 96 * 64].view(96, 64),
             "mlp.down_proj.weight": torch.randn(64, 96, generator=gen) * 0.1}
    for i, p in enumerate(("gate", "up")):
        if bias == "all" or (bias == "some" and i == 0):
            layer[f"mlp.{p}_proj.bias"] = torch.randn(96, generator=gen)
    return layer


@pytest.mark.parametrize("bias", ["none", "all"])
def test_adjacent_16bit_weights_fuse_into_one_view_with_the_same_output(bias):
    layer = _dense_layer(adjacent=True, bias=bias)
    x = torch.randn(2, 3, 64)
    separate = mlp(layer, x)
    prepare_layer(layer, torch.float32, fuse=True)
    fused = layer["mlp.gate_up_proj.weight"]
    assert fused.shape == (192, 64) and fused.data_ptr() == layer["mlp.gate_proj.weight"].data_ptr(), "a view"
    assert ("mlp.gate_up_proj.bias" in layer) == (bias == "all")
    torch.testing.assert_close(mlp(layer, x), separate, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("adjacent,bias", [(False, "none"), (True, "some")])
def test_no_fusion_where_it_would_copy_or_the_biases_differ(adjacent, bias):
    layer = _dense_layer(adjacent=adjacent, bias=bias)
    prepare_layer(layer, torch.float32, fuse=True)
    assert "mlp.gate_up_proj.weight" not in layer
    adjacent_layer = prepare_layer(_dense_layer(adjacent=True), torch.float32, fuse=False)
    assert "mlp.gate_up_proj.weight" not in adjacent_layer


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    ckpt = tiny_model_dir("llama", hidden_size=128, intermediate_size=256)
    prompt = [3, 17, 42, 5, 99, 23, 8, 61, 120, 7, 33, 150]
    with tierkv.load(ckpt, device="cpu") as engine:
        ids = prompt + engine.generate(prompt, max_new_tokens=12).token_ids
        return ckpt, ids, engine.logits(ids)


def test_dynamic_int8_engine_tracks_16bit_and_the_weight_only_path(tiny, monkeypatch):
    """Resident int8 channel with dynamic activations (these forwards are all under DYNAMIC_MAX_M rows):
    logits close to the 16-bit engine's, greedy tokens mostly those of the weight-only engine."""
    ckpt, ids, reference = tiny
    monkeypatch.setenv(CPU_QLINEAR_VAR, "weight_only")
    with tierkv.load(ckpt, device="cpu", quant="int8", group_size="channel") as engine:
        exact_tokens = engine.generate(ids[:12], max_new_tokens=12).token_ids
    monkeypatch.setenv(CPU_QLINEAR_VAR, "dynamic_int8")
    with tierkv.load(ckpt, device="cpu", quant="int8", group_size="channel") as engine:
        layer = engine._weights.wait(0)
        assert isinstance(layer["self_attn.qkv_proj.weight"], DynamicInt8Linear)
        assert isinstance(layer["mlp.down_proj.weight"], DynamicInt8Linear)
        steps = torch.stack([engine.logits(ids[: t + 1])[-1] for t in range(11, len(ids) - 1)])
        tokens = engine.generate(ids[:12], max_new_tokens=12).token_ids
    ref = reference[11:-1]
    assert float((steps - ref).norm() / ref.norm()) < 0.05
    assert (steps.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85
    assert sum(a == b for a, b in zip(tokens, exact_tokens)) >= 9


@pytest.mark.parametrize("tq", [INT4, TensorQuant("int8", 64, "cpu_int4"), INT8_CHANNEL])
@pytest.mark.parametrize("rows", [(128, 64, 64), (48, 64)])
def test_owned_quantized_parts_fuse_into_one_weight_with_the_same_output(tq, rows):
    """Weights a dict owns (the in-memory resident model): concatenated along N, the parts re-pointed at
    row slices of the fused weight; its output equals the separate ones' bit for bit. cpu_int4 planes
    concatenate only in whole blocks of the layout's rows (48 rows before the last part: not fused)."""
    names = [f"self_attn.{p}_proj.weight" for p in "qkv"][: len(rows)] if len(rows) == 3 else \
        ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
    fused_key = "self_attn.qkv_proj.weight" if len(rows) == 3 else "mlp.gate_up_proj.weight"
    layer = {key: _qw(n, 128, tq, seed=i)[0] for i, (key, n) in enumerate(zip(names, rows))}
    x = torch.randn(1, 128).bfloat16()
    separate = torch.cat([quant_linear(x, prepare_layer({"w": w}, torch.bfloat16)["w"]) for w in layer.values()], -1)
    concatenates = tq.pack != "cpu_int4" or quant_cpu.rows_concatenate(list(rows))
    before = layer_nbytes(layer)
    prepare_layer(layer, torch.bfloat16, qlinear="weight_only", fuse=True, owned=True)
    assert (fused_key in layer) == concatenates
    if not concatenates:
        return
    fused = layer[fused_key]
    assert fused.shape == (sum(rows), 128) and fused.prepared
    assert torch.equal(quant_linear(x, fused), separate)
    for i, key in enumerate(names):                   # the parts alone still compute right (derived per call)
        start = sum(rows[:i])
        assert torch.equal(quant_linear(x, layer[key]), separate[:, start:start + rows[i]])
    assert layer_nbytes(layer) == before, "the fused weight is counted once"


def test_owned_16bit_weights_fuse_by_copying_once_and_their_parts_become_slices():
    layer = _dense_layer(adjacent=False)
    x = torch.randn(1, 64)
    separate = mlp(layer, x)
    prepare_layer(layer, torch.float32, fuse=True, owned=True)
    fused = layer["mlp.gate_up_proj.weight"]
    assert layer["mlp.up_proj.weight"].data_ptr() == fused.data_ptr() + 96 * 64 * 4
    torch.testing.assert_close(mlp(layer, x), separate, rtol=1e-6, atol=1e-6)


def test_an_owned_dynamic_layer_keeps_only_the_packed_copy_and_large_batches_stay_weight_only():
    """owned=True (the in-memory resident model): the stored parts leave the dict, the fused or single
    DynamicInt8Linear holds no parts, and M >= DYNAMIC_MAX_M dequantizes its packed codes: the weight-only
    path's weight, so the same output to GEMM rounding."""
    rows = {"self_attn.q_proj.weight": 64, "self_attn.k_proj.weight": 32, "self_attn.v_proj.weight": 32,
            "self_attn.o_proj.weight": 128}
    layer = {key: _qw(n, 128, seed=i)[0] for i, (key, n) in enumerate(rows.items())}
    exact = dict(layer)
    prepare_layer(layer, torch.bfloat16, qlinear="dynamic_int8", fuse=True, owned=True)
    assert sorted(layer) == ["self_attn.o_proj.weight", "self_attn.qkv_proj.weight"]
    qkv, o = layer["self_attn.qkv_proj.weight"], layer["self_attn.o_proj.weight"]
    assert qkv.parts == () and o.parts == () and qkv.shape == (128, 128)
    assert layer_nbytes(layer) == qkv.extra_nbytes + o.extra_nbytes
    x = torch.randn(DYNAMIC_MAX_M + 3, 128).bfloat16()
    want = torch.cat([quant_linear(x, exact[k]) for k in list(rows)[:3]], dim=-1)
    torch.testing.assert_close(quant_linear(x, qkv), want, rtol=0, atol=float(want.abs().max()) * 1e-2)
    torch.testing.assert_close(quant_linear(x, o), quant_linear(x, exact["self_attn.o_proj.weight"]), rtol=0, atol=0)
