"""The shared CLI flags (tierkv/cli_flags.py): every command that takes a group gets all of its
flags, with the command's defaults, and receives them as the group's dataclass."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from tierkv import cli
from tierkv.cli_flags import LoadFlags, SamplingFlags, expand_flags, flags, kv_budget_value

runner = CliRunner()


def _options(command: str) -> dict[str, Any]:
    """The click parameters of one tierkv command, by name."""
    group = typer.main.get_command(cli.app)
    return {p.name: p for p in group.commands[command].params}


@pytest.mark.parametrize("command", ["run", "chat"])
def test_run_and_chat_take_every_shared_flag(command: str) -> None:
    params = _options(command)
    for group in (LoadFlags, SamplingFlags):
        for f in fields(group):
            assert f.name in params, (command, f.name)
            assert params[f.name].help, (command, f.name)     # a help text everywhere, from one place


def test_run_and_chat_share_the_load_flags_exactly() -> None:
    run, chat = _options("run"), _options("chat")
    for f in fields(LoadFlags):
        assert run[f.name].opts == chat[f.name].opts and run[f.name].help == chat[f.name].help
        assert run[f.name].default == chat[f.name].default == f.default


def test_chat_keeps_its_own_sampling_defaults() -> None:
    run, chat = _options("run"), _options("chat")
    assert {n: run[n].default for n in ("max_new_tokens", "temperature", "top_k", "top_p")} == \
        {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0}
    assert {n: chat[n].default for n in ("max_new_tokens", "temperature", "top_k", "top_p")} == \
        {"max_new_tokens": 256, "temperature": 0.7, "top_k": 40, "top_p": 0.95}
    assert chat["max_new_tokens"].opts == run["max_new_tokens"].opts == ["--max-new-tokens", "-n"]


def test_plan_takes_the_placement_flags_only() -> None:
    """The budgets and what the device reserve depends on, the KV flags included (the room for the
    tiered cache at the full context follows --kv, --kv-budget, --chunk-tokens and --kv-sketch)."""
    params = _options("plan")
    assert {"device_mem", "host_mem", "offload_dir", "dtype", "device", "kv_device_tokens",
            "prefill_chunk_tokens", "kv", "kv_budget", "chunk_tokens", "kv_sketch"} <= set(params)
    assert "threads" not in params and "verify" not in params and "max_new_tokens" not in params
    assert params["dtype"].help == _options("run")["dtype"].help


def test_run_hands_the_flags_to_load(monkeypatch, tmp_path) -> None:
    """What the user typed reaches ``tierkv.load`` (a whole --kv-budget > 1 as a token count)."""
    seen: dict[str, Any] = {}

    def fake_load(model: str, **kwargs: Any) -> Any:
        seen.update(kwargs, model=model)
        raise cli.ConfigError("stop here")

    monkeypatch.setattr(cli, "load", fake_load)
    result = runner.invoke(cli.app, ["run", "some-model", "-p", "hi", "--kv-budget", "512", "--kv", "sparse",
                                     "--dtype", "float32", "--offload-dir", str(tmp_path), "--verify", "--json"])
    assert result.exit_code == 2 and "stop here" in result.stderr
    assert seen["model"] == "some-model" and seen["kv_budget"] == 512 and isinstance(seen["kv_budget"], int)
    assert seen["kv"] == "sparse" and seen["dtype"] == "float32" and seen["verify"] is True
    assert seen["offload_dir"] == str(tmp_path) and seen["kv_sketch"] is None and "threads" not in seen


def test_kv_budget_value() -> None:
    assert kv_budget_value(0.05) == 0.05 and kv_budget_value(1.0) == 1.0
    assert kv_budget_value(512.0) == 512 and isinstance(kv_budget_value(512.0), int)
    assert kv_budget_value(512.5) == 512.5


def test_expand_flags_builds_the_dataclass() -> None:
    got: list[Any] = []

    @expand_flags
    def command(name: str = typer.Option("x"),
                options: LoadFlags = flags(LoadFlags, only=("dtype", "kv"), kv="exact")) -> None:
        got.append((name, options))

    app = typer.Typer()
    app.command()(command)
    assert runner.invoke(app, ["--dtype", "bfloat16"]).exit_code == 0
    assert got == [("x", LoadFlags(dtype="bfloat16", kv="exact"))]
    assert runner.invoke(app, ["--kv-budget", "3"]).exit_code == 2      # not one of this command's flags


def test_a_flag_taken_twice_is_refused() -> None:
    with pytest.raises(AssertionError, match="taken twice"):
        @expand_flags
        def command(dtype: str = typer.Option("x"), options: LoadFlags = flags(LoadFlags)) -> None:
            del dtype, options
