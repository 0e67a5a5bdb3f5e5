"""Benchmark: the TKLQT analyzer on a synthetic ~100 MB PyTorch-profiler chrome trace.

Why this script exists: ``tierkv trace analyze`` must read large traces in reasonable time and
memory. It writes a kineto-shaped trace (cpu_op -> cudaLaunchKernel -> kernel with correlation
and External ids, ac2g flow events, decode spans, some memcpys; events pretty-printed as the
profiler does) whose TKLQT is known by construction, then runs, each in a fresh subprocess:
the streaming analyzer (wall time, peak RSS), the analyzer under tracemalloc (peak Python heap),
and the peer: ``json.load`` of the whole file (what a naive analyzer starts with; time, peak RSS).
It prints a table and ends with one JSON line.

    python scripts/bench_trace_analyze.py [--size-mb 100] [--keep PATH] [--no-tracemalloc]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

BASE_US = 1_790_000_000_000.0
PID, TID = 4242, 4242


def _dump(fh: TextIO, event: dict[str, Any], first: bool) -> None:
    text = json.dumps(event, indent=2).replace("\n", "\n  ")
    fh.write(("\n  " if first else ",\n  ") + text)


def _x(cat: str, name: str, ts: float, dur: float, args: dict[str, Any], pid: Any = PID, tid: Any = TID) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": round(ts, 3),
            "dur": round(dur, 3), "args": args}


class _Gen:
    """Emits one decode step after another until the file reaches the target size."""

    def __init__(self, fh: TextIO, seed: int) -> None:
        self.fh, self.rng = fh, random.Random(seed)
        self.t = self.gpu_free = BASE_US
        self.ext = self.corr = self.kernels = self.memcpys = 0
        self.tklqt_us = 0.0
        self.first = True

    def emit(self, event: dict[str, Any]) -> None:
        _dump(self.fh, event, self.first)
        self.first = False

    def op_with_kernel(self, name: str, kernel: str) -> None:
        rng = self.rng
        self.ext += 1
        self.corr += 1
        op_ts, launch_ts = self.t, self.t + rng.uniform(2, 6)
        launch_dur = rng.uniform(3, 8)
        k_ts = max(launch_ts + launch_dur + rng.uniform(0.5, 2), self.gpu_free)
        k_dur = rng.uniform(2, 40)
        op_dur = launch_ts + launch_dur + rng.uniform(1, 4) - op_ts
        self.emit(_x("cpu_op", name, op_ts, op_dur, {"External id": self.ext, "Record function id": 0,
                                                       "Sequence number": self.ext, "Fwd thread id": 0,
                                                       "Ev Idx": self.ext}))
        self.emit(_x("cuda_runtime", "cudaLaunchKernel", launch_ts, launch_dur,
                     {"External id": self.ext, "cbid": 211, "correlation": self.corr}))
        self.emit({"ph": "s", "id": self.corr, "pid": PID, "tid": TID, "ts": round(launch_ts, 3),
                   "cat": "ac2g", "name": "ac2g"})
        self.emit(_x("kernel", kernel, k_ts, k_dur, {
            "External id": self.ext, "queued": 0, "device": 0, "context": 1, "stream": 7,
            "correlation": self.corr, "registers per thread": 64, "shared memory": 0,
            "blocks per SM": 1.5, "warps per SM": 6.0, "grid": [132, 1, 1], "block": [128, 1, 1],
            "est. achieved occupancy %": 9}, pid=0, tid=7))
        self.emit({"ph": "f", "id": self.corr, "pid": 0, "tid": 7, "ts": round(k_ts, 3),
                   "cat": "ac2g", "name": "ac2g", "bp": "e"})
        self.tklqt_us += k_ts - launch_ts
        self.gpu_free = k_ts + k_dur
        self.kernels += 1
        self.t = op_ts + op_dur + rng.uniform(1, 10)

    def step(self, layers: int) -> None:
        start = self.t
        self.ext += 1
        span_ext = self.ext
        self.t += 5
        for _ in range(layers):
            for name, kernel in (("aten::mm", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64"),
                                 ("aten::add", "void at::native::vectorized_elementwise_kernel<4>"),
                                 ("aten::_scaled_dot_product_flash_attention", "flash_fwd_splitkv_kernel"),
                                 ("aten::mul", "void at::native::elementwise_kernel<128, 2>")):
                self.op_with_kernel(name, kernel)
        self.emit(_x("user_annotation", "tierkv::decode", start, self.t - start,
                     {"External id": span_ext, "Record function id": 0, "Ev Idx": span_ext}))


def write_trace(path: Path, size_mb: float, seed: int = 0) -> dict[str, Any]:
    """Write the synthetic trace; return what it holds (kernel count, TKLQT by construction)."""
    target = int(size_mb * 1e6)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write('{\n  "schemaVersion": 1,\n  "deviceProperties": [{"id": 0, "name": "NVIDIA H100"}],\n'
                 '  "traceEvents": [')
        gen = _Gen(fh, seed)
        while fh.tell() < target:
            gen.step(layers=16)
        fh.write('\n  ],\n  "traceName": "synthetic"\n}\n')
    return {"kernels": gen.kernels, "tklqt_us": gen.tklqt_us}


_LOAD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("tkv_analyze", sys.argv[2])
analyze = importlib.util.module_from_spec(spec); sys.modules["tkv_analyze"] = analyze
spec.loader.exec_module(analyze)  # the analyzer alone: importing the tierkv package would pull in torch
analyze_trace = analyze.analyze_trace
"""
_ANALYZE = _LOAD + """
import json, resource, time
t = time.perf_counter(); r = analyze_trace(sys.argv[1]); dt = time.perf_counter() - t
g = r.overall.gpu
print(json.dumps({"seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "events": r.event_count, "kernels": g.kernel_count, "tklqt_us": g.tklqt_us}))
"""
_TRACEMALLOC = _LOAD + """
import json, tracemalloc
tracemalloc.start(); analyze_trace(sys.argv[1]); peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"peak_heap_mb": peak / 2**20}))
"""
_JSON_LOAD = """
import json, resource, sys, time
t = time.perf_counter(); d = json.load(open(sys.argv[1])); dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "events": len(d["traceEvents"])}))
"""
_BASELINE = _LOAD + """
import json, resource
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _child(code: str, *args: str) -> dict[str, Any]:
    analyzer = Path(__file__).resolve().parents[1] / "tierkv" / "trace" / "analyze.py"
    out = subprocess.run([sys.executable, "-c", code, args[0] if args else "", str(analyzer)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--keep", type=Path, default=None, help="write the trace here and keep it")
    parser.add_argument("--no-tracemalloc", action="store_true", help="skip the (slow) heap measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "synthetic_trace.json"
        t0 = time.perf_counter()
        truth = write_trace(path, args.size_mb)
        gen_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 1e6
        base = _child(_BASELINE)
        ours = _child(_ANALYZE, str(path))
        heap = None if args.no_tracemalloc else _child(_TRACEMALLOC, str(path))
        peer = _child(_JSON_LOAD, str(path))
    correct = ours["kernels"] == truth["kernels"] and abs(ours["tklqt_us"] - truth["tklqt_us"]) < 1e-3 * truth["kernels"]
    rows = [("trace size", f"{size_mb:.1f} MB, {ours['events']} events, {truth['kernels']} kernels (written in {gen_s:.1f} s)"),
            ("analyzer (streaming)", f"{ours['seconds']:.2f} s, {size_mb / ours['seconds']:.1f} MB/s, "
                                     f"peak RSS {ours['peak_rss_mb']:.0f} MB (interpreter+imports {base['peak_rss_mb']:.0f} MB)"),
            ("analyzer heap peak", "skipped" if heap is None else f"{heap['peak_heap_mb']:.0f} MB (tracemalloc)"),
            ("peer: json.load only", f"{peer['seconds']:.2f} s, peak RSS {peer['peak_rss_mb']:.0f} MB (no metrics yet)"),
            ("TKLQT vs construction", "match" if correct else f"MISMATCH {ours['tklqt_us']} vs {truth['tklqt_us']}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps({
        "bench": "trace_analyze", "trace_mb": round(size_mb, 1), "events": ours["events"], "kernels": truth["kernels"],
        "analyze_s": round(ours["seconds"], 3), "analyze_mb_per_s": round(size_mb / ours["seconds"], 1),
        "analyze_peak_rss_mb": round(ours["peak_rss_mb"], 1), "baseline_rss_mb": round(base["peak_rss_mb"], 1),
        "analyze_peak_heap_mb": None if heap is None else round(heap["peak_heap_mb"], 1),
        "peer_json_load_s": round(peer["seconds"], 3), "peer_json_load_peak_rss_mb": round(peer["peak_rss_mb"], 1),
        "tklqt_correct": correct}))


if __name__ == "__main__":
    main()
