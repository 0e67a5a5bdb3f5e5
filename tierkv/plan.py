"""Placement planner: budgets and measured link speeds -> which layers live where, and how fast.

Why this module exists: FlexGen asks users for six hand-tuned percentages and Accelerate places
greedily without looking at link speeds. Here the user gives (or we detect) three budgets, a
short probe measures the three links that matter (disk read, host-to-device copy, one layer's
compute), and ``make_plan`` picks the split of layers over device / host / disk and the prefetch
depth that a small simulation of the layer loop predicts to be fastest. The Plan says which link
bounds the speed, so ``tierkv plan`` can tell users what to buy or which budget to raise.

Placement rules: globals (embedding, norm, head) and a KV/activation reserve always take device
memory first; once a layer streams, an embedding no head reuses stays in the store instead (a step
reads only the rows it embeds: ``io.rows``), so its room holds layers. Streamed layers are spread evenly over the depth of the model, so reads for them
overlap with the compute of resident layers instead of bunching up at the end.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from tierkv.activations import ACTIVATION_FRACTION, CPU_ACTIVATION_FRACTION, DEFAULT_PREFILL_TOKENS, \
    MIN_ATTENTION_SCRATCH_BYTES, MIN_PREFILL_TOKENS, activation_bytes, activation_fraction, fused_tail_attention, \
    kv_reserve_bytes, pieces_groups_bytes, plan_device, prefill_sizes, reserve_bytes, scratch_for, step_rows
from tierkv.budgets import PlanError, default_offload_dir, detect_budgets
from tierkv.config import Budget, ModelConfig, Policy, format_size, parse_size
from tierkv.io.checkpoint import resolve_dtype
from tierkv.io.rows import lookup_embedding_bytes
from tierkv.io.store import CRC_BLOCK_BYTES, Extent, layout_prepared_bytes, plan_layout
from tierkv.kernels._select import env_choice
from tierkv.pipeline.chunking import ChunkRule
from tierkv.pipeline.pieces import PIECE_SLOTS, piece_layout, piece_ring_bytes, small_tensor_bytes
from tierkv.pipeline.kv.sizing import element_bytes, keeps_sketch, kv_bytes_per_token
from tierkv.plan_sim import simulate_step_s, spread_layers, step_bound
from tierkv.probe import ComputeEstimate, LinkSpeeds, probe_links
from tierkv.quantspec import CHANNEL, WeightQuant, kv_chunk_bytes, tensor_quants
from tierkv.model import ATTENTION_SCRATCH_BYTES

MAX_PREFETCH_DEPTH = 4
PIECES = -1                            # the option key of streaming disk layers in pieces (``pipeline.pieces``)
STREAM_UNIT_VAR = "TIERKV_STREAM_UNIT"  # "auto" (the faster by simulation), "layer" or "piece" (where it applies)
DEFAULT_CONTEXT_TOKENS = 4096


@dataclass(frozen=True)
class Plan:
    """Where every layer lives, how deep to prefetch, and the predicted decode speed."""

    device: str                        # "cpu", "cuda", "cuda:1"
    dtype: str                         # compute dtype (16-bit weights are stored in it)
    num_layers: int
    layer_bytes: int                   # largest layer extent (padded): one ring slot
    globals_bytes: int                 # embedding + norm + head on the device (less embedding_lookup_bytes)
    device_layers: tuple[int, ...]
    host_layers: tuple[int, ...]
    disk_layers: tuple[int, ...]
    prefetch_depth: int                # layers in flight ahead of the one computing
    device_mem_bytes: int              # the device budget (given or detected)
    host_mem_bytes: int                # the host budget (given or detected)
    offload_dir: str                   # where the store lives / is converted to
    reserve_bytes: int                 # device memory kept for KV cache and activations
    device_weight_budget_bytes: int    # device_mem_bytes - reserve_bytes: the weights' device tier
    host_weight_budget_bytes: int      # the weights' host tier
    ring_bytes: int                    # device ring of prefetch_depth + 1 slots, or the piece ring (0: nothing streams)
    staging_bytes: int                 # pinned staging ring for disk layers (CUDA only)
    links: LinkSpeeds
    predicted_step_s: float            # one decode step at batch 1
    predicted_tok_s: float
    bound: str                         # "disk", "h2d" or "compute": the busiest link
    kv_device_bytes: int = 0           # device memory left for the KV cache once weights and activations are placed
    kv_host_bytes: int = 0             # host memory left for cold KV chunks once host layers and staging are placed
    prefill_chunk_tokens: int = DEFAULT_PREFILL_TOKENS  # prompts are prefilled in pieces of this many tokens
    attention_scratch_bytes: int = ATTENTION_SCRATCH_BYTES  # cap on one block of prefill attention's temporaries
    activation_bytes: int = 0          # device memory kept for one prefill piece's activations (in reserve_bytes)
    weight_scheme: str = "none"        # layer weights: "none" (the compute dtype), "int8" or "int4" (group-wise)
    weight_group_size: int | None = None  # inputs per (scale, minimum) group of a quantized scheme
    weight_bytes: int = 0              # every stored weight (layers + globals), compressed as stored
    streamed_bytes_per_token: int = 0  # weight bytes one decode step moves over disk / host->device
    kv_quant: str = "none"             # KV chunks on the host and disk tiers: "none", "int8" or "int4"
    kv_device_bytes_per_token: int = 0  # K+V of one token over all layers on the device (always 16-bit)
    kv_host_bytes_per_token: int = 0   # the same on the host and disk tiers (compressed with kv_quant)
    kv_host_tokens: int = 0            # tokens of KV the host room holds (kv_host_bytes at the host rate)
    config_only: bool = False          # planned from a config alone: budgets not checked against this machine
    kv_sketch_bytes: int = 0           # device room kept for sparse selection's 2-bit key codes at the full context
    kv_sketch_note: str = ""           # why key codes the policy would keep are off (no device room); "" if not
    ram_note: str = ""                 # the cgroup memory limit that bounds RAM (a container, a cap); "" if none
    embedding_lookup_bytes: int = 0    # the embedding left in the store, rows read per step (io.rows); 0: on the device
    stream_pieces: int = 0             # disk layers stream in CRC-block pieces through this many slots; 0: layer ring

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: an unmeasured (infinite) link speed becomes null."""
        data = asdict(self)
        data["links"] = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in data["links"].items()}
        return data

    def summary(self) -> str:
        """A few lines for ``tierkv plan`` and logs."""
        lines = [
            f"weights: {self.weights_label()}, {format_size(self.weight_bytes)} stored "
            f"(layer {format_size(self.layer_bytes)}); compute in {self.dtype}",
            f"device {self.device} ({format_size(self.device_mem_bytes)} budget, "
            f"{format_size(self.reserve_bytes)} kept for KV/activations): "
            f"{len(self.device_layers)} of {self.num_layers} layers + globals ({format_size(self.globals_bytes)})"
            + (f"; the embedding ({format_size(self.embedding_lookup_bytes)}) stays in the store, each step reads "
               "the rows it embeds" if self.embedding_lookup_bytes else ""),
            f"host ({format_size(self.host_mem_bytes)} budget): {len(self.host_layers)} layers",
            f"disk ({self.offload_dir}): {len(self.disk_layers)} layers",
            f"{self._streaming()}; links: disk {_link(self.links.disk_read_gbps)}, host->device "
            f"{_link(self.links.h2d_gbps)}, compute {self.links.layer_compute_s * 1e3:.2f} ms/layer{self._how_timed()}",
            f"KV cache room: {format_size(self.kv_device_bytes)} on the device (16-bit), "
            f"{format_size(self.kv_host_bytes)} in host memory ({self.kv_host_tokens:,} tokens "
            f"{'16-bit' if self.kv_quant == 'none' else self.kv_quant}), the rest in {self.offload_dir}/kv",
            f"prefill: pieces of {self.prefill_chunk_tokens} tokens, activations {format_size(self.activation_bytes)} "
            f"(attention blocks up to {format_size(self.attention_scratch_bytes)})",
            *self._key_codes_line(),
            f"predicted {self.predicted_tok_s:.2f} tok/s, bound by {self.bound}; "
            f"{format_size(self.streamed_bytes_per_token)} of weights streamed per token",
        ]
        if self.ram_note:
            lines.append(self.ram_note)
        if self.config_only:
            lines.append("from config.json alone (no weights here): budgets are not checked against this machine; "
                         "links measured on this machine")
        return "\n".join(lines)

    def _streaming(self) -> str:
        """How disk layers stream: the layer ring's prefetch depth, or pieces through a small ring."""
        if not self.stream_pieces:
            return f"prefetch depth {self.prefetch_depth}"
        return (f"disk layers stream {format_size(CRC_BLOCK_BYTES)} at a time ({self.stream_pieces}-slot ring, "
                f"{format_size(self.ring_bytes)}), computed as they land")

    def _key_codes_line(self) -> list[str]:
        """The summary's line on sparse selection's key codes, when the policy would keep them."""
        if self.kv_sketch_note:
            return [f"sparse key codes: {self.kv_sketch_note}"]
        if self.kv_sketch_bytes:
            return [f"sparse key codes: on, {format_size(self.kv_sketch_bytes)} of the KV room "
                    "(the model's full context)"]
        return []

    def weights_label(self) -> str:
        """"bfloat16" for 16-bit weights, else e.g. "int4 (groups of 64)"."""
        if self.weight_scheme == "none":
            return self.dtype
        if self.weight_group_size == CHANNEL:
            return f"{self.weight_scheme} (per output channel)"
        return f"{self.weight_scheme} (groups of {self.weight_group_size})"

    def _how_timed(self) -> str:
        rate = self.links.compute_estimated_gbps
        if rate is None:
            return ""
        return f" (estimated: the layer's bytes at a measured {self.weights_label().split()[0]} matvec rate of " \
               f"{rate:.2f} GB/s)"


