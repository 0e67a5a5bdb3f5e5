"""Chrome traces written by the PyTorch profiler -> TKLQT and its companion metrics.

Why this module exists: the SKIP paper's Total Kernel Launch and Queuing Time (TKLQT) tells
whether an inference is CPU-bound (kernels start as soon as they are launched, the GPU waits) or
GPU-bound (kernels queue behind each other), but its profiler is not public. This module computes
it, with average kernel duration, inference latency, GPU idle time, kernel counts, top kernels and
operators, from any chrome trace the PyTorch profiler exports, so it works on programs that are
not tierkv. It is pure Python (no torch) and streams the ``traceEvents`` array with
``json.JSONDecoder.raw_decode`` over a buffered read, keeping only the fields it needs in typed
arrays, so memory follows the number of events it keeps, never a Python object graph of the
whole file. Measured with ``scripts/bench_trace_analyze.py`` (2-core Xeon, shared): a 100 MB,
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

import gzip
import json
import re
import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tierkv.errors import TierkvError
from tierkv.trace.intervals import SpanSet, covered_length, merge_intervals, overlap_length
from tierkv.trace.moves import MOVE_SPAN_PREFIX, MoveRow, move_rows, parse_move_span

TIERKV_SPAN_PREFIX = "tierkv::"
PHASES: tuple[str, ...] = ("prefill", "decode")
NO_GPU_REASON = "trace holds no GPU kernels"

_KERNEL_CATS = frozenset({"kernel"})
_MEMCPY_CATS = frozenset({"gpu_memcpy"})
_MEMSET_CATS = frozenset({"gpu_memset"})
_LAUNCH_CATS = frozenset({"cuda_runtime", "cuda_driver", "runtime", "driver"})
_OP_CATS = frozenset({"cpu_op", "operator"})
_SYNC_CALLS = frozenset({
    "cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy",
    "cuCtxSynchronize", "cuStreamSynchronize", "cuEventSynchronize",
})
_READ_CHARS = 1 << 20
_MAX_EVENT_CHARS = 64 << 20
_SKEW_WARN_US = 50.0
_WS = re.compile(r"[ \t\n\r]*")


class TraceError(TierkvError):
    """A file is not a readable PyTorch profiler chrome trace; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------
# Streaming reader


class _Reader:
    """Incremental JSON reader: a sliding text buffer decoded one value at a time with raw_decode."""

    def __init__(self, fh: TextIO, name: str) -> None:
        self.fh, self.name = fh, name
        self.buf, self.pos, self.base, self.eof = "", 0, 0, False
        self.decoder = json.JSONDecoder()

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.fh.read(_READ_CHARS)
        except UnicodeDecodeError as exc:
            raise TraceError(f"{self.name}: not a text JSON file ({exc.reason} near byte "
                             f"{exc.start}); pass a chrome trace exported by the PyTorch profiler "
                             "(prof.export_chrome_trace), plain or .json.gz") from None
        except (EOFError, OSError, zlib.error) as exc:
            raise TraceError(f"{self.name}: compressed stream is damaged or truncated ({exc}); "
                             "re-export the trace or re-copy the file") from None
        if not chunk:
            self.eof = True
            return False
        self.base += self.pos
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next non-whitespace character, or '' at the end of the file."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def truncated(self, where: str) -> TraceError:
        return TraceError(f"{self.name}: the file ends {where}: the trace is truncated (was the "
                          "profiler or the copy interrupted?); export the trace again")

    def malformed(self, what: str) -> TraceError:
        return TraceError(f"{self.name}: malformed JSON at character {self.base + self.pos} "
                          f"({what}); this is not a complete PyTorch profiler chrome trace")

    def value(self) -> Any:
        """Decode one JSON value at the cursor, reading more of the file while it is incomplete."""
        if self.peek() == "":
            raise self.truncated("where a JSON value was expected")
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if len(self.buf) - self.pos < _MAX_EVENT_CHARS and self._fill():
                    continue
                at_end = exc.pos >= len(self.buf.rstrip()) - 1 or exc.msg.startswith("Unterminated")
                if self.eof and at_end:
                    raise self.truncated("in the middle of an event") from None
                raise self.malformed(exc.msg) from None
            self.pos = end
            return obj

    def array_items(self) -> Iterator[Any]:
        """Yield the items of the JSON array whose '[' is at the cursor, one at a time."""
        self.pos += 1
        while True:
            ch = self.peek()
            if ch == "]":
                self.pos += 1
                return
            if ch == "":
                raise self.truncated("inside the traceEvents array")
            yield self.value()
            ch = self.peek()
            if ch == ",":
                self.pos += 1
            elif ch == "":
                raise self.truncated("inside the traceEvents array")
            elif ch != "]":
                raise self.malformed(f"expected ',' or ']' after an event, found {ch!r}")


