"""One OpenMP pool while the engine computes (``tierkv.openmp``): callers free theirs, helpers start none."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import tierkv
from tierkv import openmp

pytestmark = pytest.mark.skipif(openmp.openmp_runtime() is None, reason="no GNU OpenMP runtime in this process")

REPO = Path(__file__).resolve().parents[1]

# In a fresh process (the test runner's own threads already hold pools): the main thread's pool appears
# with its first parallel op, release_pool() ends its worker, and a thread made serial starts none.
_SCRIPT = textwrap.dedent("""
    import os, threading, time, torch
    from tierkv import openmp
    torch.set_num_threads(2)
    def tasks():
        return len(os.listdir("/proc/self/task"))
    def settled(want):
        for _ in range(200):
            if tasks() == want:
                return True
            time.sleep(0.01)
        return False
    x = torch.randn(2048, 2048)
    base = tasks()
    (x * 2).sum()
    assert tasks() == base + 1, ("the main thread's first parallel op starts one worker", base, tasks())
    assert openmp.release_pool()
    assert settled(base), ("release_pool ends the worker", base, tasks())
    seen = {}
    def helper():
        openmp.serial_thread()
        seen["threads"] = torch.get_num_threads()
        (x * 3).sum()
        seen["tasks"] = tasks()
    t = threading.Thread(target=helper)
    t.start(); t.join()
    assert seen == {"threads": 1, "tasks": base + 1}, seen     # the helper itself, no worker of its own
    print("ok")
""")


def test_release_pool_and_serial_thread_in_a_fresh_process() -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_release_pool_outside_a_region_succeeds_with_or_without_a_pool() -> None:
    """Outside a region it succeeds (whether or not this thread had a pool)."""
    assert openmp.release_pool() is True
    assert openmp.release_pool() is True


def test_engine_callers_free_their_pool_before_each_step(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = openmp.release_pool
    import tierkv.core as core

    monkeypatch.setattr(core, "release_pool", lambda: calls.append(threading.get_ident()) or real())
    engine = tierkv.load(tiny_llama_dir, dtype="float32")
    try:
        out = engine.generate([1, 2, 3], max_new_tokens=4, temperature=0)
    finally:
        engine.close()
    assert len(out.token_ids) == 4
    assert calls and set(calls) == {threading.get_ident()}, "the waiting caller, once per step, frees its pool"
    assert torch.get_num_threads() >= 1
