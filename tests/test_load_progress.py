"""tierkv.load's progress callback: each phase (verify, convert, load) counts from 0 to its own total,
and a callback with a ``phase`` keyword is told which; plain (done, total) callbacks still work."""

from __future__ import annotations

import tierkv
from tierkv.config import Policy
from tierkv.io.progress import phase_progress
from tierkv.plan import minimum_device_bytes

PROMPT = [1, 5, 9, 3]


def phases(calls: list[tuple[int, int, str]]) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for done, total, phase in calls:
        out.setdefault(phase, []).append((done, total))
    return out


def assert_counts_up(calls: list[tuple[int, int]], to_the_end: bool = True) -> None:
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and len({t for _, t in calls}) == 1 and calls[-1][1] > 0
    assert calls[-1][0] == calls[-1][1] or not to_the_end


def test_resident_load_reports_globals_then_each_layer(tiny_llama_dir):
    calls: list[tuple[int, int, str]] = []
    with tierkv.load(tiny_llama_dir, device="cpu", verify=True,
                     progress=lambda done, total, phase: calls.append((done, total, phase))) as engine:
        layers = engine.config.num_layers
    got = phases(calls)
    assert list(got) == ["verify", "load"]
    assert got["load"] == [(i, layers + 1) for i in range(1, layers + 2)]
    assert_counts_up(got["verify"])


def test_streamed_load_reports_conversion_then_resident_bytes(tiny_llama_dir, tmp_path):
    with tierkv.load(tiny_llama_dir, device="cpu") as resident:
        full, config = resident.plan, resident.config
    policy = Policy(device="cpu", kv="exact", kv_device_tokens=64)
    budget = minimum_device_bytes(config, policy, context_tokens=64) + full.layer_bytes // 2
    calls: list[tuple[int, int, str]] = []
    with tierkv.load(tiny_llama_dir, device="cpu", device_mem=budget, host_mem=0, offload_dir=tmp_path, kv="exact",
                     kv_device_tokens=64, progress=lambda done, total, phase: calls.append((done, total, phase))) as e:
        assert e.plan.disk_layers
        store = e._weights.store
        held = [x.name for x in store.global_extents() if x.name != "embed" or not e.plan.embedding_lookup_bytes]
        resident_names = held + [f"layer.{j}" for j in e.plan.device_layers]          # a mapped table is not loaded
        assert len(e.generate(PROMPT, max_new_tokens=2).token_ids) == 2
    got = phases(calls)
    assert list(got) == ["convert", "load"]
    assert_counts_up(got["convert"], to_the_end=False)     # conversion's own accounting (its padding)
    assert_counts_up(got["load"])
    assert got["load"][-1][1] == sum(store.extents[n].padded_nbytes for n in resident_names)
    plain: list[tuple[int, int]] = []                   # the store is cached now: only the load phase, unnamed
    with tierkv.load(tiny_llama_dir, device="cpu", device_mem=budget, host_mem=0, offload_dir=tmp_path, kv="exact",
                     kv_device_tokens=64, progress=lambda done, total: plain.append((done, total))):
        pass
    assert plain == got["load"]


def test_phase_progress_keeps_two_argument_callbacks():
    seen: list[tuple] = []

    def two(done, total):
        seen.append((done, total))
    assert phase_progress(two, "load") is two
    phase_progress(lambda done, total, phase: seen.append((done, total, phase)), "convert")(3, 4)
    assert seen == [(3, 4, "convert")] and phase_progress(None, "load") is None
