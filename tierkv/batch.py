"""Batch jobs: a JSONL file of requests in, a JSONL file of results out, resumable, continuously batched.

Why this module exists: offline work (evaluations, bulk summarization, synthetic data) wants as many
sequences per streamed layer pass as the budgets allow, and wants the job to survive a crash. This
module reads the requests (one JSON object per line), feeds them through ``Engine.submit`` keeping up
to ``batch`` sequences in flight (the step scheduler admits a new one as soon as another ends, so a
long tail of short prompts never leaves the batch half empty), and writes each result, in input
order, as soon as it and all earlier ones are done: one whole line per write, fsync'd. Rerunning
with the same output file skips the ids already there (a half line left by a crash is dropped and
redone). A bad line becomes that line's ``error`` result; the job goes on. ``tierkv batch`` is the
command line over ``run_batch``.

Input line: ``{"id": "q1", "prompt": "text" | [token ids]}`` or ``{"messages": [{"role", "content"}...]}``
(rendered with the model's chat template, as ``tierkv chat`` does), plus optional sampling fields
``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``. ``id`` (a string or a whole
number) defaults to the line number. Output line: ``{"id", "text", "tokens", "finish_reason",
"prompt_tokens", "timing": {"queued_s", "ttft_s", "total_s"}}`` or ``{"id", "error"}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tierkv.config import format_size
from tierkv.core import weight_stats_delta
from tierkv.engine import Engine
from tierkv.errors import TierkvError
from tierkv.generation import GenerationResult, Stream, sampling_params, token_ids_of
from tierkv.io.store import write_bytes_atomic

__all__ = ["BatchError", "BatchInterrupted", "BatchJob", "BatchRequest", "BatchSummary", "SAMPLING_FIELDS",
           "parse_request", "read_requests", "run_batch", "run_requests"]

# input field -> Engine.generate keyword
SAMPLING_FIELDS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
                   "top_k": "top_k", "seed": "seed", "stop": "stop"}
_FIELDS = ("id", "prompt", "messages", *SAMPLING_FIELDS)
_LINE_START = b'{"id": '                          # how every result line begins (ResultLog.write)
_KV_COUNTERS = ("bytes_read_host", "bytes_read_disk", "bytes_written_disk")     # a tiered cache's stats()


class BatchError(TierkvError):
    """The job cannot start: a missing input, an unwritable output, duplicate ids, an output of another input."""


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the job: what was complete is written; ``summary`` says how far it got."""

    def __init__(self, summary: "BatchSummary") -> None:
        super().__init__("the batch job was interrupted; run it again with the same output file to finish it")
        self.summary = summary


@dataclass(frozen=True)
class BatchRequest:
    """One input line: its id and prompt (or chat messages) and generate's keyword arguments, or the
    error that makes it unusable (then its result is that error)."""

    line: int                                   # 1-based line number in the input file
    id: str | int
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def key(self) -> str:
        """The id as JSON, so 1 and "1" are different ids."""
        return json.dumps(self.id)


