"""The passkey evaluation (``scripts/eval_passkey.py``): its prompts, its scoring, its report, and that
the question really goes in as decode steps (Quest's protocol), on a tiny random Llama that carries the
demo model's tokenizer and on the demo model itself. Whether keys are found is the script's measurement,
not the tests'; what is checked here is that the measurement is what it says it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import tierkv
from conftest import build_hf_model, save_hf_model
from tierkv.engine import model_path
from tierkv.tokenizer import Tokenizer
from scripts_util import load_script

DEMO = model_path("demo")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
needs_demo = pytest.mark.skipif(not (DEMO / "model.safetensors").is_file(), reason="the demo model is not bundled")


@pytest.fixture(scope="module")
def pk() -> ModuleType:
    return load_script("eval_passkey")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(DEMO)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 64, GQA 4/2) with the demo model's tokenizer and special ids."""
    model = build_hf_model("llama", vocab_size=4096, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                           pad_token_id=2)
    path = save_hf_model(model, tmp_path_factory.mktemp("passkey-tiny"))
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO / name, path / name)
    return path


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch, torch_kernels_one_thread: None) -> None:
    """Torch references of the kernels, one thread (tiny tensors)."""


def test_a_prompt_has_the_target_length_the_key_at_its_depth_and_the_question_last(pk: ModuleType,
                                                                                    tokenizer: Tokenizer) -> None:
    pieces = pk.tokenize_pieces(tokenizer)
    longest_sentence = max(len(s) for s in pieces.sentences)
    for length in (160, 333, 504):
        for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
            p = pk.build_prompt(pieces, length, depth, key=48213)
            assert len(p.ids) == length and p.ids[:1] == [tokenizer.bos_token_id]
            assert tokenizer.decode(p.question) == " " + pk.QUESTION and p.ids[-len(p.question):] == list(p.question)
            needle = tokenizer.decode(p.context[p.needle_start:p.needle_start + p.needle_tokens])
            assert needle == " The pass key is 48213. Remember it. 48213 is the pass key."
            text = tokenizer.decode(p.ids)
            assert text.startswith(pk.TASK) and text.count("48213") == 2 and text.endswith(pk.QUESTION)
            lo = len(pieces.bos) + len(pieces.task)                          # the needle lies in the filler
            hi = length - len(p.question) - p.needle_tokens
            want = min(max(depth * length, lo), hi)
            assert lo <= p.needle_start <= hi and abs(p.needle_start - want) <= longest_sentence, (length, depth)
    near = [pk.build_prompt(pieces, 504, d, key=1).needle_start for d in (0.1, 0.5, 0.9)]
    assert near == sorted(near) and near[0] < 0.2 * 504 and near[2] > 0.8 * 504


def test_prompts_that_cannot_hold_the_parts_are_refused_with_the_minimum(pk: ModuleType, tokenizer: Tokenizer) -> None:
    pieces = pk.tokenize_pieces(tokenizer)
    with pytest.raises(ValueError, match="use --lengths of at least"):
        pk.build_prompt(pieces, 20, 0.5, key=12345)
    with pytest.raises(ValueError, match="fraction"):
        pk.build_prompt(pieces, 300, 1.5, key=12345)


def test_keys_are_five_digits_fixed_by_seed_length_depth_and_trial(pk: ModuleType) -> None:
    keys = {pk.passkey(0, n, d, t) for n in (1024, 2048) for d in (0.1, 0.5) for t in range(3)}
    assert len(keys) == 12 and all(10000 <= k <= 99999 for k in keys)
    assert pk.passkey(3, 1024, 0.5, 1) == pk.passkey(3, 1024, 0.5, 1) != pk.passkey(4, 1024, 0.5, 1)


def test_scoring_counts_the_key_digits_and_compares_answers_and_tokens_with_exact(pk: ModuleType) -> None:
    p = pk.Prompt(100, 0.5, 0, 48213, (1, 2), (3,), 10, 5)
    ref = pk.Answer([7, 8, 9], " 48213. Remember")
    assert pk.score(p, ref, ref) == {"correct": True, "answer": "48213", "answer_agree": True, "tokens_agree": True}
    same_answer = pk.Answer([7, 8, 4], " 48213.\nThe")                       # other tokens after the number
    assert pk.score(p, same_answer, ref) == {"correct": True, "answer": "48213", "answer_agree": True,
                                             "tokens_agree": False}
    wrong = pk.Answer([5], " 4821 and 3")                                    # the digits, but not the key
    assert pk.score(p, wrong, ref) == {"correct": False, "answer": "4821", "answer_agree": False, "tokens_agree": False}
    assert pk.answer_of("\n\n  the sky is blue\nand") == "the sky is blue" and pk.answer_of("") == ""


