"""The embedding examples under examples/ run as scripts on the demo model and do what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tierkv

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=240, env=env, check=False)


def test_embed_callback_streams_and_stops():
    with tierkv.load("demo", device="cpu") as engine:
        ref = engine.generate("Return a list of", max_new_tokens=32)
    done = run_example("embed_callback.py", "--max-new-tokens", "32")
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == ref.text and f"finish_reason={ref.finish_reason}" in done.stderr
    early = run_example("embed_callback.py", "--max-new-tokens", "200", "--stop-after-chars", "5")
    assert early.returncode == 0, early.stderr
    assert "finish_reason=cancelled" in early.stderr and 5 <= len(early.stdout.strip()) < len(ref.text)


def test_embed_asyncio_runs_two_requests_together():
    done = run_example("embed_asyncio.py", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    finals = [line for line in lines if " done: " in line]
    assert len(finals) == 2 and all("shared steps with up to 2 sequences" in line for line in finals)
    assert any(line.startswith("a: ") for line in lines) and any(line.startswith("b: ") for line in lines)
