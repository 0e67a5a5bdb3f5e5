"""Throughput mode: the planner's batch choice, its block schedule, and micro-batches that stay exact.

The choice is checked on given link speeds (no probe): it grows the batch while the disk bounds the
step, stops where the KV rooms end, refuses a batch that does not fit with the largest that does,
and turns to micro-batches when one batch's KV does not fit the device room. The engine runs a
ragged batch in micro-batches (rows in several groups per layer pass, a shared KV room spilling to
the host tier) and every sequence still gets exactly its solo greedy tokens (fp32).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest

import tierkv
from placements import random_prompt
from tierkv.batchplan import BatchInputs, choose_batch, prefill_passes_of
from tierkv.budgets import PlanError
from tierkv.config import Budget, ModelConfig, Policy
from tierkv.plan import make_plan, minimum_device_bytes
from tierkv.probe import LinkSpeeds

pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")

SLOW_DISK = LinkSpeeds(disk_read_gbps=0.5, h2d_gbps=float("inf"), layer_compute_s=1e-3)
POLICY = Policy(dtype="float32", device="cpu", kv="exact", prefill_chunk_tokens=256)
SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1536, vocab_size=1000, max_position_embeddings=1024)   # 12 MiB layers, fp32


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    """A config alone (planning needs no weights): layers large beside the working set."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("cfg")
    LlamaConfig(**SHAPE, dtype="float32").save_pretrained(path)
    return ModelConfig.from_dir(path)


def _inputs(cfg: ModelConfig, tmp_path: Path, device_mem: int, host_mem: int = 0, row_s: float = 1e-6,
            links: LinkSpeeds = SLOW_DISK) -> BatchInputs:
    return BatchInputs(cfg, Budget(device_mem, host_mem, tmp_path), POLICY, links, config_only=True, row_s=row_s,
                       token_s=row_s / 10)


def _layer_bytes(cfg: ModelConfig) -> int:
    return make_plan(cfg, Budget(1 << 34, 0, None), POLICY, SLOW_DISK, config_only=True).layer_bytes


def _streaming_budget(cfg: ModelConfig) -> int:
    """Above the minimum working set by three layers (of eight): the rest stream, or KV takes their room."""
    return minimum_device_bytes(cfg, POLICY) + 3 * _layer_bytes(cfg)


def test_the_batch_with_the_best_predicted_throughput_is_chosen(cfg: ModelConfig, tmp_path: Path) -> None:
    choice = choose_batch(_inputs(cfg, tmp_path, _streaming_budget(cfg)), [100, 150, 200, 250] * 4, 8)
    fitting = [o for o in choice.options if o.fits]
    assert choice.predicted_tok_s == max(o.predicted_tok_s for o in fitting) and choice.batch > 1
    assert choice.bound == "disk" and choice.plan.disk_layers       # the weights stream in the chosen plan
    one = choice.options[0]
    assert one.batch == 1 and choice.predicted_tok_s > 1.5 * one.predicted_tok_s
    assert next(o for o in choice.options if o.batch == choice.batch).read_bytes_per_token < one.read_bytes_per_token
    assert choice.load_kwargs() == {"max_sequences": choice.batch, "micro_batches": choice.micro_batches,
                                    "prefill_order": "longest",
                                    "kv_device_tokens": sum(sorted([100, 150, 200, 250] * 4)[-choice.batch:])
                                    + 8 * choice.batch}         # the device holds the whole batch's KV
    assert not choice.kv_split
    assert "<- chosen" in choice.summary()


def test_compute_bound_steps_stop_growing_the_batch(cfg: ModelConfig, tmp_path: Path) -> None:
    # a row costs far more than a layer takes to read: compute bounds every pass, more rows gain nothing
    inputs = _inputs(cfg, tmp_path, _streaming_budget(cfg), row_s=0.5, links=replace(SLOW_DISK, disk_read_gbps=100.0))
    choice = choose_batch(inputs, [100] * 16, 8)
    assert choice.compute_bound_from == 1 and choice.bound == "compute"
    assert choice.batch < 16


