"""Opening a model for a plan: the planner decides, this module builds the weight source it asked for.

Why this module exists: the planner (``plan.py``) is pure arithmetic over budgets and link speeds,
and ``pipeline/weights.py`` builds streaming sources from a ``Plan``; when the planner also opened
stores and built sources, the two imported each other. Here the one step that needs both lives
on its own: find an existing store (its data file is what the disk probe reads), plan, and, when
layers stream, convert or repair the cached store and open a ``StreamingWeights`` over it. A
converted store opened as the model is planned and served from directly (``open_store_source``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from tierkv.config import Budget, ModelConfig, Policy
from tierkv.io.convert import cached_store, cached_store_dir, find_cached_store
from tierkv.io.checkpoint import resolve_dtype
from tierkv.io.gguf import GGUFCheckpoint
from tierkv.io.progress import ProgressFn, phase_progress
from tierkv.io.store import StoreError, WeightStore, existing_manifest, read_damage
from tierkv.pipeline.weights import StreamingWeights
from tierkv.plan import Plan, default_offload_dir, make_plan
from tierkv.probe import LinkSpeeds
from tierkv.quantspec import WeightQuant


def device_type_of(policy: Policy) -> str:
    """"cuda" or "cpu": the device family a policy computes on (what quantized packs are made for)."""
    name = policy.device or ("cuda" if torch.cuda.is_available() else "cpu")    # make_plan's default too
    return "cuda" if name.startswith("cuda") else "cpu"


def open_weight_source(model_dir: str | Path, config: ModelConfig, budget: Budget, policy: Policy = Policy(), *,
                       links: LinkSpeeds | None = None, context_tokens: int | None = None,
                       progress: ProgressFn | None = None) -> tuple[StreamingWeights | None, Plan]:
    """Plan, then build the WeightSource the plan needs: (None, plan) when every layer fits on the
    device (use ``ResidentWeights`` from the checkpoint; nothing is converted), otherwise a
    StreamingWeights over the cached store under ``plan.offload_dir`` (converted on first use,
    repaired when found damaged; with ``policy.weight_quant``, the store of that quantization
    packed for the policy's device). An existing store's own data file is what the disk probe reads.
    ``progress``: the conversion (phase "convert"), then the resident extents' bytes loaded (phase "load")."""
    offload_dir = budget.offload_dir or default_offload_dir()
    quant, device_type = policy.weight_quant, device_type_of(policy)
    existing = find_cached_store(model_dir, offload_dir, policy.dtype, quant, device_type) if links is None else None
    plan = make_plan(config, budget, policy, links, context_tokens=context_tokens,
                     data_path=existing.data_path if existing is not None else None)
    if not plan.host_layers and not plan.disk_layers and not plan.embedding_lookup_bytes:
        return None, plan
    return _streaming_source(model_dir, plan, existing, progress, quant), plan


def gguf_store(path: str | Path, budget: Budget, policy: Policy = Policy(), progress: ProgressFn | None = None,
               keep_source: bool = True) -> Path:
    """The cached store a GGUF model runs from (``io.convert.cached_store`` under the budget's offload dir,
    converted on first use with a progress bar): at ``policy.dtype`` (default: the file's), its
    quantized weights in their own schemes unless not ``keep_source``, its 16-bit and other-type
    weights as ``policy.weight_quant`` asks, packed for the policy's device."""
    offload, quant = budget.offload_dir or default_offload_dir(), policy.weight_quant
    device_type = device_type_of(policy)
    dtype = policy.dtype or _cached_file_dtype(path, offload, quant, device_type, keep_source) or \
        GGUFCheckpoint(path).config.dtype           # parsing the file's metadata takes seconds for a large vocabulary
    return cached_store(path, offload, dtype=dtype, progress=phase_progress(progress, "convert"), quant=quant,
                        device_type=device_type, keep_source=keep_source)


def _cached_file_dtype(path: str | Path, offload_dir: str | Path, quant: WeightQuant | None, device_type: str,
                       keep_source: bool) -> str | None:
    """The GGUF file's own dtype as the cached store converted from it at that dtype records it
    (``source_dtype`` in its manifest), found without parsing the file; None when there is none."""
    for name in ("bfloat16", "float16", "float32"):
        raw, _ = existing_manifest(cached_store_dir(path, offload_dir, name, quant, device_type, keep_source))
        if raw is not None and raw.get("source_dtype") == name:
            return name
    return None


def open_store_source(store: WeightStore, budget: Budget, policy: Policy = Policy(), *, links: LinkSpeeds | None = None,
                      context_tokens: int | None = None,
                      progress: ProgressFn | None = None) -> tuple[StreamingWeights, Plan]:
    """A converted store opened as the model (``tierkv run OUT``): plan with its own layer sizes and
    serve every layer from it (those that fit resident on the device). The store must hold what the
    policy asks (``WeightStore.check_quant``) and the compute dtype must be the store's. ``progress``:
    the resident extents' bytes loaded (phase "load")."""
    store.check_quant(policy.weight_quant, device_type_of(policy))
    dtype = str(store.dtype).removeprefix("torch.")
    if policy.dtype is not None and str(resolve_dtype(policy.dtype)).removeprefix("torch.") != dtype:
        raise StoreError(f"the weight store {store.dir} holds {dtype} weights, not {policy.dtype}; run it with "
                         f"--dtype {dtype} (or leave --dtype out), or convert again with --dtype {policy.dtype}")
    plan = make_plan(store.config, budget, replace(policy, dtype=dtype), links, context_tokens=context_tokens,
                     data_path=store.data_path, layout=list(store.extents.values()))   # its sizes: scheme per tensor
    return StreamingWeights.from_plan(store, plan, progress=phase_progress(progress, "load")), plan


def _streaming_source(model_dir: str | Path, plan: Plan, store: WeightStore | None,
                      progress: ProgressFn | None, quant: WeightQuant | None) -> StreamingWeights:
    """StreamingWeights over the cached store; a checksum mismatch while loading its resident part
    is repaired (the bad extents re-converted) and the load tried once more."""
    device_type = torch.device(plan.device).type
    converting, loading = phase_progress(progress, "convert"), phase_progress(progress, "load")

    def reopen() -> WeightStore:
        return WeightStore.open(cached_store(model_dir, plan.offload_dir, dtype=plan.dtype, progress=converting,
                                             quant=quant, device_type=device_type))
    store = store or reopen()
    try:
        return StreamingWeights.from_plan(store, plan, progress=loading)
    except StoreError:
        if not read_damage(store.dir):
            raise
    store.close()
    return StreamingWeights.from_plan(reopen(), plan, progress=loading)


__all__ = ["device_type_of", "gguf_store", "open_store_source", "open_weight_source"]
