"""Ragged decode with every layer streamed from disk: tokens/s of 1 sequence vs 2, 4, 8, 16 decoding together.

Why this script exists: issue 10's speed goal for the step scheduler is "with weights streamed from
disk, 4 ragged sequences decoding together reach >= 3x the tokens/s of one (each layer is read
once per step for all of them)", and "say where it stops scaling and why". This script measures
that in one invocation:

* model: a random bf16 Llama of a few hundred MB (``--shape``: hidden 1024, 16 layers, ~480 MB),
  built once under ``--model-root`` (``bench_common.bench_model_dir``);
* placement: budgets searched with ``tierkv.plan.make_plan`` (links measured in this run) so that
  every decoder layer lives on disk and the planner's prefetch depth is the best it can pick;
  host_mem 0 on the CPU; KV room for all sequences on the device (``--kv-device-tokens``), so the
  disk carries weights only. The plan is printed;
* ceiling: cold O_DIRECT sequential reads of the store's data file with tierkv's reader: the
  planner's probe (one 16 MiB window at a time) and pipelined reads (two windows in flight, 4 or 8
  threads, 16 or 64 MiB), before and after the sweep; the best of all is the ceiling (the disk is
  shared, its speed drifts; the one-window probe alone was beaten by streaming). For b sequences
  sharing each step the link allows ``b x raw / disk bytes per step`` tokens/s;
* for b in ``--batches`` (default 1, 2, 4, 8, 16): prompts of ragged lengths (16 to 160 tokens, 10x
  apart), greedy, EOS ignored, streamed; decode tokens/s = tokens after each sequence's first over
  the union of the sequences' decode intervals (first to last token; ``decode_run``): sequences run
  one after another add their decode times, sequences sharing steps count the shared time once,
  and prefill stays outside (best of ``--repeats`` rounds, each round running every batch size once;
  the ratio to one sequence is also given as the median over rounds of the same round's ratio, the
  figure least moved by other jobs on a shared machine). Disk bytes are the process's storage reads
  (``/proc/self/io`` read_bytes, O_DIRECT included) over the same intervals, so bytes per generated
  token show whether one layer read serves every sequence of a step;
* compute peer: the same sweep on a resident engine (every layer in memory) in the same process,
  the compute-bound speed the streamed run cannot exceed at that batch;
* verdict: the ratio 4-vs-1 (goal >= 3x), and the first batch whose gain over the previous one is
  below 75% of the ideal (1.5x for a doubling), with the reason read from the numbers (sequences not sharing steps, compute-bound, or more disk
  bytes per step).

    python scripts/bench_ragged.py [--batches 1,2,4,8,16] [--new-tokens 8] [--repeats 3] [--threads N]
        [--device cpu|cuda] [--model-root DIR] [--offload-dir DIR] [--skip-resident]
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
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))   # the checkout's tierkv
from bench_common import goals_row, bench_model_dir, emit_json, print_table  # noqa: E402
from bench_weights import measure_links, raw_disk_gbps  # noqa: E402

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
             vocab_size=32000, max_position_embeddings=4096)
LENGTHS = (16, 160, 48, 96, 24, 128, 64, 32, 40, 144, 56, 112, 20, 80, 136, 72)   # ragged: the first 4 span 10x
PIECE_TOKENS = 256                               # prefill piece: every prompt in one piece
SCALING_EFFICIENCY = 0.75                        # a larger batch gaining less than 75% of its ideal has stopped scaling


def storage_read_bytes() -> int:
    """Bytes this process (all its threads) has read from storage, O_DIRECT included."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes line")


def pipelined_read_gbps(path: Path, threads: int, window_bytes: int) -> float:
    """Cold O_DIRECT read of the whole file with two windows in flight (the next is submitted before
    the current one is waited for), as a prefetching reader keeps the disk busy; GB/s."""
    from tierkv.io.buffers import ALIGN_BYTES, aligned_host_tensor
    from tierkv.io.reader import AlignedReader, evict_from_page_cache

    size = path.stat().st_size // ALIGN_BYTES * ALIGN_BYTES
    evict_from_page_cache(path)
    bufs = [aligned_host_tensor(window_bytes) for _ in range(2)]
    for b in bufs:
        b.fill_(0)                                             # fault the pages in before timing
    with AlignedReader(path, threads=threads) as reader:
        t0 = time.perf_counter()
        pending = None
        for i, offset in enumerate(range(0, size, window_bytes)):
            record = reader.submit(offset, min(window_bytes, size - offset), bufs[i % 2])
            if pending is not None:
                pending.wait()
            pending = record
        if pending is not None:
            pending.wait()
        elapsed = time.perf_counter() - t0
    return size / elapsed / 1e9


