"""Resident decode of several schemes and CPU paths in one process, timed in turns: ratios on a busy machine.

Why this script exists: ``bench_quant.py --parts resident`` runs each contender in its own process
one after another, so when other jobs share the 2 cores its ratios measure the load as much as the
schemes (a bf16 run under a compile job, int4 after it ended). Here every contender is loaded into
one process (~8 GB for the default list on the ~0.85B model) and timed round-robin, each keeping
its best (N minus 1)-token decode over ``--rounds`` rounds: a disturbance hits all contenders alike
and the minimum drops it. Contenders are ``bench_quant`` scheme entries with their "@variant"
suffixes (``@nofuse``: q/k/v and gate/up separate, how tierkv computed before fusion;
``@dynamic``: dynamic int8 activations for per-channel int8), on ``bench_common``'s random Llama.

    python scripts/bench_quant_interleaved.py [--schemes bf16@nofuse,bf16,int8:channel,...]
        [--threads 2] [--rounds 6] [--tokens 17]

Prints tok/s per contender and the ratios over the first one and over "bf16", then one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quant as bq  # noqa: E402  (bench_weights puts the checkout's tierkv on sys.path)
from bench_common import bench_model_dir, emit_json, print_table  # noqa: E402

DEFAULT = "bf16@nofuse,bf16,int8:channel@nofuse,int8:channel,int8:channel@dynamic,int4@nofuse,int4"


def load_contender(model_dir: Path, label: str) -> Any:
    """A resident engine for one scheme entry, its variant's environment set while it loads (the
    layers are prepared then; the environment is restored after)."""
    import tierkv

    _, env = bq.split_variant(label)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return tierkv.load(model_dir, dtype="bfloat16", device="cpu", **bq.load_kwargs(label, 64))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def decode_s(engine: Any, ids: list[int], tokens: int) -> float:
    """Seconds per decode token: (generate ``tokens`` - generate 1) / (tokens - 1), greedy, EOS ignored."""
    t = time.perf_counter()
    engine.generate(ids, max_new_tokens=1, ignore_eos=True)
    one = time.perf_counter() - t
    t = time.perf_counter()
    engine.generate(ids, max_new_tokens=tokens, ignore_eos=True)
    return (time.perf_counter() - t - one) / (tokens - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schemes", default=DEFAULT, help="comma list of bench_quant scheme entries (with @variants)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=17)
    ap.add_argument("--model-root", type=Path, default=Path(tempfile.gettempdir()) / "tierkv-bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = bench_model_dir(args.model_root, 16)
    ids = torch.randint(3, 32000, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    labels = args.schemes.split(",")
    engines = {label: load_contender(model_dir, label) for label in labels}
    for engine in engines.values():
        engine.generate(ids, max_new_tokens=2, ignore_eos=True)           # warm-up
    load_start, best = os.getloadavg()[0], {label: float("inf") for label in labels}
    for _ in range(args.rounds):
        for label, engine in engines.items():
            best[label] = min(best[label], decode_s(engine, ids, args.tokens))
    tok = {label: 1.0 / s for label, s in best.items()}
    first = labels[0]
    rows = [(label, f"{v:.2f} tok/s = {v / tok[first]:.2f}x {first}"
             + (f", {v / tok['bf16']:.2f}x bf16" if "bf16" in tok and first != "bf16" else ""))
            for label, v in tok.items()]
    print_table(f"resident decode, interleaved, {args.threads} threads, best of {args.rounds} rounds of "
                f"{args.tokens} tokens, load avg {load_start:.1f} -> {os.getloadavg()[0]:.1f}", rows)
    emit_json({"bench": "quant_interleaved", "threads": args.threads, "rounds": args.rounds, "tokens": args.tokens,
               "tok_s": {k: round(v, 3) for k, v in tok.items()},
               "vs_first": {k: round(v / tok[first], 3) for k, v in tok.items()},
               "load_avg": [load_start, os.getloadavg()[0]]})


if __name__ == "__main__":
    main()
