"""The KV cache's background threads, made once per engine and shared by all its caches.

Why this module exists: a tiered KV cache copies chunks between host, disk and device off the
compute thread. Starting threads per cache would cost a pool per sequence (the engine makes one
cache per sequence); ``KVWorkers`` is created once, passed to every cache, and closed by its owner.
A cache made without one owns a private ``KVWorkers`` and closes it with itself.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

__all__ = ["KVWorkers", "STREAM_THREADS"]

STREAM_THREADS = 4               # "stream" threads that read the chunks sparse steps need in parallel


class KVWorkers:
    """A reader and a writer thread for disk and host<->device moves, and ``STREAM_THREADS``
    "stream" threads that read the chunks sparse steps need from disk (fetches and overflow
    remainders, split over the threads: parallel reads keep more of the disk busy).

    On CUDA each job runs on its thread's own stream after waiting for an event recorded when it
    was submitted, so it sees (and does not overwrite) what the compute stream was still using;
    the job's future completes only after its stream finished. Thread-safe: any number of caches
    submit to one instance.
    """

    KINDS = ("read", "write", "stream")

    def __init__(self, device: torch.device | str) -> None:
        device = torch.device(device)
        threads = {"read": 1, "write": 1, "stream": STREAM_THREADS}
        self._pools = {kind: ThreadPoolExecutor(n, thread_name_prefix=f"tierkv-kv-{kind}")
                       for kind, n in threads.items()}
        self.device = device
        self._cuda = device if device.type == "cuda" else None
        self._local = threading.local()   # .stream: the calling pool thread's CUDA stream
        self.closed = False

    def submit(self, kind: str, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on a ``kind`` ("read", "write", "stream") thread; its Future completes after it."""
        assert not self.closed, "KVWorkers used after close()"
        event = None
        if self._cuda is not None:
            event = torch.cuda.Event()
            event.record()
        return self._pools[kind].submit(self._run, fn, event)

    def _run(self, fn: Callable[[], Any], event: Any) -> Any:
        with torch.inference_mode():
            if self._cuda is None:
                return fn()
            stream = getattr(self._local, "stream", None)
            if stream is None:
                stream = self._local.stream = torch.cuda.Stream(self._cuda)
            with torch.cuda.stream(stream):
                stream.wait_event(event)
                out = fn()
            stream.synchronize()
            return out

    def close(self) -> None:
        """Finish queued work and stop the threads (idempotent)."""
        self.closed = True
        for pool in self._pools.values():
            pool.shutdown(wait=True)

    def __enter__(self) -> "KVWorkers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
