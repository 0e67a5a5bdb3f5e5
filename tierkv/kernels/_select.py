"""The one place that decides whether a kernel runs as Triton or as its torch reference.

Why this module exists: every kernel in ``tierkv.kernels`` is a triplet (Triton kernel, launcher,
torch reference) and the public wrapper must pick one the same way everywhere. Triton is optional
(CPU-only installs, macOS), so its import is wrapped here and the kernel modules decorate with
``jit`` from this module, which returns the plain function when Triton is missing. Where no Triton
kernel could launch (a CPU-only torch build without ``TRITON_INTERPRET``) it is not imported at all
(``triton_can_run``): its ~73 MB would only shrink the memory budgets can take.

Rule, read at call time (no cached mutable state): an explicit ``backend=`` argument wins, then
the environment variable ``TIERKV_KERNELS=torch|triton``, then auto: Triton when every tensor is on
CUDA and Triton imports, or when the tensors are on the CPU and the kernels were built by the
Triton interpreter (``TRITON_INTERPRET=1`` set before the first import of a kernel module).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Literal

import torch

from tierkv.errors import ArgumentError

Backend = Literal["torch", "triton"]
ENV_VAR = "TIERKV_KERNELS"
_CHOICES = ("torch", "triton", "auto")


def triton_can_run() -> bool:
    """Whether a Triton kernel could launch in this process: torch was built with CUDA, or the Triton
    interpreter was asked for (``TRITON_INTERPRET``), or ``TIERKV_KERNELS=triton`` forces it (so that its
    error is the real one). A CPU-only torch build otherwise never launches one, so Triton is not
    imported there: its compiler library alone adds ~73 MB of RSS (measured on the CPU machine: 225 ->
    298 MB), memory a budget detected under a cgroup limit would otherwise lose."""
    interpret = os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0")
    forced = os.environ.get(ENV_VAR, "").strip().lower() == "triton"
    return torch.version.cuda is not None or interpret or forced


def _import_triton() -> tuple[Any, Any]:
    """(triton, triton.language), or ImportError when it is missing or cannot run here."""
    if not triton_can_run():
        raise ImportError("no CUDA build of torch and no TRITON_INTERPRET: Triton kernels cannot launch here")
    import triton
    import triton.language as tl

    return triton, tl


@contextmanager
def inductor_imports() -> Iterator[None]:
    """Import torch's inductor, dynamo or functorch inside this block: where no Triton kernel can launch
    (``triton_can_run``), their ``import triton`` probes (``torch.utils._triton.has_triton_package``, cached
    for the process; the flop counter's) are answered "missing", so a CPU-only process builds its C++
    kernels and ``torch.compile`` graphs without Triton's ~73 MB (inductor's loader measured 147 MB
    with it, 76 MB without). A program's own ``import triton`` after the block works as before."""
    if "triton" in sys.modules or triton_can_run():
        yield
        return
    sys.modules["triton"] = None            # type: ignore[assignment]  # `import triton(.x)` raises ImportError
    try:
        yield
    finally:
        if sys.modules.get("triton", ...) is None:
            del sys.modules["triton"]


def cpp_loader() -> Any:
    """Inductor's C++ loader (``CppPythonBindingsCodeCache``), imported through ``inductor_imports``."""
    with inductor_imports():
        from torch._inductor.codecache import CppPythonBindingsCodeCache
    return CppPythonBindingsCodeCache


try:
    triton, tl = _import_triton()
    HAS_TRITON = True
except ImportError:  # triton is optional (or of no use here): the torch references take over
    triton = None
    tl = SimpleNamespace(constexpr=Any)  # lets kernel signatures parse; never launched
    HAS_TRITON = False


__all__ = ["HAS_TRITON", "Backend", "ENV_VAR", "CPU_QLINEAR_VAR", "CPU_QLINEAR_CHOICES", "FUSE_VAR", "jit", "tl",
           "triton", "env_choice", "pick_backend", "pick_cpu_qlinear", "fuse_linears", "next_pow2", "cdiv"]

