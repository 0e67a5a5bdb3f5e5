"""Analyzer tests on hand-built chrome traces whose answers are known by construction.

The builder writes events the way the PyTorch profiler (kineto) does: cpu_op / user_annotation
on the host thread carrying "External id", cuda_runtime / cuda_driver launch calls carrying the
same "External id" plus a "correlation", kernels and memcpys on GPU tracks carrying
"correlation", "stream" and "device".
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tierkv.trace import events as trace_events
from tierkv.trace.analyze import analyze_events, analyze_trace
from tierkv.trace.events import TraceError, iter_trace_events
from tierkv.trace.verdict import VerdictRule, summarize_sweep
from tierkv.trace.cli import trace_app

BASE_US = 1_700_000_000_000.0  # profiler timestamps are large; the analyzer must keep precision


class TraceBuilder:
    """Builds kineto-shaped events at times relative to BASE_US."""

    def __init__(self, pid: int = 100, tid: int = 100) -> None:
        self.pid, self.tid = pid, tid
        self.events: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "ts": BASE_US, "args": {"name": "python"}}]
        self._ext = 0
        self._corr = 0

    def _x(self, cat: str, name: str, ts: float, dur: float, args: dict[str, Any],
           pid: Any = None, tid: Any = None) -> None:
        self.events.append({"ph": "X", "cat": cat, "name": name, "pid": self.pid if pid is None else pid,
                            "tid": self.tid if tid is None else tid, "ts": BASE_US + ts, "dur": dur,
                            "args": args})

    def op(self, name: str, ts: float, dur: float, tid: int | None = None) -> int:
        self._ext += 1
        self._x("cpu_op", name, ts, dur, {"External id": self._ext}, tid=tid)
        return self._ext

    def span(self, name: str, ts: float, dur: float, tid: int | None = None) -> int:
        self._ext += 1
        self._x("user_annotation", name, ts, dur, {"External id": self._ext}, tid=tid)
        return self._ext

    def launch(self, ts: float, dur: float, ext: int | None, api: str = "cudaLaunchKernel",
               corr: int | None = None) -> int:
        if corr is None:
            self._corr += 1
            corr = self._corr
        cat = "cuda_driver" if api.startswith("cu") and not api.startswith("cuda") else "cuda_runtime"
        args = {"correlation": corr, "cbid": 211}
        if ext is not None:
            args["External id"] = ext
        self._x(cat, api, ts, dur, args)
        return corr

    def kernel(self, corr: int, ts: float, dur: float, name: str = "gemm", stream: int = 7,
               device: int = 0, ext: int | None = None) -> None:
        args = {"correlation": corr, "stream": stream, "device": device, "queued": 0}
        if ext is not None:
            args["External id"] = ext
        self._x("kernel", name, ts, dur, args, pid=device, tid=stream)
        self.events.append({"ph": "f", "id": corr, "pid": device, "tid": stream, "ts": BASE_US + ts,
                            "cat": "ac2g", "name": "ac2g", "bp": "e"})

    def memcpy(self, corr: int, ts: float, dur: float, stream: int = 7) -> None:
        self._x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", ts, dur,
                {"correlation": corr, "stream": stream, "device": 0, "bytes": 4096}, pid=0, tid=stream)

    def trace(self) -> dict[str, Any]:
        return {"schemaVersion": 1, "deviceProperties": [{"id": 0, "name": "Fake GPU"}],
                "traceEvents": self.events, "traceName": "built"}

    def write(self, path: Path, indent: int | None = None) -> Path:
        path.write_text(json.dumps(self.trace(), indent=indent))
        return path


def cpu_bound_trace() -> TraceBuilder:
    """Two kernels, one through the runtime API and one through the driver API, barely queued."""
    tb = TraceBuilder()
    e1 = tb.op("aten::mm", 0, 20)
    c1 = tb.launch(5, 4, e1, "cudaLaunchKernel")
    tb.kernel(c1, 12, 10, name="gemm")  # tklqt 7 = launch 4 + queue 3
    e2 = tb.op("aten::add", 30, 20)
    c2 = tb.launch(32, 3, e2, "cuLaunchKernel")
    tb.kernel(c2, 36, 5, name="add")  # tklqt 4 = launch 3 + queue 1
    return tb


def queued_trace() -> TraceBuilder:
    """Four 100 us kernels launched back to back: each waits behind the previous one."""
    tb = TraceBuilder()
    e = tb.op("aten::linear", 0, 20)
    for i in range(4):
        c = tb.launch(5 * i, 4, e)
        tb.kernel(c, 6 + 100 * i, 100)
    return tb


def test_runtime_and_driver_launches_known_answer() -> None:
    r = analyze_events(cpu_bound_trace().events)
    g = r.overall.gpu
    assert r.gpu_available and g is not None
    assert g.kernel_count == 2 and g.orphan_kernel_count == 0
    assert g.tklqt_us == pytest.approx(11) and g.launch_us == pytest.approx(7)
    assert g.queue_us == pytest.approx(4) and g.tklqt_per_kernel_us == pytest.approx(5.5)
    assert g.akd_us == pytest.approx(7.5) and g.kernel_time_us == pytest.approx(15)
    assert r.overall.il_us == pytest.approx(50)  # first op start 0 -> last op end 50 (> kernel end 41)
    assert g.gpu_busy_us == pytest.approx(15) and g.gpu_idle_us == pytest.approx(35)
    assert g.gpu_idle_share == pytest.approx(0.7)
    assert g.launch_apis == {"cuLaunchKernel": 1, "cudaLaunchKernel": 1}
    ops = {row.name: row for row in g.top_operators}
    assert ops["aten::mm"].kernel_count == 1 and ops["aten::mm"].queue_us == pytest.approx(3)
    assert ops["aten::add"].launch_us == pytest.approx(3)
    assert r.verdict.bound == "cpu"


@pytest.mark.parametrize("api", ["cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"])
def test_every_launch_api_links(api: str) -> None:
    tb = TraceBuilder()
    e = tb.op("aten::mm", 0, 20)
    tb.kernel(tb.launch(3, 5, e, api), 10, 4)
    g = analyze_events(tb.events).overall.gpu
    assert g.launch_apis == {api: 1} and g.tklqt_us == pytest.approx(7) and g.queue_us == pytest.approx(2)


def test_queued_kernels_known_answer() -> None:
    r = analyze_events(queued_trace().events)
    g = r.overall.gpu
    assert g.tklqt_us == pytest.approx(6 + 101 + 196 + 291)
    assert g.launch_us == pytest.approx(16) and g.queue_us == pytest.approx(578)
    assert r.overall.il_us == pytest.approx(406)
    assert g.gpu_idle_us == pytest.approx(6) and g.akd_us == pytest.approx(100)
    assert g.top_operators[0].name == "aten::linear" and g.top_operators[0].kernel_count == 4
    assert r.verdict.bound == "gpu" and r.verdict.queue_to_launch == pytest.approx(578 / 16)


def test_kernel_starting_before_launch_returns_has_no_queuing() -> None:
    tb = TraceBuilder()
    e = tb.op("aten::relu", 0, 20)
    c = tb.launch(2, 10, e)
    tb.kernel(c, 5, 1)  # starts 3 us into a 10 us launch call
    g = analyze_events(tb.events).overall.gpu
    assert g.tklqt_us == pytest.approx(3) and g.launch_us == pytest.approx(3)
    assert g.queue_us == 0 and g.early_start_count == 1 and g.skew_clamped_count == 0


def test_small_negative_clock_skew_is_clamped_and_counted() -> None:
    tb = cpu_bound_trace()
    e = tb.op("aten::mul", 60, 10)
    c = tb.launch(62, 4, e)
    tb.kernel(c, 61.5, 2)  # kernel "starts" 0.5 us before its launch call: clock skew
    r = analyze_events(tb.events)
    g = r.overall.gpu
    assert g.skew_clamped_count == 1 and g.max_skew_us == pytest.approx(0.5)
    assert g.tklqt_us == pytest.approx(11)  # the skewed kernel adds 0, never a negative amount
    assert g.early_start_count == 0 and r.warnings == []


def test_large_clock_skew_warns() -> None:
    tb = TraceBuilder()
    e = tb.op("aten::mul", 1000, 10)
    c = tb.launch(1002, 4, e)
    tb.kernel(c, 800, 2)
    r = analyze_events(tb.events)
    assert r.overall.gpu.max_skew_us == pytest.approx(202)
    assert any("clocks disagree" in w for w in r.warnings)


def test_orphans_counted_and_left_out_of_tklqt() -> None:
    tb = cpu_bound_trace()
    tb.kernel(999, 45, 4, name="orphan")  # correlation with no runtime event
    r = analyze_events(tb.events)
    g = r.overall.gpu
    assert g.kernel_count == 3 and g.orphan_kernel_count == 1
    assert g.tklqt_us == pytest.approx(11) and g.tklqt_per_kernel_us == pytest.approx(5.5)
    assert g.akd_us == pytest.approx(19 / 3)
    assert g.launch_apis["(orphan)"] == 1 and g.no_operator_kernel_count == 1
    assert any("orphan" in w for w in r.warnings)


def test_several_streams_use_union_for_busy_time() -> None:
    tb = TraceBuilder()
    e = tb.op("aten::add", 0, 10)
    c1, c2 = tb.launch(1, 2, e), tb.launch(4, 2, e)
    tb.kernel(c1, 10, 20, stream=7)
    tb.kernel(c2, 20, 20, stream=8)
    g = analyze_events(tb.events).overall.gpu
    assert g.kernel_time_us == pytest.approx(40) and g.gpu_busy_us == pytest.approx(30)
    assert g.gpu_idle_us == pytest.approx(10)  # IL 0..40
    assert sorted((s.stream, s.kernel_count) for s in g.streams) == [("0/7", 1), ("0/8", 1)]


def test_memcpy_counted_apart_from_kernels() -> None:
    tb = cpu_bound_trace()
    e = tb.op("aten::copy_", 60, 10)
    c = tb.launch(61, 3, e, "cudaMemcpyAsync")
    tb.memcpy(c, 66, 8)
    g = analyze_events(tb.events).overall.gpu
    assert g.kernel_count == 2 and g.memcpy_count == 1 and g.memcpy_time_us == pytest.approx(8)
    assert g.tklqt_us == pytest.approx(11)


def test_runtime_call_wrapping_driver_call_counts_once() -> None:
    tb = TraceBuilder()
    e = tb.op("aten::mm", 0, 30)
    c = tb.launch(2, 10, e, "cudaLaunchKernel")
    tb.launch(4, 5, e, "cuLaunchKernel", corr=c)  # same correlation, nested
    tb.kernel(c, 20, 5)
    g = analyze_events(tb.events).overall.gpu
    assert g.tklqt_us == pytest.approx(18) and g.launch_us == pytest.approx(10)
    assert g.launch_apis == {"cudaLaunchKernel": 1}


def test_phases_attribute_by_launch_time() -> None:
    tb = TraceBuilder()
    tb.span("tierkv::prefill", 0, 100)
    e = tb.op("aten::mm", 10, 20)
    tb.kernel(tb.launch(12, 4, e), 20, 50)
    tb.span("tierkv::decode", 200, 100)
    for t in (210, 250):
        e = tb.op("aten::mv", t, 10)
        tb.kernel(tb.launch(t + 1, 2, e), t + 5, 3)
    tb.kernel(777, 280, 1, ext=e)  # orphan, attributed through its operator's start (250)
    r = analyze_events(tb.events)
    pre, dec = r.phases["prefill"], r.phases["decode"]
    assert pre.gpu.kernel_count == 1 and pre.gpu.tklqt_us == pytest.approx(8)
    assert dec.gpu.kernel_count == 3 and dec.gpu.orphan_kernel_count == 1
    assert dec.gpu.tklqt_us == pytest.approx(8) and dec.cpu.cpu_op_count == 2
    assert dec.il_us == pytest.approx(281 - 210)
    assert pre.cpu.span_count == 1 and pre.cpu.outside_ops_us == pytest.approx(80)
    assert r.overall.gpu.kernel_count == 4
    spans = {s.name: s for s in r.tierkv_spans}
    assert spans["tierkv::decode"].count == 1 and spans["tierkv::decode"].total_us == pytest.approx(100)


def test_tierkv_io_spans_show_gpu_idle_during_a_stall() -> None:
    tb = cpu_bound_trace()
    tb.span("tierkv::move disk->host layer.3 4096B", 100, 50)
    tb.span("tierkv::wait", 150, 30)
    e = tb.op("aten::mm", 180, 5)
    tb.kernel(tb.launch(181, 2, e), 185, 10)
    tb.span("tierkv::move disk->host layer.4 4096B", 187, 10)  # overlaps the kernel 187..195: 8 us busy
    spans = {s.name: s for s in analyze_events(tb.events).tierkv_spans}
    assert spans["tierkv::move disk->host"].count == 2 and spans["tierkv::move disk->host"].total_us == pytest.approx(60)
    assert spans["tierkv::move disk->host"].gpu_idle_during_us == pytest.approx(52)
    assert spans["tierkv::wait"].gpu_idle_during_us == pytest.approx(30)


def moves_trace() -> TraceBuilder:
    """Two disk reads (one in two overlapping pieces on two reader threads) and one queued copy."""
    tb = cpu_bound_trace()
    tb.span("tierkv::move disk->host layer.0 4096B 1/2", 0, 100, tid=201)
    tb.span("tierkv::move disk->host layer.0 100B 2/2", 50, 100, tid=202)
    tb.span("tierkv::move disk->host layer.1 8192B", 300, 50, tid=201)
    tb.span("tierkv::move host->device layer.0 4196B", 400, 5)
    tb.memcpy(tb.launch(401, 2, None, "cudaMemcpyAsync"), 410, 20)
    tb.memcpy(tb.launch(599, 2, None, "cudaMemcpyAsync"), 600, 7)     # not inside any move span
    return tb


def test_move_spans_summarized_per_link() -> None:
    r = analyze_events(moves_trace().events)
    rows = {m.link: m for m in r.moves}
    read, copy = rows["disk->host"], rows["host->device"]
    assert (read.moves, read.spans, read.bytes) == (2, 3, 4096 + 100 + 8192)
    assert read.busy_us == pytest.approx(200) and read.span_us == pytest.approx(250)
    assert read.gbps == pytest.approx((4096 + 100 + 8192) / 200e-6 / 1e9) and read.memcpy_us == 0
    assert (copy.moves, copy.bytes, copy.memcpy_us) == (1, 4196, pytest.approx(20))
    spans = {s.name: s.count for s in r.tierkv_spans}
    assert spans["tierkv::move disk->host"] == 3 and spans["tierkv::move host->device"] == 1
    assert not any(name.startswith("tierkv::move disk->host layer") for name in spans)
    assert analyze_events(cpu_bound_trace().events).moves == []


def test_cli_analyze_shows_the_moves_table(tmp_path: Path) -> None:
    path = moves_trace().write(tmp_path / "m.json")
    result = CliRunner().invoke(trace_app, ["analyze", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "moves (tierkv::move spans)" in result.stdout and "disk->host" in result.stdout
    assert "12.10 KiB" in result.stdout and "GPU memcpy" in result.stdout
    d = json.loads(CliRunner().invoke(trace_app, ["analyze", str(path), "--json"]).stdout)
    assert {m["link"]: m["moves"] for m in d["moves"]} == {"disk->host": 2, "host->device": 1}


def test_cpu_self_time_outside_ops_and_python() -> None:
    tb = TraceBuilder()
    tb._x("python_function", "model.py(10): forward", 0, 100, {})
    tb.op("aten::linear", 10, 30)
    tb.op("aten::mm", 15, 20)
    tb.op("aten::relu", 50, 10)
    r = analyze_events(tb.events)
    ops = {o.name: o for o in r.overall.cpu.top_operators}
    assert ops["aten::linear"].self_us == pytest.approx(10) and ops["aten::mm"].self_us == pytest.approx(20)
    assert r.overall.cpu.cpu_op_time_us == pytest.approx(40)
    assert r.overall.cpu.outside_ops_us == pytest.approx(10)  # window 10..60 minus 40 us of ops
    assert r.python.python_only_us == pytest.approx(60) and r.python.function_event_count == 1


def test_no_gpu_kernels_reports_null_gpu_fields(tmp_path: Path) -> None:
    tb = TraceBuilder()
    tb.span("tierkv::prefill", 0, 50)
    tb.op("aten::mm", 5, 30)
    d = analyze_trace(tb.write(tmp_path / "cpu.json")).to_dict()
    assert d["gpu"] == {"available": False, "reason": "trace holds no GPU kernels"}
    assert d["overall"]["gpu"] is None and d["phases"]["prefill"]["gpu"] is None
    assert d["phases"]["decode"] is None
    assert d["overall"]["cpu"]["cpu_op_count"] == 1 and d["overall"]["il_us"] == pytest.approx(30)
    assert d["verdict"]["bound"] is None and "no GPU kernels" in d["verdict"]["reason"]
    assert d["tierkv_spans"][0]["gpu_idle_during_us"] is None


def test_verdict_rule_thresholds() -> None:
    g = analyze_events(queued_trace().events).overall.gpu
    assert VerdictRule().judge(g).bound == "gpu"
    assert VerdictRule(max_idle_share=0.01).judge(g).bound == "cpu"  # idle 1.5% is not < 1%
    assert VerdictRule(min_queue_to_launch=50).judge(g).bound == "cpu"  # ratio 36 < 50
    assert VerdictRule().judge(None).bound is None
    assert "GPU-bound when GPU idle share < 25%" in VerdictRule().describe()


def _report(tb: TraceBuilder):
    return analyze_events(tb.events)


def test_sweep_transition_and_knee() -> None:
    cpu, gpu = _report(cpu_bound_trace()), _report(queued_trace())
    s = summarize_sweep([(4, gpu), (1, cpu), (2, cpu), (8, gpu)])
    assert [p.batch_size for p in s.points] == [1, 2, 4, 8]
    assert s.transition_batch_size == 4 and "CPU-bound at batch size 2" in s.transition_reason
    assert s.tklqt_knee_batch_size == 4  # per-kernel TKLQT 5.5 -> 148.5
    assert s.rule == VerdictRule().describe()
    none = summarize_sweep([(1, gpu), (2, gpu)])
    assert none.transition_batch_size is None and "GPU-bound at every batch size" in none.transition_reason
    cpu_only = _report(TraceBuilder())
    s2 = summarize_sweep([(1, cpu_only), (2, cpu_only)])
    assert s2.transition_batch_size is None and "no GPU kernels" in s2.transition_reason
    assert s2.points[0].tklqt_us is None


def test_streaming_reader_across_tiny_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tb = queued_trace()
    path = tb.write(tmp_path / "t.json", indent=2)
    expected = analyze_trace(path).to_dict()
    monkeypatch.setattr(trace_events, "_READ_CHARS", 7)
    assert analyze_trace(path).to_dict() == expected
    assert len(list(iter_trace_events(path))) == len(tb.events)


def test_gzip_and_bare_array_forms(tmp_path: Path) -> None:
    tb = cpu_bound_trace()
    gz = tmp_path / "t.json.gz"
    with gzip.open(gz, "wt") as fh:
        json.dump(tb.trace(), fh)
    arr = tmp_path / "array.json"
    arr.write_text(json.dumps(tb.events))
    assert analyze_trace(gz).overall.gpu.tklqt_us == pytest.approx(11)
    assert analyze_trace(arr).overall.gpu.tklqt_us == pytest.approx(11)


@pytest.mark.parametrize("content, needle", [
    (b"\x00\x01\x02binary\xff\xfe garbage", "not a"),
    (b'{"hello": [1, 2, 3]}', "no 'traceEvents'"),
    (b"", "empty"),
    (b"  \n", "empty"),
    (b"just words", "not a JSON chrome trace"),
    (b'{"traceEvents": [{"ph": "X"} {"ph": "X"}]}', "malformed"),
])
def test_bad_input_gets_clear_error(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(TraceError, match=needle) as info:
        analyze_trace(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.97])
def test_truncated_trace_gets_clear_error(tmp_path: Path, fraction: float) -> None:
    data = json.dumps(queued_trace().trace(), indent=2).encode()
    path = tmp_path / "cut.json"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(TraceError, match="truncated"):
        analyze_trace(path)


def test_truncated_gzip_gets_clear_error(tmp_path: Path) -> None:
    data = gzip.compress(json.dumps(queued_trace().trace()).encode())
    path = tmp_path / "cut.json.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="truncated"):
        analyze_trace(path)


def test_cli_analyze_json(tmp_path: Path) -> None:
    path = queued_trace().write(tmp_path / "q.json")
    result = CliRunner().invoke(trace_app, ["analyze", str(path), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["gpu"]["available"] is True and d["overall"]["gpu"]["tklqt_us"] == pytest.approx(594)
    assert d["verdict"]["bound"] == "gpu" and d["verdict"]["rule"] == VerdictRule().describe()
    two = CliRunner().invoke(trace_app, ["analyze", str(path), str(path), "--json"])
    assert len(json.loads(two.stdout)["traces"]) == 2


def test_cli_analyze_table(tmp_path: Path) -> None:
    path = cpu_bound_trace().write(tmp_path / "c.json")
    result = CliRunner().invoke(trace_app, ["analyze", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "TKLQT" in result.stdout and "CPU-bound" in result.stdout and "aten::mm" in result.stdout


def test_cli_bad_file_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"traceEvents": [')
    result = CliRunner().invoke(trace_app, ["analyze", str(path)])
    assert result.exit_code == 2
    assert "truncated" in result.stderr and "Traceback" not in result.output
    assert not isinstance(result.exception, TraceError)