def test_a_batch_that_does_not_fit_is_refused_with_the_largest_that_does(cfg: ModelConfig, tmp_path: Path) -> None:
    inputs = _inputs(cfg, tmp_path, _streaming_budget(cfg))
    prompts = [500] * 256
    with pytest.raises(PlanError, match=r"the largest batch that fits is \d+") as err:
        choose_batch(inputs, prompts, 8, asked=256)
    named = int(str(err.value).split("the largest batch that fits is ")[1].split(":")[0])
    assert choose_batch(inputs, prompts, 8, asked=named).batch == named
    with pytest.raises(PlanError):
        choose_batch(inputs, prompts, 8, asked=named + 1)
    auto = choose_batch(inputs, prompts, 8)
    assert max(o.batch for o in auto.options if o.fits) <= named


def test_kv_beyond_the_device_room_runs_as_micro_batches(cfg: ModelConfig, tmp_path: Path) -> None:
    device = minimum_device_bytes(cfg, POLICY) + _layer_bytes(cfg) // 2
    host = 8 * _layer_bytes(cfg) + (64 << 20)        # every layer held in host memory, and 64 MiB for KV
    prompts = [300] * 64
    no_host = choose_batch(_inputs(cfg, tmp_path, device), prompts, 8)
    with_host = choose_batch(_inputs(cfg, tmp_path, device, host_mem=host), prompts, 8)
    assert with_host.batch > no_host.batch and with_host.micro_batches > 1
    assert with_host.load_kwargs()["micro_batches"] == with_host.micro_batches
    assert with_host.load_kwargs()["kv_device_tokens"] * with_host.micro_batches >= with_host.batch * 308
    assert "micro-batches per layer pass" in with_host.summary()


def test_bad_requests_say_what_to_give(cfg: ModelConfig, tmp_path: Path) -> None:
    inputs = _inputs(cfg, tmp_path, _streaming_budget(cfg))
    for prompts, new, asked in (([], 8, "auto"), ([10], 0, "auto"), ([10], 8, 0), ([10], 8, "many")):
        with pytest.raises(tierkv.errors.ArgumentError):
            choose_batch(inputs, prompts, new, asked)


AUTO_PIECE = replace(POLICY, prefill_chunk_tokens=None)


def test_the_prefill_piece_grows_to_the_prompt_when_a_short_job_gains_by_it(cfg: ModelConfig, tmp_path: Path) -> None:
    budget = Budget(minimum_device_bytes(cfg, AUTO_PIECE) + 3 * _layer_bytes(cfg), 0, tmp_path)
    inputs = replace(_inputs(cfg, tmp_path, 0), budget=budget, policy=AUTO_PIECE)
    own = make_plan(cfg, budget, replace(AUTO_PIECE, max_sequences=1, kv_device_tokens=304), SLOW_DISK,
                    config_only=True).prefill_chunk_tokens
    assert own < 300                                   # the planner's own piece takes a 300-token prompt in 2+ passes
    short = choose_batch(inputs, [300], 4, asked=1)
    assert short.load_kwargs()["prefill_chunk_tokens"] == short.plan.prefill_chunk_tokens == 300
    assert short.options[0].passes == 1 + 4            # one prefill pass, then a decode pass per token
    engine_plan = make_plan(cfg, budget, replace(AUTO_PIECE, **short.load_kwargs()), SLOW_DISK, config_only=True)
    assert (engine_plan.disk_layers, engine_plan.prefill_chunk_tokens) == (short.plan.disk_layers, 300)
    kept = choose_batch(replace(inputs, policy=replace(AUTO_PIECE, prefill_chunk_tokens=own)), [300], 4, asked=1)
    assert short.predicted_tok_s > kept.predicted_tok_s
    assert "piece" in short.summary() and "sized to these prompts" in short.summary()
    # 500 new tokens: a layer the larger piece's activations would displace costs every decode pass
    # (two passes of 150 tokens: the least activation room that takes the prompt in two)
    long = choose_batch(inputs, [300], 500, asked=1)
    assert long.plan.prefill_chunk_tokens == 150 and long.options[0].passes == 2 + 500
    assert len(long.plan.disk_layers) < len(short.plan.disk_layers)
    # a piece the policy fixes (the user's, or a loaded engine's) is never resized
    fixed = choose_batch(_inputs(cfg, tmp_path, _streaming_budget(cfg)), [300], 4, asked=1)
    assert "prefill_chunk_tokens" not in fixed.load_kwargs() and fixed.plan.prefill_chunk_tokens == 256


