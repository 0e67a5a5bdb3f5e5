"""The fused decode kernels' rows loop, fp32 FMAs against bf16 dot products, interleaved in one process.

Why this script exists: ``kernels.cpu_decode`` has two loops for a bf16 product (issue 14): fp32 FMAs
over widened rows, and AVX512-BF16 dot products over R rows per step. This times one token's products
of a model shape as the fused decode path calls them (q/k/v with the input norm, o with the residual,
gate/up with the norm, down with SiLU x up and the residual, then the head with the final norm) over
distinct weights per layer, each variant (loop, rows per step) in turn, round by round; the median
per variant and its rate over the weights' bytes. A variant ending in ``@huge`` reads a copy of the
weights on transparent huge pages (``io.buffers.into_huge_pages``, as a resident CPU model holds them);
the others read them where ``torch.randn`` put them (4 KiB pages where THP is "madvise").

    python scripts/bench_decode_dot.py [--shape 135m|0.85b] [--variants fma,dot8-nopf,dot8,dot8@huge] [--rounds 7]
        [--reps 5] [--no-head] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import BENCH_MODEL, SMALL_MODEL, emit_json, prefer_checkout, print_table  # noqa: E402

prefer_checkout(Path(__file__).resolve().parents[1])

SHAPES = {"135m": SMALL_MODEL, "0.85b": BENCH_MODEL}


def _products(shape: dict[str, int], head: bool) -> list[tuple[int, int, str, bool]]:
    """One token's (N, K, prologue, residual) per product, in the fused path's order."""
    h, inter, d = shape["hidden_size"], shape["intermediate_size"], shape["hidden_size"] // shape["num_attention_heads"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * d
    layer = [(qkv, h, "rmsnorm", False), (h, h, "none", True), (2 * inter, h, "rmsnorm", False),
             (h, inter, "swiglu", True)]
    return layer * shape["num_hidden_layers"] + ([(shape["vocab_size"], h, "rmsnorm", False)] if head else [])


def _variant(name: str) -> tuple[str, int, bool]:
    """"fma" -> ("fma", 1, False); "dotR" -> ("dot", R, True); "dotR-nopf" -> ("dot", R, False): no software
    prefetch (an "@huge" suffix names the weights' memory, not the loop)."""
    name = name.removesuffix("@huge")
    if name == "fma":
        return "fma", 1, False
    return "dot", int(name[3:].removesuffix("-nopf") or 8), not name.endswith("-nopf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    ap.add_argument("--variants", default="fma,dot8-nopf,dot8,dot8@huge")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=5, help="tokens per variant per round")
    ap.add_argument("--no-head", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tierkv.kernels.cpu_decode import decode_kernel, run_decode_kernel

    products = _products(SHAPES[args.shape], not args.no_head)
    torch.manual_seed(0)
    weights = [torch.randn(n, k).mul_(0.05).bfloat16() for n, k, _, _ in products]
    vecs = {k: torch.randn(k).bfloat16() for _, k, _, _ in products}
    gates = {k: torch.randn(2 * k).bfloat16() for _, k, p, _ in products if p == "swiglu"}
    norms = {k: torch.rand(k).add_(0.5).bfloat16() for _, k, _, _ in products}
    res = {n: torch.randn(n).bfloat16() for n, _, _, r in products if r}
    names = args.variants.split(",")
    if any(v.endswith("@huge") for v in names):
        from tierkv.io.buffers import into_huge_pages
        huge = into_huge_pages({str(i): w for i, w in enumerate(weights)})
        huge_weights = [huge[str(i)] for i in range(len(weights))]
    memory = {v: huge_weights if v.endswith("@huge") else weights for v in names}
    kernels = {v: [decode_kernel(w, p, False, r, *_variant(v)) for w, (_, _, p, r) in zip(memory[v], products)]
               for v in names}
    outs: dict[str, list[torch.Tensor]] = {}

    def token(v: str) -> None:
        outs[v] = [run_decode_kernel(kern, w, gates[k] if p == "swiglu" else vecs[k], norms[k] if p == "rmsnorm" else None,
                                     1e-5, None, res[n] if r else None)
                   for kern, w, (n, k, p, r) in zip(kernels[v], memory[v], products)]

    times: dict[str, list[float]] = {v: [] for v in names}
    for v in names:
        token(v)                                                  # warm-up
    for _ in range(args.rounds):
        for v in names:
            t0 = time.perf_counter()
            for _ in range(args.reps):
                token(v)
            times[v].append((time.perf_counter() - t0) / args.reps)
    nbytes = sum(w.numel() * 2 for w in weights)
    med = {v: sorted(t)[len(t) // 2] for v, t in times.items()}
    best = {v: min(t) for v, t in times.items()}          # the least disturbed round on a shared machine
    base = names[0]
    diff = {v: max((a.float() - b.float()).abs().max().item() for a, b in zip(outs[v], outs[base])) for v in names}
    print_table(f"{args.shape} products of one token ({len(products)} calls, {nbytes / 1e6:.0f} MB bf16), "
                f"{args.threads} threads, {args.rounds} interleaved rounds of {args.reps}",
                [(v, f"median {med[v] * 1e3:7.3f} ms/token = {nbytes / med[v] / 1e9:5.1f} GB/s "
                     f"({med[base] / med[v]:.2f}x {base}); best {best[v] * 1e3:7.3f} ms = "
                     f"{nbytes / best[v] / 1e9:5.1f} GB/s ({best[base] / best[v]:.2f}x); max |diff| vs {base} "
                     f"{diff[v]:.3g}") for v in names])
    emit_json({"bench": "decode_dot", "shape": args.shape, "threads": args.threads, "head": not args.no_head,
               "rounds": args.rounds, "reps": args.reps, "bytes": nbytes,
               "median_ms": {v: round(m * 1e3, 3) for v, m in med.items()},
               "best_ms": {v: round(m * 1e3, 3) for v, m in best.items()},
               "gb_s": {v: round(nbytes / m / 1e9, 2) for v, m in med.items()}})


if __name__ == "__main__":
    main()
