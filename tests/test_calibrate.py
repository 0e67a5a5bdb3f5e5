"""The planner's compute figures follow what the engine measures: a compute probe cached while the
machine was loaded (injected here as a fake, 1000x too slow) is corrected by the steps the engine
runs, for the next plan (``links.json`` observations) and for ``choose_batch`` on the running engine;
a probe taken on a busy machine is not cached; and the fit itself (batch 1 and wider steps)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

import tierkv
from placements import random_prompt
from tierkv import probe as probe_mod
from tierkv.batchplan import choose_batch
from tierkv.calibrate import MIN_STEPS, StepLog, calibrated, engine_figures, prompt_token_s, row_key, token_key
from tierkv.config import ModelConfig
from tierkv.probe import LINKS_FILE, LinkCache, LinkSpeeds, compute_key

pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")

FAKE_S = 0.5                  # the injected probe: half a second per layer (a tiny layer takes well under 1 ms)
LINKS = LinkSpeeds(disk_read_gbps=1.0, h2d_gbps=float("inf"), layer_compute_s=FAKE_S)


def _inject(offload: Path, key: str, value: float) -> None:
    """A cached probe of ``value`` (SAMPLES samples, measured now), as a loaded hour leaves one."""
    path = offload / LINKS_FILE
    raw = json.loads(path.read_text()) if path.exists() else {"version": 3, "links": {}}
    raw["links"][key] = {"samples": [value] * probe_mod.SAMPLES, "measured_at": time.time()}
    path.write_text(json.dumps(raw))


def _measured_layer_s(engine: tierkv.Engine, rows: int) -> float:
    observed = engine.runner.log.decode_layer_s()
    assert rows in observed, observed
    return observed[rows]


def test_a_slow_cached_probe_is_corrected_by_the_engines_own_steps(tiny_model_dir: Callable[..., Path],
                                                                   tmp_path: Path) -> None:
    model = tiny_model_dir("llama")
    config = ModelConfig.from_dir(model)
    key = compute_key(config, torch.float32, torch.device("cpu"))
    _inject(tmp_path, key, FAKE_S)
    opts = dict(device="cpu", dtype="float32", offload_dir=tmp_path)
    prompt = random_prompt(12, seed=1)
    with tierkv.load(model, **opts) as engine:
        assert engine.plan is not None and engine.plan.links.layer_compute_s == FAKE_S   # the fake is used
        engine.generate(prompt, max_new_tokens=10, ignore_eos=True)
        first = _measured_layer_s(engine, 1)
        assert FAKE_S > 50 * first, "the fake probe is far off what the layers take"
    entry = json.loads((tmp_path / LINKS_FILE).read_text())["links"][key]
    assert "samples" not in entry, "a probe that disagrees with the engine's steps is dropped"
    assert [o["value"] for o in entry["observed"]] == [first]
    with tierkv.load(model, **opts) as engine:
        plan = engine.plan
        assert plan is not None and plan.links.layer_compute_s == first
        engine.generate(prompt, max_new_tokens=10, ignore_eos=True)
        measured = _measured_layer_s(engine, 1) * config.num_layers
    assert measured / 5 < plan.predicted_step_s < measured * 5, (plan.predicted_step_s, measured)


def test_choose_batch_on_a_running_engine_plans_with_its_measured_steps(tiny_model_dir: Callable[..., Path],
                                                                        tmp_path: Path) -> None:
    model = tiny_model_dir("llama")
    config = ModelConfig.from_dir(model)
    device = torch.device("cpu")
    _inject(tmp_path, compute_key(config, torch.float32, device), FAKE_S)
    _inject(tmp_path, row_key(config, torch.float32, device), FAKE_S / 10)
    _inject(tmp_path, token_key(config, torch.float32, device), FAKE_S / 100)
    prompts = [random_prompt(n, seed=20 + n) for n in (5, 9, 14, 20)]
    lengths = [len(p) for p in prompts]
    with tierkv.load(model, device="cpu", dtype="float32", offload_dir=tmp_path, max_sequences=4) as engine:
        before = choose_batch(engine, lengths, 8, asked=4)
        engine.generate(prompts, max_new_tokens=8, ignore_eos=True)
        after = choose_batch(engine, lengths, 8, asked=4)
        measured = _measured_layer_s(engine, 4) * config.num_layers
        figures = engine_figures(engine)
        assert figures is not None and figures.token_s is not None and figures.token_s < FAKE_S / 1000, \
            "the prefill step (44 prompt tokens beyond its rows) fits the prompt token cost"
    assert before.options[0].decode_step_s > 50 * measured, "planned with the fake probe"
    assert measured / 5 < after.options[0].decode_step_s < measured * 5, (after.options[0].decode_step_s, measured)
    raw = json.loads((tmp_path / LINKS_FILE).read_text())["links"]
    assert "observed" in raw[row_key(config, torch.float32, device)], "wider steps calibrate the row cost too"
    assert "observed" in raw[token_key(config, torch.float32, device)], "and prefill steps the prompt token cost"
    assert after.predicted_tok_s > 20 * before.predicted_tok_s


def test_a_compute_probe_on_a_busy_machine_counts_once_and_is_not_cached(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=128))
    calls: list[int] = []
    monkeypatch.setattr(probe_mod, "_probe_layer_compute_s", lambda *a: calls.append(1) or 0.25)
    monkeypatch.setattr(probe_mod, "machine_busy", lambda: True)
    for _ in range(probe_mod.SAMPLES + 1):
        got = probe_mod.probe_links(cfg, torch.float32, torch.device("cpu"), None, tmp_path, need_disk=False)
        assert got.layer_compute_s == 0.25
    assert len(calls) == probe_mod.SAMPLES + 1, "nothing cached: every run probes again"
    monkeypatch.setattr(probe_mod, "machine_busy", lambda: False)
    probe_mod.probe_links(cfg, torch.float32, torch.device("cpu"), None, tmp_path, need_disk=False)
    assert LinkCache(tmp_path).samples(compute_key(cfg, torch.float32, torch.device("cpu"))) == [0.25]


def test_observations_count_instead_of_the_probe_and_drop_only_a_disagreeing_one(tmp_path: Path) -> None:
    cache = LinkCache(tmp_path)
    for _ in range(probe_mod.SAMPLES):
        cache.measure("k", lambda: 0.010, min)
    cache.observe("k", 0.012, min)                       # agrees (within DISAGREE): the samples stay
    assert cache.samples("k") == [0.010] * probe_mod.SAMPLES
    assert cache.measure("k", lambda: pytest.fail("no probe while observations are fresh"), min) == 0.012
    cache.observe("k", 0.100, min)                       # disagrees: the samples go
    assert cache.samples("k") == [] and cache.observed("k") == [0.012, 0.100]
    for v in range(probe_mod.OBSERVED_KEPT + 2):
        cache.observe("k", 0.02 + v, min)
    assert len(cache.observed("k")) == probe_mod.OBSERVED_KEPT
    raw = json.loads((tmp_path / LINKS_FILE).read_text())
    for o in raw["links"]["k"]["observed"]:
        o["at"] -= probe_mod.MAX_AGE_S + 1
    (tmp_path / LINKS_FILE).write_text(json.dumps(raw))
    assert cache.measure("k", lambda: 0.011, min) == 0.011, "stale observations: probed again"


def test_the_fit_from_batch_one_and_wider_steps() -> None:
    log = StepLog(num_layers=2)
    for _ in range(MIN_STEPS):
        log.record(1, 1, wall_s=0.030, wait_s=0.010)     # 10 ms per layer at batch 1
        log.record(5, 5, wall_s=0.060, wait_s=0.0)       # 30 ms at 5 rows: 5 ms per extra row
        log.record(3, 40, wall_s=9.0, wait_s=0.0)        # a prefill step: not a decode row count
    log.record(9, 9, wall_s=1.0, wait_s=0.0)             # seen once: too few to count
    assert log.decode_layer_s() == pytest.approx({1: 0.010, 5: 0.030})
    links, b, fixed = calibrated(LINKS, 0.5, log.decode_layer_s())
    assert fixed and links.layer_compute_s == pytest.approx(0.010) and b == pytest.approx(0.005)
    links, b, _ = calibrated(LINKS, 0.05, {1: 0.005})    # batch 1 only: the row cost scales like the layer's
    assert links.layer_compute_s == 0.005 and b == pytest.approx(0.0005)
    links, b, _ = calibrated(LINKS, 0.5, {3: 0.15})      # wider only: both scale by observed / predicted
    assert links.layer_compute_s == pytest.approx(0.05) and b == pytest.approx(0.05)
    assert calibrated(LINKS, None, {3: 0.15}) == (LINKS, None, False)
    assert calibrated(LINKS, 0.5, {}) == (LINKS, 0.5, False)


def test_the_prompt_token_cost_comes_from_prefill_steps_on_the_fitted_layer_and_row_costs() -> None:
    log = StepLog(num_layers=1)
    log.record(2, 2, wall_s=0.012, wait_s=0.0)           # a decode step: no prompt tokens
    log.record(3, 3 + 8, wall_s=9.0, wait_s=0.0)         # 8 extra tokens: too few to fit on
    assert prompt_token_s(log, 0.010, 0.001) is None
    log.record(3, 3 + 100, wall_s=0.112 + 0.5, wait_s=0.5)   # 10 ms + 2 rows x 1 ms + 100 tokens x 1 ms
    assert prompt_token_s(log, 0.010, 0.001) == pytest.approx(0.001)
