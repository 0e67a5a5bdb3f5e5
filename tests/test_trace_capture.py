"""Tracer tests on real PyTorch profiler output: tiny torch ops, then a tiny random Llama sweep.

On a CPU-only machine the traces hold no GPU kernels, so these check the real chrome-trace format
(cpu_op / user_annotation events, External ids), the CPU side of the report, and that GPU fields
say "no GPU kernels" instead of showing zeros. With CUDA present they also check that kernels are
found and linked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tierkv.trace.analyze import analyze_trace
from tierkv.trace.capture import make_prompts, profile_call, run_sweep
from tierkv.trace.cli import trace_app

CUDA = torch.cuda.is_available()


def _tiny_workload() -> torch.Tensor:
    dev = "cuda" if CUDA else "cpu"
    x = torch.randn(32, 32, device=dev)
    with torch.profiler.record_function("tierkv::prefill"):
        y = torch.relu(x @ x)
    for _ in range(3):
        with torch.profiler.record_function("tierkv::decode"):
            y = (y @ x).softmax(-1)
    with torch.profiler.record_function("tierkv::h2d_copy"):
        z = torch.ones(16).to(dev)
    return y.sum() + z.sum()


def test_real_profiler_trace_of_tiny_ops(tmp_path: Path) -> None:
    path = tmp_path / "ops.json"
    _, wall_us = profile_call(_tiny_workload, path)
    assert wall_us > 0 and path.stat().st_size > 0
    r = analyze_trace(path)
    assert r.phases["prefill"] is not None and r.phases["decode"] is not None
    assert r.phases["prefill"].cpu.span_count == 1 and r.phases["decode"].cpu.span_count == 3
    names = {o.name for o in r.overall.cpu.top_operators}
    assert "aten::mm" in names or "aten::matmul" in names
    spans = {s.name: s.count for s in r.tierkv_spans}
    assert spans["tierkv::decode"] == 3 and spans["tierkv::generate"] == 1 and spans["tierkv::h2d_copy"] == 1
    assert r.overall.il_us > 0 and r.overall.cpu.outside_ops_us >= 0
    if CUDA:
        assert r.gpu_available and r.overall.gpu.kernel_count > 0
        assert r.overall.gpu.orphan_kernel_count < r.overall.gpu.kernel_count
        assert r.verdict.bound in ("cpu", "gpu")
    else:
        d = r.to_dict()
        assert d["gpu"] == {"available": False, "reason": "trace holds no GPU kernels"}
        assert d["overall"]["gpu"] is None and d["verdict"]["bound"] is None


def test_make_prompts_reproducible() -> None:
    a = make_prompts(128, 3, 5, seed=1)
    assert a == make_prompts(128, 3, 5, seed=1) and len(a) == 3 and all(len(p) == 5 for p in a)
    assert all(0 <= t < 128 for p in a for t in p)
    with pytest.raises(ValueError):
        make_prompts(128, 0, 5)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny_llama")
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                   eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def test_run_sweep_on_tiny_llama(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    seen: list[int] = []
    run_sweep(str(tiny_llama), [2, 1], prompt_len=8, new_tokens=3, out_dir=out,
                       dtype="float32", on_run=lambda run: seen.append(run.batch_size))
    assert seen == [1, 2]
    assert (out / "trace_b1.json").exists() and (out / "trace_b2.json").exists()
    assert (out / "tklqt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads((out / "report.json").read_text())
    assert [b["batch_size"] for b in d["batches"]] == [1, 2] and d["rule"].startswith("GPU-bound when")
    for batch in d["batches"]:
        rep = batch["report"]
        assert batch["generated_tokens"] == 3 * batch["batch_size"]
        assert rep["phases"]["prefill"]["cpu"]["span_count"] == 1
        assert rep["phases"]["decode"]["cpu"]["span_count"] == 2  # first token comes from prefill
        assert rep["overall"]["cpu"]["cpu_op_count"] > 0
        if not CUDA:
            assert rep["gpu"]["available"] is False and rep["overall"]["gpu"] is None
    if not CUDA:
        assert d["transition_batch_size"] is None and all(p["tklqt_us"] is None for p in d["points"])


def test_cli_run_json(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(trace_app, ["run", str(tiny_llama), "--batch-sizes", "1,2",
                                            "--prompt-len", "4", "--new-tokens", "2", "--out", str(out),
                                            "--dtype", "float32", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert [p["batch_size"] for p in d["points"]] == [1, 2] and (out / "report.json").exists()


def test_cli_run_bad_arguments(tmp_path: Path) -> None:
    bad = CliRunner().invoke(trace_app, ["run", "m", "--batch-sizes", "1,x", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "positive integers" in bad.output
    missing = CliRunner().invoke(trace_app, ["run", str(tmp_path / "nope"), "--batch-sizes", "1",
                                             "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output


def test_streaming_sweep_shows_reader_thread_disk_reads(tiny_llama: Path, tmp_path: Path) -> None:
    """With a budget that streams layers from disk, the trace holds tierkv's reader-thread
    ``tierkv::disk_read`` spans beside the main thread's waits, so a stall is visible."""
    from tierkv.plan import minimum_device_bytes
    import tierkv

    with tierkv.load(tiny_llama, dtype="float32", device="cpu") as eng:
        device_mem = minimum_device_bytes(eng.config, tierkv.Policy(dtype="float32", device="cpu"))  # every layer streams
    out = tmp_path / "streamed"
    run_sweep(str(tiny_llama), [1], prompt_len=8, new_tokens=3, out_dir=out, dtype="float32", device="cpu",
              device_mem=device_mem, host_mem=0, offload_dir=str(tmp_path / "offload"))
    report = json.loads((out / "report.json").read_text())["batches"][0]["report"]
    spans = {s["name"]: s for s in report["tierkv_spans"]}
    link = "disk->device" if not CUDA else "disk->host"
    assert spans[f"tierkv::move {link}"]["count"] > 0 and "tierkv::wait" in spans
    moves = {m["link"]: m for m in report["moves"]}
    assert moves[link]["moves"] > 0 and moves[link]["bytes"] > 0


