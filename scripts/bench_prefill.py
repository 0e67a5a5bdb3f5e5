"""Long-prompt prefill and decode under small device budgets, layers streamed from disk (cold cache).

Why this script exists: issue 9's prefill items (blocked attention, the prefill piece chosen from
the budget, the activation reserve) are about a long prompt under a budget far below the model.
This script measures them in one invocation on a random bf16 Llama (default: hidden 1024, 12
layers, 16/4 heads, intermediate 2816, vocab 32000, 4096 positions; 383 MiB):

* for each ``--device-mem`` budget (host_mem 0), ``tierkv.load(model, device_mem=B, host_mem=0,
  offload_dir=..., kv_device_tokens=..., prefill_chunk_tokens=...)`` runs in a fresh process (own
  peak RSS) and generates ``--new-tokens`` greedily after a ``--prompt-tokens`` random prompt;
  prefill_s and decode tok/s are the engine's own ``stats``. A short warm-up generate comes first
  (the first reads of a store verify its CRCs). Cold cache as in ``bench_weights``: the store's
  data file is evicted (posix_fadvise DONTNEED) before every forward pass; tierkv reads it with
  O_DIRECT anyway;
* memory guarantee: peak RSS (VmHWM) minus the RSS just before ``load`` (torch and tierkv
  imported) must stay within device_mem + host_mem + 32 MiB; the table says whether it held;
* ceiling: the disk's raw O_DIRECT read speed of the store file, measured in this run (before and
  after the tierkv runs, best sample), expressed as the prefill time the streamed layers' bytes
  need at that speed. Each prefill piece runs every layer once, so bytes read = streamed layers x
  layer bytes x number of pieces (ceil(prompt / piece)); the ratio is ceiling time / prefill time;
* peers, each in a fresh process: HF transformers resident (no budget: what an unbounded run
  costs), and HF accelerate disk offload (``device_map="auto"``, ``max_memory={"cpu": B}``, its
  own offload folder, checkpoint and offload files evicted before every forward) at the budgets
  of ``--accelerate-budgets`` (default: the first tierkv budget). Prefill = generate(1 token);
  decode = (N - 1) / (t(N) - t(1)).

    python scripts/bench_prefill.py [--prompt-tokens 2000] [--device-mem 200MiB,400MiB,1GiB]
        [--kv-device-tokens 256] [--prefill-chunk-tokens N] [--new-tokens 8] [--threads 1]
        [--skip-hf] [--skip-accelerate] [--accelerate-budgets 200MiB] [--model-root DIR]

A full run at the defaults takes about 5-8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))   # the checkout's tierkv, also in workers
from bench_common import bench_model_dir, emit_json, print_table  # noqa: E402
from bench_weights import (_hf_generate, evict_files, in_fresh_process, layers_on_disk,  # noqa: E402
                           peak_rss_bytes, raw_disk_gbps)

PREFILL_MODEL = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                     intermediate_size=2816, vocab_size=32000, max_position_embeddings=4096)
GUARANTEE_SLACK = 32 << 20      # the memory guarantee: RSS growth <= device_mem + host_mem + 32 MiB


def rss_bytes() -> int:
    """This process's resident set now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status: not Linux?")


def prompt_ids(n: int) -> list[int]:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(0)).tolist()


# ---------------------------------------------------------------------------------------------
# contenders (each runs in a fresh process)


def run_tierkv(model_dir: str, device_mem: str, offload_dir: str, data_path: str, args: dict[str, Any]) -> dict[str, Any]:
    """tierkv under ``device_mem`` (host_mem 0), store evicted before every forward: prefill, decode, RSS."""
    torch.set_num_threads(args["threads"])
    import tierkv
    from tierkv.config import parse_size

    kw = {k: args[k] for k in ("kv_device_tokens", "prefill_chunk_tokens") if args[k] is not None}
    base = rss_bytes()
    engine = tierkv.load(model_dir, device_mem=device_mem, host_mem=0, offload_dir=offload_dir, device="cpu",
                         dtype="bfloat16", **kw)
    plan = engine.plan
    forward = engine.runner.hidden

    def forward_cold(*a: Any, **k: Any) -> Any:       # prefill pieces and decode steps all go through Runner.hidden
        evict_files([Path(data_path)])
        return forward(*a, **k)

    engine.runner.hidden = forward_cold
    engine.generate(prompt_ids(16), max_new_tokens=2, ignore_eos=True)      # warm-up: CRCs of first reads
    res = engine.generate(prompt_ids(args["prompt_tokens"]), max_new_tokens=args["new_tokens"], ignore_eos=True)
    s = res.stats
    disk = len(plan.disk_layers) if plan else 0
    out = {"device_mem": device_mem, "device_mem_bytes": parse_size(device_mem), "host_mem_bytes": 0,
           "prefill_s": s.prefill_s, "decode_tok_s": s.decode_tok_s, "piece": engine.prefill_chunk_tokens,
           "disk_layers": disk, "layer_bytes": plan.layer_bytes if plan else 0, "prefetch_depth": plan.prefetch_depth if plan else None,
           "disk_bytes_read": s.weights.get("disk_to_device_bytes", 0.0), "tokens": res.token_ids}
    engine.close()
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["rss_growth_bytes"] = out["peak_rss_bytes"] - base
    return out


