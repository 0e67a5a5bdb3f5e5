"""Engine contract: prompt forms and batches, streaming, cancel, threads, stop strings, EOS, limits, stats."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

import tierkv
from conftest import build_hf_model, save_hf_model
from tierkv.config import ConfigError
from tokenizer_fixtures import word_level, write_tokenizer

torch.set_num_threads(1)

PROMPT = [5, 17, 42, 9]
WORD_PROMPT = "river tiger"      # with the word model below, greedy text has many distinct words


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    """The shared tiny Llama (vocab 211, context 256), token ids only."""
    eng = tierkv.load(tiny_llama_dir, dtype="float32", device="cpu")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def word_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose vocabulary is a WordLevel tokenizer's: every token is a clean ASCII word."""
    tok = word_level()
    path = save_hf_model(build_hf_model("llama", vocab_size=tok.get_vocab_size()), tmp_path_factory.mktemp("word"))
    return write_tokenizer(path, tok, add_bos_token=False)


@pytest.fixture(scope="module")
def word_engine(word_dir):
    eng = tierkv.load(word_dir, dtype="float32", device="cpu")
    yield eng
    eng.close()


def collect(stream) -> tuple[str, list[int], list]:
    pieces = list(stream)
    return "".join(p.text for p in pieces), [p.token_id for p in pieces if p.token_id is not None], pieces


# -- prompt forms and batches ----------------------------------------------------------------------
def test_generate_token_ids_and_string(engine, word_engine) -> None:
    res = engine.generate(PROMPT, max_new_tokens=6)
    assert isinstance(res, tierkv.GenerationResult)
    assert len(res.token_ids) == 6 and res.finish_reason == "length" and res.prompt_token_ids == PROMPT
    assert res.text == ""                                      # no tokenizer: ids only
    text = word_engine.generate(WORD_PROMPT, max_new_tokens=6)
    assert text.prompt_token_ids == word_engine.tokenizer.encode(WORD_PROMPT)
    assert text.text == word_engine.tokenizer.decode(text.token_ids) and text.text
    assert engine.generate(tuple(PROMPT), max_new_tokens=6).token_ids == res.token_ids


def test_batch_equal_and_unequal_lengths_in_order(engine) -> None:
    prompts = [[7, 8, 9], [1, 2, 3, 4, 5, 6], [10, 11, 12], [200]]
    singles = [engine.generate(p, max_new_tokens=7).token_ids for p in prompts]
    batch = engine.generate(prompts, max_new_tokens=7)
    assert isinstance(batch, list) and [r.prompt_token_ids for r in batch] == prompts
    assert [r.token_ids for r in batch] == singles
    equal = engine.generate([[7, 8, 9], [10, 11, 12]], max_new_tokens=7)
    assert [r.token_ids for r in equal] == [singles[0], singles[2]]
    assert equal[0].stats.batch_size == 2
    assert len(engine.generate([PROMPT], max_new_tokens=2)) == 1  # a one-element batch is still a batch


def test_batch_of_strings(word_engine) -> None:
    prompts = ["apple banana", "river tiger sunset", "hello world"]
    batch = word_engine.generate(prompts, max_new_tokens=5)
    assert [r.text for r in batch] == [word_engine.generate(p, max_new_tokens=5).text for p in prompts]


# -- streaming -------------------------------------------------------------------------------------
def test_stream_matches_result(word_engine) -> None:
    stream = word_engine.stream(WORD_PROMPT, max_new_tokens=12)
    text, ids, pieces = collect(stream)
    res = stream.results[0]
    assert text == res.text and ids == res.token_ids and len(ids) == 12
    assert res.token_ids == word_engine.generate(WORD_PROMPT, max_new_tokens=12).token_ids
    assert all(isinstance(p, tierkv.Piece) and p.index == 0 for p in pieces)


