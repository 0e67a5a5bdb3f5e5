"""The arithmetic of ``scripts/bench_batch.py``'s repeated runs and of the CPU steal it reports.

On a shared virtual machine one run of a contender can be 30% slower for a busy minute, so the
benchmark can run each side several times, alternating, and report each side's median run. These
tests check which run is reported and how the steal share is read, on hand-made inputs (the
measurements themselves are the script's job)."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
from scripts_util import load_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("bench_batch")


def test_the_median_run_is_reported_with_every_run_beside_it(bench: ModuleType) -> None:
    runs = [{"fits": True, "job_tok_s": v, "cpu_steal_pct": s, "n": i}
            for i, (v, s) in enumerate([(5.0, 0.1), (3.0, 9.5), (4.0, 0.2)])]
    got = bench.median_run(runs, "fits")
    assert got["n"] == 2 and got["job_tok_s"] == 4.0
    assert got["job_tok_s_runs"] == [5.0, 3.0, 4.0] and got["cpu_steal_pct_runs"] == [0.1, 9.5, 0.2]
    two = bench.median_run(runs[:2], "fits")                 # an even count: the lower middle
    assert two["job_tok_s"] == 3.0
    assert bench.median_run([runs[0]], "fits")["job_tok_s"] == 5.0
    failed = {"runs": False, "error": "OOM-killed under the cap"}
    assert bench.median_run([{"runs": True, "job_tok_s": 2.0}, failed], "runs") is failed
    assert "3.00/4.00" in bench._runs({"job_tok_s_runs": [3.0, 4.0], "cpu_steal_pct_runs": [0.1, 2.0]})
    assert bench._runs({"job_tok_s": 3.0}) == ""


def test_steal_is_the_share_of_cpu_time_between_two_readings(bench: ModuleType) -> None:
    common = sys.modules["bench_common"]
    before = [100, 0, 50, 800, 10, 0, 5, 35, 0, 0]        # user nice system idle iowait irq softirq steal guest ...
    after = [300, 0, 100, 1500, 10, 0, 5, 85, 0, 0]        # 1000 ticks later, 50 of them stolen
    assert common.steal_pct(before, after) == 5.0
    assert common.steal_pct(None, after) is None and common.steal_pct(before, before) is None
    now = common.cpu_times()
    assert now is None or (len(now) >= 8 and all(v >= 0 for v in now))
