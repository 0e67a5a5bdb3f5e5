"""The ``tierkv`` command line through typer's CliRunner: output shapes, exit codes, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tierkv
from conftest import build_hf_model, save_hf_model
from tierkv.cli import app
from tokenizer_fixtures import byte_level_bpe, write_tokenizer

torch.set_num_threads(1)

runner = CliRunner()
DEMO_CONFIG = Path(tierkv.__file__).parent / "demo_model" / "config.json"


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    """Tiny Llama + byte-level BPE tokenizer with BOS and a chat template."""
    tok = byte_level_bpe()
    path = save_hf_model(build_hf_model("llama", vocab_size=tok.get_vocab_size(), seed=2),
                         tmp_path_factory.mktemp("text-model"))
    return write_tokenizer(path, tok)


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err


# -- run -------------------------------------------------------------------------------------------
def test_run_prompt_ids_json(tiny_llama_dir) -> None:
    result = invoke("run", str(tiny_llama_dir), "--prompt-ids", "1,2,3", "-n", "7", "--json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    with tierkv.load(tiny_llama_dir) as eng:
        expected = eng.generate([1, 2, 3], max_new_tokens=7)
    assert data["token_ids"] == expected.token_ids and data["text"] == ""
    assert data["finish_reason"] == expected.finish_reason and data["prompt_tokens"] == 3
    assert data["stats"]["new_tokens"] == len(expected.token_ids) and data["stats"]["prefill_s"] > 0


def test_run_text_prompt_streams_text(text_model) -> None:
    result = invoke("run", str(text_model), "--prompt", "Hello world", "-n", "12")
    assert result.exit_code == 0, result.output
    with tierkv.load(text_model) as eng:
        expected = eng.generate("Hello world", max_new_tokens=12)
    assert result.stdout == expected.text + "\n"
    assert "tokens" in result.stderr and "prefill" in result.stderr     # the one-line summary


def test_run_sampling_flags_reach_the_engine(text_model) -> None:
    args = ("run", str(text_model), "--prompt", "Hello", "-n", "10", "--temperature", "1.5", "--top-k", "20",
            "--top-p", "0.9", "--seed", "4", "--json")
    a, b = invoke(*args), invoke(*args)
    assert a.exit_code == 0, a.output
    with tierkv.load(text_model) as eng:
        expected = eng.generate("Hello", max_new_tokens=10, temperature=1.5, top_k=20, top_p=0.9, seed=4)
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"] == expected.token_ids


def test_run_stop_flag(text_model) -> None:
    with tierkv.load(text_model) as eng:
        full = eng.generate("Hello", max_new_tokens=12).text
    stop = full[3:5]
    result = invoke("run", str(text_model), "--prompt", "Hello", "-n", "12", "--stop", stop, "--json")
    data = json.loads(result.stdout)
    assert data["text"] == full[:full.find(stop)] and data["finish_reason"] == "stop"


@pytest.mark.parametrize("args", [("--prompt", "hi", "--prompt-ids", "1,2"), ()], ids=["both", "neither"])
def test_prompt_and_prompt_ids_usage_error(tiny_llama_dir, args) -> None:
    result = invoke("run", str(tiny_llama_dir), *args)
    assert_one_line_error(result, "--prompt", "run --help")      # usage errors are one line too


# -- errors ----------------------------------------------------------------------------------------
def test_missing_dir_error(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    assert_one_line_error(invoke("run", str(missing), "--prompt-ids", "1"), str(missing), "not a directory")
    assert_one_line_error(invoke("info", str(missing)), "not a directory")


def test_unsupported_architecture_error(tiny_llama_dir, tmp_path) -> None:
    path = Path(shutil.copytree(tiny_llama_dir, tmp_path / "gpt2"))
    raw = json.loads((path / "config.json").read_text())
    raw.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (path / "config.json").write_text(json.dumps(raw))
    assert_one_line_error(invoke("run", str(path), "--prompt-ids", "1,2"), "GPT2LMHeadModel", "LlamaForCausalLM")
    assert_one_line_error(invoke("info", str(path), "--json"), "GPT2LMHeadModel")


def test_prompt_too_long_error(tiny_llama_dir) -> None:
    ids = ",".join(["5"] * 300)
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "--prompt-ids", ids), "300 tokens", "at most 256")


def test_bad_prompt_ids_errors(tiny_llama_dir) -> None:
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "--prompt-ids", "1,999"), "outside the vocabulary")
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "--prompt-ids", "1,x"), "x")
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "--prompt", "hello"), "tokenizer.json")


def test_bad_sampling_value_error(tiny_llama_dir) -> None:
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "--prompt-ids", "1", "--top-p", "0"), "top_p")


# -- info ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, dtype, overrides", [
    ("llama", torch.bfloat16, {"tie_word_embeddings": True}),
    ("qwen2", torch.float32, {}),
])
def test_info_json(make_checkpoint, arch, dtype, overrides) -> None:
    model, path = make_checkpoint(arch, dtype=dtype, **overrides)
    result = invoke("info", str(path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["architecture"] == model.config.architectures[0]
    assert data["parameters"] == model.num_parameters()
    layer0 = [p for n, p in model.named_parameters() if n.startswith("model.layers.0.")]
    assert data["bytes_per_layer"] == sum(p.numel() * p.element_size() for p in layer0)
    assert data["context_length_tokens"] == 256 and data["layers"] == 2
    assert data["dtype"] == str(dtype).removeprefix("torch.")
    assert data["tied_embeddings"] is bool(overrides.get("tie_word_embeddings", False))
    assert data["checkpoint_files"] == ["model.safetensors"]


def test_info_context_length_matches_the_engine(make_checkpoint) -> None:
    """Dynamic RoPE stretches the context: info must report what the engine accepts."""
    _, path = make_checkpoint("llama", max_position_embeddings=24,
                              rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    data = json.loads(invoke("info", str(path), "--json").stdout)
    with tierkv.load(path) as eng:
        assert data["context_length_tokens"] == eng.context_limit_tokens


def test_info_table(tiny_llama_dir) -> None:
    result = invoke("info", str(tiny_llama_dir))
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.stdout and "parameters" in result.stdout and "88,768" in result.stdout


# -- chat ------------------------------------------------------------------------------------------
def test_chat_with_piped_input(text_model) -> None:
    result = invoke("chat", str(text_model), "--temperature", "0", "-n", "8", input="hello\n/exit\n")
    assert result.exit_code == 0, result.output
    with tierkv.load(text_model) as eng:
        ids = eng.tokenizer.encode_chat([{"role": "user", "content": "hello"}])
        expected = eng.generate(ids, max_new_tokens=8).text
    assert result.stdout.startswith(">>> ")
    assert expected in result.stdout
    assert result.stdout.count(">>> ") == 2                     # one turn, then the prompt that read /exit


def test_chat_two_turns_and_eof(text_model) -> None:
    result = invoke("chat", str(text_model), "--temperature", "0", "-n", "4", "--system", "be brief",
                    input="hello\n\nagain\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count(">>> ") == 4                     # hello, empty line, again, then EOF


def test_chat_turns_prefill_only_their_new_tokens_and_match_a_full_re_prefill(text_model, monkeypatch) -> None:
    """Three turns through `tierkv chat`: each reply equals generating from the whole rendered
    conversation, and every turn after the first feeds the session only what follows the longest
    prefix its history shares with that rendering (the KV of that prefix is kept)."""
    from tierkv.session import Session

    fed: list[tuple[int, int]] = []                 # (tokens fed to the session, history kept)
    stream = Session.stream

    def spy(self, prompt, **sampling):
        fed.append((len(prompt), len(self.token_ids)))
        return stream(self, prompt, **sampling)

    monkeypatch.setattr(Session, "stream", spy)
    lines = ["hello", "tell me more", "and then?"]
    result = invoke("chat", str(text_model), "--temperature", "0", "-n", "6", input="\n".join(lines) + "\n/exit\n")
    monkeypatch.undo()
    assert result.exit_code == 0, result.output
    messages, expected = [], []
    with tierkv.load(text_model) as eng:
        for line in lines:
            messages.append({"role": "user", "content": line})
            ids = eng.tokenizer.encode_chat(messages)
            reply = eng.generate(ids, max_new_tokens=6)
            expected.append((reply.text, len(ids)))
            messages.append({"role": "assistant", "content": reply.text})
    for text, _ in expected:
        assert text in result.stdout
    assert fed[0] == (expected[0][1], 0)
    for (n_fed, kept), (_, rendered) in zip(fed[1:], expected[1:]):
        assert n_fed + kept == rendered and 0 < kept and n_fed < rendered, fed   # the shared prefix's KV was kept


def test_chat_without_template_is_an_error(tiny_llama_dir) -> None:
    assert_one_line_error(invoke("chat", str(tiny_llama_dir), input="hi\n"), "chat_template")


# -- demo ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not DEMO_CONFIG.is_file(), reason="the bundled demo model (tierkv/demo_model/) is not trained yet")
def test_demo() -> None:
    result = invoke("demo", "-n", "8")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Return a list of")
    assert len(result.stdout.strip()) > len("Return a list of")
    assert "tierkv demo" in result.stderr and "LlamaForCausalLM" in result.stderr


def test_demo_command_on_a_stand_in_model(text_model, monkeypatch) -> None:
    """The demo command's own logic, run now on a tiny model standing in for the bundled one."""
    import tierkv.cli

    monkeypatch.setattr(tierkv.cli, "load", lambda model, **kw: tierkv.load(text_model if model == "demo" else model,
                                                                             **kw))
    result = invoke("demo", "-n", "6", "--prompt", "Hello")
    assert result.exit_code == 0, result.output
    with tierkv.load(text_model) as eng:
        expected = eng.generate("Hello", max_new_tokens=6, temperature=0.6, top_k=20, seed=2).text  # demo defaults
    assert result.stdout == "Hello" + expected + "\n"
    assert "tierkv demo" in result.stderr and "LlamaForCausalLM" in result.stderr


