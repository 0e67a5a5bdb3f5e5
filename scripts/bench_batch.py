"""Throughput mode: tokens/s against batch size with weights streamed from disk under a memory cap, vs HF accelerate.

Why this script exists: issue 15's goals are "batch 16 >= 10x batch 1 while the disk bounds the
step, and the batch where compute takes over stated" and ">= 3x HF accelerate disk offload at every
batch size it can run", on the ~0.85B random bf16 Llama (``bench_common``: 1.6 GiB) under
``/work/shared/tools/memcap`` with a cap below the model's size. In one invocation:

* each contender runs in its own fresh process under the cap (``bench_common.run_worker_script``);
  one "prepare" process first converts the store (bounded memory) and measures the raw O_DIRECT read
  of its data file: the disk link's ceiling;
* for each batch size b (``--batches``, default 1..64): b prompts of ragged lengths spread evenly over
  64-512 tokens (b = 1: one of 288), random ids, ``--new-tokens`` each, greedy, EOS ignored. tierkv
  plans it with ``tierkv.batchplan.choose_batch(asked=b)`` inside the budgets (``--device-mem``,
  ``--host-mem``; ``--device-mem auto``: what tierkv detects under the cap, as a user who gives no
  budget gets it, detected once at the worker's start; a b that does not fit is reported with the
  largest that does) and loads with
  ``choice.load_kwargs()``; job tok/s = b x new tokens over the whole ``generate`` (prefill included),
  decode tok/s = tokens after each sequence's first over the union of the sequences' decode
  intervals (as ``bench_ragged``), storage bytes read per generated token (``/proc/self/io``), the
  planner's prediction and bound, and the link ceiling of a decode pass (b x raw disk / bytes a pass
  streams);
* peer: HF transformers + accelerate, ``device_map="auto"``, ``max_memory={"cpu": M}``, an offload
  folder, the same prompts left-padded into one batched ``generate``, the checkpoint and offload files
  evicted from the page cache before every forward (tierkv reads with O_DIRECT: cold too); job tok/s.
  M is tierkv's ``device_mem + host_mem`` when those are given; with ``--device-mem auto`` each b
  sweeps ``--peer-max-memory`` upwards (each value in its own process under the cap; the sweep stops
  at the first that fails) and keeps accelerate's fastest: each engine at its best under the same
  cap (accelerate's max_memory counts its CPU weights only, tierkv's budget its whole working set).
  It runs at growing b until it fails (OOM under the cap, an error, or ``--peer-timeout``);
* compute takes over at the first b whose measured decode pass takes > 1.3x the pass's disk time at
  the raw read speed (the planner's own predicted bound is shown beside it);
* where the time goes (tierkv): the engine's own step log (``tierkv.calibrate.StepLog``): prefill
  passes (count, seconds, of which waiting for the disk) and decode passes (mean seconds, waiting,
  computing), and the planner's prediction again from the engine after the run, fitted to its steps
  (``choose_batch(engine)``) beside the probe's one from before it;
* ``--repeat N``: each batch runs tierkv and accelerate N times, alternating, and the table shows each
  side's median run (every run's job tok/s and the CPU steal during it, the share of the machine a
  virtual machine's neighbours took, are in the JSON): on a shared VM one run's ratio can move by
  30% with a busy minute;
* both sides run under the environment's ``OMP_WAIT_POLICY`` (libgomp's default unless set; reported):
  ``OMP_WAIT_POLICY=PASSIVE`` (opt in from the environment) keeps a shared machine's other work from
  stalling 2-thread ops at spinning barriers, but costs torch 1.2-1.5x on a quiet machine.

    python scripts/bench_batch.py [--batches 1,2,4,8,16,32,64] [--new-tokens 16] [--cap 1600MiB]
        [--device-mem 1024MiB|auto] [--host-mem 0] [--peer-max-memory 1024MiB,1152MiB] [--threads 2]
        [--skip-peer | --skip-tierkv] [--peer-timeout 300]
        [--time-limit 900] [--repeat 1] [--model-root DIR] [--offload-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "default")      # libgomp reads it when torch loads

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))   # the checkout's tierkv
from bench_common import bench_model_dir, emit_json, memcap_usable, print_table, run_worker_script  # noqa: E402
import bench_weights as bw  # noqa: E402
from bench_ragged import merge, storage_read_bytes  # noqa: E402

AUTO_PEER_MAX_MEMORY = "896MiB,1024MiB,1152MiB,1280MiB"   # accelerate's sweep beside tierkv's detected budget
COMPUTE_OVER_DISK = 1.3          # a decode pass this much slower than its disk reads is compute-bound


def prompt_lengths(batch: int) -> list[int]:
    """b ragged lengths spread evenly over 64-512 (one prompt: 288, the middle)."""
    return [288] if batch == 1 else [64 + 448 * i // (batch - 1) for i in range(batch)]


def prompts_for(batch: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return [torch.randint(3, 32000, (n,), generator=gen).tolist() for n in prompt_lengths(batch)]


# ---------------------------------------------------------------------------------------------
# workers (each in its own process under the cap)


def _budget(o: dict[str, Any]) -> Any:
    """tierkv's budgets; a ``device_mem`` of None (``--device-mem auto``) detected here, once (under the cap:
    what the cgroup limit leaves less tierkv's headroom) and written back into ``o``."""
    from tierkv.budgets import detect_budgets
    from tierkv.config import Budget

    if o["device_mem"] is None:
        o["device_mem"] = detect_budgets(Budget(None, o["host_mem"], Path(o["offload"])), torch.device("cpu"))[0]
    return Budget(o["device_mem"], o["host_mem"], Path(o["offload"]))


