"""The arithmetic of ``scripts/bench_gguf.py``, on hand-made inputs.

The script turns llama-bench's JSON, a GGUF file's tensor table and tierkv's store into the
ratios and bits per weight docs/benchmarks.md quotes; these tests check that reading and that
arithmetic on inputs worked out by hand (GGUF files written here with gguf's own writer). The
measurements themselves are the script's job, not the tests'."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from scripts_util import load_script



@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("bench_gguf")


@pytest.fixture(scope="module")
def common(bench: ModuleType) -> ModuleType:
    """The shared benchmark module (the llama-bench runner lives there), as bench_gguf imported it."""
    return sys.modules["bench_common"]


def _llama_row(n_prompt: int, n_gen: int, samples: list[float]) -> dict:
    return {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "Xeon", "n_prompt": n_prompt, "n_gen": n_gen,
            "avg_ts": sum(samples) / len(samples), "stddev_ts": 0.5, "samples_ts": samples}


def test_llama_bench_json_gives_tg_and_pp_means_and_best_repetitions(common: ModuleType) -> None:
    text = "some log line\n" + json.dumps([_llama_row(0, 32, [20.0, 22.0, 21.0]), _llama_row(128, 0, [90.0, 110.0])])
    got = common.parse_llama_bench(text)
    assert got["tg_tok_s"] == pytest.approx(21.0) and got["tg_best"] == 22.0 and got["tg_tokens"] == 32
    assert got["pp_tok_s"] == pytest.approx(100.0) and got["pp_best"] == 110.0 and got["pp_tokens"] == 128
    assert got["build"] == "0c1e570 (1)"
    assert got["pp_best_by_tokens"] == {128: 110.0}
    assert common.parse_llama_bench("no json at all") == {"tg_tok_s": None, "pp_tok_s": None}


def test_several_prompt_lengths_keep_one_number_each(common: ModuleType) -> None:
    text = json.dumps([_llama_row(512, 0, [800.0]), _llama_row(4096, 0, [500.0, 520.0])])
    got = common.parse_llama_bench(text)
    assert got["pp_best_by_tokens"] == {512: 800.0, 4096: 520.0}
    assert got["pp_mean_by_tokens"] == {512: 800.0, 4096: 510.0}
    cmd = common.llama_bench_cmd(Path("llama-bench"), Path("m.gguf"), 2, 0, [512, 4096], [], repeats=1)
    assert cmd[cmd.index("-p") + 1] == "512,4096" and cmd[cmd.index("-r") + 1] == "1"


def test_a_crashed_process_is_named_by_its_signal(common: ModuleType) -> None:
    assert common.exit_reason(-11, "") == "killed by SIGSEGV"
    assert common.exit_reason(1, "loading\nerror: no such file\n\n") == "exit 1: error: no such file"


def _write_gguf(path: Path, tied: bool) -> None:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((64, 32)).astype(np.float16))        # 64 x 32, 4096 B
    q = gguf.quants.quantize(rng.standard_normal((32, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)          # 2048 w, 34 B/32
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))                    # 256 B
    if not tied:
        w.add_tensor("output.weight", rng.standard_normal((64, 32)).astype(np.float32))      # 8192 B
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_sizes_count_layers_and_what_a_decode_step_reads(bench: ModuleType, tmp_path: Path) -> None:
    _write_gguf(tmp_path / "untied.gguf", tied=False)
    f = bench.gguf_facts(tmp_path / "untied.gguf")
    q8_bytes = 32 * 64 // 32 * 34
    assert f["params"] == 2048 + 2048 + 64 + 2048
    assert f["tensor_bytes"] == 4096 + q8_bytes + 256 + 8192
    assert (f["layer_params"], f["layer_bytes"]) == (2048 + 64, q8_bytes + 256)
    assert f["step_bytes"] == f["tensor_bytes"] - 4096             # the embedding is one row per token
    assert f["types"] == {"F16": 1, "F32": 2, "Q8_0": 1}
    assert f["layer_bpw"] == round(8 * (q8_bytes + 256) / 2112, 3)
    _write_gguf(tmp_path / "tied.gguf", tied=True)
    tied = bench.gguf_facts(tmp_path / "tied.gguf")
    assert tied["step_bytes"] == tied["tensor_bytes"]              # the embedding is the LM head too


def test_store_step_bytes_drop_the_embedding_only_beside_a_head(bench: ModuleType) -> None:
    assert bench.step_bytes_of({"embed": 100, "layer.0": 10, "norm": 1, "head": 50}) == 61
    assert bench.step_bytes_of({"embed": 100, "layer.0": 10, "norm": 1}) == 111


def _runs() -> dict:
    return {"llama[build]/m.gguf/t2": {"tg_best": 20.0, "tg_tok_s": 19.0, "tg_std": 0.4, "pp_error": "killed by SIGILL",
                                      "load_avg": 0.3},
            "llama[build-noamx]/m.gguf/t2": {"tg_best": 25.0, "tg_tok_s": 24.0, "pp_best": 300.0, "pp_tok_s": 290.0},
            "tierkv/m.gguf/t2": {"tok_s": 15.0, "step_bytes": 4e8, "load_avg": 0.5},
            "bf16/t2": {"tok_s": 7.5, "step_bytes": 1.6e9}, "own/t2": {"tok_s": 12.0, "step_bytes": 4.2e8},
            "convert/m.gguf": {"convert_s": 30.0, "memcap_peak_bytes": 700 << 20, "memcap_limit_bytes": 768 << 20,
                               "memcap_oom_kills": 0, "store": {"extent_bytes": 5e8, "layer_bytes": 4e8}}}


def test_ratios_take_the_fastest_working_llama_build_and_the_same_threads(bench: ModuleType) -> None:
    files = {"m.gguf": {"params": 8e8, "layer_params": 7e8, "tensor_bytes": 4.5e8, "step_bytes": 4e8,
                        "bpw": 4.5, "layer_bpw": 4.4, "file_bytes": 4.6e8}}
    s = bench.summarize(_runs(), files, [2])
    row = s["rows"]["m.gguf/t2"]
    assert (row["llama_tg_best"], row["llama_tg_build"], row["llama_pp128_best"]) == (25.0, "build-noamx", 300.0)
    assert row["llama_errors"] == {"build pp": "killed by SIGILL"}
    assert row["tierkv_vs_llama"] == 0.6 and row["tierkv_vs_llama_mean"] == 0.625
    assert row["tierkv_vs_bf16"] == 2.0 and row["tierkv_vs_own"] == 1.25
    assert row["llama_weight_gbps"] == 10.0 and row["tierkv_weight_gbps"] == 6.0
    assert s["goals"] == {"m.gguf_t2_ge_0.5x_llama": True}
    conv = s["convert"]["m.gguf"]
    assert conv["store_bpw"] == 5.0 and conv["store_layer_bpw"] == round(8 * 4e8 / 7e8, 3)
    assert conv["store_vs_gguf_bytes"] == round(5e8 / 4.5e8, 3)
    assert any(k.startswith("convert m.gguf") for k, _ in bench.table_rows(s))


def test_missing_llama_numbers_leave_no_goal(bench: ModuleType) -> None:
    runs = {"tierkv/m.gguf/t1": {"tok_s": 15.0}, "llama[build]/m.gguf/t1": {"error": "x", "tg_error": "x"}}
    files = {"m.gguf": {"params": 1, "layer_params": 1, "tensor_bytes": 1, "step_bytes": 1, "bpw": 8.0,
                        "layer_bpw": 8.0, "file_bytes": 1}}
    s = bench.summarize(runs, files, [1])
    assert s["goals"] == {} and s["rows"]["m.gguf/t1"]["tierkv_vs_llama"] is None
    assert s["rows"]["m.gguf/t1"]["llama_errors"] == {"build tg": "x"}
