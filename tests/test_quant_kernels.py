"""Quantized linear kernels: reference round trip, Triton (interpreted on the CPU) and the CPU fused op
against the reference, the tinygemm layout read back, and which path the wrapper takes per pack.

Tolerances (outputs compared relative to the reference's scale, fresh random inputs each test):
fp32 within 2e-5 of max |ref|; fp16 within 2e-3; bf16 within 1e-2 (the fused CPU op rounds its scales and zeros
to bf16 and accumulates in its own order; Triton rounds the weight to bf16 as the reference does). Per-channel
int8 (``CHANNEL_TOL``): the same, but bf16 within 1.5e-2 (the int8 op rounds each row's scale to bf16).
Prepared CPU op parameters give bitwise the outputs of deriving them per call.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tierkv.errors import ArgumentError
from tierkv.kernels import quant_cpu
from tierkv.kernels._select import HAS_TRITON
from tierkv.kernels.quant import (CPU_DEQUANT_MIN_M, DEQUANT_MIN_M, dequantize_fwd, dequantize_weight, linear_path,
                                  prepare, quant_linear, quant_matmul_fwd, quantize_weight)
from tierkv.kernels.quant_reference import dequantize_weight_plain, quant_linear_ref, quantize_weight_plain
from tierkv.quantspec import BITS, CHANNEL, QuantWeight, TensorQuant, choose_pack

ROOT = Path(__file__).resolve().parent.parent
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}   # x max |ref|
ROUND_TRIP_REL_L2 = {4: 0.12, 8: 0.008}                      # randn weights, any group size here
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="no triton")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)                                      # unseeded draws below repeat run to run


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    w[:, : k // 8] *= 3.0                                     # uneven groups: scales differ along K
    return w


def _qw(w: torch.Tensor, scheme: str, group: int, pack: str) -> QuantWeight:
    tq = TensorQuant(scheme, group, pack)
    return QuantWeight(*quantize_weight(w, tq), tq)


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


# ---------------------------------------------------------------------------------------------
# quantize / dequantize


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_round_trip_error_is_within_half_a_step(scheme, group):
    w = _weight(48, 384, seed=group)
    qw = _qw(w, scheme, group, "plain")
    back = dequantize_weight(qw, backend="torch")
    scale, minimum = (p.float().t().repeat_interleave(group, dim=1) for p in qw.qparams.unbind(-1))  # (N, K)
    levels = (1 << BITS[scheme]) - 1
    bound = 0.5 * scale + 1e-3 * (minimum.abs() + levels * scale)   # half a step + fp16 rounding of the params
    assert ((back - w).abs() <= bound).all()
    assert ((back - w).norm() / w.norm()).item() < ROUND_TRIP_REL_L2[BITS[scheme]]


def test_a_constant_group_comes_back_exactly():
    w = torch.full((16, 64), 0.375)
    w[:, 32:] = torch.randn(16, 32)
    back = dequantize_weight(_qw(w, "int4", 32, "plain"), backend="torch")
    assert torch.equal(back[:, :32], w[:, :32])


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("pack", ["plain", "cpu_int4"])
def test_stored_tensors_have_the_spec_shapes_and_the_same_codes(scheme, pack):
    w = _weight(48, 192, seed=3)
    qw = _qw(w, scheme, 64, pack)
    stored = qw.quant.stored((48, 192))
    assert (qw.data.dtype, tuple(qw.data.shape)) == (torch.uint8, stored[""][1])
    assert (qw.qparams.dtype, tuple(qw.qparams.shape)) == (torch.float16, stored[".qparams"][1])
    plain = quantize_weight_plain(w, BITS[scheme], 64)
    assert torch.equal(qw.qparams, plain[1])
    # the cpu_int4 layout, read back, holds exactly the plain pack's codes
    assert torch.equal(dequantize_weight(qw), dequantize_weight_plain(*plain, BITS[scheme]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", ["int4", "int8"])
@needs_triton
def test_dequant_kernel_matches_reference(dtype, scheme):
    w = _weight(40, 160, seed=5)                              # N not a multiple of the 64-row tile
    qw = _qw(w, scheme, 32, "plain")
    out = torch.full((40, 160), float("nan"), dtype=dtype)
    dequantize_fwd(qw.data, qw.qparams, BITS[scheme], 32, out)
    ref = dequantize_weight_plain(qw.data, qw.qparams, BITS[scheme], dtype)
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]  # the interpreter's casts
    torch.testing.assert_close(out, ref, rtol=ulp, atol=1e-6)                            # may truncate: one ulp


# ---------------------------------------------------------------------------------------------
# Triton fused matmul (interpreter) against the reference


TRITON_SHAPES = [(1, 40, 96, 32), (3, 24, 192, 64), (17, 56, 384, 128)]   # (M, N, K, group): N, K not powers of 2


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("M,N,K,group", TRITON_SHAPES)
@needs_triton
def test_triton_fused_matmul_matches_reference(dtype, scheme, M, N, K, group):
    qw = _qw(_weight(N, K, seed=M + N), scheme, group, "plain")
    gen = torch.Generator().manual_seed(K)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if M == 3 else None
    out = torch.full((M, N), float("nan"), dtype=dtype)
    quant_matmul_fwd(x, qw.data, qw.qparams, BITS[scheme], group, bias, out)
    w = dequantize_weight_plain(qw.data, qw.qparams, BITS[scheme], dtype)   # the weight rounded as the kernel does
    ref = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())  # fp32 math
    assert torch.isfinite(out).all()
    assert _err(out, ref) < TOL[dtype]


@needs_triton
def test_triton_handles_strided_rows_and_the_dequantize_path():
    qw = _qw(_weight(24, 128, seed=9), "int4", 64, "plain")
    x = torch.randn(5, 256)[:, ::2]                           # a non-contiguous (5, 128) input
    assert linear_path(x, qw, backend="triton") == "triton_fused"
    torch.testing.assert_close(quant_linear(x, qw, backend="triton"), quant_linear_ref(x, qw.data, qw.qparams, 4),
                               rtol=2e-5, atol=2e-5)
    xl = torch.randn(DEQUANT_MIN_M, 128)
    assert linear_path(xl, qw, backend="triton") == "triton_dequant"
    torch.testing.assert_close(quant_linear(xl, qw, backend="triton"), quant_linear_ref(xl, qw.data, qw.qparams, 4),
                               rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# CPU fused op against the reference


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("M,N,K,group", [(1, 16, 64, 32), (3, 48, 192, 64), (17, 80, 256, 128), (5, 128, 96, 32)])
def test_cpu_fused_op_matches_reference(dtype, scheme, M, N, K, group):
    w = _weight(N, K, seed=N)
    qw = _qw(w, scheme, group, "cpu_int4")
    plain = quantize_weight_plain(w, BITS[scheme], group)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
    got = quant_cpu.cpu_quant_matmul(x, qw.data, qw.qparams, BITS[scheme], group)
    ref = quant_linear_ref(x.float(), *plain, BITS[scheme])   # fp32 reference on the same (rounded) inputs
    assert got.dtype == dtype and got.shape == (M, N)
    assert _err(got, ref) < TOL[dtype]


@pytest.mark.parametrize("pack", ["plain", "cpu_int4"])
def test_bias_and_leading_dims(pack, monkeypatch):
    monkeypatch.setenv("TIERKV_KERNELS", "torch")
    w = _weight(32, 128, seed=1)
    qw = _qw(w, "int8", 64, pack)
    x = torch.randn(2, 3, 128).bfloat16()
    bias = torch.randn(32)                                    # fp32 bias: cast to x's dtype
    got = quant_linear(x, qw, bias)
    ref = quant_linear_ref(x.float(), *quantize_weight_plain(w, 8, 64), 8, bias)
    assert got.shape == (2, 3, 32) and got.dtype == torch.bfloat16
    assert _err(got, ref) < TOL[torch.bfloat16]
    assert quant_linear(x[:, :0], qw, bias).shape == (2, 0, 32)


def test_fp32_batches_on_cpu_int4_take_the_dequantize_path_and_match():
    w = _weight(48, 128, seed=2)
    qw = _qw(w, "int4", 32, "cpu_int4")
    x1, xb = torch.randn(1, 128), torch.randn(4, 3, 128)
    assert linear_path(x1, qw) == "cpu_fused" and linear_path(xb, qw) == "cpu_dequant"
    plain = quantize_weight_plain(w, 4, 32)
    for x in (x1, xb):
        assert _err(quant_linear(x, qw), quant_linear_ref(x, *plain, 4)) < TOL[torch.float32]


@pytest.mark.parametrize("M", [CPU_DEQUANT_MIN_M[torch.bfloat16] - 1, 1000])
def test_bf16_prefill_sized_batches_on_either_side_of_the_switch(M):
    w = _weight(64, 128, seed=M)
    qw = _qw(w, "int4", 64, "cpu_int4")
    x = torch.randn(M, 128).bfloat16()
    assert linear_path(x, qw) == ("cpu_fused" if M < CPU_DEQUANT_MIN_M[torch.bfloat16] else "cpu_dequant")
    ref = quant_linear_ref(x.float(), *quantize_weight_plain(w, 4, 64), 4)
    assert _err(quant_linear(x, qw), ref) < TOL[torch.bfloat16]


def test_the_op_constraints_are_checked_before_the_op_runs():
    x = torch.randn(2, 128)
    quant_cpu.check_op_args(x, 32, 128, 64)
    for n, k, group, match in ((24, 128, 64, "N divisible by 16"), (32, 128, 16, "group size in"),
                               (32, 96, 64, "dividing K")):
        with pytest.raises(ArgumentError, match=match):
            quant_cpu.check_op_args(torch.randn(2, k), n, k, group)
    with pytest.raises(ArgumentError, match="float32, bfloat16 or float16"):
        quant_cpu.check_op_args(x.double(), 32, 128, 64)


# ---------------------------------------------------------------------------------------------
# the tinygemm layout, per CPU capability

_LAYOUT_CHECK = """
import sys
import torch
from tierkv.kernels import quant_cpu
planes = {}
for n in (16, 32, 48, 64, 80, 96, 112, 128, 208):
    for k in (64, 96):
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        planes[(n, k)] = (codes, quant_cpu.pack_codes(codes))
        assert torch.equal(quant_cpu.unpack_codes(planes[(n, k)][1], n, k), codes), (n, k)