def _link(gbps: float) -> str:
    """A link speed for the summary; an unmeasured one (inf: the placement does not use it) says so."""
    return "not used" if math.isinf(gbps) else f"{gbps:.2f} GB/s"


def minimum_device_bytes(config: ModelConfig, policy: Policy = Policy(), context_tokens: int | None = None,
                         batch: int = 1, key_codes: bool = False, layout: list[Extent] | None = None) -> int:
    """The smallest device budget ``make_plan`` accepts (every layer streamed): globals, one layer slot
    and the reserve (KV room and one prefill piece) that this budget itself gets. ``key_codes``: the
    smallest at which the plan also keeps the key codes the policy asks for (else they are dropped).
    ``layout``: a store's own extents (``make_plan``'s)."""
    dtype = resolve_dtype(policy.dtype, config.dtype)
    device_type = plan_device(policy).type
    fixed = sum(layer_sizes(config, dtype, policy.weight_quant, device_type, layout)) + \
        prepared_sizes(config, dtype, policy.weight_quant, device_type, layout)[1] - \
        embedding_lookup(config, dtype, policy, device_type, layout)     # globals as held while layers stream; one slot
    context = context_tokens or policy.kv_device_tokens or min(DEFAULT_CONTEXT_TOKENS, config.max_position_embeddings)
    if not key_codes:
        policy = replace(policy, kv_sketch=False)       # make_plan drops codes that do not fit
    reserve = reserve_bytes(config, dtype, policy, context, batch, 0)
    return _shown_size_at_least(_minimum_reserve(config, dtype, policy, context, batch, fixed, reserve) + fixed)


