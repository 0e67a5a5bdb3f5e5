"""A real ``tierkv batch`` process killed mid-job (SIGKILL) or interrupted (SIGINT, SIGTERM) loses and duplicates
nothing: the rerun with the same output file completes the job, every id appears exactly once, and the
results equal a clean run's (greedy, fp32: a sequence's tokens do not depend on what shared its batch).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import tierkv
from tierkv.batch import run_batch

pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")

ROOT = Path(__file__).resolve().parent.parent
N = 40
REQUESTS = [{"id": f"r{i}", "prompt": [(37 * i + 11 * k) % 4000 + 10 for k in range(3 + i % 9)], "max_tokens": 20}
            for i in range(N)]
FLAGS = ["--batch", "2", "--dtype", "float32", "--kv", "exact", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def engine() -> Iterator[tierkv.Engine]:
    """The engine the command builds from FLAGS, in this process."""
    with tierkv.load("demo", dtype="float32", kv="exact", device="cpu", max_sequences=2) as eng:
        yield eng


@pytest.fixture(scope="module")
def job(engine: tierkv.Engine, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """(the input file, a clean in-process run's results without their timing)."""
    root = tmp_path_factory.mktemp("crash")
    src = root / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    run_batch(engine, src, root / "clean.jsonl", batch=2)
    return src, _untimed(root / "clean.jsonl")


def _untimed(path: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k != "timing"} for line in path.read_text().splitlines()]


def _start(src: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # SIGINT at its default in the child, as in a terminal: a process that inherits SIGINT ignored (a test
    # run launched in the background, or a test that left it ignored) installs no KeyboardInterrupt handler
    return subprocess.Popen([sys.executable, "-m", "tierkv", "batch", "demo", str(src), "-o", str(out), *FLAGS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _lines_soon(out: Path, proc: subprocess.Popen, lines: int, timeout_s: float = 120.0) -> None:
    """Wait until ``out`` holds ``lines`` lines while ``proc`` still runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= lines:
            assert proc.poll() is None, "the job ended before it could be stopped; give it more work"
            return
        if proc.poll() is not None:
            raise AssertionError(f"tierkv batch exited early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("tierkv batch wrote nothing in time")


def _resume_and_check(src: Path, out: Path, clean: list[dict[str, Any]], engine: tierkv.Engine | None = None) -> None:
    """Finish the job (the command again, or ``run_batch`` on ``engine``) and compare with the clean run."""
    if engine is None:
        done = subprocess.run([sys.executable, "-m", "tierkv", "batch", "demo", str(src), "-o", str(out), *FLAGS],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    else:
        run_batch(engine, src, out, batch=2)
    got = _untimed(out)
    ids = [r["id"] for r in got]
    assert sorted(ids) == sorted(r["id"] for r in REQUESTS) and len(set(ids)) == N      # each exactly once
    assert got == clean                                                                 # and in input order


def test_sigkill_mid_job_then_resume(job: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    src, clean = job
    out = tmp_path / "out.jsonl"
    proc = _start(src, out)
    _lines_soon(out, proc, 3)
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    written = _untimed(out)
    assert 3 <= len(written) < N and written == clean[:len(written)]
    with out.open("ab") as f:                    # as if the kill had come in the middle of the next line
        f.write(json.dumps({"id": clean[len(written)]["id"], "text": "half"}).encode()[:20])
    _resume_and_check(src, out, clean)


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGTERM"])        # SIGTERM takes SIGINT's path (a handler raising it)
def test_sigint_writes_what_is_complete_exits_130_then_resume(sig: int, job: tuple[Path, list[dict[str, Any]]],
                                                              engine: tierkv.Engine, tmp_path: Path) -> None:
    """Ctrl-C, or a job scheduler's SIGTERM."""
    src, clean = job
    out = tmp_path / "out.jsonl"
    proc = _start(src, out)
    _lines_soon(out, proc, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: rerun to finish" in err and "Traceback" not in err
    written = _untimed(out)
    assert 2 <= len(written) < N and written == clean[:len(written)]
    assert out.read_bytes().endswith(b"\n")                                   # whole lines only
    _resume_and_check(src, out, clean, engine)
