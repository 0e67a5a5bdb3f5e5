"""A small device KV room never fails a prompt the model allows (issue 9, item 3).

The planner keeps device room for the tiered cache's working set at the model's full context
(the per-chunk index: abstracts, and key codes with ``kv_sketch=True``, beside the fewest chunk
slots), so a prompt near the full context spills to host and disk instead of failing at generate
time; a device budget that cannot hold that is refused at ``load()`` with the minimum, and the
minimum the message names works. The cache's own budget error names the minimum and is never a
chained traceback.
"""

from __future__ import annotations

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
from tierkv.pipeline.kv import TieredKVCache, kv_bytes_per_token, kv_device_minimum_bytes
from tierkv.pipeline.kv_table import KVBudgetError
from tierkv.plan import PlanError, activation_bytes, make_plan

CONTEXT = 1024        # the model's max_position_embeddings
PROMPT = CONTEXT - 8  # near the full context
KV_TOKENS = 16        # --kv-device-tokens: far below what the per-chunk index alone takes at CONTEXT
NEW = 4


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Tiny tensors: one thread, and the torch references of the kernels (the Triton interpreter is slow)."""
    monkeypatch.setenv("TIERKV_KERNELS", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(build_hf_model("llama", max_position_embeddings=CONTEXT), tmp_path_factory.mktemp("ctx"))


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return torch.randint(0, 211, (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(scope="module")
def dense_tokens(model: Path, prompt: list[int]) -> list[int]:
    """The resident run (fp32, every layer and all KV on the device): the oracle for exact mode."""
    with tierkv.load(model, device="cpu", kv="exact") as eng:
        return eng.generate(prompt, max_new_tokens=NEW).token_ids


def _small_device_mem(model: Path, policy: Policy) -> int:
    """Every layer + KV_TOKENS of dense KV + activations: what the planner used to reserve, so that
    before the fix the plan's KV room was KV_TOKENS tokens and a long prompt failed in generate."""
    with tierkv.load(model, device="cpu") as eng:
        cfg = eng.config
    roomy = make_plan(cfg, tierkv.Budget(), policy)
    weights = roomy.globals_bytes + cfg.num_layers * roomy.layer_bytes
    return (weights + kv_bytes_per_token(cfg, torch.float32) * KV_TOKENS
            + activation_bytes(cfg, policy, KV_TOKENS, 1))


def _minimum_device_mem(model: Path, policy: Policy) -> int:
    with tierkv.load(model, device="cpu") as eng:
        p = make_plan(eng.config, tierkv.Budget(), policy)
    return p.reserve_bytes + p.globals_bytes + p.layer_bytes


@pytest.mark.parametrize("kv, sketch", [("exact", None), ("exact", True), ("sparse", None), ("sparse", True),
                                        ("auto", None), ("auto", True)])
def test_small_kv_room_runs_a_prompt_near_the_full_context(model: Path, prompt: list[int], dense_tokens: list[int],
                                                           tmp_path: Path, kv: str, sketch: bool | None) -> None:
    options = dict(kv=kv, kv_sketch=sketch, kv_device_tokens=KV_TOKENS, kv_exact_max_tokens=512)
    policy = Policy(dtype="float32", device="cpu", **options)  # type: ignore[arg-type]
    per_token = kv_bytes_per_token(ModelConfig.from_dict({**_config(model)}), torch.float32)
    with tierkv.load(model, device="cpu", device_mem=_small_device_mem(model, policy), host_mem=64 * per_token,
                     offload_dir=tmp_path, **options) as eng:
        coded = kv != "exact" and sketch is True
        floor = kv_device_minimum_bytes(eng.config, policy, torch.float32, 1, CONTEXT, sketch=coded)
        assert eng.plan.kv_device_bytes >= floor > KV_TOKENS * per_token
        out = eng.generate(prompt, max_new_tokens=NEW)
    st = out.stats.kv
    assert len(out.token_ids) == NEW
    assert st["device_bytes"] > 0 and st["host_bytes"] > 0 and st["disk_bytes"] > 0, st   # spilled, not refused
    if kv == "exact":
        assert out.token_ids == dense_tokens
        assert st["sparse_layer_steps"] == 0
    else:                                   # auto: the context is beyond kv_exact_max_tokens, so decode is sparse
        assert st["sparse_layer_steps"] == (NEW - 1) * eng.config.num_layers
        assert st["sketch"] == ("on" if coded else "off"), st["sketch"]   # the plan kept room for the codes


def _config(model: Path) -> dict[str, Any]:
    import json
    return json.loads((model / "config.json").read_text())


def test_device_budget_below_the_full_context_minimum_is_refused_at_load_and_the_named_minimum_works(
        model: Path, prompt: list[int], dense_tokens: list[int], tmp_path: Path) -> None:
    options = dict(kv="exact", kv_device_tokens=KV_TOKENS)
    policy = Policy(dtype="float32", device="cpu", **options)  # type: ignore[arg-type]
    minimum = _minimum_device_mem(model, policy)
    for device_mem in ("64KiB", minimum - 1):   # below one layer; one byte below the full context's KV room
        with pytest.raises(PlanError, match="raise --device-mem to at least") as err:
            tierkv.load(model, device="cpu", device_mem=device_mem, host_mem=0, offload_dir=tmp_path, **options)
        message = str(err.value)
        assert "the least with which the model's full context runs" in message
        assert "--kv-device-tokens" not in message     # fewer tokens would not lower it
    named = re.search(r"at least (\d+\.\d\d [KMG]iB)", message)
    assert named is not None, message
    with tierkv.load(model, device="cpu", device_mem=named.group(1).replace(" ", ""), host_mem=0,
                     offload_dir=tmp_path, **options) as eng:
        out = eng.generate(prompt, max_new_tokens=NEW)
    assert out.token_ids == dense_tokens and out.stats.kv["disk_bytes"] > 0


