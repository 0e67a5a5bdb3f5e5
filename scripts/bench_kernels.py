"""Per-step cost of the KV kernels against a same-sized device copy and against dense decode attention.

Why this script exists: the sparse KV path pays, per layer and decode step, for scoring every chunk
(``chunk_scores``, with or without the 2-bit key sketch), picking chunks (``select_chunks``) and
attending over them (``sparse_decode_attention``); prefill and the open chunk pay for the abstracts
(``chunk_abstract``, ``abstract_append``). Each kernel streams memory, so its speed only means
something against the bandwidth the same device reaches in the same run. Per kernel and geometry
this script reports:

* time: CUDA events around each call, the L2 cache flushed before it (device time; the wrapper's
  host overhead hides behind the flush, as it would behind earlier work in an enqueued step);
  best and median of ``--repeats``. On the CPU, ``best_of`` wall time with the caches as the
  previous repeat left them (the same for the copy it is compared with);
* the bytes it must read + write (formula per kernel in ``kernel_specs``: the inputs read once,
  outputs written once; scratch such as attention's split partials not counted), and GB/s;
* the ceiling: ``dst.copy_(src)`` of a uint8 tensor of half those bytes (so the copy moves the
  same bytes), timed the same way on the same device, and the kernel's share of its GB/s;
* the peer: dense decode attention over the whole context (PyTorch SDPA, ``enable_gqa``), and each
  kernel's time as a share of it; beside it ``dense_matmul``, the same attention as two grouped
  matmuls (on the 2-core CPU machine ~3.5x faster than SDPA's fp32 decode path, so the stronger
  peer there). The "sparse step" row adds scores + selection + sparse attention, the per-layer
  cost of a sparse decode step once the chunks are on the device, with the scoring the runtime
  uses by default (``Policy.kv_sketch`` None: the sketch on CUDA, the min/max bound on the CPU).

Geometry: Llama-3-8B-like, 8 KV heads x 4 query heads, D=128, batch ``--batch`` (1), chunks of
16 and 64 tokens, budget 5% of the context (sink 1 chunk, recent window 1 chunk, the table trimmed
to sink + 2 + budget // S entries as ``tierkv.pipeline.kv`` does). Random keys with a few wide
channels, so selection and attention are those of flat attention (the timing does not depend on
it). A context that would not fit the device's free memory is skipped and listed.

On CUDA the compiled Triton kernels run (bf16; TRITON_INTERPRET is forced to 0); on the CPU the
torch references, which are the production CPU path (fp32, as ``bench_kv.py`` uses on CPU).

    python scripts/bench_kernels.py [--device cuda|cpu] [--contexts 8192,32768,131072] [--repeats N]
        [--threads N] [--chunks 16,64] [--batch 1] [--dtype bfloat16|float32]

Prints one table per (context, chunk size), then exactly one JSON line.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))       # bench_common
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the checkout's tierkv, installed or not
from bench_common import best_of, emit_json, print_table  # noqa: E402

KV_HEADS, GROUP, HEAD_DIM = 8, 4, 128
BUDGET = 0.05
SINK_CHUNKS = 1
DEFAULTS = {  # contexts, repeats, dtype per device
    "cuda": ("8192,32768,131072", 50, "bfloat16"),
    "cpu": ("8192,32768", 5, "float32"),
}
FLUSH_BYTES = 256 << 20  # > 2x the L2 cache of an H100/H200 (50 / 60 MB)
ENCODE_BLOCK = 256       # chunks encoded at once when building the sketch (bounds fp32 temporaries)


# ---------------------------------------------------------------------------------------------
# timing


class Timer:
    """Times one callable on one device: CUDA events after an L2 flush, or best-of wall time on the CPU."""

    def __init__(self, device: str, repeats: int) -> None:
        self.device, self.repeats = device, repeats
        self._flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if device == "cuda" else None

    def __call__(self, fn: Callable[[], Any]) -> dict[str, float]:
        """{"best_s", "median_s"} of ``fn`` after one untimed warm-up call (compilation, allocation)."""
        fn()
        if self.device != "cuda":
            return {"best_s": best_of(fn, self.repeats), "median_s": None}
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.repeats)]
        for start, end in events:
            self._flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
        return {"best_s": min(times), "median_s": statistics.median(times)}

    def copy_ceiling(self, moved_bytes: int) -> dict[str, float]:
        """Time and GB/s of ``dst.copy_(src)`` moving ``moved_bytes`` (half read, half written) on this device."""
        n = max(1, moved_bytes // 2)
        src = torch.empty(n, dtype=torch.uint8, device=self.device).random_(0, 256)
        dst = torch.empty_like(src)
        timing = self(lambda: dst.copy_(src))
        return {**timing, "gbps": 2 * n / timing["best_s"] / 1e9}


# ---------------------------------------------------------------------------------------------
# inputs


@dataclass
class Geometry:
    """One benchmark point: B sequences of T tokens in chunks of S, Hkv x G heads of dim D."""

    B: int
    T: int
    S: int
    dtype: torch.dtype
    device: str
    Hkv: int = KV_HEADS
    G: int = GROUP
    D: int = HEAD_DIM

    @property
    def C(self) -> int:
        """Chunks per sequence (the last one partial when S does not divide T)."""
        return math.ceil(self.T / self.S)

    @property
    def budget(self) -> int:
        """Tokens attended per (sequence, KV head), forced chunks included."""
        return max(1, int(BUDGET * self.T))

    @property
    def elem(self) -> int:
        """Bytes per element of q, K and V."""
        return torch.finfo(self.dtype).bits // 8

    def kv_bytes(self) -> int:
        """Bytes of one of K or V over the context."""
        return self.B * self.Hkv * self.T * self.D * self.elem


def needed_bytes(geo: Geometry) -> int:
    """Rough peak memory of ``make_inputs``: K, V and their slot pools, fp32 sketch temporaries, flush buffer."""
    fp32_block = geo.B * geo.Hkv * min(geo.C, ENCODE_BLOCK) * geo.S * geo.D * 4
    return 4 * geo.kv_bytes() + 4 * fp32_block + FLUSH_BYTES + (256 << 20)


def free_bytes(device: str) -> int:
    """Memory this process can still allocate on ``device``."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def encode_sketch(keys: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """2-bit codes (B, Hkv, C, S, P) of every chunk, encoded in blocks of chunks to bound the fp32 temporaries."""
    from tierkv.kernels import encode_keys

    slotted = F.pad(keys, (0, 0, 0, geo.C * geo.S - geo.T)).view(geo.B, geo.Hkv, geo.C, geo.S, geo.D)
    blocks = [encode_keys(slotted[:, :, c:c + ENCODE_BLOCK], kmin[:, :, c:c + ENCODE_BLOCK],
                          kmax[:, :, c:c + ENCODE_BLOCK]) for c in range(0, geo.C, ENCODE_BLOCK)]
    return torch.cat(blocks, dim=2)


def slot_pool(x: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """(B, Hkv, T, D) -> contiguous slot pool (B*C, Hkv, S, D), chunk c of sequence b in slot b*C + c."""
    padded = F.pad(x, (0, 0, 0, geo.C * geo.S - geo.T)).view(geo.B, geo.Hkv, geo.C, geo.S, geo.D)
    return padded.transpose(1, 2).reshape(geo.B * geo.C, geo.Hkv, geo.S, geo.D).contiguous()


def make_inputs(geo: Geometry, backend: str) -> dict[str, Any]:
    """Every tensor the kernels read, with abstracts, sketch and a 5%-budget selection computed by ``backend``."""
    from tierkv.kernels import KeySketch, chunk_abstract, chunk_scores, select_chunks

    gen = torch.Generator(device=geo.device).manual_seed(geo.T + geo.S)
    dev, B, H, D = geo.device, geo.B, geo.Hkv, geo.D
    keys = torch.randn(B, H, geo.T, D, device=dev, generator=gen)
    keys[..., : D // 16] *= 4.0                                     # a few wide channels, as post-RoPE keys
    keys = keys.to(geo.dtype)
    values = torch.randn(B, H, geo.T, D, device=dev, generator=gen).to(geo.dtype)
    q = torch.randn(B, H * geo.G, D, device=dev, generator=gen).to(geo.dtype)
    sizes = torch.full((geo.C,), geo.S, dtype=torch.int32, device=dev)
    sizes[-1] = geo.T - (geo.C - 1) * geo.S
    starts = (torch.arange(geo.C, device=dev, dtype=torch.int32) * geo.S).contiguous()
    kmin, kmax = chunk_abstract(keys, starts, backend=backend)
    sketch = KeySketch(encode_sketch(keys, kmin, kmax, geo), sizes, geo.C - 1)  # the open chunk is not coded
    select_args = dict(budget_tokens=geo.budget, sink_chunks=SINK_CHUNKS, recent_tokens=geo.S)
    scores = chunk_scores(q, kmin, kmax, sketch=sketch, backend=backend)
    sel = select_chunks(scores, sizes, backend=backend, **select_args)
    width = min(geo.C, SINK_CHUNKS + 2 + geo.budget // geo.S)
    slots = (torch.arange(B, device=dev).view(B, 1, 1) * geo.C + sel.ids[..., :width].clamp(min=0)).to(torch.int32)
    table = torch.where(sel.ids[..., :width] >= 0, slots, -1).contiguous()
    return dict(keys=keys, values=values, q=q, sizes=sizes, starts=starts, kmin=kmin, kmax=kmax, sketch=sketch,
                scores=scores, select_args=select_args, table=table, counts=sel.counts,
                selected_tokens=int((sel.mask * sizes).sum()), selected_chunks=int(sel.counts.sum()),
                new_key=keys[:, :, -1:].clone(), k_pool=slot_pool(keys, geo), v_pool=slot_pool(values, geo),
                slot_lens=sizes.repeat(B))


# ---------------------------------------------------------------------------------------------
# kernels and their bytes


@dataclass
class Spec:
    """One timed operation: what it calls and the bytes it must move (read + write)."""

    name: str
    fn: Callable[[], Any]
    bytes: int
    formula: str


def kernel_specs(geo: Geometry, x: dict[str, Any], backend: str) -> list[Spec]:
    """The kernels at one geometry, each with its byte formula (e = bytes per K/V element, P = D / 4)."""
    from tierkv.kernels import abstract_append, chunk_abstract, chunk_scores, select_chunks, sparse_decode_attention

    B, H, C, S, D, T, e = geo.B, geo.Hkv, geo.C, geo.S, geo.D, geo.T, geo.elem
    Hq, P, M = H * geo.G, math.ceil(D / 4), x["table"].shape[-1]
    kmin_buf, kmax_buf = torch.empty_like(x["kmin"]), torch.empty_like(x["kmax"])
    lo, hi = x["kmin"].clone(), x["kmax"].clone()
    scores_buf = torch.empty(B, H, C, dtype=torch.float32, device=geo.device)
    attn_out = torch.empty_like(x["q"])
    abstracts, q_bytes = 2 * B * H * C * D * e, B * Hq * D * e
    return [
        Spec("chunk_abstract",
             lambda: chunk_abstract(x["keys"], x["starts"], out=(kmin_buf, kmax_buf), backend=backend),
             B * H * T * D * e + 4 * C + abstracts,
             "K (B*Hkv*T*D*e) + starts (4C) + kmin,kmax (2*B*Hkv*C*D*e)"),
        Spec("abstract_append", lambda: abstract_append(lo, hi, x["new_key"], chunk=-1, backend=backend),
             B * H * D * e + 4 * B * H * D * e,
             "new key (B*Hkv*D*e) + one chunk's kmin,kmax read and written (4*B*Hkv*D*e)"),
        Spec("chunk_scores", lambda: chunk_scores(x["q"], x["kmin"], x["kmax"], out=scores_buf, backend=backend),
             q_bytes + abstracts + 4 * B * H * C,
             "q (B*Hq*D*e) + kmin,kmax (2*B*Hkv*C*D*e) + scores (4*B*Hkv*C)"),
        Spec("chunk_scores_sketch",
             lambda: chunk_scores(x["q"], x["kmin"], x["kmax"], sketch=x["sketch"], out=scores_buf, backend=backend),
             q_bytes + abstracts + B * H * (C - 1) * S * P + 4 * C + 4 * B * H * C,
             "q + kmin,kmax + codes (B*Hkv*(C-1)*S*P) + chunk sizes (4C) + scores (4*B*Hkv*C)"),
        Spec("select_chunks", lambda: select_chunks(x["scores"], x["sizes"], backend=backend, **x["select_args"]),
             4 * B * H * C + 4 * C + B * H * C * (1 + 4) + 4 * B * H,
             "scores (4*B*Hkv*C) + sizes (4C) + mask, ids (5*B*Hkv*C) + counts (4*B*Hkv)"),
        Spec("sparse_decode_attention",
             lambda: sparse_decode_attention(x["q"], x["k_pool"], x["v_pool"], x["table"], x["counts"], x["slot_lens"],
                                             out=attn_out, backend=backend),
             2 * q_bytes + 2 * D * e * x["selected_tokens"] + 4 * B * H * (M + 1) + 4 * x["selected_chunks"],
             "q, out (2*B*Hq*D*e) + selected K,V (2*D*e per selected token and KV head) + table, counts "
             "(4*B*Hkv*(M+1)) + slot lengths (4 per selected chunk and KV head)"),
    ]


def dense_matmul_spec(geo: Geometry, x: dict[str, Any]) -> Spec:
    """A second dense peer: q.K^T, softmax, .V as grouped matmuls (on the CPU much faster than SDPA's decode)."""
    B, H, G, D = geo.B, geo.Hkv, geo.G, geo.D
    qg = x["q"].view(B, H, G, D)
    keys_t, values, scale = x["keys"].transpose(-1, -2), x["values"], D ** -0.5

    def run() -> torch.Tensor:
        p = torch.softmax(torch.matmul(qg, keys_t).float() * scale, dim=-1).to(values.dtype)  # (B, Hkv, G, T)
        return torch.matmul(p, values)

    return Spec("dense_matmul", run, 2 * geo.kv_bytes() + 2 * qg.numel() * geo.elem,
                "K,V (2*B*Hkv*T*D*e) + q, out (2*B*Hq*D*e)")


def sdpa_spec(geo: Geometry, x: dict[str, Any]) -> Spec:
    """The peer: dense decode attention over the whole context (GQA without repeating K/V)."""
    q4 = x["q"].unsqueeze(2)  # (B, Hq, 1, D)
    return Spec("sdpa_dense", lambda: F.scaled_dot_product_attention(q4, x["keys"], x["values"], enable_gqa=True),
                2 * geo.kv_bytes() + 2 * q4.numel() * geo.elem, "K,V (2*B*Hkv*T*D*e) + q, out (2*B*Hq*D*e)")


# ---------------------------------------------------------------------------------------------
# one geometry


def measure(spec: Spec, timer: Timer) -> dict[str, Any]:
    """Time one operation and its same-bytes copy ceiling; GB/s of both."""
    timing = timer(spec.fn)
    ceiling = timer.copy_ceiling(spec.bytes)
    gbps = spec.bytes / timing["best_s"] / 1e9
    return {**timing, "bytes": spec.bytes, "bytes_formula": spec.formula, "gbps": gbps,
            "copy_s": ceiling["best_s"], "copy_gbps": ceiling["gbps"], "fraction_of_copy": gbps / ceiling["gbps"]}


def step_scoring(device: str) -> str:
    """The scoring kernel a sparse step uses by default: the sketch on CUDA, the min/max bound on the CPU."""
    return "chunk_scores_sketch" if device == "cuda" else "chunk_scores"


def run_geometry(geo: Geometry, backend: str, timer: Timer) -> dict[str, Any]:
    """All kernels, the SDPA peer and the sparse-step sum at one (context, chunk size)."""
    x = make_inputs(geo, backend)
    sdpa = measure(sdpa_spec(geo, x), timer)
    matmul = measure(dense_matmul_spec(geo, x), timer)
    kernels = {spec.name: measure(spec, timer) for spec in kernel_specs(geo, x, backend)}
    for result in (*kernels.values(), matmul):
        result["vs_sdpa"] = result["best_s"] / sdpa["best_s"]
    parts = [step_scoring(geo.device), "select_chunks", "sparse_decode_attention"]
    step_s = sum(kernels[k]["best_s"] for k in parts)
    return {"context_tokens": geo.T, "chunk_tokens": geo.S, "chunks": geo.C, "budget_tokens": geo.budget,
            "selected_tokens_per_kv_head": x["selected_tokens"] / (geo.B * geo.Hkv),
            "table_width": x["table"].shape[-1],
            "kernels": kernels, "sdpa_dense": sdpa, "dense_matmul": matmul,
            "sparse_step": {"best_s": step_s, "vs_sdpa": step_s / sdpa["best_s"],
                            "vs_dense_matmul": step_s / matmul["best_s"],
                            "parts": parts}}


# ---------------------------------------------------------------------------------------------
# output


def _row(r: dict[str, Any]) -> str:
    """One table cell: time, bytes, GB/s against the copy ceiling, share of SDPA."""
    text = (f"{r['best_s'] * 1e6:10.1f} us  {r['bytes'] / 1e6:9.3f} MB  {r['gbps']:8.2f} GB/s"
            f"  copy {r['copy_gbps']:8.2f} GB/s ({r['fraction_of_copy']:6.1%})")
    return text + (f"  {r['vs_sdpa']:7.1%} of SDPA" if "vs_sdpa" in r else "")


def print_report(results: list[dict[str, Any]], skipped: list[dict[str, Any]], header: str) -> None:
    """The human part of the output: one table per (context, chunk size), then what was skipped."""
    print(header)
    print()
    for res in results:
        rows = [(name, _row(r)) for name, r in res["kernels"].items()]
        rows.append(("sdpa_dense (peer)", _row(res["sdpa_dense"])))
        rows.append(("dense_matmul (peer)", _row(res["dense_matmul"])))
        step = res["sparse_step"]
        rows.append((f"sparse step ({step['parts'][0]}+select+attn)",
                     f"{step['best_s'] * 1e6:10.1f} us  {step['vs_sdpa']:.1%} of SDPA, "
                     f"{step['vs_dense_matmul']:.1%} of dense_matmul"
                     f"  ({res['selected_tokens_per_kv_head']:.0f} of {res['context_tokens']} tokens"
                     " per KV head attended)"))
        print_table(f"context {res['context_tokens']} tokens, chunks of {res['chunk_tokens']} "
                    f"({res['chunks']} chunks, budget {res['budget_tokens']} tokens)", rows)
        print()
    for s in skipped:
        print(f"skipped context {s['context_tokens']} chunk {s['chunk_tokens']}: {s['reason']}")


# ---------------------------------------------------------------------------------------------
# main


def parse_args() -> argparse.Namespace:
    """Command line; per-device defaults are filled in ``main`` (see ``DEFAULTS``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--contexts", default=None, help="comma-separated context lengths (default: per device)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per operation (default: per device)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--chunks", default="16,64", help="comma-separated chunk sizes in tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default=None, help="K/V/q dtype (default: bfloat16 on cuda, float32 on cpu)")
    return ap.parse_args()


def prepare_backend(device: str) -> str:
    """The kernel backend for ``device``; on CUDA make sure the kernels compile rather than interpret."""
    if device == "cpu":
        return "torch"
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("note: TRITON_INTERPRET=1 ignored on cuda: benchmarking the compiled kernels", file=sys.stderr)
    os.environ["TRITON_INTERPRET"] = "0"  # read when the kernel modules are first imported
    from tierkv.kernels._select import HAS_TRITON
    from tierkv.kernels.abstract import _chunk_abstract_kernel

    if not HAS_TRITON:
        raise SystemExit("--device cuda needs triton (pip install triton)")
    if type(_chunk_abstract_kernel).__name__ == "InterpretedFunction":
        raise SystemExit("the kernels were built by the Triton interpreter; run without TRITON_INTERPRET=1")
    return "triton"


def _triton_version() -> str | None:
    """For the JSON record: kernel timings depend on the Triton compiler version."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model and core count, for the record."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{model or platform.machine()}, {os.cpu_count()} cpus"


def main() -> None:
    """Run every (context, chunk size) that fits, print the tables, end with one JSON line."""
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts_default, repeats_default, dtype_default = DEFAULTS[args.device]
    contexts = [int(c) for c in (args.contexts or contexts_default).split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    repeats = args.repeats or repeats_default
    dtype = getattr(torch, args.dtype or dtype_default)
    backend = prepare_backend(args.device)
    timer = Timer(args.device, repeats)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    results, skipped = [], []
    for T in contexts:
        for S in chunks:
            geo = Geometry(args.batch, T, S, dtype, args.device)
            need, free = needed_bytes(geo), free_bytes(args.device)
            if need > free:
                skipped.append({"context_tokens": T, "chunk_tokens": S,
                                "reason": f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"})
                continue
            try:
                results.append(run_geometry(geo, backend, timer))
            except Exception as exc:  # a failed geometry is a result too: record it, run the others
                traceback.print_exc()
                skipped.append({"context_tokens": T, "chunk_tokens": S, "reason": f"{type(exc).__name__}: {exc}"})
            if args.device == "cuda":
                torch.cuda.empty_cache()
    name = device_name(args.device)
    print_report(results, skipped, f"KV kernels on {name}: backend {backend}, {args.dtype or dtype_default}, "
                 f"batch {args.batch}, {KV_HEADS}x{GROUP} heads, D={HEAD_DIM}, budget {BUDGET:.0%}, "
                 f"{torch.get_num_threads()} threads, {repeats} repeats")
    emit_json({
        "bench": "kernels", "device": args.device, "device_name": name, "backend": backend,
        "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(), "repeats": repeats,
        "timing": "cuda events after an L2 flush, best and median" if args.device == "cuda" else "best_of wall time",
        "batch": args.batch, "kv_heads": KV_HEADS, "group": GROUP, "head_dim": HEAD_DIM, "budget": BUDGET,
        "sink_chunks": SINK_CHUNKS, "results": results, "skipped": skipped, "torch": torch.__version__,
        "triton": _triton_version(),
        "seconds": time.perf_counter() - t0, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    })


if __name__ == "__main__":
    main()
