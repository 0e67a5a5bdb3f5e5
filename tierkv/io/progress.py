"""Progress for long byte-counting passes (checkpoint verification, store conversion): the caller's
callback, a bar on a terminal, or silence when stderr is piped.

Why this module exists: ``checkpoint.verify`` and ``convert.convert`` both stream gigabytes and
must show how far they got in the same way, and ``io.checkpoint`` sits below ``io.convert``; this
is the one helper, shared from below.
"""

from __future__ import annotations

import contextlib
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


__all__ = ["ProgressFn", "progress_or_bar"]
