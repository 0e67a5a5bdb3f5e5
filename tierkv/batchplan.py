"""The planner's batch choice: how many sequences share each layer pass, and in how many micro-batches.

Why this module exists: when weights stream from disk or host memory a layer pass costs the same
for one sequence or for many, so an offline job (``tierkv batch``, ``engine.generate(list)``) wants
the largest batch the budgets hold, up to where compute, not the link, bounds the step. Which batch
that is depends on the whole batch's KV (on each tier), the step's activations, the weights left on
the device beside them, and the link speeds; ``choose_batch`` asks ``make_plan`` for the placement
each batch size gets (the plan the engine itself will make from ``BatchChoice.load_kwargs()``) and
runs the planner's link model (``simulate_step_s``) with a layer's compute grown by the step's rows.

Block schedule (FlexGen's zig-zag order): a batch may run as several micro-batches per layer pass:
each layer's weights stay loaded while the micro-batches run through it one after another, and the
device keeps activation room for one micro-batch, so a pass carries several prefill pieces (fewer
passes over the streamed layers for the same prompts). When the whole batch's KV does not fit the
device room beside the weights, the room is planned for one micro-batch's KV and each sequence's
cold KV sits on the host tier, gathered while its micro-batch computes. Of the micro-batch counts
that fit, the fewest within ``NEAR_BEST`` of the best predicted throughput win.

Prefill piece: the planner's own piece (``plan.prefill_sizes``) follows the device budget alone, so
a prompt a little longer than it takes two passes over the streamed layers. Each batch size is
also planned with larger pieces sized to its prompts (``_pieces``: the longest prompt, the wave's
prompt tokens over the micro-batches); the larger activations may displace a resident layer,
which every decode pass then reads from disk, so the throughput model decides (a short job
gains a pass, a long one keeps the layer). A piece the policy fixes is never resized.

Throughput model for K prompts of the given lengths and ``new_tokens`` each: the job takes
``prefill passes + ceil(K / batch) * new_tokens`` decode passes over the layers (continuous
batching refills the batch as sequences finish); the prefill passes are counted by running the
engine's own scheduler over each wave's prompts (``prefill_passes_of``). A pass of R rows carrying N tokens costs ``simulate_step_s`` with a layer's
compute at ``layer_compute_s + (R - 1) * row_s + (N - R) * token_s`` plus attention over each row's
context at the layer's own streaming rate: ``row_s`` what another sequence's row adds (its own
attention, RoPE), ``token_s`` what another prompt token of a row adds (the projections' share: far
less). Both are probed once per machine (``row_compute_s``, cached with the other link speeds) and,
on a running engine, fitted to the steps it ran (``tierkv.calibrate``).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tierkv.budgets import PlanError, default_offload_dir
from tierkv.config import Budget, ModelConfig, Policy, format_size
from tierkv.errors import ArgumentError
from tierkv.io.checkpoint import resolve_dtype
from tierkv.io.store import Extent
from tierkv.kvroom import sequence_minimum_bytes
from tierkv.plan import DEFAULT_PREFILL_TOKENS, MIN_PREFILL_TOKENS, Plan, make_plan, plan_device, probe_links, \
    simulate_step_s, step_bound
from tierkv.calibrate import engine_figures, row_key, token_key
from tierkv.probe import LinkCache, LinkSpeeds, machine_busy
from tierkv.scheduler import Limits, Scheduler

__all__ = ["BatchChoice", "BatchInputs", "BatchOption", "choose_batch", "row_compute_s"]

MAX_AUTO_BATCH = 256          # "auto" tries batch sizes up to this (and never more than the prompts)
ROW_PROBE_ROWS = 129          # one-token rows of the row-cost probe (beside the batch-1 timing)
ROW_PROBE_ROUNDS = 8
NEAR_BEST = 0.02              # a larger batch must predict more than this much more throughput to be chosen
PASS_TARGETS = 4              # prefill pieces are also sized to pack a wave of prompts into 2 .. this many passes


@dataclass(frozen=True)
class BatchInputs:
    """What a batch choice is planned from when no engine is loaded yet (``tierkv plan``, ``tierkv batch``)."""

    config: ModelConfig
    budget: Budget = Budget()
    policy: Policy = Policy()
    links: LinkSpeeds | None = None         # None: probed (or this machine's cached measurements)
    data_path: Path | None = None           # the store's data file the disk probe reads, if any
    config_only: bool = False
    layout: list[Extent] | None = None
    row_s: float | None = None              # a layer's compute per extra one-token row; None: row_compute_s()
    token_s: float | None = None            # ... per extra prompt token of a row (prefill); None: token_compute_s()


@dataclass(frozen=True)
class BatchOption:
    """One batch size's prediction (or why it does not fit)."""

    batch: int
    micro_batches: int
    fits: bool
    predicted_tok_s: float = 0.0            # generated tokens per second over the whole job
    bound: str = ""                         # "disk", "h2d" or "compute": the busiest resource of a decode pass
    decode_step_s: float = 0.0              # one decode pass of the full batch
    passes: int = 0                         # layer passes the job takes (prefill and decode)
    read_bytes_per_token: float = 0.0       # streamed weight bytes per generated token
    kv_device_tokens: int = 0               # KV tokens the plan keeps device room for (one micro-batch's)
    why: str = ""                           # when it does not fit
    prefill_tokens: int = 0                 # the plan's prefill piece (tokens per sequence per pass)
    piece_asked: int | None = None          # the piece this option asks the planner for; None: the planner's own


