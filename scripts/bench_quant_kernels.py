"""Quantized linear layers against bf16 dense ones: the fused int8/int4 matmuls, and dequantize-then-GEMM.

Why this script exists: weight-only quantized matmuls are memory-bound at decode (M = 1), so they
should beat a bf16 matmul by reading 2-4x fewer bytes; whether they do depends on the kernel.
Per weight shape of the ~0.85B benchmark model (N x K = 5632x2048 up/gate, 2048x5632 down,
2048x2048 attention) and batch rows M this script times, in the same run:

* the peer: ``F.linear`` on the bf16 weight (cuBLAS on CUDA, oneDNN/MKL on the CPU);
* on the CPU at M = 1, the compiled matrix-vector loops decode runs by default (``kernels.cpu_gemv``:
  ``bf16_compiled_gemv``; ``int8ch_compiled_gemv`` on a ``cpu_int8`` per-channel weight, beside PyTorch's
  op on the same bytes, ``int8ch_op``);
* on the CPU, the ``cpu_int4`` pack: PyTorch's fused int4 op (int8 = two of them, ``quant_cpu``),
  torchao's da8w4 kernel where it is installed (``int4_da8w4``: x rounded to 8 bits, ``quant_torchao``;
  bytes = its packed copy) and the dequantize path (``dequantize_weight`` into a bf16 scratch weight, then ``F.linear``),
  which is what ``quant_linear`` switches to from ``CPU_DEQUANT_MIN_M`` rows;
* on CUDA, the ``plain`` pack: the Triton fused dequantize-matmul (``quant_matmul_fwd``) and the
  dequantize path (``dequantize_fwd`` + cuBLAS) at M = 1, 16, 64, 256 (``DEQUANT_MIN_M`` should be
  set from their crossover), plus the dequantize kernel alone against a device-to-device copy of
  the same bytes (read packed + qparams, write the bf16 weight), and each Triton result's error
  against fp32 math on the same weight (a wrong kernel shows here first).

Each row: best time, weight bytes read, GB/s of weight bytes, speed-up over the bf16 peer (its
time / this time). On the CPU each timed call runs over enough copies of the weight to defeat the
caches (like ``bench_common.matvec_gbps``); on CUDA, CUDA events after an L2 flush (``bench_kernels.Timer``).

    python scripts/bench_quant_kernels.py [--device cpu|cuda] [--ms 1,16] [--group-size 64]
        [--repeats N] [--threads N]

Prints one table per shape, then exactly one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))       # bench_common, bench_kernels
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the checkout's tierkv, installed or not
from bench_common import emit_json, print_table  # noqa: E402
from bench_kernels import Timer, _triton_version, device_name  # noqa: E402

SHAPES = ((5632, 2048), (2048, 5632), (2048, 2048))             # (N, K) of the ~0.85B model
DEFAULTS = {"cpu": ("1,16", 3), "cuda": ("1,16,64,256", 50)}     # rows M, repeats
CACHE_DEFEAT_BYTES = 192 << 20                                   # CPU: weight copies per timed call cover this
MAX_COPIES = 64                                                  # (the model's shapes need 9-30)


def _copies(device: str, nbytes: int) -> int:
    """Weight copies per timed call: together CACHE_DEFEAT_BYTES on the CPU (at most MAX_COPIES), one on CUDA."""
    return min(MAX_COPIES, max(1, -(-CACHE_DEFEAT_BYTES // nbytes))) if device == "cpu" else 1


def _timed(timer: Timer, fns: list[Callable[[], Any]]) -> float:
    """Best seconds of one call, each timed call running every fn once (one per weight copy)."""
    def run() -> None:
        for fn in fns:
            fn()
    return timer(run)["best_s"] / len(fns)


def _row(seconds: float, nbytes: int, peer_s: float | None) -> dict[str, Any]:
    row = {"best_s": seconds, "weight_bytes": nbytes, "gbps": nbytes / seconds / 1e9}
    if peer_s is not None:
        row["speedup_vs_bf16"] = peer_s / seconds
    return row


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _compiled_rows(w: torch.Tensor, peers: list[torch.Tensor], x: torch.Tensor, peer_s: float,
                   timer: Timer) -> dict[str, Any]:
    """M = 1 on the CPU: the compiled matrix-vector loops of ``kernels.cpu_gemv`` (bf16, and int8 per
    channel against PyTorch's int8 op on the same cpu_int8 bytes), what decode runs by default."""
    from tierkv.kernels import quant_cpu
    from tierkv.kernels.cpu_gemv import gemv, quant_gemv, quant_gemv_supported
    from tierkv.kernels.quant import quantize_weight
    from tierkv.quantspec import CHANNEL, QuantWeight, TensorQuant

    n, k = w.shape
    rows = {"bf16_compiled_gemv": _row(_timed(timer, [lambda p=p: gemv(p, x[0]) for p in peers]), n * k * 2, peer_s)}
    tq = TensorQuant("int8", CHANNEL, "cpu_int8")
    one = QuantWeight(*quantize_weight(w, tq), tq)
    qws = [QuantWeight(one.data.clone(), one.qparams.clone(), tq) for _ in range(_copies("cpu", one.nbytes))]
    if quant_gemv_supported(one, x.dtype):
        rows["int8ch_compiled_gemv"] = _row(_timed(timer, [lambda q=q: quant_gemv(q, x[0]) for q in qws]),
                                            one.nbytes, peer_s)
    rows["int8ch_op"] = _row(_timed(timer, [lambda q=q: quant_cpu.cpu_quant_matmul(x, q.data, q.qparams, 8, CHANNEL,
                                                                                  "cpu_int8") for q in qws]),
                             one.nbytes, peer_s)
    return rows


def bench_shape(n: int, k: int, ms: list[int], args: argparse.Namespace, timer: Timer) -> dict[str, Any]:
    """Every path at one (N, K) for each M."""
    from tierkv.kernels import quant_cpu
    from tierkv.kernels.quant import dequantize_fwd, dequantize_weight, quant_matmul_fwd, quantize_weight
    from tierkv.kernels.quant_torchao import da8w4_mm, da8w4_status, pack_da8w4
    from tierkv.quantspec import QuantWeight, TensorQuant

    dev, group = args.device, args.group_size
    w = (torch.randn(n, k, device=dev) * 0.02)
    wb = w.to(torch.bfloat16)
    peers = [wb.clone() for _ in range(_copies(dev, wb.numel() * 2))]
    pack = args.pack
    quants = {}
    for scheme in ("int8", "int4"):
        tq = TensorQuant(scheme, group, pack)
        data, qparams = quantize_weight(w, tq)
        one = QuantWeight(data.to(dev), qparams.to(dev), tq)
        quants[scheme] = [QuantWeight(one.data.clone(), one.qparams.clone(), tq)
                          for _ in range(_copies(dev, one.nbytes) if pack == "cpu_int4" else 1)]
    out: dict[str, Any] = {"n": n, "k": k, "by_m": {}}
    for m in ms:
        x = torch.randn(m, k, device=dev).to(torch.bfloat16)
        peer_s = _timed(timer, [lambda p=p: F.linear(x, p) for p in peers])
        rows = {"bf16_linear": _row(peer_s, n * k * 2, None)}
        for scheme, qws in quants.items():
            bits = qws[0].quant.bits
            if pack == "cpu_int4":
                fused = [lambda q=q: quant_cpu.cpu_quant_matmul(x, q.data, q.qparams, bits, group) for q in qws]
            else:
                y = torch.empty(m, n, dtype=x.dtype, device=dev)
                fused = [lambda q=q: quant_matmul_fwd(x, q.data, q.qparams, bits, group, None, y) for q in qws]
            deq = [lambda q=q: F.linear(x, dequantize_weight(q, torch.bfloat16)) for q in qws]
            rows[f"{scheme}_fused"] = _row(_timed(timer, fused), qws[0].nbytes, peer_s)
            rows[f"{scheme}_dequant_linear"] = _row(_timed(timer, deq), qws[0].nbytes, peer_s)
            if pack == "cpu_int4" and scheme == "int4" and da8w4_status() is None:   # torchao's CPU kernel here
                lins = [pack_da8w4((q,), keep=False) for q in qws]
                rows["int4_da8w4"] = _row(_timed(timer, [lambda lin=lin: da8w4_mm(x, lin) for lin in lins]),
                                          lins[0].extra_nbytes, peer_s)
            if pack == "plain":
                fused[0]()
                ref = F.linear(x.float(), dequantize_weight(qws[0], torch.bfloat16).float())
                rows[f"{scheme}_fused"]["max_rel_err_vs_fp32"] = _rel_err(y, ref)
        if m == 1 and dev == "cpu":
            rows.update(_compiled_rows(w, peers, x, peer_s, timer))
        out["by_m"][m] = rows
    if pack == "plain":
        out["dequant_kernel"] = {}
        for scheme, qws in quants.items():
            q = qws[0]
            scratch = torch.empty(n, k, dtype=torch.bfloat16, device=dev)
            moved = q.nbytes + scratch.numel() * 2
            seconds = timer(lambda: dequantize_fwd(q.data, q.qparams, q.quant.bits, group, scratch))["best_s"]
            copy = timer.copy_ceiling(moved)
            out["dequant_kernel"][scheme] = {"best_s": seconds, "bytes": moved, "gbps": moved / seconds / 1e9,
                                             "copy_gbps": copy["gbps"],
                                             "fraction_of_copy": moved / seconds / 1e9 / copy["gbps"]}
    return out


def print_report(results: list[dict[str, Any]], header: str) -> None:
    print(header)
    print()
    for res in results:
        rows = []
        for m, by_path in res["by_m"].items():
            for name, r in by_path.items():
                extra = f"  x{r['speedup_vs_bf16']:.2f} vs bf16" if "speedup_vs_bf16" in r else "  (peer)"
                if "max_rel_err_vs_fp32" in r:
                    extra += f"  err {r['max_rel_err_vs_fp32']:.1e}"
                rows.append((f"M={m} {name}", f"{r['best_s'] * 1e3:9.3f} ms  {r['weight_bytes'] / 1e6:7.2f} MB"
                                             f"  {r['gbps']:7.2f} GB/s{extra}"))
        for scheme, r in res.get("dequant_kernel", {}).items():
            rows.append((f"{scheme} dequantize kernel", f"{r['best_s'] * 1e3:9.3f} ms  {r['gbps']:7.1f} GB/s  "
                                                       f"copy {r['copy_gbps']:7.1f} GB/s ({r['fraction_of_copy']:.0%})"))
        print_table(f"N x K = {res['n']} x {res['k']}", rows)
        print()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ms", default=None, help="comma-separated batch rows M (default: per device)")
    ap.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--shapes", default=None, help="comma-separated NxK weight shapes (default: the ~0.85B model's)")
    ap.add_argument("--pack", choices=("cpu_int4", "plain"), default=None,
                    help="default: cpu_int4 on the CPU, plain on CUDA; plain on the CPU runs the Triton kernels "
                         "through the interpreter under TRITON_INTERPRET=1 (a dry run of the CUDA rows, small --shapes)")
    args = ap.parse_args()
    args.pack = args.pack or ("cpu_int4" if args.device == "cpu" else "plain")
    if args.pack == "cpu_int4" and args.device != "cpu":
        ap.error("the cpu_int4 pack computes on the CPU only")
    return args


def main() -> None:
    args = parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device")
        os.environ["TRITON_INTERPRET"] = "0"        # compiled kernels: read when tierkv.kernels.quant is imported
    if args.threads:
        torch.set_num_threads(args.threads)
    ms_default, repeats_default = DEFAULTS[args.device]
    ms = [int(m) for m in (args.ms or ms_default).split(",")]
    repeats = args.repeats or repeats_default
    timer = Timer(args.device, repeats)
    from tierkv.kernels import quant

    torch.manual_seed(0)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    results = [bench_shape(n, k, ms, args, timer) for n, k in shapes]
    name = device_name(args.device)
    print_report(results, f"quantized linear on {name}: bf16 inputs, groups of {args.group_size}, "
                          f"{torch.get_num_threads()} threads, {repeats} repeats, "
                          f"{'cpu_int4 pack (PyTorch op)' if args.pack == 'cpu_int4' else 'plain pack (Triton)'}")
    emit_json({
        "bench": "quant_kernels", "device": args.device, "device_name": name, "dtype": "bfloat16",
        "group_size": args.group_size, "threads": torch.get_num_threads(), "repeats": repeats, "ms": ms,
        "pack": args.pack,
        "cpu_layout": torch.backends.cpu.get_cpu_capability(),
        "thresholds": {"DEQUANT_MIN_M": quant.DEQUANT_MIN_M,
                       "CPU_DEQUANT_MIN_M": {str(k).removeprefix("torch."): v
                                             for k, v in quant.CPU_DEQUANT_MIN_M.items()}},
        "timing": "cuda events after an L2 flush" if args.device == "cuda" else
                  "best_of wall time over cache-defeating weight copies",
        "results": results, "torch": torch.__version__, "triton": _triton_version(),
        "seconds": time.perf_counter() - t0, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    })


if __name__ == "__main__":
    main()
