"""The arithmetic of the quantization benchmark and quality scripts, on hand-made inputs.

``scripts/bench_quant.py`` turns worker results into ratios and goals, and decides which HF peer
"truly ran offloaded"; ``scripts/eval_quant_quality.py`` turns logits into relative error, greedy
agreement and NLL. Both are what docs/benchmarks.md quotes, so they are checked here on inputs
worked out by hand (the measurements themselves are the scripts' job, not the tests')."""

from __future__ import annotations

import math
from types import ModuleType

import pytest
import torch
from scripts_util import load_script



def _script(name: str) -> ModuleType:
    return load_script(name)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _script("bench_quant")


@pytest.fixture(scope="module")
def quality() -> ModuleType:
    return _script("eval_quant_quality")


def _stream(tok_s: float, bytes_per_token: float, layer_bytes: int) -> dict:
    return {"cold": {"tok_s": tok_s, "disk_bytes_per_step": bytes_per_token, "timing_consistent": True},
            "plan": {"disk_layers": 11, "layer_bytes": layer_bytes}, "streamed": True}


def test_stream_ratios_and_goals_are_against_bf16_of_the_same_mode(bench: ModuleType) -> None:
    st = {"raw_gbps": [1.0, 1.5], "runs": {
        "same-layers/bf16": _stream(2.0, 1000.0, 100), "same-layers/int8": _stream(3.0, 530.0, 53),
        "same-layers/int4": _stream(6.2, 280.0, 28), "same-budget/bf16": _stream(1.0, 1000.0, 100),
        "same-budget/int4": _stream(2.9, 100.0, 28)}}
    out, goals = bench.summarize_stream(st)
    assert out["raw_odirect_gbps"] == 1.5
    assert out["stream"]["same-layers/int8"]["tok_s_vs_bf16"] == 1.5
    assert out["stream"]["same-layers/int8"]["bytes_vs_bf16"] == 0.53
    assert out["stream"]["same-budget/int4"]["tok_s_vs_bf16"] == 2.9
    assert goals == {"stream_same-layers_int8_tok_s_ge_1.7x": False, "stream_same-layers_int8_bytes_le_0.55x": True,
                     "stream_same-layers_int4_tok_s_ge_3.0x": True, "stream_same-layers_int4_bytes_le_0.3x": True,
                     "stream_same-budget_int4_tok_s_ge_3.0x": False, "stream_same-budget_int4_bytes_le_0.3x": True}


def test_a_peer_counts_as_offloaded_only_when_it_generated_with_layers_on_disk(bench: ModuleType) -> None:
    peers = {"accelerate": {"runs": True, "cold_tok_s": 1.0, "disk_layers": 9},
             "bnb4": {"runs": True, "cold_tok_s": 0.5, "disk_layers": 0},                # fits in RAM
             "bnb4@quarter": {"runs": False, "stage": "generate", "error": "meta tensor", "disk_layers": 12},
             "quanto4": {"runs": False, "stage": "load", "error": "refused"}}
    st = {"runs": {"same-budget/int4": _stream(4.0, 0.0, 28)}}
    out, goals = bench.summarize_peers(peers, st)
    assert [k for k, v in out["peers"].items() if v["truly_offloaded"]] == ["accelerate"]
    assert out["best_offloaded_quant_peer"] is None and goals == {}
    assert out["best_running_quant_peer"] == "bnb4" and out["stream_int4_vs_running_quant_peer"] == 8.0
    assert out["stream_int4_vs_accelerate_bf16"] == 4.0
    peers["bnb8"] = {"runs": True, "cold_tok_s": 2.5, "disk_layers": 3}
    out, goals = bench.summarize_peers(peers, st)
    assert out["best_offloaded_quant_peer"] == "bnb8" and goals == {"stream_int4_ge_2x_bnb8": False}


def test_resident_ratios(bench: ModuleType) -> None:
    res = {"bf16": {"tok_s": 5.0}, "int8": {"tok_s": 8.0}, "int4": {"tok_s": 9.0}, "hf": {"tok_s": 4.0}}
    out, goals = bench.summarize_resident(res)
    assert out["resident_int8_vs_bf16"] == 1.6 and out["resident_int4_vs_bf16"] == 1.8
    assert out["resident_bf16_vs_hf"] == 1.25
    assert goals == {"resident_int8_ge_1.5x_bf16": True, "resident_int4_ge_2.0x_bf16": False}


def test_compare_by_hand(quality: ModuleType) -> None:
    # one sequence [0, 1, 2], first generated token at index 1: positions 0 and 1 predict ids 1 and 2
    ref = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    same = quality.compare([ref], [ref.clone()], [([0, 1, 2], 1)])
    assert same["rel_err"] == 0.0 and same["agree"] == 1.0 and same["tokens"] == 2
    lse = math.log(math.exp(2.0) + 2.0)
    assert same["nll"] == pytest.approx(lse - 2.0, rel=1e-6) and same["ppl"] == pytest.approx(math.exp(lse - 2.0))
    flipped = ref.clone()
    flipped[1] = torch.tensor([2.0, 0.0, 0.0])         # position 1 now predicts id 0: one of two disagrees
    got = quality.compare([ref], [flipped], [([0, 1, 2], 1)])
    assert got["agree"] == 0.5
    assert got["rel_err"] == pytest.approx(math.sqrt(8.0) / math.sqrt(9.0), rel=1e-6)
    assert got["nll"] == pytest.approx(((lse - 2.0) + lse) / 2, rel=1e-6)


def test_quality_rows_cover_every_group_size(quality: ModuleType) -> None:
    rows = quality.configs([32, 64, 128])
    assert rows[0] == ("bf16", None) and len(rows) == 7
    assert {(s, g) for s, g in rows[1:]} == {(s, g) for s in ("int8", "int4") for g in (32, 64, 128)}


def test_scheme_entries_may_name_their_group_size(bench: ModuleType) -> None:
    assert bench.split_scheme("int8", 64) == ("int8", 64)
    assert bench.split_scheme("int8:channel", 64) == ("int8", "channel")
    assert bench.split_scheme("int4:32", 64) == ("int4", 32)
    assert bench.load_kwargs("bf16", 64) == {}
    assert bench.load_kwargs("int4:128", 64, head=True) == {"quant": "int4", "group_size": 128, "quant_head": True}


def test_scheme_variants_name_their_environment_and_keep_the_scheme(bench: ModuleType) -> None:
    """"@dynamic" / "@nofuse" after a scheme entry: the worker's environment; scheme and group unchanged."""
    assert bench.split_variant("int8:channel@dynamic+nofuse") == (
        "int8:channel", {"TIERKV_CPU_QLINEAR": "dynamic_int8", "TIERKV_FUSE_LINEARS": "0"})
    assert bench.split_variant("bf16") == ("bf16", {})
    assert bench.split_scheme("int4:32@nofuse", 64) == ("int4", 32)
    assert bench.split_scheme("int8@dynamic", 64) == ("int8", 64)
    with pytest.raises(SystemExit, match="nofuse"):
        bench.split_variant("int4@fast")
    out, goals = bench.summarize_resident({"bf16": {"tok_s": 10.0}, "int8:channel@dynamic": {"tok_s": 16.0},
                                           "hf": {"tok_s": 8.0}})
    assert out["resident_int8:channel@dynamic_vs_bf16"] == 1.6
    assert goals == {"resident_int8:channel@dynamic_ge_1.5x_bf16": True}