def run_hf(model_dir: str, max_memory: dict[str, int] | None, offload_dir: str | None,
           args: dict[str, Any]) -> dict[str, Any]:
    """HF transformers, resident (``max_memory`` None) or accelerate disk offload (files evicted
    before every forward): prefill = generate(1), decode = (N - 1) / (t(N) - t(1)), peak RSS."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args["threads"])
    base = rss_bytes()
    extra = {} if max_memory is None else {"device_map": "auto", "max_memory": max_memory,
                                           "offload_folder": offload_dir}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **extra).eval()
    disk = 0
    if max_memory is not None:
        # no hf_device_map when everything fits one device (accelerate then places nothing on disk)
        disk = layers_on_disk(getattr(model, "hf_device_map", {}), model.config.num_hidden_layers)
        files = sorted(Path(model_dir).glob("*.safetensors")) + sorted(p for p in Path(offload_dir).rglob("*")
                                                                       if p.is_file())
        model.register_forward_pre_hook(lambda *_: evict_files(files))
    _hf_generate(model, prompt_ids(16), "cpu")(2)                            # warm-up
    gen = _hf_generate(model, prompt_ids(args["prompt_tokens"]), "cpu")
    t0 = time.perf_counter()
    gen(1)
    t1 = time.perf_counter()
    gen(args["new_tokens"])
    tn = time.perf_counter() - t1
    prefill, peak = t1 - t0, peak_rss_bytes()
    return {"prefill_s": prefill, "decode_tok_s": (args["new_tokens"] - 1) / max(tn - prefill, 1e-9),
            "disk_layers": disk, "peak_rss_bytes": peak, "rss_growth_bytes": peak - base}


# ---------------------------------------------------------------------------------------------
# the invocation: measure, compare, print


def store_data_path(model_dir: Path, offload_dir: Path) -> Path:
    """The store's data file, converted once here so that no child pays for (or holds memory in) it."""
    from tierkv.io.convert import cached_store
    from tierkv.io.store import WeightStore

    return WeightStore.open(cached_store(model_dir, offload_dir, dtype="bfloat16")).data_path


def summarize_tierkv(r: dict[str, Any], ceiling_gbps: float, prompt_tokens: int) -> dict[str, Any]:
    """One tierkv run's numbers, its ceiling time and whether the memory guarantee held."""
    pieces = math.ceil(prompt_tokens / r["piece"])
    streamed = r["disk_layers"] * r["layer_bytes"] * pieces
    ceiling_s = streamed / (ceiling_gbps * 1e9)
    limit = r["device_mem_bytes"] + r["host_mem_bytes"] + GUARANTEE_SLACK
    return {"device_mem": r["device_mem"], "prefill_s": round(r["prefill_s"], 3),
            "prefill_tok_s": round(prompt_tokens / r["prefill_s"], 1), "decode_tok_s": round(r["decode_tok_s"], 3),
            "piece": r["piece"], "pieces": pieces, "disk_layers": r["disk_layers"],
            "prefetch_depth": r["prefetch_depth"], "prefill_stream_bytes": streamed,
            "disk_bytes_read_generate": int(r["disk_bytes_read"]),
            "ceiling_prefill_s": round(ceiling_s, 3),
            "ceiling_ratio": round(ceiling_s / r["prefill_s"], 3) if streamed else None,   # None: nothing streams
            "peak_rss_bytes": r["peak_rss_bytes"], "rss_growth_bytes": r["rss_growth_bytes"],
            "guarantee_limit_bytes": limit, "guarantee_held": r["rss_growth_bytes"] <= limit}