def _open_text(path: Path) -> TextIO:
    """Open a trace as text, plain or gzip-compressed (recognised by its magic bytes)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file; give the path of a chrome trace "
                         "(e.g. written by prof.export_chrome_trace)") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot be read ({exc.strerror}); check the path and permissions") from None
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_trace_events(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the events of a chrome trace one by one without loading the file.

    Accepts the object form ``{"traceEvents": [...], ...}`` written by the PyTorch profiler (plain
    or gzip) and the bare-array form of the chrome trace format. Raises ``TraceError`` for a file
    that is not a trace, is malformed or is truncated (possibly after yielding some events).
    """
    path = Path(path)
    with _open_text(path) as fh:
        reader = _Reader(fh, str(path))
        first = reader.peek()
        if first == "":
            raise TraceError(f"{path}: the file is empty (was the trace export interrupted?); "
                             "export the trace again")
        if first == "[":
            yield from (e for e in reader.array_items() if isinstance(e, dict))
            return
        if first != "{":
            raise TraceError(f"{path}: not a JSON chrome trace (it does not start with '{{' or '['); "
                             "pass a trace exported by the PyTorch profiler (prof.export_chrome_trace)")
        yield from _object_form_events(reader, path)


def _object_form_events(reader: _Reader, path: Path) -> Iterator[dict[str, Any]]:
    reader.pos += 1
    found = False
    while True:
        ch = reader.peek()
        if ch == "}":
            break
        if ch == "":
            raise reader.truncated("before the top-level object is closed")
        key = reader.value()
        if not isinstance(key, str) or reader.peek() != ":":
            raise reader.malformed("expected a key of the top-level object")
        reader.pos += 1
        if key == "traceEvents" and reader.peek() == "[":
            found = True
            yield from (e for e in reader.array_items() if isinstance(e, dict))
        else:
            reader.value()
        ch = reader.peek()
        if ch == ",":
            reader.pos += 1
        elif ch == "":
            raise reader.truncated("before the top-level object is closed")
        elif ch != "}":
            raise reader.malformed(f"expected ',' or '}}' in the top-level object, found {ch!r}")
    if not found:
        raise TraceError(f"{path}: valid JSON but not a profiler trace (no 'traceEvents' array); "
                         "pass a chrome trace exported by the PyTorch profiler (prof.export_chrome_trace)")


# ----------------------------------------------------------------------------------------------
# Collection: the fields we need, in typed arrays


class _Table:
    """Columns of one kind of event: start, duration, name id, thread id, external id, correlation."""

    def __init__(self) -> None:
        self.ts, self.dur = array("d"), array("d")
        self.name, self.thread = array("l"), array("l")
        self.ext, self.corr, self.stream = array("q"), array("q"), array("q")

    def __len__(self) -> int:
        return len(self.ts)

    def add(self, ts: float, dur: float, name: int, thread: int, ext: int, corr: int, stream: int) -> None:
        self.ts.append(ts)
        self.dur.append(dur)
        self.name.append(name)
        self.thread.append(thread)
        self.ext.append(ext)
        self.corr.append(corr)
        self.stream.append(stream)

    def end(self, i: int) -> float:
        return self.ts[i] + self.dur[i]


@dataclass
class _Collected:
    """Everything the metrics need from one trace, with names and threads interned."""

    names: list[str] = field(default_factory=list)
    threads: list[str] = field(default_factory=list)
    ops: _Table = field(default_factory=_Table)
    notes: _Table = field(default_factory=_Table)  # user_annotation spans
    launches: _Table = field(default_factory=_Table)  # runtime/driver calls
    kernels: _Table = field(default_factory=_Table)  # stream column holds a (device, stream) id
    memcpys: _Table = field(default_factory=_Table)
    memsets: _Table = field(default_factory=_Table)
    python: _Table = field(default_factory=_Table)
    event_count: int = 0
    _name_ids: dict[str, int] = field(default_factory=dict)
    _thread_ids: dict[tuple[Any, Any], int] = field(default_factory=dict)

    def name_id(self, name: str) -> int:
        i = self._name_ids.get(name)
        if i is None:
            i = self._name_ids[name] = len(self.names)
            self.names.append(name)
        return i

    def thread_id(self, key: tuple[Any, Any]) -> int:
        i = self._thread_ids.get(key)
        if i is None:
            i = self._thread_ids[key] = len(self.threads)
            self.threads.append(f"{key[0]}/{key[1]}")
        return i


