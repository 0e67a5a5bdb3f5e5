"""Chrome traces written by the PyTorch profiler -> TKLQT and its companion metrics.

Why this module exists: the SKIP paper's Total Kernel Launch and Queuing Time (TKLQT) tells
whether an inference is CPU-bound (kernels start as soon as they are launched, the GPU waits) or
GPU-bound (kernels queue behind each other), but its profiler is not public. This module computes
it, with average kernel duration, inference latency, GPU idle time, kernel counts, top kernels and
operators, from any chrome trace the PyTorch profiler exports, so it works on programs that are
not tierkv. It is pure Python (no torch) and reads the trace through ``trace.events``, which
streams the ``traceEvents`` array and keeps only the fields the metrics need in typed arrays, so
memory follows the number of events kept, never a Python object graph of the whole file (the
verdict rule and the sweep summary live in ``trace.verdict``, the move rows in ``trace.moves``).
Measured with ``scripts/bench_trace_analyze.py`` (2-core Xeon, shared): a 100 MB,
340k-event trace in 2.9 s with 81 MB peak RSS (57 MB Python heap); ``json.load`` of the same file
alone takes 2.6 s and 366 MB before any metric is computed.

Definitions (all times in microseconds):

* For a GPU kernel j launched by the CPU call l_j (``cudaLaunchKernel``, ``cuLaunchKernel``, their
  ``Ex`` forms, or any other runtime/driver call carrying the same correlation id),
  ``tklqt_j = start(j) - start(l_j)``; TKLQT is the sum over kernels. It splits into a launch share
  ``min(dur(l_j), tklqt_j)`` (CPU dispatch) and a queuing share (the rest: the kernel start minus
  the end of the launch call). A kernel that starts before its launch call starts is clock skew:
  clamped to 0 and counted; one that starts before its launch call returns has no queuing and is
  counted as an early start.
* Orphans: kernels whose correlation id has no runtime/driver event (counted, left out of TKLQT).
* Inference latency IL: first CPU operator start to last kernel end, extended to the last operator
  end when the CPU finishes after the GPU, so latency is never under-reported.
* GPU idle: IL minus GPU busy time, where busy is the union of kernel intervals over all streams
  (the plain sum of kernel times would make idle time negative with concurrent streams; both are
  reported).
* Phases: a kernel belongs to ``prefill``/``decode`` when the start of its launch call lies inside a
  ``tierkv::prefill``/``tierkv::decode`` span (``user_annotation`` events from
  ``torch.profiler.record_function``); a CPU operator when its own start does.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tierkv.trace.events import CollectedTrace, EventColumns, collect, iter_trace_events
from tierkv.trace.intervals import SpanSet, covered_length, merge_intervals, overlap_length
from tierkv.trace.moves import MOVE_SPAN_PREFIX, MoveRow, move_rows, parse_move_span
from tierkv.trace.verdict import NO_GPU_REASON, Verdict, VerdictRule

TIERKV_SPAN_PREFIX = "tierkv::"
PHASES: tuple[str, ...] = ("prefill", "decode")

_SYNC_CALLS = frozenset({
    "cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy",
    "cuCtxSynchronize", "cuStreamSynchronize", "cuEventSynchronize",
})
_SKEW_WARN_US = 50.0


# ----------------------------------------------------------------------------------------------
# Report dataclasses


@dataclass
class KernelRow:
    """One kernel name: how often it ran and for how long."""

    name: str
    count: int
    total_us: float
    mean_us: float


@dataclass
class GpuOperatorRow:
    """One CPU operator (innermost op or span around the launch) and the kernels it launched."""

    name: str
    kernel_count: int
    kernel_time_us: float
    launch_us: float
    queue_us: float


@dataclass
class CpuOperatorRow:
    """One CPU operator name: calls, self time (children excluded) and total time."""

    name: str
    count: int
    self_us: float
    total_us: float


@dataclass
class StreamRow:
    """One GPU stream, named ``device/stream``."""

    stream: str
    kernel_count: int
    kernel_time_us: float


@dataclass
class SpanRow:
    """One tierkv span name (move spans per link: ``tierkv::move disk->host``): count, total time, GPU idle during it."""

    name: str
    count: int
    total_us: float
    gpu_idle_during_us: float | None


@dataclass
class GpuMetrics:
    """GPU side of one scope; absent (None) when the trace holds no GPU kernels."""

    kernel_count: int
    orphan_kernel_count: int
    no_operator_kernel_count: int
    memcpy_count: int
    memcpy_time_us: float
    memset_count: int
    tklqt_us: float
    tklqt_per_kernel_us: float | None
    launch_us: float
    queue_us: float
    launch_share: float | None
    queue_share: float | None
    mean_launch_us: float | None
    mean_queue_us: float | None
    akd_us: float | None
    kernel_time_us: float
    gpu_busy_us: float
    gpu_idle_us: float | None
    gpu_idle_share: float | None
    sync_call_count: int
    sync_wait_us: float
    skew_clamped_count: int
    max_skew_us: float
    early_start_count: int
    launch_apis: dict[str, int]
    streams: list[StreamRow]
    top_kernels: list[KernelRow]
    top_operators: list[GpuOperatorRow]


@dataclass
class CpuMetrics:
    """CPU side of one scope: operators, and time on the thread with no operator running."""

    span_count: int
    span_total_us: float
    cpu_op_count: int
    cpu_op_time_us: float
    outside_ops_us: float | None
    top_operators: list[CpuOperatorRow]


@dataclass
class ScopeReport:
    """Metrics over the whole trace or over one phase (prefill, decode)."""

    name: str
    il_us: float | None
    cpu: CpuMetrics
    gpu: GpuMetrics | None


@dataclass
class PythonMetrics:
    """Python overhead, from ``python_function`` events (profiler run with ``with_stack=True``)."""

    function_event_count: int
    python_time_us: float
    python_only_us: float


@dataclass
class TraceReport:
    """All metrics of one trace. Times in microseconds; GPU fields are None without GPU kernels."""

    source: str
    event_count: int
    gpu_available: bool
    gpu_reason: str | None
    overall: ScopeReport
    phases: dict[str, ScopeReport]
    tierkv_spans: list[SpanRow]
    moves: list[MoveRow]
    python: PythonMetrics | None
    python_reason: str | None
    verdict: Verdict
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data, with ``gpu: {available, reason}`` at the top."""
        d = asdict(self)
        head = {"source": d.pop("source"), "event_count": d.pop("event_count"),
                "gpu": {"available": d.pop("gpu_available"), "reason": d.pop("gpu_reason")}}
        reason = d.pop("python_reason")
        d["python"] = d["python"] or {"available": False, "reason": reason}
        return round_floats({**head, **d})


