"""Few-row products (a decode batch: M rows through each weight) on the CPU: which op reads the weight fastest.

Why this script exists: ``dense_linear``'s "auto" rows for the few-row kernel (``MGEMV_AUTO_ROWS``) must come
from measurements on the CPU at hand, with the weights streaming from memory (not the last-level cache), the
ops interleaved round by round in one process (the machine is noisy). Per (dtype, weight shape, M) it times:

* ``mv``: ``torch.mv(w, x)`` (M = 1 only);
* ``linear``: ``F.linear(x, w)`` (oneDNN; AMX on CPUs that have it);
* ``mm_t``: ``torch.mm(w, x^T)^T``;
* one row per variant of ``kernels.cpu_mgemv`` that builds here ("bf16_dot", "amx", "fma").

Each timing cycles through enough distinct weights to total ``--mbytes`` MB (default 640), so every call reads
its weight from memory; the best and the median over ``--rounds`` rounds of the mean time per call, as GB/s of
weight bytes (on a shared 2-core machine another process's burst stalls a 2-thread op at its barrier: the best
round is the op's own speed, the median what a busy machine gives).

    python scripts/bench_mgemv.py [--threads 2] [--rows 1,2,3,4,6,8,12,16,24,32] [--dtypes bfloat16,float16]
        [--shapes 5632x2048,2048x5632,2048x2048] [--mbytes 640] [--rounds 5]

        [--pick best|median]

Prints a table per dtype and shape (GB/s; the fastest op per M marked), then exactly one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from tierkv.kernels import cpu_mgemv


def _ops(dtype: torch.dtype, m: int, probe: torch.Tensor) -> dict[str, Callable[[torch.Tensor, torch.Tensor], object]]:
    ops: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {}
    if m == 1:
        ops["mv"] = lambda w, x: torch.mv(w, x[0])
    ops["linear"] = lambda w, x: F.linear(x, w)
    ops["mm_t"] = lambda w, x: torch.mm(w, x.t()).t().contiguous()
    for variant in cpu_mgemv.VARIANTS:
        kernel = cpu_mgemv.mgemv_kernel(probe, variant)
        if kernel is not None and kernel.fn is not None and m <= cpu_mgemv.MGEMV_MAX_M:
            ops[variant] = lambda w, x, kernel=kernel: cpu_mgemv.run_mgemv(kernel, w, x)
    return ops


def _time(op: Callable[[torch.Tensor, torch.Tensor], object], weights: list[torch.Tensor], x: torch.Tensor) -> float:
    op(weights[0], x)
    t0 = time.perf_counter()
    for w in weights:
        op(w, x)
    return (time.perf_counter() - t0) / len(weights)


def measure(dtype: torch.dtype, shape: tuple[int, int], rows: list[int], mbytes: float,
            rounds: int, pick: Callable[[list[float]], float]) -> dict[int, dict[str, float]]:
    """{M: {op: GB/s of weight bytes}} for ``dtype`` weights of ``shape`` (N, K), ``pick`` choosing each op's
    time per call from its rounds'."""
    n, k = shape
    count = max(4, int(mbytes * 1e6 / (n * k * 2)) + 1)
    weights = [torch.randn(n, k).to(dtype) for _ in range(count)]                    # count x (N, K)
    samples: dict[int, dict[str, list[float]]] = {m: {} for m in rows}
    for _ in range(rounds):
        for m in rows:
            x = torch.randn(m, k).to(dtype)                                             # (M, K)
            for name, op in _ops(dtype, m, weights[0]).items():
                samples[m].setdefault(name, []).append(_time(op, weights, x))
    return {m: {name: n * k * 2 / pick(ts) / 1e9 for name, ts in ops.items()} for m, ops in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,2,3,4,6,8,12,16,24,32")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--shapes", default="5632x2048,2048x5632,2048x2048")
    parser.add_argument("--mbytes", type=float, default=640.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pick", choices=("best", "median"), default="best")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    result: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        result[name] = {}
        for shape in shapes:
            pick = min if args.pick == "best" else statistics.median
            table = measure(dtype, shape, rows, args.mbytes, args.rounds, pick)
            result[name][f"{shape[0]}x{shape[1]}"] = table
            print(f"\n{name} {shape[0]}x{shape[1]}: GB/s of weight bytes ({args.pick} of {args.rounds} rounds)")
            names = sorted({op for ops in table.values() for op in ops})
            print("    M " + "".join(f"{op:>10}" for op in names))
            for m, ops in table.items():
                best = max(ops, key=ops.get)
                cells = "".join(f"{ops[op]:9.1f}{'*' if op == best else ' '}" if op in ops else f"{'-':>10}"
                                for op in names)
                print(f"{m:5d} {cells}")
    print(json.dumps({"bench": "mgemv", "threads": args.threads, "pick": args.pick, "gbps": result,
                      "cpu_flags": sorted(cpu_mgemv.kernel_cpu_flags())}))


if __name__ == "__main__":
    main()
