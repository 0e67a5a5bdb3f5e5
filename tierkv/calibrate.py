"""The engine's own step timings -> the compute figures the planner predicts with.

Why this module exists: the planner's compute link (one decoder layer at batch 1, and what each
extra row adds: ``probe.py``, ``batchplan.row_compute_s``) is timed in about a second on zero
weights and cached for a day. A probe taken while other work loads the machine is off by an order
of magnitude (measured: 97-205 ms per layer cached during a loaded hour, ~10 ms quiet), and every
plan of that day then predicts 5-20x too slow. The engine times every step it runs anyway: a
step's wall time minus the time its layer loop waited for weights is what its layers computed. So
the runner records each step here (``StepLog``), ``calibrated`` turns the decode steps' medians into
corrected figures (the planner's link model: a layer costs ``layer_compute_s + (rows - 1) *
row_s``), ``choose_batch`` on a loaded engine plans with them, and ``remember`` writes them into
``links.json`` as observations (``LinkCache.observe``): from then on they count instead of the
probe, and a cached probe that disagrees with them is dropped, so the next probe is a fresh one.

Only CPU steps are recorded: on CUDA the host runs ahead of the device, so a step's wall time on
the host does not measure its compute.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tierkv.config import ModelConfig
from tierkv.probe import LinkCache, LinkSpeeds, compute_key

__all__ = ["Figures", "MIN_PROMPT_TOKENS", "MIN_STEPS", "StepLog", "StepTiming", "calibrated", "engine_figures",
           "prompt_token_s", "remember", "row_key", "token_key"]

STEPS_KEPT = 512            # the newest steps a log keeps
MIN_STEPS = 3               # decode steps at one row count before their median counts
MIN_PROMPT_TOKENS = 16      # a step with this many more tokens than rows fits the prompt token cost


def row_key(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> str:
    """Cache key of a layer's compute per extra one-token row (``batchplan.row_compute_s``)."""
    return "rows:" + compute_key(config, dtype, device)