# How resident quantized linears compute on the CPU, read when a layer is prepared (kernels/quant.py):
# "weight_only" (PyTorch's weight-only int ops, exact up to their bf16 rounding); "dynamic_int8"
# (cpu_int8 weights: x rounded to 8 bits per call, an int8 GEMM, the engine's packed copy beside the
# stored one); "torchao" (int4 weights: x rounded to 8 bits per row, torchao's da8w4 kernel; refused
# when torchao or its CPU kernel is missing); "auto", the default: "weight_only" (both 8-bit activation
# paths are opt-in: they change the tokens, and streamed and resident layers must agree).
CPU_QLINEAR_VAR = "TIERKV_CPU_QLINEAR"
CPU_QLINEAR_CHOICES = ("auto", "weight_only", "dynamic_int8", "torchao")
# Whether prepared resident layers get fused q/k/v and gate/up linears ("1", the default, "0" or "quant").
FUSE_VAR = "TIERKV_FUSE_LINEARS"


def jit(fn: Callable[..., Any]) -> Any:
    """``triton.jit`` when Triton is installed, else the undecorated function (never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (and >= 1): Triton block sizes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division, for grid sizes."""
    return -(-a // b)


def _interpreted(kernel: Any) -> bool:
    """True when ``kernel`` was built by the Triton interpreter (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def env_choice(choice: str | None, var: str, choices: tuple[str, ...], what: str) -> str:
    """``choice`` if given, else ``$var`` (trimmed, lower case), else "auto"; refused unless in ``choices``
    (``what`` names the setting in the error)."""
    value = choice if choice is not None else os.environ.get(var, "").strip().lower() or "auto"
    if value not in choices:
        raise ArgumentError(f"{what} must be one of {choices}, got {value!r} (argument or ${var})")
    return value


def pick_backend(kernel: Any, *tensors: torch.Tensor, backend: str | None = None) -> Backend:
    """Choose ``"torch"`` or ``"triton"`` for one launch of ``kernel`` over ``tensors``.

    ``backend`` (``"torch"``, ``"triton"``, ``"auto"`` or None) overrides the ``TIERKV_KERNELS``
    environment variable; both default to auto. Raises ValueError for an unknown choice and
    RuntimeError when Triton is forced but cannot run on these tensors.
    """
    choice = env_choice(backend, ENV_VAR, _CHOICES, "kernel backend")
    if choice == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    runnable = HAS_TRITON and (on_cuda or (_interpreted(kernel) and not any(t.is_cuda for t in tensors)))
    if choice == "auto":
        return "triton" if runnable else "torch"
    if not HAS_TRITON and not triton_can_run():
        raise RuntimeError(f"{ENV_VAR}=triton, but this torch has no CUDA and TRITON_INTERPRET is not set: set "
                           "TRITON_INTERPRET=1 before tierkv is first imported to run Triton kernels on the CPU, "
                           "or use the torch kernels")
    if not HAS_TRITON:
        raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed; pip install triton or use torch")
    if not runnable:
        raise RuntimeError(
            "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before tierkv.kernels is "
            f"first imported to run on the CPU; got devices {sorted({str(t.device) for t in tensors})}"
        )
    return "triton"


def pick_cpu_qlinear(choice: str | None = None) -> str:
    """``choice`` (one of ``CPU_QLINEAR_CHOICES`` or None) else ``$TIERKV_CPU_QLINEAR`` else "auto"."""
    return env_choice(choice, CPU_QLINEAR_VAR, CPU_QLINEAR_CHOICES, "the CPU quantized linear")


FUSE_CHOICES = ("0", "1", "quant")


def fuse_linears(choice: bool | None = None) -> str:
    """Which weights ``prepare_layer`` fuses into one q/k/v and one gate/up linear: "all", "quant"
    (quantized and dynamic-int8 weights only) or "none". ``choice`` True/False is "all"/"none";
    otherwise ``$TIERKV_FUSE_LINEARS``: "1" all (the default), "0" none, "quant". 16-bit weights fuse by
    default since the CPU matrix-vector path (``kernels.dense_linear``, torch.mv) gains from larger
    matrices: bf16 decode 1.24x (0.85B) and 1.33x (135M) with fused weights and mv against neither
    (docs/benchmarks.md, "Decode per-step overhead"); with F.linear alone fusing measured 0.91-0.93x."""
    if choice is not None:
        return "all" if choice else "none"
    value = os.environ.get(FUSE_VAR, "").strip() or "1"
    if value not in FUSE_CHOICES:
        raise ArgumentError(f"${FUSE_VAR} must be one of {', '.join(FUSE_CHOICES)}, got {value!r}")
    return {"1": "all", "0": "none", "quant": "quant"}[value]