torch.save(planes, sys.argv[1])
print(quant_cpu.cpu_layout())
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_unpacking_inverts_the_converter_under_each_cpu_capability(capability, tmp_path):
    """In a process per capability; the planes it packed are then read here, under this process's layout."""
    saved = tmp_path / "planes.pt"
    run = subprocess.run([sys.executable, "-c", _LAYOUT_CHECK, str(saved)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    layout = run.stdout.strip()
    assert layout in ("DEFAULT", "AVX2", "AVX512")              # a CPU without the ISA dispatches lower
    for (n, k), (codes, packed) in torch.load(saved).items():
        assert torch.equal(quant_cpu.unpack_codes(packed, n, k, layout=layout), codes), (layout, n, k)
        if layout != quant_cpu.cpu_layout() and n >= 64:       # the layouts differ: reading it as ours fails
            assert not torch.equal(quant_cpu.unpack_codes(packed, n, k), codes)


def test_an_unknown_layout_is_read_through_the_op(monkeypatch):
    codes = torch.randint(0, 16, (48, 320), dtype=torch.uint8)
    packed = quant_cpu.pack_codes(codes)
    monkeypatch.setattr(quant_cpu, "cpu_layout", lambda: "SVE256")
    assert torch.equal(quant_cpu.unpack_codes(packed, 48, 320), codes)
    with pytest.raises(ArgumentError, match="packed under CPU layout 'VSX' on this SVE256 machine"):
        quant_cpu.unpack_codes(packed, 48, 320, layout="VSX")


# ---------------------------------------------------------------------------------------------
# the wrapper's choice and bad input


def test_the_path_per_pack_and_the_override(monkeypatch):
    w = _weight(32, 64, seed=4)
    plain, cpu = _qw(w, "int4", 32, "plain"), _qw(w, "int4", 32, "cpu_int4")
    x = torch.randn(1, 64).bfloat16()
    big = torch.randn(CPU_DEQUANT_MIN_M[torch.bfloat16], 64).bfloat16()
    monkeypatch.delenv("TIERKV_KERNELS", raising=False)
    assert linear_path(x, cpu) == "cpu_fused" and linear_path(big, cpu) == "cpu_dequant"
    assert linear_path(x, plain) == ("triton_fused" if HAS_TRITON else "torch")   # the interpreter counts as Triton
    assert linear_path(x, plain, backend="torch") == "torch"
    monkeypatch.setenv("TIERKV_KERNELS", "torch")
    assert linear_path(x, plain) == "torch" and linear_path(x, cpu) == "cpu_fused"  # cpu_int4 has one implementation
    if HAS_TRITON:
        monkeypatch.setenv("TIERKV_KERNELS", "triton")
        assert linear_path(x, plain) == "triton_fused"
    monkeypatch.setenv("TIERKV_KERNELS", "fastest")
    with pytest.raises(ArgumentError, match="kernel backend must be one of"):
        quant_linear(x, plain)


def test_bad_input_is_refused_with_what_to_do():
    w = _weight(24, 96, seed=6)
    with pytest.raises(ArgumentError, match="group size 64 does not divide the input dimension 96.*32"):
        quantize_weight(w, TensorQuant("int4", 64, "plain"))
    with pytest.raises(ArgumentError, match="divisible by 16.*plain pack"):
        quantize_weight(w, TensorQuant("int4", 32, "cpu_int4"))
    qw = _qw(w, "int8", 32, "plain")
    with pytest.raises(ArgumentError, match="last dim must be 96"):
        quant_linear(torch.randn(2, 95), qw)
    with pytest.raises(ArgumentError, match="float32, bfloat16 or float16"):
        quant_linear(torch.ones(2, 96, dtype=torch.int32), qw)
    with pytest.raises(ArgumentError, match=r"bias must be \(24,\)"):
        quant_linear(torch.randn(2, 96), qw, torch.randn(23))
    on_meta = _qw(_weight(32, 96, seed=7), "int4", 32, "cpu_int4").to("meta")   # stands in for a GPU
    with pytest.raises(ArgumentError, match="cpu_int4 pack computes on the CPU only.*plain pack"):
        quant_linear(torch.randn(2, 96, device="meta"), on_meta)


# ---------------------------------------------------------------------------------------------
# the compiler, without a GPU

_COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tierkv.kernels import quant

def sig(ptrs, ints, consts):
    return {**ptrs, **{n: "i32" for n in ints}, **{c: "constexpr" for c in consts}}

target = GPUTarget("cuda", 90, 32)
for bits, dtype, prec in ((4, "bf16", None), (8, "fp32", "ieee")):
    consts = {"BITS": bits, "GROUP": 64, "BLOCK_M": 16, "BLOCK_N": 32, "HAS_BIAS": True, "DOT_PRECISION": prec,
              "UPCAST": False}
    ptrs = {"x_ptr": "*" + dtype, "w_ptr": "*u8", "qp_ptr": "*fp16", "bias_ptr": "*" + dtype, "out_ptr": "*" + dtype}
    ints = ("M", "N", "K", "s_xm", "s_xk", "s_wn", "s_wk", "s_qg", "s_qn", "s_qc", "s_om", "s_on")
    src = ASTSource(fn=quant._quant_matmul_kernel, signature=sig(ptrs, ints, consts), constexprs=consts)
    assert "cubin" in triton.compile(src, target=target).asm
consts = {"BITS": 4, "GROUP": 32, "BLOCK_N": 64}
ptrs = {"w_ptr": "*u8", "qp_ptr": "*fp16", "out_ptr": "*bf16"}
ints = ("N", "s_wn", "s_wk", "s_qg", "s_qn", "s_qc", "s_on", "s_ok")
src = ASTSource(fn=quant._dequant_kernel, signature=sig(ptrs, ints, consts), constexprs=consts)
assert "cubin" in triton.compile(src, target=target).asm
print("compiled")
"""


@needs_triton
def test_kernels_compile_to_a_cubin_for_a_gpu_target():
    """What the interpreter cannot show: the compiler takes the kernels (nibble shifts on uint8, 16-bit dots).

    In a fresh process: Triton's interpreter state of this session cannot be switched off in place.
    ``TIERKV_KERNELS=triton`` asks for the Triton kernels: a CPU-only torch does not import Triton otherwise."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": str(ROOT),
           "TIERKV_KERNELS": "triton"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=env)
    if run.returncode and ("ptxas" in run.stderr or "No module named 'triton.backends.nvidia'" in run.stderr):
        pytest.skip(f"this triton build cannot compile for CUDA: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0 and run.stdout.strip() == "compiled", run.stderr


# ---------------------------------------------------------------------------------------------
# the benchmark script, on tiny shapes


@pytest.mark.parametrize("pack", ["cpu_int4", pytest.param("plain", marks=needs_triton)])
def test_the_benchmark_runs_and_ends_with_one_json_line(pack):
    """--pack plain on the CPU is the dry run of the CUDA rows (Triton through the interpreter)."""
    import json

    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_quant_kernels.py"), "--device", "cpu",
                          "--pack", pack, "--shapes", "64x128", "--ms", "1,64", "--repeats", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT,
                         env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["bench"] == "quant_kernels" and record["pack"] == pack
    rows = record["results"][0]["by_m"]["64"]
    assert {"bf16_linear", "int4_fused", "int8_fused", "int4_dequant_linear", "int8_dequant_linear"} <= set(rows)
    if pack == "plain":
        assert rows["int4_fused"]["max_rel_err_vs_fp32"] < TOL[torch.bfloat16]
        assert set(record["results"][0]["dequant_kernel"]) == {"int4", "int8"}


# ---------------------------------------------------------------------------------------------
# per-channel int8 (quantspec.CHANNEL) and prepared CPU op parameters

CHANNEL_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}   # x max |ref|; cpu_int8 bf16:
# the op rounds each row's scale to bf16 (up to 0.4% of that row) and its output: measured <= 0.9%


@pytest.mark.parametrize("dtype", list(CHANNEL_TOL))
@pytest.mark.parametrize("pack", ["cpu_int8", pytest.param("plain", marks=needs_triton)])
@pytest.mark.parametrize("M,N,K", [(1, 40, 96), (3, 48, 200), (5, 80, 256), (2, 17, 160)])
def test_channel_int8_matches_the_reference(dtype, pack, M, N, K):
    """One (scale, minimum) per output row: the CPU int8 op with its rank-1 correction, and the plain pack
    through Triton (K tiled as groups of 128/64/32 over a stride-0 view; K = 200 fits none: the reference)."""
    w = _weight(N, K, seed=M + N)
    if pack == "cpu_int8" and K % 16:                                          # the op's bf16 path needs K % 16
        assert choose_pack("int8", (N, K), "cpu", CHANNEL) == "plain"
        with pytest.raises(ArgumentError, match="cpu_int8 pack needs the input dimension divisible by 16"):
            _qw(w, "int8", CHANNEL, pack)
        return
    qw = _qw(w, "int8", CHANNEL, pack)
    data, qparams = quantize_weight_plain(w, 8, K)                            # the reference's one group per row
    assert qw.shape == (N, K) and qw.qparams.shape == (1, N, 2)
    torch.testing.assert_close(qw.qparams, qparams, rtol=0, atol=0)
    x = torch.randn(M, K).to(dtype)
    ref = quant_linear_ref(x.float(), data, qparams, 8)
    got = quant_linear(x, qw, backend="triton")
    path = linear_path(x, qw, backend="triton")
    if pack == "cpu_int8":
        assert path == ("cpu_fused" if M < CPU_DEQUANT_MIN_M[dtype] else "cpu_dequant")
    else:
        assert path == ("torch" if K % 32 else "triton_fused")
    assert got.dtype == dtype and _err(got, ref) < CHANNEL_TOL[dtype], (_err(got, ref), path)
    torch.testing.assert_close(dequantize_weight(qw), dequantize_weight_plain(data, qparams, 8), rtol=0, atol=0)
    big = torch.randn(CPU_DEQUANT_MIN_M[torch.bfloat16] + 3, K).to(torch.bfloat16)   # the dequantize path
    assert _err(quant_linear(big, qw, backend="triton"), quant_linear_ref(big.float(), data, qparams, 8)) < 1e-2


@needs_triton
def test_channel_triton_writes_every_output_of_a_nan_poisoned_buffer():
    w = _weight(48, 192, seed=3)
    qw = _qw(w, "int8", CHANNEL, "plain")
    x = torch.randn(3, 192)
    out = torch.full((3, 48), float("nan"))
    quant_matmul_fwd(x, qw.data, qw.qparams.expand(192 // 64, 48, 2), 8, 64, None, out)
    assert not out.isnan().any()
    assert _err(out, quant_linear_ref(x, qw.data, qw.qparams, 8)) < 2e-5
    deq = torch.full((48, 192), float("nan"))
    dequantize_fwd(qw.data, qw.qparams.expand(192 // 64, 48, 2), 8, 64, deq)
    torch.testing.assert_close(deq, dequantize_weight_plain(qw.data, qw.qparams, 8), rtol=0, atol=0)


def test_channel_stored_sizes_and_facts_come_from_quantspec():
    from tierkv.quantspec import GROUP_SIZE_CHOICES, WeightQuant, parse_group_size, weight_bytes_per_param
    for pack in ("cpu_int8", "plain"):
        tq = TensorQuant("int8", CHANNEL, pack)
        assert tq.stored((48, 208)) == {"": ("uint8", (48, 208)), ".qparams": ("float16", (1, 48, 2))}
        assert tq.nbytes((48, 208)) == 48 * 208 + 48 * 4
        assert TensorQuant.from_json(tq.to_json()) == tq and tq.to_json()["group_size"] == "channel"
    assert choose_pack("int8", (40, 96), "cpu", CHANNEL) == "cpu_int8"     # any N: the int8 op has no row blocks
    assert choose_pack("int8", (40, 200), "cpu", CHANNEL) == "plain"       # K % 16
    assert choose_pack("int8", (40, 96), "cuda", CHANNEL) == "plain"
    assert choose_pack("int8", (48, 96), "cpu", 64) == "cpu_int4"
    assert weight_bytes_per_param("int8", CHANNEL) == 1.0 < weight_bytes_per_param("int8", 64)
    assert parse_group_size("channel") == parse_group_size(0) == CHANNEL and parse_group_size("64") == 64
    assert WeightQuant("int8", "channel") == WeightQuant("int8", CHANNEL)
    assert WeightQuant.from_json(WeightQuant("int8", CHANNEL).to_json()) == WeightQuant("int8", CHANNEL)
    assert GROUP_SIZE_CHOICES == "32, 64, 128, channel"
    with pytest.raises(ArgumentError, match="group size 48 is not supported; choose one of 32, 64, 128, channel"):
        parse_group_size(48)
    with pytest.raises(ArgumentError, match="per-channel groups are for int8 only; use --group-size 32, 64 or 128"):
        WeightQuant("int4", "channel")


@pytest.mark.parametrize("scheme,group,pack", [("int4", 64, "cpu_int4"), ("int8", 32, "cpu_int4"),
                                               ("int8", CHANNEL, "cpu_int8"), ("int4", 64, "plain")])
def test_prepared_parameters_give_the_same_bits_as_deriving_them(scheme, group, pack):
    """``prepare`` (weights that stay put) and the per-call derivation (streamed slots) are one function:
    bitwise the same outputs, for the prepared dtype and (falling back to deriving) for another."""
    qw = _qw(_weight(64, 256, seed=5), scheme, group, pack)
    ready = prepare(qw, torch.bfloat16)
    if pack == "plain":
        assert ready is qw                                      # Triton reads qparams directly: nothing to prepare
    else:
        assert ready.prepared and all(p.dtype == torch.bfloat16 for p in ready.prepared if p.dim() == 3)
        assert len(ready.to("cpu").prepared) == len(ready.prepared)      # .to keeps them
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(1, 256).to(dtype)
        assert torch.equal(quant_linear(x, ready, backend="torch"), quant_linear(x, qw, backend="torch"))
