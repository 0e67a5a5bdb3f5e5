"""Compiled layer halves (tierkv/compiled.py) give the eager path's tokens, count what compiling cost,
and fall back to eager, once and saying why, when compiling fails.

fp32 tokens are compared with the eager engine's on every supported architecture, over a prefill
of several tokens (the dynamic-length graph), decode (one token) and a ragged batch (prefill and
decode rows packed), with a layer resident and a layer streamed from the store. The default run
compiles with dynamo's "eager" backend on every architecture (the traced halves, dynamic shapes
and the split around the KV attention, in seconds) and with inductor on Llama only; inductor on
every architecture is the slow run's (-m slow: each compile takes tens of seconds on 2 cores).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from conftest import ARCH_VARIANTS
from placements import random_prompt
import tierkv
from tierkv.compiled import CACHE_DIR_VAR, CompiledHalves
from tierkv.config import Budget, Policy
from tierkv.engine import Engine
from tierkv.errors import ArgumentError
from tierkv.io.convert import convert
from tierkv.io.store import WeightStore
from tierkv.pipeline.weights import StreamingWeights

pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")

PROMPTS = [random_prompt(n, seed=70 + n) for n in (11, 4)]
NEW = 5
# architectures whose differences lie outside the halves (the window in the attention, the RoPE tables
# built by the runner): traced in the slow run only, to keep the default run's compile time down
SLOW_TRACED = ("llama", "mistral-window", "llama-dynamic-rope")


def _engine(ckpt: Path, store_dir: Path, offload: Path, compile: bool) -> Engine:
    """fp32 engine with layer 0 resident and every other layer streamed from the store on disk."""
    store = WeightStore.open(store_dir if (store_dir / "manifest.json").exists() else convert(ckpt, store_dir))
    weights = StreamingWeights(store, "cpu", (0,), (), 1, 64 << 20, 64 << 20)
    return Engine(ckpt, Policy(device="cpu", dtype="float32", kv="exact", compile=compile),
                  Budget(offload_dir=offload), weights=weights)


def _tokens(engine: Engine) -> tuple[list[int], list[list[int]]]:
    solo = engine.generate(PROMPTS[0], max_new_tokens=NEW, ignore_eos=True).token_ids
    batch = [o.token_ids for o in engine.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)]
    return solo, batch


def _with_backend(engine: Engine, offload: Path, backend: str | Callable[..., Any]) -> CompiledHalves:
    """The engine's layers through CompiledHalves with ``backend`` (what compile=True builds with inductor)."""
    compiled = CompiledHalves(offload, backend=backend)
    engine.compiled, engine.runner.halves = compiled, compiled.halves
    return compiled


def _compare(ckpt: Path, tmp_path: Path, backend: str) -> dict[str, Any]:
    """Eager tokens vs compiled tokens (``backend``) of the same placements; -> the compile stats."""
    with _engine(ckpt, tmp_path / "store", tmp_path / "off", compile=False) as engine:
        want = _tokens(engine)
    with _engine(ckpt, tmp_path / "store", tmp_path / "off", compile=backend == "inductor") as engine:
        if backend != "inductor":
            _with_backend(engine, tmp_path / "off", backend)
        got = _tokens(engine)
        stats = engine.compile_stats()["compile"]
    assert got == want
    assert got[1][0] == got[0]                           # the batch's first row is its solo run
    return stats


@pytest.mark.parametrize("variant", [pytest.param(v, marks=[pytest.mark.slow] if v in SLOW_TRACED else [])
                                     for v in ARCH_VARIANTS])
def test_traced_halves_give_the_eager_tokens_on_every_architecture(tiny_model_dir: Callable[..., Path],
                                                                   tmp_path: Path, variant: str) -> None:
    stats = _compare(tiny_model_dir(variant), tmp_path, "eager")
    assert stats["active"] and not stats["fallback_reason"]
    # each half specializes on decode (one token) vs prefill (dynamic length) and on resident vs
    # streamed weights (unfused, inference tensors); the ragged batch (15 then 2 tokens) reuses them
    assert 4 <= stats["graphs"] <= 8 and stats["compiles"] == stats["graphs"]     # no graph breaks
    assert stats["recompiles"] == stats["compiles"] - 2


