"""The decode step's op choices leave the tokens as they were: the CPU matrix-vector paths
(kernels/dense_linear.py, ``TIERKV_CPU_MATVEC``) and fused 16-bit q/k/v and gate/up linears
(``TIERKV_FUSE_LINEARS``), on and off, on every supported architecture, alone and in a ragged batch
(decode rows M = 3: the "mm_t" path), resident and with layers kept in a store buffer."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import tierkv
import tierkv.model
from conftest import ARCH_VARIANTS
from placements import random_prompt
from tierkv.config import Policy
from tierkv.engine import Engine
from tierkv.errors import ArgumentError
from tierkv.io.convert import convert
from tierkv.io.store import WeightStore
from tierkv.kernels import decode_fusion
from tierkv.kernels.cpu_decode import BF16_DOT_VAR
from tierkv.kernels.cpu_qgemv import bf16_dot_cpu
from tierkv.kernels.decode_fusion import FUSED_DECODE_VAR
from tierkv.kernels.dense_linear import CPU_MATVEC_VAR, MM_T_MAX_M, dense_linear, linear_path
from tierkv.pipeline.weights import StreamingWeights

pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")

PROMPTS = [random_prompt(n, seed=40 + n) for n in (9, 21, 5)]
NEW = 8
MODES = {"off": {CPU_MATVEC_VAR: "off", "TIERKV_FUSE_LINEARS": "0"},
         "on": {CPU_MATVEC_VAR: "on", "TIERKV_FUSE_LINEARS": "1"},
         "compiled": {CPU_MATVEC_VAR: "compiled", "TIERKV_FUSE_LINEARS": "1", FUSED_DECODE_VAR: "off"},
         "fused_decode": {CPU_MATVEC_VAR: "compiled", "TIERKV_FUSE_LINEARS": "1", FUSED_DECODE_VAR: "auto"}}


def _tokens(engine: Engine) -> tuple[list[int], list[list[int]]]:
    solo = engine.generate(PROMPTS[0], max_new_tokens=NEW, ignore_eos=True).token_ids
    batch = [o.token_ids for o in engine.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)]
    return solo, batch


@pytest.mark.parametrize("variant", list(ARCH_VARIANTS))
def test_fp32_tokens_are_the_same_with_every_decode_path(tiny_model_dir: Callable[..., Path],
                                                         monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    path = tiny_model_dir(variant)
    got = {}
    fused_calls: list[int] = []
    run = decode_fusion.run_decode_kernel
    monkeypatch.setattr(decode_fusion, "run_decode_kernel", lambda *a, **k: fused_calls.append(1) or run(*a, **k))
    attend_calls: list[int] = []
    attend = tierkv.model.run_attend_kernel
    monkeypatch.setattr(tierkv.model, "run_attend_kernel", lambda *a, **k: attend_calls.append(1) or attend(*a, **k))
    for name, env in MODES.items():
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        fused_calls.clear()
        attend_calls.clear()
        with tierkv.load(path, device="cpu", dtype="float32", kv="exact") as engine:
            layer = engine._weights.wait(0)
            assert ("mlp.gate_up_proj.weight" in layer) == (name != "off")
            got[name] = _tokens(engine)
            layers = engine.config.num_layers
        # fused decode: 4 calls per layer and 1 for the head for each of the solo run's decode steps (and a
        # head call for a prefill's last row), none otherwise
        assert (len(fused_calls) >= (4 * layers + 1) * (NEW - 1)) if name == "fused_decode" else not fused_calls, name
        # and RoPE + KV append + attention in one call per layer, except with q/k norms (Qwen3: the eager ops)
        attends = name == "fused_decode" and variant != "qwen3-qknorm"
        assert len(attend_calls) == (layers * (NEW - 1) if attends else 0), (name, len(attend_calls))
    assert got["on"] == got["off"] == got["compiled"] == got["fused_decode"]
    assert got["on"][1][0] == got["on"][0]                          # the batch's first row is its solo run


def test_fused_store_buffer_layers_are_views_and_give_the_same_tokens(tiny_model_dir: Callable[..., Path],
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers kept in store buffers (device and host tiers) fuse as strided views: no copy, same tokens."""
    ckpt = tiny_model_dir("llama")
    store = WeightStore.open(convert(ckpt, tmp_path / "store"))
    got = {}
    for name, env in MODES.items():
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        weights = StreamingWeights(store, "cpu", (0,), (1,), 1, 64 << 20, 64 << 20)
        with Engine(ckpt, Policy(device="cpu"), weights=weights) as engine:
            for j in (0, 1):
                layer = engine._weights.wait(j)
                fused = layer.get("self_attn.qkv_proj.weight")
                assert (fused is not None) == (name != "off")
                if fused is not None:
                    assert fused.data_ptr() == layer["self_attn.q_proj.weight"].data_ptr()
                    assert fused.untyped_storage().data_ptr() == layer["self_attn.v_proj.weight"].untyped_storage().data_ptr()
            got[name] = _tokens(engine)
    assert got["on"] == got["off"] == got["compiled"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 3, MM_T_MAX_M, MM_T_MAX_M + 1, 40])
