"""Ragged batches are exact: each sequence of a batch gets exactly the tokens it gets alone.

Prompts of 7, 70 and 23 tokens (10x apart) on tiny fp32 models of every supported architecture
(``conftest.ARCH_VARIANTS``), with the weights resident or streamed from disk, with exact KV over
device, host and disk, and with sparse KV (``placements``). An EOS token is chosen so that the
short prompt stops after a few tokens while the others run to ``max_new_tokens``: sequences finish
at different steps. With the step scheduler the sequences share every layer pass (per-sequence
positions, KV lengths, RoPE, windows); without it they run one after another: either way each must
equal its solo run. Further cases join a request while another decodes, cancel one mid-way, and
give sequences their own sampling parameters and seeds.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

import placements
import tierkv
from conftest import ARCH_VARIANTS
from placements import PLACEMENTS, random_prompt, spilled_kv

pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")

LENGTHS = (7, 70, 23)
NEW = 12
PROMPTS = [random_prompt(n, seed=100 + i) for i, n in enumerate(LENGTHS)]

MATRIX = [pytest.param(v, p, id=f"{v}-{p}") for v in ARCH_VARIANTS for p in PLACEMENTS]   # ~10 s in all


def _pick_eos(outputs: list[list[int]]) -> int:
    """A token the first sequence produces at step 2..6 and no sequence produces before (nor the others at all)."""
    first, others = outputs[0], {t for out in outputs[1:] for t in out}
    for k in range(2, 7):
        if first[k] not in first[:k] and first[k] not in others:
            return first[k]
    raise AssertionError(f"no token of {first} stops the first sequence alone; pick other prompts")


@pytest.fixture(scope="module")
def eos_dirs(tiny_model_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """eos_dirs(variant) -> (checkpoint whose EOS stops the 7-token prompt early, each prompt's resident
    greedy tokens there). Built once per variant."""
    made: dict[str, tuple[Path, list[list[int]]]] = {}

    def _get(variant: str) -> tuple[Path, list[list[int]]]:
        if variant not in made:
            src = tiny_model_dir(variant)
            with tierkv.load(src, device="cpu", dtype="float32", kv="exact") as eng:
                free = [eng.generate(p, max_new_tokens=NEW, ignore_eos=True).token_ids for p in PROMPTS]
            eos = _pick_eos(free)
            path = Path(shutil.copytree(src, tmp_path_factory.mktemp(f"eos-{variant}") / "model"))
            (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
            expected = [out[:out.index(eos) + 1] if eos in out else out for out in free]
            assert len(expected[0]) < NEW == len(expected[1]) == len(expected[2])
            made[variant] = (path, expected)
        return made[variant]

    return _get


@pytest.mark.parametrize("variant, kind", MATRIX)
def test_each_sequence_of_a_ragged_batch_gets_its_solo_tokens(eos_dirs: Callable[[str], Any], tmp_path: Path,
                                                              variant: str, kind: str) -> None:
    model, resident = eos_dirs(variant)
    with placements.load(kind, model, tmp_path / "offload") as eng:
        solo = [eng.generate(p, max_new_tokens=NEW) for p in PROMPTS]
        batch = eng.generate(PROMPTS, max_new_tokens=NEW)
    assert [r.prompt_token_ids for r in batch] == PROMPTS
    assert [r.token_ids for r in batch] == [r.token_ids for r in solo]
    assert [r.finish_reason for r in batch] == [r.finish_reason for r in solo]
    windowed = all(w is not None for w in eng.config.sliding_window_tokens)
    if kind == "sparse" and not windowed:   # (sliding-window layers always attend exactly over their window)
        assert any(r.stats.kv.get("sparse_layer_steps", 0) > 0 for r in batch), [r.stats.kv for r in batch]
        # each sequence's selections are its solo ones: the same chunks, steps and selected share
        keys = ("chunk_tokens", "sparse_layer_steps", "selected_fraction", "sparse_union_tokens", "bytes_read_per_step")
        assert [{k: r.stats.kv.get(k) for k in keys} for r in batch] == \
            [{k: r.stats.kv.get(k) for k in keys} for r in solo]
    if kind != "sparse":                     # exact placements give the resident engine's tokens
        assert [r.token_ids for r in solo] == resident
        assert [r.finish_reason for r in batch] == ["stop", "length", "length"]   # they finish at different steps
    if kind in ("tiered", "sparse"):         # the 70-token sequence's KV spilled to host and disk
        assert spilled_kv([r.stats.kv for r in batch]), [r.stats.kv for r in batch]


def test_streaming_a_ragged_batch_yields_each_sequences_solo_pieces(eos_dirs: Callable[[str], Any],
                                                                    tmp_path: Path) -> None:
    model, resident = eos_dirs("llama")
    with placements.load("resident", model, tmp_path) as eng:
        stream = eng.stream(PROMPTS, max_new_tokens=NEW)
        pieces = list(stream)
    for i, expected in enumerate(resident):
        assert [p.token_id for p in pieces if p.index == i and p.token_id is not None] == expected
        assert stream.results[i].token_ids == expected


@pytest.mark.parametrize("kind", ["resident", "streamed"])
def test_a_ragged_batch_shares_every_step(eos_dirs: Callable[[str], Any], tmp_path: Path, kind: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On the step scheduler the three prompts of one generate() call run together, not one after
    another: far fewer layer passes than the three solo runs took, and each shared steps."""
    from tierkv.runner import Runner

    model, resident = eos_dirs("llama")
    passes: list[int] = []
    forward = Runner.forward
    monkeypatch.setattr(Runner, "forward", lambda self, feeds, rows: passes.append(len(feeds)) or
                        forward(self, feeds, rows))
    with placements.load(kind, model, tmp_path / "offload") as eng:
        for p in PROMPTS:
            eng.generate(p, max_new_tokens=NEW)
        solo_passes, passes[:] = len(passes), []
        batch = eng.generate(PROMPTS, max_new_tokens=NEW)
    assert [r.token_ids for r in batch] == resident
    assert all(r.stats.batch_size >= 2 for r in batch)
    assert 3 * len(passes) <= 2 * solo_passes, (len(passes), solo_passes)   # solo: one pass per piece or token each


