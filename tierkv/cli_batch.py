"""``tierkv batch MODEL prompts.jsonl -o results.jsonl``: the command line over ``tierkv.batch``.

Why this module exists: the batch command has its own flags (the output, the batch size, a summary
file) beside the shared load and sampling ones, and its own exit codes (130 after Ctrl-C, with what
was complete written, so a rerun finishes the job); it lives apart from ``cli.py`` and joins the app
with one registration line there. It opens the job (checking the input, the output and the ids)
before loading the model, so a mistake there costs no load.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console

from tierkv.batch import BatchError, BatchInterrupted, BatchJob, BatchSummary
from tierkv.cli_batchplan import plan_job_batch
from tierkv.cli_flags import LoadFlags, SamplingFlags, expand_flags, flags
from tierkv.io.store import write_bytes_atomic

__all__ = ["batch_command"]

DEFAULT_BATCH = 16


@dataclass(frozen=True)
class _BatchLoadFlags(LoadFlags):
    """The load flags plus the planner's batch choice (``tierkv.batchplan.BatchChoice.load_kwargs``)."""

    max_sequences: int = DEFAULT_BATCH
    micro_batches: int = 1
    prefill_order: str = "longest"


@expand_flags
def batch_command(
    model: str = typer.Argument(..., help="Hugging Face model directory, a GGUF file, a store made by "
                                          "`tierkv convert`, or 'demo'"),
    requests: str = typer.Argument(..., help="JSONL file, one request per line: {\"prompt\": ...} or "
                                             "{\"messages\": [...]}, optional id and sampling fields"),
    output: str = typer.Option(..., "--output", "-o", help="JSONL results, in input order; rerun with the same "
                                                           "file to resume (ids already there are skipped)"),
    batch: str = typer.Option("auto", "--batch", "-b",
                              help="sequences in flight (each streamed layer pass serves them all): auto = the "
                                   "planner's choice for these requests and budgets, or N (refused, with the "
                                   "largest that fits, when the budgets cannot hold N)"),
    summary_file: Optional[str] = typer.Option(None, "--summary", help="also write the summary as JSON to FILE"),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="run again the requests whose result in the "
                                                                    "output is an error (e.g. after fixing their lines)"),
    sampling: SamplingFlags = flags(SamplingFlags),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    options: LoadFlags = flags(LoadFlags),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object on stdout"),
    ray_address: Optional[str] = typer.Option(None, "--ray", help="spread the job over a Ray cluster: auto (the one started "
                                                          "here, else a new local one) or its ADDRESS; needs "
                                                          "pip install 'tierkv[ray]'"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="--ray: engines (Ray actors) to spread the "
                                                                         "job over, each loads the model once "
                                                                         "(default 1)"),
) -> None:
    """Run a JSONL file of requests as one continuously batched, resumable job.

    A line's own fields (max_tokens, temperature, top_p, top_k, seed, stop) override the sampling
    flags. A bad line gets an error result naming its line number and the job goes on. Ctrl-C writes
    what is complete and exits 130; run the same command again to finish. With --ray the job runs on
    --workers Ray actors (budgets unset: each node's TIERKV_DEVICE_MEM, TIERKV_HOST_MEM, ...)."""
    from tierkv.cli import _load, _set_threads, _user_errors   # cli.py registers this command: import it late

    _set_threads(options.threads)
    with _user_errors():
        summary_path = _summary_path(summary_file)
        if workers is not None and ray_address is None:
            raise BatchError(f"--workers {workers} spreads the job over Ray actors: give --ray auto (or a cluster's "
                             "address) too")
        job = BatchJob(requests, output, sampling.sampling_kwargs(stop), retry_errors)
        try:
            choice = plan_job_batch(model, options, job.todo(), sampling.max_new_tokens, batch)
            if not as_json:
                Console(stderr=True).print(f"[batch: {choice.batch} sequences per layer pass"
                                           + (f" in {choice.micro_batches} micro-batches" if choice.micro_batches > 1
                                              else "") + f", predicted {choice.predicted_tok_s:.2f} tok/s, bound by "
                                           f"{choice.bound}]", style="dim", highlight=False, markup=False, soft_wrap=True)
            load_options = _with_choice(options, choice.load_kwargs())
            if ray_address is None:
                summary = _run(job, model, load_options, choice.batch, as_json, _load)
            else:                       # each worker runs the batch planned here, for the budgets given here
                summary = _run_on_ray(job, model, load_options, ray_address, workers or 1, not as_json)
        finally:
            job.close()
        _report(summary, summary_path, as_json)
    if summary.interrupted:
        raise typer.Exit(130)


def _with_choice(options: LoadFlags, load_kwargs: dict[str, Any]) -> _BatchLoadFlags:
    """The load flags with the batch choice's (max_sequences, micro_batches, kv_device_tokens, prefill_order)."""
    return _BatchLoadFlags(**{**{f.name: getattr(options, f.name) for f in fields(options)}, **load_kwargs})


def _run(job: BatchJob, model: str, options: _BatchLoadFlags, batch: int, quiet: bool, load: Any) -> BatchSummary:
    """Load, run the job, close; Ctrl-C (or SIGTERM) -> the summary of what was written, marked interrupted."""
    with _term_as_interrupt():
        try:
            engine = load(model, options, quiet)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        try:
            progress = not quiet and Console(stderr=True).is_terminal and sys.stdout.isatty()
            return job.run(engine, batch=batch, progress=progress)
        except BatchInterrupted as exc:
            return exc.summary
        finally:
            engine.close()


def _run_on_ray(job: BatchJob, model: str, options: _BatchLoadFlags, address: str, workers: int,
                progress: bool) -> BatchSummary:
    """The job on ``workers`` Ray actors (tierkv.ray); Ctrl-C (or SIGTERM) -> the summary of what was written."""
    from tierkv.ray import run_ray_job          # Ray is an optional extra: imported only for --ray

    with _term_as_interrupt():
        try:
            return run_ray_job(job, model, options.load_kwargs(), address=address, workers=workers,
                               batch=options.max_sequences, threads=options.threads,
                               progress=progress and Console(stderr=True).is_terminal)
        except BatchInterrupted as exc:
            return exc.summary


@contextmanager
def _term_as_interrupt() -> Iterator[None]:
    """SIGTERM (a job scheduler's stop) ends the job like Ctrl-C: what is complete stays written."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        before = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:                 # not the main thread (an embedding caller): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _summary_path(path: Optional[str]) -> Optional[Path]:
    """``--summary FILE``: checked before the job runs (its directory must exist and be writable)."""
    if path is None:
        return None
    out = Path(path).expanduser()
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise BatchError(f"--summary {path}: cannot write a file there; give a file path in a writable directory")
    return out


def _report(summary: BatchSummary, path: Optional[Path], as_json: bool) -> None:
    data = summary.to_dict()
    if path is not None:
        write_bytes_atomic(path, (json.dumps(data, indent=1) + "\n").encode())
    if as_json:
        print(json.dumps(data))
    else:
        Console(stderr=True).print(summary.line(), style="dim", highlight=False, soft_wrap=True, markup=False)
