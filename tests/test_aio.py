"""Engine.astream / Engine.agenerate: the asyncio bridge over the step scheduler."""

from __future__ import annotations

import asyncio
import threading

import pytest

import tierkv
from tierkv.aio import READ_AHEAD

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engine():
    eng = tierkv.load("demo", device="cpu")
    yield eng
    eng.close()


def test_agenerate_equals_generate(engine):
    ref = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    got = asyncio.run(engine.agenerate(PROMPT, max_new_tokens=12, ignore_eos=True))
    assert got.token_ids == ref.token_ids and got.text == ref.text and got.finish_reason == "length"


def test_astream_pieces_join_to_the_result(engine):
    async def main():
        stream = engine.astream(PROMPT, max_new_tokens=10, ignore_eos=True)
        pieces = [p async for p in stream]
        return pieces, stream.result
    pieces, result = asyncio.run(main())
    assert "".join(p.text for p in pieces) == result.text
    assert [p.token_id for p in pieces if p.token_id is not None] == result.token_ids


def test_concurrent_requests_share_steps(engine):
    seeds = list(range(6))
    refs = [engine.generate(PROMPT, max_new_tokens=8, temperature=0.9, seed=s) for s in seeds]

    async def main():
        return await asyncio.gather(*[engine.agenerate(PROMPT, max_new_tokens=8, temperature=0.9, seed=s)
                                      for s in seeds])
    got = asyncio.run(main())
    assert [g.token_ids for g in got] == [r.token_ids for r in refs]     # each as it would be alone
    assert max(g.stats.batch_size for g in got) > 1                      # ... while sharing steps


def test_cancel_from_another_thread_frees_the_sequence(engine):
    async def main():
        stream = engine.astream(PROMPT, max_new_tokens=400, ignore_eos=True)
        count = 0
        async for _ in stream:
            count += 1
            if count == 2:
                threading.Thread(target=stream.cancel).start()
        return count, stream.result
    count, result = asyncio.run(main())
    assert result.finish_reason == "cancelled" and count < 400
    assert engine.kv_stats()["live_sequences"] == 0


def test_cancelling_the_task_cancels_the_generation(engine):
    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.astream(PROMPT, max_new_tokens=400, ignore_eos=True):
                started.set()
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):                    # the bridge reaps it at its next step
            if engine.kv_stats()["live_sequences"] == 0:
                return True
            await asyncio.sleep(0.01)
        return False
    assert asyncio.run(main())


def test_a_slow_reader_holds_at_most_the_read_ahead(engine):
    async def main():
        stream = engine.astream(PROMPT, max_new_tokens=30, ignore_eos=True)
        first = await stream.__anext__()
        await asyncio.sleep(0.3)                        # the bridge could step many times meanwhile
        queued = stream._queue.qsize()
        rest = [p async for p in stream]
        return first, queued, rest, stream.result
    first, queued, rest, result = asyncio.run(main())
    assert queued <= READ_AHEAD
    assert "".join(p.text for p in [first, *rest]) == result.text and len(result.token_ids) == 30


def test_bad_requests_raise_at_the_call(engine):
    async def main():
        with pytest.raises(tierkv.ArgumentError):
            engine.astream(PROMPT, temperature=-1)
        with pytest.raises(TypeError):
            engine.astream(3.5)
    asyncio.run(main())
    with pytest.raises(RuntimeError, match="running event loop"):
        engine.astream(PROMPT)


def test_close_ends_live_streams_and_refuses_new_ones():
    eng = tierkv.load("demo", device="cpu")

    async def main():
        stream = eng.astream(PROMPT, max_new_tokens=400, ignore_eos=True)
        await stream.__anext__()
        bridge = eng._bridge
        await asyncio.get_running_loop().run_in_executor(None, eng.close)
        rest = [p async for p in stream]
        with pytest.raises(RuntimeError, match="closed"):
            eng.astream(PROMPT)
        return rest, stream.result, bridge
    rest, result, bridge = asyncio.run(main())
    assert result.finish_reason == "cancelled" and len(rest) < 400
    assert not bridge.thread.is_alive()


def test_context_manager_stops_the_bridge():
    with tierkv.load("demo", device="cpu") as eng:
        asyncio.run(eng.agenerate(PROMPT, max_new_tokens=4))
        bridge = eng._bridge
        assert bridge.thread.is_alive()
    bridge.thread.join(timeout=10)
    assert not bridge.thread.is_alive()
