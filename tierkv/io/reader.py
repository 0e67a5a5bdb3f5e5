"""Asynchronous aligned reads of one file on a small pool of I/O threads.

Why this module exists: streaming weights is bound by the disk only if the disk is kept busy
while the model computes. One read of a layer is split into requests of a few MiB that run on
several threads at once (``os.preadv`` releases the GIL), with O_DIRECT where the filesystem
allows it, so the page cache neither double-buffers nor evicts the host tier. Each ``submit``
returns a ``MoveRecord`` (``tierkv.io.mover``, principle 2): a pollable handle that also carries
bytes and start/end times, and each request runs inside the record's ``tierkv::move`` profiler
span, so the stats and the tracer see reads without extra code.
"""

from __future__ import annotations

import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from tierkv.io.buffers import ALIGN_BYTES, aligned_host_tensor, round_up
from tierkv.io.mover import DISK, HOST, MoveRecord
from tierkv.openmp import serial_thread  # no OpenMP pool of its own: the engine thread keeps its spin

DEFAULT_REQUEST_BYTES = 4 << 20
# verify(start_in_read, view): called on the I/O thread after each request landed;
# view is a memoryview of bytes [start_in_read, start_in_read + len(view)) of the read.
Verifier = Callable[[int, memoryview], None]


class ReadError(OSError):
    """A read could not be completed (short file, I/O error); the message names the file."""


def open_direct(path: Path) -> int | None:
    """An O_DIRECT read-only descriptor for ``path``, or None where the filesystem refuses O_DIRECT."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


class AlignedReader:
    """Reads byte ranges of ``path`` into caller-provided buffers on ``threads`` I/O threads.

    ``direct=None`` uses O_DIRECT when the filesystem allows it and buffered reads otherwise;
    ``True`` requires it; ``False`` never uses it. A request uses O_DIRECT only when its file
    offset, length and destination address are all 4 KiB-aligned; others go through the buffered
    descriptor, so callers may read any range and get the same bytes.
    """

    def __init__(self, path: str | Path, threads: int = 4, request_bytes: int = DEFAULT_REQUEST_BYTES,
                 direct: bool | None = None) -> None:
        assert threads >= 1 and request_bytes % ALIGN_BYTES == 0, (threads, request_bytes)
        self.path = Path(path)
        self.request_bytes = request_bytes
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise ReadError(exc.errno, f"cannot open {self.path} for reading ({exc.strerror})") from None
        self._direct_fd = open_direct(self.path) if direct is not False else None
        if direct is True and self._direct_fd is None:
            os.close(self._fd)
            raise ReadError(errno.EINVAL, f"the filesystem holding {self.path} does not support O_DIRECT")
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tierkv-read", initializer=serial_thread)
        self._closed = False

    @property
    def direct(self) -> bool:
        """Whether aligned requests bypass the page cache."""
        return self._direct_fd is not None

    def file_bytes(self) -> int:
        return os.fstat(self._fd).st_size

    def submit(self, offset: int, nbytes: int, dest: torch.Tensor, verify: Verifier | None = None,
               label: str | None = None, record: MoveRecord | None = None) -> MoveRecord:
        """Start reading bytes [offset, offset + nbytes) of the file into ``dest[:nbytes]``.

        ``dest`` is a contiguous uint8 CPU tensor (pinned or plain) of at least ``nbytes``. The reads
        fill ``record`` (a mover's record of this move; default: a new disk->host record named
        ``label``), one profiler span per request.
        """
        assert not self._closed, "reader used after close()"
        assert dest.dtype == torch.uint8 and dest.device.type == "cpu" and dest.is_contiguous()
        assert 0 <= nbytes <= dest.numel() and offset >= 0, (offset, nbytes, dest.numel())
        if record is None:
            record = MoveRecord(DISK, HOST, label or f"{self.path.name}@{offset}", nbytes)
        assert record.nbytes == nbytes, (record, nbytes)
        view = memoryview(dest.numpy()).cast("B")[:nbytes]
        starts = list(range(0, nbytes, self.request_bytes))
        if not starts:
            record.mark_empty()
        for part, lo in enumerate(starts, 1):
            hi = min(lo + self.request_bytes, nbytes)
            fd = self._fd_for(dest.data_ptr() + lo, offset + lo, hi - lo)
            record.add_future(self._pool.submit(self._request, record, fd, view[lo:hi], offset + lo, lo, verify,
                                                part, len(starts)))
        return record

    def read(self, offset: int, nbytes: int, dest: torch.Tensor, verify: Verifier | None = None) -> None:
        """Blocking ``submit(...).wait()``."""
        self.submit(offset, nbytes, dest, verify).wait()

    def _request(self, record: MoveRecord, fd: int, view: memoryview, file_offset: int, start_in_read: int,
                 verify: Verifier | None, part: int, parts: int) -> None:
        with record.working(len(view), part, parts):
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], file_offset + done)
                if n == 0:
                    raise ReadError(errno.EIO, f"{self.path} ends at byte {self.file_bytes()} but a read needs "
                                               f"bytes up to {file_offset + len(view)}: the file is truncated")
                done += n
                fd = self._fd   # after a short read the rest is unaligned: finish buffered
            if verify is not None:
                verify(start_in_read, view)

    def _fd_for(self, address: int, file_offset: int, nbytes: int) -> int:
        """The O_DIRECT descriptor when the request is fully aligned, else the buffered one."""
        aligned = address % ALIGN_BYTES == 0 and file_offset % ALIGN_BYTES == 0 and nbytes % ALIGN_BYTES == 0
        return self._direct_fd if aligned and self._direct_fd is not None else self._fd

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        for fd in (self._fd, self._direct_fd):
            if fd is not None:
                os.close(fd)

    def __enter__(self) -> "AlignedReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def evict_from_page_cache(path: str | Path) -> None:
    """Write back and drop ``path``'s cached pages (no root needed), so the next read is cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


