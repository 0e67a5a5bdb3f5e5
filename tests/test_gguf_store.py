"""A GGUF model's weight store: its quantized weights kept 4/8-bit (bits per weight on disk), what
``--quant`` means for a GGUF file, the store cache keyed by the file, and the CLI on GGUF files."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
from typer.testing import CliRunner

import gguf_util as gu
import tierkv
from tierkv.cli import app
from tierkv.config import Budget, ConfigError, Policy
from tierkv.io.convert import cached_store, cached_store_dir, convert
from tierkv.io.store import WeightStore
from tierkv.plan import minimum_device_bytes
from tierkv.quantspec import QuantWeight, WeightQuant

PROMPT = [1, 17, 42, 99, 5]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """type -> a llama GGUF file of that type (one HF model for all)."""
    root = tmp_path_factory.mktemp("gguf")
    model = gu.tiny_hf_model("llama")
    out = {}
    for kind in ("F16", "Q4_0", "Q8_0"):
        (root / kind).mkdir()
        out[kind] = gu.write_gguf(model, root / kind / "m.gguf", kind)
    (root / "Q2_K").mkdir()                # a type without an int4/int8 form; K-quants need K % 256 == 0
    out["Q2_K"] = gu.write_gguf(gu.tiny_hf_model("llama", hidden_size=256, intermediate_size=256, head_dim=64),
                                root / "Q2_K" / "m.gguf", "Q2_K", embed_type="F16", head_type="F16")
    return out


def _layer_bits(store: WeightStore) -> float:
    """Bits per weight of a decoder layer as stored (norms included)."""
    return 8 * store.layer(0).nbytes / store.config.layer_param_count()


def test_quantized_layers_stay_4_and_8_bit_on_disk(models, tmp_path):
    bits = {}
    for kind in ("F16", "Q4_0", "Q8_0"):
        with contextlib.closing(WeightStore.open(convert(models[kind], tmp_path / kind))) as store:
            bits[kind] = _layer_bits(store)
            entry = store.layer(0).tensors["mlp.up_proj.weight"]
            assert entry.source_type == kind
            assert store.layer(0).tensors["input_layernorm.weight"].source_type == "F32"
    assert bits["Q4_0"] < 5.2 and 8 < bits["Q8_0"] < 9.2 and bits["F16"] == pytest.approx(16, abs=0.1)


def test_quant_asks_for_the_16_bit_and_other_type_weights(models, tmp_path):
    with tierkv.load(models["F16"], device="cpu", quant="int4", offload_dir=tmp_path) as engine:
        assert engine.store.quant == WeightQuant("int4")          # groups of 64: what was asked, F16 re-quantized
        assert engine.store.dtype == torch.float16
    with tierkv.load(models["Q8_0"], device="cpu", quant="int4", offload_dir=tmp_path) as engine:
        qw = engine.store.load(["layer.0"])["layer.0"]["self_attn.q_proj.weight"]
        assert isinstance(qw, QuantWeight) and qw.quant.scheme == "int8"     # the file's Q8_0 kept as int8 g32
        head = engine.store.load(["head"])["head"]["lm_head.weight"]
        assert isinstance(head, QuantWeight)
    with tierkv.load(models["Q4_0"], device="cpu", quant="none", offload_dir=tmp_path) as engine:
        assert engine.store.quant is None and not engine.store.layer(0).tensors["mlp.up_proj.weight"].quant
        assert "Q4_0 weights were dequantized to bfloat16" in engine.store.notes[0]
    with tierkv.load(models["Q2_K"], device="cpu", offload_dir=tmp_path) as engine:
        assert engine.store.quant is None
        assert "Q2_K weights have no exact int4/int8 form: dequantized to bfloat16" in engine.store.notes[0]
        assert engine.generate(PROMPT, max_new_tokens=3, temperature=0).token_ids
    with tierkv.load(models["Q2_K"], device="cpu", quant="int8", offload_dir=tmp_path) as engine:
        assert engine.store.quant == WeightQuant("int8") and "re-quantized as --quant asked" in engine.store.notes[0]


def test_the_cached_store_follows_the_file(models, tmp_path):
    path = models["Q8_0"]
    first = cached_store(path, tmp_path)
    assert first == cached_store_dir(path, tmp_path) and first.name.startswith("m-")
    stamp = (first / "weights.bin").stat().st_mtime_ns
    assert cached_store(path, tmp_path) == first and (first / "weights.bin").stat().st_mtime_ns == stamp  # reused
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))    # the file changed
    second = cached_store(path, tmp_path)
    assert second != first and second.is_dir() and not first.exists()               # the stale store is gone
    assert json.loads((second / "generation_config.json").read_text())["bos_token_id"] == 0
    assert (second / "tokenizer.json").is_file() and (second / "tokenizer_config.json").is_file()


def test_a_gguf_store_without_tokenizer_files_runs_token_ids_and_refuses_text(tmp_path):
    path = gu.write_gguf(gu.tiny_hf_model("qwen2"), tmp_path / "m.gguf", "Q8_0", tokenizer=False,
                         extra={"tokenizer.ggml.eos_token_id": ("uint32", 1)})
    with tierkv.load(path, device="cpu", offload_dir=tmp_path / "off") as engine:
        assert engine.tokenizer is None and 1 in engine.eos_token_ids
        assert not (engine.model_dir / "tokenizer.json").exists()
        note = engine.store.notes[0]
        assert note.startswith("no tokenizer files: ") and "has no tokenizer.ggml.tokens" in note
        assert len(engine.generate(PROMPT, max_new_tokens=4, temperature=0, ignore_eos=True).token_ids) == 4
        with pytest.raises(ConfigError, match="has no tokenizer.json, so text prompts cannot be encoded"):
            engine.generate("hello")


def test_cli_info_convert_run_and_plan(models, tmp_path):
    runner = CliRunner()
    path = str(models["Q4_0"])
    info = runner.invoke(app, ["info", path, "--json"])
    assert info.exit_code == 0, info.output
    facts = json.loads(info.output)
    assert facts["gguf_architecture"] == "llama" and facts["architecture"] == "LlamaForCausalLM"
    assert facts["tensor_types"] == "5 F32, 16 Q4_0" and 4.5 < facts["bits_per_weight_file"] < 4.7
    assert facts["weight_quant"] == {"scheme": "int4", "group_size": 32, "head": True}
    shown = runner.invoke(app, ["info", path])
    assert shown.exit_code == 0 and "bits per weight store" in shown.output
    out = tmp_path / "store"
    conv = runner.invoke(app, ["convert", path, str(out), "--json", "--device", "cpu"])
    assert conv.exit_code == 0, conv.output
    assert json.loads(conv.output)["quant"] == {"scheme": "int4", "group_size": 32, "head": True}
    run = runner.invoke(app, ["run", str(out), "--prompt-ids", "1,2,3", "-n", "3", "--json", "--device", "cpu"])
    assert run.exit_code == 0, run.output
    direct = runner.invoke(app, ["run", path, "--prompt-ids", "1,2,3", "-n", "3", "--json", "--device", "cpu",
                                 "--offload-dir", str(tmp_path / "off")])
    assert direct.exit_code == 0, direct.output
    assert json.loads(direct.output)["token_ids"] == json.loads(run.output)["token_ids"]
    plan = runner.invoke(app, ["plan", path, "--device", "cpu", "--offload-dir", str(tmp_path / "off")])
    assert plan.exit_code == 0 and "int4 (groups of 32" in plan.output, plan.output
    bad = runner.invoke(app, ["info", str(tmp_path / "missing.gguf")])
    assert bad.exit_code == 2 and "missing.gguf does not exist" in bad.output


def test_mixed_schemes_per_tensor_plan_and_stream(tmp_path):
    """A file mixing types per tensor as llama-quantize does (ffn_down of width 80, which no block of 32
    divides, kept F16; one layer's ffn_down Q8_0) keeps each tensor's own scheme; the planner sizes the
    layers from the store's layout, and streaming under a small budget gives the resident tokens."""
    model = gu.tiny_hf_model("llama", intermediate_size=80)
    path = gu.write_gguf(model, tmp_path / "m.gguf", "Q4_0", types={"model.layers.0.mlp.down_proj.weight": "F16",
                                                                    "model.layers.1.mlp.down_proj.weight": "F16",
                                                                    "model.layers.1.self_attn.v_proj.weight": "Q8_0"})
    with tierkv.Engine(path, Policy(device="cpu"), Budget(offload_dir=tmp_path / "off")) as engine:
        layers = [engine.store.layer(j).tensors for j in range(2)]
        assert layers[0]["mlp.down_proj.weight"].quant is None and layers[0]["mlp.down_proj.weight"].dtype == "bfloat16"
        assert layers[0]["self_attn.v_proj.weight"].quant.scheme == "int4"
        assert layers[1]["self_attn.v_proj.weight"].quant.scheme == "int8"
        assert engine.store.quant == WeightQuant("int4", 32, head=True)
        expected = engine.generate(PROMPT, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
        layer_bytes = engine.plan.layer_bytes
        assert layer_bytes == max(engine.store.layer(j).padded_nbytes for j in range(2))
    policy = Policy(device="cpu", kv="exact", kv_device_tokens=64, weight_quant=WeightQuant("int4", 32, head=True))
    layout = list(WeightStore.open(engine.model_dir).extents.values())
    budget = minimum_device_bytes(engine.config, policy, context_tokens=64, layout=layout) + layer_bytes // 2
    with tierkv.load(path, device="cpu", device_mem=budget, host_mem=0, offload_dir=tmp_path / "off", kv="exact",
                     kv_device_tokens=64) as streamed:
        assert streamed.plan.disk_layers
        assert streamed.generate(PROMPT, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids == expected
    runner = CliRunner()
    plan = runner.invoke(app, ["plan", str(path), "--device", "cpu", "--offload-dir", str(tmp_path / "off")])
    assert plan.exit_code == 0, plan.output


def test_an_interrupted_gguf_conversion_resumes_and_a_damaged_extent_is_repaired(models, tmp_path):
    out, path = tmp_path / "store", models["Q4_0"]
    whole = convert(path, tmp_path / "whole")
    first_layer = WeightStore.open(whole).layer(0)

    def interrupt(done: int, total: int) -> None:
        if done > first_layer.offset + first_layer.padded_nbytes:     # the embedding and layer 0 are on disk
            raise KeyboardInterrupt("simulated ^C")
    with pytest.raises(KeyboardInterrupt):
        convert(path, out, progress=interrupt)
    calls: list[int] = []
    convert(path, out, progress=lambda done, total: calls.append(done))
    assert calls[0] > first_layer.offset, "the second run resumes after the extents already on disk"
    assert (out / "weights.bin").read_bytes() == (whole / "weights.bin").read_bytes()
    with open(out / "weights.bin", "r+b") as f:                        # flip a byte of layer 1
        f.seek(WeightStore.open(out).layer(1).offset + 100)
        f.write(b"\xff" if f.read(1) != b"\xff" else b"\x00")
    lines: list[str] = []
    convert(path, out, report=lines.append)
    assert any("layer 1 failed its checksum: re-converting it" in line for line in lines), lines
    assert (out / "weights.bin").read_bytes() == (whole / "weights.bin").read_bytes()


def test_a_cached_gguf_store_opens_without_parsing_the_file_again(models, tmp_path, monkeypatch):
    with tierkv.load(models["Q8_0"], device="cpu", offload_dir=tmp_path) as first:
        expected = first.generate(PROMPT, max_new_tokens=3, temperature=0, ignore_eos=True).token_ids

    def parse(*args, **kwargs):
        raise AssertionError("the cached store's dtype should come from its manifest")
    monkeypatch.setattr(tierkv.loader, "GGUFCheckpoint", parse)
    with tierkv.load(models["Q8_0"], device="cpu", offload_dir=tmp_path) as again:
        assert again.model_dir == first.model_dir and again.dtype == torch.bfloat16
        assert again.generate(PROMPT, max_new_tokens=3, temperature=0, ignore_eos=True).token_ids == expected
