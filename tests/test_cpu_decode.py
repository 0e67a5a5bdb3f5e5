"""The fused C++ decode kernels (kernels/cpu_decode.py, kernels/cpu_decode_attention.py) compute what the
eager ops compute (RMSNorm / SiLU x up folded into a product, bias and residual after it; RoPE, the KV
append and attention of one token), the layer and head paths (kernels/decode_fusion.py) apply only where
they should, and a kernel that cannot be built leaves the eager ops with one warning naming the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from tierkv.kernels import cpu_decode, cpu_decode_attention, decode_fusion
from tierkv.errors import ArgumentError
from tierkv.kernels.cpu_decode import BF16_DOT_VAR, decode_kernel, run_decode_kernel
from tierkv.kernels.cpu_qgemv import bf16_dot_cpu
from tierkv.kernels.cpu_decode_attention import attend_kernel, run_attend_kernel
from tierkv.kernels.decode_fusion import FUSED_DECODE_VAR, fused_post_attention, fused_pre_attention
from tierkv.kernels.dense_linear import CPU_MATVEC_VAR
from tierkv.kernels.norm_rope import rms_norm_ref, rope_ref
from tierkv.model import decode_attention

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = ref.double().abs().max().item()
    assert got.dtype == dtype and got.shape == ref.shape
    assert (got.double() - ref.double()).abs().max().item() <= TOL[dtype] * max(scale, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prologue", ["none", "rmsnorm", "swiglu"])
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_product_matches_the_eager_ops(dtype: torch.dtype, prologue: str, bias: bool, residual: bool) -> None:
    torch.manual_seed(7)
    n, k = 37, 72                                         # K not a multiple of two vectors: the tails run
    w = torch.randn(n, k).to(dtype)
    x = torch.randn(2 * k if prologue == "swiglu" else k).to(dtype)
    nw, b, r = torch.randn(k).to(dtype), torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    kernel = decode_kernel(w, prologue, bias, residual)
    assert kernel is not None and kernel.fn is not None, kernel
    got = run_decode_kernel(kernel, w, x, nw if prologue == "rmsnorm" else None, 1e-5, b if bias else None,
                            r if residual else None)
    xin = {"none": lambda: x, "rmsnorm": lambda: rms_norm_ref(x, nw, 1e-5), "swiglu": lambda: F.silu(x[:k]) * x[k:]}[prologue]()
    ref = F.linear(xin, w, b if bias else None)
    ref = r + ref if residual else ref
    _close(got, ref, dtype)


def test_fused_product_reads_a_row_strided_view_and_refuses_a_transposed_one() -> None:
    torch.manual_seed(8)
    buf = torch.randn(64, 100)
    w = buf[4:40, 8:72]                                   # (36, 64), row stride 100
    x = torch.randn(64)
    kernel = decode_kernel(w)
    assert kernel is not None
    _close(run_decode_kernel(kernel, w, x), torch.mv(w, x), torch.float32)
    assert decode_kernel(buf[:64, :36].t()) is None       # unit stride along N, not K: the caller keeps aten


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """fp64 values rounded through bf16, as eager rounds each op's result."""
    return t.to(torch.bfloat16).double()


LOOPS = ["fma", pytest.param("dot", marks=pytest.mark.skipif(not bf16_dot_cpu(), reason="no AVX512-BF16 here"))]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("n,k,stride", [(37, 72, 72), (13, 31, 31), (41, 100, 130), (8, 32, 40), (66, 576, 600),
                                        (5, 1, 3), (3, 95, 96)])
@pytest.mark.parametrize("prologue,bias,residual", [("none", False, False), ("rmsnorm", True, False),
                                                    ("swiglu", False, True), ("none", True, True)])