def worker_prepare(o: dict[str, Any]) -> dict[str, Any]:
    """Convert the store once (``tierkv.load`` at the budgets) and read its data file raw: the disk ceiling."""
    import tierkv

    torch.set_num_threads(o["threads"])
    from tierkv.io.convert import find_cached_store

    _budget(o)
    with tierkv.load(o["model_dir"], device_mem=o["device_mem"], host_mem=o["host_mem"], offload_dir=o["offload"],
                     dtype="bfloat16", device="cpu") as engine:
        plan = engine.plan.summary() if engine.plan is not None else ""
        ring = engine.plan.ring_bytes if engine.plan is not None else 0     # the layer ring, or the piece ring
    store = find_cached_store(Path(o["model_dir"]), Path(o["offload"]), "bfloat16", None, "cpu")
    assert store is not None, "the budgets keep every layer resident: lower --device-mem so that layers stream"
    return {"data_path": str(store.data_path), "raw_disk_gbps": bw.raw_disk_gbps(store.data_path), "plan": plan,
            "device_mem_used": o["device_mem"], "ring_bytes": ring,
            "raw_ring_gbps": bw.raw_disk_gbps(store.data_path, window_bytes=ring)}


def worker_tierkv(o: dict[str, Any]) -> dict[str, Any]:
    """One batch size: plan it (choose_batch), load with its kwargs, generate, time it."""
    import tierkv
    from tierkv.batchplan import BatchInputs, choose_batch
    from tierkv.budgets import PlanError
    from tierkv.config import ModelConfig, Policy

    torch.set_num_threads(o["threads"])
    b, new, prompts = o["batch"], o["new_tokens"], prompts_for(o["batch"])
    inputs = BatchInputs(ModelConfig.from_dir(Path(o["model_dir"])), _budget(o),
                         Policy(dtype="bfloat16", device="cpu"), data_path=Path(o["data_path"]))
    try:
        choice = choose_batch(inputs, [len(p) for p in prompts], new, asked=b)
    except PlanError as exc:
        return {"fits": False, "why": str(exc)}
    load_kwargs = choice.load_kwargs()
    if o.get("micro_batches"):
        load_kwargs["micro_batches"] = o["micro_batches"]
    bw.evict_files([Path(o["data_path"])])
    with tierkv.load(o["model_dir"], device_mem=o["device_mem"], host_mem=o["host_mem"], offload_dir=o["offload"],
                     dtype="bfloat16", device="cpu", **load_kwargs) as engine:
        plan = engine.plan
        engine.generate([prompts[0][:8]], max_new_tokens=2, ignore_eos=True)      # warm-up (verifies CRCs)
        read0, t0, logged = storage_read_bytes(), time.perf_counter(), len(engine.runner.log.steps)
        stamps: dict[int, list[float]] = {i: [] for i in range(b)}
        stream = engine.stream(prompts, max_new_tokens=new, ignore_eos=True)
        for piece in stream:
            if piece.token_id is not None:
                stamps[piece.index].append(time.perf_counter())
        wall, read = time.perf_counter() - t0, storage_read_bytes() - read0
        batch_seen = max(r.stats.batch_size for r in stream.results)
        profile = step_profile(list(engine.runner.log.steps)[logged:])
        fitted = choose_batch(engine, [len(p) for p in prompts], new, asked=b)
    union = merge([(v[0], v[-1]) for v in stamps.values()])
    decode_s = sum(hi - lo for lo, hi in union)
    assert plan is not None
    return {"fits": True, "job_tok_s": b * new / wall, "decode_tok_s": b * (new - 1) / decode_s, "generate_s": wall,
            "read_bytes_per_token": read / (b * new), "predicted_tok_s": choice.predicted_tok_s,
            "predicted_bound": choice.bound, "micro_batches": load_kwargs.get("micro_batches", 1),
            "disk_layers": len(plan.disk_layers), "prefill_piece": plan.prefill_chunk_tokens, "pass_bytes": plan.streamed_bytes_per_token,
            "batch_seen": batch_seen, "plan_matches": plan.disk_layers == choice.plan.disk_layers,
            "peak_rss_bytes": bw.peak_rss_bytes(), "profile": profile, "fitted_tok_s": fitted.predicted_tok_s,
            "fitted_decode_step_s": fitted.options[0].decode_step_s, "fitted_bound": fitted.bound,
            "probe_decode_step_s": choice.options[0].decode_step_s, "device_mem_used": o["device_mem"]}


