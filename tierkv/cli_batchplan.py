"""`tierkv plan --batch`: the planner's batch choice for a job, shown as a table or one JSON object.

Why this module exists: the batch choice (``tierkv.batchplan``) needs the job's shape — how many
prompts, how long, how many new tokens each — beside the budgets the plain plan takes; parsing
those flags and printing the choice lives here so ``cli.py`` only hands its plan inputs over, and
``tierkv batch`` plans its job's requests here before it loads the model.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

from tierkv.batchplan import BatchChoice, BatchInputs, choose_batch
from tierkv.config import Budget
from tierkv.engine import model_path
from tierkv.errors import ArgumentError
from tierkv.tokenizer import Tokenizer

__all__ = ["parse_batch", "plan_job_batch", "prompt_lengths", "show_batch_plan"]


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


def plan_job_batch(model: str, options: Any, requests: list[Any], default_new_tokens: int,
                   asked: str) -> BatchChoice:
    """``tierkv batch --batch auto|N``: the batch choice for the job's requests (``tierkv.batch.BatchRequest``:
    those still to run), planned from the model and the load flags as ``tierkv plan`` reads them.
    Prompt lengths come from the model's tokenizer (chat messages through its template); a model
    without a tokenizer.json (GGUF) counts a text prompt at 4 bytes per token, an estimate. Raises
    PlanError naming the largest batch that fits when N does not fit."""
    from tierkv.cli import _plan_inputs          # cli.py imports this module: import it late

    path = model_path(model)
    budget = Budget.parse(options.device_mem, options.host_mem, options.offload_dir)
    cfg, policy, data_path, config_only, layout = _plan_inputs(path, options, budget)
    tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() else None
    lengths, new_tokens = [], 1
    for req in requests:
        if req.error is not None:
            continue
        if req.messages is not None:
            n = len(tokenizer.encode_chat(req.messages)) if tokenizer is not None and tokenizer.chat_template \
                else sum(len(m.get("content", "")) for m in req.messages) // 4 + 8
        elif isinstance(req.prompt, str):
            n = len(tokenizer.encode(req.prompt)) if tokenizer is not None else len(req.prompt.encode()) // 4 + 1
        else:
            n = len(req.prompt)
        lengths.append(max(1, min(n, cfg.max_position_embeddings)))
        new_tokens = max(new_tokens, int(req.sampling.get("max_new_tokens", default_new_tokens)))
    inputs = BatchInputs(cfg, budget, policy, data_path=data_path, config_only=config_only, layout=layout)
    return choose_batch(inputs, lengths or [1], new_tokens, parse_batch(asked))
