"""Many threads on one engine: each stream gets exactly its solo output, and a cancelled one frees its KV.

Eight threads stream at once (ragged prompts, different lengths to generate, greedy and seeded
sampling) on one engine with resident and with streamed weights: each must finish with the tokens
it gets alone. Today's engine serves them one after another; the step scheduler serves them
together (some results then report ``stats.batch_size > 1``). A stream cancelled from another
thread ends with ``finish_reason == "cancelled"``, leaves the others exact, and (step scheduler)
gives its KV back: ``engine.kv_stats()`` shows no live sequence and no device allotment.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import pytest

import placements
import tierkv
from placements import random_prompt

pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")

JOBS: list[tuple[list[int], dict[str, Any]]] = [
    (random_prompt(n, seed=200 + i), dict(max_new_tokens=m, **sampling))
    for i, (n, m, sampling) in enumerate([
        (5, 12, {}), (61, 7, {}), (17, 16, dict(temperature=0.8, seed=1)), (33, 9, {}),
        (8, 20, dict(temperature=1.2, top_k=30, seed=2)), (46, 5, {}), (12, 14, dict(temperature=0.6, top_p=0.9, seed=3)),
        (24, 10, {})])]
JOIN_S = 120


def _run_threads(targets: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"


@pytest.fixture(scope="module", params=["resident", "streamed"])
def eight_streams(request: pytest.FixtureRequest, tiny_model_dir: Callable[..., Path],
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Solo results of JOBS, then the same JOBS streamed by eight threads at once on the same engine."""
    kind = request.param
    with placements.load(kind, tiny_model_dir("llama"), tmp_path_factory.mktemp(f"eight-{kind}")) as eng:
        solo = [eng.generate(p, **s) for p, s in JOBS]
        streamed: dict[int, list[int]] = {}
        results: dict[int, tierkv.GenerationResult] = {}
        barrier = threading.Barrier(len(JOBS))

        def worker(i: int) -> Callable[[], None]:
            def run() -> None:             # an exception here leaves results[i] unset (and pytest reports it)
                barrier.wait()
                stream = eng.stream(JOBS[i][0], **JOBS[i][1])
                streamed[i] = [p.token_id for p in stream if p.token_id is not None]
                results[i] = stream.results[0]
            return run

        _run_threads([worker(i) for i in range(len(JOBS))])
    return dict(solo=solo, streamed=streamed, results=results)


def test_eight_threads_streaming_at_once_get_their_solo_outputs(eight_streams: dict[str, Any]) -> None:
    solo, streamed, results = eight_streams["solo"], eight_streams["streamed"], eight_streams["results"]
    assert sorted(results) == list(range(len(JOBS))), "a streaming thread failed"
    for i, expected in enumerate(solo):
        assert streamed[i] == results[i].token_ids == expected.token_ids, i
        assert results[i].finish_reason == expected.finish_reason and results[i].prompt_token_ids == JOBS[i][0]
    assert len({len(r.token_ids) for r in solo}) > 1           # they finish at different steps


def test_eight_threads_streaming_at_once_share_steps(eight_streams: dict[str, Any]) -> None:
    sizes = [r.stats.batch_size for r in eight_streams["results"].values()]
    assert len(sizes) == len(JOBS) and max(sizes) > 1, sizes


# -- cancel from another thread ---------------------------------------------------------------------------------

LONG = 3000      # tokens a cancelled stream would generate (a 4096-token context): cancel always comes first


@pytest.fixture(scope="module")
def long_model(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama", max_position_embeddings=4096)


def _cancel_after_first_piece(stream: tierkv.Stream, seen: list[int], first: threading.Event) -> Callable[[], None]:
    def consume() -> None:
        for piece in stream:
            if piece.token_id is not None:
                seen.append(piece.token_id)
            first.set()
    return consume


def test_a_stream_cancelled_from_another_thread_ends_and_the_others_stay_exact(long_model: Path,
                                                                                 tmp_path: Path) -> None:
    victim_prompt, other_prompt = JOBS[0][0], JOBS[1][0]
    with placements.load("resident", long_model, tmp_path) as eng:
        other_solo = eng.generate(other_prompt, max_new_tokens=12).token_ids
        victim = eng.stream(victim_prompt, max_new_tokens=LONG, ignore_eos=True)
        other = eng.stream(other_prompt, max_new_tokens=12)
        seen: list[int] = []
        first = threading.Event()
        other_ids: list[int] = []

        def cancel() -> None:
            assert first.wait(JOIN_S)
            victim.cancel()

        _run_threads([_cancel_after_first_piece(victim, seen, first), cancel,
                      lambda: other_ids.extend(p.token_id for p in other if p.token_id is not None)])
        res = victim.results[0]
        assert res.finish_reason == "cancelled" and 1 <= len(res.token_ids) < LONG and res.token_ids == seen
        assert eng.generate(victim_prompt, max_new_tokens=len(seen), ignore_eos=True).token_ids == seen
        assert other_ids == other.results[0].token_ids == other_solo
        assert eng.generate(other_prompt, max_new_tokens=12).token_ids == other_solo   # the engine still serves


@pytest.mark.parametrize("kind", ["resident", "streamed"])
def test_a_stream_cancelled_from_another_thread_frees_its_kv(long_model: Path, tmp_path: Path, kind: str) -> None:
    with placements.load(kind, long_model, tmp_path / "offload") as eng:
        idle = eng.kv_stats()
        assert idle["live_sequences"] == 0 and idle["device_allotted_bytes"] == 0
        stream = eng.stream(random_prompt(70, seed=9), max_new_tokens=LONG, ignore_eos=True)
        seen: list[int] = []
        first, checked = threading.Event(), threading.Event()
        live: dict[str, Any] = {}

        def cancel() -> None:
            assert first.wait(JOIN_S)
            live.update(eng.kv_stats())          # while the stream runs: one live sequence holding device KV
            stream.cancel()
            checked.set()

        _run_threads([_cancel_after_first_piece(stream, seen, first), cancel])
        assert checked.is_set() and stream.results[0].finish_reason == "cancelled"
        assert live["live_sequences"] == 1 and live["device_allotted_bytes"] > 0, live
        after = eng.kv_stats()
        assert after["live_sequences"] == after["waiting_sequences"] == 0, after
        assert after["device_allotted_bytes"] == after["host_allotted_bytes"] == 0, after