# -- requests joining and leaving between steps (engine.submit / engine.step) ----------------------------------


def _drive(engine: tierkv.Engine, requests: list[Any], limit: int = 2000) -> None:
    """Step the engine until nothing is live or waiting; every request must then be done."""
    for _ in range(limit):
        if engine.step() == 0:
            break
    else:
        raise AssertionError(f"{limit} steps and still live sequences")
    assert all(r.done for r in requests)


@pytest.mark.parametrize("variant, kind", [("llama", "resident"), ("mistral-window", "tiered"),
                                           ("qwen3-qknorm", "streamed"),
                                           ("llama-dynamic-rope", "sparse")])
def test_a_request_joining_while_another_decodes_gets_its_solo_tokens(tiny_model_dir: Callable[..., Path],
                                                                      tmp_path: Path, variant: str, kind: str) -> None:
    short, long = PROMPTS[0], PROMPTS[1]
    with placements.load(kind, tiny_model_dir(variant), tmp_path / "offload") as eng:
        solo_short = eng.generate(short, max_new_tokens=20, ignore_eos=True).token_ids
        solo_long = eng.generate(long, max_new_tokens=6, ignore_eos=True).token_ids
        first = eng.submit(short, max_new_tokens=20, ignore_eos=True)
        for _ in range(4):                       # the short prompt is prefilled and decoding
            assert eng.step() == 1
        assert not first.done
        joined = eng.submit(long, max_new_tokens=6, ignore_eos=True)   # its prefill pieces run beside the decode
        _drive(eng, [first, joined])
        assert first.result.token_ids == solo_short and joined.result.token_ids == solo_long
        assert first.result.finish_reason == joined.result.finish_reason == "length"
        # the joined prompt's pieces ran beside the first one's decode steps, unless the KV room holds only
        # one of them (the tiered placements keep the planner's floor: one sequence at the full context)
        room, kv_room = eng.kv_stats()["device_room_bytes"], eng._core.room
        both = room is None or kv_room.want_bytes(len(short) + 19) + kv_room.minimum_bytes(len(long) + 5) <= room
        assert joined.result.stats.batch_size == first.result.stats.batch_size == (2 if both else 1)
        assert eng.kv_stats()["live_sequences"] == 0


