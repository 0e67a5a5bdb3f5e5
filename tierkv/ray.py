"""Ray Data: one offline batch job spread over many machines, one tierkv engine per worker.

Why this module exists: a lab with several single-GPU workstations wants one evaluation or bulk
generation to use all of them, and Ray Data is the standard engine for distributed batch inference.
``TierkvPredictor`` is the callable class for ``ray.data.Dataset.map_batches``: each Ray actor loads
the model once (its budgets from the arguments, else from its node's ``TIERKV_*`` environment) and
turns a batch of JSONL request lines into result records with ``tierkv.batch.run_requests``, so the
request parsing, the continuous batching and the result format are the local mode's own. A row
whose request is unusable (bad JSON, a prompt longer than the context, token ids outside the
vocabulary) gets an ``error`` record; the job goes on. ``run_ray_job`` is ``tierkv batch --ray``:
the driver opens the job exactly as the local mode does (ids checked, the ids the output file holds
already skipped), spreads the rest over N actors, and appends each result to the output file in
input order, one fsync'd line at a time (the local mode's ``ResultLog``), so a rerun resumes.

The name: ``tierkv.ray``. Inside it ``import ray`` finds the Ray package, not this file: imports are
absolute (Python 3), and ``sys.path`` holds tierkv's parent directory, never ``tierkv/`` itself.
Ray is imported only where a job runs, so ``TierkvPredictor`` also works, and this module imports,
where Ray is not installed (``pip install 'tierkv[ray]'`` adds it).

Dataset rows in: ``request`` (one input line of the batch format, a JSON object as text) and an
optional ``line`` (its line number, named in error texts; default: the row's place in its batch).
Rows out: the input columns plus ``result`` (the record, JSON text, as the output file holds it),
``text`` and ``error`` (one of them None), ``generated_tokens``, ``worker`` (host:pid) and
``busy_s`` (the row's share of its batch's generation time).
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from tierkv.batch import (SAMPLING_FIELDS, BatchError, BatchInterrupted, BatchJob, BatchRequest, BatchSummary,
                          _error_record, parse_request, run_requests)

__all__ = ["NODE_ENV", "RaySummary", "TierkvPredictor", "WorkerStats", "run_ray_job", "worker_load_kwargs"]

# tierkv.load keyword -> the node's environment variable a worker reads when the job leaves it unset.
# (offload_dir has its own, read by load itself on each node: $TIERKV_OFFLOAD_DIR.)
NODE_ENV = {"device": "TIERKV_DEVICE", "device_mem": "TIERKV_DEVICE_MEM", "host_mem": "TIERKV_HOST_MEM"}
THREADS_ENV = "TIERKV_THREADS"                   # a worker's torch threads when the job leaves them unset
_INPUT_NAME = {generate: name for name, generate in SAMPLING_FIELDS.items()}   # generate keyword -> field
_INSTALL = "pip install 'tierkv[ray]'"
# every worker loaded before the first batch goes out (an even spread; a cluster too small fails here
# instead of waiting forever): Ray Data's wait, unless its variable sets another
_START_VAR, _START_S = "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S", 900


def worker_load_kwargs(load_kwargs: dict[str, Any], environ: dict[str, str] | os._Environ) -> dict[str, Any]:
    """``load_kwargs`` with each ``NODE_ENV`` keyword it leaves unset (None) taken from ``environ``."""
    out = dict(load_kwargs)
    for key, var in NODE_ENV.items():
        if out.get(key) is None and environ.get(var):
            out[key] = environ[var]
    return out


class TierkvPredictor:
    """A callable class for ``Dataset.map_batches``: one engine per Ray actor, loaded once.

    ``ds.map_batches(TierkvPredictor, fn_constructor_kwargs={"model": "demo"}, batch_size=16,
    concurrency=2)`` over a dataset with a ``request`` column (``ray.data.read_text("in.jsonl")``
    with ``column="text"`` reads a JSONL file straight in).
    """

    def __init__(self, model: str, load_kwargs: dict[str, Any] | None = None, *, batch: int | None = None,
                 sampling: dict[str, Any] | None = None, column: str = "request", threads: int | None = None) -> None:
        """``load_kwargs``: tierkv.load's keyword arguments (budgets unset: the node's ``NODE_ENV``);
        ``batch``: most sequences in flight (default: the engine's max_sequences); ``sampling``:
        generate's keyword arguments for the fields a line leaves out; ``column``: the requests'
        column; ``threads``: torch threads (default ``$TIERKV_THREADS``, else torch's choice)."""
        import torch

        import tierkv

        threads = threads or int(os.environ.get(THREADS_ENV) or 0)
        if threads:
            torch.set_num_threads(threads)
        self.batch, self.sampling, self.column = batch, dict(sampling or {}), column
        self.load_kwargs = worker_load_kwargs(load_kwargs or {}, os.environ)
        self.engine = tierkv.load(model, progress=lambda done, total: None, **self.load_kwargs)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of rows (column -> values, shape (n,)) -> the same rows with the result columns."""
        texts = rows[self.column]
        lines = rows["line"] if "line" in rows else np.arange(1, len(texts) + 1)
        requests = [parse_request(int(n), _as_bytes(t), dict(self.sampling)) for n, t in zip(lines, texts)]
        records, summary = run_requests(self.engine, requests, batch=self.batch)
        n = len(records)
        out = dict(rows)
        out["result"] = _column([json.dumps(r, ensure_ascii=False) for r in records])
        out["text"] = _column([r.get("text") for r in records])
        out["error"] = _column([r.get("error") for r in records])
        out["generated_tokens"] = np.array([len(r.get("tokens", ())) for r in records], dtype=np.int64)
        out["worker"] = _column([self.worker] * n)
        out["busy_s"] = np.full(n, summary.wall_s / max(n, 1), dtype=np.float64)
        return out

    def close(self) -> None:
        self.engine.close()


def _as_bytes(text: Any) -> bytes:
    return text if isinstance(text, bytes) else str(text).encode("utf-8")


def _column(values: list[Any]) -> np.ndarray:
    col = np.empty(len(values), dtype=object)                 # (n,): strings, None where absent
    col[:] = values
    return col


def _as_line(req: BatchRequest) -> str:
    """A parsed (valid) request as an input line again: what a worker parses back into the same request."""
    obj: dict[str, Any] = {"id": req.id}
    if req.messages is not None:
        obj["messages"] = req.messages
    else:
        obj["prompt"] = req.prompt
    obj.update({_INPUT_NAME[k]: list(v) if isinstance(v, tuple) else v for k, v in req.sampling.items()})
    return json.dumps(obj, ensure_ascii=False)


# -- the driver -------------------------------------------------------------------------------------
@dataclass
class WorkerStats:
    """One worker's share of a run: rows, generated tokens and the seconds it spent generating them."""

    rows: int = 0
    generated_tokens: int = 0
    busy_s: float = 0.0
    tok_s: float = 0.0               # generated tokens per second of its own generation time


@dataclass
class RaySummary(BatchSummary):
    """A local summary's counts plus each worker's share (weight and KV traffic stay on the workers)."""

    workers: dict[str, WorkerStats] = field(default_factory=dict)     # "host:pid" -> its share
    actors: int = 0                                                   # --workers

    def line(self) -> str:
        per = ", ".join(f"{w} {s.rows} rows {s.tok_s:.1f} tok/s" for w, s in sorted(self.workers.items()))
        stopped = " | interrupted: rerun to finish" if self.interrupted else ""
        return (f"[batch on ray: {self.requests} requests: {self.ok} ok, {self.errors} errors, {self.skipped} done "
                f"before{f', {self.unfinished} left' if self.unfinished else ''} | {self.generated_tokens} tokens in "
                f"{self.wall_s:.2f} s, {self.tok_s:.1f} tok/s total, {self.actors} workers, batch {self.batch} | "
                f"per worker: {per or 'none'}{stopped}]")


def run_ray_job(job: BatchJob, model: str, load_kwargs: dict[str, Any], *, address: str = "auto", workers: int = 1,
                batch: int = 16, threads: int | None = None, progress: bool = False) -> RaySummary:
    """Generate every request of ``job`` its output lacks on ``workers`` Ray actors (each loads
    ``model`` with ``load_kwargs``, its unset budgets from its node's ``NODE_ENV``, and keeps up to
    ``batch`` sequences in flight), appending the results to the job's output in input order.

    ``address``: "auto" (the cluster in $RAY_ADDRESS or started on this machine with ``ray start``,
    else a new one on this machine) or a cluster's address ("HOST:6379", "ray://HOST:10001"). Each
    actor reserves ``threads`` (default 1) CPUs, and a GPU where the cluster has GPUs and the device
    is not "cpu". A worker that dies is restarted and its batch retried; a result that arrives twice is
    written once. Ctrl-C raises BatchInterrupted after writing what was complete."""
    if workers < 1 or batch < 1:
        raise BatchError(f"--workers {workers}, --batch {batch}: give 1 or more of each")
    ray = _import_ray()
    todo = job.todo()
    summary = RaySummary(requests=len(job.requests), skipped=len(job.requests) - len(todo), batch=batch,
                         actors=workers, output=str(job.output_path))
    t0 = time.perf_counter()
    try:
        if all(r.error is not None for r in todo):       # nothing to generate (done before, or bad lines only)
            _write_in_order(job, todo, iter(()), summary)
        else:
            with _connected(ray, address), \
                    closing(_results(ray, todo, model, load_kwargs, workers, batch, threads, progress)) as rows:
                _write_in_order(job, todo, rows, summary)
    except ray.exceptions.GetTimeoutError:
        waited = ray.data.DataContext.get_current().wait_for_min_actors_s
        raise BatchError(f"the Ray cluster did not start {workers} workers of {threads or 1} CPUs each within "
                         f"{waited} s: give fewer --workers (or --threads), add nodes, or wait longer with "
                         f"{_START_VAR}=SECONDS") from None
    except KeyboardInterrupt:
        summary.interrupted = True
    _finish(summary, time.perf_counter() - t0, len(todo))
    if summary.interrupted:
        raise BatchInterrupted(summary)
    return summary


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is the extra's half that plain `ray` lacks
    except ImportError:
        raise BatchError(f"--ray needs Ray Data, which is not installed: {_INSTALL}") from None
    return ray


@contextmanager
def _connected(ray: Any, address: str) -> Iterator[None]:
    """Connected to the cluster at ``address`` for the block; disconnected after if this call connected."""
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=None if address == "auto" else address, logging_level="WARNING",
                 configure_logging=True, include_dashboard=False if address == "auto" else None)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise BatchError(f"--ray {address}: cannot reach a Ray cluster there ({' '.join(str(exc).split())}); "
                         "start one with `ray start --head` and give its address, or give --ray auto") from None
    try:
        yield
    finally:
        ray.shutdown()


def _results(ray: Any, todo: list[BatchRequest], model: str, load_kwargs: dict[str, Any], workers: int,
             batch: int, threads: int | None, progress: bool) -> Iterator[dict[str, Any]]:
    """The result rows of ``todo``'s valid requests, in their order, from ``workers`` actors. Each
    actor call gets up to ``batch`` rows, fewer when that leaves a worker idle (a short job)."""
    items = [{"line": r.line, "request": _as_line(r)} for r in todo if r.error is None]
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True            # rows come back in input order
    ctx.enable_progress_bars = progress
    if _START_VAR not in os.environ:
        ctx.wait_for_min_actors_s = _START_S
    device = load_kwargs.get("device")
    gpus = 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    per_call = max(1, min(batch, -(-len(items) // workers)))
    ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // per_call))
    out = ds.map_batches(TierkvPredictor, batch_size=per_call, compute=ray.data.ActorPoolStrategy(size=workers),
                         num_cpus=threads or 1,
                         num_gpus=gpus,      # Ray Data restarts a dead actor and retries its batch (max_restarts=-1)
                         fn_constructor_kwargs={"model": model, "load_kwargs": load_kwargs, "batch": batch,
                                                "threads": threads})
    yield from out.iter_rows()


def _write_in_order(job: BatchJob, todo: list[BatchRequest], rows: Iterator[dict[str, Any]],
                    summary: RaySummary) -> None:
    """Append each of ``todo``'s results to the job's output in input order: an invalid request's
    error here, the rest as their rows arrive (a row that arrives twice, from a retry, counts once)."""
    pending: dict[int, dict[str, Any]] = {}
    for req in todo:
        while req.error is None and req.line not in pending:
            row = next(rows, None)
            if row is None:
                raise BatchError(f"Ray returned no result for line {req.line}; rerun the same command to finish")
            pending.setdefault(int(row["line"]), row)
        if req.error is not None:
            _write(job, _error_record(req, req.error), summary)
            continue
        row = pending.pop(req.line)
        _write(job, json.loads(row["result"]), summary)
        stats = summary.workers.setdefault(str(row["worker"]), WorkerStats())
        stats.rows += 1
        stats.generated_tokens += int(row["generated_tokens"])
        stats.busy_s += float(row["busy_s"])


def _write(job: BatchJob, record: dict[str, Any], summary: RaySummary) -> None:
    if json.dumps(record["id"]) in job.log.done:
        return
    job.log.write(record)
    if "error" in record:
        summary.errors += 1
        return
    summary.ok += 1
    summary.prompt_tokens += int(record["prompt_tokens"])
    summary.generated_tokens += len(record["tokens"])


def _finish(summary: RaySummary, wall_s: float, todo: int) -> None:
    summary.wall_s = wall_s
    summary.unfinished = todo - summary.ok - summary.errors
    summary.tok_s = summary.generated_tokens / wall_s if wall_s > 0 else 0.0
    for stats in summary.workers.values():
        stats.tok_s = stats.generated_tokens / stats.busy_s if stats.busy_s > 0 else 0.0