def test_trace_of_a_streamed_generation_shows_every_weight_read_with_its_bytes(tmp_path: Path) -> None:
    """Every layer streams from disk on each forward: the trace's move spans name those reads and add
    up to the bytes the weight source counted, give or take the prefetches still in flight at the end."""
    from conftest import build_hf_model, save_hf_model

    from tierkv.config import Policy
    from tierkv.engine import Engine
    from tierkv.io.convert import convert
    from tierkv.io.store import WeightStore, layer_extent_name
    from tierkv.pipeline.weights import StreamingWeights
    from tierkv.trace.moves import parse_move_span

    n_layers, depth, new_tokens = 3, 1, 4
    ckpt = save_hf_model(build_hf_model("llama", num_hidden_layers=n_layers), tmp_path / "model")
    store = WeightStore.open(convert(ckpt, tmp_path / "store"))
    weights = StreamingWeights(store, "cpu", (), (), depth, 64 << 20, 0)
    with Engine(ckpt, Policy(device="cpu"), weights=weights) as engine:
        out, _ = profile_call(lambda: engine.generate([3, 17, 42, 5], max_new_tokens=new_tokens), tmp_path / "t.json")
    counted = out.stats.weights
    report = analyze_trace(tmp_path / "t.json")
    (row,) = [m for m in report.moves if m.link == "disk->device"]
    layer = store.layer(0).padded_nbytes
    assert all(store.layer(j).padded_nbytes == layer for j in range(n_layers))
    forwards = new_tokens                                  # prefill + (new_tokens - 1) decode steps
    assert forwards * n_layers <= row.moves <= forwards * n_layers + depth + 1
    assert row.bytes == row.moves * layer and row.busy_us > 0 and row.gbps > 0
    assert counted["disk_to_device_bytes"] <= row.bytes <= counted["disk_to_device_bytes"] + (depth + 1) * layer
    whats = {parse_move_span(e["name"]).what for e in _events(tmp_path / "t.json")
             if e.get("name", "").startswith("tierkv::move ")}
    assert whats == {layer_extent_name(j) for j in range(n_layers)}


def _events(path: Path) -> list[dict]:
    return json.loads(path.read_text())["traceEvents"]
