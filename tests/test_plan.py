"""Planner: placement within budgets, refusal below the minimum, depth choice, predicted bound."""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import replace

import pytest
import torch

from tierkv import budgets as budgets_mod, plan as plan_mod
from tierkv.config import Budget, ModelConfig, Policy, parse_size
from tierkv.model import attention_pair_bytes
from tierkv.plan import LinkSpeeds, PlanError, make_plan, probe_links, simulate_step_s, spread_layers

# a 1B-class shape: 16 layers of ~86 MiB in bf16, embedding and head ~125 MiB each
RAW = dict(architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
           num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
           dtype="bfloat16")
CONFIG = ModelConfig.from_dict(RAW)
CPU_LINKS = LinkSpeeds(disk_read_gbps=1.7, h2d_gbps=math.inf, layer_compute_s=0.006)
GPU_LINKS = LinkSpeeds(disk_read_gbps=6.0, h2d_gbps=25.0, layer_compute_s=0.0002)


def _plan(device_mem: str, host_mem: str = "0", device: str = "cpu", links: LinkSpeeds = CPU_LINKS, tmp=None):
    budget = Budget.parse(device_mem=device_mem, host_mem=host_mem, offload_dir=tmp or "/tmp/tierkv-plan-test")
    return make_plan(CONFIG, budget, Policy(device=device), links, context_tokens=1024)


def _check_invariants(p) -> None:
    assert sorted(p.device_layers + p.host_layers + p.disk_layers) == list(range(p.num_layers))
    device_weights = p.globals_bytes + len(p.device_layers) * p.layer_bytes + p.ring_bytes
    assert device_weights <= p.device_weight_budget_bytes == p.device_mem_bytes - p.reserve_bytes
    assert len(p.host_layers) * p.layer_bytes + p.staging_bytes <= p.host_weight_budget_bytes
    if p.stream_pieces:                           # disk layers stream in pieces: the small ring, no layer slots
        assert p.device.startswith("cpu") and p.prefetch_depth == 0 and 0 < p.ring_bytes < p.layer_bytes
    else:
        assert p.ring_bytes == ((p.prefetch_depth + 1) * p.layer_bytes if p.ring_bytes else 0)
    assert p.predicted_tok_s > 0 and p.bound in ("disk", "h2d", "compute")


def test_everything_fits_means_resident_and_compute_bound():
    p = _plan("8GiB")
    _check_invariants(p)
    assert p.device_layers == tuple(range(16)) and p.prefetch_depth == 0 and p.ring_bytes == 0
    assert p.bound == "compute"
    assert p.predicted_tok_s == pytest.approx(1 / (16 * CPU_LINKS.layer_compute_s), rel=1e-6)
    assert "16 of 16 layers" in p.summary()


def test_budget_below_one_layer_is_refused_naming_the_minimum():
    # the reserve (one prefill piece's activations) grows with the budget: the named minimum is a
    # budget whose own reserve, globals and one layer fit it
    with pytest.raises(PlanError, match=r"below the minimum working set .* raise --device-mem to at least") as err:
        _plan("1MiB")
    minimum = parse_size(str(err.value).split("raise --device-mem to at least ")[1].split(",")[0].replace(" ", ""))
    with pytest.raises(PlanError, match=r"below the minimum working set"):
        _plan(str(minimum - (1 << 20)))
    p = _plan(str(minimum))
    _check_invariants(p)
    assert p.device_layers == () and p.prefetch_depth == 0 and len(p.disk_layers) == 16
    assert plan_mod.minimum_device_bytes(CONFIG, Policy(device="cpu"), 1024) == minimum   # typed back as shown, it runs


@pytest.mark.parametrize("device_mem", ["900MiB", "1.2GiB", "1.5GiB", "1.55GiB"])
def test_partial_placements_stay_within_budget(device_mem):
    p = _plan(device_mem)
    _check_invariants(p)
    disk_s = len(p.disk_layers) * p.layer_bytes / (CPU_LINKS.disk_read_gbps * 1e9)
    assert p.disk_layers and p.bound == ("disk" if disk_s > p.num_layers * CPU_LINKS.layer_compute_s else "compute")
    fewer = _plan(f"{parse_size(device_mem) - (200 << 20)}")
    assert len(fewer.disk_layers) >= len(p.disk_layers) and fewer.predicted_tok_s <= p.predicted_tok_s


