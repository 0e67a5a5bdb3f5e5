"""Chunk abstracts: Triton (interpreted on the CPU) against the torch reference, plus backend choice."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tierkv.kernels import abstract_append, chunk_abstract
from tierkv.kernels._select import HAS_TRITON, pick_backend
from tierkv.kernels.abstract import _chunk_abstract_kernel
from tierkv.kernels.reference import chunk_abstract_ref

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _nan_pair(B, H, C, D, dtype):
    return torch.full((B, H, C, D), float("nan"), dtype=dtype), torch.full((B, H, C, D), float("nan"), dtype=dtype)


def _starts(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0)[:-1].tolist()], dtype=torch.int32)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,H,D,sizes",
    [
        (1, 1, 16, [5]),  # C = 1
        (2, 3, 40, [7, 23, 1, 33, 26, 10]),  # D not a power of two, variable sizes, partial last
        (1, 2, 64, [64, 64, 17]),  # T not a multiple of the chunk size
    ],
)
def test_triton_matches_reference(dtype, B, H, D, sizes):
    gen = torch.Generator().manual_seed(hash((B, H, D, len(sizes))) % 2**31)
    T = sum(sizes)
    keys = torch.randn(B, H, T, D, generator=gen).to(dtype)
    starts = _starts(sizes)
    out = _nan_pair(B, H, len(sizes), D, dtype)
    kmin, kmax = chunk_abstract(keys, starts, out=out, backend="triton")
    ref_min, ref_max = chunk_abstract_ref(keys, starts)
    assert kmin is out[0] and kmax is out[1]
    assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)  # min/max are exact
    first = keys[:, :, : sizes[0]]
    assert torch.equal(kmin[:, :, 0], first.amin(2)) and torch.equal(kmax[:, :, 0], first.amax(2))


@needs_triton
def test_strided_keys_and_int64_starts():
    keys = torch.randn(2, 50, 3, 24).transpose(1, 2)  # (B, H, T, D) view of a (B, T, H, D) layout
    starts = torch.tensor([0, 16, 32, 48], dtype=torch.int64)
    got = chunk_abstract(keys, starts, backend="triton")
    for g, r in zip(got, chunk_abstract_ref(keys.contiguous(), starts)):
        assert torch.equal(g, r)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_append_matches_full_recompute(backend):
    B, H, D = 2, 2, 20
    keys = torch.randn(B, H, 45, D)
    # prefill 30 tokens in chunks [0, 16) and [16, 30); decode appends 5 then opens [35, 45)
    kmin, kmax = torch.full((B, H, 3, D), float("nan")), torch.full((B, H, 3, D), float("nan"))
    chunk_abstract(keys[:, :, :30], torch.tensor([0, 16]), out=(kmin[:, :, :2], kmax[:, :, :2]), backend=backend)
    abstract_append(kmin, kmax, keys[:, :, 30:35], chunk=1, backend=backend)
    abstract_append(kmin, kmax, keys[:, :, 35:36], chunk=-1, fresh=True, backend=backend)
    abstract_append(kmin, kmax, keys[:, :, 36:45], chunk=2, backend=backend)
    ref_min, ref_max = chunk_abstract_ref(keys, torch.tensor([0, 16, 35]))
    assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)


@pytest.mark.parametrize(
    "starts,match",
    [([1, 5], "begin at 0"), ([0, 5, 5], "strictly"), ([0, 40], "below T"), ([], "non-empty")],
)
def test_bad_starts_raise(starts, match):
    with pytest.raises(ValueError, match=match):
        chunk_abstract(torch.randn(1, 1, 40, 8), torch.tensor(starts, dtype=torch.int32), backend="torch")


def test_bad_append_raises():
    kmin = kmax = torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="new_keys"):
        abstract_append(kmin, kmax, torch.zeros(1, 2, 4, 7))
    with pytest.raises(IndexError):
        abstract_append(kmin, kmax, torch.zeros(1, 2, 4, 8), chunk=3)


def test_backend_choice(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("TIERKV_KERNELS", "torch")
    assert pick_backend(_chunk_abstract_kernel, x) == "torch"
    if HAS_TRITON:
        assert pick_backend(_chunk_abstract_kernel, x, backend="triton") == "triton"  # argument wins
        monkeypatch.setenv("TIERKV_KERNELS", "triton")
        assert pick_backend(_chunk_abstract_kernel, x) == "triton"
        monkeypatch.delenv("TIERKV_KERNELS")
        assert pick_backend(_chunk_abstract_kernel, x) == "triton"  # interpreted kernel, CPU tensors
        assert pick_backend(lambda: None, x) == "torch"  # a compiled-only kernel cannot take CPU tensors
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            pick_backend(lambda: None, x, backend="triton")
    monkeypatch.setenv("TIERKV_KERNELS", "cuda")
    with pytest.raises(ValueError, match="TIERKV_KERNELS"):
        pick_backend(_chunk_abstract_kernel, x)


NO_TRITON_ASKED = ("TIERKV_KERNELS", "TRITON_INTERPRET")     # neither asks for Triton: as a CPU user's shell


def _fresh_python(code: str, drop: tuple[str, ...], extra: dict[str, str] | None = None,
                  timeout_s: float = 60) -> subprocess.CompletedProcess:
    """``python -c code`` in a new interpreter on this checkout, without the ``drop`` variables, with ``extra``."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for var in drop:
        env.pop(var, None)
    return subprocess.run([sys.executable, "-c", code], env={**env, **(extra or {})}, capture_output=True, text=True,
                          timeout=timeout_s)


