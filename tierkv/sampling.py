"""Next-token selection: greedy, temperature, top-k, top-p, seeded.

Why this module exists: sampling is the one piece of generation that is pure math over logits;
keeping it apart from the engine makes it testable on its own (seed reproducibility, top-k/top-p
never leaving the allowed set) and shared by every engine path. ``pick`` also says whether the
logits were healthy, in the same host transfer as the ids, so the engine can stop on NaN or inf
without a sync of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tierkv.errors import ArgumentError

MAX_SEED = 2**64 - 1                    # torch.Generator.manual_seed takes 0..2**64-1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; top_k 0 and top_p 1.0 disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False        # keep generating past EOS (benchmarks, profiling sweeps)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ArgumentError(f"{name}={value!r} must be a whole number")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ArgumentError(f"{name}={value!r} must be a number")
        if self.max_new_tokens < 0:
            raise ArgumentError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):  # also rejects NaN
            raise ArgumentError(f"temperature={self.temperature} must be a finite number >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise ArgumentError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ArgumentError(f"top_p={self.top_p} must be in (0, 1] (1 disables it)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise ArgumentError(f"seed={self.seed!r} must be a whole number from 0 to 2**64-1 ({MAX_SEED})")
        if not all(isinstance(stop, str) for stop in self.stop):
            raise ArgumentError(f"stop={self.stop!r} must be a string or a list of strings")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (set to -inf) tokens outside top-k and outside the top-p nucleus. logits (B, V) fp32."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]                  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)        # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps at least one)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row. logits (B, V) fp32 -> ids (B,) int64."""
    if params.temperature == 0.0:
        return logits.argmax(-1)
    filtered = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = filtered.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class Picked:
    """One step's choice: ids to feed back, the same ids on the host, and per row whether its logits
    were healthy (see ``logits_healthy``)."""

    ids: torch.Tensor           # (B,) int64 on the logits' device
    token_ids: list[int]        # (B,)
    healthy: list[bool]         # (B,)


def logit_spread(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> (B,) max minus min per row, without a host sync: NaN when a logit is NaN,
    inf or NaN when one is infinite, 0 when all are equal. Healthy rows have 0 < spread < inf.

    Equal logits are as broken as NaN: a hidden state too large for the final norm's fp32 variance
    normalizes to exactly zero, and every row of the head then scores 0.
    """
    return logits.amax(-1) - logits.amin(-1)       # two plain reductions: aminmax(dim=) is 20x slower on CPU


def logits_healthy(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> (B,) bool on the logits' device: finite and not all equal (see ``logit_spread``)."""
    spread = logit_spread(logits)
    return (spread > 0) & (spread < math.inf)


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> Picked:
    """``sample`` plus each row's health, both brought to the host in one transfer. logits (B, V) fp32."""
    spread = logit_spread(logits)                                                 # (B,)
    if params.temperature > 0.0:   # multinomial must never see NaN/inf (on CUDA that is a device-side assert)
        logits = logits.masked_fill(~((spread > 0) & (spread < math.inf))[:, None], 0.0)
    ids = sample(logits, params, generator)                                       # (B,)
    host = torch.stack((ids.double(), spread.double())).tolist()                  # the step's one host sync
    return Picked(ids, [int(i) for i in host[0]], [0.0 < s < math.inf for s in host[1]])