def link_ceiling_gbps(path: Path) -> dict[str, float]:
    """The disk link's ceiling as several cold O_DIRECT reads of the store file: the planner's probe
    (``raw_disk_gbps``: 16 MiB windows one at a time) and pipelined reads (two windows in flight) of
    16 and 64 MiB with 4 and 8 threads. The best is the ceiling: a reader that overlaps requests can
    beat the one-window probe, and a ceiling must not be beaten."""
    out = {"probe_4x16MiB": raw_disk_gbps(path, repeats=1)}
    for threads, window in ((4, 16 << 20), (4, 64 << 20), (8, 64 << 20)):
        out[f"pipelined_{threads}x{window >> 20}MiB"] = pipelined_read_gbps(path, threads, window)
    return out


def prompts_for(batch: int) -> list[list[int]]:
    assert batch <= len(LENGTHS), f"at most {len(LENGTHS)} sequences"
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, SHAPE["vocab_size"], (n,), generator=g).tolist() for n in LENGTHS[:batch]]


def policy_for(args: argparse.Namespace) -> Any:
    from tierkv.config import Policy

    return Policy(dtype="bfloat16", device=args.device, prefill_chunk_tokens=PIECE_TOKENS,
                  kv_device_tokens=args.kv_device_tokens, kv="exact")


def streaming_budget(model_dir: Path, offload: Path, links: Any, args: argparse.Namespace) -> tuple[dict[str, int], Any]:
    """({device_mem, host_mem}, plan): every decoder layer on disk, at the best predicted speed (the
    planner then spends the spare room on a deeper prefetch ring); ties go to less memory."""
    from tierkv.config import Budget
    from tierkv.io.checkpoint import Checkpoint
    from tierkv.plan import MAX_PREFETCH_DEPTH, PlanError, make_plan, minimum_device_bytes

    cfg, policy = Checkpoint(model_dir).config, policy_for(args)
    base = minimum_device_bytes(cfg, policy, context_tokens=args.kv_device_tokens)
    layer = make_plan(cfg, Budget(), policy, links).layer_bytes
    hosts = [0] if args.device == "cpu" else [s * layer for s in range(1, MAX_PREFETCH_DEPTH + 2)]
    best: tuple[tuple[float, int], dict[str, int], Any] | None = None
    for extra in range(MAX_PREFETCH_DEPTH + 2):
        for host in hosts:
            budget = {"device_mem": base + extra * layer + (1 << 20), "host_mem": host}
            try:
                plan = make_plan(cfg, Budget(budget["device_mem"], host, offload), policy, links)
            except PlanError:
                continue
            if len(plan.disk_layers) != cfg.num_layers:
                continue
            score = (-plan.predicted_tok_s, budget["device_mem"] + host)
            if best is None or score < best[0]:
                best = (score, budget, plan)
    assert best is not None, "no budget puts every layer on disk"
    return best[1], best[2]


