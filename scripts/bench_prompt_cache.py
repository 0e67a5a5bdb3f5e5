"""Second-turn prefill with and without the prompt cache (``cache_prompt=True``).

Why this script exists: the prompt cache's point is that a chat's second turn prefills only its new
tokens. For each repetition a first turn (``--prompt-tokens`` random ids, ``--new-tokens`` greedy
reply, cache_prompt=True) is followed by the second turn (first prompt + reply + ``--turn-tokens``
new ids) three ways, all in this process on one engine:

* uncached: cache_prompt=False, the whole history prefilled (the peer);
* cached: cache_prompt=True, only the new tokens prefilled (the entry of the first turn is reused);
* floor: a fresh prompt of just the new tokens' length (cache_prompt=False): what prefilling those
  tokens costs with no history at all, the ceiling the cached turn can approach.

Prefill times are the engine's own ``stats.prefill_s`` (to the first sampled token); the table gives
medians over ``--repeats`` and in how many repeats the cached turn's tokens equal the uncached ones
(always, in fp32; in bf16 a near-tie can flip, as the prefix's KV was computed in other shapes).

    python scripts/bench_prompt_cache.py [--model demo | --random-model] [--prompt-tokens 200]
        [--new-tokens 16] [--turn-tokens 16] [--repeats 5] [--dtype float32] [--threads 2]

``--random-model`` builds (once, under --model-root) a random bf16 Llama (hidden 1024, 12 layers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bench_common import bench_model_dir, emit_json, print_table  # noqa: E402

RANDOM_MODEL = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                    intermediate_size=2816, vocab_size=32000, max_position_embeddings=4096)


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def measure(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    vocab = engine.config.vocab_size
    reply = dict(max_new_tokens=args.new_tokens, ignore_eos=True)
    one = dict(max_new_tokens=1, ignore_eos=True)
    engine.generate(_ids(args.prompt_tokens, 999, vocab), **one)            # warm-up
    rows: dict[str, list[float]] = {"uncached": [], "cached": [], "floor": []}
    same, cached_tokens = 0, 0
    for r in range(args.repeats):
        first = _ids(args.prompt_tokens, r, vocab)
        out = engine.generate(first, cache_prompt=True, **reply)
        second = first + out.token_ids + _ids(args.turn_tokens, 1000 + r, vocab)
        plain = engine.generate(second, **reply)
        hit = engine.generate(second, cache_prompt=True, **reply)
        floor = engine.generate(_ids(args.turn_tokens + 1, 2000 + r, vocab), **one)
        same += plain.token_ids == hit.token_ids
        cached_tokens = hit.stats.cached_prompt_tokens
        rows["uncached"].append(plain.stats.prefill_s)
        rows["cached"].append(hit.stats.prefill_s)
        rows["floor"].append(floor.stats.prefill_s)
    med = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
    return {"second_turn_tokens": len(second), "cached_prompt_tokens": cached_tokens,
            "prefilled_tokens_cached": len(second) - cached_tokens, "uncached_prefill_ms": round(med["uncached"], 2),
            "cached_prefill_ms": round(med["cached"], 2), "floor_prefill_ms": round(med["floor"], 2),
            "speedup": round(med["uncached"] / med["cached"], 2), "same_tokens_repeats": same,
            "cache": engine.prompt_cache_stats()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--random-model", action="store_true", help="a random bf16 Llama, hidden 1024, 12 layers")
    ap.add_argument("--model-root", type=Path, default=Path(tempfile.gettempdir()) / "tierkv-bench-models")
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--turn-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import tierkv

    model = bench_model_dir(args.model_root, shape=RANDOM_MODEL) if args.random_model else args.model
    with tierkv.load(model, device=args.device, dtype=args.dtype) as engine:
        got = measure(engine, args)
        name = "random-h1024-l12" if args.random_model else str(args.model)
        got.update(model=name, dtype=str(engine.dtype).removeprefix("torch."), device=args.device,
                   threads=args.threads, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                   turn_tokens=args.turn_tokens, repeats=args.repeats)
    print_table(f"second-turn prefill, {got['model']} {got['dtype']} ({got['second_turn_tokens']} tokens)", [
        ("uncached (whole history)", f"{got['uncached_prefill_ms']:.1f} ms"),
        ("cached (cache_prompt=True)", f"{got['cached_prefill_ms']:.1f} ms  ({got['prefilled_tokens_cached']} "
                                       f"tokens prefilled, {got['cached_prompt_tokens']} reused)"),
        ("floor (new tokens alone)", f"{got['floor_prefill_ms']:.1f} ms"),
        ("speed-up", f"{got['speedup']:.2f}x"),
        ("same tokens as uncached", f"{got['same_tokens_repeats']} of {got['repeats']} repeats")])
    emit_json({"bench": "prompt_cache", **got})


if __name__ == "__main__":
    main()
