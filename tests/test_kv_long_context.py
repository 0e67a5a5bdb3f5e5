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
from tierkv.pipeline.kv import (DenseKVCache, TieredKVCache, chunk_size_candidates, keeps_sketch, kv_bytes_per_token,
                                kv_device_minimum_bytes)
from tierkv.pipeline.kv.table import KVBudgetError
from tierkv.plan import PlanError, kv_reserve_bytes, make_plan, minimum_device_bytes

CONTEXT = 1024        # the model's max_position_embeddings
PROMPT = CONTEXT - 8  # near the full context
KV_TOKENS = 16        # --kv-device-tokens: far below what the per-chunk index alone takes at CONTEXT
NEW = 4


pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")


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


def _small_device_mem(model: Path, policy: Policy, kv_tokens: int = KV_TOKENS) -> int:
    """Every layer beside the smallest reserve the planner accepts for ``kv_tokens`` of KV room: before
    the fix the plan's KV room was then ``kv_tokens`` tokens and a long prompt failed in generate."""
    with tierkv.load(model, device="cpu") as eng:
        cfg = eng.config
    roomy = make_plan(cfg, tierkv.Budget(), policy)
    return minimum_device_bytes(cfg, policy, kv_tokens) + (cfg.num_layers - 1) * roomy.layer_bytes


def _minimum_device_mem(model: Path, policy: Policy) -> int:
    return minimum_device_bytes(ModelConfig.from_dir(model), policy)


@pytest.mark.parametrize("kv, sketch", [("exact", None), ("exact", True), ("sparse", None), ("sparse", True),
                                        ("auto", None), ("auto", True)])
def test_small_kv_room_runs_a_prompt_near_the_full_context(model: Path, prompt: list[int], dense_tokens: list[int],
                                                           tmp_path: Path, kv: str, sketch: bool | None) -> None:
    # a budget of 0.25: the default 0.05 of ~1K tokens holds < 8 chunks of 16 tokens, where auto stays exact
    options = dict(kv=kv, kv_sketch=sketch, kv_device_tokens=KV_TOKENS, kv_exact_max_tokens=512, kv_budget=0.25)
    policy = Policy(dtype="float32", device="cpu", **options)  # type: ignore[arg-type]
    per_token = kv_bytes_per_token(ModelConfig.from_dict({**_config(model)}), torch.float32)
    with tierkv.load(model, device="cpu", device_mem=_small_device_mem(model, policy), host_mem=64 * per_token,
                     offload_dir=tmp_path, **options) as eng:
        coded = keeps_sketch(policy)      # the plan keeps room for the codes the cache keeps
        floor = kv_device_minimum_bytes(eng.config, policy, torch.float32, 1, CONTEXT, sketch=coded)
        assert eng.plan.kv_device_bytes >= floor > KV_TOKENS * per_token
        out = eng.generate(prompt, max_new_tokens=NEW, ignore_eos=True)   # sparse tokens may differ: count steps
    st = out.stats.kv
    assert len(out.token_ids) == NEW
    assert st["device_bytes"] > 0 and st["host_bytes"] > 0 and st["disk_bytes"] > 0, st   # spilled, not refused
    if kv == "exact":
        assert out.token_ids == dense_tokens
        assert st["sparse_layer_steps"] == 0
    else:                                   # auto: the context is beyond kv_exact_max_tokens, so decode is sparse
        assert st["sparse_layer_steps"] == (NEW - 1) * eng.config.num_layers
        if coded:                                                         # the plan kept room for the codes
            assert st["sketch"] == "on", st["sketch"]
        else:   # the default wants codes on every device, but the plan keeps room for them only when asked
            assert st["sketch"].startswith("off: the key codes do not fit"), st["sketch"]


def _config(model: Path) -> dict[str, Any]:
    import json
    return json.loads((model / "config.json").read_text())