@pytest.mark.parametrize("kind", ["resident", "tiered"])
def test_a_sequence_cancelled_mid_way_leaves_the_others_exact(tiny_model_dir: Callable[..., Path], tmp_path: Path,
                                                             kind: str) -> None:
    with placements.load(kind, tiny_model_dir("llama"), tmp_path / "offload") as eng:
        solo = [eng.generate(p, max_new_tokens=16, ignore_eos=True).token_ids for p in PROMPTS]
        requests = [eng.submit(p, max_new_tokens=16, ignore_eos=True) for p in PROMPTS]
        for _ in range(8):                       # every prompt is prefilled (pieces of 16) and decoding
            eng.step()
        requests[2].cancel()
        _drive(eng, requests)
        cancelled = requests[2].result
        assert cancelled.finish_reason == "cancelled"
        assert len(cancelled.token_ids) < 16 and cancelled.token_ids == solo[2][:len(cancelled.token_ids)]
        assert [requests[i].result.token_ids for i in (0, 1)] == solo[:2]
        assert [requests[i].result.finish_reason for i in (0, 1)] == ["length", "length"]
        stats = eng.kv_stats()
        assert stats["live_sequences"] == stats["waiting_sequences"] == 0 and stats["device_allotted_bytes"] == 0


# -- per-sequence sampling --------------------------------------------------------------------------------------

SAMPLING = [dict(temperature=0.9, seed=3, max_new_tokens=14),
            dict(temperature=1.4, top_k=20, seed=11, max_new_tokens=9),
            dict(temperature=0.0, max_new_tokens=11)]


def test_threads_with_their_own_sampling_and_seeds_get_their_solo_tokens(tiny_model_dir: Callable[..., Path],
                                                                        tmp_path: Path) -> None:
    """Three threads at once, each with its own temperature/top-k/seed (and one greedy): each equals its solo
    run (on the step scheduler they share steps, each sampling from its own generator)."""
    with placements.load("resident", tiny_model_dir("qwen2-bias"), tmp_path) as eng:
        solo = [eng.generate(p, ignore_eos=True, **s).token_ids for p, s in zip(PROMPTS, SAMPLING)]
        greedy = eng.generate(PROMPTS[0], max_new_tokens=14, ignore_eos=True).token_ids
        got: dict[int, list[int]] = {}
        barrier = threading.Barrier(len(PROMPTS))

        def run(i: int) -> None:
            barrier.wait()
            got[i] = eng.generate(PROMPTS[i], ignore_eos=True, **SAMPLING[i]).token_ids

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert [got.get(i) for i in range(len(PROMPTS))] == solo
    assert solo[0] != greedy                     # the seeded sequence really sampled


def test_sequences_of_one_batch_sample_with_their_own_parameters_and_seeds(tiny_model_dir: Callable[..., Path],
                                                                         tmp_path: Path) -> None:
    with placements.load("resident", tiny_model_dir("qwen2-bias"), tmp_path) as eng:
        solo = [eng.generate(p, ignore_eos=True, **s).token_ids for p, s in zip(PROMPTS, SAMPLING)]
        requests = [eng.submit(p, ignore_eos=True, **s) for p, s in zip(PROMPTS, SAMPLING)]
        _drive(eng, requests)
        assert [r.result.token_ids for r in requests] == solo
        assert all(r.result.stats.batch_size == len(PROMPTS) for r in requests)