def test_stream_batch_pieces_are_indexed(word_engine) -> None:
    prompts = ["apple banana", "river tiger sunset", "hello world"]
    stream = word_engine.stream(prompts, max_new_tokens=4)
    pieces = list(stream)
    for i, res in enumerate(stream.results):
        mine = [p for p in pieces if p.index == i]
        assert "".join(p.text for p in mine) == res.text
        assert [p.token_id for p in mine if p.token_id is not None] == res.token_ids


def test_stream_consumer_code_runs_outside_inference_mode(engine) -> None:
    """The engine's inference mode must not leak into the caller's loop body between pieces."""
    w = torch.ones(3, requires_grad=True)
    for _ in engine.stream(PROMPT, max_new_tokens=3):
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
        (w * 2).sum().backward()                                 # autograd still works in the loop
    assert w.grad is not None and w.grad.tolist() == [6.0, 6.0, 6.0]


def test_cancel_from_another_thread_stops_the_stream(engine) -> None:
    stream = engine.stream(PROMPT, max_new_tokens=200)
    seen: list[int] = []
    first, cancelled = threading.Event(), threading.Event()

    def consume() -> None:
        for piece in stream:
            seen.append(piece.token_id)
            first.set()
            cancelled.wait(10)

    worker = threading.Thread(target=consume)
    worker.start()
    assert first.wait(10)
    canceller = threading.Thread(target=stream.cancel)
    canceller.start()
    canceller.join()
    cancelled.set()
    worker.join(10)
    assert not worker.is_alive()
    res = stream.results[0]
    assert res.finish_reason == "cancelled"
    assert len(res.token_ids) == len(seen) == 1
    # the engine is usable afterwards (the stream released the lock)
    assert len(engine.generate(PROMPT, max_new_tokens=3).token_ids) == 3


def test_cancel_stops_every_sequence_of_an_unequal_batch(engine) -> None:
    """Unequal prompts decode together; after cancel no sequence samples again: the stream yields
    only the tokens already produced in that step, and every result is cancelled with its own tokens."""
    stream = engine.stream([[1, 2, 3], [4, 5], [6, 7, 8, 9]], max_new_tokens=20)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) == 4:            # the second step's first token
            stream.cancel()
    assert [p.index for p in pieces] == [0, 1, 2, 0, 1, 2]
    assert [(len(r.token_ids), r.finish_reason) for r in stream.results] == [(2, "cancelled")] * 3
    assert [r.prompt_token_ids for r in stream.results] == [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert [r.token_ids for r in stream.results] == [[p.token_id for p in pieces if p.index == i] for i in range(3)]
    assert engine.kv_stats()["live_sequences"] == 0


def test_closing_a_stream_early_releases_the_engine(engine) -> None:
    stream = engine.stream(PROMPT, max_new_tokens=50)
    next(stream)
    stream.close()
    done = []
    t = threading.Thread(target=lambda: done.append(engine.generate(PROMPT, max_new_tokens=2)))
    t.start()
    t.join(20)
    assert done and len(done[0].token_ids) == 2


def test_concurrent_generate_matches_sequential(engine) -> None:
    jobs = [dict(prompts=PROMPT, max_new_tokens=20, temperature=1.5, seed=1),
            dict(prompts=[[3, 4], [5, 6], [7, 8, 9]], max_new_tokens=15),
            dict(prompts=[9, 9, 9], max_new_tokens=20, temperature=0.8, top_k=10, seed=2)]

    def run(job: dict):
        job = dict(job)
        out = engine.generate(job.pop("prompts"), **job)
        return [r.token_ids for r in out] if isinstance(out, list) else out.token_ids

    sequential = [run(j) for j in jobs]
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(jobs) * 2)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = run(jobs[i % len(jobs)])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs) * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(threads))] == sequential * 2


# -- stop strings ----------------------------------------------------------------------------------
def _greedy_pieces(eng, n: int = 16) -> tuple[str, list[str], list[int]]:
    text, ids, pieces = collect(eng.stream(WORD_PROMPT, max_new_tokens=n))
    return text, [p.text for p in pieces if p.token_id is not None], ids