def test_a_piece_sized_to_pack_the_prompts_is_planned_when_its_activations_free_a_layer(tmp_path: Path) -> None:
    """The ~0.85B shape at 1 GiB, prompts of 64 and 512 tokens: the planner's own 512-token piece leaves
    8 layers resident and takes two passes; 288 tokens leave 9 and still take two in one micro-batch
    (512 = 288 + 224, and the 64-token prompt packs beside the 224)."""
    big = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                                 "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
                                 "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 4096,
                                 "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16", "tie_word_embeddings": False})
    policy = Policy(dtype="bfloat16", device="cpu")
    links = LinkSpeeds(disk_read_gbps=1.6, h2d_gbps=float("inf"), layer_compute_s=0.006)
    budget = Budget(1 << 30, 0, tmp_path)
    inputs = BatchInputs(big, budget, policy, links, config_only=True, row_s=2e-4, token_s=2e-5)
    choice = choose_batch(inputs, [64, 512], 16, asked=2)
    own = make_plan(big, budget, replace(policy, max_sequences=2, micro_batches=choice.micro_batches,
                                         kv_device_tokens=choice.kv_device_tokens), links, config_only=True)
    assert own.prefill_chunk_tokens == 512 and choice.micro_batches == 1
    assert choice.plan.prefill_chunk_tokens == 288 and choice.options[0].passes == 2 + 16
    assert len(choice.plan.disk_layers) < len(own.disk_layers)
    assert choice.load_kwargs()["prefill_chunk_tokens"] == 288
    # half the planner's piece takes three passes in one micro-batch (two micro-batches make it two)
    half = choose_batch(replace(inputs, policy=replace(policy, prefill_chunk_tokens=256)), [64, 512], 16, asked=2)
    assert half.plan.disk_layers == choice.plan.disk_layers and half.micro_batches == 2
    assert half.predicted_tok_s <= choice.predicted_tok_s