@dataclass
class BatchSummary:
    """What a run did. Bytes are what crossed each link during this run (weights and KV)."""

    requests: int = 0                # request lines in the input
    ok: int = 0                      # results written by this run without an error
    errors: int = 0                  # error results written by this run
    skipped: int = 0                 # ids already in the output from an earlier run
    unfinished: int = 0              # requests without a result yet (an interrupted run)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    wall_s: float = 0.0
    tok_s: float = 0.0               # generated tokens per second of wall time
    batch: int = 0                   # most sequences kept in flight
    weight_bytes: dict[str, int] = field(default_factory=dict)     # link ("disk_to_host", ...) -> bytes
    kv_bytes: dict[str, int] = field(default_factory=dict)         # read from host / disk, written to disk
    read_bytes_per_token: dict[str, float] = field(default_factory=dict)   # tier ("disk", "host") -> bytes
    interrupted: bool = False
    output: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The one summary line the CLI prints."""
        moved = ", ".join(f"{k.replace('_to_', '->')} {format_size(v)}" for k, v in self.weight_bytes.items() if v)
        per = ", ".join(f"{tier} {format_size(v)}" for tier, v in self.read_bytes_per_token.items() if v)
        stopped = " | interrupted: rerun to finish" if self.interrupted else ""
        return (f"[batch: {self.requests} requests: {self.ok} ok, {self.errors} errors, {self.skipped} done before"
                f"{f', {self.unfinished} left' if self.unfinished else ''} | {self.generated_tokens} tokens in "
                f"{self.wall_s:.2f} s, {self.tok_s:.1f} tok/s, batch {self.batch} | weights moved: {moved or 'none'}"
                f" | read per token: {per or 'nothing'}{stopped}]")


# -- input ------------------------------------------------------------------------------------------
def parse_request(number: int, raw: bytes, defaults: dict[str, Any]) -> BatchRequest:
    """Input line ``number`` (its bytes) -> a request (its error set when the line is unusable);
    ``defaults``: generate's keyword arguments for the fields the line leaves out."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return BatchRequest(number, number, error=f"line {number}: not UTF-8 text; write the file as UTF-8 JSONL")
    except json.JSONDecodeError as exc:
        return BatchRequest(number, number, error=f"line {number}: not valid JSON ({exc.msg} at column "
                                                  f"{exc.colno}); write one JSON object per line")
    if not isinstance(obj, dict):
        return BatchRequest(number, number, error=f"line {number}: a JSON {type(obj).__name__}, not an object; "
                                                  'write {"prompt": "..."} per line')
    rid = obj.get("id", number)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return BatchRequest(number, number, error=f"line {number}: id {json.dumps(rid)} must be a string or a "
                                                  "whole number")
    problem = _problem(obj)
    if problem is None:
        sampling = {**defaults, **{SAMPLING_FIELDS[k]: v for k, v in obj.items() if k in SAMPLING_FIELDS}}
        try:
            sampling_params(dict(sampling))                  # validates the values (a copy: it pops "stop")
        except (TierkvError, TypeError) as exc:
            problem = str(exc).replace("max_new_tokens=", "max_tokens=")
        else:
            return BatchRequest(number, rid, obj.get("prompt"), obj.get("messages"), sampling)
    return BatchRequest(number, rid, error=f"line {number}: {problem}")


def _problem(obj: dict[str, Any]) -> str | None:
    """What is wrong with a line's fields (None: nothing)."""
    unknown = [k for k in obj if k not in _FIELDS]
    if unknown:
        return f"unknown field {unknown[0]!r}; the fields are {', '.join(_FIELDS)}"
    if ("prompt" in obj) == ("messages" in obj):
        return 'give exactly one of "prompt" (a string or token ids) or "messages" (a chat)'
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        try:
            token_ids_of(obj["prompt"])
        except TypeError as exc:
            return f'"prompt": {exc}'
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            return '"messages" must be a non-empty list of {"role": "...", "content": "..."} objects (strings)'
    return None


