"""asyncio on top of the step scheduler: ``Engine.astream`` and ``Engine.agenerate``.

Why this module exists: applications and servers that run an event loop must not block it on a
model step, yet all their requests should share each step's layer pass like threaded callers do.
One bridge thread per engine drives the engine's steps while any async request is live and hands
each request's pieces to its event loop with ``loop.call_soon_threadsafe``. A request's consumer
may fall behind by at most ``READ_AHEAD`` pieces before its further pieces wait in the engine
(other requests keep stepping). Cancelling the consuming task, or ``AsyncStream.cancel()`` from any
thread, cancels the sequence: the next step frees its KV. ``Engine.close()`` stops the bridge and
ends every live stream (finish_reason "cancelled").
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import TYPE_CHECKING, Any

from tierkv.core import Client
from tierkv.generation import GenerationResult, Piece, sampling_params
from tierkv.sampling import SamplingParams

if TYPE_CHECKING:
    from tierkv.engine import Engine, Prompt

__all__ = ["AsyncStream", "Bridge", "READ_AHEAD", "agenerate", "astream", "bridge_of", "close_bridge"]

READ_AHEAD = 2          # pieces handed to a request's loop and not yet read before its next pieces wait


class _End:
    """The last item of a request's queue: its result (None when it ended with an error)."""

    def __init__(self, result: GenerationResult | None) -> None:
        self.result = result


class _Request:
    """One async request as the bridge sees it: its ids and sampling, its Client once started, its loop."""

    def __init__(self, ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
                 queue: "asyncio.Queue[Any]", cache_prompt: bool = False) -> None:
        self.ids, self.params, self.loop, self.queue = ids, params, loop, queue
        self.cache_prompt = cache_prompt
        self.client: Client | None = None
        self.cancelled = False
        self.delivered = 0          # items posted to the loop (the bridge thread counts)
        self.consumed = 0           # items read by the consumer (the loop's thread counts)

    def cancel(self) -> None:
        self.cancelled = True
        if self.client is not None:
            self.client.cancelled = True

    def post(self, item: Any) -> None:
        """Hand one item to the request's loop; a closed loop (the app went away) cancels the request."""
        self.delivered += 1
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            self.cancel()

    def room(self) -> bool:
        """Whether more pieces may go to the loop now (a cancelled request takes its tail at once)."""
        return self.cancelled or self.delivered - self.consumed < READ_AHEAD


class Bridge:
    """The worker thread of one engine that steps for its async requests (see module docstring)."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self.cond = threading.Condition()
        self.pending: list[_Request] = []          # added, not yet in the scheduler
        self.active: list[_Request] = []           # the bridge thread's own list
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="tierkv-aio", daemon=True)
        self.thread.start()

    def add(self, req: _Request) -> None:
        with self.cond:
            if self.stopping:
                raise RuntimeError("this Engine is closed; call tierkv.load() again")
            self.pending.append(req)
            self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def stop(self) -> None:
        """Stop stepping (after the step under way); ``flush`` then ends what is left."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if threading.current_thread() is not self.thread:
            self.thread.join()

    def flush(self) -> None:
        """After the engine closed: hand every live request what it has and end its stream."""
        for req in self.pending:
            req.post(RuntimeError("the Engine was closed before this request started"))
            req.post(_End(None))
        self.pending = []
        for req in self.active:
            req.cancel()
        self._deliver()
        for req in self.active:
            req.post(_End(None))
        self.active = []

    # -- the bridge thread ------------------------------------------------------------------------
    def _wanted(self) -> bool:
        return bool(self.pending) or any(r.room() for r in self.active)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self._wanted():
                    self.cond.wait()
                if self.stopping:
                    return
                new, self.pending = self.pending, []
            for req in new:
                self._start(req)
            self._deliver()
            if any(r.client is not None and not r.client.done and not r.client.items and r.room() for r in self.active):
                self._step()
                self._deliver()

    def _start(self, req: _Request) -> None:
        try:
            req.client = self.engine._client([req.ids], req.params, req.cache_prompt)
        except Exception as exc:        # noqa: BLE001 - e.g. the engine closed meanwhile: this request's error
            req.post(exc)
            req.post(_End(None))
            return
        if req.cancelled:
            req.client.cancelled = True
        self.active.append(req)

    def _step(self) -> None:
        try:
            if self.engine.step() == 0 and any(not r.client.done for r in self.active):  # type: ignore[union-attr]
                raise AssertionError("the scheduler made no progress for a live request")
        except Exception as exc:        # noqa: BLE001 - the engine failed as a whole: every request sees why
            for req in self.active:
                req.cancel()
                req.post(exc)
                req.post(_End(None))
            self.active = []

    def _deliver(self) -> None:
        """Move ready pieces to their loops (within each read-ahead) and end the requests that finished."""
        still = []
        for req in self.active:
            client = req.client
            assert client is not None
            while client.items and req.room():
                req.post(client.items.popleft())
            if client.done and not client.items:
                req.post(_End(client.results[0]))
            else:
                still.append(req)
        self.active = still


