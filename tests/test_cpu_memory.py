"""tierkv.cpu_memory: oneDNN's primitive cache is bounded from import on, and glibc's freed heap memory
goes back to the system after every prefill step (not after decode steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tierkv
from tierkv import core, cpu_memory

ROOT = Path(__file__).resolve().parents[1]

# bf16 products with a new row count each: every shape is a new oneDNN primitive (M x 2048) @ (2048 x 5632)
_PRODUCTS = """
import ctypes, json, os, sys
import psutil, torch
{setup}
torch.set_num_threads(1)
libc, proc = ctypes.CDLL("libc.so.6"), psutil.Process()
def rss():
    libc.malloc_trim(0)
    return proc.memory_info().rss
w = torch.randn(2048, 5632, dtype=torch.bfloat16)
before = rss()
with torch.inference_mode():
    for m in range(200, 248):
        (torch.randn(m, 2048, dtype=torch.bfloat16) @ w).sum()
print(json.dumps({{"growth": rss() - before, "capacity": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")}}))
"""


def _run(code: str, env: dict[str, str] | None = None) -> dict:
    full = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    full.update(env or {}, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_bounds_the_primitive_cache_and_keeps_a_users_setting() -> None:
    code = "import json, os, tierkv; print(json.dumps({'c': os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY')}))"
    assert _run(code)["c"] == str(cpu_memory.ONEDNN_CACHE_PRIMITIVES)
    assert _run(code, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256"})["c"] == "256"


def test_bounded_cache_keeps_less_memory_across_new_shapes() -> None:
    """oneDNN reads the capacity at its first primitive, so importing tierkv after torch still bounds it."""
    default = _run(_PRODUCTS.format(setup=""), {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})
    if default["growth"] < 48 << 20:
        pytest.skip(f"this CPU's bf16 products keep {default['growth'] >> 20} MiB in oneDNN's cache: nothing to bound")
    bounded = _run(_PRODUCTS.format(setup="import tierkv"))
    assert bounded["capacity"] == str(cpu_memory.ONEDNN_CACHE_PRIMITIVES)
    assert bounded["growth"] < 0.6 * default["growth"], (bounded, default)


def test_release_freed_returns_a_fragmented_heap() -> None:
    """Chunks below the mmap threshold stay resident after free while a live chunk sits above them."""
    if cpu_memory._malloc_trim() is None:
        pytest.skip("no glibc malloc_trim in this process")
    code = """
import json, psutil, sys
sys.path.insert(0, {root!r})
from tierkv.cpu_memory import release_freed
proc = psutil.Process()
blocks = [bytearray(96 << 10) for _ in range(1500)]     # 140 MiB on the heap (each under the mmap threshold)
keep = blocks[-1]
del blocks
held = proc.memory_info().rss
gave = release_freed()
print(json.dumps({{"freed": held - proc.memory_info().rss, "gave": gave}}))
""".format(root=str(ROOT))
    out = _run(code)
    assert out["gave"] is True
    assert out["freed"] > 64 << 20, out


def test_engine_releases_after_prefill_steps_only(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(core, "release_freed", lambda: calls.append(1) or True)
    with tierkv.load(tiny_llama_dir, dtype="float32", device="cpu", prefill_chunk_tokens=4) as eng:
        eng.generate([list(range(3, 13))], max_new_tokens=5, ignore_eos=True)
        prefill_steps = len(calls)
        assert prefill_steps == 3              # 10 prompt tokens in pieces of 4
        eng.generate([list(range(3, 6)), list(range(7, 9))], max_new_tokens=3, ignore_eos=True)
    assert len(calls) == prefill_steps + 1     # one step prefilled both prompts; decode steps did not release
