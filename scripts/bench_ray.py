"""Ray batch jobs: throughput of 2 tierkv workers vs 1 on the demo model, with the local mode as peer.

Why this script exists: issue 17 asks what spreading one ``tierkv batch`` job over Ray workers buys.
One invocation measures, on the same JSONL job (``--requests`` prompts of ragged lengths, greedy,
``--max-tokens`` each, ``--batch`` sequences in flight per engine):

* peer: the local mode (``run_batch`` on one engine in this process, ``--threads`` torch threads),
  the speed one worker cannot beat;
* ``tierkv batch --ray`` with 1 worker, then with 2 (``run_ray_job``; each worker one Ray actor
  reserving ``--threads`` CPUs and loading the model once): total tok/s = generated tokens over the
  job's wall time, actor start and model load included (what a user waits for), and each worker's
  own tok/s over the seconds it spent generating;
* startup: the same job of one 1-token request, per worker count: actor start and model load, the
  fixed cost a job pays before its first batch; tok/s after startup = tokens / (wall - startup);
* ceiling: workers run side by side on separate cores, so 2 workers can reach at most
  min(2, free cores / threads) x the 1-worker speed; the free cores are this machine's cores less
  its load average at the start (other jobs share it). The verdict compares the 2-vs-1 ratio to it.

Every output is checked equal to the local mode's (tokens of every row). Starts a local Ray
instance (``--address`` joins a running cluster instead: then the workers may be on other machines).

    python scripts/bench_ray.py [--requests 96] [--max-tokens 64] [--batch 8] [--threads 1]
        [--address HOST:PORT] [--workers 2]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import prefer_checkout, print_table  # noqa: E402

prefer_checkout(Path(__file__).resolve().parent.parent)

LOAD = {"dtype": "float32", "kv": "exact", "device": "cpu"}


def _requests(n: int, max_tokens: int) -> list[str]:
    """``n`` JSONL lines: token-id prompts of 8..120 tokens (ragged), greedy, ``max_tokens`` each."""
    return [json.dumps({"id": i, "prompt": [(13 * j + 7 * i) % 4000 + 10 for j in range(8 + (37 * i) % 113)],
                        "max_tokens": max_tokens}) for i in range(n)]


def _tokens(path: Path) -> list[Any]:
    return [json.loads(line).get("tokens") for line in path.read_text().splitlines()]


def _local(inp: Path, out: Path, batch: int, threads: int) -> dict[str, Any]:
    import torch

    import tierkv
    from tierkv.batch import run_batch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with tierkv.load("demo", max_sequences=batch, **LOAD) as eng:
        load_s = time.perf_counter() - t0
        s = run_batch(eng, inp, out, batch=batch)
    return {"wall_s": time.perf_counter() - t0, "load_s": load_s, "tokens": s.generated_tokens,
            "tok_s": s.generated_tokens / (time.perf_counter() - t0), "gen_tok_s": s.tok_s}


def _on_ray(inp: Path, out: Path, workers: int, batch: int, threads: int) -> dict[str, Any]:
    from tierkv.batch import BatchJob
    from tierkv.ray import run_ray_job

    with BatchJob(inp, out) as job:
        s = run_ray_job(job, "demo", {**LOAD, "max_sequences": batch}, workers=workers, batch=batch, threads=threads)
    return {"wall_s": s.wall_s, "tokens": s.generated_tokens, "tok_s": s.tok_s,
            "workers": {w: {"rows": v.rows, "tok_s": round(v.tok_s, 2)} for w, v in s.workers.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--address", default=None, help="a running Ray cluster (default: a new local instance)")
    args = ap.parse_args()
    import ray

    cores = os.cpu_count() or 1
    load_avg = os.getloadavg()[0]
    free = max(cores - load_avg, 1.0)
    ceiling = min(float(args.workers), free / args.threads)
    if args.address:
        ray.init(address=args.address, logging_level="WARNING")
    else:
        ray.init(num_cpus=max(cores, args.workers * args.threads), include_dashboard=False,
                 object_store_memory=100 * 1024 ** 2, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    inp = tmp / "in.jsonl"
    inp.write_text("".join(line + "\n" for line in _requests(args.requests, args.max_tokens)))
    tiny = tmp / "tiny.jsonl"
    tiny.write_text(_requests(1, 1)[0] + "\n")
    startup = {n: _on_ray(tiny, tmp / f"tiny{n}.jsonl", n, args.batch, args.threads)["wall_s"]
               for n in (1, args.workers)}
    runs = {"local": _local(inp, tmp / "local.jsonl", args.batch, args.threads),
            "ray x1": _on_ray(inp, tmp / "ray1.jsonl", 1, args.batch, args.threads),
            f"ray x{args.workers}": _on_ray(inp, tmp / f"ray{args.workers}.jsonl", args.workers, args.batch,
                                            args.threads)}
    ray.shutdown()
    want = _tokens(tmp / "local.jsonl")
    same = all(_tokens(tmp / f) == want for f in ("ray1.jsonl", f"ray{args.workers}.jsonl"))
    one, many = runs["ray x1"], runs[f"ray x{args.workers}"]
    for n, r in ((1, one), (args.workers, many)):
        r["startup_s"] = startup[n]
        r["steady_tok_s"] = r["tokens"] / max(r["wall_s"] - startup[n], 1e-9)
    ratio, steady = many["tok_s"] / one["tok_s"], many["steady_tok_s"] / one["steady_tok_s"]
    rows = [("machine", f"{cores} cores, load average {load_avg:.2f} at the start"),
            ("job", f"{args.requests} requests x {args.max_tokens} tokens, demo model fp32, batch {args.batch}, "
                    f"{args.threads} thread(s) per engine")]
    for name, r in runs.items():
        extra = f" (load {r['load_s']:.1f} s, generating {r['gen_tok_s']:.1f} tok/s)" if "load_s" in r else \
            (f" (startup {r['startup_s']:.1f} s, after it {r['steady_tok_s']:.1f} tok/s) | per worker: "
             + ", ".join(f"{v['rows']} rows {v['tok_s']} tok/s" for v in r["workers"].values()))
        rows.append((name, f"{r['tokens']} tokens in {r['wall_s']:.1f} s = {r['tok_s']:.1f} tok/s{extra}"))
    rows += [(f"ratio x{args.workers} / x1", f"{ratio:.2f}x end to end, {steady:.2f}x after startup (ceiling "
                                             f"{ceiling:.2f}x: min(workers, free cores {free:.2f} / threads))"),
             ("outputs", "every row equal to the local mode" if same else "DIFFERENT from the local mode")]
    print_table("tierkv batch --ray: workers vs one", rows)
    print(json.dumps({"bench": "ray", "cores": cores, "load_avg": round(load_avg, 2), "requests": args.requests,
                      "max_tokens": args.max_tokens, "batch": args.batch, "threads": args.threads,
                      "runs": {k: {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                               for k, v in runs.items()},
                      "ratio": round(ratio, 3), "ratio_after_startup": round(steady, 3), "ceiling": round(ceiling, 3), "same_outputs": same}))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
