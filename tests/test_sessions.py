"""Sessions keep a conversation's KV between turns: same tokens as re-prefilling the whole history,
prefill of only the new tokens, save/restore round trips, and bad session files refused clearly.

Each case runs with resident KV and with KV tiered over device, host and disk (``placements``):
the 3-turn history (about 80 tokens) outgrows the tiered placement's 64-token device room. The
oracle of every turn is ``engine.generate`` on the whole history (previous prompts and replies as
token ids). A turn's prefill covers its new tokens plus the previous reply's last token, which was
sampled but never fed back; ``stats.cached_tokens`` counts the history reused from the session's KV.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import pytest

import placements
import tierkv
from placements import random_prompt

pytestmark = [pytest.mark.usefixtures("torch_kernels_one_thread")]

TURNS = [random_prompt(40, seed=300), random_prompt(9, seed=301), random_prompt(6, seed=302)]
REPLY = dict(max_new_tokens=8, ignore_eos=True)
KINDS = ["resident", "tiered"]


def _turn(session: Any, history: list[int], new: list[int], oracle: tierkv.Engine, stream: bool = False) -> Any:
    """One turn: the session's reply to ``new`` equals generate() on history + new; its stats show the
    reuse. ``history`` (the oracle's copy) is extended by the prompt and the reply."""
    before = len(history)
    history += new
    expected = oracle.generate(history, **REPLY).token_ids
    if stream:
        pieces = session.stream(new, **REPLY)
        ids = [p.token_id for p in pieces if p.token_id is not None]
        out = pieces.results[0]
        assert ids == out.token_ids
    else:
        out = session.generate(new, **REPLY)
    assert out.token_ids == expected
    if before == 0:
        assert (out.stats.prefill_tokens, out.stats.cached_tokens) == (len(new), 0)
    else:
        assert (out.stats.prefill_tokens, out.stats.cached_tokens) == (len(new) + 1, before - 1), out.stats
    history += out.token_ids
    assert session.token_ids == history
    return out


@pytest.fixture
def model(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.mark.parametrize("kind", KINDS)
def test_three_turns_equal_generate_on_the_whole_history(model: Path, tmp_path: Path, kind: str) -> None:
    with placements.load(kind, model, tmp_path / "offload") as eng:
        session = eng.session()
        assert eng.kv_stats()["sessions"] == 1
        history: list[int] = []
        for n, new in enumerate(TURNS):
            _turn(session, history, new, eng, stream=n == 1)
        assert len(history) > 64                           # beyond the tiered placement's device room
        session.close()
        stats = eng.kv_stats()
        assert stats["sessions"] == stats["live_sequences"] == 0 and stats["device_allotted_bytes"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_session_restored_by_a_new_engine_continues_with_the_same_tokens(model: Path, tmp_path: Path,
                                                                                 kind: str) -> None:
    offload = tmp_path / "offload"
    with placements.load(kind, model, offload) as eng:
        session, history = eng.session(), []
        for new in TURNS[:2]:
            _turn(session, history, new, eng)
        path = session.save()                               # default: <offload_dir>/sessions/<id>.tkvs
        assert path.is_file() and path.suffix == ".tkvs" and path.parent == offload / "sessions"
        assert [p.name for p in path.parent.iterdir()] == [path.name]   # written atomically: no temp file left
        explicit = session.save(tmp_path / "mine.tkvs")
        assert explicit == tmp_path / "mine.tkvs" and explicit.is_file()
        saved_history = list(history)
        third = _turn(session, history, TURNS[2], eng)
        session.close()
    with placements.load(kind, model, offload) as later:    # another process, same model and store
        for file in (path, explicit):
            restored = later.restore_session(file)
            assert restored.token_ids == saved_history
            replay = list(saved_history)
            again = _turn(restored, replay, TURNS[2], later)  # prefill covers only the new tokens: KV restored
            assert again.token_ids == third.token_ids and replay == history
            restored.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_truncated_session_file_is_refused_naming_the_problem(model: Path, tmp_path: Path, kind: str) -> None:
    from tierkv.session_file import SessionError

    assert issubclass(SessionError, tierkv.TierkvError)
    with placements.load(kind, model, tmp_path / "offload") as eng:
        session = eng.session()
        session.generate(TURNS[0], **REPLY)
        data = session.save(tmp_path / "whole.tkvs").read_bytes()
        session.close()
        for cut in (0, 16, len(data) // 2, len(data) - 1):
            bad = tmp_path / f"cut-{cut}.tkvs"
            bad.write_bytes(data[:cut])
            with pytest.raises(SessionError) as info:
                eng.restore_session(bad)
            message = str(info.value)
            assert bad.name in message and re.search(r"truncat|incomplete|empty|short", message, re.I), message
        assert eng.restore_session(tmp_path / "whole.tkvs").token_ids   # the intact file still restores


@pytest.mark.parametrize("kind", KINDS)
def test_a_session_file_of_another_model_is_refused_naming_the_problem(tiny_model_dir: Callable[..., Path],
                                                                      model: Path, tmp_path: Path, kind: str) -> None:
    from tierkv.session_file import SessionError

    with placements.load(kind, model, tmp_path / "offload") as eng:
        session = eng.session()
        session.generate(TURNS[0], **REPLY)
        path = session.save(tmp_path / "llama.tkvs")
        session.close()
    others = {"same shape, other weights": tiny_model_dir("llama", seed=1), "other shape": tiny_model_dir("qwen2-bias")}
    for what, other in others.items():
        with placements.load(kind, other, tmp_path / f"offload-{other.name}") as foreign:
            with pytest.raises(SessionError) as info:
                foreign.restore_session(path)
        message = str(info.value)
        assert path.name in message and re.search(r"model|checkpoint", message, re.I), (what, message)


@pytest.mark.parametrize("kind", KINDS)
def test_keep_rewinds_a_session_to_a_prefix_and_continues_exactly(model: Path, tmp_path: Path, kind: str) -> None:
    """keep(n) drops the history (and KV) after n tokens; the next turn equals generate() on the
    kept prefix plus the new tokens, prefilling only those (the prefix's KV was kept, off the cache)."""
    with placements.load(kind, model, tmp_path / "offload") as eng:
        session, history = eng.session(), []
        for new in TURNS[:2]:
            _turn(session, history, new, eng)
        cut = len(TURNS[0]) + 3                              # inside the first reply
        session.keep(cut)
        assert session.token_ids == history[:cut]
        expected = eng.generate(history[:cut] + TURNS[2], **REPLY).token_ids
        out = session.generate(TURNS[2], **REPLY)
        assert out.token_ids == expected
        assert (out.stats.prefill_tokens, out.stats.cached_tokens) == (len(TURNS[2]), cut)
        session.keep(0)                                     # nothing kept: the next turn prefills from scratch
        again = session.generate(TURNS[0], **REPLY)
        assert again.stats.cached_tokens == 0 and again.token_ids == eng.generate(TURNS[0], **REPLY).token_ids
        session.close()
        assert eng.kv_stats()["device_allotted_bytes"] == eng.kv_stats()["host_allotted_bytes"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_an_idle_session_gives_its_room_to_a_request_and_resumes_exactly(model: Path, tmp_path: Path,
                                                                         kind: str) -> None:
    """A parked session holds its cache's room until another request needs it: then its KV moves to
    the host (or disk) instead of the request waiting forever; its next turn restores it, exactly."""
    with placements.load(kind, model, tmp_path / "offload") as eng:
        session, history = eng.session(), []
        _turn(session, history, TURNS[0], eng)
        stats, room = eng.kv_stats(), eng._core.room
        other = random_prompt(50, seed=400)
        must_move = stats["device_room_bytes"] is not None and \
            stats["device_room_bytes"] - stats["device_allotted_bytes"] < room.minimum_bytes(len(other) + 7)
        assert eng.generate(other, max_new_tokens=8).token_ids        # not refused, not stuck
        moved = eng.kv_stats()["parked_on_host"] + eng.kv_stats()["parked_on_disk"]
        assert moved == int(must_move) and must_move == (kind == "tiered"), (stats, eng.kv_stats())
        _turn(session, history, TURNS[1], eng)                        # restored: only the new tokens prefilled
        session.close()


def test_an_idle_session_whose_kv_cannot_be_moved_is_reset_not_failed(model: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while an idle session's KV moves off its cache: a warning, the request that needed
    the room runs, and the session's next turn prefills its whole history (same tokens, no KV reused)."""
    import errno

    from tierkv.kvroom import KVRoom

    def full_disk(self: KVRoom, seq: Any, to: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with placements.load("tiered", model, tmp_path / "offload") as eng:
        session, history = eng.session(), []
        _turn(session, history, TURNS[0], eng)
        monkeypatch.setattr(KVRoom, "offload", full_disk)
        with pytest.warns(RuntimeWarning, match="could not be moved to .*next turn prefills its history again"):
            assert eng.generate(random_prompt(50, seed=400), max_new_tokens=8).token_ids
        monkeypatch.undo()
        history += TURNS[1]
        out = session.generate(TURNS[1], **REPLY)
        assert out.token_ids == eng.generate(history, **REPLY).token_ids
        assert (out.stats.prefill_tokens, out.stats.cached_tokens) == (len(history), 0)
        session.close()