def step_profile(steps: list[Any]) -> dict[str, Any]:
    """Prefill passes (more tokens than rows) and decode passes of one run, from the engine's step log."""
    pre = [s for s in steps if s.tokens > s.rows]
    dec = [s for s in steps if s.tokens == s.rows]
    n = max(1, len(dec))
    return {"prefill_passes": len(pre), "prefill_s": sum(s.wall_s for s in pre),
            "prefill_wait_s": sum(s.wait_s for s in pre), "prefill_tokens": sum(s.tokens - s.rows for s in pre),
            "decode_passes": len(dec), "decode_pass_s": sum(s.wall_s for s in dec) / n,
            "decode_wait_s": sum(s.wait_s for s in dec) / n,
            "decode_compute_s": sum(s.wall_s - s.wait_s for s in dec) / n}


def worker_peer(o: dict[str, Any]) -> dict[str, Any]:
    """HF accelerate disk offload, one batched left-padded ``generate`` of the same prompts, cold."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(o["threads"])
    folder = Path(o["offload"]) / "accelerate"
    model = AutoModelForCausalLM.from_pretrained(o["model_dir"], dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={"cpu": o["max_memory"]},
                                                 offload_folder=str(folder)).eval()
    files = sorted(Path(o["model_dir"]).glob("*.safetensors")) + sorted(p for p in folder.rglob("*") if p.is_file())
    model.register_forward_pre_hook(lambda *_: bw.evict_files(files))
    prompts, new = prompts_for(o["batch"]), o["new_tokens"]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])                       # (B, T) left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    wall = time.perf_counter() - t0
    return {"runs": True, "job_tok_s": o["batch"] * new / wall, "generate_s": wall,
            "disk_layers": bw.layers_on_disk(getattr(model, "hf_device_map", {}) or {}, model.config.num_hidden_layers),
            "peak_rss_bytes": bw.peak_rss_bytes(), "max_memory": o["max_memory"]}


def peer_best(base: dict[str, Any], batch: int, max_memories: list[int], cap: str | None,
              timeout_s: float) -> dict[str, Any]:
    """accelerate at ``batch`` for each max_memory, smallest first, until one fails (a larger one would
    fail too): the fastest run, with every attempt under ``sweep``; the first failure when none ran."""
    sweep: dict[str, Any] = {}
    best: dict[str, Any] | None = None
    for m in sorted(max_memories):
        run = run_worker_script(__file__, "peer", dict(base, batch=batch, max_memory=m), cap, timeout_s)
        sweep[str(m)] = run.get("job_tok_s") if run.get("runs") else run.get("error", "failed")
        if not run.get("runs"):
            best = best or run
            break
        best = run if best is None or run["job_tok_s"] > best["job_tok_s"] else best
    assert best is not None, "no max_memory to try"
    return dict(best, sweep=sweep) if len(max_memories) > 1 else best


def median_run(runs: list[dict[str, Any]], ok: str) -> dict[str, Any]:
    """The run of median job tok/s (the lower middle of an even count) among ``runs`` of one contender,
    with every run's job tok/s and CPU steal beside it; the first failure if any run failed."""
    failed = [r for r in runs if not r.get(ok) or "job_tok_s" not in r]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["job_tok_s"])
    return dict(ordered[(len(ordered) - 1) // 2], job_tok_s_runs=[round(r["job_tok_s"], 3) for r in runs],
                cpu_steal_pct_runs=[r.get("cpu_steal_pct") for r in runs])


WORKERS = {"prepare": worker_prepare, "tierkv": worker_tierkv, "peer": worker_peer}


# ---------------------------------------------------------------------------------------------
# the parent


def summarize(args: argparse.Namespace, prep: dict[str, Any], tk: dict[int, dict[str, Any]],
              peer: dict[int, dict[str, Any]]) -> dict[str, Any]:
    raw = prep["raw_disk_gbps"] * 1e9
    for b, r in tk.items():
        if r.get("fits") and r.get("decode_tok_s"):
            r["pass_s"] = b / r["decode_tok_s"]
            r["pass_disk_s"] = r["pass_bytes"] / raw
            r["pass_ring_disk_s"] = r["pass_bytes"] / (prep["raw_ring_gbps"] * 1e9)
            r["ceiling_decode_tok_s"] = b / r["pass_disk_s"] if r["pass_bytes"] else None
            r["measured_bound"] = "compute" if r["pass_s"] > COMPUTE_OVER_DISK * r["pass_disk_s"] else "disk"
            if peer.get(b, {}).get("runs"):
                r["vs_accelerate"] = r["job_tok_s"] / peer[b]["job_tok_s"]
    ok = {b: r for b, r in tk.items() if r.get("fits") and r.get("decode_tok_s")}
    one, sixteen = ok.get(1), ok.get(16)
    ratios = [r["vs_accelerate"] for r in ok.values() if "vs_accelerate" in r]
    goals = {}
    if one and sixteen:
        goals["batch16_vs_1_decode"] = sixteen["decode_tok_s"] / one["decode_tok_s"]
        goals["batch16_vs_1_job"] = sixteen["job_tok_s"] / one["job_tok_s"]
        goals["batch16_over_10x_decode"] = goals["batch16_vs_1_decode"] >= 10
    if ratios:
        goals["min_vs_accelerate"] = min(ratios)
        goals["over_3x_accelerate_everywhere"] = min(ratios) >= 3
    return {"goals": goals, "compute_from_measured": next((b for b, r in sorted(ok.items())
                                                           if r["measured_bound"] == "compute"), None),
            "compute_from_predicted": next((b for b, r in sorted(ok.items()) if r["predicted_bound"] == "compute"),
                                           None)}


def profile_rows(tk: dict[int, dict[str, Any]], raw_gbps: float, ring_gbps: float) -> list[tuple[str, str]]:
    """Where tierkv's time went, per batch: prefill and decode passes, disk waits, compute, predictions."""
    rows = [("batch", "prefill passes: n, s (waiting for disk), prompt tokens | decode passes: n, mean s "
                      "(waiting / computing) vs disk at raw speed (16 MiB window / ring-sized) | predicted decode "
                      "pass s: probe / fitted")]
    for b, r in sorted(tk.items()):
        pr = r.get("profile")
        if not pr:
            continue
        disk, ring = r["pass_bytes"] / (raw_gbps * 1e9), r["pass_bytes"] / (ring_gbps * 1e9)
        rows.append((str(b), f"{pr['prefill_passes']}, {pr['prefill_s']:.2f} ({pr['prefill_wait_s']:.2f}), "
                             f"{pr['prefill_tokens']} | {pr['decode_passes']}, {pr['decode_pass_s']:.3f} "
                             f"({pr['decode_wait_s']:.3f} / {pr['decode_compute_s']:.3f}) vs {disk:.3f} / {ring:.3f} | "
                             f"{r['probe_decode_step_s']:.3f} / {r['fitted_decode_step_s']:.3f}"))
    return rows


def table_rows(tk: dict[int, dict[str, Any]], peer: dict[int, dict[str, Any]]) -> list[tuple[str, str]]:
    rows = [("batch", "tierkv job tok/s (predicted) | decode tok/s (ceiling) | read MiB/token | disk layers, "
                      "micro, prefill piece | bound measured/predicted | accelerate job tok/s | tierkv/accelerate")]
    for b, r in sorted(tk.items()):
        p = peer.get(b, {})
        acc = (f"{p['job_tok_s']:.3f}" + _runs(p) + (f" (max_memory {p['max_memory'] / 2**20:.0f} MiB)" if "sweep" in p
                                                      else "") if p.get("runs") else (p.get("error", "not run")[:60]))
        if not r.get("fits") or "decode_tok_s" not in r:
            rows.append((str(b), (r.get("why") or r.get("error", ""))[:160] + f" | accelerate {acc}"))
            continue
        ceiling = f"{r['ceiling_decode_tok_s']:.2f}" if r.get("ceiling_decode_tok_s") else "-"
        rows.append((str(b), f"{r['job_tok_s']:.2f}{_runs(r)} ({r['predicted_tok_s']:.2f}) | {r['decode_tok_s']:.2f} "
                             f"({ceiling}) | {r['read_bytes_per_token'] / 2**20:.1f} | {r['disk_layers']}, "
                             f"{r['micro_batches']}, {r['prefill_piece']} | {r['measured_bound']}/{r['predicted_bound']} | {acc} | "
                             + (f"{r['vs_accelerate']:.1f}x" if "vs_accelerate" in r else "-")))
    return rows


def _runs(r: dict[str, Any]) -> str:
    """" [a/b/c, steal x/y/z%]": every run's job tok/s and CPU steal when a batch ran more than once."""
    runs, steal = r.get("job_tok_s_runs", []), r.get("cpu_steal_pct_runs", [])
    if len(runs) < 2:
        return ""
    return f" [{'/'.join(f'{v:.2f}' for v in runs)}, steal {'/'.join(str(v) for v in steal)}%]"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--cap", default="1600MiB", help="memcap limit for every contender ('none': no cap)")
    ap.add_argument("--device-mem", default="1024MiB")
    ap.add_argument("--host-mem", default="0")
    ap.add_argument("--peer-max-memory", default=None,
                    help="accelerate's max_memory values to sweep, comma-separated (default: device_mem + host_mem; "
                         "with --device-mem auto: 896MiB,1024MiB,1152MiB,1280MiB)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=None,
                    help="run every batch with this many micro-batches instead of the planner's choice (to compare)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-tierkv", action="store_true", help="only the peer (e.g. a second invocation)")
    ap.add_argument("--peer-timeout", type=float, default=300)
    ap.add_argument("--time-limit", type=float, default=900, help="seconds; later runs are skipped past it")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each contender this many times per batch, alternating, and report the median run")
    ap.add_argument("--model-root", type=Path, default=Path(tempfile.gettempdir()) / "tierkv-bench")
    ap.add_argument("--offload-dir", type=Path, default=None)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--opts", default=None)
    return ap.parse_args()


def main() -> None:
    from tierkv.config import parse_size

    args = parse_args()
    if args.repeat < 1:
        raise SystemExit(f"--repeat {args.repeat}: give 1 or more (runs of each contender per batch)")
    if args.worker:
        emit_json(WORKERS[args.worker](json.loads(args.opts)))
        return
    t0, load_start = time.perf_counter(), os.getloadavg()
    model_dir = bench_model_dir(args.model_root)
    offload = args.offload_dir or args.model_root / "offload-batch"
    offload.mkdir(parents=True, exist_ok=True)
    model_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    cap = args.cap if args.cap != "none" and memcap_usable() else None
    if cap is None and args.cap != "none":
        print("WARNING: memcap cannot cap memory here; runs are NOT capped", flush=True)
    auto = args.device_mem == "auto"
    peer_mems = [parse_size(v) for v in (args.peer_max_memory or (AUTO_PEER_MAX_MEMORY if auto else "")).split(",")
                 if v] or [parse_size(args.device_mem) + parse_size(args.host_mem)]
    base = {"model_dir": str(model_dir), "offload": str(offload), "device_mem": None if auto else parse_size(args.device_mem),
            "host_mem": parse_size(args.host_mem), "threads": args.threads, "new_tokens": args.new_tokens,
            "micro_batches": args.micro_batches}
    prep = run_worker_script(__file__, "prepare", base, cap, 900)
    if "error" in prep:
        raise SystemExit(f"prepare failed: {prep['error']}")
    print(prep["plan"], flush=True)
    base["data_path"] = prep["data_path"]
    tk: dict[int, dict[str, Any]] = {}
    peer: dict[int, dict[str, Any]] = {}
    peer_failed = args.skip_peer
    for b in [int(x) for x in args.batches.split(",")]:
        if time.perf_counter() - t0 > args.time_limit:
            tk[b] = {"fits": False, "why": f"skipped: past --time-limit {args.time_limit:.0f} s"}
            continue
        tk_runs: list[dict[str, Any]] = []
        peer_runs: list[dict[str, Any]] = []
        for _ in range(args.repeat):          # alternating, so that a noisy minute does not fall on one side only
            if tk_runs and time.perf_counter() - t0 > args.time_limit:
                break                         # past the limit: the runs so far (each side ran as often)
            tk_runs.append({"fits": False, "why": "not run (--skip-tierkv)"} if args.skip_tierkv else
                           run_worker_script(__file__, "tierkv", dict(base, batch=b), cap, 600))
            print(f"  tierkv batch {b}: {json.dumps({k: v for k, v in tk_runs[-1].items() if k != 'why'})[:300]}",
                  flush=True)
            if not peer_failed and time.perf_counter() - t0 < args.time_limit:
                peer_runs.append(peer_best(base, b, peer_mems, cap, args.peer_timeout))
                peer_failed = not peer_runs[-1].get("runs")
                print(f"  accelerate batch {b}: {json.dumps(peer_runs[-1])[:300]}", flush=True)
            if (not args.skip_tierkv and not tk_runs[-1].get("fits")) or (peer_failed and peer_runs):
                break
        tk[b] = median_run(tk_runs, "fits")
        if peer_runs:
            peer[b] = median_run(peer_runs, "runs")
    s = summarize(args, prep, tk, peer)
    detected = f" (detected: {prep['device_mem_used'] / 2**20:.0f} MiB)" if auto else ""
    load_end = os.getloadavg()
    print_table(f"throughput mode: ~0.85B bf16 Llama ({model_bytes / 2**20:.0f} MiB) streamed from disk, cap "
                f"{cap or 'none'}, device_mem {args.device_mem}{detected}, host_mem {args.host_mem}, {args.new_tokens} new "
                f"tokens, prompts 64-512 ragged, {args.threads} threads, OMP_WAIT_POLICY={OMP_WAIT_POLICY}, raw disk {prep['raw_disk_gbps']:.2f} GB/s "
                f"(16 MiB window; {prep['raw_ring_gbps']:.2f} into a ring-sized {prep['ring_bytes'] / 2**20:.0f} MiB buffer), "
                f"load avg {load_start[0]:.1f} -> {load_end[0]:.1f}", table_rows(tk, peer))
    print_table("where tierkv's time went (the engine's step log)",
                profile_rows(tk, prep["raw_disk_gbps"], prep["raw_ring_gbps"]))
    print(f"goals: {json.dumps(s['goals'])}; compute takes over at batch {s['compute_from_measured']} (measured), "
          f"{s['compute_from_predicted']} (predicted)")
    emit_json(dict(s, bench="batch", tierkv={str(k): v for k, v in tk.items()}, accelerate={str(k): v for k, v in
                                                                                         peer.items()},
                   cap=cap, model_bytes=model_bytes, device_mem=args.device_mem, host_mem=args.host_mem,
                   new_tokens=args.new_tokens, threads=args.threads, omp_wait_policy=OMP_WAIT_POLICY, raw_disk_gbps=prep["raw_disk_gbps"],
                   raw_ring_gbps=prep["raw_ring_gbps"], ring_bytes=prep["ring_bytes"],
                   load_avg_start=list(load_start), load_avg_end=list(load_end), wall_s=round(time.perf_counter() - t0, 1)))


if __name__ == "__main__":
    main()