@dataclass(frozen=True)
class BatchChoice:
    """The chosen batch, its block schedule and prediction, and every size considered."""

    batch: int
    micro_batches: int
    predicted_tok_s: float
    bound: str
    plan: Plan                              # the placement the engine gets from load_kwargs()
    options: tuple[BatchOption, ...] = field(default=())
    prompts: int = 0
    new_tokens: int = 0
    kv_device_tokens: int = 0
    compute_bound_from: int | None = None   # the smallest batch considered whose decode pass compute bounds
    kv_split: bool = False                  # the device KV room holds one micro-batch's KV, not the batch's

    piece_asked: int | None = None          # the prefill piece chosen for these prompts; None: the planner's own

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``tierkv.load`` (beside the same budgets) that run this choice."""
        kwargs = {"max_sequences": self.batch, "micro_batches": self.micro_batches,
                  "kv_device_tokens": self.kv_device_tokens, "prefill_order": "longest"}
        return kwargs if self.piece_asked is None else dict(kwargs, prefill_chunk_tokens=self.piece_asked)

    def summary(self) -> str:
        """A table of the sizes considered and the choice, for ``tierkv plan --batch``."""
        lines = [f"{'batch':>6} {'micro':>5} {'piece':>6} {'passes':>6} {'tok/s':>9} {'bound':>8} {'step s':>8} "
                 f"{'read/token':>11}"]
        chosen = (self.batch, self.micro_batches, self.piece_asked)
        for o in self.options:
            if not o.fits:
                lines.append(f"{o.batch:>6} {'-':>5} {'-':>6} {'-':>6} {'-':>9} {'-':>8} {'-':>8} {'-':>11}  {o.why}")
                continue
            mark = "  <- chosen" if (o.batch, o.micro_batches, o.piece_asked) == chosen else ""
            lines.append(f"{o.batch:>6} {o.micro_batches:>5} {o.prefill_tokens:>6} {o.passes:>6} "
                         f"{o.predicted_tok_s:>9.2f} {o.bound:>8} {o.decode_step_s:>8.3f} "
                         f"{format_size(int(o.read_bytes_per_token)):>11}{mark}")
        block = "" if self.micro_batches == 1 else f", {self.micro_batches} micro-batches per layer pass" + (
            " (the device room holds one micro-batch's KV; the rest waits on the host tier)" if self.kv_split else "")
        over = (f"compute bounds the step from batch {self.compute_bound_from}" if self.compute_bound_from
                else "the link bounds the step at every batch considered")
        piece = (f"; prefill pieces of {self.plan.prefill_chunk_tokens} tokens"
                 + (" (sized to these prompts)" if self.piece_asked is not None else ""))
        lines += [f"chosen: batch {self.batch}{block}{piece}: predicted {self.predicted_tok_s:.2f} tok/s over "
                  f"{self.prompts} prompts x {self.new_tokens} new tokens, bound by {self.bound}; {over}",
                  "load with: " + ", ".join(f"{k}={v!r}" for k, v in self.load_kwargs().items())]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "micro_batches": self.micro_batches, "predicted_tok_s": self.predicted_tok_s,
                "bound": self.bound, "load_kwargs": self.load_kwargs(), "prompts": self.prompts,
                "new_tokens": self.new_tokens, "compute_bound_from": self.compute_bound_from,
                "options": [o.__dict__ for o in self.options], "plan": self.plan.to_dict()}


def choose_batch(engine_or_inputs: Any, prompt_tokens: list[int], new_tokens: int,
                 asked: int | str = "auto") -> BatchChoice:
    """The batch (and block schedule) that maximises predicted throughput for prompts of
    ``prompt_tokens`` lengths with ``new_tokens`` each, within the budgets.

    ``engine_or_inputs``: a loaded ``Engine`` (its config, policy, budgets and measured links, with the
    compute figures fitted to the steps it has run: ``tierkv.calibrate``) or
    ``BatchInputs``. ``asked``: "auto" (the smallest batch within ``NEAR_BEST`` of the best predicted
    throughput: once compute bounds the pass, more rows only cost memory), or a batch size to plan;
    one that does not fit raises PlanError naming the largest that does."""
    inputs = _inputs_of(engine_or_inputs)
    if not prompt_tokens or min(prompt_tokens) < 1 or new_tokens < 1:
        raise ArgumentError("choose_batch needs at least one prompt of >= 1 token and new_tokens >= 1")
    if asked != "auto" and (isinstance(asked, bool) or not isinstance(asked, int) or asked < 1):
        raise ArgumentError(f"batch {asked!r}: give a whole number >= 1 or 'auto'")
    inputs = _with_links(inputs)
    job = _Job(sorted(prompt_tokens, reverse=True), new_tokens)
    if asked == "auto":
        sizes = sorted({min(2 ** k, len(prompt_tokens)) for k in range(MAX_AUTO_BATCH.bit_length())})
        options = [_option(inputs, job, b) for b in sizes]
        fitting = [o for o in options if o.fits]
        if not fitting:
            raise PlanError(options[0].why)
        top = max(o.predicted_tok_s for o in fitting)     # the smallest batch within NEAR_BEST of the best
        best = min((o for o in fitting if o.predicted_tok_s >= top * (1 - NEAR_BEST)), key=lambda o: o.batch)
    else:
        best = _option(inputs, job, min(asked, len(prompt_tokens)))     # more than the prompts never run at once
        if not best.fits:
            raise PlanError(_refusal(inputs, job, best.batch, best.why))
        options = [best]
    fitting = [o for o in options if o.fits]
    plan = _plan_for(inputs, job, best.batch, best.micro_batches, best.kv_device_tokens, best.piece_asked)
    compute_from = next((o.batch for o in fitting if o.bound == "compute"), None)
    return BatchChoice(best.batch, best.micro_batches, best.predicted_tok_s, best.bound, plan, tuple(options),
                       len(prompt_tokens), new_tokens, best.kv_device_tokens, compute_from,
                       best.kv_device_tokens < job.kv_tokens(best.batch), best.piece_asked)


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    prompts: list[int]                      # prompt lengths, longest first
    new_tokens: int

    def kv_tokens(self, batch: int) -> int:
        """KV tokens of the ``batch`` longest sequences at their end: what the rooms must hold at once."""
        return sum(self.prompts[:batch]) + batch * self.new_tokens


def _inputs_of(source: Any) -> BatchInputs:
    if isinstance(source, BatchInputs):
        return source
    plan = getattr(source, "plan", None)
    if plan is None or not hasattr(source, "policy"):
        raise ArgumentError("choose_batch needs a tierkv Engine loaded with a plan (a model loaded by tierkv.load) "
                            "or tierkv.batchplan.BatchInputs")
    budget = Budget(plan.device_mem_bytes, plan.host_mem_bytes, Path(plan.offload_dir))
    store = getattr(source, "store", None)
    figures = engine_figures(source)          # its own step times, once it ran some (tierkv.calibrate)
    links, row_s, token_s = (figures.links, figures.row_s, figures.token_s) if figures is not None else (
        plan.links, None, None)
    return BatchInputs(source.config, budget, source.policy, links, store.data_path if store is not None else None,
                       plan.config_only, row_s=row_s, token_s=token_s)


def _with_links(inputs: BatchInputs) -> BatchInputs:
    """Measured links (the planner's probe; cached per machine) and the row cost, once for every size."""
    links, row_s, token_s = inputs.links, inputs.row_s, inputs.token_s
    if links is None:
        links = make_plan(inputs.config, inputs.budget, inputs.policy, data_path=inputs.data_path,
                          config_only=inputs.config_only, layout=inputs.layout).links
        if math.isinf(links.disk_read_gbps):            # batch 1 kept every layer: larger batches may stream
            dtype = resolve_dtype(inputs.policy.dtype, inputs.config.dtype)
            probed = probe_links(inputs.config, dtype, plan_device(inputs.policy), inputs.data_path,
                                 inputs.budget.offload_dir or default_offload_dir())
            links = replace(links, disk_read_gbps=probed.disk_read_gbps, h2d_gbps=probed.h2d_gbps)
    dtype = resolve_dtype(inputs.policy.dtype, inputs.config.dtype)
    if row_s is None:
        row_s = row_compute_s(inputs.config, dtype, plan_device(inputs.policy), inputs.budget.offload_dir)
    if token_s is None:
        token_s = row_compute_s(inputs.config, dtype, plan_device(inputs.policy), inputs.budget.offload_dir,
                                one_sequence=True)
    return replace(inputs, links=links, row_s=row_s, token_s=token_s)


def _plan_for(inputs: BatchInputs, job: _Job, batch: int, micro: int, kv_device_tokens: int,
              piece: int | None = None) -> Plan:
    """The plan the engine makes for ``batch`` sequences in ``micro`` micro-batches with device KV room
    for ``kv_device_tokens`` and prefill pieces of ``piece`` tokens (None: the policy's; raises PlanError)."""
    policy = replace(inputs.policy, max_sequences=batch, micro_batches=micro, kv_device_tokens=kv_device_tokens,
                     prefill_chunk_tokens=piece or inputs.policy.prefill_chunk_tokens)
    return make_plan(inputs.config, inputs.budget, policy, inputs.links, data_path=inputs.data_path,
                     config_only=inputs.config_only, layout=inputs.layout)


def _option(inputs: BatchInputs, job: _Job, batch: int) -> BatchOption:
    """``batch``'s best prediction over its micro-batch counts (1, 2, 4, ... up to the batch), each with
    device KV room for the whole batch or, when that does not fit, for one micro-batch (the block
    schedule: the rest on the host tier), and each with the planner's own prefill piece or a larger
    one sized to the prompts (``_pieces``: fewer prefill passes over the streamed layers, weighed
    against the resident layers its activations may displace); or why none fits. More micro-batches
    carry more prompt tokens per pass at the same activation room; the fewest within ``NEAR_BEST`` of
    the best win, each with its best piece."""
    why, kv_why, best_per_micro = "", "", []
    micro = 1
    while micro <= batch:
        whole = job.kv_tokens(batch)
        for kv_tokens in ([whole] if micro == 1 else [whole, -(-whole // micro)]):
            found, refused, short = _placed(inputs, job, batch, micro, kv_tokens, None)
            if found is None:
                why, kv_why = refused or why, kv_why or short    # the first placement that held the weights
                continue                                         # says what the KV is short of
            options = [found] + [o for o in (_placed(inputs, job, batch, micro, kv_tokens, p)[0]
                                             for p in _pieces(inputs, job, batch, micro, found.prefill_tokens))
                                 if o is not None]
            best_per_micro.append(max(options, key=lambda o: (round(o.predicted_tok_s, 9), -o.prefill_tokens)))
            break
        micro = micro * 2 if micro * 2 <= batch or micro == batch else batch
    if not best_per_micro:
        return BatchOption(batch, 0, False, why=kv_why or why)
    top = max(o.predicted_tok_s for o in best_per_micro)
    return min((o for o in best_per_micro if o.predicted_tok_s >= top * (1 - NEAR_BEST)),
               key=lambda o: o.micro_batches)


def _placed(inputs: BatchInputs, job: _Job, batch: int, micro: int, kv_tokens: int,
            piece: int | None) -> tuple[BatchOption | None, str, str]:
    """(the prediction, "", "") for one placement, or (None, the planner's refusal, "") when the weights
    do not fit, or (None, "", what the KV rooms are short of)."""
    try:
        plan = _plan_for(inputs, job, batch, micro, kv_tokens, piece)
    except PlanError as exc:
        return None, str(exc), ""
    problem = _kv_problem(inputs, job, batch, plan)
    if problem is not None:
        return None, "", problem
    return replace(_predict(inputs, job, batch, micro, plan, kv_tokens), piece_asked=piece), "", ""


def _pieces(inputs: BatchInputs, job: _Job, batch: int, micro: int, planned: int) -> list[int]:
    """Prefill pieces beside the planner's own (``planned``) worth planning for this job: the longest
    prompt of a wave (every prompt in one piece), the wave's prompt tokens over the micro-batches in
    one pass and in ``2 .. PASS_TARGETS`` passes (the smallest pieces that may pack the wave into that
    many: 288 packs prompts of 512 and 64 into two passes where 256 takes three), the powers of two
    between them and the planner's piece, up to ``DEFAULT_PREFILL_TOKENS``, and half the planner's piece
    (less activation room may leave room for one more resident layer; one step down only: smaller
    pieces cost more passes than a layer saves); none when the policy fixes the piece (the user's or
    a loaded engine's). The throughput model counts the passes each really packs into."""
    if inputs.policy.prefill_chunk_tokens is not None:
        return []
    wave = job.prompts[:batch]                  # the longest prompts: the first wave's
    targets = {wave[0]} | {-(-sum(wave) // (micro * p)) for p in range(1, PASS_TARGETS + 1)}
    top = min(DEFAULT_PREFILL_TOKENS, max(targets))
    powers = {planned << k for k in range(1, DEFAULT_PREFILL_TOKENS.bit_length()) if planned << k < top}
    larger = {p for p in targets | powers if planned < p <= DEFAULT_PREFILL_TOKENS}
    smaller = {p for p in targets | {planned // 2} if MIN_PREFILL_TOKENS <= p < planned}
    return sorted(larger | smaller)


def _kv_problem(inputs: BatchInputs, job: _Job, batch: int, plan: Plan) -> str | None:
    """Why the plan's KV rooms cannot hold the batch's KV (every sequence's device minimum, the rest on
    the host tier), or None. KV is never planned onto disk: a step would read it back every pass."""
    dtype = resolve_dtype(inputs.policy.dtype, inputs.config.dtype)
    minimum = sum(sequence_minimum_bytes(inputs.config, inputs.policy, dtype, n + job.new_tokens)
                  for n in job.prompts[:batch])
    tokens = job.kv_tokens(batch)
    on_device = min(tokens, plan.kv_device_bytes // max(1, plan.kv_device_bytes_per_token))
    host_need = (tokens - on_device) * plan.kv_host_bytes_per_token
    if minimum > plan.kv_device_bytes:
        return (f"batch {batch}: its caches need {format_size(minimum)} of device KV room at least, the plan "
                f"leaves {format_size(plan.kv_device_bytes)}")
    if host_need > plan.kv_host_bytes:
        return (f"batch {batch}: {tokens:,} tokens of KV need {format_size(host_need)} in host memory beside the "
                f"device room, the plan leaves {format_size(plan.kv_host_bytes)}")
    return None


def _predict(inputs: BatchInputs, job: _Job, batch: int, micro: int, plan: Plan, kv_tokens: int) -> BatchOption:
    """The job's time at this batch: prefill passes (as the scheduler packs each wave's prompts into
    the plan's pieces) plus a decode pass per new token per wave of ``batch`` sequences."""
    links = plan.links
    assert inputs.row_s is not None and inputs.token_s is not None
    row_s, token_s = inputs.row_s, inputs.token_s
    kinds = tuple("device" if j in plan.device_layers else "host" if j in plan.host_layers else "disk"
                  for j in range(plan.num_layers))
    cuda = plan.device.startswith("cuda")
    rate = plan.layer_bytes / links.layer_compute_s if links.layer_compute_s > 0 else math.inf   # bytes/s
    kv_layer = plan.kv_device_bytes_per_token / plan.num_layers

    def pass_s(rows: int, context_tokens: int, tokens: int = 0) -> tuple[float, str]:
        """A pass of ``rows`` sequences carrying ``tokens`` tokens in all (default one each)."""
        extra = max(0, tokens - rows) * token_s
        layer = links.layer_compute_s + (rows - 1) * row_s + extra + kv_layer * context_tokens / rate
        timed = replace(links, layer_compute_s=layer)
        return simulate_step_s(kinds, plan.prefetch_depth, plan.layer_bytes, timed, cuda, plan.stream_pieces), \
            step_bound(kinds, plan.layer_bytes, timed, cuda)

    k, total_prompt = len(job.prompts), sum(job.prompts)
    group_tokens = plan.prefill_chunk_tokens + -(-batch // micro) - 1
    waves = -(-k // batch)
    prefill_passes = sum(prefill_passes_of(job.prompts[w:w + batch], plan.prefill_chunk_tokens, group_tokens, micro)
                         for w in range(0, k, batch))
    per_seq = job.kv_tokens(batch) // batch
    tokens = -(-total_prompt // prefill_passes)                # prompt tokens a prefill pass carries
    prefill_s, _ = pass_s(min(batch, tokens), tokens * per_seq // 2, tokens)
    decode_s, bound = pass_s(batch, batch * (per_seq - job.new_tokens // 2))
    passes = prefill_passes + waves * job.new_tokens
    total_s = prefill_passes * prefill_s + waves * job.new_tokens * decode_s
    generated = k * job.new_tokens
    return BatchOption(batch, micro, True, generated / total_s, bound, decode_s, passes,
                       passes * plan.streamed_bytes_per_token / generated, kv_tokens,
                       prefill_tokens=plan.prefill_chunk_tokens)


def prefill_passes_of(prompts: list[int], piece_tokens: int, group_tokens: int, micro_batches: int) -> int:
    """Layer passes until every one of ``prompts`` (admitted together) has sampled its first token, as
    the engine's own scheduler packs them (``tierkv.scheduler.Scheduler``: a prompt feeds one piece of
    up to ``piece_tokens`` a pass, into ``micro_batches`` groups of ``group_tokens``, beside the
    decode rows of the prompts already done; the largest pieces first, as ``load_kwargs`` asks: an
    engine loaded in arrival order may take more passes than this counts)."""
    scheduler = Scheduler(Limits(group_tokens, piece_tokens, len(prompts), None, None, micro_batches,
                                 share_room=micro_batches > 1, longest_first=True), _NoRoom())
    for i, n in enumerate(prompts):
        scheduler.add(i, n, n + 1)
    prefilling, passes = set(range(len(prompts))), 0
    while prefilling:
        passes += 1
        for row in scheduler.schedule().rows:
            scheduler.fed(row)
            if row.samples:
                prefilling.discard(row.seq_id)
                scheduler.sampled(row.seq_id)
    return passes


class _NoRoom:
    """A KV sizer for the pass count alone: the rooms are checked apart (``_kv_problem``)."""

    def minimum_bytes(self, capacity_tokens: int) -> int:
        return 0

    def want_bytes(self, capacity_tokens: int) -> int:
        return 0

    def host_bytes(self, tokens: int) -> int:
        return 0


def _refusal(inputs: BatchInputs, job: _Job, asked: int, why: str) -> str:
    """PlanError text for a batch that does not fit: the largest that does (fits is monotone in the batch)."""
    lo, hi = 0, asked - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _option(inputs, job, mid).fits else (lo, mid - 1)
    if lo == 0:
        return f"batch {asked} does not fit the budgets, nor does batch 1: {why}"
    return (f"batch {asked} does not fit the budgets ({why}); the largest batch that fits is {lo}: use --batch {lo} "
            "(or --batch auto), or raise --device-mem / --host-mem")


def row_compute_s(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                  offload_dir: Path | None = None, one_sequence: bool = False) -> float:
    """Seconds one decoder layer's compute grows per extra one-token row of a step, measured on zero
    weights of the model's shapes (the fastest of several runs at 1 and ``ROW_PROBE_ROWS`` rows, each
    row its own sequence as in a decode step; ``one_sequence``: per extra prompt token, the rows one
    sequence's prefill piece), cached per machine in ``offload_dir/links.json`` (the
    median of the runs kept there: a slope of two timings is noisier than either; not cached while the
    machine is busy; the engine's observations count instead once it has run: ``tierkv.calibrate``)."""
    key = (token_key if one_sequence else row_key)(config, dtype, device)
    return LinkCache(offload_dir).measure(key, lambda: _probe_row_s(config, dtype, device, one_sequence),
                                          statistics.median, keep=lambda: device.type != "cpu" or not machine_busy())


def _probe_row_s(config: ModelConfig, dtype: torch.dtype, device: torch.device, one_sequence: bool) -> float:
    from tierkv.model import decoder_layer, dense_attention, step_inputs

    class _Rows:                 # each row attends to itself alone (a one-token sequence per row), or causally
        def attend(self, layer, q, k, v, positions, window_tokens):   # q (1, Hq, R, D), k/v (1, Hkv, R, D)
            if one_sequence:
                return dense_attention(q, k, v, positions, positions, window_tokens)
            return torch.cat([dense_attention(q[:, :, r:r + 1], k[:, :, r:r + 1], v[:, :, r:r + 1],
                                              positions[:, r:r + 1], positions[:, r:r + 1], window_tokens)
                              for r in range(q.shape[2])], dim=2)

    weights = {k: torch.zeros(shape, dtype=dtype, device=device) for k, shape in config.layer_tensor_shapes().items()}

    def timed(rows: int) -> float:
        h = torch.zeros((1, rows, config.hidden_size), dtype=dtype, device=device)        # (1, R, H)
        positions = (torch.arange(rows, device=device) if one_sequence else torch.zeros(rows, dtype=torch.int64,
                                                                                       device=device))[None]
        step = step_inputs(config, positions, rows if one_sequence else 1, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        decoder_layer(config, weights, h, step, _Rows(), 0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    one, many = math.inf, math.inf
    with torch.inference_mode():
        timed(1), timed(ROW_PROBE_ROWS)                       # warm up
        for _ in range(ROW_PROBE_ROUNDS):                     # interleaved: a busy moment hits both alike
            one, many = min(one, timed(1)), min(many, timed(ROW_PROBE_ROWS))
    return max(1e-9, (many - one) / (ROW_PROBE_ROWS - 1))
