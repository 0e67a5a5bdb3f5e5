"""Plans of one model side by side: 16-bit, int8 and int4 weights under the same budgets.

Why this module exists: the question someone with a 70B model, a 24 GB card and 64 GB of RAM asks
is not "where does each layer go" but "which weight scheme fits where, and how fast would it run".
``compare_plans`` answers it with one ``make_plan`` per scheme that share the measured links (the
16-bit plan streams the most, so it probes every link the others use; each scheme's compute is
estimated from its own measured matvec rate), and ``comparison_rows`` turns them into the rows of
the table ``tierkv plan --compare`` prints.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tierkv.budgets import default_offload_dir
from tierkv.config import Budget, ModelConfig, Policy, format_size
from tierkv.io.checkpoint import resolve_dtype
from tierkv.plan import Plan, compute_estimate, make_plan, plan_device
from tierkv.probe import LinkCache, LinkSpeeds, estimate_layer_compute
from tierkv.quantspec import CHANNEL, DEFAULT_GROUP_SIZE, SCHEMES, WeightQuant, group_size_name


def compare_plans(config: ModelConfig, budget: Budget = Budget(), policy: Policy = Policy(),
                  links: LinkSpeeds | None = None, *, data_path: Path | None = None,
                  context_tokens: int | None = None, config_only: bool = False) -> list[Plan]:
    """One plan per weight scheme: 16-bit (the compute dtype), then each of ``quantspec.SCHEMES`` with
    ``policy.weight_quant``'s group size and head choice (default: groups of 64, head 16-bit).

    ``links`` given: every plan uses them as they are (one compute time for all schemes). None: the
    16-bit plan probes them, and each quantized plan reuses its disk and host->device speeds with a
    compute time estimated for its scheme (``probe.estimate_layer_compute``)."""
    asked = policy.weight_quant
    group, head = (asked.group_size, asked.head) if asked else (DEFAULT_GROUP_SIZE, False)
    kwargs = dict(data_path=data_path, context_tokens=context_tokens, config_only=config_only)
    plans = [make_plan(config, budget, replace(policy, weight_quant=None), links, **kwargs)]
    for scheme in SCHEMES:
        scheme_group = DEFAULT_GROUP_SIZE if group == CHANNEL and scheme != "int8" else group   # int8 only
        quantized = replace(policy, weight_quant=WeightQuant(scheme, scheme_group, head))
        scheme_links = links or _links_for(config, quantized, plans[0].links, budget, config_only)
        plans.append(make_plan(config, budget, quantized, scheme_links, **kwargs))
    return plans


def _links_for(config: ModelConfig, policy: Policy, measured: LinkSpeeds, budget: Budget,
               config_only: bool) -> LinkSpeeds:
    """``measured`` with the layer compute of ``policy``'s weight scheme estimated on this device."""
    device = plan_device(policy)
    dtype = resolve_dtype(policy.dtype, config.dtype)
    estimate = compute_estimate(config, dtype, policy.weight_quant, device.type, config_only)
    assert estimate is not None, "a quantized scheme's compute is always estimated"
    compute_s, rate = estimate_layer_compute(estimate, dtype, device, LinkCache(budget.offload_dir
                                                                                or default_offload_dir()))
    return replace(measured, layer_compute_s=compute_s, compute_estimated_gbps=rate)


COLUMNS = ("weights", "stored", "layer", "device", "host", "disk", "depth", "streamed/token", "compute/layer",
           "tok/s", "bound")


def comparison_rows(plans: list[Plan]) -> list[tuple[str, ...]]:
    """One row of ``COLUMNS`` per plan, as text: the layer counts per tier, the prefetch depth ("pieces" where
    disk layers stream in pieces), the weight bytes a decode step streams, one layer's compute and the
    predicted speed."""
    return [(p.dtype if p.weight_scheme == "none" else f"{p.weight_scheme} g{group_size_name(p.weight_group_size or 0)}",
             format_size(p.weight_bytes), format_size(p.layer_bytes), str(len(p.device_layers)),
             str(len(p.host_layers)), str(len(p.disk_layers)),
             "pieces" if p.stream_pieces else str(p.prefetch_depth),
             format_size(p.streamed_bytes_per_token), f"{p.links.layer_compute_s * 1e3:.1f} ms",
             f"{p.predicted_tok_s:.3g}", p.bound) for p in plans]


def comparison_notes(plans: list[Plan]) -> list[str]:
    """The lines under the table: budgets, links, how compute was found, KV room, and the what-if note."""
    first = plans[0]
    links = first.links
    lines = [f"{first.num_layers} layers, device {first.device} {format_size(first.device_mem_bytes)} "
             f"({format_size(first.reserve_bytes)} kept for KV/activations, globals "
             f"{format_size(first.globals_bytes)}), host {format_size(first.host_mem_bytes)}, "
             f"disk {first.offload_dir}; compute in {first.dtype}",
             f"links: disk {_gbps(links.disk_read_gbps)}, host->device {_gbps(links.h2d_gbps)}"]
    for p in plans:
        rate = p.links.compute_estimated_gbps
        how = "timed on a layer" if rate is None else f"estimated from a measured matvec rate of {rate:.2f} GB/s"
        lines.append(f"{p.weights_label()}: compute {how}; KV room {format_size(p.kv_device_bytes)} on the device, "
                     f"{format_size(p.kv_host_bytes)} in host memory ({p.kv_host_tokens:,} tokens"
                     f"{'' if p.kv_quant == 'none' else ' at ' + p.kv_quant})")
    if first.config_only:
        lines.append("from config.json alone (no weights here): budgets are not checked against this machine; "
                     "links measured on this machine")
    return lines


def _gbps(value: float) -> str:
    return "not used" if value == float("inf") else f"{value:.2f} GB/s"


__all__ = ["COLUMNS", "compare_plans", "comparison_notes", "comparison_rows"]
