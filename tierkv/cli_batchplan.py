"""`tierkv plan --batch`: the planner's batch choice for a job, shown as a table or one JSON object.

Why this module exists: the batch choice (``tierkv.batchplan``) needs the job's shape — how many
prompts, how long, how many new tokens each — beside the budgets the plain plan takes; parsing
those flags and printing the choice lives here so ``cli.py`` only hands its plan inputs over.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

from tierkv.batchplan import BatchInputs, choose_batch
from tierkv.errors import ArgumentError

__all__ = ["parse_batch", "prompt_lengths", "show_batch_plan"]


def parse_batch(text: str) -> int | str:
    """"auto" or a whole number >= 1 (what --batch takes)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ArgumentError(f"--batch {text!r}: give 'auto' or a whole number >= 1")
    return value


def prompt_lengths(prompts: int, spec: str) -> list[int]:
    """``prompts`` prompt lengths from --prompt-tokens: "T" (all T) or "LO-HI" (spread evenly, ragged)."""
    if prompts < 1:
        raise ArgumentError(f"--prompts {prompts}: give at least 1")
    lo_text, _, hi_text = spec.partition("-")
    try:
        lo, hi = int(lo_text), int(hi_text or lo_text)
    except ValueError:
        lo = hi = 0
    if not 1 <= lo <= hi:
        raise ArgumentError(f"--prompt-tokens {spec!r}: give a length such as 256 or a range such as 64-512")
    if prompts == 1:
        return [hi]
    return [lo + (hi - lo) * i // (prompts - 1) for i in range(prompts)]


def show_batch_plan(plan_inputs: tuple[Any, ...], batch: str, prompts: int, prompt_tokens: str, new_tokens: int,
                    as_json: bool) -> None:
    """Choose the batch for the job and print the choice (raises PlanError / ArgumentError).
    ``plan_inputs``: (config, budget, policy, data file, config-only, layout) as ``tierkv plan`` reads them."""
    cfg, budget, policy, data_path, config_only, layout = plan_inputs
    inputs = BatchInputs(cfg, budget, policy, data_path=data_path, config_only=config_only, layout=layout)
    if new_tokens < 1:
        raise ArgumentError(f"--new-tokens {new_tokens}: give at least 1")
    choice = choose_batch(inputs, prompt_lengths(prompts, prompt_tokens), new_tokens, parse_batch(batch))
    if as_json:
        print(json.dumps(choice.to_dict()))
        return
    console = Console(width=max(Console().width, 120))
    console.print(choice.plan.summary(), highlight=False, soft_wrap=True, markup=False)
    console.print("", choice.summary(), sep="\n", highlight=False, soft_wrap=True, markup=False)