def token_key(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> str:
    """Cache key of a layer's compute per extra prompt token of a row (``row_compute_s(one_sequence=True)``)."""
    return "tokens:" + compute_key(config, dtype, device)


@dataclass(frozen=True)
class StepTiming:
    """One step the engine ran."""

    rows: int                   # sequences in the step
    tokens: int                 # tokens packed into it (= rows for a decode-only step)
    layer_s: float              # (wall - waiting for weights) / layers: one layer's compute
    wall_s: float = 0.0         # the step through every layer
    wait_s: float = 0.0         # of which the layer loop waited for streamed weights


class StepLog:
    """The newest ``STEPS_KEPT`` steps of one engine (pure bookkeeping: the runner records, the planner reads)."""

    def __init__(self, num_layers: int) -> None:
        assert num_layers >= 1
        self.num_layers = num_layers
        self.steps: deque[StepTiming] = deque(maxlen=STEPS_KEPT)

    def record(self, rows: int, tokens: int, wall_s: float, wait_s: float) -> None:
        """A step of ``rows`` sequences and ``tokens`` tokens took ``wall_s`` through the layers, of
        which ``wait_s`` was spent waiting for streamed weights."""
        if rows >= 1 and tokens >= rows and wall_s > 0:
            self.steps.append(StepTiming(rows, tokens, max(wall_s - wait_s, 1e-9) / self.num_layers, wall_s, wait_s))

    def decode_layer_s(self) -> dict[int, float]:
        """rows -> the median per-layer compute of the decode-only steps (one token per row) of that many
        rows, for the row counts seen in at least ``MIN_STEPS`` steps."""
        by_rows: dict[int, list[float]] = {}
        for s in self.steps:
            if s.tokens == s.rows:
                by_rows.setdefault(s.rows, []).append(s.layer_s)
        return {r: statistics.median(v) for r, v in sorted(by_rows.items()) if len(v) >= MIN_STEPS}


def calibrated(links: LinkSpeeds, row_s: float | None, observed: dict[int, float]
               ) -> tuple[LinkSpeeds, float | None, bool]:
    """(links, row_s, corrected?) with the compute figures fitted to ``observed`` (``decode_layer_s``).

    A layer of R one-token rows costs ``a + (R - 1) * b`` in the planner's model. Observed at batch 1,
    ``a`` is that median; observed at R > 1, ``b`` is the median of ``(c_R - a) / (R - 1)``. With only
    batch 1 seen, ``b`` is scaled like ``a`` (a disturbed probe slows both); with only larger batches
    seen, both are scaled by the median ratio of observed to predicted (which needs ``row_s``: without
    it nothing is corrected then)."""
    a0 = links.layer_compute_s
    if not observed or (1 not in observed and row_s is None):
        return links, row_s, False
    if 1 in observed:
        a = observed[1]
    else:
        assert row_s is not None
        a = a0 * statistics.median(c / (a0 + (r - 1) * row_s) for r, c in observed.items())
    wide = {r: c for r, c in observed.items() if r > 1}
    if wide:
        b: float | None = max(1e-9, statistics.median((c - a) / (r - 1) for r, c in wide.items()))
    else:
        b = row_s * a / a0 if row_s is not None and a0 > 0 else row_s
    return replace(links, layer_compute_s=a, compute_estimated_gbps=None), b, True


@dataclass(frozen=True)
class Figures:
    """A running engine's compute figures for the planner."""

    links: LinkSpeeds
    row_s: float | None                 # per extra one-token row (None: not known)
    token_s: float | None               # per extra prompt token of a row (None: not known)
    corrected: bool                     # fitted to the engine's own steps


def prompt_token_s(log: StepLog, a: float, b: float | None) -> float | None:
    """Per extra prompt token of a row, from the prefill steps (more tokens than rows, by at least
    ``MIN_PROMPT_TOKENS``): the median of ``(c - a - (R - 1) * b) / (N - R)``; None without such steps."""
    fits = [(s.layer_s - a - (s.rows - 1) * (b or 0.0)) / (s.tokens - s.rows)
            for s in log.steps if s.tokens - s.rows >= MIN_PROMPT_TOKENS]
    return max(1e-12, statistics.median(fits)) if fits else None


def engine_figures(engine: Any) -> Figures | None:
    """A loaded engine's figures: its plan's links and the cached row and token figures, fitted to the
    steps it ran (``calibrated``, ``prompt_token_s``); None when it has no plan or logs no steps (CUDA)."""
    plan, log = engine.plan, getattr(engine.runner, "log", None)
    if plan is None or log is None:
        return None
    cache = LinkCache(Path(plan.offload_dir))

    def cached(key: str) -> float | None:
        values = cache.observed(key) or cache.samples(key)
        return statistics.median(values) if values else None

    row_s = cached(row_key(engine.config, engine.dtype, engine.device))
    links, b, fixed = calibrated(plan.links, row_s, log.decode_layer_s())
    token_s = prompt_token_s(log, links.layer_compute_s, b) if fixed else None   # on a fitted a and b only
    return Figures(links, b, token_s if token_s is not None else cached(
        token_key(engine.config, engine.dtype, engine.device)), fixed)


def remember(engine: Any) -> bool:
    """Write what a 16-bit CPU engine's steps showed into its offload dir's ``links.json`` as observations
    (a cached probe that disagrees is dropped: ``LinkCache.observe``): ``a`` when it ran batch-1 decode
    steps, ``b`` when it ran larger ones, the prompt token cost when it ran prefill pieces. Returns
    whether anything was written."""
    figures = engine_figures(engine)
    if figures is None or not figures.corrected or engine.plan.links.compute_estimated_gbps is not None:
        return False        # (an estimated link is a matvec rate of the weights' scheme, keyed apart)
    observed = engine.runner.log.decode_layer_s()
    cache = LinkCache(Path(engine.plan.offload_dir))
    key = (engine.config, engine.dtype, engine.device)
    if 1 in observed:
        cache.observe(compute_key(*key), figures.links.layer_compute_s, min)
    if figures.row_s is not None and any(r > 1 for r in observed):
        cache.observe(row_key(*key), figures.row_s, statistics.median)
    prompt = prompt_token_s(engine.runner.log, figures.links.layer_compute_s, figures.row_s)
    if prompt is not None:
        cache.observe(token_key(*key), prompt, statistics.median)
    return True