def test_device_budget_below_the_full_context_minimum_is_refused_at_load_and_the_named_minimum_works(
        model: Path, prompt: list[int], dense_tokens: list[int], tmp_path: Path) -> None:
    options = dict(kv="exact", kv_device_tokens=KV_TOKENS)
    policy = Policy(dtype="float32", device="cpu", **options)  # type: ignore[arg-type]
    minimum = _minimum_device_mem(model, policy)
    for device_mem in ("64KiB", minimum * 98 // 100):   # below one layer; just below the full context's KV room
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


def test_key_codes_without_device_room_are_dropped_not_refused(model: Path, prompt: list[int], tmp_path: Path) -> None:
    """kv_sketch=True with a device budget that holds the full context's KV floor but not its key
    codes: load accepts it and the cache runs without the codes (its stats say why)."""
    options = dict(kv="sparse", kv_sketch=True, kv_device_tokens=KV_TOKENS)
    policy = Policy(dtype="float32", device="cpu", **options)  # type: ignore[arg-type]
    plain_policy = Policy(dtype="float32", device="cpu", kv="sparse", kv_device_tokens=KV_TOKENS, kv_sketch=False)
    plain = _minimum_device_mem(model, plain_policy)
    cfg = ModelConfig.from_dir(model)
    assert kv_reserve_bytes(cfg, torch.float32, plain_policy, KV_TOKENS, 1) < kv_reserve_bytes(
        cfg, torch.float32, policy, KV_TOKENS, 1)           # the codes would need more
    with tierkv.load(model, device="cpu", device_mem=plain, host_mem=0, offload_dir=tmp_path, **options) as eng:
        out = eng.generate(prompt, max_new_tokens=NEW, ignore_eos=True)
    assert len(out.token_ids) == NEW and out.stats.kv["sketch"].startswith("off: the key codes do not fit")


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
    bad = runner.invoke(app, common + ["--device-mem", str(_minimum_device_mem(model, policy) * 98 // 100),
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


def _drive(caches: list[Any], cfg: ModelConfig, pieces: list[int]) -> list[list[torch.Tensor]]:
    """Feed the same random q/k/v pieces to every cache (prefill pieces, then 1-token steps)."""
    g, start = torch.Generator().manual_seed(0), 0
    outs: list[list[torch.Tensor]] = [[] for _ in caches]
    for t in pieces:
        pos = torch.arange(start, start + t)[None]
        for layer in range(cfg.num_layers):
            q, k, v = (torch.randn(1, n, t, cfg.head_dim, generator=g) for n in (cfg.num_heads, cfg.num_kv_heads,
                                                                               cfg.num_kv_heads))
            for cache, out in zip(caches, outs):
                out.append(cache.attend(layer, q, k, v, pos, None))
        for cache in caches:
            cache.advance(t)
        start += t
    return outs


@pytest.mark.parametrize("policy", [Policy(kv="exact"), Policy(kv="sparse", kv_sketch=True),
                                    Policy(kv="sparse", chunk_tokens=32, kv_sketch=False)],
                         ids=["adaptive", "sketch", "fixed"])
def test_the_minimum_room_holds_every_capacity_up_to_its_own(policy: Policy, tmp_path: Path) -> None:
    """At exactly ``kv_device_minimum_bytes`` for 2048 tokens a cache of any shorter capacity builds,
    whatever chunk size a layer's attention skew asks for, and runs its full capacity (losslessly in
    exact mode); one byte less per layer is refused with the minimum, in one error."""
    cfg, full = _cache_cfg(), 2048
    sketch = keeps_sketch(policy)
    room = kv_device_minimum_bytes(cfg, policy, torch.float32, 1, full, sketch)
    for capacity in (1, 15, 100, 1000, full):
        with TieredKVCache(cfg, policy, 1, capacity, torch.float32, "cpu", kv_device_bytes=room,
                           offload_dir=tmp_path) as cache:
            assert cache.stats()["sketch"] == ("on" if sketch else "off")
            shape = cache._st.shape
            assert shape.sizes() == chunk_size_candidates(policy, capacity)
            for size in shape.sizes():                  # every size the attention skew may choose
                geo = shape.layer_geometry(size, None)
                assert geo.resident_slots + geo.scratch_slots >= min(6, geo.max_chunks)
    dense = DenseKVCache(cfg, 1, full, torch.float32, torch.device("cpu"))
    with TieredKVCache(cfg, policy, 1, full, torch.float32, "cpu", kv_device_bytes=room, kv_host_bytes=0,
                       offload_dir=tmp_path) as cache:
        want, got = _drive([dense, cache], cfg, [1000, 1000, 45, 1, 1, 1])
        st = cache.stats()
    assert st["disk_bytes"] > 0 and st["decode_steps"] == 3
    if policy.kv == "exact":
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
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


@pytest.mark.slow
def test_the_reported_case_8k_context_256_tokens_of_device_room(tmp_path: Path) -> None:
    """The issue's shape: an 8K-context model, --kv-device-tokens 256, a 7165-token prompt (~20 s)."""
    model = save_hf_model(build_hf_model("llama", max_position_embeddings=8192), tmp_path / "m8k")
    ids = torch.randint(0, 211, (7165,), generator=torch.Generator().manual_seed(5)).tolist()
    with tierkv.load(model, device="cpu", kv="exact") as eng:
        dense = eng.generate(ids, max_new_tokens=NEW).token_ids
    for kv, sketch in (("exact", None), ("auto", True)):
        options = dict(kv=kv, kv_sketch=sketch, kv_device_tokens=256)
        policy = Policy(dtype="float32", device="cpu", **options)  # type: ignore[arg-type]
        device_mem = _small_device_mem(model, policy, 256)
        if sketch:   # the key codes and ellipsoids of the full context (176 KiB) outweigh a layer (124 KiB):
            cfg = ModelConfig.from_dir(model)       # a budget half a layer short of keeping every layer too
            layer = make_plan(cfg, tierkv.Budget(), policy).layer_bytes
            device_mem = minimum_device_bytes(cfg, policy, 256, key_codes=True) + (cfg.num_layers - 1) * layer - layer // 2
        with tierkv.load(model, device="cpu", device_mem=device_mem, host_mem="64KiB", offload_dir=tmp_path / kv,
                         **options) as eng:
            out = eng.generate(ids, max_new_tokens=NEW)
            plan = eng.plan
        assert out.stats.kv["disk_bytes"] > 0
        if kv == "exact":
            assert out.token_ids == dense
        else:    # issue 12: the plan keeps the 8K tokens' key codes in the KV room (a layer streams instead)
            assert plan.kv_sketch_bytes > 0 and plan.kv_sketch_note == "" and plan.disk_layers
            assert len(out.token_ids) == NEW and out.stats.kv["sketch"] == "on"
