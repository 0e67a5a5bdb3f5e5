"""scripts/bench_serve.py runs end to end on tiny settings and ends with its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_serve_runs_and_reports_both_sides():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_serve.py"), "--model", "demo", "--device", "cpu",
                           "--clients", "2", "--requests", "2", "--rounds", "1", "--max-tokens", "4", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for side in ("in_process", "server"):
        assert out[side]["requests"] == 2 and out[side]["requests_per_s"] > 0
        assert out[side]["ttft_ms"]["p50"] > 0 and out[side]["latency_ms"]["p99"] >= out[side]["latency_ms"]["p50"]
    assert out["server"]["server_health"]["completed"] == 4         # 2 warm-up + 2 measured
    # both sides under the same CPU settings: one thread count, the wait policy both processes inherit
    assert out["threads"] == 1 and out["omp_wait_policy"] == "default"      # not set: libgomp's own
    assert len(out["in_process"]["load_avg_1min"]) == len(out["server"]["load_avg_1min"]) == 1
    assert out["ratio"]["latency_ms_p50"] > 0 and "server / in-process latency" in done.stdout
