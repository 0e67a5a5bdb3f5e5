"""The planner counts compressed sizes on every tier, and plans from a config.json alone.

The headline case: a Llama-3.1-70B shape (tests/configs/llama-3.1-70b: only its config.json) on a
24 GiB device with 64 GiB of host memory, in bf16, int8 and int4.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import psutil
import pytest
import torch
from typer.testing import CliRunner

from tierkv.cli import app
from tierkv.config import Budget, ModelConfig, Policy
from tierkv.plan import (LinkSpeeds, PlanError, kv_stored_bytes_per_token, layer_sizes, make_plan,
                         minimum_device_bytes)
from tierkv.plan_compare import COLUMNS, compare_plans, comparison_rows
from tierkv.probe import (SAMPLES, ComputeEstimate, LinkCache, disk_key, estimate_layer_compute, matvec_bytes,
                          matvec_key)
from tierkv.quantspec import SCHEMES, WeightQuant, kv_chunk_bytes, weight_bytes_per_param

CONFIG_DIR = Path(__file__).parent / "configs" / "llama-3.1-70b"
CONFIG = ModelConfig.from_dir(CONFIG_DIR)
LINKS = LinkSpeeds(disk_read_gbps=3.0, h2d_gbps=math.inf, layer_compute_s=0.05)
GPU_LINKS = LinkSpeeds(disk_read_gbps=6.0, h2d_gbps=25.0, layer_compute_s=0.002)
BUDGET = dict(device_mem="24GiB", host_mem="64GiB")


def _plan(scheme: str | None, device: str = "cpu", links: LinkSpeeds = LINKS, kv_quant: str = "none",
          tmp: Path = Path("/tmp/tierkv-plan-quant-test")):
    quant = WeightQuant(scheme) if scheme else None
    budget = Budget.parse(offload_dir=str(tmp), **BUDGET)
    return make_plan(CONFIG, budget, Policy(device=device, weight_quant=quant, kv_quant=kv_quant), links,
                     config_only=True)


def test_the_70b_config_parses_as_llama3():
    assert (CONFIG.num_layers, CONFIG.hidden_size, CONFIG.num_heads, CONFIG.num_kv_heads) == (80, 8192, 64, 8)
    assert CONFIG.intermediate_size == 28672 and CONFIG.vocab_size == 128256
    assert 69e9 < CONFIG.param_count() < 72e9
    assert list(CONFIG_DIR.iterdir()) == [CONFIG_DIR / "config.json"]        # no weights, no tokenizer


@pytest.mark.parametrize("device,links", [("cpu", LINKS), ("cuda", GPU_LINKS)])
def test_int4_puts_more_on_the_fast_tiers_than_bf16(device, links):
    bf16, int8, int4 = (_plan(s, device, links) for s in (None, "int8", "int4"))
    for p in (bf16, int8, int4):
        assert sorted(p.device_layers + p.host_layers + p.disk_layers) == list(range(80))
        assert p.globals_bytes + len(p.device_layers) * p.layer_bytes + p.ring_bytes <= p.device_weight_budget_bytes
        assert len(p.host_layers) * p.layer_bytes + p.staging_bytes <= p.host_mem_bytes
        assert p.config_only and p.dtype == "bfloat16"
    assert bf16.weight_scheme == "none" and bf16.weight_group_size is None
    assert (int8.weight_scheme, int4.weight_scheme, int4.weight_group_size) == ("int8", "int4", 64)
    # 140 GB of bf16 do not fit 88 GiB: some layers stream from disk; int4 (~40 GiB) fits device + host
    assert bf16.disk_layers and not int4.disk_layers and not int8.disk_layers
    assert len(int4.device_layers) > len(int8.device_layers) > len(bf16.device_layers)
    fast = [len(p.device_layers) + len(p.host_layers) for p in (bf16, int8, int4)]
    assert fast[0] < fast[1] <= fast[2] == 80
    assert bf16.streamed_bytes_per_token > int8.streamed_bytes_per_token >= int4.streamed_bytes_per_token
    assert int4.predicted_tok_s > bf16.predicted_tok_s
    assert bf16.bound == "disk"


def test_stored_bytes_follow_weight_bytes_per_param():
    bf16, int8, int4 = (_plan(s) for s in (None, "int8", "int4"))
    h = CONFIG.hidden_size
    linears = 2 * h * (CONFIG.q_size + CONFIG.kv_size) + 3 * h * CONFIG.intermediate_size
    assert bf16.layer_bytes == pytest.approx(2 * linears, rel=1e-3)          # + the two norms, padding
    for plan, scheme in ((int8, "int8"), (int4, "int4")):
        # per layer (the bytes a streamed layer moves per token): the scheme's rate over the 16-bit one
        assert plan.layer_bytes / bf16.layer_bytes == pytest.approx(weight_bytes_per_param(scheme) / 2, rel=2e-3)
        # the globals (embedding, norm, head) stay 16-bit unless asked
        assert plan.globals_bytes == bf16.globals_bytes
        assert plan.weight_bytes == 80 * plan.layer_bytes + plan.globals_bytes + plan.embedding_lookup_bytes
    assert int4.weight_bytes / bf16.weight_bytes < 0.31 and int8.weight_bytes / bf16.weight_bytes < 0.56


def test_a_quantized_head_is_counted():
    budget = Budget.parse(offload_dir="/tmp/tierkv-plan-quant-test", **BUDGET)
    plain, head = (make_plan(CONFIG, budget, Policy(device="cpu", weight_quant=WeightQuant("int4", 64, h)), LINKS,
                             config_only=True) for h in (False, True))
    head_bytes = CONFIG.vocab_size * CONFIG.hidden_size
    assert plain.globals_bytes - head.globals_bytes == pytest.approx(
        head_bytes * (2 - weight_bytes_per_param("int4")), rel=1e-3)


def test_kv_on_host_and_disk_is_counted_compressed_device_kv_stays_16_bit():
    none, int8, int4 = (_plan("int4", kv_quant=k) for k in ("none", "int8", "int4"))
    assert none.kv_device_bytes_per_token == int8.kv_device_bytes_per_token == 2 * 80 * 8 * 128 * 2
    assert none.reserve_bytes == int8.reserve_bytes == int4.reserve_bytes          # device chunks stay 16-bit
    assert none.kv_host_bytes_per_token == none.kv_device_bytes_per_token
    # a 64-token chunk: codes plus 16-bit (scale, minimum) per key channel and per value token
    per_chunk = kv_chunk_bytes("int8", 8, 64, 128, 2)
    assert per_chunk == 2 * 8 * 64 * 128 + 8 * 128 * 4 + 8 * 64 * 4
    assert int8.kv_host_bytes_per_token == 80 * -(-per_chunk // 64)
    assert 0.5 < int8.kv_host_bytes_per_token / none.kv_host_bytes_per_token < 0.55
    assert 0.25 < int4.kv_host_bytes_per_token / none.kv_host_bytes_per_token < 0.30
    assert int4.kv_host_tokens > int8.kv_host_tokens > none.kv_host_tokens > 0      # same room, more tokens
    assert int8.kv_host_tokens == int8.kv_host_bytes // int8.kv_host_bytes_per_token
    fixed = Policy(chunk_tokens=256, kv_quant="int4")
    assert kv_stored_bytes_per_token(CONFIG, torch.bfloat16, fixed) == 80 * -(-kv_chunk_bytes("int4", 8, 256, 128, 2)
                                                                              // 256)


def test_budgets_above_the_machine_are_a_what_if_only_without_weights():
    ram = psutil.virtual_memory().total
    budget = Budget(device_mem_bytes=2 * ram, host_mem_bytes=2 * ram, offload_dir=Path("/tmp/tierkv-plan-quant"))
    p = make_plan(CONFIG, budget, Policy(device="cpu"), LINKS, config_only=True)
    assert p.device_mem_bytes == 2 * ram and "config.json alone" in p.summary()
    with pytest.raises(PlanError, match="more than this machine's RAM"):
        make_plan(CONFIG, budget, Policy(device="cpu"), LINKS)


def test_the_minimum_device_budget_shrinks_with_the_scheme():
    sizes = [minimum_device_bytes(CONFIG, Policy(device="cpu", weight_quant=WeightQuant(s) if s else None))
             for s in (None, "int8", "int4")]
    assert sizes[0] > sizes[1] > sizes[2]


def test_summary_and_json_name_the_scheme():
    p = _plan("int4", kv_quant="int8")
    text = p.summary()
    assert "weights: int4 (groups of 64)" in text and "compute in bfloat16" in text and "int8)" in text
    data = json.loads(json.dumps(p.to_dict()))
    assert (data["weight_scheme"], data["weight_group_size"], data["dtype"], data["kv_quant"]) == \
        ("int4", 64, "bfloat16", "int8")
    for key in ("weight_bytes", "streamed_bytes_per_token", "kv_host_bytes_per_token", "kv_host_tokens",
                "config_only", "device_layers", "predicted_tok_s", "bound"):
        assert key in data
    assert data["links"]["h2d_gbps"] is None and data["links"]["compute_estimated_gbps"] is None


def test_compare_plans_share_links_and_order_the_schemes():
    budget = Budget.parse(offload_dir="/tmp/tierkv-plan-quant-test", **BUDGET)
    plans = compare_plans(CONFIG, budget, Policy(device="cpu"), LINKS, config_only=True)
    assert [p.weight_scheme for p in plans] == ["none", *SCHEMES]
    rows = comparison_rows(plans)
    assert all(len(r) == len(COLUMNS) for r in rows) and rows[0][0] == "bfloat16" and rows[2][0] == "int4 g64"


def test_compute_is_estimated_from_a_measured_matvec_rate(tmp_path):
    est = ComputeEstimate(layer_bytes=8 << 20, working_set_bytes=8 << 20, scheme="int4", group_size=64)
    cache = LinkCache(tmp_path)
    seconds, rate = estimate_layer_compute(est, torch.bfloat16, torch.device("cpu"), cache)
    assert 0 < rate < 1e4 and seconds == pytest.approx((8 << 20) / (rate * 1e9))
    key = matvec_key("int4", 64, torch.bfloat16, torch.device("cpu"), matvec_bytes(8 << 20))
    assert cache.samples(key) == [rate]                                            # cached for the next plan


def _seed_links(offload: Path, config: ModelConfig) -> None:
    """Fill ``offload/links.json`` as SAMPLES earlier probes would: the CLI then measures nothing."""
    cache = LinkCache(offload)
    for _ in range(SAMPLES):
        cache.measure(disk_key(offload), lambda: 2.0, max)
        for scheme, rate in ((None, 20.0), ("int8", 12.0), ("int4", 10.0)):
            layer, _ = layer_sizes(config, torch.bfloat16, WeightQuant(scheme) if scheme else None, "cpu")
            key = matvec_key(scheme, 64, torch.bfloat16, torch.device("cpu"), matvec_bytes(80 * layer))
            cache.measure(key, lambda r=rate: r, max)


def test_cli_plans_the_70b_config_in_three_schemes(tmp_path):
    model = tmp_path / "llama-70b"
    model.mkdir()
    shutil.copy(CONFIG_DIR / "config.json", model / "config.json")
    offload = tmp_path / "offload"
    offload.mkdir()
    _seed_links(offload, CONFIG)
    args = ["plan", str(model), "--device", "cpu", "--device-mem", "24GiB", "--host-mem", "64GiB",
            "--offload-dir", str(offload)]
    runner = CliRunner()
    res = runner.invoke(app, args + ["--compare", "--json"])
    assert res.exit_code == 0, res.output
    plans = json.loads(res.stdout)["plans"]
    assert [p["weight_scheme"] for p in plans] == ["none", "int8", "int4"]
    assert [p["links"]["compute_estimated_gbps"] for p in plans] == [20.0, 12.0, 10.0]
    assert plans[0]["disk_layers"] and not plans[2]["disk_layers"] and plans[0]["links"]["disk_read_gbps"] == 2.0
    assert all(p["config_only"] for p in plans)
    table = runner.invoke(app, args + ["--compare"])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == [c for col in COLUMNS for c in col.split()]
    assert lines[1].split()[0] == "bfloat16" and lines[3].split()[:2] == ["int4", "g64"]
    assert "estimated from a measured matvec rate" in table.stdout and "config.json alone" in table.stdout
    one = runner.invoke(app, args + ["--quant", "int4", "--kv-quant", "int8", "--json"])
    assert one.exit_code == 0, one.output
    single = json.loads(one.stdout)
    assert single["weight_scheme"] == "int4" and single["kv_quant"] == "int8"
    assert single["links"]["disk_read_gbps"] is None          # nothing on disk: the disk is not probed
    kv_fields = ("kv_quant", "kv_host_bytes_per_token", "kv_host_tokens", "links")
    assert {k: v for k, v in single.items() if k not in kv_fields} == \
        {k: v for k, v in plans[2].items() if k not in kv_fields}          # the same placement as compared
    assert single["kv_host_tokens"] > plans[2]["kv_host_tokens"]


def test_cli_plans_a_small_config_alone_with_real_probes(tmp_path, tiny_llama_dir):
    model = tmp_path / "config-only"
    model.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", model / "config.json")
    res = CliRunner().invoke(app, ["plan", str(model), "--device", "cpu", "--device-mem", "8MiB",
                                   "--offload-dir", str(tmp_path / "off"), "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["config_only"] and plan["links"]["compute_estimated_gbps"] > 0 and plan["predicted_tok_s"] > 0
    text = CliRunner().invoke(app, ["plan", str(model), "--device", "cpu", "--device-mem", "8MiB",
                                    "--offload-dir", str(tmp_path / "off"), "--quant", "int8", "--group-size", "32"])
    assert text.exit_code == 0, text.output
    assert "weights: int8 (groups of 32)" in text.stdout and "estimated" in text.stdout


def test_cli_refuses_bad_schemes_listing_the_choices(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(CONFIG_DIR / "config.json", model / "config.json")
    for flag, value, listed in (("--quant", "int3", "int8, int4"), ("--kv-quant", "int2", "none, int8, int4"),
                                ("--group-size", "48", "32, 64, 128")):
        extra = ["--quant", "int4"] if flag == "--group-size" else []
        res = CliRunner().invoke(app, ["plan", str(model), flag, value, *extra])
        assert res.exit_code != 0 and listed in res.output, res.output


def test_policy_validates_the_schemes():
    from tierkv.errors import ArgumentError

    assert Policy(kv_quant="INT8").kv_quant == "int8" and Policy().weight_quant is None
    with pytest.raises(ArgumentError, match="none, int8, int4"):
        Policy(kv_quant="int2")
    with pytest.raises(ArgumentError, match="WeightQuant"):
        Policy(weight_quant="int4")  # type: ignore[arg-type]


def test_a_group_size_that_does_not_divide_is_refused_naming_the_ones_that_fit(tmp_path, tiny_llama_dir):
    res = CliRunner().invoke(app, ["plan", str(tiny_llama_dir), "--device", "cpu", "--quant", "int4",
                                   "--offload-dir", str(tmp_path)])
    assert res.exit_code != 0 and "group size 64 does not divide" in res.output and "--group-size 32" in res.output


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_the_matvec_probe_runs_each_scheme_on_the_cpu(scheme):
    from tierkv.probe import MATVEC_BYTES, matvec_gbps

    rate = matvec_gbps(scheme, 32, torch.bfloat16, torch.device("cpu"), nbytes=1 << 20)
    assert 0 < rate < math.inf
    assert matvec_bytes(3 << 20) == 4 << 20 and matvec_bytes(1 << 40) == MATVEC_BYTES