def test_stop_string_spanning_tokens(word_engine) -> None:
    full, texts, ids = _greedy_pieces(word_engine)
    # a stop string made of the end of token 3's text and the start of token 4's
    stop = texts[3][-2:] + texts[4][:3]
    assert texts[3].strip() and texts[4].startswith(" ")
    cut = full.find(stop)
    n_tokens = next(n for n in range(1, len(ids) + 1) if stop in word_engine.tokenizer.decode(ids[:n]))

    stream = word_engine.stream(WORD_PROMPT, max_new_tokens=16, stop=stop)
    streamed, streamed_ids, pieces = collect(stream)
    res = stream.results[0]
    assert res.text == full[:cut] and res.finish_reason == "stop"
    assert streamed == res.text and stop not in streamed
    assert all(stop not in p.text for p in pieces)
    assert streamed_ids == res.token_ids == ids[:n_tokens]
    assert word_engine.generate(WORD_PROMPT, max_new_tokens=16, stop=[stop]).text == full[:cut]


def test_earliest_of_several_stop_strings_wins(word_engine) -> None:
    full, texts, _ = _greedy_pieces(word_engine)
    late, early = texts[6].strip(), texts[2].strip()
    res = word_engine.generate(WORD_PROMPT, max_new_tokens=16, stop=[late, early])
    assert res.text == full[:min(full.find(late), full.find(early))] and res.finish_reason == "stop"


def test_partial_stop_match_is_released(word_engine) -> None:
    """Text held back because it could begin a stop string comes out once it cannot (or at the end)."""
    full, texts, ids = _greedy_pieces(word_engine)
    stops = [texts[2][-1] + "#", full[-1] + "@", "Q"]
    stream = word_engine.stream(WORD_PROMPT, max_new_tokens=16, stop=stops)
    streamed, streamed_ids, _ = collect(stream)
    res = stream.results[0]
    assert res.text == streamed == full and res.finish_reason == "length" and streamed_ids == ids


def test_stop_string_found_in_first_token(word_engine) -> None:
    full, texts, _ = _greedy_pieces(word_engine)
    res = word_engine.generate(WORD_PROMPT, max_new_tokens=16, stop=texts[0])
    assert res.text == "" and res.finish_reason == "stop" and len(res.token_ids) == 1


# -- EOS, lengths, limits --------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def test_eos_from_generation_config_stops(engine, tiny_llama_dir, tmp_path) -> None:
    greedy = engine.generate(PROMPT, max_new_tokens=12).token_ids
    pos = next(i for i in range(2, len(greedy)) if greedy[i] not in greedy[:i])
    eos = greedy[pos]
    path = _copy(tiny_llama_dir, tmp_path / "m")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    with tierkv.load(path, device="cpu") as eng:
        assert eos in eng.eos_token_ids
        res = eng.generate(PROMPT, max_new_tokens=12)
        assert res.token_ids == greedy[:pos + 1] and res.finish_reason == "stop"
        assert res.stats.new_tokens == pos + 1
        ignored = eng.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
        assert ignored.token_ids == greedy and ignored.finish_reason == "length"
        batch = eng.generate([PROMPT, [1, 2, 3, 4]], max_new_tokens=12)  # one sequence stops early in a batch
        assert batch[0].token_ids == greedy[:pos + 1]
        assert batch[1].token_ids == engine.generate([1, 2, 3, 4], max_new_tokens=12).token_ids[:len(batch[1].token_ids)]


def test_eos_from_config_json_stops(engine, tiny_llama_dir, tmp_path) -> None:
    greedy = engine.generate(PROMPT, max_new_tokens=12).token_ids
    pos = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    path = _copy(tiny_llama_dir, tmp_path / "m")
    (path / "generation_config.json").unlink()
    raw = json.loads((path / "config.json").read_text())
    raw["eos_token_id"] = greedy[pos]
    (path / "config.json").write_text(json.dumps(raw))
    with tierkv.load(path, device="cpu") as eng:
        res = eng.generate(PROMPT, max_new_tokens=12)
    assert res.token_ids == greedy[:pos + 1] and res.finish_reason == "stop"