PROBE_WINDOW_BYTES = 16 << 20   # memory the disk probe uses, whatever it reads


def measure_disk_read_gbps(path: str | Path, nbytes: int = 256 << 20, threads: int = 4,
                           request_bytes: int = DEFAULT_REQUEST_BYTES, window_bytes: int = PROBE_WINDOW_BYTES) -> float:
    """Cold sequential read speed of ``path`` in GB/s (1e9 bytes/s): the ceiling of the disk link.

    Reads the first ``min(nbytes, file size)`` bytes (rounded down to 4 KiB) with O_DIRECT where
    allowed, after evicting the file from the page cache, one ``window_bytes`` buffer (reused) at a
    time. The size of that buffer matters on a virtual disk: on the CPU machine a 16 MiB window read
    3.0-3.3 GB/s where 86 MiB (a layer) or 172 MiB (a two-slot ring) read 2.0-2.5, the same requests
    landing in more distinct memory (docs/benchmarks.md, "The disk's speed depends on where it writes").
    """
    size = min(nbytes, os.path.getsize(path)) // ALIGN_BYTES * ALIGN_BYTES
    if size == 0:
        raise ValueError(f"{path} is smaller than {ALIGN_BYTES} bytes; probe a larger file")
    evict_from_page_cache(path)
    window = min(size, round_up(window_bytes))   # a bounded buffer, reused: the probe stays outside no budget
    dest = aligned_host_tensor(window)
    dest.fill_(0)   # fault the pages in before timing
    with AlignedReader(path, threads=threads, request_bytes=request_bytes) as reader:
        t0 = time.perf_counter()
        for offset in range(0, size, window):
            n = min(window, size - offset)
            reader.read(offset, n, dest[:n])
        elapsed = time.perf_counter() - t0
    return size / elapsed / 1e9


__all__ = ["AlignedReader", "DEFAULT_REQUEST_BYTES", "ReadError", "Verifier",
           "evict_from_page_cache", "measure_disk_read_gbps", "open_direct"]
