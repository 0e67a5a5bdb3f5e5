"""The prompt cache (``cache_prompt=True``): a request starting with a cached prefix prefills only the
rest and gets the same tokens as without the cache; entries are evicted oldest first within
``prompt_cache_tokens``, shared prefixes are never handed to two sequences at once, and with
``sessions_dir`` the entries survive the engine (files of another model or damaged ones are skipped).

Every oracle is the same request without the cache (greedy, fp32). Cases run with resident KV and with
KV tiered over device, host and disk (``placements``), where idle entries leave the device room.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

import tierkv
from placements import placement_kwargs, random_prompt

pytestmark = [pytest.mark.usefixtures("torch_kernels_one_thread")]

REPLY = dict(max_new_tokens=6, ignore_eos=True)
KINDS = ["resident", "tiered"]


@pytest.fixture
def model(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


def _load(kind: str, model: Path, tmp_path: Path, **kwargs: Any) -> tierkv.Engine:
    return tierkv.load(model, **placement_kwargs(kind, model, tmp_path / "offload"), **kwargs)


def _check(eng: tierkv.Engine, prompt: list[int], cached: int) -> tierkv.GenerationResult:
    """One cache_prompt request: its tokens equal the uncached request's and ``cached`` prompt tokens were reused."""
    expected = eng.generate(prompt, **REPLY).token_ids
    out = eng.generate(prompt, cache_prompt=True, **REPLY)
    assert out.token_ids == expected
    assert out.stats.cached_prompt_tokens == cached and out.stats.prefill_tokens == len(prompt) - cached, out.stats
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_hits_reuse_the_prefix_and_give_the_same_tokens(model: Path, tmp_path: Path, kind: str) -> None:
    first, later, other = random_prompt(30, seed=1), random_prompt(7, seed=2), random_prompt(20, seed=3)
    with _load(kind, model, tmp_path, prompt_cache_tokens=512) as eng:
        one = _check(eng, first, 0)                                      # a miss: nothing cached yet
        turn = first + one.token_ids                                     # the whole prompt but one token is cached
        two = _check(eng, turn, len(turn) - 1)
        assert eng.prompt_cache_stats()["entries"] == 1                  # the longer entry replaced the shorter
        chat = turn + two.token_ids + later                              # a second turn: history + new tokens
        _check(eng, chat, len(turn) + len(two.token_ids) - 1)
        _check(eng, other, 0)                                            # a miss beside the entries
        _check(eng, first[:12] + other[:9], 12)                          # part of an entry: a copy of its prefix
        stats = eng.prompt_cache_stats()
        assert stats["entries"] == 3 and stats["in_use"] == 0
        assert (stats["hits"], stats["misses"]) == (3, 2) and stats["hit_tokens"] == len(chat) - len(later) - 1 + \
            len(turn) - 1 + 12
        kv = eng.kv_stats()
        assert kv["sessions"] == 0 and kv["prompt_cache_entries"] == 3 and kv["live_sequences"] == 0
        if kind == "tiered":                        # the idle entries do not all fit the device room: moved off
            assert kv["parked_on_host"] + kv["parked_on_disk"] >= 1, kv


def test_the_oldest_entries_are_evicted_beyond_prompt_cache_tokens(model: Path, tmp_path: Path) -> None:
    prompts = [random_prompt(20, seed=10 + i) for i in range(4)]
    with _load("resident", model, tmp_path, prompt_cache_tokens=60) as eng:
        for p in prompts:
            eng.generate(p, cache_prompt=True, **REPLY)
        stats = eng.prompt_cache_stats()
        assert stats["tokens"] <= 60 and stats["entries"] == 2 and stats["evictions"] == 2, stats
        _check(eng, prompts[0] + [5], 0)                                 # evicted: a miss
        _check(eng, prompts[3] + [5], 20)                                # the newest is still there
        assert eng.kv_stats()["parked_sessions"] == eng.prompt_cache_stats()["entries"]
    with pytest.raises(tierkv.ArgumentError, match="prompt_cache_tokens"):
        _load("resident", model, tmp_path, prompt_cache_tokens=-1)


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_requests_sharing_a_prefix_each_get_their_own_tokens(model: Path, tmp_path: Path,
                                                                        kind: str) -> None:
    """Three requests extend one entry at once: one takes the entry, the others copy or miss; each
    equals its uncached run, and the entry is never fed by two sequences."""
    base = random_prompt(24, seed=20)
    tails = [random_prompt(5, seed=21 + i) for i in range(3)]
    with _load(kind, model, tmp_path, prompt_cache_tokens=512) as eng:
        first = eng.generate(base, cache_prompt=True, **REPLY)
        shared = base + first.token_ids
        prompts = [shared + t for t in tails] + [base[:10] + tails[0]]
        expected = [eng.generate(p, **REPLY).token_ids for p in prompts]
        streams = [eng.submit(p, cache_prompt=True, **REPLY) for p in prompts]
        assert eng.prompt_cache_stats()["in_use"] == 1
        pieces: list[list[int]] = [[] for _ in streams]
        live = list(range(len(streams)))
        while live:                                                      # interleave the readers
            for i in list(live):
                piece = next(streams[i], None)
                if piece is None:
                    live.remove(i)
                elif piece.token_id is not None:
                    pieces[i].append(piece.token_id)
        assert pieces == expected and [s.result.token_ids for s in streams] == expected
        cached = [s.result.stats.cached_prompt_tokens for s in streams]
        assert cached == [len(shared) - 1] * 3 + [10], cached      # one moved the entry, two copied from it
        assert eng.prompt_cache_stats()["in_use"] == 0
        batch = eng.generate([shared + tails[1], shared + tails[2]], cache_prompt=True, **REPLY)  # one batch
        assert [r.token_ids for r in batch] == expected[1:3]