def test_bf16_loops_match_an_fp64_reference_on_odd_shapes(loop: str, n: int, k: int, stride: int, prologue: str,
                                                          bias: bool, residual: bool) -> None:
    """K not a multiple of 32 (masked tails), N not a multiple of the rows per step, rows strided past K;
    every output written over NaN; each rounding to bf16 where eager rounds, within one bf16 step of each."""
    torch.manual_seed(n * k + stride)
    w = torch.randn(n, stride).bfloat16()[:, :k]
    x = torch.randn(2 * k if prologue == "swiglu" else k).bfloat16()
    nw, b, r = torch.rand(k).add(0.5).bfloat16(), torch.randn(n).bfloat16(), torch.randn(n).bfloat16()
    kernel = decode_kernel(w, prologue, bias, residual, loop=loop)
    assert kernel is not None and kernel.fn is not None and kernel.loop == loop, kernel
    out = torch.full((n,), float("nan"), dtype=torch.bfloat16)
    got = run_decode_kernel(kernel, w, x, nw if prologue == "rmsnorm" else None, 1e-5, b if bias else None,
                            r if residual else None, out=out)
    assert got.data_ptr() == out.data_ptr() and not got.isnan().any()
    xin = {"none": lambda: x, "rmsnorm": lambda: rms_norm_ref(x, nw, 1e-5),
           "swiglu": lambda: F.silu(x[:k]) * x[k:]}[prologue]()                 # bf16, eager's roundings
    exact = w.double() @ xin.double()                                             # (N,)
    ref, slack = _bf16(exact), exact.abs()
    if bias:
        ref, slack = _bf16(ref + b.double()), slack + b.double().abs()
    if residual:
        ref, slack = _bf16(r.double() + ref), slack + r.double().abs()
    # each of the (up to 3) roundings may land one bf16 step (2^-7 relative) away from eager's
    assert ((got.double() - ref).abs() <= 2.0 ** -7 * 3 * slack + 1e-30).all(), (got, ref)


def test_the_loop_follows_the_dtype_the_cpu_and_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    w16, w32 = torch.randn(8, 64).bfloat16(), torch.randn(8, 64)
    monkeypatch.delenv(BF16_DOT_VAR, raising=False)
    assert cpu_decode.pick_loop(torch.bfloat16) == ("dot" if bf16_dot_cpu() else "fma")
    assert cpu_decode.pick_loop(torch.float16) == cpu_decode.pick_loop(torch.float32) == "fma"
    assert decode_kernel(w16).loop == cpu_decode.pick_loop(torch.bfloat16)      # type: ignore[union-attr]
    monkeypatch.setenv(BF16_DOT_VAR, "off")
    assert cpu_decode.pick_loop(torch.bfloat16) == "fma" and decode_kernel(w16).loop == "fma"  # type: ignore[union-attr]
    with pytest.raises(ArgumentError, match="bf16 weights"):
        decode_kernel(w32, loop="dot")
    with pytest.raises(ArgumentError, match="1-16"):
        decode_kernel(w16, loop="fma", rows=0)
    monkeypatch.setenv(BF16_DOT_VAR, "fast")
    with pytest.raises(ArgumentError, match="TIERKV_CPU_BF16_DOT"):
        cpu_decode.pick_loop(torch.bfloat16)


@pytest.mark.skipif(not bf16_dot_cpu(), reason="no AVX512-BF16 here")
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_every_rows_per_step_gives_the_fma_loops_values(rows: int) -> None:
    torch.manual_seed(rows)
    w, x = torch.randn(45, 200).bfloat16(), torch.randn(200).bfloat16()
    fma, dot = decode_kernel(w, loop="fma"), decode_kernel(w, loop="dot", rows=rows)
    assert fma is not None and dot is not None
    a, b = run_decode_kernel(fma, w, x).double(), run_decode_kernel(dot, w, x).double()
    assert ((a - b).abs() <= 2.0 ** -7 * a.abs() + 1e-30).all()          # one bf16 step at most: sums' order


