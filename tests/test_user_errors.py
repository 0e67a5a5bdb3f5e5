"""Bad input a user can give, through the CLI and the library: each ends in one clear line (CLI:
``error: ...``, exit code 2) or a typed exception naming what to change, never a traceback or an
error from Python's internals; and internal bugs are not disguised as user errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tierkv
from tierkv import cli
from tierkv.cli import app
from tierkv.config import ModelConfig, Policy, parse_size
from tierkv.engine import resolve_device
from tierkv.sampling import SamplingParams

torch.set_num_threads(1)
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "╭" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    with tierkv.load(tiny_llama_dir) as eng:
        yield eng


# -- devices -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mps", "meta", "xpu", "cpu:3"])
def test_unsupported_devices_are_refused_in_one_line(tiny_llama_dir, name) -> None:
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "--prompt-ids", "1", "--device", name),
                          repr(name), "cpu, cuda or cuda:N")
    assert_one_line_error(invoke("plan", str(tiny_llama_dir), "--device", name), repr(name))
    with pytest.raises(tierkv.ArgumentError, match="not supported"):
        resolve_device(name)


# -- config.json fields --------------------------------------------------------------------------------
def _config_with(tiny_llama_dir: Path, tmp_path: Path, **fields) -> Path:
    path = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    raw = json.loads((path / "config.json").read_text())
    raw.update(fields)
    (path / "config.json").write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("fields, fragment", [
    ({"hidden_size": "sixty-four"}, "hidden_size='sixty-four' is not a whole number"),
    ({"num_hidden_layers": 0}, "num_hidden_layers=0"),
    ({"vocab_size": -5}, "vocab_size=-5"),
    ({"intermediate_size": 12.5}, "intermediate_size=12.5"),
    ({"num_attention_heads": True}, "num_attention_heads=True"),
    ({"head_dim": None, "hidden_size": 66, "num_attention_heads": 4}, "not a multiple of num_attention_heads"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps='tiny'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "rope_theta=-1.0"),
    ({"rope_parameters": "linear"}, "is not a JSON object"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes' is not true or false"),
    ({"eos_token_id": "</s>"}, "eos_token_id='</s>'"),
    ({"max_position_embeddings": "4k"}, "max_position_embeddings='4k'"),
])
def test_bad_config_fields_name_the_file_and_field(tiny_llama_dir, tmp_path, fields, fragment) -> None:
    path = _config_with(tiny_llama_dir, tmp_path, **fields)
    with pytest.raises(tierkv.ConfigError) as info:
        ModelConfig.from_dir(path)
    assert str(path / "config.json") in str(info.value) and fragment in str(info.value)
    assert_one_line_error(invoke("info", str(path)), "config.json", fragment)


def test_bad_generation_config_eos_names_the_file(tiny_llama_dir, tmp_path) -> None:
    path = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["</s>"]}))
    assert_one_line_error(invoke("run", str(path), "--prompt-ids", "1"), "generation_config.json", "eos_token_id")


# -- prompts, sampling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ids, fragment", [("1,abc", "'abc' is not a token id"), ("1,-2", "'-2'"),
                                           (",", "it holds no token ids")])
def test_bad_prompt_ids_are_usage_errors(tiny_llama_dir, ids, fragment) -> None:
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "--prompt-ids", ids), "--prompt-ids", fragment)


@pytest.mark.parametrize("seed", ["99999999999999999999999", str(2**64), "-1"])
def test_out_of_range_seed_is_one_line(tiny_llama_dir, seed) -> None:
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "--prompt-ids", "1", "--seed", seed),
                          f"seed={seed}", "0 to 2**64-1")


def test_seed_range_is_what_torch_takes() -> None:
    for seed in (0, 2**64 - 1):
        torch.Generator().manual_seed(SamplingParams(seed=seed).seed)
    for bad in (-1, 2**64, 1.5, True, "3"):
        with pytest.raises(tierkv.ArgumentError, match="seed"):
            SamplingParams(seed=bad)  # type: ignore[arg-type]
    for kwargs in ({"temperature": "hot"}, {"top_p": None}, {"max_new_tokens": True}, {"stop": (3,)}):
        with pytest.raises(tierkv.ArgumentError, match=next(iter(kwargs))):
            SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("prompt, kind, fragment", [
    (None, TypeError, "prompts None have type NoneType"),
    ([1.5], TypeError, "token id 1.5 has type float"),
    ([True, 2], TypeError, "token id True has type bool"),
    ([[1, [2]]], TypeError, "token id [2] has type list"),
    (np.array([1.0, 2.0]), TypeError, "token id 1.0 has type float"),
    ([1, "a"], TypeError, "token id 'a' has type str"),
    (b"ab", TypeError, "have type bytes"),
    (7, TypeError, "have type int"),
    ([], tierkv.ArgumentError, "no prompts given"),
    ([[]], tierkv.ArgumentError, "the prompt is empty"),
])
def test_library_prompts_of_the_wrong_kind_say_what_a_prompt_may_be(engine, prompt, kind, fragment) -> None:
    for call in (engine.generate, engine.stream):
        with pytest.raises(kind) as info:
            call(prompt, max_new_tokens=1)
        assert fragment in str(info.value)
        if kind is TypeError:
            assert "a prompt is a string, a list of token ids" in str(info.value)


def test_integer_arrays_still_work(engine) -> None:
    ref = engine.generate([1, 2, 3], max_new_tokens=3).token_ids
    assert engine.generate(np.array([1, 2, 3]), max_new_tokens=3).token_ids == ref
    assert [r.token_ids for r in engine.generate(torch.tensor([[1, 2, 3]] * 2), max_new_tokens=3)] == [ref, ref]


def test_calls_after_close_raise_a_clear_error(tiny_llama_dir) -> None:
    eng = tierkv.load(tiny_llama_dir)
    eng.close()
    eng.close()                                          # closing twice is harmless
    for call in (lambda: eng.logits([1, 2]), lambda: eng.generate([1]), lambda: eng.stream([1])):
        with pytest.raises(RuntimeError, match="Engine is closed"):
            call()


# -- budgets and policy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, fragment", [
    ("--kv-device-tokens", "0", "kv_device_tokens=0"), ("--kv-device-tokens", "-5", "kv_device_tokens=-5"),
    ("--chunk-tokens", "0", "chunk_tokens=0"), ("--kv-budget", "0", "kv_budget=0"),
    ("--kv-budget", "nan", "kv_budget=nan"), ("--kv", "fuzzy", "kv='fuzzy'"),
    ("--device-mem", "-1GiB", "cannot read size"), ("--device-mem", "1000000000000000TiB", "larger than 1 EiB"),
    ("--offload-dir", "", "offload_dir '' is empty"), ("--offload-dir", "  ", "is empty"),
])
def test_bad_budgets_and_policies_are_refused(tiny_llama_dir, flag, value, fragment) -> None:
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "--prompt-ids", "1", "-n", "1", flag, value), fragment)


def test_convert_into_an_empty_path_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke("convert", "demo", ""), "OUT '' is empty")
    assert list(tmp_path.iterdir()) == []                # nothing written into the current directory


def test_policy_and_sizes_validate_in_the_library() -> None:
    for kwargs in ({"kv_device_tokens": 0}, {"prefill_chunk_tokens": -1}, {"kv_budget": float("inf")},
                   {"chunk_tokens": 2.5}, {"kv_sketch": "yes"}, {"device": 0}):
        with pytest.raises(tierkv.ArgumentError, match=next(iter(kwargs))):
            Policy(**kwargs)  # type: ignore[arg-type]
    for bad in (float("nan"), float("inf"), -1, True, None, "1e30GiB", 2**61):
        with pytest.raises(tierkv.ArgumentError):
            parse_size(bad)  # type: ignore[arg-type]


def test_budgets_above_the_machine_are_refused(tiny_llama_dir) -> None:
    import psutil

    ram = psutil.virtual_memory().total
    err = assert_one_line_error(invoke("plan", str(tiny_llama_dir), "--device", "cpu", "--device-mem",
                                       f"{2 * ram}"), "more than this machine's RAM", "--device-mem")
    assert "GiB" in err
    assert_one_line_error(invoke("plan", str(tiny_llama_dir), "--device", "cpu", "--device-mem", f"{ram // 2 + 1}",
                                 "--host-mem", f"{ram // 2 + 1}"), "plus host budget", "--host-mem")
    with pytest.raises(tierkv.PlanError, match="host budget"):
        tierkv.load(tiny_llama_dir, device="cpu", host_mem=2 * ram)


# -- what the CLI treats as a user error ------------------------------------------------------------------
def test_usage_errors_are_one_line_with_exit_code_2(tiny_llama_dir) -> None:
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "--bogus"), "No such option: --bogus", "--help")
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "-p", "x", "-n", "abc"), "--max-new-tokens")
    assert_one_line_error(invoke("trace", "run"), "Missing argument")
    assert_one_line_error(invoke("plan", str(tiny_llama_dir), "--device-mem"), "--device-mem")


def test_trace_errors_exit_2(tmp_path) -> None:
    assert_one_line_error(invoke("trace", "analyze", str(tmp_path / "none.json")), "no such file")
    assert_one_line_error(invoke("trace", "run", str(tmp_path / "nope"), "--batch-sizes", "1",
                                 "--out", str(tmp_path / "o")), "nope")


def test_internal_bugs_keep_their_traceback(tiny_llama_dir, monkeypatch) -> None:
    """A ValueError from inside tierkv (a bug) must not be dressed up as a user error."""
    def broken(*args, **kwargs):
        raise ValueError("internal invariant broken")

    monkeypatch.setattr(cli, "make_plan", broken)
    result = invoke("plan", str(tiny_llama_dir))
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)


def test_tier_full_and_pinning_errors_are_user_errors() -> None:
    from tierkv.io.buffers import PinningError
    from tierkv.io.kvstore import KVStoreError
    from tierkv.io.tiers import TierFullError

    for cls in (TierFullError, PinningError, KVStoreError, tierkv.KVBudgetError, tierkv.StoreError,
                tierkv.CheckpointError, tierkv.PlanError, tierkv.ConfigError):
        assert issubclass(cls, tierkv.TierkvError) and issubclass(cls, ValueError)
        assert issubclass(cls, cli.USER_ERRORS)
    assert issubclass(TierFullError, RuntimeError) and issubclass(PinningError, MemoryError)   # compatibility


def test_readme_error_classes_import_from_tierkv() -> None:
    from tierkv import CheckpointError, ConfigError, PlanError, StoreError, TierkvError  # noqa: F401

    assert {"ConfigError", "CheckpointError", "PlanError", "StoreError", "TierkvError"} <= set(tierkv.__all__)


def test_a_stream_interrupted_mid_run_still_closes_the_engine(tiny_llama_dir, monkeypatch) -> None:
    """``engine.close()`` runs in a finally: an error while streaming leaves no engine open."""
    closed = []
    real_close = tierkv.Engine.close

    def spy_close(self):
        closed.append(True)
        real_close(self)

    calls = []

    def failing_sample(logits, params, generator):
        calls.append(1)
        if len(calls) > 1:
            raise tierkv.ArgumentError("stopped mid-stream")
        return logits.argmax(-1)

    monkeypatch.setattr(tierkv.Engine, "close", spy_close)
    monkeypatch.setattr("tierkv.sampling.sample", failing_sample)
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "--prompt-ids", "1,2", "-n", "4"), "stopped mid-stream")
    assert closed == [True]


def test_ctrl_c_mid_stream_exits_130_and_closes_the_engine(tiny_llama_dir, monkeypatch) -> None:
    closed, calls = [], []
    real_close = tierkv.Engine.close

    def interrupted_sample(logits, params, generator):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return logits.argmax(-1)

    monkeypatch.setattr(tierkv.Engine, "close", lambda self: (closed.append(True), real_close(self)))
    monkeypatch.setattr("tierkv.sampling.sample", interrupted_sample)
    result = invoke("run", str(tiny_llama_dir), "--prompt-ids", "1,2", "-n", "8")
    assert result.exit_code == 130 and "Traceback" not in result.output and closed == [True]


def test_an_error_mid_stream_starts_on_its_own_line(monkeypatch) -> None:
    """Text already streamed to stdout ends with a newline, so the error line never trails it."""
    calls = []

    def failing_sample(logits, params, generator):
        calls.append(1)
        if len(calls) > 3:
            raise tierkv.ArgumentError("stopped mid-stream")
        return logits.argmax(-1)

    monkeypatch.setattr("tierkv.sampling.sample", failing_sample)
    result = invoke("run", "demo", "--prompt", "Return the number of", "-n", "8")
    assert_one_line_error(result, "stopped mid-stream")
    assert result.stdout and result.stdout.endswith("\n"), repr(result.stdout)


def test_library_repair_notes_are_note_lines(caplog) -> None:
    """``main()`` shows the library's warnings (automatic store repairs) as ``note:`` lines on stderr."""
    import io
    import logging

    cli._show_library_notes()
    logger = logging.getLogger("tierkv")
    handler = logger.handlers[-1]
    try:
        stream = io.StringIO()
        handler.setStream(stream)
        logging.getLogger("tierkv.io.convert").warning("layer 1 failed its checksum: re-converting it")
        assert stream.getvalue() == "note: layer 1 failed its checksum: re-converting it\n"
    finally:
        logger.removeHandler(handler)