def test_max_new_tokens_zero(engine, word_engine) -> None:
    res = engine.generate(PROMPT, max_new_tokens=0)
    assert (res.token_ids, res.text, res.finish_reason, res.stats.new_tokens) == ([], "", "length", 0)
    assert list(word_engine.stream(WORD_PROMPT, max_new_tokens=0)) == []


def test_generation_stops_at_the_context_limit(make_checkpoint) -> None:
    model, path = make_checkpoint("llama", max_position_embeddings=16)
    with tierkv.load(path, device="cpu") as eng:
        assert eng.context_limit_tokens == 16
        prompt = list(range(20, 32))                                  # 12 tokens
        res = eng.generate(prompt, max_new_tokens=50)
        assert res.finish_reason == "length"
        # every position fed to the model lies inside the context: the last new token is never fed back
        assert len(prompt) + len(res.token_ids) - 1 == 16
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=len(res.token_ids), do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        assert res.token_ids == ref[0, len(prompt):].tolist()
        full = eng.generate(list(range(20, 36)), max_new_tokens=5)   # a prompt filling the context
        assert len(full.token_ids) == 1 and full.finish_reason == "length"
        with pytest.raises(ValueError, match=r"17 tokens.*at most 16.*shorten"):
            eng.generate(list(range(20, 37)), max_new_tokens=5)


def test_stats(engine) -> None:
    res = engine.generate(PROMPT, max_new_tokens=10)
    s = res.stats
    assert s.prefill_s > 0 and s.decode_s > 0 and s.decode_tok_s > 0 and s.peak_rss_bytes > 2**20
    assert (s.new_tokens, s.prompt_tokens, s.batch_size) == (10, len(PROMPT), 1)
    assert s.weights["device_weight_bytes"] > 0
    d = res.to_dict()
    assert json.loads(json.dumps(d))["stats"]["new_tokens"] == 10 and d["prompt_tokens"] == len(PROMPT)


def test_close_then_generate_raises(tiny_llama_dir) -> None:
    eng = tierkv.load(tiny_llama_dir)
    assert eng.generate(PROMPT, max_new_tokens=2).token_ids
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.generate(PROMPT, max_new_tokens=2)
    with pytest.raises(RuntimeError, match="closed"):
        list(eng.stream(PROMPT, max_new_tokens=2))
    with tierkv.load(tiny_llama_dir) as eng2:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        eng2.generate(PROMPT)


# -- bad prompts -----------------------------------------------------------------------------------
def test_prompt_longer_than_context(engine) -> None:
    with pytest.raises(ValueError, match=r"257 tokens.*at most 256.*max_position_embeddings"):
        engine.generate([5] * 257)


@pytest.mark.parametrize("bad", [211, 10_000, -1])
def test_token_ids_outside_vocab(engine, bad: int) -> None:
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary \(0\.\.210\)"):
        engine.generate([1, bad, 2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, 2], [3, bad]])


def test_empty_prompts(engine, word_engine) -> None:
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[1, 2], []])
    with pytest.raises(ValueError, match="no prompts"):
        engine.generate([])
    with pytest.raises(ValueError, match="empty"):
        word_engine.generate("")                                   # no BOS configured: nothing to feed


def test_text_prompt_without_tokenizer(engine) -> None:
    with pytest.raises(ConfigError, match=r"no tokenizer\.json.*token ids"):
        engine.generate("hello")
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        engine.stream(["hello", "world"])


@pytest.mark.parametrize("device", ["nonsense", f"cuda:{torch.cuda.device_count()}"])
def test_unusable_device_is_a_clear_error(tiny_llama_dir, device: str) -> None:
    with pytest.raises(ValueError, match=f"device '{device}'.*use"):
        tierkv.load(tiny_llama_dir, device=device)