def test_bad_device_and_dtype_errors(tiny_llama_dir) -> None:
    missing_gpu = f"cuda:{torch.cuda.device_count()}"                  # never exists, GPU machine or not
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "--prompt-ids", "1", "--device", missing_gpu),
                          missing_gpu, "--device cpu")
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "--prompt-ids", "1", "--device", "gpu0"), "gpu0")
    assert_one_line_error(invoke("run", str(tiny_llama_dir), "--prompt-ids", "1", "--dtype", "int8"), "int8")


def test_plan_convert_and_budgeted_run(tmp_path, tiny_llama_dir) -> None:
    from typer.testing import CliRunner

    from tierkv.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["plan", str(tiny_llama_dir), "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["disk_layers"] == [] and plan["links"]["disk_read_gbps"] is None
    too_small = runner.invoke(app, ["plan", str(tiny_llama_dir), "--device-mem", "64KiB"])
    assert too_small.exit_code == 2 and "raise --device-mem to at least" in too_small.output
    out = tmp_path / "store"
    assert runner.invoke(app, ["convert", str(tiny_llama_dir), str(out)]).exit_code == 0
    assert (out / "manifest.json").is_file()
    from tierkv.config import parse_size

    minimum = parse_size(too_small.output.split("at least ")[1].split(",")[0].replace(" ", ""))
    args = ["run", str(tiny_llama_dir), "--prompt-ids", "1,2,3", "-n", "6", "--json"]
    resident = json.loads(runner.invoke(app, args).stdout)
    streamed = json.loads(runner.invoke(app, args + ["--device-mem", str(minimum), "--host-mem", "0",
                                                    "--offload-dir", str(tmp_path / "off")]).stdout)
    assert streamed["plan"]["disk_layers"] and streamed["token_ids"] == resident["token_ids"]
    assert streamed["stats"]["weights"]["disk_to_device_bytes"] > 0


def test_prefill_chunk_tokens_flag_reaches_the_plan(tiny_llama_dir) -> None:
    auto = json.loads(invoke("plan", str(tiny_llama_dir), "--device", "cpu", "--json").stdout)
    fixed = json.loads(invoke("plan", str(tiny_llama_dir), "--device", "cpu", "--json",
                              "--prefill-chunk-tokens", "5").stdout)
    assert auto["prefill_chunk_tokens"] == 2048 and fixed["prefill_chunk_tokens"] == 5
    res = invoke("run", str(tiny_llama_dir), "--prompt-ids", ",".join(map(str, range(3, 23))), "-n", "3",
                 "--prefill-chunk-tokens", "5", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["plan"]["prefill_chunk_tokens"] == 5 and "prefill" not in res.stderr   # no bar when piped
    bad = invoke("run", str(tiny_llama_dir), "--prompt-ids", "3,4", "--prefill-chunk-tokens", "0")
    assert bad.exit_code == 2


def test_prefill_progress_bar_on_a_terminal(tiny_llama_dir, monkeypatch) -> None:
    import io

    from rich.console import Console

    import tierkv.cli as cli

    screen = io.StringIO()
    monkeypatch.setattr(cli, "Console", lambda **kw: Console(file=screen, force_terminal=True, width=100))
    res = invoke("run", str(tiny_llama_dir), "--prompt-ids", ",".join(map(str, range(3, 23))), "-n", "2",
                 "--prefill-chunk-tokens", "5", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "prefill" in screen.getvalue() and "20/20" in screen.getvalue()
