"""Through ``tierkv.load`` (issue 12): the planned KV room, key codes included, and chunkings that
do not follow it.

The same prompt under three placements of its KV (all on the device, spilled to host memory,
spilled to disk) gets the same chunk sizes and the same tokens; the plan keeps device room for the
key codes at the model's full context when the cache keeps them, and where the device budget cannot
hold them it says so at load (the plan summary, a ``tierkv`` warning, the cache's stats), naming
the budget that keeps them, which then does.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import tierkv
from conftest import build_hf_model, save_hf_model
from tierkv.cli import app
from tierkv.config import ModelConfig, Policy
from tierkv.pipeline.kv import kv_bytes_per_token
from tierkv.plan import make_plan, minimum_device_bytes, reserve_bytes

CONTEXT = 2048            # the model's max_position_embeddings
PROMPT = 1200
NEW = 4
ROOM_TOKENS = 64          # --kv-device-tokens: the planner raises the room to the full context's minimum

pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(build_hf_model("llama", max_position_embeddings=CONTEXT), tmp_path_factory.mktemp("place"))


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return torch.randint(0, 211, (PROMPT,), generator=torch.Generator().manual_seed(11)).tolist()


def _options(**kv: Any) -> dict[str, Any]:
    return dict(device="cpu", dtype="float32", prefill_chunk_tokens=512, **kv)   # one piece size for all placements


def _resident_weights_budget(model: Path, options: dict[str, Any]) -> int:
    """Every layer on the device beside the reserve for ROOM_TOKENS of KV (raised to the full context's minimum)."""
    cfg = ModelConfig.from_dir(model)
    policy = Policy(**{k: v for k, v in options.items()}, kv_device_tokens=ROOM_TOKENS)
    roomy = make_plan(cfg, tierkv.Budget(), policy)
    return roomy.globals_bytes + cfg.num_layers * roomy.layer_bytes + reserve_bytes(
        cfg, torch.float32, policy, ROOM_TOKENS, 1)


def _generate(model: Path, prompt: list[int], options: dict[str, Any], **budgets: Any) -> tuple[Any, Any]:
    with tierkv.load(model, **options, **budgets) as eng:
        return eng.plan, eng.generate(prompt, max_new_tokens=NEW, ignore_eos=True)


@pytest.mark.parametrize("kv", [dict(kv="exact"), dict(kv="sparse", kv_budget=0.25, kv_sketch=False),
                                dict(kv="sparse", kv_budget=0.25, kv_sketch=True)],
                         ids=["exact", "sparse", "sparse-codes"])
def test_the_same_prompt_gets_the_same_chunks_and_tokens_on_every_placement(model: Path, prompt: list[int],
                                                                           tmp_path: Path, kv: dict[str, Any]) -> None:
    options = _options(**kv)
    per_token = kv_bytes_per_token(ModelConfig.from_dir(model), torch.float32)
    device_mem = _resident_weights_budget(model, options)
    runs = {"device": _generate(model, prompt, options),
            "host": _generate(model, prompt, options, kv_device_tokens=ROOM_TOKENS, device_mem=device_mem,
                              host_mem=4 * PROMPT * per_token, offload_dir=tmp_path / "h"),
            "disk": _generate(model, prompt, options, kv_device_tokens=ROOM_TOKENS, device_mem=device_mem,
                              host_mem=100 * per_token, offload_dir=tmp_path / "d")}
    stats = {name: out.stats.kv for name, (_, out) in runs.items()}
    if kv["kv"] == "exact":
        assert "chunk_tokens" not in stats["device"]        # everything fits: the resident cache
    else:
        assert stats["device"]["host_bytes"] == stats["device"]["disk_bytes"] == 0
        assert stats["device"]["chunk_tokens"] == stats["host"]["chunk_tokens"], stats
    assert stats["host"]["host_bytes"] > 0 and stats["host"]["disk_bytes"] == 0, stats["host"]
    assert stats["disk"]["disk_bytes"] > 0
    assert stats["host"]["chunk_tokens"] == stats["disk"]["chunk_tokens"]
    tokens = {name: out.token_ids for name, (_, out) in runs.items()}
    assert tokens["device"] == tokens["host"] == tokens["disk"], tokens
    if kv.get("kv_sketch"):                                  # the planned room kept the codes while spilling
        for name in ("host", "disk"):
            plan = runs[name][0]
            assert plan.kv_sketch_bytes > 0 and plan.kv_sketch_note == ""
            assert "sparse key codes: on" in plan.summary()
            assert stats[name]["sketch"] == "on" and stats[name]["sketch_bytes"] > 0


def test_key_codes_the_budget_cannot_hold_are_off_and_the_plan_says_why_and_what_keeps_them(
        model: Path, prompt: list[int], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kv = dict(kv="sparse", kv_budget=0.25, kv_sketch=True, kv_device_tokens=ROOM_TOKENS)
    cfg, options = ModelConfig.from_dir(model), _options(**kv)
    policy = Policy(**options)
    plain = minimum_device_bytes(cfg, policy, ROOM_TOKENS)          # the floor without key codes
    coded = minimum_device_bytes(cfg, policy, ROOM_TOKENS, key_codes=True)
    assert coded > plain
    with caplog.at_level(logging.WARNING, logger="tierkv"):
        plan, out = _generate(model, prompt, options, device_mem=plain, host_mem=0, offload_dir=tmp_path / "a")
    note = plan.kv_sketch_note
    assert note.startswith("off: the key codes do not fit the device budget") and "--no-kv-sketch" in note, note
    assert plan.kv_sketch_bytes == 0 and f"sparse key codes: {note}" in plan.summary().splitlines()
    assert any(note in r.getMessage() for r in caplog.records if r.name.startswith("tierkv")), caplog.records
    st = out.stats.kv
    assert st["sketch"] == note and st["sketch_bytes"] == 0 and st["disk_bytes"] > 0
    named = re.search(r"raise --device-mem to at least (\d+\.\d\d [KMG]iB)", note)
    assert named is not None, note
    plan, out = _generate(model, prompt, options, device_mem=named.group(1).replace(" ", ""), host_mem=0,
                          offload_dir=tmp_path / "b")
    assert plan.kv_sketch_note == "" and plan.kv_sketch_bytes > 0
    assert out.stats.kv["sketch"] == "on" and out.stats.kv["sketch_bytes"] > 0


def test_tierkv_plan_shows_the_key_codes_line_for_the_kv_flags(model: Path, tmp_path: Path) -> None:
    """`tierkv plan` takes the KV flags the room depends on (--kv, --kv-budget, --chunk-tokens,
    --kv-sketch) and says whether the key codes fit."""
    cfg = ModelConfig.from_dir(model)
    policy = Policy(**_options(kv="sparse", kv_sketch=True, kv_device_tokens=ROOM_TOKENS))
    def plan(*flags: str) -> Any:
        res = CliRunner().invoke(app, ["plan", str(model), "--device", "cpu", "--dtype", "float32", "--kv", "sparse",
                                       "--kv-device-tokens", str(ROOM_TOKENS), "--prefill-chunk-tokens", "512",
                                       "--offload-dir", str(tmp_path), *flags])
        assert res.exit_code == 0, res.output
        return res.stdout

    assert "sparse key codes: on" in plan("--kv-sketch")
    tight = plan("--kv-sketch", "--device-mem", str(minimum_device_bytes(cfg, policy, ROOM_TOKENS)))
    assert "sparse key codes: off: the key codes do not fit" in tight
    assert "sparse key codes" not in plan("--no-kv-sketch")
