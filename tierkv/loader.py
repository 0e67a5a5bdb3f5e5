"""Opening a model for a plan: the planner decides, this module builds the weight source it asked for.

Why this module exists: the planner (``plan.py``) is pure arithmetic over budgets and link speeds,
and ``pipeline/weights.py`` builds streaming sources from a ``Plan``; when the planner also opened
stores and built sources, the two imported each other. Here the one step that needs both lives
on its own: find an existing store (its data file is what the disk probe reads), plan, and, when
layers stream, convert or repair the cached store and open a ``StreamingWeights`` over it.
"""

from __future__ import annotations

from pathlib import Path

from tierkv.config import Budget, ModelConfig, Policy
from tierkv.io.convert import cached_store, find_cached_store
from tierkv.io.progress import ProgressFn
from tierkv.io.store import StoreError, WeightStore, read_damage
from tierkv.pipeline.weights import StreamingWeights
from tierkv.plan import Plan, default_offload_dir, make_plan
from tierkv.probe import LinkSpeeds


def open_weight_source(model_dir: str | Path, config: ModelConfig, budget: Budget, policy: Policy = Policy(), *,
                       links: LinkSpeeds | None = None, context_tokens: int | None = None,
                       progress: ProgressFn | None = None) -> tuple[StreamingWeights | None, Plan]:
    """Plan, then build the WeightSource the plan needs: (None, plan) when every layer fits on the
    device (use ``ResidentWeights`` from the checkpoint; nothing is converted), otherwise a
    StreamingWeights over the cached store under ``plan.offload_dir`` (converted on first use,
    repaired when found damaged). An existing store's own data file is what the disk probe reads."""
    offload_dir = budget.offload_dir or default_offload_dir()
    existing = find_cached_store(model_dir, offload_dir, policy.dtype) if links is None else None
    plan = make_plan(config, budget, policy, links, context_tokens=context_tokens,
                     data_path=existing.data_path if existing is not None else None)
    if not plan.host_layers and not plan.disk_layers:
        return None, plan
    return _streaming_source(model_dir, plan, existing, progress), plan


def _streaming_source(model_dir: str | Path, plan: Plan, store: WeightStore | None,
                      progress: ProgressFn | None) -> StreamingWeights:
    """StreamingWeights over the cached store; a checksum mismatch while loading its resident part
    is repaired (the bad extents re-converted) and the load tried once more."""
    store = store or WeightStore.open(cached_store(model_dir, plan.offload_dir, dtype=plan.dtype, progress=progress))
    try:
        return StreamingWeights.from_plan(store, plan)
    except StoreError:
        if not read_damage(store.dir):
            raise
    store.close()
    store = WeightStore.open(cached_store(model_dir, plan.offload_dir, dtype=plan.dtype, progress=progress))
    return StreamingWeights.from_plan(store, plan)


__all__ = ["open_weight_source"]