def round_floats(value: Any) -> Any:
    """Floats rounded to the nanosecond (3 decimals of a microsecond); shares keep 6 decimals."""
    if isinstance(value, float):
        return round(value, 6) if abs(value) < 10 else round(value, 3)
    if isinstance(value, dict):
        return {k: round_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [round_floats(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Linking GPU activity to its launch call and operator


@dataclass
class _Links:
    """Per GPU activity (kernel, memcpy or memset): its launch call, operator and TKLQT parts."""

    anchor: array  # CPU time used for phase attribution: launch start, else operator start, else nan
    linked: bytearray  # 1 when a runtime/driver event has the same correlation id
    api: array  # name id of the launch call, -1 for orphans
    op_name: array  # name id of the launching operator (or span), -1 when none
    tklqt: array
    launch: array
    queue: array
    skew: array  # amount clamped (> 0 only when the kernel starts before its launch call)
    early: bytearray  # 1 when the kernel starts before its launch call returns


def _launch_by_corr(launches: EventColumns) -> dict[int, int]:
    """Correlation id -> outermost launch call (a runtime call wraps the driver call it makes)."""
    by_corr: dict[int, int] = {}
    for i, c in enumerate(launches.corr):
        if c < 0:
            continue
        j = by_corr.get(c)
        if j is None or launches.ts[i] < launches.ts[j]:
            by_corr[c] = i
    return by_corr


def _ext_index(col: CollectedTrace) -> dict[int, tuple[int, float]]:
    """External id -> (name id, start) of the CPU operator or span that carries it."""
    out: dict[int, tuple[int, float]] = {}
    for table in (col.notes, col.ops):  # ops win over spans when both carry an id
        for i, x in enumerate(table.ext):
            if x >= 0:
                out[x] = (table.name[i], table.ts[i])
    return out


def _link(table: EventColumns, launches: EventColumns, by_corr: dict[int, int],
          ext_index: dict[int, tuple[int, float]]) -> _Links:
    n = len(table)
    links = _Links(array("d"), bytearray(n), array("l"), array("l"), array("d", bytes(8 * n)),
                   array("d", bytes(8 * n)), array("d", bytes(8 * n)), array("d", bytes(8 * n)),
                   bytearray(n))
    for k in range(n):
        li = by_corr.get(table.corr[k], -1) if table.corr[k] >= 0 else -1
        ext = table.ext[k]
        if li >= 0:
            links.linked[k] = 1
            if launches.ext[li] >= 0:
                ext = launches.ext[li]
            raw = table.ts[k] - launches.ts[li]
            if raw < 0:
                links.skew[k], raw = -raw, 0.0
            links.tklqt[k] = raw
            links.launch[k] = min(launches.dur[li], raw)
            links.queue[k] = raw - links.launch[k]
            links.early[k] = links.skew[k] == 0 and table.ts[k] < launches.end(li)
        op = ext_index.get(ext) if ext >= 0 else None
        links.api.append(launches.name[li] if li >= 0 else -1)
        links.op_name.append(op[0] if op else -1)
        links.anchor.append(launches.ts[li] if li >= 0 else (op[1] if op else float("nan")))
    return links


# ----------------------------------------------------------------------------------------------
# CPU side


@dataclass
class _OpTree:
    """Self time and top-level flag of every CPU operator, and top-level coverage per thread."""

    self_us: array
    top: bytearray
    coverage: dict[int, list[tuple[float, float]]]


def _op_tree(ops: EventColumns) -> _OpTree:
    n = len(ops)
    self_us, top = array("d", ops.dur), bytearray(n)
    coverage: dict[int, list[tuple[float, float]]] = {}
    stack: list[int] = []
    thread = None
    for i in sorted(range(n), key=lambda i: (ops.thread[i], ops.ts[i], -ops.dur[i])):
        if ops.thread[i] != thread:
            stack.clear()
            thread = ops.thread[i]
        t = ops.ts[i]
        while stack and ops.end(stack[-1]) <= t:
            stack.pop()
        if stack:
            parent = stack[-1]
            self_us[parent] -= min(ops.dur[i], ops.end(parent) - t)
        else:
            top[i] = 1
            coverage.setdefault(thread, []).append((t, ops.end(i)))
        stack.append(i)
    return _OpTree(self_us, top, {k: merge_intervals(v) for k, v in coverage.items()})


def _cpu_operator_rows(col: CollectedTrace, tree: _OpTree, ops: list[int], top_n: int) -> list[CpuOperatorRow]:
    agg: dict[int, list[float]] = {}
    for i in ops:
        row = agg.setdefault(col.ops.name[i], [0, 0.0, 0.0])
        row[0] += 1
        row[1] += tree.self_us[i]
        row[2] += col.ops.dur[i]
    rows = [CpuOperatorRow(col.names[k], int(c), s, t) for k, (c, s, t) in agg.items()]
    rows.sort(key=lambda r: (-r.self_us, r.name))
    return rows[:top_n]


def _outside_ops(spans_by_thread: dict[int, list[tuple[float, float]]], tree: _OpTree) -> float:
    """Time inside the given spans, per thread, with no top-level operator running there."""
    total = 0.0
    for thread, spans in spans_by_thread.items():
        merged = merge_intervals(spans)
        total += covered_length(merged) - overlap_length(merged, tree.coverage.get(thread, []))
    return total


def _main_thread_window(col: CollectedTrace, tree: _OpTree) -> dict[int, list[tuple[float, float]]]:
    """The busiest operator thread and its first-op-start..last-op-end window."""
    if not tree.coverage:
        return {}
    main = max(tree.coverage, key=lambda t: (covered_length(tree.coverage[t]), -t))
    cov = tree.coverage[main]
    return {main: [(cov[0][0], cov[-1][1])]}


def _cpu_metrics(col: CollectedTrace, tree: _OpTree, ops: list[int], spans: list[int] | None,
                 top_n: int) -> CpuMetrics:
    if spans is None:
        window = _main_thread_window(col, tree)
        span_count, span_total = 0, 0.0
    else:
        window = {}
        for i in spans:
            window.setdefault(col.notes.thread[i], []).append((col.notes.ts[i], col.notes.end(i)))
        span_count, span_total = len(spans), sum(col.notes.dur[i] for i in spans)
    return CpuMetrics(
        span_count=span_count, span_total_us=span_total, cpu_op_count=len(ops),
        cpu_op_time_us=sum(col.ops.dur[i] for i in ops if tree.top[i]),
        outside_ops_us=_outside_ops(window, tree) if window else None,
        top_operators=_cpu_operator_rows(col, tree, ops, top_n))


def _python_metrics(col: CollectedTrace, tree: _OpTree) -> PythonMetrics | None:
    py = col.python
    if not len(py):
        return None
    per_thread: dict[int, list[tuple[float, float]]] = {}
    for i in range(len(py)):
        per_thread.setdefault(py.thread[i], []).append((py.ts[i], py.end(i)))
    py_time = only = 0.0
    for thread, spans in per_thread.items():
        merged = merge_intervals(spans)
        length = covered_length(merged)
        py_time += length
        only += length - overlap_length(merged, tree.coverage.get(thread, []))
    return PythonMetrics(function_event_count=len(py), python_time_us=py_time, python_only_us=only)


# ----------------------------------------------------------------------------------------------
# GPU side


@dataclass
class _Scope:
    """The events of one scope: indices into the collected tables."""

    name: str
    ops: list[int]
    launches: list[int]
    kernels: list[int]
    memcpys: list[int]
    memsets: list[int]
    spans: list[int] | None  # phase spans (note indices); None for the whole trace


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _kernel_rows(col: CollectedTrace, ks: list[int], top_n: int) -> list[KernelRow]:
    agg: dict[int, list[float]] = {}
    for k in ks:
        row = agg.setdefault(col.kernels.name[k], [0, 0.0])
        row[0] += 1
        row[1] += col.kernels.dur[k]
    rows = [KernelRow(col.names[n], int(c), t, t / c) for n, (c, t) in agg.items()]
    rows.sort(key=lambda r: (-r.total_us, r.name))
    return rows[:top_n]


def _gpu_operator_rows(col: CollectedTrace, links: _Links, ks: list[int], top_n: int) -> list[GpuOperatorRow]:
    agg: dict[int, list[float]] = {}
    for k in ks:
        row = agg.setdefault(links.op_name[k], [0, 0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += col.kernels.dur[k]
        row[2] += links.launch[k]
        row[3] += links.queue[k]
    rows = [GpuOperatorRow(col.names[n] if n >= 0 else "(no operator)", int(c), t, lu, qu)
            for n, (c, t, lu, qu) in agg.items()]
    rows.sort(key=lambda r: (-r.kernel_count, -r.kernel_time_us, r.name))
    return rows[:top_n]


def _stream_rows(col: CollectedTrace, ks: list[int]) -> list[StreamRow]:
    agg: dict[int, list[float]] = {}
    for k in ks:
        row = agg.setdefault(col.kernels.stream[k], [0, 0.0])
        row[0] += 1
        row[1] += col.kernels.dur[k]
    rows = [StreamRow(col.threads[s], int(c), t) for s, (c, t) in agg.items()]
    rows.sort(key=lambda r: (-r.kernel_time_us, r.stream))
    return rows


def _launch_apis(col: CollectedTrace, links: _Links, ks: list[int]) -> dict[str, int]:
    apis: dict[str, int] = {}
    for k in ks:
        name = col.names[links.api[k]] if links.api[k] >= 0 else "(orphan)"
        apis[name] = apis.get(name, 0) + 1
    return dict(sorted(apis.items(), key=lambda kv: (-kv[1], kv[0])))


def _gpu_metrics(col: CollectedTrace, links: _Links, scope: _Scope, window: tuple[float, float] | None,
                 top_n: int) -> GpuMetrics:
    ks, kt = scope.kernels, col.kernels
    linked = [k for k in ks if links.linked[k]]
    tklqt = sum(links.tklqt[k] for k in linked)
    launch = sum(links.launch[k] for k in linked)
    queue = sum(links.queue[k] for k in linked)
    kernel_time = sum(kt.dur[k] for k in ks)
    busy = merge_intervals((kt.ts[k], kt.end(k)) for k in ks)
    il = window[1] - window[0] if window else None
    busy_us = overlap_length(busy, [window]) if window else covered_length(busy)
    idle = il - busy_us if il is not None else None
    syncs = [i for i in scope.launches if col.names[col.launches.name[i]] in _SYNC_CALLS]
    return GpuMetrics(
        kernel_count=len(ks), orphan_kernel_count=len(ks) - len(linked),
        no_operator_kernel_count=sum(1 for k in ks if links.op_name[k] < 0),
        memcpy_count=len(scope.memcpys), memcpy_time_us=sum(col.memcpys.dur[i] for i in scope.memcpys),
        memset_count=len(scope.memsets), tklqt_us=tklqt,
        tklqt_per_kernel_us=_ratio(tklqt, len(linked)), launch_us=launch, queue_us=queue,
        launch_share=_ratio(launch, tklqt), queue_share=_ratio(queue, tklqt),
        mean_launch_us=_ratio(launch, len(linked)), mean_queue_us=_ratio(queue, len(linked)),
        akd_us=_ratio(kernel_time, len(ks)), kernel_time_us=kernel_time, gpu_busy_us=busy_us,
        gpu_idle_us=idle, gpu_idle_share=_ratio(idle, il) if idle is not None and il else None,
        sync_call_count=len(syncs), sync_wait_us=sum(col.launches.dur[i] for i in syncs),
        skew_clamped_count=sum(1 for k in linked if links.skew[k] > 0),
        max_skew_us=max((links.skew[k] for k in linked), default=0.0),
        early_start_count=sum(1 for k in linked if links.early[k]),
        launch_apis=_launch_apis(col, links, ks), streams=_stream_rows(col, ks),
        top_kernels=_kernel_rows(col, ks, top_n),
        top_operators=_gpu_operator_rows(col, links, ks, top_n))


def _window(col: CollectedTrace, scope: _Scope) -> tuple[float, float] | None:
    """IL window: first operator start (else launch, else GPU start) to the last end seen."""
    starts = [col.ops.ts[i] for i in scope.ops] or [col.launches.ts[i] for i in scope.launches]
    ends = [col.ops.end(i) for i in scope.ops]
    for table, idx in ((col.kernels, scope.kernels), (col.memcpys, scope.memcpys),
                       (col.memsets, scope.memsets)):
        ends.extend(table.end(i) for i in idx)
        if not starts:
            starts = [table.ts[i] for i in idx]
    if not starts or not ends:
        return None
    return min(starts), max(ends)


# ----------------------------------------------------------------------------------------------
# Scopes, verdict, assembly


@dataclass
class _Linked:
    kernels: _Links
    memcpys: _Links
    memsets: _Links


def _select(name: str, col: CollectedTrace, linked: _Linked, spans: list[int] | None) -> _Scope:
    if spans is None:
        return _Scope(name, list(range(len(col.ops))), list(range(len(col.launches))),
                      list(range(len(col.kernels))), list(range(len(col.memcpys))),
                      list(range(len(col.memsets))), None)
    inside = SpanSet(merge_intervals((col.notes.ts[i], col.notes.end(i)) for i in spans)).contains
    return _Scope(
        name, [i for i in range(len(col.ops)) if inside(col.ops.ts[i])],
        [i for i in range(len(col.launches)) if inside(col.launches.ts[i])],
        [k for k, t in enumerate(linked.kernels.anchor) if inside(t)],
        [k for k, t in enumerate(linked.memcpys.anchor) if inside(t)],
        [k for k, t in enumerate(linked.memsets.anchor) if inside(t)], spans)


def _scope_report(col: CollectedTrace, linked: _Linked, tree: _OpTree, scope: _Scope,
                  gpu: bool, top_n: int) -> ScopeReport:
    window = _window(col, scope)
    return ScopeReport(
        name=scope.name, il_us=window[1] - window[0] if window else None,
        cpu=_cpu_metrics(col, tree, scope.ops, scope.spans, top_n),
        gpu=_gpu_metrics(col, linked.kernels, scope, window, top_n) if gpu else None)


def _span_group(name: str) -> str | None:
    """The row a tierkv span counts in: its name, or ``tierkv::move <link>`` for a move span."""
    if not name.startswith(TIERKV_SPAN_PREFIX):
        return None
    move = parse_move_span(name)
    return name if move is None else f"{MOVE_SPAN_PREFIX}{move.link}"


def _tierkv_spans(col: CollectedTrace, gpu: bool) -> list[SpanRow]:
    groups: dict[str, list[int]] = {}
    names = [_span_group(n) for n in col.names]
    for i, n in enumerate(col.notes.name):
        if names[n] is not None:
            groups.setdefault(names[n], []).append(i)
    busy = merge_intervals((col.kernels.ts[k], col.kernels.end(k)) for k in range(len(col.kernels))) if gpu else []
    rows = []
    for name, idx in groups.items():
        merged = merge_intervals((col.notes.ts[i], col.notes.end(i)) for i in idx)
        idle = covered_length(merged) - overlap_length(merged, busy) if gpu else None
        rows.append(SpanRow(name, len(idx), sum(col.notes.dur[i] for i in idx), idle))
    rows.sort(key=lambda r: (-r.total_us, r.name))
    return rows


def _moves(col: CollectedTrace, memcpys: _Links) -> list[MoveRow]:
    """Per-link rows of the trace's move spans, with the GPU time of memcpys launched inside them."""
    spans = ((col.names[n], col.notes.ts[i], col.notes.dur[i]) for i, n in enumerate(col.notes.name))
    gpu = len(col.kernels) > 0 or len(col.memcpys) > 0
    copies = [(t, col.memcpys.dur[k]) for k, t in enumerate(memcpys.anchor)] if gpu else None
    return move_rows(spans, copies)


def analyze_events(events: Iterable[dict[str, Any]], source: str = "<events>", top_n: int = 10,
                   rule: VerdictRule | None = None) -> TraceReport:
    """Metrics of a trace given as an iterable of chrome-trace event dicts."""
    rule = rule or VerdictRule()
    col = collect(events)
    gpu = len(col.kernels) > 0
    by_corr, ext_index = _launch_by_corr(col.launches), _ext_index(col)
    linked = _Linked(*(_link(t, col.launches, by_corr, ext_index)
                       for t in (col.kernels, col.memcpys, col.memsets)))
    tree = _op_tree(col.ops)
    overall = _scope_report(col, linked, tree, _select("overall", col, linked, None), gpu, top_n)
    phases: dict[str, ScopeReport | None] = {}
    for phase in PHASES:
        spans = [i for i, n in enumerate(col.notes.name)
                 if col.names[n] == f"{TIERKV_SPAN_PREFIX}{phase}"]
        phases[phase] = (_scope_report(col, linked, tree, _select(phase, col, linked, spans), gpu, top_n)
                         if spans else None)
    python = _python_metrics(col, tree)
    return TraceReport(
        source=source, event_count=col.event_count, gpu_available=gpu,
        gpu_reason=None if gpu else NO_GPU_REASON, overall=overall, phases=phases,
        tierkv_spans=_tierkv_spans(col, gpu), moves=_moves(col, linked.memcpys), python=python,
        python_reason=None if python else
        "trace holds no python_function events (profile with with_stack=True to get them)",
        verdict=rule.judge(overall.gpu), warnings=_warnings(col, overall))


def _warnings(col: CollectedTrace, overall: ScopeReport) -> list[str]:
    out = []
    if col.event_count and not (len(col.ops) or len(col.kernels) or len(col.notes)):
        out.append("trace holds no CPU operators, spans or GPU kernels: was the profiler window empty?")
    g = overall.gpu
    if g and g.max_skew_us > _SKEW_WARN_US:
        out.append(f"{g.skew_clamped_count} kernel(s) start before their launch call, by up to "
                   f"{g.max_skew_us:.1f} us: CPU and GPU clocks disagree; TKLQT is underestimated")
    if g and g.orphan_kernel_count:
        out.append(f"{g.orphan_kernel_count} kernel(s) have no launch call in the trace (orphans): "
                   "left out of TKLQT")
    return out


def analyze_trace(path: str | Path, top_n: int = 10, rule: VerdictRule | None = None) -> TraceReport:
    """Metrics of a chrome trace file (``.json`` or ``.json.gz``) written by the PyTorch profiler.

    Raises ``TraceError`` when the file is not a trace, is malformed, or is truncated.
    """
    return analyze_events(iter_trace_events(path), source=str(path), top_n=top_n, rule=rule)
