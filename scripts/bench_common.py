"""Shared pieces of the benchmarks: the ~0.85B random bf16 Llama, link ceilings, output format.

Why this module exists: every benchmark compares tierkv with a peer on the same model and
against the ceiling of the link it uses, measured in the same run. Building the model, measuring
the ceilings and printing "a human table, then one JSON line" are the same everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

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
    model.tie_weights()                      # to_empty unties a tied head: tie it again before filling
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
    """Decode ceiling: GB/s of weight bytes streamed through matrix-vector products (as in decode), the
    best of ``F.linear`` and, on the CPU, the compiled kernel of ``tierkv.kernels.cpu_gemv`` (the
    fastest way this machine has been measured to read a weight once)."""
    ws = [torch.randn(rows, cols, device=device).to(dtype) for _ in range(n)]  # several: defeat the caches
    x = torch.randn(1, cols, device=device).to(dtype)
    ops = [lambda w: torch.nn.functional.linear(x, w)]
    if torch.device(device).type == "cpu":
        from tierkv.kernels.cpu_gemv import gemv, gemv_kernel
        if gemv_kernel(ws[0]).fn is not None:
            ops.append(lambda w: gemv(w, x[0]))
    best = float("inf")
    for op in ops:
        op(ws[0])

        def run() -> None:
            for w in ws:
                op(w)
            sync(device)

        best = min(best, best_of(run, 3))
    return n * rows * cols * torch.finfo(dtype).bits / 8 / best / 1e9


_READ_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <immintrin.h>
extern "C" void kernel(const float* a, const int64_t* n, float* out)
{
    // each thread sums its contiguous share, 4 cache lines a step, prefetching 4 KB ahead: a plain
    // stream read, the most a decode product that reads each weight byte once could reach
    float total = 0;
    #pragma omp parallel reduction(+:total)
    {
        const int64_t lines = n[0] / 16, nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t lo = lines * id / nt * 16, hi = lines * (id + 1) / nt * 16;
        at::vec::Vectorized<float> s0(0), s1(0), s2(0), s3(0);
        constexpr int64_t L = at::vec::Vectorized<float>::size();
        for (int64_t i = lo; i + 64 <= hi; i += 64) {
            _mm_prefetch(reinterpret_cast<const char*>(a + i + 1024), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(a + i + 1040), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(a + i + 1056), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(a + i + 1072), _MM_HINT_T0);
            for (int64_t j = 0; j < 16; j += L) {
                s0 += at::vec::Vectorized<float>::loadu(a + i + j);
                s1 += at::vec::Vectorized<float>::loadu(a + i + 16 + j);
                s2 += at::vec::Vectorized<float>::loadu(a + i + 32 + j);
                s3 += at::vec::Vectorized<float>::loadu(a + i + 48 + j);
            }
        }
        total += at::vec::vec_reduce_all<float>([](auto& p, auto& q) { return p + q; }, s0 + s1 + s2 + s3);
    }
    out[0] = total;
}
"""