def test_package_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, tierkv.kernels as k\n"
        "from tierkv.kernels._select import HAS_TRITON; assert not HAS_TRITON\n"
        "lo, hi = k.chunk_abstract(torch.randn(1, 1, 9, 4), torch.tensor([0, 4]))\n"
        "assert lo.shape == (1, 1, 2, 4)\n"
        "try:\n    k.chunk_abstract(torch.randn(1, 1, 9, 4), torch.tensor([0]), backend='triton')\n"
        "except RuntimeError as e:\n    assert 'not installed' in str(e)\nelse:\n    raise SystemExit('no error')\n"
    )
    run = _fresh_python(code, drop=("TIERKV_KERNELS",))
    assert run.returncode == 0, run.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch imports Triton (it may launch)")
def test_cpu_only_torch_leaves_triton_unimported():
    """A CPU-only torch build without TRITON_INTERPRET never launches a Triton kernel: tierkv runs without
    importing Triton (its ~73 MB would come out of what a cgroup-detected budget gets), the kernels take
    the torch path, a forced Triton backend names the fix, and TRITON_INTERPRET brings Triton back."""
    pytest.importorskip("triton")
    code = (
        "import sys, torch, tierkv, tierkv.kernels as k\n"
        "from tierkv.kernels import _select\n"
        "assert not _select.HAS_TRITON and 'triton' not in sys.modules, sorted(m for m in sys.modules if 'triton' in m)\n"
        "lo, hi = k.chunk_abstract(torch.randn(1, 1, 9, 4), torch.tensor([0, 4]))\n"
        "assert lo.shape == (1, 1, 2, 4)\n"
        "try:\n    k.chunk_abstract(torch.randn(1, 1, 9, 4), torch.tensor([0]), backend='triton')\n"
        "except RuntimeError as e:\n    assert 'TRITON_INTERPRET=1' in str(e), e\nelse:\n    raise SystemExit('no error')\n"
        # the CPU probes every machine reaches (AMX or not: the vector width probe imports inductor's code cache)
        "from tierkv.kernels import cpu_mgemv, cpu_qgemv\n"
        "cpu_qgemv.vector_width(), cpu_qgemv.bf16_dot_cpu(), cpu_mgemv.cpu_class()\n"
        "assert 'triton' not in sys.modules, 'a CPU probe imported triton'\n"
        "print('ok')\n"
    )
    run = _fresh_python(code, drop=NO_TRITON_ASKED)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr
    back = "import tierkv.kernels._select as s, sys; assert s.HAS_TRITON and 'triton' in sys.modules\n"
    for extra in ({"TRITON_INTERPRET": "1"}, {"TIERKV_KERNELS": "triton"}):
        run = _fresh_python(back, drop=NO_TRITON_ASKED, extra=extra)
        assert run.returncode == 0, (extra, run.stderr)


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch imports Triton (it may launch)")
def test_cpu_engine_builds_its_kernels_and_compiles_without_triton(tiny_llama_dir):
    """The C++ kernels (inductor's loader) and torch.compile'd layer halves build in a CPU-only process
    without Triton in it (dynamo's and the flop counter's `import triton` probes answered 'missing'), give
    the same tokens, and the program's own `import triton` still works afterwards."""
    pytest.importorskip("triton")
    code = f"""
import sys, torch, tierkv
torch.manual_seed(0)
with tierkv.load({str(tiny_llama_dir)!r}, dtype="bfloat16") as eng:
    eager = eng.generate([1, 2, 3, 4], max_new_tokens=4).token_ids
assert 'triton' not in sys.modules, 'eager engine imported triton'
with tierkv.load({str(tiny_llama_dir)!r}, dtype="bfloat16", compile=True) as eng:
    compiled = eng.generate([1, 2, 3, 4], max_new_tokens=4).token_ids
    stats = eng.compile_stats()["compile"]
    assert stats["active"] and stats["graphs"] > 0, stats
assert 'triton' not in sys.modules, 'compiling imported triton'
assert compiled == eager, (compiled, eager)
import triton
print('ok')
"""
    run = _fresh_python(code, drop=NO_TRITON_ASKED, timeout_s=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
