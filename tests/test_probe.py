"""Link probes: the disk probe reads the store read-only and needs no scratch space then; measured
links are cached per machine so the same command plans the same; stale entries are measured again."""

from __future__ import annotations

import json
import math
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from tierkv import plan as plan_mod
from tierkv import probe as probe_mod
from tierkv.config import ModelConfig
from tierkv.io.convert import convert
from tierkv.io.store import StoreError
from tierkv.probe import LINKS_FILE, LinkCache

RAW = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


@pytest.fixture
def quiet_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The load average is not above the cores (else compute probes are not cached: test_calibrate.py)."""
    monkeypatch.setattr(probe_mod, "machine_busy", lambda: False)


def _count(monkeypatch: pytest.MonkeyPatch, name: str, module=probe_mod) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.usefixtures("quiet_machine")
def test_links_are_cached_per_machine_and_measured_again_when_stale(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ModelConfig.from_dict(RAW)
    compute, disk = _count(monkeypatch, "_probe_layer_compute_s"), _count(monkeypatch, "disk_read_gbps")
    runs = [plan_mod.probe_links(cfg, torch.float32, torch.device("cpu"), None, tmp_path)
            for _ in range(probe_mod.SAMPLES + 3)]
    assert len(compute) == len(disk) == probe_mod.SAMPLES, "the first runs sample, later ones reuse the best"
    assert all(r == runs[-1] for r in runs[probe_mod.SAMPLES - 1:]), "the same command sees the same links"
    raw = json.loads((tmp_path / LINKS_FILE).read_text())
    assert runs[-1].layer_compute_s == min(next(e["samples"] for k, e in raw["links"].items()
                                                if k.startswith("compute|")))
    other = ModelConfig.from_dict({**RAW, "hidden_size": 128})
    plan_mod.probe_links(other, torch.float32, torch.device("cpu"), None, tmp_path)
    assert len(compute) == probe_mod.SAMPLES + 1 and len(disk) == probe_mod.SAMPLES, \
        "compute is per model shape, disk per filesystem"
    raw = json.loads((tmp_path / LINKS_FILE).read_text())
    for entry in raw["links"].values():
        entry["measured_at"] -= probe_mod.MAX_AGE_S + 1
    (tmp_path / LINKS_FILE).write_text(json.dumps(raw))
    plan_mod.probe_links(cfg, torch.float32, torch.device("cpu"), None, tmp_path)
    assert len(compute) == probe_mod.SAMPLES + 2 and len(disk) == probe_mod.SAMPLES + 1, "stale: measured again"


def test_a_disturbed_probe_is_outvoted(tmp_path: Path) -> None:
    cache = LinkCache(tmp_path)
    times = iter([0.060, 0.0004, 0.0005, 9.0])          # one run during a burst of other work
    got = [cache.measure("compute|x", lambda: next(times), min) for _ in range(probe_mod.SAMPLES + 2)]
    assert got[probe_mod.SAMPLES - 1:] == [0.0004] * 3


@pytest.mark.parametrize("content", ["", "{not json", "[]", '{"links": {"x": 5}}',
                                     '{"links": {"x": {"samples": ["a"], "measured_at": 1e18}}}'])
def test_a_damaged_links_file_is_measured_again_and_rewritten(tmp_path: Path, content: str) -> None:
    (tmp_path / LINKS_FILE).write_text(content)
    cache = LinkCache(tmp_path)
    assert cache.samples("x") == []
    assert cache.measure("x", lambda: 2.5, max) == 2.5 and LinkCache(tmp_path).samples("x") == [2.5]


def test_disk_probe_reads_the_store_and_needs_no_free_space(make_checkpoint, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #9 item 4: with a store on disk, a full filesystem does not refuse the probe."""
    _, ckpt = make_checkpoint("llama")
    store = convert(ckpt, tmp_path / "store")
    data = store / "weights.bin"
    assert data.stat().st_size >= probe_mod.MIN_PROBE_FILE_BYTES
    before = data.read_bytes()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 0))
    gbps = probe_mod.disk_read_gbps(data, tmp_path / "off")
    assert 0 < gbps < math.inf and data.read_bytes() == before
    assert not (tmp_path / "off").exists(), "nothing is written when the store exists"
    with pytest.raises(StoreError, match=r"0 B free but needs 16.00 MiB \(\+4.00 MiB for metadata\)"):
        probe_mod.disk_read_gbps(None, tmp_path / "off")


@pytest.mark.usefixtures("quiet_machine")
def test_tierkv_plan_shows_the_same_links_and_verdict_run_after_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tierkv.cli import app
    from tierkv.config import Budget, Policy
    from tierkv.engine import model_path
    from tierkv.plan import LinkSpeeds, make_plan, minimum_device_bytes

    cfg = ModelConfig.from_dir(model_path("demo"))
    roomy = make_plan(cfg, Budget(device_mem_bytes=1 << 30, host_mem_bytes=0, offload_dir=tmp_path),
                      Policy(device="cpu"), LinkSpeeds(1.0, math.inf, 1e-3))
    device_mem = minimum_device_bytes(cfg, Policy(device="cpu")) + roomy.layer_bytes // 2
    args = ["plan", "demo", "--device", "cpu", "--device-mem", str(device_mem), "--host-mem", "0",
            "--offload-dir", str(tmp_path), "--json"]
    runs = [json.loads(CliRunner().invoke(app, args).output) for _ in range(probe_mod.SAMPLES + 2)]
    assert runs[0]["disk_layers"], "the plan streams from disk, so the disk link matters"
    settled = runs[probe_mod.SAMPLES - 1:]
    assert all(r["links"] == settled[0]["links"] and r["bound"] == settled[0]["bound"] and
               r["predicted_tok_s"] == settled[0]["predicted_tok_s"] for r in settled)