def read_requests(path: str | Path, defaults: dict[str, Any] | None = None) -> list[BatchRequest]:
    """Every request line of a JSONL file (blank lines are skipped); ``defaults``: generate's keyword
    arguments for fields a line leaves out. Raises BatchError for a missing file and for duplicate ids
    (naming both lines), before anything runs."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BatchError(f"input file {path} does not exist; give a JSONL file of requests") from None
    except IsADirectoryError:
        raise BatchError(f"input {path} is a directory; give a JSONL file of requests") from None
    requests, seen = [], {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        req = parse_request(number, raw, dict(defaults or {}))
        if req.key in seen:
            raise BatchError(f"{path}: id {req.key} is on line {seen[req.key]} and on line {number}; "
                             "give every request its own id")
        seen[req.key] = number
        requests.append(req)
    return requests


# -- output -----------------------------------------------------------------------------------------
class ResultLog:
    """The output file: results appended one whole line per write, each flushed and fsync'd. Whole-file
    changes (dropping error results to retry them, putting the lines in input order) are atomic: a
    new file written beside it, fsync'd, then renamed over it."""

    def __init__(self, path: Path, fd: int, done: set[str]) -> None:
        self.path, self._fd, self.done = path, fd, done

    @classmethod
    def open(cls, path: str | Path, requests: list[BatchRequest], inputs: str,
             retry_errors: bool = False) -> "ResultLog":
        """Open (or create) ``path`` for appending; the ids it holds already are ``done``. A truncated
        last line (a crash mid-write) is cut off; with ``retry_errors`` its error results are dropped (so
        they run again). Raises BatchError when it holds ids ``requests`` lack."""
        path = Path(path)
        lines, keep = _read_lines(path)
        if retry_errors:
            kept = [line for line in lines if not line.error]
            if len(kept) < len(lines):
                write_bytes_atomic(path, b"".join(line.raw for line in kept))
                lines, keep = kept, sum(len(line.raw) for line in kept)
        known = {r.key for r in requests}
        strangers = [line for line in lines if line.key not in known]
        if strangers:
            hint = " (or, if you changed the lines that failed, rerun with --retry-errors)" \
                if all(line.error for line in strangers) else ""
            raise BatchError(f"{path} holds results for ids that {inputs} does not have (e.g. {strangers[0].key}): it "
                             f"was written for another input; give a new -o file, or delete it to start over{hint}")
        fd = _open_append(path)
        if os.fstat(fd).st_size > keep:
            os.ftruncate(fd, keep)                   # O_APPEND: the next write lands at the new end
            os.fsync(fd)
        return cls(path, fd, {line.key for line in lines})

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)
        self.done.add(json.dumps(record["id"]))

    def put_in_order(self, keys: list[str]) -> None:
        """Rewrite the file with its lines in the order of ``keys`` (every id it holds), if they are not."""
        lines, _ = _read_lines(self.path)
        rank = {k: i for i, k in enumerate(keys)}
        ordered = sorted(lines, key=lambda line: rank[line.key])
        if ordered != lines:
            self.close()
            write_bytes_atomic(self.path, b"".join(line.raw for line in ordered))
            self._fd = _open_append(self.path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class _Line:
    key: str                 # the id as JSON
    error: bool              # an error result
    raw: bytes               # the whole line, newline included


def _open_append(path: Path) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise BatchError(f"cannot write results to {path} ({exc.strerror}); give -o a path in a writable "
                         "directory") from None


def _read_lines(path: Path) -> tuple[list[_Line], int]:
    """(the result lines of ``path``, the length of the file up to its last whole result line: what
    follows is a line an earlier run's crash left half written)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise BatchError(f"cannot read the output file {path} ({exc.strerror}); give -o a readable file or a "
                         "new path") from None
    segments, offset, keep = data.split(b"\n"), 0, len(data)
    lines: list[_Line] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(segments):
        number, start = i + 1, offset
        offset += len(raw) + 1
        if not raw.strip():
            continue
        rec = _result_of(raw)
        if rec is None or i == len(segments) - 1:     # no newline after it: its write did not finish
            if any(s.strip() for s in segments[i + 1:]) or not raw.startswith(_LINE_START):
                raise BatchError(f"line {number} of {path} is not a tierkv batch result; give a new -o file, or "
                                 "delete it to start over")
            keep = start
            break
        key = json.dumps(rec["id"])
        if key in seen:
            raise BatchError(f"{path} holds id {key} twice (lines {seen[key]} and {number}); it was not written "
                             "by one tierkv batch job: give a new -o file, or delete it to start over")
        seen[key] = number
        lines.append(_Line(key, "error" in rec, raw + b"\n"))
    return lines, keep


def _result_of(raw: bytes) -> dict[str, Any] | None:
    """A result line's record, or None when the bytes are not one."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and "id" in rec and ("error" in rec or "tokens" in rec) else None


def _result_record(req: BatchRequest, res: GenerationResult, queued_s: float) -> dict[str, Any]:
    s = res.stats
    return {"id": req.id, "text": res.text, "tokens": res.token_ids, "finish_reason": res.finish_reason,
            "prompt_tokens": len(res.prompt_token_ids),
            "timing": {"queued_s": round(queued_s, 6), "ttft_s": round(s.prefill_s, 6),
                       "total_s": round(s.prefill_s + s.decode_s, 6)}}


def _error_record(req: BatchRequest, message: str) -> dict[str, Any]:
    text = message if message.startswith(f"line {req.line}:") else f"line {req.line}: {message}"
    return {"id": req.id, "error": text}


# -- the job ----------------------------------------------------------------------------------------
@dataclass
class _Flight:
    """A request submitted to the engine: its place in the job's order and when it was submitted."""

    index: int
    req: BatchRequest
    stream: Stream
    queued_s: float


class _Records:
    """Where ``run_requests`` collects the records (a ResultLog's ``write``, kept in memory)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)


class _Ordered:
    """Finished results, written to the log in the job's order as soon as every earlier one is finished."""

    def __init__(self, log: ResultLog | _Records, summary: BatchSummary) -> None:
        self.log, self.summary = log, summary
        self.ready: dict[int, tuple[dict[str, Any], GenerationResult | None]] = {}
        self.next = 0
        self.kv: dict[str, int] = dict.fromkeys(_KV_COUNTERS, 0)

    def add(self, index: int, record: dict[str, Any], res: GenerationResult | None) -> None:
        self.ready[index] = (record, res)

    def flush(self) -> int:
        """Write what is in order now; returns how many lines were written."""
        wrote = 0
        while self.next in self.ready:
            record, res = self.ready.pop(self.next)
            self.log.write(record)
            self.next += 1
            wrote += 1
            s = self.summary
            if res is None:
                s.errors += 1
                continue
            s.ok += 1
            s.prompt_tokens += len(res.prompt_token_ids)
            s.generated_tokens += len(res.token_ids)
            for key in _KV_COUNTERS:
                self.kv[key] += int(res.stats.kv.get(key, 0))
        return wrote


class BatchJob:
    """An opened job: its requests (validated, ids unique) and its output file (with what it holds).

    Opening checks everything that does not need the model (the CLI opens the job before loading),
    then ``run(engine)`` generates what the output lacks.
    """

    def __init__(self, requests_path: str | Path, output_path: str | Path,
                 sampling: dict[str, Any] | None = None, retry_errors: bool = False) -> None:
        """``sampling``: generate's keyword arguments (max_new_tokens, temperature, top_k, top_p, seed,
        stop) for the fields a line leaves out; ``retry_errors``: run the requests whose result in the
        output is an error again (their error lines are dropped first)."""
        self.requests_path, self.output_path = Path(requests_path), Path(output_path)
        if self.output_path.exists() and self.requests_path.exists() and \
                self.output_path.resolve() == self.requests_path.resolve():
            raise BatchError(f"the output file {output_path} is the input file; give -o another path")
        self.requests = read_requests(self.requests_path, sampling)
        self.log = ResultLog.open(self.output_path, self.requests, str(self.requests_path), retry_errors)

    def todo(self) -> list[BatchRequest]:
        """The requests without a result in the output yet, in input order."""
        return [r for r in self.requests if r.key not in self.log.done]

    def run(self, engine: Engine, *, batch: int | None = None, progress: bool = False) -> BatchSummary:
        """Generate every request the output lacks, keeping up to ``batch`` (default: the engine's
        max_sequences) in flight; ``progress`` shows a bar on stderr. Ctrl-C raises BatchInterrupted
        after writing what is complete."""
        batch = batch or engine.policy.max_sequences
        if batch < 1:
            raise BatchError(f"batch {batch}: give 1 or more sequences to keep in flight")
        todo = self.todo()
        summary = BatchSummary(requests=len(self.requests), skipped=len(self.requests) - len(todo), batch=batch,
                               output=str(self.output_path))
        before, t0 = _weight_counters(engine), time.perf_counter()
        ordered = _Ordered(self.log, summary)
        with _Bar(progress, len(self.requests), summary.skipped) as advance:
            try:
                with contextlib.closing(_drive(engine, todo, batch, ordered, t0)) as steps:
                    for wrote in steps:
                        advance(wrote, summary.generated_tokens / max(time.perf_counter() - t0, 1e-9))
            except KeyboardInterrupt:
                summary.interrupted = True
        _finish_summary(summary, engine, before, ordered, time.perf_counter() - t0, len(todo))
        if summary.interrupted:
            raise BatchInterrupted(summary)
        if summary.skipped and not summary.unfinished:   # retried lines were appended after later ones
            self.log.put_in_order([r.key for r in self.requests])
        return summary

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> "BatchJob":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drive(engine: Engine, todo: list[BatchRequest], batch: int, ordered: _Ordered, t0: float) -> Iterator[int]:
    """Submit requests while fewer than ``batch`` are in flight, step the engine, collect what
    finished; yields the lines written after each step. Interrupted, it cancels what is in flight."""
    flights: list[_Flight] = []
    waiting = list(enumerate(todo))[::-1]              # popped from the end: input order
    try:
        while waiting or flights:
            while waiting and len(flights) < batch:
                index, req = waiting.pop()
                flight = _submit(engine, index, req, time.perf_counter() - t0)
                if isinstance(flight, str):
                    ordered.add(index, _error_record(req, flight), None)
                else:
                    flights.append(flight)
            if flights and engine.step() == 0 and not any(f.stream.done for f in flights):
                raise AssertionError("the engine has no live sequence but batch requests did not finish")
            for f in [f for f in flights if f.stream.done]:
                flights.remove(f)
                outcome = _outcome(f.stream)
                if isinstance(outcome, GenerationResult):
                    ordered.add(f.index, _result_record(f.req, outcome, f.queued_s), outcome)
                else:
                    ordered.add(f.index, _error_record(f.req, _error_text(outcome)), None)
            yield ordered.flush()
    finally:
        for f in flights:                              # interrupted: nothing more runs for them
            f.stream.close()


def _submit(engine: Engine, index: int, req: BatchRequest, queued_s: float) -> _Flight | str:
    """The request in the engine's scheduler, or why it cannot run (its error text)."""
    if req.error is not None:
        return req.error
    try:
        prompt: Any = req.prompt
        if req.messages is not None:
            tok = engine.tokenizer
            if tok is None or not tok.chat_template:
                return (f'"messages" need the model\'s chat template and {engine.model_dir} has none; '
                        'give "prompt" instead')
            prompt = tok.encode_chat(req.messages)
        return _Flight(index, req, engine.submit(prompt, **req.sampling), queued_s)
    except (TierkvError, TypeError) as exc:           # a prompt too long, ids outside the vocabulary, ...
        return str(exc)


def _outcome(stream: Stream) -> GenerationResult | BaseException:
    """A finished stream's result, or the error that ended it (reading its pieces runs no step: it is done)."""
    if stream.result is not None:
        return stream.result
    try:
        for _ in stream:
            pass
    except Exception as exc:  # noqa: BLE001 - any failure of one request is that request's result
        return exc
    return RuntimeError("the request ended without a result")


def _error_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, (TierkvError, OSError)) else f"internal error ({type(exc).__name__}: {text})"