def _int_arg(args: dict[str, Any], key: str) -> int:
    value = args.get(key, -1)
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _table_for(col: _Collected, cat: str) -> _Table | None:
    if cat in _OP_CATS:
        return col.ops
    if cat == "user_annotation":
        return col.notes
    if cat in _LAUNCH_CATS:
        return col.launches
    if cat in _KERNEL_CATS:
        return col.kernels
    if cat in _MEMCPY_CATS:
        return col.memcpys
    if cat in _MEMSET_CATS:
        return col.memsets
    if cat == "python_function":
        return col.python
    return None


def collect(events: Iterable[dict[str, Any]]) -> _Collected:
    """Keep the complete ('X') events the metrics use, column by column."""
    col = _Collected()
    base = None  # timestamps are kept relative to the first one, for float precision
    for ev in events:
        col.event_count += 1
        if ev.get("ph") != "X":
            continue
        table = _table_for(col, str(ev.get("cat", "")).lower())
        if table is None:
            continue
        try:
            ts, dur = float(ev["ts"]), float(ev.get("dur", 0.0))
        except (KeyError, TypeError, ValueError):
            continue
        if base is None:
            base = ts
        args = ev.get("args")
        if not isinstance(args, dict):
            args = {}
        stream = -1
        if table is col.kernels or table is col.memcpys or table is col.memsets:
            stream = col.thread_id((args.get("device", ev.get("pid")), args.get("stream", ev.get("tid"))))
            thread = stream
        else:
            thread = col.thread_id((ev.get("pid"), ev.get("tid")))
        table.add(ts - base, max(dur, 0.0), col.name_id(str(ev.get("name", ""))), thread,
                  _int_arg(args, "External id"), _int_arg(args, "correlation"), stream)
    return col


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
class Verdict:
    """CPU-bound or GPU-bound for one trace, with the signals the rule used."""

    bound: str | None
    reason: str
    gpu_idle_share: float | None
    queue_to_launch: float | None
    rule: str


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


def _launch_by_corr(launches: _Table) -> dict[int, int]:
    """Correlation id -> outermost launch call (a runtime call wraps the driver call it makes)."""
    by_corr: dict[int, int] = {}
    for i, c in enumerate(launches.corr):
        if c < 0:
            continue
        j = by_corr.get(c)
        if j is None or launches.ts[i] < launches.ts[j]:
            by_corr[c] = i
    return by_corr


def _ext_index(col: _Collected) -> dict[int, tuple[int, float]]:
    """External id -> (name id, start) of the CPU operator or span that carries it."""
    out: dict[int, tuple[int, float]] = {}
    for table in (col.notes, col.ops):  # ops win over spans when both carry an id
        for i, x in enumerate(table.ext):
            if x >= 0:
                out[x] = (table.name[i], table.ts[i])
    return out