class AsyncStream:
    """Async iterator of Pieces for one ``Engine.astream`` call.

    ``async for piece in stream`` yields pieces as the engine produces them; ``result`` is the
    GenerationResult once the stream ended. ``cancel()`` works from any thread; cancelling the task
    that iterates, ``aclose()`` or leaving ``async with`` cancels too. The generation stops and its
    KV is freed at the next step; the stream then ends (finish_reason "cancelled").
    """

    def __init__(self, bridge: Bridge, ids: list[int], params: SamplingParams, cache_prompt: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._req = _Request(ids, params, loop, self._queue, cache_prompt)
        self._bridge = bridge
        self._result: GenerationResult | None = None
        self._ended = False
        self.prompt_token_ids = ids
        weakref.finalize(self, _cancel_abandoned, self._req, bridge)   # dropped unread: stops at the next step
        bridge.add(self._req)

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> Piece:
        if self._ended:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        self._req.consumed += 1
        if self._req.delivered - self._req.consumed == READ_AHEAD - 1:
            self._bridge.wake()                         # it may have been waiting for room
        if isinstance(item, _End):
            self._ended, self._result = True, item.result
            raise StopAsyncIteration
        if isinstance(item, BaseException):      # the sequence failed (its KV is already dropped)
            self._ended = True
            raise item
        return item

    @property
    def result(self) -> GenerationResult | None:
        """The GenerationResult once the stream ended (None before, or after an error)."""
        return self._result

    @property
    def done(self) -> bool:
        return self._ended

    @property
    def cancelled(self) -> bool:
        """Whether ``cancel()`` was asked (or the task iterating it was cancelled)."""
        return self._req.cancelled

    def cancel(self) -> None:
        """Stop generating (callable from any thread); the stream ends after the text held back so far."""
        self._req.cancel()
        self._bridge.wake()

    async def aclose(self) -> None:
        """Cancel and stop iterating."""
        if not self._ended:
            self.cancel()
            self._ended = True

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _cancel_abandoned(req: _Request, bridge: Bridge) -> None:
    req.cancel()
    bridge.wake()


def bridge_of(engine: "Engine") -> Bridge:
    """The engine's bridge, started on first use (never once ``close_bridge`` ran)."""
    with engine._bridge_lock:
        if engine._bridge is False or engine._closed:
            raise RuntimeError("this Engine is closed; call tierkv.load() again")
        if engine._bridge is None:
            engine._bridge = Bridge(engine)
        return engine._bridge


def close_bridge(engine: "Engine") -> Bridge | None:
    """First part of ``Engine.close``: no new bridge from now on; stop the running one (it is
    returned so that ``Bridge.flush`` can end its streams once the engine's sequences are cancelled)."""
    with engine._bridge_lock:
        bridge, engine._bridge = engine._bridge, False
    if isinstance(bridge, Bridge):
        bridge.stop()
        return bridge
    return None


def astream(engine: "Engine", prompt: "Prompt", *, cache_prompt: bool = False, **sampling: Any) -> AsyncStream:
    """``Engine.astream``: validate now (raising like ``Engine.stream``), generate on the bridge."""
    engine._check_open()
    ids, params = engine.encode(prompt), sampling_params(sampling)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("Engine.astream() needs a running event loop: call it from a coroutine "
                           "(inside asyncio.run), or use Engine.stream() from plain code") from None
    return AsyncStream(bridge_of(engine), ids, params, cache_prompt)


async def agenerate(engine: "Engine", prompt: "Prompt", *, cache_prompt: bool = False,
                    **sampling: Any) -> GenerationResult:
    """``Engine.agenerate``: the whole result of one prompt, awaited."""
    stream = astream(engine, prompt, cache_prompt=cache_prompt, **sampling)
    async for _ in stream:
        pass
    assert stream.result is not None
    return stream.result