def test_the_question_goes_in_as_decode_steps_and_the_kv_holds_just_the_prompt(pk: ModuleType, tiny_dir: Path,
                                                                            fast: None) -> None:
    s = pk.Settings(new_tokens=5, ignore_eos=True, device="cpu", dtype="float32", chunk_tokens=16)
    with tierkv.load(tiny_dir, **pk.engine_kwargs(tiny_dir, pk.RunConfig("exact"), s)) as engine:
        p = pk.make_prompts(engine, [200], [0.5], 1, 0, s.new_tokens)[0]
        quest, plain = pk.answer_decode(engine, p, s), pk.answer_prefill(engine, p, s)
    # exact attention: feeding the question one token at a time changes nothing (no token added or lost)
    assert len(quest.token_ids) == 5 and quest.token_ids == plain.token_ids
    sparse = pk.RunConfig("sparse", 0.1, "sketch")
    with tierkv.load(tiny_dir, **pk.engine_kwargs(tiny_dir, sparse, s)) as engine:
        kv = pk.answer_decode(engine, p, s).kv
        kv_plain = pk.answer_prefill(engine, p, s).kv
    q = len(p.question)
    assert q >= 8 and kv["decode_steps"] == q + 5 - 1 and kv_plain["decode_steps"] == 5 - 1
    assert kv["sparse_layer_steps"] == kv["decode_steps"] * 2                  # both layers, every step
    summary = pk.kv_summary(kv, 2)
    assert summary["sparse_step_share"] == 1.0 and 0 < summary["selected_fraction"] < 1