def table(rows: list[dict[str, Any]], peers: dict[str, dict[str, Any]]) -> None:
    """The human table: one line per tierkv budget, then the peers."""
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    hdr = ("device_mem", "piece", "disk layers", "prefill s", "tok/s", "ceiling s", "ceil/actual",
           "decode tok/s", "peak RSS MiB", "RSS growth MiB", "limit MiB", "held")
    lines = [hdr] + [(r["device_mem"], f"{r['piece']} x{r['pieces']}", str(r["disk_layers"]), f"{r['prefill_s']:.2f}",
                      f"{r['prefill_tok_s']:.0f}", f"{r['ceiling_prefill_s']:.2f}",
                      "n/a" if r["ceiling_ratio"] is None else f"{r['ceiling_ratio']:.2f}",
                      f"{r['decode_tok_s']:.2f}", mib(r["peak_rss_bytes"]), mib(r["rss_growth_bytes"]), mib(r["guarantee_limit_bytes"]),
                      "yes" if r["guarantee_held"] else "NO") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(hdr))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    print()
    peer_rows = []
    for name, p in peers.items():
        peer_rows.append((name, f"prefill {p['prefill_s']:.2f} s, decode {p['decode_tok_s']:.2f} tok/s, "
                                f"{p['disk_layers']} disk layers, peak RSS {mib(p['peak_rss_bytes'])} MiB "
                                f"(growth {mib(p['rss_growth_bytes'])})"))
        for r in rows:
            peer_rows.append((f"  tierkv {r['device_mem']} / {name}", f"prefill time {r['prefill_s'] / p['prefill_s']:.2f}x, "
                                                                       f"decode {r['decode_tok_s'] / p['decode_tok_s']:.2f}x"))
    if peer_rows:
        print_table("peers (same prompt and model)", peer_rows)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--new-tokens", type=int, default=8, help="decode tokens (decode tok/s covers N - 1 steps)")
    ap.add_argument("--device-mem", default="200MiB,400MiB,1GiB", help="comma-separated tierkv budgets")
    ap.add_argument("--kv-device-tokens", type=int, default=None, help="KV context kept on the device (tierkv)")
    ap.add_argument("--prefill-chunk-tokens", type=int, default=None, help="fixed prefill piece (default: auto)")
    ap.add_argument("--layers", type=int, default=PREFILL_MODEL["num_hidden_layers"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-hf", action="store_true", help="no resident HF transformers run")
    ap.add_argument("--skip-accelerate", action="store_true", help="no accelerate disk-offload run")
    ap.add_argument("--accelerate-budgets", default=None,
                    help="comma-separated max_memory cpu budgets for accelerate (default: the first --device-mem; "
                         "a budget holding the whole 383 MiB model streams nothing)")
    ap.add_argument("--model-root", type=Path, default=Path(tempfile.gettempdir()) / "tierkv-bench")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    from tierkv.config import parse_size

    torch.set_num_threads(args.threads)
    t0, load_start = time.perf_counter(), os.getloadavg()
    model_dir = bench_model_dir(args.model_root, args.layers, PREFILL_MODEL)
    offload = args.model_root / "offload-prefill"
    data_path = store_data_path(model_dir, offload)
    common = {"threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "kv_device_tokens": args.kv_device_tokens, "prefill_chunk_tokens": args.prefill_chunk_tokens}
    raw = [raw_disk_gbps(data_path, nbytes=min(1 << 30, data_path.stat().st_size))]
    runs = [in_fresh_process(run_tierkv, str(model_dir), b.strip(), str(offload), str(data_path), common)
            for b in args.device_mem.split(",")]
    raw.append(raw_disk_gbps(data_path, nbytes=min(1 << 30, data_path.stat().st_size)))
    rows = [summarize_tierkv(r, max(raw), args.prompt_tokens) for r in runs]
    peers: dict[str, dict[str, Any]] = {}
    if not args.skip_hf:
        peers["HF resident"] = in_fresh_process(run_hf, str(model_dir), None, None, common)
    if not args.skip_accelerate:
        for b in (args.accelerate_budgets or args.device_mem.split(",")[0]).split(","):
            folder = Path(tempfile.mkdtemp(prefix="accelerate-offload-", dir=offload))
            try:
                peers[f"accelerate {b.strip()}"] = in_fresh_process(run_hf, str(model_dir),
                                                                    {"cpu": parse_size(b.strip())}, str(folder), common)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    load_end = os.getloadavg()
    print(f"prefill at small budgets: bf16 {args.layers} layers (hidden {PREFILL_MODEL['hidden_size']}), prompt "
          f"{args.prompt_tokens}, {args.new_tokens} new tokens, kv_device_tokens {args.kv_device_tokens}, "
          f"{args.threads} threads, load avg {load_start[0]:.1f} -> {load_end[0]:.1f} on {os.cpu_count()} cores")
    print(f"raw O_DIRECT read of the store file: {max(raw):.2f} GB/s (samples {[round(x, 2) for x in raw]}); "
          f"ceiling s = disk layers x layer bytes x pieces / that speed\n")
    table(rows, peers)
    emit_json({"bench": "prefill", "threads": args.threads, "prompt_tokens": args.prompt_tokens,
               "new_tokens": args.new_tokens, "kv_device_tokens": args.kv_device_tokens,
               "prefill_chunk_tokens": args.prefill_chunk_tokens, "model": dict(PREFILL_MODEL, num_hidden_layers=args.layers),
               "raw_odirect_gbps": round(max(raw), 3), "raw_odirect_gbps_samples": [round(x, 3) for x in raw],
               "tierkv": rows, "peers": {k: {kk: (round(v, 3) if isinstance(v, float) else v) for kk, v in p.items()}
                                         for k, p in peers.items()},
               "prefill_speedup_vs_peer": {f"{r['device_mem']}/{k}": round(p["prefill_s"] / r["prefill_s"], 3)
                                           for r in rows for k, p in peers.items()},
               "load_avg_start": list(load_start), "load_avg_end": list(load_end), "cpu_count": os.cpu_count(),
               "wall_s": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