@pytest.fixture
def fresh_inductor(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No inductor cache directory chosen yet; compile in this process (no worker pool to start)."""
    monkeypatch.delenv(CACHE_DIR_VAR, raising=False)
    with torch._inductor.config.patch(compile_threads=1):
        yield


@pytest.mark.usefixtures("fresh_inductor")
def test_load_compile_gives_the_eager_tokens_and_caches_under_the_offload_dir(tiny_model_dir: Callable[..., Path],
                                                                             tmp_path: Path) -> None:
    """``tierkv.load(compile=True)`` with inductor, resident: a prefill and decode of one prompt."""
    ckpt, offload = tiny_model_dir("llama"), tmp_path / "off"
    with tierkv.load(ckpt, device="cpu", dtype="float32", kv="exact", offload_dir=offload) as engine:
        want = engine.generate(PROMPTS[0], max_new_tokens=NEW, ignore_eos=True).token_ids
    with tierkv.load(ckpt, device="cpu", dtype="float32", kv="exact", offload_dir=offload, compile=True) as engine:
        result = engine.generate(PROMPTS[0], max_new_tokens=NEW, ignore_eos=True)
    stats = result.stats.compile["compile"]
    assert result.token_ids == want
    assert stats["active"] and stats["backend"] == "inductor" and stats["compile_s"] > 0
    assert stats["graphs"] == 4 and stats["recompiles"] == 2          # each half: prefill, then decode
    assert stats["cache_dir"] == str((offload / "inductor").resolve())
    assert any((offload / "inductor").rglob("*")), "inductor wrote nothing to its cache directory"


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_inductor")
@pytest.mark.parametrize("variant", list(ARCH_VARIANTS))
def test_inductor_gives_the_eager_tokens_on_every_architecture(tiny_model_dir: Callable[..., Path], tmp_path: Path,
                                                               variant: str) -> None:
    """Resident and streamed layers, a prefill, decode and a ragged batch, compiled by inductor."""
    stats = _compare(tiny_model_dir(variant), tmp_path, "inductor")
    assert stats["active"] and 4 <= stats["graphs"] <= 8


def _failing_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    raise RuntimeError("no compiler here (a test's backend)")


def test_a_failed_compile_runs_eager_with_one_warning_and_the_reason(tiny_model_dir: Callable[..., Path],
                                                                     tmp_path: Path) -> None:
    ckpt = tiny_model_dir("qwen2-bias")
    with _engine(ckpt, tmp_path / "store", tmp_path / "off", compile=False) as engine:
        want = _tokens(engine)
    with _engine(ckpt, tmp_path / "store", tmp_path / "off", compile=False) as engine:
        compiled = _with_backend(engine, tmp_path / "off", _failing_backend)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _tokens(engine)
        stats = engine.compile_stats()["compile"]
        result = engine.generate(PROMPTS[1], max_new_tokens=2)
    assert got == want
    said = [w for w in caught if "compiling the layers failed" in str(w.message)]
    assert len(said) == 1 and "no compiler here" in str(said[0].message)
    assert stats["asked"] and not stats["active"] and "no compiler here" in stats["fallback_reason"]
    assert stats["graphs"] == 0 and compiled._counter.graphs == 1          # one attempt, then eager for good
    assert result.stats.compile["compile"]["fallback_reason"] == stats["fallback_reason"]


def test_compile_options_are_checked_and_off_by_default(tiny_llama_dir: Path) -> None:
    assert Policy().compile is False and Policy().cuda_graph is False
    for name in ("compile", "cuda_graph"):
        with pytest.raises(ArgumentError, match=name):
            Policy(**{name: "yes"})
    with Engine(tiny_llama_dir, Policy(device="cpu")) as engine:
        state = engine.compile_stats()
        assert engine.compiled is None and not state["compile"]["asked"] and not state["cuda_graph"]["asked"]