def test_predicted_prefill_passes_are_the_engines(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    model = tiny_model_dir("llama")          # 2 layers, max 128 positions
    lengths = (7, 70, 23, 41, 5, 30, 64)     # no piece of a single token: every prefill step has tokens > rows
    prompts = [random_prompt(n, seed=400 + i) for i, n in enumerate(lengths)]
    for micro, piece in ((1, 16), (3, 16), (2, 48)):
        ran = {}
        for order in ("longest", "arrival"):     # the planner models the order its load_kwargs ask for
            with tierkv.load(model, device="cpu", dtype="float32", kv="exact", offload_dir=tmp_path, chunk_tokens=8,
                             prefill_chunk_tokens=piece, max_sequences=len(prompts), micro_batches=micro,
                             prefill_order=order) as engine:
                assert engine.runner.log is not None
                limits = engine._core.scheduler.limits
                engine.generate(prompts, max_new_tokens=2, ignore_eos=True)
                ran[order] = sum(1 for s in engine.runner.log.steps if s.tokens > s.rows)
        assert ran["longest"] == prefill_passes_of([len(p) for p in prompts], limits.piece_tokens,
                                                   limits.token_budget, micro)
        # one micro-batch in arrival order packs worse (micro-batches always pack the largest first)
        assert ran["arrival"] > ran["longest"] if (micro, piece) == (1, 16) else ran["arrival"] == ran["longest"]
    assert prefill_passes_of([288], 256, 256, 1) == 2 and prefill_passes_of([288], 288, 288, 1) == 1
    assert prefill_passes_of([512, 362, 213, 64], 512, 513, 2) == 2     # 213 fits beside neither 512 nor 362 + 64
    assert prefill_passes_of([512, 362, 213, 64], 576, 577, 2) == 1
    assert prefill_passes_of([512, 64], 288, 289, 1) == 2 and prefill_passes_of([512, 64], 256, 257, 1) == 3


LENGTHS = (7, 70, 23, 41, 5, 33)
NEW = 10


def test_micro_batches_and_a_shared_room_give_each_sequence_its_solo_tokens(
        tiny_model_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model_dir("llama")          # 2 layers, max 128 positions
    prompts = [random_prompt(n, seed=300 + i) for i, n in enumerate(LENGTHS)]
    base: dict[str, Any] = dict(device="cpu", dtype="float32", kv="exact", offload_dir=tmp_path,
                                prefill_chunk_tokens=16, chunk_tokens=8)
    with tierkv.load(model, **base) as solo:
        want = [solo.generate(p, max_new_tokens=NEW, ignore_eos=True).token_ids for p in prompts]
    groups_seen: list[int] = []
    # device KV room for about two of the six sequences: the shared room spills the rest to the host tier
    with tierkv.load(model, **base, max_sequences=6, micro_batches=3, kv_device_tokens=64,
                     host_mem=64 << 20) as engine:
        forward = engine.runner.forward

        def spy(feeds: Any, head_rows: int, groups: Any = None) -> Any:
            groups_seen.append(len(set(groups or [0])))
            return forward(feeds, head_rows, groups)
        monkeypatch.setattr(engine.runner, "forward", spy)
        got = [r.token_ids for r in engine.generate(prompts, max_new_tokens=NEW, ignore_eos=True)]
        assert engine.kv_stats()["running_sequences"] == 0
    assert got == want
    assert max(groups_seen) == 3
    # one group, the largest pieces first (a batch job's order): the same tokens
    with tierkv.load(model, **base, max_sequences=6, prefill_order="longest") as engine:
        assert engine._core.scheduler.limits.longest_first
        assert [r.token_ids for r in engine.generate(prompts, max_new_tokens=NEW, ignore_eos=True)] == want
    with pytest.raises(tierkv.errors.ArgumentError, match="prefill_order='shortest'.*'arrival'.*'longest'"):
        tierkv.load(model, **base, prefill_order="shortest")


def test_plan_batch_shows_the_choice_and_refuses_a_batch_that_does_not_fit(cfg: ModelConfig, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    import tierkv.batchplan as batchplan
    from tierkv.cli import app

    real = batchplan._with_links
    monkeypatch.setattr(batchplan, "_with_links", lambda inputs: real(replace(inputs, links=SLOW_DISK, row_s=1e-6,
                                                                                     token_s=1e-7)))
    cfg_dir = tmp_path / "cfg"
    from transformers import LlamaConfig
    LlamaConfig(**SHAPE, dtype="float32").save_pretrained(cfg_dir)
    base = ["plan", str(cfg_dir), "--device-mem", str(_streaming_budget(cfg)), "--host-mem", "0", "--offload-dir",
            str(tmp_path / "off"), "--dtype", "float32", "--device", "cpu", "--kv", "exact",
            "--prefill-chunk-tokens", "256", "--prompts", "32", "--prompt-tokens", "64-512", "--new-tokens", "16"]
    shown = CliRunner().invoke(app, base + ["--batch", "auto"])
    assert shown.exit_code == 0, shown.output
    assert "<- chosen" in shown.output and "predicted" in shown.output and "bound by disk" in shown.output
    data = json.loads(CliRunner().invoke(app, base + ["--batch", "auto", "--json"]).output)
    assert data["load_kwargs"]["max_sequences"] == data["batch"] > 1
    refused = CliRunner().invoke(app, base + ["--batch", "32"])
    largest = int(refused.output.split("the largest batch that fits is ")[1].split(":")[0])
    assert refused.exit_code != 0 and 1 <= largest < 32
    assert CliRunner().invoke(app, base + ["--batch", str(largest)]).exit_code == 0
    assert "--batch" in CliRunner().invoke(app, base + ["--batch", "zero"]).output


def test_tierkv_batch_runs_the_planners_batch_and_refuses_one_that_does_not_fit(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from tierkv.cli import app
    from tierkv.engine import model_path

    demo = ModelConfig.from_dir(model_path("demo"))
    policy = Policy(dtype="float32", device="cpu")
    device_mem = minimum_device_bytes(demo, policy) + 64 * 1024         # streams; KV room for a few sequences
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": list(range(3, 40 + i))}) + "\n" for i in range(40)))
    flags = ["--device-mem", str(device_mem), "--host-mem", "0", "--offload-dir", str(tmp_path / "off"),
             "--dtype", "float32", "--device", "cpu", "-n", "3"]
    refused = CliRunner().invoke(app, ["batch", "demo", str(src), "-o", str(tmp_path / "a.jsonl"), "--batch", "40",
                                       *flags])
    assert refused.exit_code == 2, refused.output
    largest = int(refused.output.split("the largest batch that fits is ")[1].split(":")[0])
    assert 1 <= largest < 40 and not (tmp_path / "a.jsonl").read_text().strip()
    out = tmp_path / "b.jsonl"
    ran = CliRunner().invoke(app, ["batch", "demo", str(src), "-o", str(out), "--json", *flags])
    assert ran.exit_code == 0, ran.output
    summary = json.loads(ran.output.strip().splitlines()[-1])
    assert 1 < summary["batch"] <= largest and summary["ok"] == 40
    assert len(out.read_text().splitlines()) == 40