def _weight_counters(engine: Engine) -> dict[str, float]:
    """The weight source's cumulative counters (bytes per link since load)."""
    return engine._weights.stats()  # noqa: SLF001 - the engine counts them there; requests' own overlap


def _finish_summary(summary: BatchSummary, engine: Engine, before: dict[str, float], ordered: _Ordered,
                    wall_s: float, todo: int) -> None:
    delta = weight_stats_delta(before, _weight_counters(engine))
    summary.weight_bytes = {k.removesuffix("_bytes"): int(v) for k, v in delta.items()
                            if "_to_" in k and k.endswith("_bytes")}
    summary.kv_bytes = dict(ordered.kv)
    summary.wall_s = wall_s
    summary.unfinished = todo - summary.ok - summary.errors
    summary.tok_s = summary.generated_tokens / wall_s if wall_s > 0 else 0.0
    disk = sum(v for k, v in summary.weight_bytes.items() if k.startswith("disk_to_")) + ordered.kv["bytes_read_disk"]
    host = sum(v for k, v in summary.weight_bytes.items() if k.startswith("host_to_")) + ordered.kv["bytes_read_host"]
    n = summary.generated_tokens
    summary.read_bytes_per_token = {"disk": disk / n if n else 0.0, "host": host / n if n else 0.0}