def memory_read_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> float | None:
    """The link's ceiling for a CPU decode: GB/s of a plain multi-threaded stream read of ``nbytes`` (more
    than the caches hold; the thread count of torch), the best of ``repeats``; None where the C++ loop
    cannot be built. A decode step that reads its weights once cannot beat it."""
    from tierkv.kernels.cpu_cpp import compile_kernel

    fn, _, error = compile_kernel(["const float*", "const int64_t*", "float*"], _READ_SOURCE, "memory read", None)
    if fn is None:
        print(f"WARNING: no memory-read ceiling: {error}", flush=True)
        return None
    a = torch.ones(nbytes // 4)
    n, out = torch.tensor([a.numel()], dtype=torch.int64), torch.zeros(1)
    fn(a, n, out)
    return nbytes / best_of(lambda: fn(a, n, out), repeats) / 1e9


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


def goals_row(goals: dict[str, bool], empty: str = "none") -> tuple[str, str]:
    """The table's last row: each goal met or NOT met (``empty`` when there are none)."""
    return ("goals", ", ".join(f"{k}={'met' if v else 'NOT met'}" for k, v in goals.items()) or empty)


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
    t0, cpu0 = time.perf_counter(), cpu_times()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "wall_s": timeout_s}
    out: dict[str, Any] = {"wall_s": round(time.perf_counter() - t0, 1), "rc": proc.returncode,
                           "cpu_steal_pct": steal_pct(cpu0, cpu_times())}
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


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (``/proc/stat``'s "cpu" line, in ticks), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_pct(before: list[int] | None, after: list[int] | None) -> float | None:
    """The share of CPU time between two ``cpu_times`` that the hypervisor gave to other guests (a
    virtual machine's noisy neighbours: a run with a few percent of it is slower for reasons not its own)."""
    if before is None or after is None or len(before) < 8:
        return None
    total = sum(after[:8]) - sum(before[:8])          # user .. steal (guest time is counted inside user)
    return round(100 * (after[7] - before[7]) / total, 1) if total > 0 else None


def memcap_usable() -> bool:
    """Whether memcap can make a cgroup here (needs root and a memory controller)."""
    if not MEMCAP.is_file():
        return False
    return subprocess.run([str(MEMCAP), "64MiB", "--", "true"], capture_output=True, check=False).returncode == 0


# ---------------------------------------------------------------------------------------------
# llama.cpp's llama-bench: the peer of the decode and prefill benchmarks

# where llama.cpp is built (from the llama-cpp-python 0.3.36 source package: /work/shared/FACTS.md)
LLAMA_SRC = Path("/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp")


def llama_bench_cmd(binary: Path, gguf: Path, threads: int, tg: int, pp: int | Sequence[int], extra: list[str],
                    repeats: int | None = None) -> list[str]:
    """``llama-bench`` for ``tg`` generated tokens and ``pp`` prompt tokens (a list: one test each)."""
    prompts = ",".join(map(str, pp)) if isinstance(pp, Sequence) else str(pp)
    reps = ["-r", str(repeats)] if repeats else []
    return [str(binary), "-m", str(gguf), "-p", prompts, "-n", str(tg), "-t", str(threads), *reps, "-o", "json", *extra]


def parse_llama_bench(text: str) -> dict[str, Any]:
    """llama-bench's ``-o json`` list -> {"tg_tok_s" (mean), "tg_best" (its fastest repetition),
    "tg_std", the same for "pp" (the last prompt test), "build", "cpu"}: the test with n_prompt 0 is
    token generation, the one with n_gen 0 prompt processing; with several prompt tests also
    "pp_best_by_tokens" / "pp_mean_by_tokens" ({n_prompt: tok/s})."""
    start = text.find("[")
    rows = json.loads(text[start:]) if start >= 0 else []
    out: dict[str, Any] = {"tg_tok_s": None, "pp_tok_s": None}
    for r in rows:
        kind = "tg" if r.get("n_prompt") == 0 and r.get("n_gen") else "pp" if r.get("n_gen") == 0 else None
        if kind:
            best = max(r.get("samples_ts") or [r.get("avg_ts")])
            out.update({f"{kind}_tok_s": r.get("avg_ts"), f"{kind}_std": r.get("stddev_ts"), f"{kind}_best": best,
                        f"{kind}_tokens": r.get("n_gen") if kind == "tg" else r.get("n_prompt")})
        if kind == "pp":
            out.setdefault("pp_best_by_tokens", {})[r.get("n_prompt")] = best
            out.setdefault("pp_mean_by_tokens", {})[r.get("n_prompt")] = r.get("avg_ts")
        out["build"] = f"{r.get('build_commit')} ({r.get('build_number')})"
        out["cpu"] = r.get("cpu_info")
    return out


def run_llama(binary: Path, gguf: Path, threads: int, tg: int, pp: int | Sequence[int], extra: list[str],
              repeats: int | None = None, timeout_s: float = 1200) -> dict[str, Any]:
    """llama-bench's tg (``-p 0 -n tg``) and pp (``-p pp -n 0``), each its own process, so that a
    crash of one (e.g. a SIGILL in a prompt kernel) keeps the other; a crash or a timeout becomes
    "tg_error"/"pp_error". A kind given 0 tokens (or no prompt lengths) is not run."""
    out: dict[str, Any] = {"load_avg": round(os.getloadavg()[0], 2), "cmd": []}
    for kind, (p, n) in (("tg", (0, tg)), ("pp", (pp, 0))):
        if not (n if kind == "tg" else p):
            continue
        cmd = llama_bench_cmd(binary, gguf, threads, n, p, extra, repeats)
        out["cmd"].append(" ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            out[f"{kind}_error"] = f"{' '.join(cmd[1:])}: timed out after {timeout_s:.0f} s"
            continue
        if proc.returncode != 0:
            out[f"{kind}_error"] = f"{' '.join(cmd[1:])}: {exit_reason(proc.returncode, proc.stderr)}"
            continue
        got = parse_llama_bench(proc.stdout)
        out.update({k: v for k, v in got.items() if k.startswith(kind) or k in ("build", "cpu")})
    if "tg_error" in out and "pp_error" in out:
        out["error"] = out["tg_error"]
    return out


def exit_reason(returncode: int, stderr: str) -> str:
    """What ended a process: the signal that killed it, or its exit status and last stderr line."""
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    last = [ln for ln in stderr.splitlines() if ln.strip()][-1:] or [""]
    return f"exit {returncode}: {last[0][-300:]}"


def llama_label(bin_dir: Path) -> str:
    """A llama.cpp build's name in results: its build directory ("build", "build-noamx")."""
    return bin_dir.parent.name if bin_dir.name == "bin" else bin_dir.name
