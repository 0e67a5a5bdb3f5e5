"""Engine placements for multi-sequence tests: where weights and KV live, as ``tierkv.load`` arguments.

Why this module exists: the ragged-batch, concurrency and session tests must hold wherever the
weights and the KV cache live. Each placement here is a set of public ``tierkv.load`` arguments
for a tiny fp32 checkpoint, plus ``check_placement``, which asserts from the engine's plan that the
placement is really in effect (layers streamed from disk, a KV room too small for the prompts), so
a test cannot pass on a placement that silently fell back to "everything resident".

    resident   every layer and all KV on the device
    streamed   every layer read from the packed store on disk each step (device budget at the minimum)
    tiered     resident weights, exact KV over device, host and disk (a few tokens of KV room)
    sparse     as tiered, with sparse selection (kv="sparse") over the three tiers
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import tierkv
from tierkv.config import ModelConfig, Policy
from tierkv.plan import make_plan, minimum_device_bytes, reserve_bytes

PLACEMENTS = ("resident", "streamed", "tiered", "sparse")
PIECE_TOKENS = 16          # prefill pieces: a long prompt's prefill takes several steps
CHUNK_TOKENS = 8           # KV chunk size of the tiered placements (at a 128-token context: 64 tokens of room)
KV_ROOM_TOKENS = 16        # kv_device_tokens of the tiered placements (the planner raises it to its minimum)
HOST_KV_TOKENS = 20        # host KV budget of the tiered placements, in tokens of one sequence
SPARSE_BUDGET_TOKENS = 16  # tokens a sparse step attends to (beside the first chunk and the recent window)


def kv_token_bytes(cfg: ModelConfig) -> int:
    """fp32 K and V of one token over all layers (the test's own count, not the package's)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4


def placement_kwargs(kind: str, model_dir: Path, offload_dir: Path) -> dict[str, Any]:
    """``tierkv.load`` keyword arguments for placement ``kind`` of the checkpoint at ``model_dir``."""
    assert kind in PLACEMENTS, kind
    cfg = ModelConfig.from_dir(model_dir)
    base: dict[str, Any] = dict(device="cpu", dtype="float32", offload_dir=offload_dir)
    if kind == "resident":
        return dict(base, kv="exact", prefill_chunk_tokens=PIECE_TOKENS)
    if kind == "streamed":
        policy = Policy(dtype="float32", device="cpu", kv="exact", kv_device_tokens=64)
        layer = make_plan(cfg, tierkv.Budget(), policy).layer_bytes
        device_mem = minimum_device_bytes(cfg, policy, context_tokens=64) + layer // 2   # no room for a 2nd layer
        return dict(base, kv="exact", kv_device_tokens=64, device_mem=device_mem, host_mem=0)
    policy = Policy(dtype="float32", device="cpu", kv="exact", chunk_tokens=CHUNK_TOKENS,
                    kv_device_tokens=KV_ROOM_TOKENS, prefill_chunk_tokens=PIECE_TOKENS)
    roomy = make_plan(cfg, tierkv.Budget(), policy)
    # every layer, and the reserve of KV_ROOM_TOKENS of KV (raised by the planner to the tiered cache's minimum)
    device_mem = roomy.globals_bytes + cfg.num_layers * roomy.layer_bytes + reserve_bytes(
        cfg, torch.float32, policy, KV_ROOM_TOKENS, 1)
    kv_args = dict(kv="exact") if kind == "tiered" else dict(kv="sparse", kv_budget=SPARSE_BUDGET_TOKENS,
                                                              kv_sketch=False)
    return dict(base, chunk_tokens=CHUNK_TOKENS, kv_device_tokens=KV_ROOM_TOKENS, prefill_chunk_tokens=PIECE_TOKENS,
                device_mem=device_mem, host_mem=HOST_KV_TOKENS * kv_token_bytes(cfg), **kv_args)


def load(kind: str, model_dir: Path, offload_dir: Path) -> tierkv.Engine:
    """The engine of placement ``kind``, checked (``check_placement``)."""
    engine = tierkv.load(model_dir, **placement_kwargs(kind, model_dir, offload_dir))
    check_placement(kind, engine)
    return engine


def check_placement(kind: str, engine: tierkv.Engine, longest_context_tokens: int = 70) -> None:
    """Assert from the plan that ``kind`` is in effect: streamed layers, or a KV room smaller than a
    context of ``longest_context_tokens`` (so that such a sequence's KV spills to host and disk)."""
    plan = engine.plan
    assert plan is not None
    layers = engine.config.num_layers
    if kind == "streamed":
        assert plan.disk_layers and not plan.host_layers, plan.summary()
    else:
        assert not plan.disk_layers and len(plan.device_layers) == layers, plan.summary()
    if kind in ("tiered", "sparse"):
        room_tokens = plan.kv_device_bytes // kv_token_bytes(engine.config)
        assert room_tokens < longest_context_tokens, plan.summary()
        assert 0 < plan.kv_host_bytes < longest_context_tokens * kv_token_bytes(engine.config), plan.summary()


def spilled_kv(stats: list[dict[str, Any]]) -> bool:
    """Whether any of these results' KV stats (``result.stats.kv``) shows bytes on host and on disk."""
    return any(kv.get("host_bytes", 0) > 0 and kv.get("disk_bytes", 0) > 0 for kv in stats)


def random_prompt(length: int, seed: int, vocab: int = 211) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
