"""RMSNorm and RoPE kernels (kernels/norm_rope.py) against HF's formulas.

The Triton kernels run under the interpreter (TRITON_INTERPRET=1, set by conftest) on odd shapes,
strided inputs and NaN-poisoned outputs; the CPU torch paths must give HF's values bit for bit
(the decode path uses them, and fp32 tokens must not change). The compiled kernels are checked on
CUDA under the ``gpu`` marker. Tolerances: fp32 a few ulps of the row scale; bf16 two bf16 ulps
(the kernels round once where HF rounds two or three times).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from tierkv.kernels import norm_rope
from tierkv.kernels.norm_rope import rms_norm, rms_norm_fwd, rms_norm_ref, rms_norm_torch, rope, rope_fwd, rope_ref, \
    rope_torch, signed_sin

TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6}     # relative to the largest |value|: bf16 two ulps
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in TOL]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not got.isnan().any()
    scale = want.float().abs().max().clamp_min(1e-6)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= TOL[dtype], f"max error {err:.3g} x max|ref| over {TOL[dtype]}"


def _tables(rows: int, t: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (rows, t, 1, d) of random angles, laid out as ``model.step_inputs`` builds them."""
    ang = torch.rand(rows, t, 1, d // 2, generator=gen) * 100
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().to(dtype), signed_sin(ang.sin()).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 7), (3, 64), (5, 576), (2, 130)])
def test_rms_norm_triton_matches_reference_on_odd_shapes(dtype, rows, n):
    gen = torch.Generator().manual_seed(rows * n)
    wide = torch.randn(rows, n + 9, generator=gen).to(dtype) * 3
    x = wide[:, 4:4 + n]                                             # rows strided by n + 9
    w = (torch.randn(n, generator=gen) + 1).to(dtype)
    out = torch.full((rows, n + 3), float("nan"), dtype=dtype)       # poisoned, strided by n + 3
    rms_norm_fwd(x, w, 1e-5, out[:, :n])
    _close(out[:, :n], rms_norm_ref(x, w, 1e-5), dtype)
    assert out[:, n:].isnan().all(), "the kernel wrote outside its rows"
    _close(rms_norm(x.reshape(rows, 1, n), w, 1e-5, backend="triton"), rms_norm_ref(x.reshape(rows, 1, n), w, 1e-5),
           dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 3, 64), (4, 9, 7)])
def test_rms_norm_torch_path_is_hf_bit_for_bit(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 5).to(dtype)
    for w in ((torch.randn(shape[-1], generator=gen) + 1).to(dtype), torch.ones(shape[-1])):   # compute dtype; fp32
        want = rms_norm_ref(x, w, 1e-6)
        assert torch.equal(rms_norm_torch(x, w, 1e-6), want)
        assert torch.equal(rms_norm(x, w, 1e-6), want)               # auto on the CPU: the torch path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,t,heads,d", [(1, 1, 12, 64), (1, 5, 3, 10), (2, 3, 4, 80), (1, 2, 1, 2)])
def test_rope_triton_matches_reference_on_strided_heads(dtype, rows, t, heads, d):
    gen = torch.Generator().manual_seed(rows * t * heads * d)
    cos, sin = _tables(rows, t, d, dtype, gen)
    qkv = torch.randn(rows, t, heads + 2, d, generator=gen).to(dtype)
    x = qkv[:, :, :heads]                                            # the q/k heads of a fused output: strided
    want = rope_ref(x, cos, sin)
    out = torch.full((rows, t, heads + 1, d), float("nan"), dtype=dtype)
    rope_fwd(x, cos, sin, out[:, :, 1:])
    _close(out[:, :, 1:], want, dtype)
    assert out[:, :, 0].isnan().all(), "the kernel wrote outside its heads"
    _close(rope(x, cos, sin, backend="triton"), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_torch_path_is_hf_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(3)
    cos, sin = _tables(2, 7, 64, dtype, gen)
    x = torch.randn(2, 7, 20, 64, generator=gen).to(dtype)[:, :, 3:15]
    half = 32
    plain_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    hf = x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * plain_sin   # HF's rotate_half form
    assert torch.equal(rope_ref(x, cos, sin), hf)
    assert torch.equal(rope_torch(x, cos, sin), hf)
    assert torch.equal(rope(x, cos, sin), hf)                        # auto on the CPU: the torch path


def test_backend_choice_errors_name_the_variable_and_torch_wins(monkeypatch):
    """An unknown backend names the variable; "torch" forced by the environment wins over auto."""
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(Exception, match="TIERKV_KERNELS"):
        rms_norm(x, w, 1e-5, backend="fast")
    monkeypatch.setenv("TIERKV_KERNELS", "torch")
    assert torch.equal(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_kernels_match_the_references_on_cuda(dtype, monkeypatch):
    """Compiled (not interpreted) kernels: a fresh copy of the module imported with TRITON_INTERPRET=0."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    spec = importlib.util.find_spec("tierkv.kernels.norm_rope")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}[dtype]
    gen = torch.Generator().manual_seed(0)
    for rows, n in [(1, 576), (7, 2048), (33, 130)]:
        x = torch.randn(rows, 1, n, generator=gen).to(dtype).cuda()
        w = (torch.randn(n, generator=gen) + 1).to(dtype).cuda()
        got, want = mod.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)
        assert float((got.float() - want.float()).abs().max() / want.float().abs().max()) <= tol
    for rows, t, heads, d in [(1, 1, 40, 128), (1, 37, 12, 64), (3, 5, 5, 80)]:
        cos, sin = _tables(rows, t, d, dtype, gen)
        x = torch.randn(rows, t, heads + 4, d, generator=gen).to(dtype).cuda()[:, :, :heads]
        got, want = mod.rope(x, cos.cuda(), sin.cuda()), rope_ref(x, cos.cuda(), sin.cuda())
        assert float((got.float() - want.float()).abs().max() / want.float().abs().max()) <= tol
    assert os.environ["TRITON_INTERPRET"] == "0" and norm_rope is not mod