def streaming_engine(model_dir: Path, budget: dict[str, int], offload: Path, links: Any,
                     args: argparse.Namespace) -> Any:
    """The engine ``tierkv.load(model_dir, device_mem=..., host_mem=..., offload_dir=..., dtype="bfloat16",
    prefill_chunk_tokens=256, kv_device_tokens=...)`` builds, planned with this run's measured links."""
    from tierkv.config import Budget
    from tierkv.engine import Engine
    from tierkv.io.checkpoint import Checkpoint
    from tierkv.loader import open_weight_source

    policy = policy_for(args)
    cfg = Checkpoint(model_dir).config
    source, plan = open_weight_source(model_dir, cfg, Budget(budget["device_mem"], budget["host_mem"], offload),
                                      policy, links=links)
    assert source is not None and len(plan.disk_layers) == cfg.num_layers, "the budget must stream every layer"
    engine = Engine(model_dir, policy, weights=source, plan=plan)
    return engine


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of closed intervals, as disjoint intervals in time order."""
    out: list[list[float]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def decode_run(engine: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Stream ``prompts`` and time their decode: tokens after each sequence's first over the union of the
    sequences' decode intervals (first to last token). Sequences run one after another count their
    decode times one after another; sequences sharing steps count the shared time once. Prefill (before
    a sequence's first token) is outside the intervals, so its cost and noise do not enter."""
    stamps: dict[int, list[tuple[float, int]]] = {i: [] for i in range(len(prompts))}   # (time, read bytes)
    stream = engine.stream(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    for piece in stream:
        if piece.token_id is not None:
            stamps[piece.index].append((time.perf_counter(), storage_read_bytes()))
    assert all(len(v) == new_tokens for v in stamps.values()), "every sequence generates new_tokens tokens"
    at = {t: r for v in stamps.values() for t, r in v}
    union = merge([(v[0][0], v[-1][0]) for v in stamps.values()])
    seconds = sum(hi - lo for lo, hi in union)
    disk = sum(at[hi] - at[lo] for lo, hi in union)
    tokens = len(prompts) * (new_tokens - 1)
    return {"tok_s": tokens / seconds, "seq_tok_s": tokens / seconds / len(prompts), "decode_s": seconds,
            "disk_bytes_per_token": disk / tokens, "disk_gbps": disk / seconds / 1e9,
            "batch_size_reported": max(r.stats.batch_size for r in stream.results)}


def sweep(engine: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per batch size: the best of ``--repeats`` decode runs (``decode_run``), and the median over the
    rounds of its speed relative to one sequence in the same round. Rounds interleave the batch
    sizes, so a busy spell on a shared machine slows every size of that round alike."""
    engine.generate(prompts_for(1), max_new_tokens=2, ignore_eos=True)    # warm-up (first reads verify CRCs)
    runs: dict[int, list[dict[str, Any]]] = {b: [] for b in args.batches}
    for r in range(args.repeats):
        for b in args.batches:
            runs[b].append(decode_run(engine, prompts_for(b), args.new_tokens))
        print(f"  round {r + 1}: " + ", ".join(f"batch {b} {runs[b][-1]['tok_s']:.2f}" for b in args.batches)
              + " tok/s", flush=True)
    first = args.batches[0]
    rows = []
    for b in args.batches:
        best = max(runs[b], key=lambda run: run["tok_s"])
        ratios = sorted(run["tok_s"] / one["tok_s"] for run, one in zip(runs[b], runs[first]))
        rows.append(dict(best, batch=b, prompt_tokens=LENGTHS[:b], tok_s_samples=[round(x["tok_s"], 3) for x in runs[b]],
                         median_round_ratio_vs_1=ratios[len(ratios) // 2]))
    return rows


def stop_reason(rows: list[dict[str, Any]], resident: dict[int, float], layer_step_bytes: float) -> tuple[int | None, str]:
    """(first batch of the sweep whose gain over the previous one is below SCALING_EFFICIENCY of the ideal
    (the ratio of their batch sizes), why) from the sweep's numbers; (None, "") if every step scaled."""
    for prev, row in zip(rows, rows[1:]):
        gain = row["median_round_ratio_vs_1"] / prev["median_round_ratio_vs_1"]
        if gain >= SCALING_EFFICIENCY * row["batch"] / prev["batch"]:
            continue
        b = row["batch"]
        head = f"{gain:.2f}x for {b // prev['batch']}x the sequences"
        if row["batch_size_reported"] < 2:
            return b, (f"{head}: sequences do not share steps (stats.batch_size {row['batch_size_reported']}); the "
                       f"engine runs them one after another, so every sequence reads every layer for itself "
                       f"({row['disk_bytes_per_token'] / layer_step_bytes:.2f}x one sequence's disk bytes per token)")
        why = []
        if b in resident:        # the resident speed is the compute alone: its share of the streamed step
            why.append(f"compute takes {row['tok_s'] / resident[b]:.0%} of each streamed step (every layer "
                       f"resident: {resident[b]:.2f} tok/s at batch {b})")
        per_step = row["disk_bytes_per_token"] * b / layer_step_bytes
        if per_step > 1.2:
            prompt = sum(row["prompt_tokens"])
            why.append(f"{per_step:.2f}x one pass over the layers is read per {b} tokens: steps that prefill "
                       f"later prompts ({prompt} prompt tokens in pieces of {PIECE_TOKENS}) fall inside the decode "
                       f"window and produce fewer tokens (most likely)")
        return b, f"{head}: " + ("; ".join(why) or "neither disk- nor compute-bound by these numbers")
    return None, ""


def summarize(rows: list[dict[str, Any]], resident: list[dict[str, Any]], raw: list[dict[str, float]],
              plan: Any) -> dict[str, Any]:
    ceiling = max(v for sample in raw for v in sample.values())
    one = rows[0]
    assert one["batch"] == 1, "the sweep starts with one sequence"
    step_bytes = one["disk_bytes_per_token"]                # one sequence: one pass over the layers per token
    by_batch = {r["batch"]: r for r in rows}
    res_tok = {r["batch"]: r["tok_s"] for r in resident}
    for r in rows:
        r["ratio_vs_1"] = r["tok_s"] / one["tok_s"]
        r["link_ceiling_tok_s"] = r["batch"] * ceiling * 1e9 / step_bytes if step_bytes > 0 else None
        r["ratio_vs_link_ceiling"] = r["tok_s"] / r["link_ceiling_tok_s"] if r["link_ceiling_tok_s"] else None
        r["disk_ratio_vs_raw"] = r["disk_gbps"] / ceiling
        r["resident_tok_s"] = res_tok.get(r["batch"])
        # storage reads per generated token relative to one sequence's: 1/b when each layer read serves all b
        r["disk_per_token_vs_1"] = r["disk_bytes_per_token"] / step_bytes if step_bytes > 0 else None
    stops_at, why = stop_reason(rows, res_tok, step_bytes)
    ratio4 = by_batch[4]["median_round_ratio_vs_1"] if 4 in by_batch else None
    rounded = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    return {"raw_odirect_gbps": round(ceiling, 3),
            "raw_odirect_gbps_samples": [{k: round(v, 3) for k, v in sample.items()} for sample in raw],
            "layer_bytes_per_step": int(step_bytes), "rows": rounded, "ratio_4_vs_1": None if ratio4 is None else
            round(ratio4, 3), "stops_scaling_at": stops_at, "stops_scaling_why": why,
            "plan": {"disk_layers": len(plan.disk_layers), "prefetch_depth": plan.prefetch_depth,
                     "predicted_tok_s": plan.predicted_tok_s, "bound": plan.bound, "layer_bytes": plan.layer_bytes},
            "goals": {} if ratio4 is None else {"ragged4_ge_3x_one": ratio4 >= 3.0}}


def table_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    before, after = (", ".join(f"{k} {v:.2f}" for k, v in sample.items()) for sample in s["raw_odirect_gbps_samples"])
    rows = [("raw O_DIRECT read (store file)", f"{s['raw_odirect_gbps']:.2f} GB/s (the best of, before the sweep: "
                                               f"{before}; after: {after})"),
            ("disk bytes per step, one sequence", f"{s['layer_bytes_per_step'] / 2**20:.1f} MiB "
                                                  f"({s['plan']['disk_layers']} layers on disk, prefetch depth "
                                                  f"{s['plan']['prefetch_depth']})")]
    for r in s["rows"]:
        resident = f", resident {r['resident_tok_s']:.2f}" if r["resident_tok_s"] else ""
        ceiling = f"{r['ratio_vs_link_ceiling']:.0%} of link ceiling {r['link_ceiling_tok_s']:.2f}" \
            if r["link_ceiling_tok_s"] else "no ceiling"
        rows.append((f"batch {r['batch']} (prompts {r['prompt_tokens']})",
                     f"{r['tok_s']:.2f} tok/s = {r['ratio_vs_1']:.2f}x one (median per round "
                     f"{r['median_round_ratio_vs_1']:.2f}x); {ceiling}; disk "
                     f"{r['disk_gbps']:.2f} GB/s ({r['disk_ratio_vs_raw']:.0%} of raw), "
                     f"{r['disk_bytes_per_token'] / 2**20:.1f} MiB/token ({r['disk_per_token_vs_1']:.2f}x one's, ideal "
                     f"{1 / r['batch']:.2f}x); batch_size {r['batch_size_reported']}"
                     f"{resident}"))
    rows.append(("4 vs 1 (median per round)", "n/a" if s["ratio_4_vs_1"] is None else
                 f"{s['ratio_4_vs_1']:.2f}x (goal >= 3x)"))
    rows.append(("stops scaling", "not within the sweep" if s["stops_scaling_at"] is None else
                 f"at batch {s['stops_scaling_at']}: {s['stops_scaling_why']}"))
    rows.append(goals_row(s["goals"], "n/a"))
    return rows


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2, 4, 8, 16])
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens each sequence generates per run")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the batch sizes")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--kv-device-tokens", type=int, default=4096,
                    help="KV context the device room holds: all sequences' KV stays on the device")
    ap.add_argument("--skip-resident", action="store_true", help="no resident (compute-bound) sweep")
    ap.add_argument("--model-root", type=Path, default=Path(tempfile.gettempdir()) / "tierkv-bench")
    ap.add_argument("--offload-dir", type=Path, default=None, help="store location (default: MODEL_ROOT/offload)")
    return ap.parse_args()


