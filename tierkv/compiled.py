"""Compiled layer halves: ``torch.compile`` of the tensor math on each side of a layer's KV attention.

Why this module exists: a small model's decode step is hundreds of small ops, and on the CPU
much of each is dispatch and Python; a compiler fuses the elementwise work (norms, RoPE, residual
adds, SiLU x up) into a few loops around the matmuls. The KV attention (``kv.attend``: chunk
tables, selection, tiers, host syncs) is Python bookkeeping that must not be traced, so the layer
compiles as two functions around it, ``model.pre_attention`` (input norm, fused q/k/v projection,
RoPE) and ``model.post_attention`` (o projection, residual, norm, fused gate/up MLP, residual),
the very functions the eager path runs.

- Shapes: the packed token axis (dim 1 of the hidden states and the RoPE tables) is marked
  dynamic, so prefill pieces of any length share one graph; decode (one token, or a few rows that
  take the matrix-vector paths of ``kernels.dense_linear``) specializes into its own graphs. Each
  engine compiles its own copies of the two functions, so engines in one process do not share
  (and exhaust) dynamo's per-function recompile limit.
- Stats (``CompileStats``): seconds spent in calls that compiled, graphs built, recompiles (calls
  after a half's first compile that compiled again), and the inductor cache directory.
- Cache: inductor's FX graph and AOT caches live under ``<offload dir>/inductor`` (unless the user
  set $TORCHINDUCTOR_CACHE_DIR), so a second run loads the graphs instead of generating and
  building C++ again; the directory is process-wide (inductor reads the variable).
- Fallback: any dynamo or inductor error (no C++ compiler, an op it cannot lower, a trace it
  refuses) switches this engine to the eager halves for good, with one warning and the reason in
  the stats; the failed call reruns eagerly (the halves are pure functions, so that is safe).

Shapes: B batch, T tokens (the packed axis), H hidden, Hq/Hkv heads, D head_dim.
"""

from __future__ import annotations

import os
import time
import types
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tierkv.config import ModelConfig
from tierkv.kernels._select import inductor_imports
from tierkv.model import LayerHalves, post_attention, pre_attention

__all__ = ["CACHE_DIR_VAR", "CompileStats", "CompiledHalves", "compile_errors", "inductor_cache_dir"]

CACHE_DIR_VAR = "TORCHINDUCTOR_CACHE_DIR"


