"""Shared pieces of the benchmarks: the ~0.85B random bf16 Llama, link ceilings, output format.

Why this module exists: every benchmark compares tierkv with a peer on the same model and
against the ceiling of the link it uses, measured in the same run. Building the model, measuring
the ceilings and printing "a human table, then one JSON line" are the same everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

BENCH_MODEL = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=16,
                   num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
# A SmolLM-135M-shaped Llama (tied embeddings), the small model of the per-step benchmarks (issue 14).
SMALL_MODEL = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                   vocab_size=49152, num_hidden_layers=30, tie_word_embeddings=True, max_position_embeddings=8192)
SHAPES = {"bench": {}, "small": SMALL_MODEL}   # --shape NAME -> bench_model_dir(shape=...)


def prefer_checkout(checkout: Path) -> None:
    """Put ``checkout`` (the repository of these scripts) on ``sys.path`` ahead of the installed
    tierkv but after the ``PYTHONPATH`` entries, so that ``PYTHONPATH=OTHER_TREE python
    scripts/x.py`` measures OTHER_TREE's tierkv (workers inherit the environment)."""
    given = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    last = max((i for i, p in enumerate(sys.path) if p and os.path.abspath(p) in given), default=0)
    sys.path.insert(last + 1, str(checkout))


def group_size_arg(text: str) -> int | str:
    """A ``--group-size`` value as the library takes it: a number of inputs, or a word such as
    "channel" (passed through: ``tierkv.quantspec`` says which values are valid)."""
    return int(text) if text.strip().isdigit() else text.strip()


def bench_model_dir(root: Path, layers: int | None = None, shape: dict[str, int] | None = None) -> Path:
    """Build (once) and return a random bf16 Llama checkpoint with the benchmark shape
    (``shape`` replaces ``BENCH_MODEL``'s entries it names; the directory name carries them all)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(BENCH_MODEL, **(shape or {}))
    shape["num_hidden_layers"] = layers or shape["num_hidden_layers"]
    name = f"llama-h{shape['hidden_size']}-l{shape['num_hidden_layers']}-bf16"
    if shape != dict(BENCH_MODEL, num_hidden_layers=shape["num_hidden_layers"]):     # another shape: own folder
        name = "llama-" + "-".join(f"{v}" for _, v in sorted(shape.items())) + "-bf16"
    path = root / name
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls (seconds): the least disturbed run on a shared machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matvec_gbps(dtype: torch.dtype = torch.bfloat16, rows: int = 5632, cols: int = 2048, n: int = 48,
                device: str = "cpu") -> float:
    """Decode ceiling: GB/s of weight bytes streamed through matrix-vector products (as in decode)."""
    ws = [torch.randn(rows, cols, device=device).to(dtype) for _ in range(n)]  # several: defeat the caches
    x = torch.randn(1, cols, device=device).to(dtype)
    torch.nn.functional.linear(x, ws[0])

    def run() -> None:
        for w in ws:
            torch.nn.functional.linear(x, w)
        sync(device)

    seconds = best_of(run, 3)
    return n * rows * cols * torch.finfo(dtype).bits / 8 / seconds / 1e9


def gemm_tflops(dtype: torch.dtype = torch.bfloat16, m: int = 128, k: int = 2048, n: int = 5632,
                device: str = "cpu") -> float:
    """Prefill ceiling: TFLOP/s of (m x k) @ (k x n) products, the prefill shape for a 128-token prompt."""
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(n, k, device=device).to(dtype)
    torch.nn.functional.linear(a, b)
    reps = 20

    def run() -> None:
        for _ in range(reps):
            torch.nn.functional.linear(a, b)
        sync(device)

    seconds = best_of(run, 3)
    return 2 * m * k * n * reps / seconds / 1e12


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(title)
    print("-" * len(title))
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


def emit_json(data: dict[str, Any]) -> None:
    """The one machine-readable line every benchmark ends with."""
    print(json.dumps(data, sort_keys=True))


MEMCAP = Path("/work/shared/tools/memcap")      # runs a command under a real memory cap (page cache included)


def run_worker_script(script: str | Path, kind: str, opts: dict[str, Any], cap: str | None,
                      timeout_s: float) -> dict[str, Any]:
    """``script --worker kind --opts JSON`` in a fresh interpreter (under ``memcap cap`` when given):
    its last JSON line on stdout, plus memcap's peak and OOM kills, ``wall_s`` and ``rc``; a crash
    or a timeout becomes {"error": ...} with the last lines of its stderr."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", kind, "--opts", json.dumps(opts)]
    if cap is not None:
        cmd = [str(MEMCAP), cap, "--", *cmd]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "wall_s": timeout_s}
    out: dict[str, Any] = {"wall_s": round(time.perf_counter() - t0, 1), "rc": proc.returncode}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        out.update(json.loads(lines[-1]))
    cap_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith('{"memcap_')]
    if cap_lines:
        out.update(json.loads(cap_lines[-1]))
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith('{"memcap_')][-3:]
        out.setdefault("error", f"exit {proc.returncode}: " + " | ".join(tail)[-400:])
    return out


def memcap_usable() -> bool:
    """Whether memcap can make a cgroup here (needs root and a memory controller)."""
    if not MEMCAP.is_file():
        return False
    return subprocess.run([str(MEMCAP), "64MiB", "--", "true"], capture_output=True, check=False).returncode == 0