def test_the_embedding_stays_in_the_store_once_layers_stream():
    table = CONFIG.vocab_size * CONFIG.hidden_size * 2                  # bf16 (V, H): 125 MiB, a 4 KiB multiple
    p = _plan("1.2GiB")
    assert p.disk_layers and p.embedding_lookup_bytes == table and "stays in the store" in p.summary()
    assert p.weight_bytes == 16 * p.layer_bytes + p.globals_bytes + table   # still stored, just not held
    tied = make_plan(ModelConfig.from_dict({**RAW, "tie_word_embeddings": True}),
                     Budget.parse(device_mem="1.2GiB", host_mem="0", offload_dir="/tmp/tierkv-plan-test"),
                     Policy(device="cpu"), CPU_LINKS, context_tokens=1024)
    assert tied.embedding_lookup_bytes == 0 and tied.globals_bytes == table + 4096   # + the norm; no head
    held = p.globals_bytes + len(p.device_layers) * p.layer_bytes + p.ring_bytes
    assert held + table > p.device_weight_budget_bytes >= held         # holding the table would cost a layer
    assert _plan("1.8GiB").embedding_lookup_bytes == 0                  # everything fits: resident, the table too
    only_without = _plan("1.65GiB")                                     # every layer fits only without the table
    assert len(only_without.device_layers) == 16 and only_without.embedding_lookup_bytes == table


def test_disk_layers_are_spread_out():
    kinds = spread_layers(16, 12, 0)
    disk = [j for j, k in enumerate(kinds) if k == "disk"]
    assert len(disk) == 4 and all(b - a >= 3 for a, b in zip(disk, disk[1:]))
    kinds = spread_layers(10, 4, 3)
    assert kinds.count("device") == 4 and kinds.count("host") == 3 and kinds.count("disk") == 3


def test_simulation_overlaps_reads_with_compute():
    kinds = ("disk",) * 8
    layer = 100 << 20
    read_s = layer / 1.7e9
    serial = simulate_step_s(kinds, 0, layer, CPU_LINKS, cuda=False)
    overlapped = simulate_step_s(kinds, 2, layer, CPU_LINKS, cuda=False)
    assert serial == pytest.approx(8 * (read_s + CPU_LINKS.layer_compute_s), rel=1e-6)
    assert overlapped == pytest.approx(8 * read_s, rel=1e-3)      # disk-bound: compute hides under reads
    spread = spread_layers(8, 4, 0)
    assert simulate_step_s(spread, 1, layer, CPU_LINKS, False) < simulate_step_s(
        ("device",) * 4 + ("disk",) * 4, 1, layer, CPU_LINKS, False) + 1e-9


def test_cpu_host_budget_holds_layers_in_place():
    p = _plan("1GiB", host_mem="600MiB")
    _check_invariants(p)
    assert len(p.host_layers) == (600 << 20) // p.layer_bytes and p.staging_bytes == 0


def test_cuda_placement_uses_host_tier_and_staging(monkeypatch):
    p = _plan("1.2GiB", host_mem="450MiB", device="cuda", links=GPU_LINKS)
    _check_invariants(p)
    assert p.host_layers and p.disk_layers and p.staging_bytes == (p.prefetch_depth + 1) * p.layer_bytes
    assert p.bound == "disk"
    all_host = _plan("1.2GiB", host_mem="8GiB", device="cuda", links=GPU_LINKS)
    assert not all_host.disk_layers and all_host.staging_bytes == 0 and all_host.bound in ("h2d", "compute")
    assert all_host.predicted_tok_s > p.predicted_tok_s
    with pytest.raises(PlanError, match="--host-mem"):
        _plan("1.2GiB", host_mem="10MiB", device="cuda", links=GPU_LINKS)


