"""scripts/gpu_check.sh, the one command for a GPU machine, checked here without one.

Why this file exists: the script once named a scripts/trace_sweep.py that did not exist, and its
guard skipped it without a word, so the TKLQT sweep silently never ran. These tests check that
every file it names exists, that a missing one stops it with a clear line before anything runs,
and (with stand-ins for nvidia-smi and python on PATH) which commands it runs and how it reports
a failed step.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_every_file_the_script_names_exists() -> None:
    named = set(re.findall(r"\b(?:scripts|tierkv|tests)/[\w./-]+\.(?:py|sh|json|safetensors)\b", SCRIPT.read_text()))
    assert "scripts/bench_kernels.py" in named and "tierkv/demo_model/config.json" in named
    assert [path for path in sorted(named) if not (ROOT / path).is_file()] == []


def test_a_missing_file_stops_it_loudly_before_anything_runs(tmp_path: Path) -> None:
    alone = tmp_path / "scripts" / "gpu_check.sh"          # a tree holding only the script
    alone.parent.mkdir()
    shutil.copy(SCRIPT, alone)
    run = _run(alone, str(tmp_path / "out"))
    assert run.returncode == 2, run
    assert "gpu_check.sh: missing scripts/bench_kernels.py, which this check needs" in run.stderr
    assert run.stderr.rstrip().endswith("nothing was run: restore the missing files, or take them out of "
                                        "scripts/gpu_check.sh")
    assert not (tmp_path / "out").exists()


def test_it_runs_the_tests_the_benchmarks_and_the_trace_sweep_and_reports_a_failed_step(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls.txt"
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'Fake GPU, 81559 MiB, 0'\n")
    (fake / "python").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                                 'case "$*" in *bench_kv.py*) echo "kv went wrong"; exit 3;; esac\n')
    for tool in fake.iterdir():
        tool.chmod(0o755)
    out = tmp_path / "out"
    run = _run(SCRIPT, str(out), env={"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
    assert run.returncode == 1, run
    ran = [line for line in calls.read_text().splitlines() if not line.startswith("-c ")]
    assert ran == ["-m pytest -q -m gpu -p no:cacheprovider -rs",
                   "scripts/bench_resident.py --device cuda",
                   "scripts/bench_weights.py --device cuda",
                   "scripts/bench_kv.py --device cuda",
                   "scripts/bench_kernels.py --device cuda",
                   "scripts/bench_quant_kernels.py --device cuda",
                   f"-m tierkv trace run demo --device cuda --batch-sizes 1,2,4,8,16,32 --out {out}/trace",
                   f"-m tierkv trace run demo --device cuda --batch-sizes 1,8,32 --compile --out {out}/trace-compiled",
                   f"-m tierkv trace run demo --device cuda --batch-sizes 1,8,32 --cuda-graph --out {out}/trace-graphs"]
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary] == [
        ["ok", "gpu-tests"], ["ok", "bench_resident"], ["ok", "bench_weights"], ["FAILED", "bench_kv"],
        ["ok", "bench_kernels"], ["ok", "bench_quant_kernels"], ["ok", "trace-sweep"], ["ok", "trace-compiled"],
        ["ok", "trace-graphs"]]
    assert "exit status 3 after" in summary[3] and f"see {out}/bench_kv.log" in summary[3]
    assert (out / "bench_kv.log").read_text() == "kv went wrong\n"
