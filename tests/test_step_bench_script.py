"""The arithmetic of ``scripts/bench_step.py`` (ratios, goals, bytes per decode step), on hand-made inputs."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import ModuleType

import pytest
from scripts_util import load_script



@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("bench_step")


def _safetensors(path: Path, tensors: dict[str, int]) -> None:
    """A header-only safetensors file naming tensors of the given byte sizes (the data is not read)."""
    header, offset = {}, 0
    for name, n in tensors.items():
        header[name] = {"dtype": "BF16", "shape": [n // 2], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_a_decode_step_reads_the_embedding_only_when_it_is_the_head(bench: ModuleType, tmp_path: Path) -> None:
    _safetensors(tmp_path / "model.safetensors", {"model.embed_tokens.weight": 100, "model.layers.0.w": 10,
                                                  "lm_head.weight": 100})
    assert bench.step_weight_bytes(tmp_path) == 110
    (tmp_path / "model.safetensors").unlink()
    _safetensors(tmp_path / "model.safetensors", {"model.embed_tokens.weight": 100, "model.layers.0.w": 10})
    assert bench.step_weight_bytes(tmp_path) == 110            # tied: the embedding is the head


def test_ratios_and_goals_per_model_and_prompt_length(bench: ModuleType) -> None:
    runs = {"135m/decode/tierkv": {"tok_s": 60.0, "load_avg": 1.0}, "135m/decode/hf": {"tok_s": 30.0},
            "135m/decode/llama": {"tg_best": 100.0, "tg_tok_s": 90.0},
            "135m/prefill/tierkv": {"prefill_tok_s": {"512": 900.0, "4096": 500.0}},
            "135m/prefill/hf": {"prefill_tok_s": {"512": 1000.0, "4096": 250.0}},
            "135m/prefill/llama": {"pp_best_by_tokens": {512: 1800.0}, "pp_error": "p 4096: killed by SIGILL"}}
    s = bench.summarize(runs, {"135m": {"step_bytes": 2e8}}, ["135m"], [512, 4096])
    d = s["decode"]["135m"]
    assert (d["tierkv_vs_llama"], d["tierkv_vs_hf"]) == (0.6, 2.0)
    assert d["weight_gbps"] == {"tierkv": 12.0, "hf": 6.0, "llama": 20.0}
    assert s["prefill"]["135m/512"]["tierkv_vs_hf"] == 0.9 and s["prefill"]["135m/512"]["tierkv_vs_llama"] == 0.5
    assert s["prefill"]["135m/4096"]["tierkv_vs_llama"] is None
    assert s["prefill"]["135m/errors"] == {"llama pp": "p 4096: killed by SIGILL"}
    assert s["goals"] == {"135m_decode_ge_0.5x_llama": True, "135m_decode_ge_1.5x_hf": True,
                          "135m_prefill512_ge_1.0x_hf": False, "135m_prefill4096_ge_1.0x_hf": True}
    assert any("FAILED" in v for _, v in bench.table_rows(s))


def test_a_missing_llama_bench_skips_its_column_with_the_fix(bench: ModuleType, tmp_path: Path) -> None:
    args = bench.parse_args(["--llama-bench", str(tmp_path / "nope"), "--models", "0.85b"])
    why = bench.llama_unavailable(args)
    assert why is not None and "--llama-bench" in why and "skipped" in why
    with pytest.raises(SystemExit):
        bench.parse_args(["--engines", "tierkv,vllm"])


def test_compile_adds_the_compiled_engine_beside_eager_tierkv(bench: ModuleType) -> None:
    cost = {"compile_s": 12.5, "graphs": 4, "recompiles": 2, "fallback_reason": ""}
    runs = {"135m/decode/tierkv": {"tok_s": 20.0}, "135m/decode/tierkv-compiled": {"tok_s": 18.0, "compile": cost},
            "135m/prefill/tierkv": {"prefill_tok_s": {"512": 100.0}},
            "135m/prefill/tierkv-compiled": {"prefill_tok_s": {"512": 130.0}, "compile": cost}}
    s = bench.summarize(runs, {"135m": {}}, ["135m"], [512])
    assert s["decode"]["135m"]["compiled_vs_eager"] == 0.9 and s["decode"]["135m"]["compile"] == cost
    assert s["prefill"]["135m/512"]["tierkv_compiled"] == 130.0 and s["prefill"]["135m/512"]["compiled_vs_eager"] == 1.3
    rows = dict(bench.table_rows(s))
    assert "0.90x" in rows["135m decode compiled"] and "4 graphs in 12.5 s" in rows["135m prefill 512 compiled"]
    assert bench.parse_args(["--compile"]).compile and not bench.parse_args([]).compile
    assert "tierkv-compiled" not in bench.summarize({"135m/decode/tierkv": {"tok_s": 1.0}}, {}, ["135m"], [])["decode"]["135m"]


def test_weight_rates_as_a_share_of_the_memory_read_ceiling(bench: ModuleType) -> None:
    runs = {"135m/decode/tierkv": {"tok_s": 60.0}, "135m/decode/hf": {"tok_s": 30.0}}
    s = bench.summarize(runs, {"135m": {"step_bytes": 2e8}}, ["135m"], [], read_gbps=24.0)
    assert s["decode"]["135m"]["of_read_ceiling"] == {"tierkv": 0.5, "hf": 0.25}
    assert "tierkv 12.0 (50% of the read ceiling)" in dict(bench.table_rows(s))["135m decode"]
    unmeasured = bench.summarize(runs, {"135m": {"step_bytes": 2e8}}, ["135m"], [])      # no C++ compiler: no ceiling
    assert unmeasured["decode"]["135m"]["of_read_ceiling"] == {}
    assert "read ceiling" not in dict(bench.table_rows(unmeasured))["135m decode"]