def test_budgets_are_detected_when_not_given(monkeypatch, tmp_path):
    mem = namedtuple("mem", "available total")
    monkeypatch.setattr(budgets_mod.psutil, "virtual_memory", lambda: mem(8 << 30, 16 << 30))
    monkeypatch.setattr(budgets_mod, "cgroup_memory", lambda: None)      # not in a container (tests/test_cgroup.py)
    monkeypatch.setenv("TIERKV_OFFLOAD_DIR", str(tmp_path))
    p = make_plan(CONFIG, Budget(), Policy(device="cpu"), CPU_LINKS, context_tokens=1024)
    assert p.device_mem_bytes == int((8 << 30) * 0.8) - (1 << 30) and p.host_mem_bytes == 0
    assert p.offload_dir == str(tmp_path) and p.device_layers == tuple(range(16))


def test_probe_measures_every_link(tmp_path):
    small = ModelConfig.from_dict({**RAW, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000})
    links = probe_links(small, torch.float32, torch.device("cpu"), None, tmp_path)
    assert 0 < links.disk_read_gbps < math.inf and links.h2d_gbps == math.inf and 0 < links.layer_compute_s < 1
    assert not any(p.name.startswith(".tierkv-probe") for p in tmp_path.iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot write to the directory.*--offload-dir"):
        probe_links(small, torch.float32, torch.device("cpu"), None, blocker / "sub")


def test_prefill_piece_is_chosen_from_the_budget_and_shrinks_with_it():
    big, small = _plan("8GiB"), _plan("700MiB")
    assert big.prefill_chunk_tokens == 2048
    assert 16 <= small.prefill_chunk_tokens < big.prefill_chunk_tokens
    assert small.attention_scratch_bytes <= big.attention_scratch_bytes
    for p in (big, small):
        _check_invariants(p)
        assert p.activation_bytes <= p.reserve_bytes
        base, _ = plan_mod.prefill_sizes(CONFIG, torch.bfloat16, Policy(device="cpu"), 1024, 1, p.device_mem_bytes)
        assert p.prefill_chunk_tokens >= base            # the budget's share, grown into room no layer uses
        assert f"prefill: pieces of {p.prefill_chunk_tokens} tokens" in p.summary()
        assert p.to_dict()["prefill_chunk_tokens"] == p.prefill_chunk_tokens


def test_activations_count_the_mlp_attention_and_logits_of_a_piece():
    dtype = torch.bfloat16
    one = plan_mod.activation_bytes(CONFIG, dtype, 1, 1 << 20, 1024, 1)
    piece = plan_mod.activation_bytes(CONFIG, dtype, 2048, 1 << 20, 1024, 1)
    # at least the MLP's gate, up and product in bf16 and the fp32 attention state of every token
    assert piece - one >= 2047 * (3 * CONFIG.intermediate_size * 2 + 2 * CONFIG.q_size * 4)
    assert one >= (1 << 20) + CONFIG.vocab_size * 4                   # the attention scratch and the logits
    # one query row over the whole context is counted when it exceeds the scratch
    long = plan_mod.activation_bytes(CONFIG, dtype, 1, 1 << 10, 1 << 20, 1)
    assert long >= (1 << 20) * (12 * CONFIG.num_heads + 16)


def test_activations_on_the_cpu_flash_path_count_one_scratch_and_no_fp32_fold():
    """The CPU flash kernel holds no score block, and where the model's whole context gathers within the
    scratch the grouped fold (fp32 state) never runs; a GPU, or a window that cuts the keys, counts both."""
    dtype, piece, scratch = torch.bfloat16, 256, 16 << 20
    cpu, gpu = Policy(device="cpu"), Policy(device="cuda")
    full = plan_mod.activation_bytes(CONFIG, dtype, piece, scratch, 1024, 1, 0, gpu)
    assert full == plan_mod.activation_bytes(CONFIG, dtype, piece, scratch, 1024, 1)       # no policy: the full count
    lean = plan_mod.activation_bytes(CONFIG, dtype, piece, scratch, 1024, 1, 0, cpu)
    assert full - lean == scratch + piece * 4 * (3 * CONFIG.q_size + 2 * CONFIG.kv_size)
    # a scratch too small to gather the whole context: the fold's fp32 state is counted again
    small = 1 << 20
    assert plan_mod.activation_bytes(CONFIG, dtype, piece, small, 1024, 1, 0, cpu) == \
        plan_mod.activation_bytes(CONFIG, dtype, piece, small, 1024, 1, 0, gpu) - max(
            small, attention_pair_bytes(1, CONFIG.num_heads) * 1024)
    windowed = replace(CONFIG, sliding_window_tokens=(512,) * CONFIG.num_layers)
    assert plan_mod.activation_bytes(windowed, dtype, piece, scratch, 1024, 1, 0, cpu) == \
        plan_mod.activation_bytes(windowed, dtype, piece, scratch, 1024, 1, 0, gpu)
    # layers streamed in pieces hold every micro-batch's rows: two groups count the rows twice
    two = plan_mod.activation_bytes(CONFIG, dtype, piece, scratch, 1024, 1, 3, cpu, groups=2)
    one = plan_mod.activation_bytes(CONFIG, dtype, piece, scratch, 1024, 1, 3, cpu)
    assert two - one == one - scratch


@pytest.mark.parametrize("device, fraction", [("cpu", 1 / 12), ("cuda", 1 / 8)])
def test_the_auto_piece_is_the_largest_whose_activations_fit_the_devices_share(device, fraction):
    policy, budget = Policy(device=device), 1 << 30
    assert plan_mod.activation_fraction(policy) == fraction
    piece, scratch = plan_mod.prefill_sizes(CONFIG, torch.bfloat16, policy, 1024, 1, budget)

    def cost(p: int) -> int:
        return plan_mod.activation_bytes(CONFIG, torch.bfloat16, p, plan_mod.scratch_for(CONFIG, torch.bfloat16, p, 1),
                                         1024, 1, plan_mod.step_rows(policy), policy)

    assert cost(piece) <= budget * fraction < cost(2 * piece)
    assert scratch == plan_mod.scratch_for(CONFIG, torch.bfloat16, piece, 1)


def test_an_explicit_prefill_piece_is_honoured_and_counted():
    budget = Budget.parse(device_mem="450MiB", host_mem="0", offload_dir="/tmp/tierkv-plan-test")
    auto = make_plan(CONFIG, budget, Policy(device="cpu"), CPU_LINKS, context_tokens=1024)
    fixed = make_plan(CONFIG, budget, Policy(device="cpu", prefill_chunk_tokens=16), CPU_LINKS, context_tokens=1024)
    assert fixed.prefill_chunk_tokens == 16 < auto.prefill_chunk_tokens
    assert fixed.activation_bytes < auto.activation_bytes and fixed.reserve_bytes < auto.reserve_bytes
    with pytest.raises(PlanError, match="below the minimum working set"):
        make_plan(CONFIG, budget, Policy(device="cpu", prefill_chunk_tokens=2048), CPU_LINKS, context_tokens=1024)


def test_auto_piece_grows_into_device_room_no_layer_uses():
    probe = _plan("8GiB")
    grown = 0
    for extra in (120 << 20, 180 << 20, 320 << 20, 440 << 20):     # every layer streams or a few are resident
        p = _plan(str(probe.globals_bytes + probe.layer_bytes + extra))
        _check_invariants(p)
        base, _ = plan_mod.prefill_sizes(CONFIG, torch.bfloat16, Policy(device="cpu"), 1024, 1, p.device_mem_bytes)
        assert p.prefill_chunk_tokens >= base
        assert p.kv_device_bytes >= 2 * CONFIG.num_layers * CONFIG.kv_size * 1024 * 2   # the KV room asked for stays
        grown += p.prefill_chunk_tokens > base
    assert grown >= 1                                  # at 320 MiB spare room holds a doubled piece, not a layer