def test_same_thread_generate_while_a_stream_is_open_serves_both(engine) -> None:
    """Callers drive the steps themselves, so a thread holding an unfinished stream may generate:
    both sequences share the steps and each gets its solo tokens."""
    solo = engine.generate(PROMPT, max_new_tokens=5).token_ids
    stream = engine.stream(PROMPT, max_new_tokens=5)
    first = next(stream)
    assert engine.generate(PROMPT, max_new_tokens=2).token_ids == solo[:2]
    assert [first.token_id] + [p.token_id for p in stream if p.token_id is not None] == solo
    assert stream.results[0].stats.batch_size == 2


def test_numpy_and_tensor_prompts_are_token_ids(engine) -> None:
    import numpy as np

    ids = engine.encode(PROMPT)
    expected = engine.generate(ids, max_new_tokens=4).token_ids
    assert engine.generate(np.array(ids), max_new_tokens=4).token_ids == expected
    assert engine.generate(torch.tensor(ids), max_new_tokens=4).token_ids == expected
    assert engine.generate(torch.tensor([ids, ids]), max_new_tokens=4)[1].token_ids == expected


def test_prefill_goes_in_the_planned_pieces_and_reports_progress(tiny_llama_dir) -> None:
    seen: list[tuple[int, int]] = []
    eng = tierkv.load(tiny_llama_dir, dtype="float32", device="cpu", prefill_chunk_tokens=7,
                      prefill_progress=lambda done, total: seen.append((done, total)))
    assert eng.plan is not None and eng.plan.prefill_chunk_tokens == eng.prefill_chunk_tokens == 7
    ids = list(range(3, 23))
    pieces = eng.generate(ids, max_new_tokens=4).token_ids
    assert seen == [(7, 20), (14, 20), (20, 20)]
    whole = tierkv.load(tiny_llama_dir, dtype="float32", device="cpu")
    assert whole.prefill_chunk_tokens == whole.plan.prefill_chunk_tokens == 2048   # auto: the budget is ample
    assert whole.generate(ids, max_new_tokens=4).token_ids == pieces
    eng.close()
    whole.close()


def test_every_step_stays_within_the_activation_reserve(engine, monkeypatch) -> None:
    """The step's token budget fits the plan's one-piece reserve (with a logits row per sequence);
    a ragged batch's steps never exceed it, and prefill pieces are never cut to fit (each piece is
    the plan's piece or the prompt's last remainder), so a sequence's pieces are its solo ones."""
    from tierkv.engine import step_limits
    from tierkv.plan import activation_bytes
    from tierkv.runner import Runner

    piece = 16
    eng = tierkv.load(engine.model_dir, dtype="float32", device="cpu", prefill_chunk_tokens=piece)
    limits, _ = step_limits(eng.config, eng.dtype, eng.policy, eng.plan, piece, eng.attention_scratch_bytes)
    context = min(4096, eng.config.max_position_embeddings)
    cost = activation_bytes(eng.config, eng.dtype, limits.token_budget, eng.attention_scratch_bytes, context, 1,
                            policy=eng.policy)
    assert limits.token_budget == piece or cost + 8 * eng.config.vocab_size * (limits.max_running - 1) <= \
        max(eng.plan.activation_bytes, activation_bytes(eng.config, eng.dtype, piece, eng.attention_scratch_bytes,
                                                        context, 1, policy=eng.policy))
    steps: list[list[int]] = []
    forward = Runner.forward

    def spy(self, feeds, head_rows):
        steps.append([len(f.ids) for f in feeds])
        return forward(self, feeds, head_rows)

    monkeypatch.setattr(Runner, "forward", spy)
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 23)]
    outs = eng.generate(prompts, max_new_tokens=6)
    monkeypatch.undo()
    assert all(sum(rows) <= limits.token_budget for rows in steps)
    assert all(n in (1, piece, 40 % piece, 23 % piece, 5) for rows in steps for n in rows), steps
    assert [o.token_ids for o in outs] == [eng.generate(p, max_new_tokens=6).token_ids for p in prompts]
    assert max(o.stats.batch_size for o in outs) == 3
    eng.close()
