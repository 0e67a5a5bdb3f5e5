"""``tierkv batch`` / ``run_batch``: results in input order equal to each prompt's solo output, continuous
batching within ``batch`` sequences, resume after a crash or Ctrl-C, bad lines as error results, and
clear refusals (duplicate ids, another input's output, a missing input, an unwritable output).

The bundled demo model in fp32 (it has a tokenizer and a chat template), resident and streamed from disk.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
from typer.testing import CliRunner

import tierkv
from tierkv.batch import BatchError, BatchInterrupted, BatchJob, read_requests, run_batch
from tierkv.cli import app

pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")

# ragged prompts (token ids of 5..90 tokens), a text prompt and a chat; their own lengths and a sampled one
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
REQUESTS: list[dict[str, Any]] = [
    {"id": "ids-90", "prompt": [(7 * i + 3) % 4000 + 10 for i in range(90)], "max_tokens": 9},
    {"prompt": [11, 12, 13, 14, 15], "max_tokens": 14},
    {"id": "text", "prompt": "Once upon a time there was", "max_tokens": 6},
    {"id": 7, "messages": CHAT, "max_tokens": 10},
    {"id": "ids-33", "prompt": [(5 * i + 1) % 4000 + 10 for i in range(33)], "max_tokens": 3},
    {"id": "zero", "prompt": "nothing to add", "max_tokens": 0},
    {"id": "sampled", "prompt": "The cat", "temperature": 0.9, "top_k": 20, "seed": 5, "max_tokens": 8},
]


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _untimed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "timing"} for r in records]


@pytest.fixture(scope="module")
def engine() -> Iterator[tierkv.Engine]:
    with tierkv.load("demo", dtype="float32", kv="exact", device="cpu", max_sequences=3) as eng:
        yield eng


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tierkv.Engine]:
    """The demo model with 3 of its 4 layers streamed from disk (12 MiB of device budget)."""
    with tierkv.load("demo", dtype="float32", kv="exact", device="cpu", device_mem="12MiB", host_mem="4MiB",
                     offload_dir=tmp_path_factory.mktemp("offload"), max_sequences=3) as eng:
        assert eng.plan is not None and eng.plan.disk_layers
        yield eng


def _solo(eng: tierkv.Engine, req: dict[str, Any]) -> tierkv.GenerationResult:
    prompt = req["prompt"] if "prompt" in req else eng.tokenizer.encode_chat(req["messages"])
    kwargs = {k: v for k, v in req.items() if k in ("temperature", "top_k", "seed")}
    return eng.generate(prompt, max_new_tokens=req["max_tokens"], **kwargs)


@pytest.mark.parametrize("which", ["resident", "streamed"])
def test_results_in_input_order_equal_solo_runs(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    eng = request.getfixturevalue("engine" if which == "resident" else "streamed")
    out = tmp_path / "out.jsonl"
    summary = run_batch(eng, _write(tmp_path / "in.jsonl", REQUESTS), out, batch=3)
    got = _read(out)
    assert [r["id"] for r in got] == ["ids-90", 2, "text", 7, "ids-33", "zero", "sampled"]   # default id: line
    for req, rec in zip(REQUESTS, got):
        solo = _solo(eng, req)
        assert rec["tokens"] == solo.token_ids and rec["text"] == solo.text, req
        assert rec["finish_reason"] == solo.finish_reason and rec["prompt_tokens"] == len(solo.prompt_token_ids)
        t = rec["timing"]
        assert 0 <= t["queued_s"] and 0 <= t["ttft_s"] <= t["total_s"]
    assert len(got[0]["tokens"]) == 9 and got[5]["tokens"] == [] and got[5]["finish_reason"] == "length"
    assert (summary.requests, summary.ok, summary.errors, summary.skipped, summary.unfinished) == (7, 7, 0, 0, 0)
    assert summary.generated_tokens == sum(len(r["tokens"]) for r in got) and summary.tok_s > 0
    assert summary.prompt_tokens == sum(r["prompt_tokens"] for r in got)
    if which == "streamed":          # every step streams 3 layers from disk: counted once per step, not per sequence
        moved = summary.weight_bytes.get("disk_to_device", 0) + summary.weight_bytes.get("disk_to_host", 0)
        assert moved > 0 and summary.read_bytes_per_token["disk"] == pytest.approx(moved / summary.generated_tokens)
        assert "disk->device" in summary.line() or "disk->host" in summary.line()


def test_requests_join_as_others_finish(engine: tierkv.Engine, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """batch=2: one long request and short ones; each short one is submitted as the one before ends, while
    the long one still runs, and never more than 2 sequences are live."""
    rows = [{"id": "long", "prompt": "Once upon a time there was", "max_tokens": 24}] + \
           [{"id": f"s{i}", "prompt": [30 + i, 40, 50], "max_tokens": 2} for i in range(5)]
    live: list[int] = []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (live.append(engine.kv_stats()["live_sequences"]), step())[1])
    run_batch(engine, _write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", batch=2)
    records = _read(tmp_path / "out.jsonl")
    assert len(records[0]["tokens"]) == 24                                    # no EOS: it runs to its length
    got = {r["id"]: r["timing"] for r in records}
    long_end = got["long"]["queued_s"] + got["long"]["total_s"]
    assert all(got[f"s{i}"]["queued_s"] < long_end for i in range(5))        # joined beside the long one
    assert max(live) == 2 and live[:10] == [2] * 10          # full while short ones remain (2 steps each)


def test_bad_lines_get_error_results_and_the_job_goes_on(engine: tierkv.Engine, tmp_path: Path) -> None:
    rows = ["{not json", {"id": "noprompt", "max_tokens": 3}, {"id": "float", "prompt": 3.5},
            {"id": "ids", "prompt": [1, "two"]}, {"id": "hot", "prompt": "hi", "temperature": "hot"},
            {"id": "typo", "prompt": "hi", "max_new_tokens": 3}, {"id": [1], "prompt": "hi"},
            {"id": "long", "prompt": [5] * 600}, {"id": "vocab", "prompt": [5, 99999]},
            {"id": "both", "prompt": "a", "messages": CHAT}, {"id": "msgs", "messages": [{"role": "user"}]},
            "[1, 2]", {"id": "good", "prompt": [11, 12, 13], "max_tokens": 4}]
    summary = run_batch(engine, _write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    got = _read(tmp_path / "out.jsonl")
    assert len(got) == len(rows) and got[-1]["id"] == "good" and len(got[-1]["tokens"]) == 4
    for number, rec in enumerate(got[:-1], start=1):
        assert rec["error"].startswith(f"line {number}: "), rec
    assert got[0]["id"] == 1 and "not valid JSON" in got[0]["error"]
    assert 'exactly one of "prompt"' in got[1]["error"] and "has type float" in got[2]["error"]
    assert "'two'" in got[3]["error"] and "temperature='hot'" in got[4]["error"]
    assert "unknown field 'max_new_tokens'" in got[5]["error"] and got[6]["id"] == 7 and "id [1]" in got[6]["error"]
    assert "600 tokens" in got[7]["error"] and "at most 512" in got[7]["error"]
    assert "outside the vocabulary" in got[8]["error"] and 'exactly one of "prompt"' in got[9]["error"]
    assert '"messages" must be' in got[10]["error"] and "not an object" in got[11]["error"]
    assert (summary.ok, summary.errors) == (1, len(rows) - 1)


def test_duplicate_ids_are_refused_before_anything_runs(tmp_path: Path) -> None:
    src = _write(tmp_path / "in.jsonl", [{"prompt": "a"}, {"id": "x", "prompt": "b"}, "", {"id": "x", "prompt": "c"}])
    with pytest.raises(BatchError, match=r'id "x" is on line 2 and on line 4'):
        BatchJob(src, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    assert [r.id for r in read_requests(_write(tmp_path / "ok.jsonl", [{"prompt": "a"}, {"id": "1", "prompt": "b"}]))] \
        == [1, "1"]                                          # the number 1 and the string "1" are two ids


def test_resume_skips_written_ids_and_redoes_a_half_line(engine: tierkv.Engine, tmp_path: Path) -> None:
    src = _write(tmp_path / "in.jsonl", REQUESTS[:5])
    clean = tmp_path / "clean.jsonl"
    run_batch(engine, src, clean, batch=3)
    lines = clean.read_text().splitlines(keepends=True)
    crashed = tmp_path / "crashed.jsonl"
    crashed.write_text("".join(lines[:2]) + lines[2][:25])              # a crash in the middle of line 3
    summary = run_batch(engine, src, crashed, batch=3)
    assert (summary.skipped, summary.ok) == (2, 3)
    assert _untimed(_read(crashed)) == _untimed(_read(clean))
    again = run_batch(engine, src, crashed)                             # complete: nothing to do
    assert (again.skipped, again.ok, again.generated_tokens) == (5, 0, 0) and _read(crashed) == _read(crashed)


def test_retry_errors_reruns_fixed_lines_and_keeps_input_order(engine: tierkv.Engine, tmp_path: Path) -> None:
    rows = [{"id": "a", "prompt": [11, 12], "max_tokens": 3}, '{"prompt": [1, 2', {"id": "c", "prompt": "hot",
            "temperature": "high"}, {"id": "d", "prompt": [13, 14], "max_tokens": 2}]
    src, out = _write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    run_batch(engine, src, out)
    assert [("error" in r) for r in _read(out)] == [False, True, True, False]
    rows[1], rows[2] = {"id": "b", "prompt": [1, 2], "max_tokens": 2}, {"id": "c", "prompt": [3, 4], "max_tokens": 2}
    _write(src, rows)                        # line 2 fixed (now with an id), line 3 fixed
    with pytest.raises(BatchError, match=r"\(e\.g\. 2\).*rerun with --retry-errors"):
        run_batch(engine, src, out)
    summary = run_batch(engine, src, out, retry_errors=True, progress=True)
    got = _read(out)
    assert [r["id"] for r in got] == ["a", "b", "c", "d"] and not any("error" in r for r in got)
    assert (summary.skipped, summary.ok) == (2, 2) and len(got[1]["tokens"]) == 2
    assert got[1]["tokens"] == engine.generate([1, 2], max_new_tokens=2).token_ids
    assert not (tmp_path / "out.jsonl.tmp").exists()


def test_an_output_of_another_input_is_refused(engine: tierkv.Engine, tmp_path: Path) -> None:
    out = _write(tmp_path / "out.jsonl", [{"id": "elsewhere", "tokens": [1], "text": ""}])
    before = out.read_bytes()
    with pytest.raises(BatchError, match="written for another input; give a new -o file, or delete it"):
        run_batch(engine, _write(tmp_path / "in.jsonl", [{"prompt": "a"}]), out)
    notes = _write(tmp_path / "notes.txt", ["my notes, not results"])
    with pytest.raises(BatchError, match="line 1 of .* is not a tierkv batch result"):
        run_batch(engine, tmp_path / "in.jsonl", notes)
    assert out.read_bytes() == before and notes.read_text() == "my notes, not results\n"


def test_interrupt_writes_what_is_complete_and_a_rerun_finishes(engine: tierkv.Engine, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src = _write(tmp_path / "in.jsonl", REQUESTS)
    clean, out = tmp_path / "clean.jsonl", tmp_path / "out.jsonl"
    run_batch(engine, src, clean, batch=3)
    step = engine.step

    def interrupted_step() -> int:          # Ctrl-C once two results are written
        if out.exists() and len(out.read_text().splitlines()) >= 2:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(engine, "step", interrupted_step)
    with pytest.raises(BatchInterrupted) as info:
        run_batch(engine, src, out, batch=3)
    monkeypatch.undo()
    first = info.value.summary
    assert first.interrupted and 2 <= first.ok < len(REQUESTS) and first.unfinished == len(REQUESTS) - first.ok
    assert engine.kv_stats()["live_sequences"] == 0                     # nothing left running
    assert _untimed(_read(out)) == _untimed(_read(clean))[:first.ok]
    rest = run_batch(engine, src, out, batch=3)
    assert rest.skipped == first.ok and _untimed(_read(out)) == _untimed(_read(clean))


# -- the command line -----------------------------------------------------------------------------------
def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["batch", *args])


def test_cli_writes_results_and_a_summary(tmp_path: Path) -> None:
    src = _write(tmp_path / "in.jsonl", [{"prompt": [11, 12, 13]}, {"id": "b", "prompt": "Hello", "max_tokens": 2},
                                         "oops"])
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    result = _cli("demo", str(src), "-o", str(out), "--batch", "2", "-n", "5", "--dtype", "float32",
                  "--summary", str(summary), "--json")
    assert result.exit_code == 0, result.output
    got = _read(out)
    assert [r["id"] for r in got] == [1, "b", 3] and len(got[0]["tokens"]) == 5 and len(got[1]["tokens"]) == 2
    assert "line 3: not valid JSON" in got[2]["error"]
    data = json.loads(result.stdout.strip())
    assert data == json.loads(summary.read_text())
    assert (data["requests"], data["ok"], data["errors"], data["batch"]) == (3, 2, 1, 2)
    assert data["generated_tokens"] == 7
    plain = _cli("demo", str(src), "-o", str(out))                       # done: skips all, says so on one line
    assert plain.exit_code == 0 and "3 done before" in plain.stderr and plain.stdout == ""


@pytest.mark.parametrize("case", ["missing-input", "unwritable-output", "duplicates", "summary-dir"])
def test_cli_refusals_are_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    src = _write(tmp_path / "in.jsonl", [{"prompt": "a"}])
    args = {"missing-input": [str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out.jsonl")],
            "unwritable-output": [str(src), "-o", str(tmp_path / "no-such-dir" / "out.jsonl")],
            "duplicates": [str(_write(tmp_path / "dup.jsonl", [{"id": 2, "prompt": "a"}, {"prompt": "b"}])),
                           "-o", str(tmp_path / "out.jsonl")],
            "summary-dir": [str(src), "-o", str(tmp_path / "out.jsonl"), "--summary", str(tmp_path / "x" / "s.json")],
            }[case]
    result = _cli("demo", *args)
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in result.output, err
    assert {"missing-input": "does not exist", "unwritable-output": "give -o a path in a writable directory",
            "duplicates": "is on line 1 and on line 2", "summary-dir": "--summary"}[case] in err


def test_the_readme_batch_example_runs_as_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's prompts.jsonl, its `tierkv batch` commands, the ids and errors of results.jsonl, and a resume."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## Throughput mode: batch jobs"):text.index("## Long contexts")]
    prompts = re.search(r"\$ cat prompts.jsonl\n(.*?)\n\n", section, re.S).group(1)
    shown = [json.loads(line.replace("...", "0").replace("{0}", "{}"))
             for line in re.search(r"\$ cat results.jsonl\n(.*?)\n```", section, re.S).group(1).splitlines()]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text(prompts + "\n")
    command = next(line[2:] for line in section.splitlines() if line.startswith("$ tierkv batch demo prompts.jsonl"))
    argv = [str(tmp_path / "tkv") if a.startswith("/tmp/") else a for a in shlex.split(command)[1:]]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    summary = result.stderr.splitlines()[-1]
    assert summary.startswith("[batch: 5 requests: 4 ok, 1 errors, 0 done before |") and "disk->device" in summary
    got = _read(tmp_path / "results.jsonl")
    assert [r["id"] for r in got] == [r["id"] for r in shown] and got[-1] == shown[-1]    # the error line as shown
    assert [r.get("finish_reason") for r in got] == [r.get("finish_reason") for r in shown]
    out = tmp_path / "results.jsonl"
    out.write_bytes(b"".join(out.read_bytes().splitlines(keepends=True)[:3]) + b'{"id": "ids", "te')
    again = CliRunner().invoke(app, argv)
    assert again.exit_code == 0 and "1 ok, 1 errors, 3 done before" in again.stderr, again.output
    assert _read(out)[:3] == got[:3] and [r["id"] for r in _read(out)] == [r["id"] for r in shown]