@pytest.mark.parametrize("kind", KINDS)
def test_sessions_dir_keeps_the_cache_for_a_new_engine(model: Path, tmp_path: Path, kind: str) -> None:
    cache_dir = tmp_path / "cache"
    prompt = random_prompt(30, seed=30)
    with _load(kind, model, tmp_path, sessions_dir=cache_dir) as eng:
        first = eng.generate(prompt, cache_prompt=True, **REPLY)
        files = sorted(cache_dir.glob("prompt-*.tkvs"))
        assert len(files) == 1                                           # written as soon as it was made
        assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]   # no temp file left
        assert eng.save_prompt_cache() == 0                              # nothing left to write
    chat = prompt + first.token_ids + random_prompt(5, seed=31)
    (cache_dir / "prompt-damaged.tkvs").write_bytes(files[0].read_bytes()[:-9])
    with pytest.warns(RuntimeWarning, match="prompt cache file skipped"):
        later = _load(kind, model, tmp_path, sessions_dir=cache_dir)
    with later:
        assert later.prompt_cache_stats()["entries"] == 1
        _check(later, chat, len(prompt) + len(first.token_ids) - 1)
        names = {p.name for p in cache_dir.glob("prompt-*.tkvs")}
        assert files[0].name not in names and len(names) == 2           # the extended entry replaced its file
    with pytest.raises(tierkv.ArgumentError, match="sessions_dir"):
        with _load(kind, model, tmp_path / "no-dir") as plain:
            plain.save_prompt_cache()


def test_another_models_cache_files_are_skipped(tiny_model_dir: Callable[..., Path], model: Path,
                                                tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    with _load("resident", model, tmp_path, sessions_dir=cache_dir) as eng:
        eng.generate(random_prompt(20, seed=40), cache_prompt=True, **REPLY)
    other = tiny_model_dir("llama", seed=1)
    with pytest.warns(RuntimeWarning, match="another model|fingerprint"):
        foreign = _load("resident", other, tmp_path / "other", sessions_dir=cache_dir)
    with foreign:
        assert foreign.prompt_cache_stats()["entries"] == 0
        assert len(list(cache_dir.glob("prompt-*.tkvs"))) == 1          # left for its own model


def test_a_cache_file_deleted_under_the_engine_means_a_full_prefill(model: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    prompt = random_prompt(24, seed=50)
    with _load("resident", model, tmp_path, sessions_dir=cache_dir) as eng:
        first = eng.generate(prompt, cache_prompt=True, **REPLY)
    with _load("resident", model, tmp_path, sessions_dir=cache_dir) as later:
        for path in cache_dir.glob("prompt-*.tkvs"):
            path.unlink()                                                # the restored entry's KV is gone
        chat = prompt + first.token_ids + [7, 8]
        expected = later.generate(chat, **REPLY).token_ids
        with pytest.warns(RuntimeWarning, match="prefilled instead"):
            out = later.generate(chat, cache_prompt=True, **REPLY)
        assert out.token_ids == expected and out.stats.cached_prompt_tokens == 0
        assert out.stats.prefill_tokens == len(chat)
        _check(later, chat + out.token_ids, len(chat) + len(out.token_ids) - 1)   # and it is cached again


def test_a_cancelled_request_leaves_what_it_computed_in_the_cache(model: Path, tmp_path: Path) -> None:
    prompt = random_prompt(20, seed=60)
    with _load("resident", model, tmp_path) as eng:
        stream = eng.stream(prompt, cache_prompt=True, max_new_tokens=20, ignore_eos=True)
        got = [next(stream).token_id for _ in range(3)]
        stream.cancel()
        list(stream)
        assert stream.result.finish_reason == "cancelled"
        _check(eng, prompt + got + [9], len(prompt) + len(got) - 1)