def test_dense_linear_matches_f_linear(dtype: torch.dtype, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    buf = torch.randn(3 * 37, 29, generator=gen).to(dtype)
    weight = buf[37:2 * 37 + 30]                                      # (67, 29), a view into a larger buffer
    bias = torch.randn(67, generator=gen).to(dtype)
    x = torch.randn(1, rows, 29, generator=gen).to(dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for b in (None, bias):
        want = F.linear(x.float(), weight.float(), None if b is None else b.float())
        got = dense_linear(x, weight, b, choice="on")
        assert got.shape == (1, rows, 67) and got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
        assert torch.equal(dense_linear(x, weight, b, choice="off"), F.linear(x, weight, b))


def test_linear_path_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    w16, w32 = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(4, 8)
    one, few, many = torch.zeros(1, 1, 8), torch.zeros(1, 3, 8), torch.zeros(2, MM_T_MAX_M, 8)
    assert [linear_path(x, w16) for x in (one, few, many)] == ["mv", "mm_t", "linear"]
    assert linear_path(one, w32) == "linear" and linear_path(one, w32, "on") == "mv"
    assert linear_path(one, w16, "off") == "linear"
    assert linear_path(one, torch.zeros(4, 8, dtype=torch.bfloat16, device="meta")) == "linear"   # off the CPU
    monkeypatch.setenv(CPU_MATVEC_VAR, "off")
    assert linear_path(one, w16) == "linear"
    monkeypatch.setenv(CPU_MATVEC_VAR, "fastest")
    with pytest.raises(ArgumentError, match=CPU_MATVEC_VAR):
        linear_path(one, w16)


@pytest.mark.parametrize("switch", ["auto", "off"])
def test_bf16_fused_decode_runs_the_cpus_rows_loop(tiny_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
                                                   switch: str) -> None:
    """bf16 weights: the dot-product loop where the CPU has AVX512-BF16, the FMA loop with the switch off."""
    loops: list[str] = []
    run = decode_fusion.run_decode_kernel
    monkeypatch.setattr(decode_fusion, "run_decode_kernel", lambda kern, *a, **k: loops.append(kern.loop) or run(kern, *a, **k))
    for key, value in dict(MODES["fused_decode"], **{BF16_DOT_VAR: switch}).items():
        monkeypatch.setenv(key, value)
    with tierkv.load(tiny_model_dir("llama"), device="cpu", dtype="bfloat16", kv="exact") as engine:
        out = engine.generate(PROMPTS[0], max_new_tokens=NEW, ignore_eos=True).token_ids
    assert len(out) == NEW and loops
    assert set(loops) == {"dot" if switch == "auto" and bf16_dot_cpu() else "fma"}