def test_cli_long_prompt_runs_and_a_too_small_budget_is_one_line(model: Path, prompt: list[int],
                                                                 dense_tokens: list[int], tmp_path: Path) -> None:
    runner = CliRunner()
    policy = Policy(dtype="float32", device="cpu", kv="exact", kv_device_tokens=KV_TOKENS)
    common = ["run", str(model), "--device", "cpu", "--kv", "exact", "--kv-device-tokens", str(KV_TOKENS),
              "--host-mem", "0", "--offload-dir", str(tmp_path), "-n", str(NEW), "--json"]
    ids = ",".join(map(str, prompt))
    ok = runner.invoke(app, common + ["--device-mem", str(_small_device_mem(model, policy)), "--prompt-ids", ids])
    assert ok.exit_code == 0, ok.output
    import json
    assert json.loads(ok.stdout.strip().splitlines()[-1])["token_ids"] == dense_tokens
    bad = runner.invoke(app, common + ["--device-mem", str(_minimum_device_mem(model, policy) - 1),
                                       "--prompt-ids", ids])
    assert bad.exit_code == 2, bad.output
    assert "Traceback" not in bad.output and (bad.exception is None or isinstance(bad.exception, SystemExit))
    err = bad.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "raise --device-mem to at least" in err, err


# -- the cache's own sizing ------------------------------------------------------------------------


def _cache_cfg() -> ModelConfig:
    return ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=16, hidden_size=64,
                                      intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=8192))


@pytest.mark.parametrize("policy", [Policy(kv="exact"), Policy(kv="sparse", kv_sketch=True),
                                    Policy(kv="sparse", chunk_tokens=32)], ids=["adaptive", "sketch", "fixed"])
def test_the_minimum_room_holds_every_capacity_up_to_its_own(policy: Policy, tmp_path: Path) -> None:
    """At exactly ``kv_device_minimum_bytes`` for 8192 tokens a cache of any shorter capacity builds,
    whatever chunk size a layer's attention skew asks for; one byte less per layer is refused."""
    cfg, full = _cache_cfg(), 8192
    sketch = policy.kv_sketch is True
    room = kv_device_minimum_bytes(cfg, policy, torch.float32, 1, full, sketch)
    for capacity in (1, 15, 100, 1000, 5000, full):
        with TieredKVCache(cfg, policy, 1, capacity, torch.float32, "cpu", kv_device_bytes=room,
                           offload_dir=tmp_path) as cache:
            assert cache.stats()["sketch"] == ("on" if sketch else "off")
            for wanted in (16, 32, 64, 128, 256):       # what chunk_tokens_for_entropy may ask for
                geo = cache._geometry(policy.chunk_tokens or wanted, None)
                assert geo.resident_slots + geo.scratch_slots >= min(6, geo.max_chunks)
    short = room - cfg.num_layers                           # one byte per layer below the minimum
    if sketch:                                              # the codes go first (and stats say why) ...
        with TieredKVCache(cfg, policy, 1, full, torch.float32, "cpu", kv_device_bytes=short,
                           offload_dir=tmp_path) as cache:
            assert cache.stats()["sketch"].startswith("off: the key codes do not fit")
        short = kv_device_minimum_bytes(cfg, policy, torch.float32, 1, full, False) - cfg.num_layers
    with pytest.raises(KVBudgetError, match=r"needs at least 6 per layer .*raise --device-mem") as err:
        TieredKVCache(cfg, policy, 1, full, torch.float32, "cpu", kv_device_bytes=short, offload_dir=tmp_path)
    plain = kv_device_minimum_bytes(cfg, policy, torch.float32, 1, full, False)
    assert f"({plain} bytes)" in str(err.value)
    assert err.value.__context__ is None and err.value.__cause__ is None    # one error, not a chained traceback


def test_a_batch_of_long_prompts_runs_in_batches_the_kv_room_holds(model: Path, prompt: list[int],
                                                                   dense_tokens: list[int], tmp_path: Path) -> None:
    """Equal-length prompts share a batch only as large as the device KV room holds at their context."""
    options = dict(kv="exact", kv_device_tokens=KV_TOKENS)
    policy = Policy(dtype="float32", device="cpu", **options)  # type: ignore[arg-type]
    with tierkv.load(model, device="cpu", device_mem=_small_device_mem(model, policy), host_mem=0,
                     offload_dir=tmp_path, **options) as eng:
        outs = eng.generate([prompt] * 3, max_new_tokens=NEW)
        short = eng.generate([prompt[:40]] * 3, max_new_tokens=NEW)
    assert [o.token_ids for o in outs] == [dense_tokens] * 3
    assert all(o.stats.batch_size < 3 for o in outs) and all(o.stats.kv["disk_bytes"] > 0 for o in outs)
    assert all(o.stats.batch_size == 3 for o in short)     # a short context still shares one batch