def _run(pk: ModuleType, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[dict[str, Any], str]:
    out = pk.main(list(argv))
    printed = capsys.readouterr().out
    line = json.loads(printed.strip().splitlines()[-1])
    assert line == json.loads(json.dumps(out, sort_keys=True))
    return line, printed


def test_the_report_counts_every_setting_and_a_whole_context_budget_agrees_with_exact(
        pk: ModuleType, tiny_dir: Path, tmp_path: Path, fast: None, capsys: pytest.CaptureFixture[str]) -> None:
    out, printed = _run(pk, capsys, str(tiny_dir), "--lengths", "200", "--depths", "0.1,0.9", "--budgets", "0.1,100000",
                        "--estimators", "sketch,bound", "--new-tokens", "4", "--ignore-eos", "--chunk-tokens", "16", "--device", "cpu",
                        "--dtype", "float32", "--json", str(tmp_path / "pk.json"))
    names = ["exact", "sparse 10% sketch", "sparse 10% bound", "sparse 100000tok sketch", "sparse 100000tok bound"]
    assert [t["config"] for t in out["totals"]] == names and all(t["runs"] == 2 for t in out["totals"])
    assert len(out["runs"]) == 10 and len(out["rows"]) == 10
    assert json.loads((tmp_path / "pk.json").read_text()) == out
    by = {t["config"]: t for t in out["totals"]}
    assert by["exact"]["answer_agree"] == by["exact"]["tokens_agree"] == 2 and by["exact"]["sparse_step_share"] is None
    for name in names[3:]:          # every chunk selected: the same tokens as exact attention
        assert by[name]["tokens_agree"] == 2 and by[name]["selected_fraction"] == 1.0, by[name]
    assert all(by[name]["selected_fraction"] < 0.5 for name in names[1:3])
    q = len(pk.tokenize_pieces(Tokenizer(tiny_dir)).question)
    for run in out["runs"]:
        assert set(run) >= {"config", "length", "depth", "key", "text", "correct", "answer_agree", "tokens_agree", "kv"}
        assert run["new_tokens"] == 4 and run["question"] == "decode"
        if run["kv_mode"] == "sparse":     # the question and the answer ran through sparse decode steps
            assert run["kv"]["decode_steps"] == q + 4 - 1 and run["kv"]["sparse_step_share"] == 1.0
        else:
            assert run["kv"] == {}         # the resident exact cache reports no KV stats
    assert "question fed as decode steps (Quest): totals" in printed and "sparse 10% bound" in printed


def test_the_spilled_placement_runs_every_setting_with_kv_off_the_device(
        pk: ModuleType, tiny_dir: Path, tmp_path: Path, fast: None, capsys: pytest.CaptureFixture[str]) -> None:
    out, printed = _run(pk, capsys, str(tiny_dir), "--lengths", "480", "--depths", "0.5", "--budgets", "0.1",
                        "--estimators", "bound", "--new-tokens", "3", "--device", "cpu", "--dtype", "float32",
                        "--device-kv-tokens", "16", "--host-kv-tokens", "32", "--offload-dir", str(tmp_path / "off"))
    by = {t["config"]: t for t in out["totals"]}
    assert list(by) == ["exact", "sparse 10% bound", "exact @spilled", "sparse 10% bound @spilled"]
    for name in ("exact @spilled", "sparse 10% bound @spilled"):
        rooms = by[name]["rooms"]
        assert rooms["layers_on_device"] and rooms["device_kv_tokens"] < 480 and rooms["host_kv_tokens"] < 480
        assert by[name]["kv_off_device_runs"] == 1 and by[name]["tokens_agree_resident"] is not None
    assert by["sparse 10% bound"]["tokens_agree_resident"] is None and "KV rooms" in printed


@needs_demo
def test_the_demo_model_runs_one_length_depth_and_budget(pk: ModuleType, fast: None,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out, printed = _run(pk, capsys, "demo", "--lengths", "256", "--depths", "0.5", "--budgets", "0.1",
                        "--estimators", "sketch", "--question", "both", "--device", "cpu")
    assert [(t["question"], t["config"]) for t in out["totals"]] == [
        ("decode", "exact"), ("prefill", "exact"), ("decode", "sparse 10% sketch"), ("prefill", "sparse 10% sketch")]
    for run in out["runs"]:
        assert run["length"] == 256 and isinstance(run["text"], str) and 10000 <= run["key"] <= 99999
        assert run["answer_agree"] if run["config"] == "exact" else run["kv"]["sparse_step_share"] == 1.0
    assert "question fed as decode steps (Quest)" in printed and "question fed as prefill" in printed


def test_lengths_beyond_the_model_context_are_refused_with_the_longest_that_fits(pk: ModuleType, tiny_dir: Path,
                                                                                fast: None) -> None:
    with pytest.raises(SystemExit, match="exceed the model's context of 512 tokens; use lengths up to 505"):
        pk.main([str(tiny_dir), "--lengths", "200,600", "--device", "cpu", "--budgets", "0.1", "--estimators", "bound"])
    with pytest.raises(SystemExit):
        pk.parse_args([str(tiny_dir), "--estimators", "sketch,oracle"])


def test_summaries_count_agreement_shares_and_a_sketch_that_ran_off(pk: ModuleType) -> None:
    def rec(config: str, correct: bool, agree: bool, kv: dict[str, Any], estimator: str | None = "sketch",
            resident: bool | None = None) -> dict[str, Any]:
        return {"config": config, "question": "decode", "estimator": estimator, "correct": correct,
                "answer_agree": agree, "tokens_agree": agree, "tokens_agree_resident": resident, "kv": kv, "rooms": {}}
    on = {"sketch": "on", "selected_fraction": 0.1, "sparse_step_share": 1.0, "host_bytes": 0, "disk_bytes": 0}
    off = dict(on, sketch="off: the key codes do not fit", selected_fraction=0.3, disk_bytes=4096)
    rows = pk.summarize([rec("exact", True, True, {}, None), rec("s", True, False, on, resident=True),
                         rec("s", False, True, off, resident=False), rec("exact", False, True, {}, None)],
                        ("question", "config"))
    assert [(r["config"], r["runs"], r["correct"], r["answer_agree"]) for r in rows] == [("exact", 2, 1, 2), ("s", 2, 1, 1)]
    exact, sparse = rows
    assert exact["selected_fraction"] is None and exact["tokens_agree_resident"] is None and exact["sketch_off"] == []
    assert sparse["selected_fraction"] == 0.2 and sparse["sparse_step_share"] == 1.0
    assert sparse["tokens_agree_resident"] == 1 and sparse["kv_off_device_runs"] == 1
    assert sparse["sketch_off"] == ["off: the key codes do not fit"]
