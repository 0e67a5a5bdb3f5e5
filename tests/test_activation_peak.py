"""A step's real allocations stay within the activations the planner reserves for it.

The planner keeps device room for one step's activations (``plan.activation_bytes``: a prefill piece,
its attention, the logits) beside the weights and the KV room, and places layers in what is left; an
undercount would let a step run past the device budget. Here torch's profiler records every CPU
allocation and free of each prefill step (``profile_memory``), and the peak of what the step holds
beyond what it started with must stay within the reserve, plus the KV the step appends (the KV room's,
not the activations'). Cases: the dense cache, the tiered cache's gathered exact attention (the CPU
flash kernel over a gathered K/V: one attention scratch counted), bf16 and fp32, and a sliding window
that cuts the keys (masked score blocks beside the gathered K/V: two scratches counted).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import build_hf_model, save_hf_model
from torch.profiler import ProfilerActivity, profile

import tierkv
from tierkv.pipeline.kv.sizing import kv_bytes_per_token
from tierkv.plan import fused_tail_attention
from tierkv.runner import Runner

PIECE = 256
SHAPE = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=512, max_position_embeddings=2048)


def _peak_growth(trace: Path) -> int:
    """The largest sum of CPU allocations less frees at any moment of a profiled region (bytes)."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"]
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    total = peak = 0
    for e in sorted(events, key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0))):
        total += e["args"]["Bytes"]
        peak = max(peak, total)
    return peak


def _profiled_prefill_peaks(engine: Any, prompt: list[int], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[int, int]], set[str]]:
    """(tokens, peak growth) of each step of ``engine.generate(prompt)`` that carries prompt tokens, and
    the kinds of cache the steps ran through."""
    peaks: list[tuple[int, int]] = []
    caches: set[str] = set()
    forward = Runner.forward

    def spy(self: Runner, feeds: Any, head_rows: int, groups: Any = None) -> Any:
        tokens = sum(len(f.ids) for f in feeds)
        if tokens == 1:
            return forward(self, feeds, head_rows, groups)
        trace = tmp_path / f"step{len(peaks)}.json"
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = forward(self, feeds, head_rows, groups)
        prof.export_chrome_trace(str(trace))
        peaks.append((tokens, _peak_growth(trace)))
        caches.add(type(feeds[0].cache).__name__)
        return out

    monkeypatch.setattr(Runner, "forward", spy)
    engine.generate(prompt, max_new_tokens=2)
    monkeypatch.undo()
    return peaks, caches


@pytest.mark.parametrize("arch, dtype, cache, window", [
    ("llama", "float32", "DenseKVCache", None),
    ("llama", "bfloat16", "TieredKVCache", None),
    ("llama", "float32", "TieredKVCache", None),
    ("mistral", "float32", "TieredKVCache", 96),
])
def test_each_prefill_step_allocates_within_the_reserved_activations(
        arch: str, dtype: str, cache: str, window: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = {"sliding_window": window} if window else {}
    path = save_hf_model(build_hf_model(arch, **SHAPE, **extra), tmp_path / "model")
    prompt = [(11 * i) % 500 + 3 for i in range(3 * PIECE - 40)]        # three pieces, the last one short
    tiered = {"kv_exact_max_tokens": 64, "chunk_tokens": 32} if cache == "TieredKVCache" else {}
    with tierkv.load(path, device="cpu", dtype=dtype, prefill_chunk_tokens=PIECE, **tiered) as engine:
        plan = engine.plan
        assert plan is not None and plan.prefill_chunk_tokens == PIECE
        assert fused_tail_attention(engine.config, engine.dtype, "cpu") == (window is None)
        peaks, caches = _profiled_prefill_peaks(engine, prompt, tmp_path, monkeypatch)
        kv_step = PIECE * kv_bytes_per_token(engine.config, engine.dtype)
    assert [t for t, _ in peaks] == [PIECE, PIECE, len(prompt) - 2 * PIECE] and caches == {cache}
    assert all(0 < peak <= plan.activation_bytes + kv_step for _, peak in peaks), (plan.activation_bytes, peaks)


def test_a_layer_streamed_in_pieces_holds_every_micro_batch_within_the_reserve(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streamed in pieces, every micro-batch's rows go through each block together, so the plan reserves
    all of them (not one micro-batch's, as for whole layers); two prompts prefill side by side in two
    groups and each step's allocations stay within that reserve."""
    from tierkv.config import Budget, ModelConfig, Policy
    from tierkv.engine import Engine
    from tierkv.pipeline.pieces import PIECE_SLOTS, piece_ring_bytes
    from tierkv.plan import STREAM_UNIT_VAR, activation_bytes, minimum_device_bytes, step_rows

    path = save_hf_model(build_hf_model("llama", num_hidden_layers=6, hidden_size=512, intermediate_size=1536,
                                        num_attention_heads=8, num_key_value_heads=4, std=0.05), tmp_path / "model")
    cfg = ModelConfig.from_dir(path)
    policy = Policy(device="cpu", kv_device_tokens=512, max_sequences=2, micro_batches=2, prefill_chunk_tokens=128)
    budget = Budget(device_mem_bytes=minimum_device_bytes(cfg, policy, 512) + piece_ring_bytes(4 << 20) + (8 << 20),
                    host_mem_bytes=0, offload_dir=tmp_path / "off")
    monkeypatch.setenv(STREAM_UNIT_VAR, "piece")
    prompts = [[(5 * i + j) % 200 + 3 for i in range(200)] for j in range(2)]
    with Engine(path, policy, budget=budget) as engine:
        plan = engine.plan
        assert plan is not None and plan.disk_layers and plan.stream_pieces == PIECE_SLOTS
        one_group = activation_bytes(cfg, engine.dtype, 128, plan.attention_scratch_bytes, 512, 1, step_rows(policy),
                                     policy)
        assert plan.activation_bytes >= 2 * one_group - plan.attention_scratch_bytes
        peaks: list[int] = []
        forward = Runner.forward

        def spy(self: Runner, feeds: Any, head_rows: int, groups: Any = None) -> Any:
            trace = tmp_path / f"step{len(peaks)}.json"
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = forward(self, feeds, head_rows, groups)
            prof.export_chrome_trace(str(trace))
            peaks.append(_peak_growth(trace) - sum(len(f.ids) for f in feeds) * kv_bytes_per_token(cfg, engine.dtype))
            return out

        monkeypatch.setattr(Runner, "forward", spy)
        outs = engine.generate(prompts, max_new_tokens=2)
        monkeypatch.undo()
        assert max(o.stats.batch_size for o in outs) == 2
    assert peaks and max(peaks) <= plan.activation_bytes, (plan.activation_bytes, one_group, peaks)
