"""Chrome traces from the PyTorch profiler, read as a stream into typed columns.

Why this module exists: traces run to hundreds of megabytes, and ``json.load`` of one costs several
times its size in Python objects before any metric is computed. Here the ``traceEvents`` array is
decoded one event at a time with ``json.JSONDecoder.raw_decode`` over a buffered read (plain or
gzip; object or bare-array form), and only the complete ('X') events the metrics use are kept,
column by column in ``array`` s with names and threads interned (``collect``). Bad input raises
``TraceError`` with what is wrong and how to get a good trace. Pure Python, no torch.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tierkv.errors import TierkvError

_KERNEL_CATS = frozenset({"kernel"})
_MEMCPY_CATS = frozenset({"gpu_memcpy"})
_MEMSET_CATS = frozenset({"gpu_memset"})
_LAUNCH_CATS = frozenset({"cuda_runtime", "cuda_driver", "runtime", "driver"})
_OP_CATS = frozenset({"cpu_op", "operator"})
_READ_CHARS = 1 << 20
_MAX_EVENT_CHARS = 64 << 20
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
            self.skip_separator("]", "inside the traceEvents array", "after an event")

    def skip_separator(self, closer: str, where: str, context: str) -> None:
        """Step over the ',' after an item of a container that ``closer`` ends (which is left in place)."""
        ch = self.peek()
        if ch == ",":
            self.pos += 1
        elif ch == "":
            raise self.truncated(where)
        elif ch != closer:
            raise self.malformed(f"expected ',' or '{closer}' {context}, found {ch!r}")


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
        reader.skip_separator("}", "before the top-level object is closed", "in the top-level object")
    if not found:
        raise TraceError(f"{path}: valid JSON but not a profiler trace (no 'traceEvents' array); "
                         "pass a chrome trace exported by the PyTorch profiler (prof.export_chrome_trace)")


# ----------------------------------------------------------------------------------------------
# Collection: the fields we need, in typed arrays


class EventColumns:
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
class CollectedTrace:
    """Everything the metrics need from one trace, with names and threads interned."""

    names: list[str] = field(default_factory=list)
    threads: list[str] = field(default_factory=list)
    ops: EventColumns = field(default_factory=EventColumns)
    notes: EventColumns = field(default_factory=EventColumns)  # user_annotation spans
    launches: EventColumns = field(default_factory=EventColumns)  # runtime/driver calls
    kernels: EventColumns = field(default_factory=EventColumns)  # stream column holds a (device, stream) id
    memcpys: EventColumns = field(default_factory=EventColumns)
    memsets: EventColumns = field(default_factory=EventColumns)
    python: EventColumns = field(default_factory=EventColumns)
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


def _table_for(col: CollectedTrace, cat: str) -> EventColumns | None:
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


def collect(events: Iterable[dict[str, Any]]) -> CollectedTrace:
    """Keep the complete ('X') events the metrics use, column by column."""
    col = CollectedTrace()
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


__all__ = ["CollectedTrace", "EventColumns", "TraceError", "collect", "iter_trace_events"]