# ---------------------------------------------------------------------------------------------
# placement


def _split(n_layers: int, layer_bytes: int, device_avail: int, host_avail: int, depth: int,
           cuda: bool, placed: int | None = None, ring: int | None = None) -> tuple[int, int, int, int] | None:
    """(n_device, n_host, ring_bytes, staging_bytes) for one prefetch depth, or None if it cannot fit.
    ``layer_bytes`` is a ring slot (a stored extent), ``placed`` what a layer that stays takes (default
    the same; more with the CPU op parameters prepared for quantized weights); ``ring``: the streaming
    ring's bytes when it is not ``depth + 1`` layer slots (the piece ring, CPU only)."""
    placed = layer_bytes if placed is None else placed
    if device_avail >= n_layers * placed:
        return n_layers, 0, 0, 0
    ring = (depth + 1) * layer_bytes if ring is None else ring
    if device_avail < ring:
        return None
    n_dev = min(n_layers - 1, (device_avail - ring) // placed)
    rest = n_layers - n_dev
    if cuda:
        # host layers need no staging; disk layers need a pinned staging ring of depth + 1 slots
        n_host = min(rest, host_avail // placed)
        if n_host < rest:
            staging = ring
            n_host = max(0, min(rest, (host_avail - staging) // placed))
            if host_avail < staging:
                return None
            return n_dev, n_host, ring, staging
        return n_dev, n_host, ring, 0
    return n_dev, min(rest, host_avail // placed), ring, 0


def make_plan(config: ModelConfig, budget: Budget = Budget(), policy: Policy = Policy(),
              links: LinkSpeeds | None = None, *, data_path: Path | None = None,
              context_tokens: int | None = None, batch: int = 1, config_only: bool = False,
              layout: list[Extent] | None = None) -> Plan:
    """Place the layers of ``config`` within ``budget`` and predict the decode speed.

    Sizes are the stored ones on every tier: layers and globals as ``io.store.plan_layout`` lays
    them out for ``policy.weight_quant`` on this device type, host/disk KV at ``policy.kv_quant``'s
    size (device KV stays 16-bit). ``links``: measured speeds; None probes the links the placement
    uses (disk on ``data_path``, the store's data file, else a scratch file in the offload dir; a
    layer's compute as ``compute_estimate`` says). ``config_only``: planning from a config.json
    alone (no weights here), a what-if: budgets are not checked against this machine. ``layout``: the
    extents of the store the layers come from, sized as they are (a GGUF store mixes schemes per
    tensor, which ``policy.weight_quant`` only summarizes); None: ``plan_layout``'s.
    ``context_tokens`` (default: ``policy.kv_device_tokens``, else min(4096, the model's maximum))
    sizes the device room kept for the KV cache and activations; the KV room is never less than the
    tiered cache needs at the model's full context (``kv_reserve_bytes``), so any prompt runs. The
    prefill piece and the attention scratch come from the device budget (``prefill_sizes``) unless
    the policy fixes the piece, and an auto piece then grows into device room the placement left
    unused (``_grow_piece``).
    Raises PlanError, naming the minimum, when the device budget cannot hold one layer's working set.
    """
    device = plan_device(policy)
    dtype = resolve_dtype(policy.dtype, config.dtype)
    layer_bytes, globals_bytes = layer_sizes(config, dtype, policy.weight_quant, device.type, layout)
    layer_extra, globals_extra = prepared_sizes(config, dtype, policy.weight_quant, device.type, layout)
    placed = layer_bytes + layer_extra                  # a layer that stays put (device or host)
    held_globals = globals_bytes + globals_extra        # the globals as the device holds them
    lookup = embedding_lookup(config, dtype, policy, device.type, layout)
    context = context_tokens or policy.kv_device_tokens or min(DEFAULT_CONTEXT_TOKENS, config.max_position_embeddings)
    dev_mem, host_mem, offload_dir, ram_note = detect_budgets(budget, device, check_machine=not config_only)
    piece, scratch, activations, reserve, codes, codes_note = _device_reserve(config, dtype, policy, context, batch,
                                                                              dev_mem, held_globals - lookup,
                                                                              layer_bytes, layout)
    cuda, n = device.type == "cuda", config.num_layers
    if dev_mem - reserve - held_globals >= n * placed:
        lookup = 0                                      # all of it fits: resident, the table too
    held_globals, globals_bytes = held_globals - lookup, globals_bytes - lookup
    device_avail = dev_mem - reserve - held_globals
    options = {d: _split(n, layer_bytes, device_avail, host_mem, d, cuda, placed)
               for d in range(MAX_PREFETCH_DEPTH + 1)}
    piece_ring = pieces_ring_bytes(config, dtype, policy, device.type, layout)
    held_groups = pieces_groups_bytes(config, dtype, policy, piece, scratch, context, batch) - activations
    if piece_ring:
        options[PIECES] = _split(n, layer_bytes, device_avail - held_groups, host_mem, 0, cuda, placed, piece_ring)
        if options[PIECES] is not None and stream_unit() == "piece":
            options = {d: o for d, o in options.items() if d == PIECES or (o is not None and o[0] == n)}
    options = {d: o for d, o in options.items() if o is not None}
    if not options:
        raise PlanError(f"host budget {format_size(host_mem)} cannot hold the staging buffer for streaming "
                        f"from disk ({format_size(layer_bytes)}); raise --host-mem to at least that")
    if links is None:
        n_dev_max = max(o[0] for o in options.values())
        links = probe_links(config, dtype, device, data_path, offload_dir,
                            need_disk=n_dev_max + max(o[1] for o in options.values()) < n, need_h2d=n_dev_max < n,
                            estimate=compute_estimate(config, dtype, policy.weight_quant, device.type, config_only,
                                                      layout))
    best = _best_option(options, n, layer_bytes, links, cuda)
    depth, (n_dev, n_host, ring, staging), step_s = best
    pieces = PIECE_SLOTS if depth == PIECES else 0
    if pieces:                                    # every micro-batch's rows are held through each block
        reserve, activations = reserve + held_groups, activations + held_groups
    depth = max(depth, 0)
    kinds = spread_layers(n, n_dev, n_host)
    if policy.prefill_chunk_tokens is None:       # device room no further layer fits: a larger piece, fewer passes
        spare = dev_mem - reserve - held_globals - kinds.count("device") * placed - ring
        piece, scratch, grown = _grow_piece(config, dtype, policy, context, batch, piece, activations, spare,
                                            policy.micro_batches if pieces else 1)
        reserve, activations = reserve + grown - activations, grown
    return Plan(
        device=str(device), dtype=str(dtype).removeprefix("torch."), num_layers=n, layer_bytes=layer_bytes,
        globals_bytes=globals_bytes, device_layers=_of(kinds, "device"), host_layers=_of(kinds, "host"),
        disk_layers=_of(kinds, "disk"), prefetch_depth=depth, device_mem_bytes=dev_mem, host_mem_bytes=host_mem,
        offload_dir=str(offload_dir), reserve_bytes=reserve, device_weight_budget_bytes=dev_mem - reserve,
        host_weight_budget_bytes=host_mem, ring_bytes=ring, staging_bytes=staging, links=links,
        predicted_step_s=step_s, predicted_tok_s=batch / step_s if step_s > 0 else math.inf,
        bound=step_bound(kinds, layer_bytes, links, cuda),
        kv_device_bytes=max(0, dev_mem - held_globals - kinds.count("device") * placed - ring
                            - activations),
        prefill_chunk_tokens=piece, attention_scratch_bytes=scratch, activation_bytes=activations,
        config_only=config_only, kv_sketch_bytes=codes, kv_sketch_note=codes_note, ram_note=ram_note,
        embedding_lookup_bytes=lookup, stream_pieces=pieces,
        **_stored_sizes(config, dtype, policy, kinds, layer_bytes, globals_bytes + lookup,
                        max(0, host_mem - kinds.count("host") * placed - staging), cuda),
    )


def _stored_sizes(config: ModelConfig, dtype: torch.dtype, policy: Policy, kinds: tuple[str, ...], layer_bytes: int,
                  globals_bytes: int, kv_host_bytes: int, cuda: bool) -> dict[str, object]:
    """The Plan fields that say how weights and KV are stored: the scheme, the stored and streamed
    weight bytes, and the KV rates per tier (host and disk compressed with ``policy.kv_quant``)."""
    quant, kv_host_per_token = policy.weight_quant, kv_stored_bytes_per_token(config, dtype, policy)
    return dict(weight_scheme=quant.scheme if quant else "none", weight_group_size=quant.group_size if quant else None,
                weight_bytes=len(kinds) * layer_bytes + globals_bytes,
                streamed_bytes_per_token=sum(k == "disk" or (k == "host" and cuda) for k in kinds) * layer_bytes,
                kv_quant=policy.kv_quant, kv_device_bytes_per_token=kv_bytes_per_token(config, dtype),
                kv_host_bytes=kv_host_bytes, kv_host_bytes_per_token=kv_host_per_token,
                kv_host_tokens=kv_host_bytes // kv_host_per_token)


def layer_sizes(config: ModelConfig, dtype: torch.dtype, quant: WeightQuant | None = None,
                device_type: str = "cpu", layout: list[Extent] | None = None) -> tuple[int, int]:
    """(largest layer extent, all globals) in stored (padded) bytes, compressed as ``quant`` stores
    them for ``device_type`` (``io.store.plan_layout``), or as ``layout`` (a store's extents) holds them."""
    extents = layout or plan_layout(config, dtype, quant, device_type)
    layer_bytes = max(e.padded_nbytes for e in extents if e.name.startswith("layer."))
    return layer_bytes, sum(e.padded_nbytes for e in extents if not e.name.startswith("layer."))


def stream_unit() -> str:
    """``$TIERKV_STREAM_UNIT``: "auto" (default: pieces or the layer ring, whichever simulates faster; on a tie
    pieces, which leave more room for layers), "layer" (never pieces) or "piece" (pieces wherever their ring fits)."""
    return env_choice(None, STREAM_UNIT_VAR, ("auto", "layer", "piece"), "the streaming unit")


def pieces_ring_bytes(config: ModelConfig, dtype: torch.dtype, policy: Policy, device_type: str,
                      layout: list[Extent] | None = None) -> int:
    """The device bytes streaming disk layers in pieces takes (the ring of ``pipeline.pieces`` and every
    layer's small tensors, kept), or 0 where it does not apply: off the CPU, a layer that cannot stream in
    pieces (quantized), or ``$TIERKV_STREAM_UNIT`` = "layer"."""
    if device_type != "cpu" or stream_unit() == "layer":
        return 0
    extents = [e for e in (layout or plan_layout(config, dtype, policy.weight_quant, device_type))
               if e.name.startswith("layer.")]
    pieces = [piece_layout(e, int(e.name.split(".")[1]), CRC_BLOCK_BYTES) for e in extents]
    if not extents or any(p is None for p in pieces):
        return 0
    return piece_ring_bytes(CRC_BLOCK_BYTES) + sum(small_tensor_bytes(e, p.small) for e, p in zip(extents, pieces)
                                                    if p is not None)


def embedding_lookup(config: ModelConfig, dtype: torch.dtype, policy: Policy, device_type: str,
                     layout: list[Extent] | None = None) -> int:
    """Device bytes a plan that streams layers saves by leaving the embedding in the store
    (``io.rows.lookup_embedding_bytes`` of the layout: an untied, 16-bit table), else 0."""
    extents = layout or plan_layout(config, dtype, policy.weight_quant, device_type)
    return lookup_embedding_bytes(extents, config.tie_word_embeddings)


def prepared_sizes(config: ModelConfig, dtype: torch.dtype, quant: WeightQuant | None = None,
                   device_type: str = "cpu", layout: list[Extent] | None = None) -> tuple[int, int]:
    """(per layer, globals) bytes that ``kernels.quant.prepare`` adds to weights placed to stay (device
    and host layers, the globals): the CPU ops' ready parameters (``TensorQuant.prepared_nbytes``).
    Streamed layers never hold them, so ring slots stay the stored extent's size."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if layout is not None:
        return layout_prepared_bytes(layout, itemsize)

    def prepared(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(tq.prepared_nbytes(tuple(shapes[key]), itemsize)
                   for key, tq in tensor_quants(shapes, quant, device_type).items())

    return prepared(config.layer_tensor_shapes()), prepared(config.global_tensor_shapes())


def compute_estimate(config: ModelConfig, dtype: torch.dtype, quant: WeightQuant | None, device_type: str,
                     config_only: bool, layout: list[Extent] | None = None) -> ComputeEstimate | None:
    """What to estimate a layer's compute from (``probe.ComputeEstimate``), or None to time a layer:
    a config-only plan has no weights to time, and a quantized layer computes on another matvec
    than the 16-bit layer the probe builds."""
    if quant is None and not config_only:
        return None
    layer_bytes, _ = layer_sizes(config, dtype, quant, device_type, layout)
    return ComputeEstimate(layer_bytes, config.num_layers * layer_bytes, quant.scheme if quant else None,
                           quant.group_size if quant else ComputeEstimate.group_size)


def kv_stored_bytes_per_token(config: ModelConfig, dtype: torch.dtype, policy: Policy) -> int:
    """K+V bytes of one token over all layers on the host and disk tiers, at ``policy.kv_quant``'s
    compressed size for a chunk of ``policy.chunk_tokens`` (adaptive sizes: the rule's default), the
    per-chunk parameters spread over its tokens (rounded up)."""
    chunk = policy.chunk_tokens or ChunkRule().default_chunk_tokens
    per_chunk = kv_chunk_bytes(policy.kv_quant, config.num_kv_heads, chunk, config.head_dim, element_bytes(dtype))
    return config.num_layers * -(-per_chunk // chunk)


def _device_reserve(config: ModelConfig, dtype: torch.dtype, policy: Policy, context: int, batch: int, dev_mem: int,
                    globals_bytes: int, layer_bytes: int, layout: list[Extent] | None
                    ) -> tuple[int, int, int, int, int, str]:
    """(prefill piece, attention scratch, activation bytes, reserve, key code bytes, key code note)
    kept on the device for KV and activations; raises PlanError naming the minimum when the budget
    cannot hold it beside the globals and one layer. Key codes come first after that minimum: they
    are left out (the note says why) only when the budget cannot hold them beside it."""
    fixed = globals_bytes + layer_bytes
    codes, note = 0, ""
    if keeps_sketch(policy):
        plain = replace(policy, kv_sketch=False)
        codes = kv_reserve_bytes(config, dtype, policy, 0, batch) - kv_reserve_bytes(config, dtype, plain, 0, batch)
        if dev_mem < reserve_bytes(config, dtype, policy, context, batch, dev_mem) + fixed:
            note = _codes_off_note(config, policy, context, batch, dev_mem, codes, layout)
            policy, codes = plain, 0      # the cache runs without them (its stats say so too)
    piece, scratch = prefill_sizes(config, dtype, policy, context, batch, dev_mem)
    activations = activation_bytes(config, dtype, piece, scratch, context, batch, step_rows(policy), policy)
    reserve = reserve_bytes(config, dtype, policy, context, batch, dev_mem)
    if dev_mem < reserve + fixed:   # name a minimum whose own (larger) reserve it holds
        reserve = _shown_size_at_least(_minimum_reserve(config, dtype, policy, context, batch, fixed, reserve)
                                       + fixed) - fixed
    kv_floor = kv_reserve_bytes(config, dtype, policy, 0, batch)    # the full context's tiered minimum
    kv_at_floor = kv_reserve_bytes(config, dtype, policy, context, batch) <= kv_floor
    _check_minimum(dev_mem, reserve, globals_bytes, layer_bytes, config.num_layers, dtype, context, kv_at_floor)
    return piece, scratch, activations, reserve, codes, note


def _codes_off_note(config: ModelConfig, policy: Policy, context: int, batch: int, dev_mem: int, codes: int,
                    layout: list[Extent] | None) -> str:
    """``Plan.kv_sketch_note`` (and the cache's ``stats()["sketch"]``) when the budget cannot hold the key codes."""
    keep = format_size(minimum_device_bytes(config, policy, context, batch, key_codes=True, layout=layout))
    return (f"off: the key codes do not fit the device budget {format_size(dev_mem)} beside its minimum working "
            f"set (they take {format_size(codes)} for the model's full context of {config.context_limit_tokens} "
            f"tokens); sparse selection uses the chunk bound only (raise --device-mem to at least {keep} to keep "
            "them, or --no-kv-sketch to drop them quietly)")


def _grow_piece(config: ModelConfig, dtype: torch.dtype, policy: Policy, context_tokens: int, batch: int,
                piece: int, activations: int, spare_bytes: int, groups: int = 1) -> tuple[int, int, int]:
    """Double an auto-sized prefill piece while its extra activations fit ``spare_bytes`` of device room
    that the placement left unused -> (piece, attention scratch, activation bytes). ``groups``: micro-batches
    whose activations are held at once (``activation_bytes``)."""
    while piece < DEFAULT_PREFILL_TOKENS:
        bigger = activation_bytes(config, dtype, 2 * piece, scratch_for(config, dtype, 2 * piece, batch),
                                  context_tokens, batch, step_rows(policy), policy, groups)
        if bigger - activations > spare_bytes:
            break
        spare_bytes -= bigger - activations
        piece, activations = 2 * piece, bigger
    return piece, scratch_for(config, dtype, piece, batch), activations


def _of(kinds: tuple[str, ...], kind: str) -> tuple[int, ...]:
    return tuple(j for j, k in enumerate(kinds) if k == kind)


def _best_option(options: dict[int, tuple[int, int, int, int]], n: int, layer_bytes: int, links: LinkSpeeds,
                 cuda: bool) -> tuple[int, tuple[int, int, int, int], float]:
    """The depth (or ``PIECES``) whose placement simulates fastest (ties: pieces, then the shallower: they
    hold more layers)."""
    scored = []
    for depth, split in sorted(options.items()):
        kinds = spread_layers(n, split[0], split[1])
        if all(k == "device" for k in kinds) or (not cuda and "disk" not in kinds):
            depth = 0                                   # nothing streams: no ring, no prefetch
            split = (split[0], split[1], 0, 0)
        pieces = PIECE_SLOTS if depth == PIECES else 0
        scored.append((simulate_step_s(kinds, max(depth, 0), layer_bytes, links, cuda, pieces), depth, split))
    step_s, depth, split = min(scored, key=lambda s: (round(s[0], 9), s[1]))
    return depth, split, step_s


def _minimum_reserve(config: ModelConfig, dtype: torch.dtype, policy: Policy, context_tokens: int, batch: int,
                     fixed_bytes: int, reserve: int) -> int:
    """The reserve at the smallest budget M >= reserve(M) + fixed_bytes, from a too-small budget's reserve
    (the auto prefill piece, so the reserve, grows with the budget; it is bounded, so this ends)."""
    while (grown := reserve_bytes(config, dtype, policy, context_tokens, batch, reserve + fixed_bytes)) > reserve:
        reserve = grown
    return reserve


def _shown_size_at_least(n_bytes: int) -> int:
    """A size >= ``n_bytes`` that ``format_size`` prints exactly, so a minimum typed back as shown suffices."""
    shown = parse_size(format_size(n_bytes).replace(" ", ""))
    if shown >= n_bytes:                   # printed as is (rounded up already): idempotent
        return shown
    step = 1 if n_bytes < 1024 else 1024 ** int(math.log(n_bytes, 1024)) / 100   # format_size's last digit
    shown = parse_size(format_size(n_bytes + step / 2 + 1).replace(" ", ""))
    assert shown >= n_bytes, (shown, n_bytes)
    return shown


def _check_minimum(dev_mem: int, reserve: int, globals_bytes: int, layer_bytes: int, num_layers: int,
                   dtype: torch.dtype, context_tokens: int, kv_at_floor: bool = False) -> None:
    """Refuse a device budget below globals + KV/activation reserve + one layer slot.

    ``kv_at_floor``: the KV part is the least room with which the model's full context runs (see
    ``kv_reserve_bytes``), so fewer --kv-device-tokens would not lower it."""
    minimum = reserve + globals_bytes + layer_bytes
    if dev_mem < minimum:
        shown = format_size(_shown_size_at_least(minimum))
        kv_note = " (the KV part: the least with which the model's full context runs)" if kv_at_floor else ""
        fewer = "" if kv_at_floor else (
            f"reserve KV room for fewer tokens (--kv-device-tokens, now {context_tokens}), or ")
        raise PlanError(
            f"device budget {format_size(dev_mem)} is below the minimum working set {shown} "
            f"(globals {format_size(globals_bytes)} + KV and activations {format_size(reserve)}{kv_note} "
            f"+ one layer {format_size(layer_bytes)} of {num_layers}, {str(dtype).removeprefix('torch.')}); raise "
            f"--device-mem to at least {shown}, or {fewer}use a smaller dtype")


__all__ = ["ACTIVATION_FRACTION", "CPU_ACTIVATION_FRACTION", "DEFAULT_PREFILL_TOKENS", "LinkSpeeds",
           "MIN_ATTENTION_SCRATCH_BYTES", "MIN_PREFILL_TOKENS", "Plan", "PlanError", "activation_bytes",
           "activation_fraction", "compute_estimate", "default_offload_dir",
           "detect_budgets", "fused_tail_attention", "kv_reserve_bytes", "kv_stored_bytes_per_token", "layer_sizes",
           "make_plan", "minimum_device_bytes", "pieces_groups_bytes", "plan_device", "prefill_sizes", "probe_links",
           "reserve_bytes", "scratch_for", "simulate_step_s", "spread_layers", "step_bound", "step_rows"]
