"""One decode token's RoPE + KV append + attention: the fused C++ call against torch's ops, interleaved.

Why this script exists: ``kernels.cpu_decode_attention`` replaces, per layer and token, the eager
RoPE, the cache append and ``model.decode_attention`` (torch's SDPA, G query rows per KV head) with
one C++ call (issue 14). This times both on one layer's bf16 cache of a model's attention geometry
at a few contexts, round by round in one process, and prints the medians.

    python scripts/bench_decode_attention.py [--contexts 16,2048] [--rounds 9] [--reps 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import emit_json, prefer_checkout, print_table  # noqa: E402

prefer_checkout(Path(__file__).resolve().parents[1])

GEOMETRY = {"135m": (9, 3, 64), "0.85b": (16, 4, 128)}       # (query heads, KV heads, head dim)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="16,2048")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tierkv.kernels.cpu_decode_attention import attend_kernel, run_attend_kernel
    from tierkv.kernels.norm_rope import rope_ref
    from tierkv.model import decode_attention

    rows, out = [], {}
    for model, (hq, hkv, d) in GEOMETRY.items():
        for ctx in (int(c) for c in args.contexts.split(",")):
            cap, pos = ctx + 64, ctx - 1
            k_cache, v_cache = torch.randn(hkv, cap, d).bfloat16(), torch.randn(hkv, cap, d).bfloat16()
            qkv = torch.randn((hq + 2 * hkv) * d).bfloat16()
            angles = torch.rand(d // 2) * 6.28
            cos = torch.cat((angles, angles)).cos().bfloat16()
            sin = torch.cat((-angles.sin(), angles.sin())).bfloat16()
            kernel = attend_kernel(hq, k_cache)
            assert kernel is not None and kernel.fn is not None, kernel

            def fused() -> None:
                run_attend_kernel(kernel, qkv, cos, sin, k_cache, v_cache, pos, hq)

            def eager() -> None:
                heads = qkv.view(hq + 2 * hkv, d)
                rot = rope_ref(heads[: hq + hkv], cos, sin)                     # (Hq + Hkv, D)
                k_cache[:, pos] = rot[hq:]
                v_cache[:, pos] = heads[hq + hkv:]
                decode_attention(rot[None, :hq, None], k_cache[None, :, : pos + 1], v_cache[None, :, : pos + 1])

            times: dict[str, list[float]] = {"fused": [], "torch": []}
            for name, fn in (("fused", fused), ("torch", eager)):
                fn()
            for _ in range(args.rounds):
                for name, fn in (("fused", fused), ("torch", eager)):
                    t0 = time.perf_counter()
                    for _ in range(args.reps):
                        fn()
                    times[name].append((time.perf_counter() - t0) / args.reps)
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            best = {k: min(v) for k, v in times.items()}
            rows.append((f"{model} {hq}/{hkv}x{d}, context {ctx}",
                         f"fused {med['fused'] * 1e6:8.1f} us, torch {med['torch'] * 1e6:8.1f} us "
                         f"({med['torch'] / med['fused']:.2f}x); best {best['fused'] * 1e6:8.1f} / "
                         f"{best['torch'] * 1e6:8.1f} us ({best['torch'] / best['fused']:.2f}x)"))
            out[f"{model}@{ctx}"] = {"median_us": {k: round(v * 1e6, 2) for k, v in med.items()},
                                     "best_us": {k: round(v * 1e6, 2) for k, v in best.items()}}
    print_table(f"one layer's decode attention (RoPE + KV append + attention), bf16, {args.threads} threads, "
                f"{args.rounds} interleaved rounds of {args.reps}", rows)
    emit_json({"bench": "decode_attention", "threads": args.threads, "rounds": args.rounds, "reps": args.reps, "runs": out})


if __name__ == "__main__":
    main()