class _Bar:
    """A rich progress bar on stderr (requests done, tok/s) when asked; a no-op otherwise."""

    def __init__(self, show: bool, total: int, done: int) -> None:
        self.show, self.total, self.done = show, total, done
        self._progress: Any = None

    def __enter__(self) -> Callable[[int, float], None]:
        if self.show:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self._progress = Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[tok_s]:.1f} tok/s"), TimeElapsedColumn(),
                                      TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self._progress.start()
            self._task = self._progress.add_task("batch", total=self.total, completed=self.done, tok_s=0.0)
        return self._advance

    def _advance(self, wrote: int, tok_s: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=wrote, tok_s=tok_s)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def run_requests(engine: Engine, requests: list[BatchRequest], *,
                 batch: int | None = None) -> tuple[list[dict[str, Any]], BatchSummary]:
    """The result records of ``requests`` (one each, in their order: what a job writes to its output
    file) and the summary of the run, kept in memory; ``batch``: most sequences in flight (default:
    the engine's max_sequences). What a Ray worker runs on its share of a job (tierkv.ray)."""
    batch = batch or engine.policy.max_sequences
    summary, sink = BatchSummary(requests=len(requests), batch=batch), _Records()
    ordered = _Ordered(sink, summary)
    before, t0 = _weight_counters(engine), time.perf_counter()
    for _ in _drive(engine, requests, batch, ordered, t0):
        pass
    _finish_summary(summary, engine, before, ordered, time.perf_counter() - t0, len(requests))
    return sink.records, summary


def run_batch(engine: Engine, requests_path: str | Path, output_path: str | Path, *, progress: bool = False,
              batch: int | None = None, sampling: dict[str, Any] | None = None,
              retry_errors: bool = False) -> BatchSummary:
    """Run a JSONL batch job on ``engine``: every request of ``requests_path`` whose id the output file
    lacks, results appended to ``output_path`` in input order (see the module docstring for both
    formats). ``batch``: most sequences in flight (default: the engine's max_sequences); ``sampling``:
    generate's keyword arguments for fields a line leaves out; ``progress``: a bar on stderr;
    ``retry_errors``: run again the requests whose result there is an error.

    Raises BatchError before anything runs (a missing input, duplicate ids, an unwritable output, an
    output of another input) and BatchInterrupted (a KeyboardInterrupt with ``.summary``) on Ctrl-C,
    after writing what was complete; run it again with the same output file to finish the job."""
    with BatchJob(requests_path, output_path, sampling, retry_errors) as job:
        return job.run(engine, batch=batch, progress=progress)