@pytest.mark.skipif(not bf16_dot_cpu(), reason="no AVX512-BF16 here")
@pytest.mark.parametrize("rows", [3, 8])
def test_prefetching_changes_no_value(rows: int) -> None:
    """The software prefetch (of rows past the last one too: prefetches never fault) only moves cache lines."""
    torch.manual_seed(rows)
    w, x, res = torch.randn(61, 300).bfloat16(), torch.randn(300).bfloat16(), torch.randn(61).bfloat16()
    on = decode_kernel(w, residual=True, loop="dot", rows=rows)
    off = decode_kernel(w, residual=True, loop="dot", rows=rows, prefetch=False)
    assert on is not None and off is not None and on.fn is not off.fn
    assert torch.equal(run_decode_kernel(on, w, x, residual=res), run_decode_kernel(off, w, x, residual=res))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,pos", [(4, 2, 0), (4, 2, 70), (3, 3, 129), (6, 2, 200), (4, 2, 1100)])
def test_attention_kernel_rotates_appends_and_attends(dtype: torch.dtype, hq: int, hkv: int, pos: int) -> None:
    """Short contexts on the calling thread, the last case (4 x 1101 scores) over the threads."""
    torch.manual_seed(pos + hq)
    assert 4 * 1101 >= cpu_decode_attention.PARALLEL_MIN_SCORES > 6 * 201
    d, cap = 32, 1200
    qkv = torch.randn((hq + 2 * hkv) * d).to(dtype)
    angles = torch.rand(d // 2) * 6.28
    cos = torch.cat((angles, angles)).cos().to(dtype)
    sin_plain = torch.cat((angles, angles)).sin()
    sin = torch.cat((-sin_plain[: d // 2], sin_plain[d // 2:])).to(dtype)     # the signed table
    k_cache, v_cache = torch.randn(hkv, cap, d).to(dtype), torch.randn(hkv, cap, d).to(dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    kernel = attend_kernel(hq, k_cache)
    assert kernel is not None and kernel.fn is not None
    got = run_attend_kernel(kernel, qkv, cos, sin, k_cache, v_cache, pos, hq)

    heads = qkv.view(hq + 2 * hkv, d)
    rot = rope_ref(heads[: hq + hkv], cos, sin.to(dtype))
    q, k_new, v_new = rot[:hq], rot[hq:], heads[hq + hkv:]
    _close(k_cache[:, pos], k_new, dtype)
    assert torch.equal(v_cache[:, pos], v_new)
    assert torch.equal(k_cache[:, :pos], k_before[:, :pos]) and torch.equal(k_cache[:, pos + 1:], k_before[:, pos + 1:])
    assert torch.equal(v_cache[:, pos + 1:], v_before[:, pos + 1:])
    ref = decode_attention(q[None, :, None].float(), k_cache[None, :, : pos + 1].float(),
                           v_cache[None, :, : pos + 1].float())               # (1, Hq, 1, D)
    _close(got, ref.reshape(-1).to(dtype), dtype)


def _layer(h: int, inter: int, dtype: torch.dtype, bias: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(9)
    w = {"input_layernorm.weight": torch.rand(h) + 0.5, "post_attention_layernorm.weight": torch.rand(h) + 0.5,
         "self_attn.qkv_proj.weight": torch.randn(3 * h, h) * 0.1, "self_attn.o_proj.weight": torch.randn(h, h) * 0.1,
         "mlp.gate_up_proj.weight": torch.randn(2 * inter, h) * 0.1, "mlp.down_proj.weight": torch.randn(h, inter) * 0.1}
    if bias:
        w["self_attn.qkv_proj.bias"] = torch.randn(3 * h) * 0.1
    return {key: t.to(dtype) for key, t in w.items()}


@pytest.mark.parametrize("bias", [False, True])
def test_layer_halves_match_eager_and_apply_only_where_they_should(monkeypatch: pytest.MonkeyPatch, bias: bool) -> None:
    h, inter, eps = 64, 96, 1e-6
    w = _layer(h, inter, torch.float32, bias)
    x, attn = torch.randn(1, 1, h), torch.randn(1, 1, h)
    monkeypatch.setenv(CPU_MATVEC_VAR, "compiled")        # every dtype and size (the tests' tiny shapes)
    qkv = fused_pre_attention(w, x, eps)
    ref_qkv = F.linear(rms_norm_ref(x, w["input_layernorm.weight"], eps), w["self_attn.qkv_proj.weight"],
                       w.get("self_attn.qkv_proj.bias"))
    assert qkv is not None
    _close(qkv, ref_qkv, torch.float32)
    out = fused_post_attention(w, x, attn, eps)
    h1 = x + F.linear(attn, w["self_attn.o_proj.weight"])
    gate, up = F.linear(rms_norm_ref(h1, w["post_attention_layernorm.weight"], eps), w["mlp.gate_up_proj.weight"]).chunk(2, -1)
    assert out is not None
    _close(out, h1 + F.linear(F.silu(gate) * up, w["mlp.down_proj.weight"]), torch.float32)

    assert fused_pre_attention(w, torch.randn(1, 2, h), eps) is None            # two rows: a prefill piece
    assert fused_pre_attention(w, x.bfloat16(), eps) is None                     # weights in another dtype
    unfused = {k: v for k, v in w.items() if not k.startswith("mlp.gate_up")}
    assert fused_post_attention(unfused, x, attn, eps) is None                   # no fused gate/up weight
    monkeypatch.setenv(CPU_MATVEC_VAR, "auto")
    assert fused_pre_attention(w, x, eps) is None                                # auto: fp32 keeps the aten ops
    monkeypatch.setenv(CPU_MATVEC_VAR, "compiled")
    monkeypatch.setenv(FUSED_DECODE_VAR, "off")
    assert fused_pre_attention(w, x, eps) is None and fused_post_attention(w, x, attn, eps) is None


def test_a_kernel_that_cannot_be_built_leaves_the_eager_ops_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    def fail(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(CppPythonBindingsCodeCache, "load_pybinding", fail)
    monkeypatch.setenv(CPU_MATVEC_VAR, "compiled")
    cpu_decode._build.cache_clear()
    cpu_decode_attention._build.cache_clear()
    try:
        w = _layer(48, 64, torch.float32, False)
        x = torch.randn(1, 1, 48)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert fused_pre_attention(w, x, 1e-6) is None
            assert fused_pre_attention(w, x, 1e-6) is None                       # the failure is kept: no second build
            assert attend_kernel(4, torch.zeros(2, 8, 16)) is None
        fixes = [c for c in caught if "TIERKV_CPU_FUSED_DECODE=off" in str(c.message)]
        assert len(fixes) == 2 and "no C++ compiler" in str(fixes[0].message)   # one per kernel that failed
    finally:
        cpu_decode._build.cache_clear()                                          # later tests build real kernels
        cpu_decode_attention._build.cache_clear()
    assert decode_fusion.pick_fused_decode() == "auto"


def test_the_dense_cache_offers_its_buffers_only_where_one_token_sees_every_key() -> None:
    from types import SimpleNamespace

    from tierkv.pipeline.kv.dense import DenseKVCache

    cfg = SimpleNamespace(num_kv_heads=2, head_dim=16, num_layers=2)      # what the cache reads of a config
    one = DenseKVCache(cfg, 1, 16, torch.float32, torch.device("cpu"))
    one.advance(9)
    k, v, pos = one.decode_buffers(0, None)
    assert pos == 9 and k.shape == (cfg.num_kv_heads, 16, cfg.head_dim) and k.data_ptr() == one.k[0].data_ptr()
    assert one.decode_buffers(0, 10) is not None and one.decode_buffers(0, 9) is None   # the window cuts key 0
    assert DenseKVCache(cfg, 2, 16, torch.float32, torch.device("cpu")).decode_buffers(0, None) is None
    one.advance(7)
    assert one.decode_buffers(0, None) is None                                          # full
