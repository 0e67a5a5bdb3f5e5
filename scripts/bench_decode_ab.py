"""Resident decode with a path's environment variable on and off, interleaved in one process: the A/B.

Why this script exists: on this project's shared 2-core CPU a process's speed varies by ~25% from
one process to the next, so a change to the decode step is measured inside one process, one engine,
the configurations alternating round by round (the ``TIERKV_*`` path variables are read per call).
Default: ``TIERKV_CPU_FUSED_DECODE`` "off" (the eager ops around each compiled product) against
"auto" (``kernels.decode_fusion``'s C++ calls), greedy tokens compared between the two.
``--batches 1,4,16``: ragged batches instead (``bench_ragged``'s prompts, 16-160 tokens), decode tok/s of
each (tokens after each sequence's first over the union of their decode intervals), per batch size and
value, interleaved the same way (e.g. ``--var TIERKV_CPU_MGEMV --values off,auto``: the few-row kernel).

    python scripts/bench_decode_ab.py [--shape small|bench] [--var TIERKV_CPU_FUSED_DECODE] [--values off,auto]
        [--rounds 6] [--new-tokens 17] [--prompt-len 16] [--batches 1,4,16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SHAPES, bench_model_dir, emit_json, prefer_checkout, print_table  # noqa: E402

prefer_checkout(Path(__file__).resolve().parents[1])


def _steps(engine: object, ids: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
    """Seconds of each decode step (the gaps after the first token) and the tokens of one greedy run."""
    stamps, tokens = [], []
    for piece in engine.stream(ids, max_new_tokens=new_tokens, ignore_eos=True):     # type: ignore[attr-defined]
        stamps.append(time.perf_counter())
        tokens.append(piece)
    return [b - a for a, b in zip(stamps[1:], stamps[2:])], tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--var", default="TIERKV_CPU_FUSED_DECODE")
    ap.add_argument("--values", default="off,auto")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=17)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-root", type=Path, default=Path(tempfile.gettempdir()) / "tierkv-bench")
    ap.add_argument("--batches", default=None, help="ragged batch sizes, e.g. 1,4,16 (default: one sequence)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.batches:
        batches_ab(args)
        return
    import tierkv

    model_dir = bench_model_dir(args.model_root, shape=SHAPES[args.shape])
    ids = torch.randint(3, 32000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    values = args.values.split(",")
    engine = tierkv.load(model_dir, dtype="bfloat16")
    steps: dict[str, list[float]] = {v: [] for v in values}
    tokens: dict[str, list[object]] = {}
    for value in values:                                          # warm-up: kernel builds, caches
        os.environ[args.var] = value
        _steps(engine, ids, 3)
    for _ in range(args.rounds):
        for value in values:
            os.environ[args.var] = value
            got, toks = _steps(engine, ids, args.new_tokens)
            steps[value] += got
            tokens[value] = toks
    engine.close()
    med = {v: sorted(s)[len(s) // 2] for v, s in steps.items()}
    best = {v: min(s) for v, s in steps.items()}
    base = values[0]
    print_table(f"resident bf16 decode, {args.shape} model, {args.threads} threads, prompt {args.prompt_len}, "
                f"{args.rounds} interleaved rounds of {args.new_tokens} tokens, ${args.var}",
                [(f"{v}", f"median {med[v] * 1e3:6.2f} ms/token = {1 / med[v]:5.1f} tok/s ({med[base] / med[v]:.2f}x "
                      f"{base}); best {best[v] * 1e3:6.2f} ms") for v in values]
                + [("same tokens", str(all(tokens[v] == tokens[base] for v in values)))])
    emit_json({"bench": "decode_ab", "shape": args.shape, "var": args.var, "threads": args.threads,
               "prompt_len": args.prompt_len, "rounds": args.rounds, "new_tokens": args.new_tokens,
               "median_ms": {v: round(m * 1e3, 3) for v, m in med.items()},
               "tok_s": {v: round(1 / m, 2) for v, m in med.items()},
               "same_tokens": all(tokens[v] == tokens[base] for v in values)})


def batches_ab(args: argparse.Namespace) -> None:
    """``--batches``: per batch size the median decode tok/s of each value over interleaved rounds."""
    import tierkv
    from bench_ragged import decode_run, prompts_for

    model_dir = bench_model_dir(args.model_root, shape=SHAPES[args.shape])
    values, sizes = args.values.split(","), [int(b) for b in args.batches.split(",")]
    engine = tierkv.load(model_dir, dtype="bfloat16", kv="exact")
    runs: dict[tuple[int, str], list[float]] = {(b, v): [] for b in sizes for v in values}
    tokens: dict[tuple[int, str], list[list[int]]] = {}
    for value in values:                                          # warm-up: kernel builds, caches
        os.environ[args.var] = value
        for b in sizes:
            engine.generate(prompts_for(b), max_new_tokens=3, ignore_eos=True)
    for _ in range(args.rounds):
        for b in sizes:
            for value in values:
                os.environ[args.var] = value
                runs[b, value].append(decode_run(engine, prompts_for(b), args.new_tokens)["tok_s"])
                tokens[b, value] = [o.token_ids for o in engine.generate(prompts_for(b), max_new_tokens=4,
                                                                          ignore_eos=True)]
    engine.close()
    med = {key: sorted(r)[len(r) // 2] for key, r in runs.items()}
    base = values[0]
    same = {b: all(tokens[b, v] == tokens[b, base] for v in values) for b in sizes}
    print_table(f"resident bf16 ragged decode, {args.shape} model, {args.threads} threads, {args.rounds} "
                f"interleaved rounds of {args.new_tokens} tokens per sequence, ${args.var}",
                [(f"batch {b} {v}", f"median {med[b, v]:7.1f} tok/s ({med[b, v] / med[b, base]:.2f}x {base}; "
                  f"{med[b, v] / med[1, v]:.2f}x batch 1)" if 1 in sizes else f"median {med[b, v]:7.1f} tok/s")
                 for b in sizes for v in values] + [("same tokens (4 per row)", str(same))])
    emit_json({"bench": "decode_ab_batches", "shape": args.shape, "var": args.var, "threads": args.threads,
               "rounds": args.rounds, "new_tokens": args.new_tokens, "batches": sizes,
               "tok_s": {f"{b}/{v}": round(m, 2) for (b, v), m in med.items()}, "same_tokens": same})


if __name__ == "__main__":
    main()
