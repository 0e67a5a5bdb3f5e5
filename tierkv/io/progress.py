"""Progress for long byte-counting passes (checkpoint verification, store conversion): the caller's
callback, a bar on a terminal, or silence when stderr is piped.

Why this module exists: ``checkpoint.verify`` and ``convert.convert`` both stream gigabytes and
must show how far they got in the same way, and ``io.checkpoint`` sits below ``io.convert``; this
is the one helper, shared from below.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Callable, Iterator

# progress(done_bytes, total_bytes); may raise to abort
ProgressFn = Callable[[int, int], None]


@contextlib.contextmanager
def progress_or_bar(progress: ProgressFn | None, total: int, label: str) -> Iterator[ProgressFn]:
    """Yield ``progress``, or a rich bar titled ``label`` when there is none and stderr is a
    terminal, or a no-op."""
    if progress is not None or not sys.stderr.isatty():
        yield progress or (lambda done, total: None)
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)
    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done, total: bar.update(task, completed=done)


def phase_progress(progress: ProgressFn | None, phase: str) -> ProgressFn | None:
    """``progress`` for one phase of a load ("verify", "convert", "load"): each phase counts from 0 to
    its own total; a callback that takes a ``phase`` keyword is told which, ``progress(done, total)``
    callbacks are called as before."""
    if progress is None:
        return None
    try:
        takes_phase = "phase" in inspect.signature(progress).parameters
    except (TypeError, ValueError):         # a builtin without a signature
        takes_phase = False
    if not takes_phase:
        return progress
    return lambda done, total: progress(done, total, phase=phase)  # type: ignore[call-arg]


__all__ = ["ProgressFn", "phase_progress", "progress_or_bar"]