def compile_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "compiling failed" (dynamo's and inductor's), not a fault of the inputs.
    Looked up when first needed: importing dynamo takes seconds, which an eager engine never pays."""
    return (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError)


@dataclass
class CompileStats:
    """What compiling the layer halves cost and where it stands."""

    asked: bool = False             # compile=True at load
    active: bool = False            # the compiled halves run (False: eager, see fallback_reason)
    backend: str = ""
    compile_s: float = 0.0          # wall time of the calls that compiled (tracing, codegen, C++ build, first run)
    graphs: int = 0                 # graphs the backend compiled (a graph break or a new shape class adds one)
    compiles: int = 0               # calls that compiled at least one graph
    recompiles: int = 0             # of those, calls after a half's first compile (a shape class not seen before)
    cache_dir: str = ""             # inductor's FX/AOT cache (reused across runs)
    fallback_reason: str = ""       # why the engine runs eager although compile was asked

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inductor_cache_dir(offload_dir: Path) -> str:
    """The directory inductor caches its graphs in, from now on in this process: $TORCHINDUCTOR_CACHE_DIR
    when it is set (by the user, or by an earlier compiled engine of this process: inductor reads one
    directory per process), else ``offload_dir/inductor`` (importing dynamo fills the variable with
    inductor's default under /tmp, which is replaced: the offload directory outlives a reboot)."""
    with inductor_imports():        # inductor and dynamo, without Triton where it cannot launch
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get(CACHE_DIR_VAR)
    if current and os.path.abspath(current) != os.path.abspath(default_cache_dir()):
        return current
    os.environ[CACHE_DIR_VAR] = str(Path(offload_dir).expanduser().resolve() / "inductor")
    return os.environ[CACHE_DIR_VAR]


def _own_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its own code object: dynamo keeps its compiled entries (and its recompile limit) per
    code object, so each engine's halves compile and count on their own."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__, copy.__doc__ = fn.__qualname__, fn.__doc__
    return copy


@dataclass
class _Counter:
    """The torch.compile backend: ``backend`` (a registered name or a callable) on each graph, counted."""

    backend: str | Callable[..., Any]
    graphs: int = 0
    _inner: Any = field(default=None, repr=False)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        if self._inner is None:
            self._inner = torch._dynamo.lookup_backend(self.backend) if isinstance(self.backend, str) else self.backend
        return self._inner(gm, example_inputs)


class CompiledHalves:
    """``model.pre_attention``/``post_attention`` through ``torch.compile``, with stats and an eager fallback.

    ``halves`` is the ``model.LayerHalves`` the runner passes to ``decoder_layer``. ``backend``:
    "inductor" (the engine's), or another dynamo backend name or callable (tests use a failing one).
    """

    def __init__(self, offload_dir: Path, backend: str | Callable[..., Any] = "inductor") -> None:
        with inductor_imports():        # what compiling imports, without Triton where it cannot launch
            import torch._dynamo
            import torch._inductor.compile_fx  # noqa: F401
        self._counter = _Counter(backend)
        self.stats = CompileStats(asked=True, active=True, backend=backend if isinstance(backend, str)
                                  else getattr(backend, "__name__", type(backend).__name__))
        if backend == "inductor":
            self.stats.cache_dir = inductor_cache_dir(offload_dir)
        self._pre = torch.compile(_own_copy(pre_attention), backend=self._counter, dynamic=None)
        self._post = torch.compile(_own_copy(post_attention), backend=self._counter, dynamic=None)
        self._compiled_once = {"pre": False, "post": False}
        self.halves = LayerHalves(self.pre, self.post)

    def pre(self, cfg: ModelConfig, w: dict[str, torch.Tensor], h: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``model.pre_attention`` compiled: h (B, T, H), cos/sin (B, T, 1, D) -> q, k, v."""
        if not self.stats.active:
            return pre_attention(cfg, w, h, cos, sin)
        for t in (h, cos, sin):
            _dynamic_tokens(t)
        return self._call("pre", self._pre, pre_attention, cfg, w, h, cos, sin)

    def post(self, cfg: ModelConfig, w: dict[str, torch.Tensor], h: torch.Tensor, attn: torch.Tensor,
             layer: int) -> torch.Tensor:
        """``model.post_attention`` compiled: h (B, T, H), attn (B, T, Hq*D) -> (B, T, H)."""
        if not self.stats.active:
            return post_attention(cfg, w, h, attn)
        for t in (h, attn):
            _dynamic_tokens(t)
        return self._call("post", self._post, post_attention, cfg, w, h, attn)

    def _call(self, half: str, compiled: Callable[..., Any], eager: Callable[..., Any], *args: Any) -> Any:
        """One compiled call, timed and counted when it compiled; on a compile error, the eager result."""
        before, t0 = self._counter.graphs, time.perf_counter()
        try:
            out = compiled(*args)
        except compile_errors() as exc:
            self.fail(_reason(exc))
            return eager(*args)
        if self._counter.graphs > before:
            self.stats.compile_s += time.perf_counter() - t0
            self.stats.graphs = self._counter.graphs
            self.stats.compiles += 1
            self.stats.recompiles += int(self._compiled_once[half])
            self._compiled_once[half] = True
        return out

    def fail(self, reason: str) -> None:
        """Run eager from now on, saying why once (a warning and ``stats.fallback_reason``)."""
        if not self.stats.active:
            return
        self.stats.active, self.stats.fallback_reason = False, reason[:400]
        warnings.warn(f"tierkv: compiling the layers failed, running them eagerly (same tokens): {reason[:400]}",
                      RuntimeWarning, stacklevel=3)


def _reason(exc: BaseException) -> str:
    """"what failed: why" in one line: the compiler's own error where dynamo wrapped it."""
    inner = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    where = type(exc).__name__ if inner is exc else f"{type(exc).__name__} ({type(inner).__name__})"
    return f"{where}: {lines[0] if lines else 'no message'}"


def _dynamic_tokens(t: torch.Tensor) -> None:
    """Mark the packed token axis (dim 1) dynamic when it is longer than one: prefill pieces of any length
    share a graph (``maybe_``: a length the code branches on, as the matrix-vector paths do, may specialize)."""
    if t.shape[1] > 1:
        torch._dynamo.maybe_mark_dynamic(t, 1)
