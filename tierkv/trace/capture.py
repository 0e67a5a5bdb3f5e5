"""Running tierkv generation under the PyTorch profiler, one trace per batch size.

Why this module exists: the CPU-bound to GPU-bound transition only shows across batch sizes, so
``tierkv trace run`` must generate the same workload at several batch sizes, each profiled with
the CPU (and, when present, CUDA) activities, export each chrome trace, analyze it, and gather
the verdicts in one report. The engine marks its own work with ``record_function`` spans
(``tierkv::prefill``, ``tierkv::decode``, and the movement layer's ``tierkv::move <src>-><dst> <what>
<nbytes>B`` on the threads doing each transfer); this module adds one ``tierkv::generate`` span
around each profiled call. torch is imported here only, never by the
analyzer.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tierkv.errors import ArgumentError
from tierkv.trace.analyze import TraceReport, analyze_trace, round_floats
from tierkv.trace.verdict import SweepSummary, VerdictRule, summarize_sweep
from tierkv.trace.report import plot_sweep, write_json


@dataclass
class BatchRun:
    """One profiled generation: where its trace is, how long it took, what it produced."""

    batch_size: int
    trace_path: Path
    wall_us: float
    generated_tokens: int
    report: TraceReport


@dataclass
class SweepResult:
    """A whole sweep: the workload, one run per batch size, and the verdict summary."""

    model: str
    prompt_len: int
    new_tokens: int
    device: str
    dtype: str | None
    cuda: bool
    runs: list[BatchRun]
    summary: SweepSummary
    report_path: Path
    plot_path: Path

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data, as written to ``report.json``."""
        return {
            "model": self.model, "prompt_len": self.prompt_len, "new_tokens": self.new_tokens,
            "device": self.device, "dtype": self.dtype, "cuda_profiled": self.cuda,
            **round_floats(asdict(self.summary)),
            "batches": [{"batch_size": r.batch_size, "trace": r.trace_path.name,
                         "wall_us": round(r.wall_us, 3), "generated_tokens": r.generated_tokens,
                         "report": r.report.to_dict()} for r in self.runs],
            "plot": self.plot_path.name,
        }


def make_prompts(vocab_size: int, batch_size: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """``batch_size`` random token-id prompts of ``prompt_len`` tokens each, reproducible by seed."""
    if vocab_size < 1 or batch_size < 1 or prompt_len < 1:
        raise ArgumentError(f"need vocab_size, batch_size and prompt_len >= 1, got {vocab_size}, "
                         f"{batch_size}, {prompt_len}")
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(prompt_len)] for _ in range(batch_size)]


def profile_call(fn: Callable[[], Any], trace_path: Path) -> tuple[Any, float]:
    """Run ``fn`` under the profiler (CPU, plus CUDA when available); export a chrome trace.

    Returns what ``fn`` returned and its wall time in microseconds (the device is synchronised
    before the clock stops, so queued kernels are counted).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, record_shapes=False, **_all_threads())
    with native_stderr_silenced():
        prof.start()
    try:
        with record_function("tierkv::generate"):
            start = time.perf_counter()
            result = fn()
            if cuda:
                torch.cuda.synchronize()
            wall_us = (time.perf_counter() - start) * 1e6
    finally:
        with native_stderr_silenced():
            prof.stop()
    prof.export_chrome_trace(str(trace_path))
    return result, wall_us


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for a moment: the profiler's C++ side (kineto) writes
    ``USDT: ... profiler_start`` / ``profiler_stop`` lines straight to it on every start and stop,
    whatever KINETO_LOG_LEVEL says, which floods ``tierkv trace run``'s stderr. Python's own
    ``sys.stderr`` is flushed first, so nothing of ours is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _all_threads() -> dict[str, Any]:
    """Profiler option that also records ranges on other threads: tierkv's reader and copy threads
    emit their ``tierkv::move`` spans there, and a streaming stall is only visible with them in the trace."""
    import torch

    config = getattr(torch._C._profiler, "_ExperimentalConfig", None)
    try:
        return {} if config is None else {"experimental_config": config(profile_all_threads=True)}
    except TypeError:  # a torch without that option: main-thread spans only
        return {}


def _generate_fn(engine: Any, prompts: list[list[int]], new_tokens: int) -> Callable[[], Any]:
    return lambda: engine.generate(prompts, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)


def _count_tokens(outs: Any) -> int:
    outs = outs if isinstance(outs, list) else [outs]
    return sum(len(o.token_ids) for o in outs)


def _check_args(batch_sizes: list[int], prompt_len: int, new_tokens: int) -> list[int]:
    sizes = sorted(set(batch_sizes))
    if not sizes or sizes[0] < 1:
        raise ArgumentError(f"batch sizes {batch_sizes} must be positive integers, e.g. 1,2,4,8,16")
    if prompt_len < 1 or new_tokens < 1:
        raise ArgumentError(f"prompt length ({prompt_len}) and new tokens ({new_tokens}) must be >= 1")
    return sizes


def run_sweep(model: str, batch_sizes: list[int], prompt_len: int, new_tokens: int,
              out_dir: str | Path, device: str | None = None, dtype: str | None = None,
              on_run: Callable[[BatchRun], None] | None = None,
              rule: VerdictRule | None = None, **budgets: Any) -> SweepResult:
    """Profile generation of B equal-length random prompts for each batch size B.

    Writes ``out_dir/trace_b{B}.json`` per batch size, ``report.json`` and ``tklqt.png``; each
    batch size gets one unprofiled warm-up generation first. ``on_run`` is called after each
    batch size (for progress output). ``budgets`` (device_mem, host_mem, offload_dir, and the
    step options compile, cuda_graph) go to ``tierkv.load``, so a streaming placement, or compiled
    or graphed layers, can be profiled too.
    """
    import torch

    import tierkv

    sizes = _check_args(batch_sizes, prompt_len, new_tokens)
    kwargs = {k: v for k, v in (("device", device), ("dtype", dtype), *budgets.items()) if v is not None}
    engine = tierkv.load(model, **kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[BatchRun] = []
    try:
        vocab = int(engine.config.vocab_size)
        for b in sizes:
            fn = _generate_fn(engine, make_prompts(vocab, b, prompt_len, seed=b), new_tokens)
            fn()  # warm-up: allocator, kernel caches, lazily loaded weights
            trace_path = out / f"trace_b{b}.json"
            outs, wall_us = profile_call(fn, trace_path)
            run = BatchRun(b, trace_path, wall_us, _count_tokens(outs), analyze_trace(trace_path, rule=rule))
            runs.append(run)
            if on_run is not None:
                on_run(run)
    finally:
        engine.close()
    summary = summarize_sweep([(r.batch_size, r.report) for r in runs], rule)
    result = SweepResult(model, prompt_len, new_tokens, device or "auto", dtype,
                         torch.cuda.is_available(), runs, summary, out / "report.json", out / "tklqt.png")
    plot_sweep(summary, result.plot_path, title=f"{Path(model).name}: prompt {prompt_len}, "
                                                 f"{new_tokens} new tokens")
    write_json(result.to_dict(), result.report_path)
    return result