def run_all(args: argparse.Namespace, model_dir: Path) -> tuple[dict[str, int], Any, list, list, list[dict[str, float]]]:
    """Budgets, ceilings, the streamed sweep and the resident one."""
    offload = args.offload_dir or args.model_root / "offload"
    links, data_path, _ = measure_links(model_dir, offload, args.device)
    budget, plan = streaming_budget(model_dir, offload, links, args)
    print(f"searched plan (device_mem {budget['device_mem']} B, host_mem {budget['host_mem']} B):\n"
          f"{plan.summary()}\n\nstreamed:", flush=True)
    raw = [link_ceiling_gbps(data_path)]
    engine = streaming_engine(model_dir, budget, offload, links, args)
    try:
        rows = sweep(engine, args)
    finally:
        engine.close()
    raw.append(link_ceiling_gbps(data_path))    # the disk is shared: its speed drifts, the best sample is the ceiling
    resident: list[dict[str, Any]] = []
    if not args.skip_resident:
        import tierkv

        print("resident:", flush=True)
        with tierkv.load(model_dir, dtype="bfloat16", device=args.device, prefill_chunk_tokens=PIECE_TOKENS,
                         kv="exact") as eng:
            assert eng.plan is None or not (eng.plan.disk_layers or eng.plan.host_layers), "the peer must be resident"
            resident = sweep(eng, args)
    return budget, plan, rows, resident, raw


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model_dir = bench_model_dir(args.model_root, args.layers, SHAPE)
    load_start = os.getloadavg()
    budget, plan, rows, resident, raw = run_all(args, model_dir)
    s = summarize(rows, resident, raw, plan)
    load_end = os.getloadavg()
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    print()
    print_table(f"ragged decode, bf16 {args.layers} layers ({size / 2**20:.0f} MiB), every layer streamed from disk, "
                f"{args.device}, {args.threads} threads, {args.new_tokens} new tokens, load avg "
                f"{load_start[0]:.1f} -> {load_end[0]:.1f} on {os.cpu_count()} cores", table_rows(s))
    emit_json(dict(s, bench="ragged", device=args.device, threads=args.threads, layers=args.layers,
                   model_bytes=size, new_tokens=args.new_tokens, repeats=args.repeats,
                   device_mem_bytes=budget["device_mem"], host_mem_bytes=budget["host_mem"],
                   resident_rows=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                  for r in resident],
                   load_avg_start=list(load_start), load_avg_end=list(load_end), cpu_count=os.cpu_count(),
                   wall_s=round(time.perf_counter() - t0, 1)))


if __name__ == "__main__":
    main()