def _link(table: _Table, launches: _Table, by_corr: dict[int, int],
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


def _op_tree(ops: _Table) -> _OpTree:
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


def _cpu_operator_rows(col: _Collected, tree: _OpTree, ops: list[int], top_n: int) -> list[CpuOperatorRow]:
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


def _main_thread_window(col: _Collected, tree: _OpTree) -> dict[int, list[tuple[float, float]]]:
    """The busiest operator thread and its first-op-start..last-op-end window."""
    if not tree.coverage:
        return {}
    main = max(tree.coverage, key=lambda t: (covered_length(tree.coverage[t]), -t))
    cov = tree.coverage[main]
    return {main: [(cov[0][0], cov[-1][1])]}


def _cpu_metrics(col: _Collected, tree: _OpTree, ops: list[int], spans: list[int] | None,
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


def _python_metrics(col: _Collected, tree: _OpTree) -> PythonMetrics | None:
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


def _kernel_rows(col: _Collected, ks: list[int], top_n: int) -> list[KernelRow]:
    agg: dict[int, list[float]] = {}
    for k in ks:
        row = agg.setdefault(col.kernels.name[k], [0, 0.0])
        row[0] += 1
        row[1] += col.kernels.dur[k]
    rows = [KernelRow(col.names[n], int(c), t, t / c) for n, (c, t) in agg.items()]
    rows.sort(key=lambda r: (-r.total_us, r.name))
    return rows[:top_n]


def _gpu_operator_rows(col: _Collected, links: _Links, ks: list[int], top_n: int) -> list[GpuOperatorRow]:
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


def _stream_rows(col: _Collected, ks: list[int]) -> list[StreamRow]:
    agg: dict[int, list[float]] = {}
    for k in ks:
        row = agg.setdefault(col.kernels.stream[k], [0, 0.0])
        row[0] += 1
        row[1] += col.kernels.dur[k]
    rows = [StreamRow(col.threads[s], int(c), t) for s, (c, t) in agg.items()]
    rows.sort(key=lambda r: (-r.kernel_time_us, r.stream))
    return rows


def _launch_apis(col: _Collected, links: _Links, ks: list[int]) -> dict[str, int]:
    apis: dict[str, int] = {}
    for k in ks:
        name = col.names[links.api[k]] if links.api[k] >= 0 else "(orphan)"
        apis[name] = apis.get(name, 0) + 1
    return dict(sorted(apis.items(), key=lambda kv: (-kv[1], kv[0])))


def _gpu_metrics(col: _Collected, links: _Links, scope: _Scope, window: tuple[float, float] | None,
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


def _window(col: _Collected, scope: _Scope) -> tuple[float, float] | None:
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


def _select(name: str, col: _Collected, linked: _Linked, spans: list[int] | None) -> _Scope:
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


def _scope_report(col: _Collected, linked: _Linked, tree: _OpTree, scope: _Scope,
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


def _tierkv_spans(col: _Collected, gpu: bool) -> list[SpanRow]:
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


def _moves(col: _Collected, memcpys: _Links) -> list[MoveRow]:
    """Per-link rows of the trace's move spans, with the GPU time of memcpys launched inside them."""
    spans = ((col.names[n], col.notes.ts[i], col.notes.dur[i]) for i, n in enumerate(col.notes.name))
    gpu = len(col.kernels) > 0 or len(col.memcpys) > 0
    copies = [(t, col.memcpys.dur[k]) for k, t in enumerate(memcpys.anchor)] if gpu else None
    return move_rows(spans, copies)


@dataclass(frozen=True)
class VerdictRule:
    """When a trace counts as GPU-bound, and how the transition batch size is found.

    A trace is GPU-bound when the GPU idle share is below ``max_idle_share`` AND the mean queuing
    per kernel is at least ``min_queue_to_launch`` times the mean launch (CPU dispatch) cost;
    otherwise it is CPU-bound. Why both signals: while the CPU sets the pace a kernel starts about
    as soon as its launch call returns, so queuing stays at the order of the launch cost and the
    GPU waits between kernels; once the GPU sets the pace kernels wait behind earlier ones, so
    queuing dominates launch and idle time collapses. Either signal alone misleads: a burst of tiny
    kernels behind one long GEMM queues while the GPU still idles most of the inference, and a GPU
    kept just busy by a CPU launching in time has little idle time but no backlog (the CPU is still
    the pace-setter). The factor 2 keeps launch jitter out of the verdict; 25% idle leaves room
    for host-side sampling and synchronisation between decode steps.

    The transition batch size is the first (smallest) batch size judged GPU-bound right after one
    judged CPU-bound. The TKLQT knee is the batch size where TKLQT per kernel rises the most over
    the previous batch size, when that rise is at least ``knee_ratio`` times.
    """

    max_idle_share: float = 0.25
    min_queue_to_launch: float = 2.0
    knee_ratio: float = 2.0

    def describe(self) -> str:
        """The rule in one sentence, as stated in every report."""
        return (f"GPU-bound when GPU idle share < {self.max_idle_share:.0%} and mean queuing per "
                f"kernel >= {self.min_queue_to_launch:g}x the mean launch cost, else CPU-bound; "
                "transition = first batch size judged GPU-bound right after a CPU-bound one; "
                f"TKLQT knee = largest rise (>= {self.knee_ratio:g}x) of TKLQT per kernel "
                "between consecutive batch sizes")

    def judge(self, gpu: GpuMetrics | None) -> Verdict:
        """Verdict for one trace from its whole-trace GPU metrics."""
        if gpu is None:
            return Verdict(None, f"no verdict: {NO_GPU_REASON}", None, None, self.describe())
        if gpu.kernel_count == gpu.orphan_kernel_count or gpu.gpu_idle_share is None:
            return Verdict(None, "no verdict: no kernel could be linked to its launch call",
                           gpu.gpu_idle_share, None, self.describe())
        q = gpu.queue_us
        ratio = q / gpu.launch_us if gpu.launch_us > 0 else (float("inf") if q > 0 else 0.0)
        idle = gpu.gpu_idle_share
        gpu_bound = idle < self.max_idle_share and ratio >= self.min_queue_to_launch
        shown = "inf" if ratio == float("inf") else f"{ratio:.2f}"
        reason = (f"GPU idle {idle:.1%} ({'<' if idle < self.max_idle_share else '>='} "
                  f"{self.max_idle_share:.0%}), queuing/launch {shown}x "
                  f"({'>=' if ratio >= self.min_queue_to_launch else '<'} {self.min_queue_to_launch:g}x)")
        return Verdict("gpu" if gpu_bound else "cpu", reason, idle,
                       None if ratio == float("inf") else ratio, self.describe())


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


def _warnings(col: _Collected, overall: ScopeReport) -> list[str]:
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


# ----------------------------------------------------------------------------------------------
# Sweeps over batch sizes


@dataclass
class SweepPoint:
    """Whole-trace figures of one batch size, as plotted and tabulated."""

    batch_size: int
    bound: str | None
    kernel_count: int | None
    tklqt_us: float | None
    tklqt_per_kernel_us: float | None
    gpu_idle_share: float | None
    il_us: float | None


@dataclass
class SweepSummary:
    """Verdicts across batch sizes: the transition and the TKLQT knee, with the rule stated."""

    rule: str
    points: list[SweepPoint]
    transition_batch_size: int | None
    transition_reason: str
    tklqt_knee_batch_size: int | None


def _point(batch_size: int, report: TraceReport) -> SweepPoint:
    g = report.overall.gpu
    return SweepPoint(batch_size, report.verdict.bound, g.kernel_count if g else None,
                      g.tklqt_us if g else None, g.tklqt_per_kernel_us if g else None,
                      g.gpu_idle_share if g else None, report.overall.il_us)


def _knee(points: list[SweepPoint], knee_ratio: float) -> int | None:
    best, best_rise = None, knee_ratio
    for prev, cur in zip(points, points[1:], strict=False):
        a, b = prev.tklqt_per_kernel_us, cur.tklqt_per_kernel_us
        if a is None or b is None:
            continue
        rise = b / a if a > 0 else (float("inf") if b > 0 else 0.0)
        if rise >= best_rise:
            best, best_rise = cur.batch_size, rise
    return best


def summarize_sweep(reports: list[tuple[int, TraceReport]], rule: VerdictRule | None = None) -> SweepSummary:
    """Transition batch size and TKLQT knee from one report per batch size (any order)."""
    rule = rule or VerdictRule()
    points = [_point(b, r) for b, r in sorted(reports, key=lambda br: br[0])]
    bounds = [p.bound for p in points]
    transition, reason = None, ""
    for prev, cur in zip(points, points[1:], strict=False):
        if prev.bound == "cpu" and cur.bound == "gpu":
            transition = cur.batch_size
            reason = f"CPU-bound at batch size {prev.batch_size}, GPU-bound at {cur.batch_size}"
            break
    if transition is None:
        if not points or all(b is None for b in bounds):
            reason = f"no transition: {NO_GPU_REASON}" if points else "no traces"
        elif all(b == "gpu" for b in bounds if b):
            reason = f"GPU-bound at every batch size (from {points[0].batch_size}): lower it to find the transition"
        elif all(b == "cpu" for b in bounds if b):
            reason = f"CPU-bound at every batch size (up to {points[-1].batch_size}): raise it to find the transition"
        else:
            reason = "no CPU-bound batch size directly followed by a GPU-bound one"
    return SweepSummary(rule.describe(), points, transition, reason, _knee(points, rule.knee_ratio))
