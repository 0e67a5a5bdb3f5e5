"""What a new user meets in the first minutes: install without triton, --version, the README's
commands working as shown, token ids printed for a model without a tokenizer, unwrapped output
when piped, no "inf GB/s", and a quiet ``trace run``."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tierkv
from tierkv.cli import app

torch.set_num_threads(1)
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


# -- triton is optional ------------------------------------------------------------------------------
def test_triton_is_not_a_base_dependency() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(d.startswith("triton") for d in extras["test"]) and any(d.startswith("triton") for d in extras["cuda"])


def test_package_imports_and_runs_without_triton(tiny_llama_dir) -> None:
    code = f"""
import sys
sys.modules["triton"] = None                # `import triton` raises ImportError, as where it is not installed
import importlib, pkgutil
import tierkv
from tierkv.kernels import _select
assert not _select.HAS_TRITON
for m in pkgutil.walk_packages(tierkv.__path__, "tierkv."):
    if m.name != "tierkv.__main__":
        importlib.import_module(m.name)
with tierkv.load({str(tiny_llama_dir)!r}, kv="sparse", kv_budget=0.5, chunk_tokens=16) as eng:
    sparse = eng.generate(list(range(1, 120)), max_new_tokens=3).token_ids
with tierkv.load({str(tiny_llama_dir)!r}) as eng:
    exact = eng.generate([1, 2, 3], max_new_tokens=3).token_ids
print("tokens", len(sparse), len(exact))
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "tokens 3 3" in done.stdout


# -- --version ---------------------------------------------------------------------------------------
def test_version_flag() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"tierkv {tierkv.__version__}"


# -- output ------------------------------------------------------------------------------------------
def test_run_without_tokenizer_prints_the_generated_ids(tiny_llama_dir) -> None:
    result = runner.invoke(app, ["run", str(tiny_llama_dir), "--prompt-ids", "1,2,3", "-n", "5"])
    assert result.exit_code == 0, result.output
    with tierkv.load(tiny_llama_dir) as eng:
        expected = eng.generate([1, 2, 3], max_new_tokens=5).token_ids
    assert result.stdout == ",".join(map(str, expected)) + "\n"


def test_stats_and_plan_lines_are_never_wrapped(tiny_llama_dir, tmp_path) -> None:
    """Piped output (not a terminal) used to be hard-wrapped at 80 columns."""
    long_dir = tmp_path / ("a-rather-long-offload-directory-name-" * 3)
    result = runner.invoke(app, ["run", str(tiny_llama_dir), "--prompt-ids", "1,2,3", "-n", "3"])
    assert result.exit_code == 0, result.output
    summary = result.stderr.strip()
    assert "\n" not in summary and summary.startswith("[") and summary.endswith("]") and len(summary) > 80
    plan = runner.invoke(app, ["plan", str(tiny_llama_dir), "--device-mem", "4MiB", "--offload-dir", str(long_dir)])
    assert plan.exit_code == 0, plan.output
    lines = plan.stdout.strip().splitlines()
    assert [ln.split(" ")[0] for ln in lines] == ["weights:", "device", "host", "disk", "prefetch", "KV", "prefill:",
                                                  "sparse", "predicted"], lines
    assert str(long_dir) in lines[3]


def test_plan_says_not_used_instead_of_inf(tiny_llama_dir) -> None:
    result = runner.invoke(app, ["plan", str(tiny_llama_dir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "inf" not in result.stdout
    assert "disk not used, host->device not used" in result.stdout


def test_trace_run_stderr_has_no_profiler_noise(tmp_path) -> None:
    """kineto writes 'USDT: ... profiler_start/stop' straight to fd 2 on every profiler start and stop."""
    code = f"""
import torch
from tierkv.trace.capture import profile_call
profile_call(lambda: torch.ones(8) @ torch.ones(8), __import__("pathlib").Path({str(tmp_path / "t.json")!r}))
print("done")
"""
    done = _python(code)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr
    assert "USDT" not in done.stderr and "profiler_st" not in done.stderr, done.stderr


# -- the README's commands run as shown -------------------------------------------------------------------
def _readme_commands() -> list[tuple[list[str], bool]]:
    """(argv, expects_error) for each ``$ tierkv ... demo ...`` line of the README that runs offline and
    quickly (no pipes, no chat, no trace, no serve: it runs until stopped)."""
    text = (ROOT / "README.md").read_text()
    out = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        # chat/serve never exit, trace writes files, batch reads its input file (tests/test_batch.py runs those)
        if not line.startswith("$ tierkv ") or "|" in line or any(f" {c} " in line for c in ("chat", "trace", "serve", "batch")):
            continue
        command = line[2:]
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + lines[i].strip()
        argv = shlex.split(command)[1:]
        if "demo" not in argv:
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        out.append((argv, following.startswith("error:")))
    return out


def test_readme_lists_the_commands_tested_here() -> None:
    argvs = [a for a, _ in _readme_commands()]
    assert any("--prompt-ids" in a for a in argvs) and any(a[0] == "plan" for a in argvs)


@pytest.mark.parametrize("argv, expects_error", _readme_commands(), ids=lambda v: " ".join(v) if isinstance(v, list)
                         else str(v))
def test_readme_command_runs_as_shown(argv, expects_error, tmp_path, monkeypatch) -> None:
    argv = [str(tmp_path / "tkv") if a.startswith("/tmp/") else a for a in argv]   # keep /tmp clean
    monkeypatch.setenv("TIERKV_OFFLOAD_DIR", str(tmp_path / "cache"))
    result = runner.invoke(app, argv)
    if expects_error:
        assert result.exit_code == 2 and result.stderr.startswith("error:"), result.output
        return
    assert result.exit_code == 0, result.output
    if "--json" in argv:
        data = json.loads(result.stdout)
        n = int(argv[argv.index("-n") + 1]) if "-n" in argv else None
        assert n is None or len(data["token_ids"]) == n
    if argv[0] == "run" and "--prompt" in argv and "--seed" in argv:
        assert re.search(r"\[\d+ tokens", result.stderr)


def test_readme_library_token_id_example_runs_on_the_demo_model() -> None:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"ids_out = engine\.generate\(\[([0-9, ]+)\], max_new_tokens=(\d+)\)", text)
    assert found, "the README's token-id library example is gone"
    ids = [int(x) for x in found.group(1).split(",")]
    with tierkv.load("demo") as eng:
        assert len(eng.generate(ids, max_new_tokens=int(found.group(2))).token_ids) == int(found.group(2))
