"""Prefill cost of the tiered KV cache against the dense cache: sparse tiered and exact tiered vs resident.

Why this script exists: issue 12 asks that sparse and tiered prefill cost what dense prefill costs
(+10% at most). A prefill piece through the tiered cache does two things the dense cache does not:
it attends over chunks (streamed where they are off the device) and it appends its K/V chunk by
chunk (abstracts, 2-bit key codes of every chunk that closes, chunk table entries, evictions and
write-behind when the KV spills). This script measures both, per context length, on the random
Llama of ``bench_kv`` (hidden 512, ``--layers`` layers, 8/4 heads of 64 dims, fp32 on CPU):

* ``resident``: kv="exact" without budgets (the dense cache); ``exact_tiered`` and ``sparse_tiered``
  (kv="sparse", key sketch on: ``kv_sketch=True``) under the same budgets: every layer on the device,
  a KV room of ``--device-kv-tokens`` there, ``--host-kv-tokens`` on the host, the rest in a fresh
  offload dir (the device budget is planned with the sketch's room, so the codes stay on);
* each configuration runs in a fresh process (``--worker``): a short warm-up prompt, then
  ``--repeats`` prefills of a ``--context``-token prompt of random ids (``generate``, one new
  token); the engine's own ``prefill_s`` is reported (smallest of the repeats), and, from timers
  around the KV cache's methods in that run, the seconds inside the cache (``kv_s``), its append
  path (``append_s``: ``pipeline.kv.append.append``) and the rest of it (``attention_s``: attention,
  fetch polling, speculation); the dense cache's append is its two slice writes (kv_s minus its
  ``dense_attention``);
* ``--baseline-tree DIR`` runs every configuration a second time with ``PYTHONPATH=DIR`` (another
  checkout's tierkv, e.g. ``git archive main tierkv | tar -x -C DIR``), interleaved with this tree's
  runs so that both see the same machine load: the before/after numbers of one invocation.

Ratios: ``sparse_vs_resident`` and ``exact_tiered_vs_resident`` = prefill_s / resident prefill_s
(goal <= 1.10), and the split of the sparse gap (sparse - resident prefill seconds) into its
append part (sparse append_s - resident append_s) and the rest (attention and bookkeeping).
Ends with one JSON line.

    python scripts/bench_kv_prefill.py [--contexts 8192,32768] [--layers 4] [--repeats 1]
        [--chunk-tokens N] [--device-kv-tokens 2048] [--host-kv-tokens 4096] [--threads 1]
        [--configs resident,exact_tiered,sparse_tiered] [--baseline-tree DIR]

One intra-op thread by default: on a shared 2-core machine two threads made small torch ops up to
100x slower (OpenMP barriers under contention; measured 54 ms against 0.3 ms for one chunk's
``encode_keys``) and the same run varied 3x. 8K takes about 10 s per configuration and tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import emit_json, prefer_checkout, print_table  # noqa: E402

from bench_kv import MODEL_SHAPE, kv_model_dir  # noqa: E402  (it puts this checkout first on sys.path)

sys.path[:] = [p for p in sys.path if p != str(HERE.parent)]
prefer_checkout(HERE.parent)   # after PYTHONPATH: a --baseline-tree worker imports that tree's tierkv

CONFIGS = ("resident", "exact_tiered", "sparse_tiered")
GOAL_RATIO = 1.10
WARMUP_TOKENS = 300


# ---------------------------------------------------------------------------------------------
# one configuration (in a worker process)


def budgets(model_dir: Path, device_kv_tokens: int, host_kv_tokens: int, chunk_tokens: int | None,
            offload_root: Path) -> dict[str, Any]:
    """load() budgets shared by both tiered configurations: every layer on the device, a KV room of
    ``device_kv_tokens`` (planned with the key sketch's room), ``host_kv_tokens`` on the host, the rest
    in a fresh offload dir."""
    import tierkv
    from tierkv.config import ModelConfig, Policy
    from tierkv.pipeline.kv import kv_bytes_per_token
    from tierkv.plan import make_plan, reserve_bytes

    cfg = ModelConfig.from_dir(model_dir)
    policy = Policy(dtype="float32", device="cpu", kv="sparse", kv_sketch=True, chunk_tokens=chunk_tokens,
                    kv_device_tokens=device_kv_tokens)
    roomy = make_plan(cfg, tierkv.Budget(), policy)
    weights = roomy.globals_bytes + cfg.num_layers * roomy.layer_bytes
    device_mem = weights + reserve_bytes(cfg, torch.float32, policy, device_kv_tokens, 1)
    offload = Path(tempfile.mkdtemp(prefix="prefill-", dir=offload_root))
    return dict(device_mem=device_mem, host_mem=host_kv_tokens * kv_bytes_per_token(cfg, torch.float32),
                offload_dir=str(offload), kv_device_tokens=device_kv_tokens)


class Timers:
    """Seconds spent inside a few functions, summed over calls (wrappers installed on module or
    class attributes for the run, removed by ``undo``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        real = getattr(owner, attr, None)
        if real is None:
            return
        self.seconds[name] = 0.0

        def timed(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return real(*args, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, real))

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def undo(self) -> None:
        for fn in reversed(self._undo):
            fn()


def _install_timers() -> Timers:
    import tierkv.pipeline.kv.dense as dense_mod
    import tierkv.pipeline.kv.tiered as tiered_mod

    timers = Timers()
    timers.wrap(tiered_mod.TieredKVCache, "attend", "tiered_kv_s")
    timers.wrap(tiered_mod, "append", "tiered_append_s")
    timers.wrap(dense_mod.DenseKVCache, "attend", "dense_kv_s")
    timers.wrap(dense_mod, "dense_attention", "dense_attention_s")
    return timers


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Prefill ``spec["context"]`` random ids ``spec["repeats"]`` times in configuration ``spec["config"]``."""
    torch.set_num_threads(spec["threads"])
    import tierkv

    name = spec["config"]
    kv = "sparse" if name == "sparse_tiered" else "exact"
    extra: dict[str, Any] = {"kv_sketch": True} if kv == "sparse" else {}
    if name != "resident":
        extra.update(spec["budgets"])
    engine = tierkv.load(spec["model_dir"], device="cpu", dtype="float32", kv=kv, kv_budget=0.1,
                         chunk_tokens=spec["chunk_tokens"], **extra)
    timers = _install_timers()
    ids = torch.randint(0, MODEL_SHAPE["vocab_size"], (spec["context"],),
                        generator=torch.Generator().manual_seed(spec["context"])).tolist()
    try:
        engine.generate(ids[:WARMUP_TOKENS], max_new_tokens=1, ignore_eos=True)
        best: dict[str, Any] | None = None
        for _ in range(spec["repeats"]):
            timers.reset()
            stats = engine.generate(ids, max_new_tokens=1, ignore_eos=True).stats
            run = {"prefill_s": stats.prefill_s, **timers.seconds, "kv": _kv_report(stats.kv)}
            if best is None or run["prefill_s"] < best["prefill_s"]:
                best = run
        assert best is not None
        return _split(best, tierkv.__file__)
    finally:
        timers.undo()
        engine.close()


def _kv_report(kv: dict[str, Any] | None) -> dict[str, Any]:
    keys = ("chunk_tokens", "sketch", "device_room_tokens", "evicted_chunks", "streamed_chunks", "bytes_written_disk")
    return {k: kv[k] for k in keys if kv and k in kv}


def _split(run: dict[str, Any], source: str) -> dict[str, Any]:
    """kv_s / append_s / attention_s of whichever cache ran (the other cache's timers read zero)."""
    if run.get("tiered_kv_s"):
        kv_s, append_s = run["tiered_kv_s"], run["tiered_append_s"]
    else:
        kv_s = run.get("dense_kv_s", 0.0)
        append_s = kv_s - run.get("dense_attention_s", 0.0)
    return {"prefill_s": run["prefill_s"], "kv_s": kv_s, "append_s": append_s, "attention_s": kv_s - append_s,
            "kv": run["kv"], "tierkv": source}


def in_worker(spec: dict[str, Any], tree: Path | None) -> dict[str, Any]:
    """Run ``run_worker(spec)`` in a fresh interpreter; ``tree`` first on its PYTHONPATH (None: this checkout)."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# one context, all configurations (and trees)


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Prefill ratios to the resident run and the split of each tiered gap into append and the rest."""
    res = runs.get("resident")
    out: dict[str, Any] = {}
    if res is None or "error" in res:
        return out
    for name in ("exact_tiered", "sparse_tiered"):
        run = runs.get(name)
        if run is None or "error" in run:
            continue
        short = name.split("_")[0]
        gap = run["prefill_s"] - res["prefill_s"]
        out[f"{short}_vs_resident"] = run["prefill_s"] / res["prefill_s"]
        out[f"{short}_gap_s"] = gap
        out[f"{short}_gap_append_s"] = run["append_s"] - res["append_s"]
        out[f"{short}_gap_attention_s"] = run["attention_s"] - res["attention_s"]
    return out


def run_context(args: argparse.Namespace, model_dir: Path, context: int, root: Path) -> dict[str, Any]:
    trees: dict[str, Path | None] = {"after": None}
    if args.baseline_tree is not None:
        trees = {"before": args.baseline_tree, "after": None}
    out: dict[str, Any] = {"context_tokens": context}
    runs: dict[str, dict[str, dict[str, Any]]] = {label: {} for label in trees}
    for rep in range(args.rounds):
        for name in args.configs:
            for label, tree in trees.items():
                shared = budgets(model_dir, args.device_kv_tokens, args.host_kv_tokens, args.chunk_tokens, root)
                spec = {"config": name, "context": context, "repeats": args.repeats, "threads": args.threads,
                        "model_dir": str(model_dir), "chunk_tokens": args.chunk_tokens, "budgets": shared}
                t0 = time.perf_counter()
                try:
                    run = in_worker(spec, tree)
                finally:
                    shutil.rmtree(shared["offload_dir"], ignore_errors=True)
                old = runs[label].get(name)
                if old is None or "error" in old or ("error" not in run and run["prefill_s"] < old["prefill_s"]):
                    runs[label][name] = run
                print(f"[{context}] {label} {name} round {rep}: {run.get('prefill_s', run.get('error'))} "
                      f"({time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.2f})", file=sys.stderr,
                      flush=True)
    for label in trees:
        out[label] = {"runs": runs[label], "ratios": ratios(runs[label])}
    return out


def print_report(results: list[dict[str, Any]]) -> None:
    for res in results:
        rows = []
        for label in ("before", "after"):
            if label not in res:
                continue
            for name, run in res[label]["runs"].items():
                text = run.get("error") or (f"prefill {run['prefill_s']:7.2f} s  kv {run['kv_s']:7.2f} s  "
                                            f"append {run['append_s']:6.2f} s  attention {run['attention_s']:7.2f} s")
                rows.append((f"{label} {name}", text))
            rows += [(f"{label} {k}", f"{v:.3f}") for k, v in res[label]["ratios"].items()]
        print_table(f"prefill of {res['context_tokens']} tokens", rows)
        print()


# ---------------------------------------------------------------------------------------------
# main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,32768", help="comma-separated prompt lengths in tokens")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="prefills per worker (the fastest is kept)")
    ap.add_argument("--rounds", type=int, default=1, help="workers per configuration and tree (the fastest is kept)")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="fixed chunk size (default: adaptive)")
    ap.add_argument("--device-kv-tokens", type=int, default=2048, help="KV room on the device, tokens")
    ap.add_argument("--host-kv-tokens", type=int, default=4096, help="KV room in host memory, tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each worker")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--baseline-tree", type=Path, default=None, help="another checkout's root to measure too")
    ap.add_argument("--model-root", type=Path, default=Path(tempfile.gettempdir()) / "tierkv-bench-models")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.configs = [c for c in args.configs.split(",") if c]
    if not set(args.configs) <= set(CONFIGS):
        ap.error(f"--configs: choose from {CONFIGS}")
    return args


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    model_dir = kv_model_dir(args.model_root, args.layers, "float32", 1.0)
    root = Path(tempfile.mkdtemp(prefix="tierkv-bench-kv-prefill-"))
    load_before = os.getloadavg()
    try:
        results = [run_context(args, model_dir, int(c), root) for c in args.contexts.split(",")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_report(results)
    emit_json({
        "bench": "kv_prefill", "device": "cpu", "dtype": "float32", "threads": args.threads,
        "model": {**MODEL_SHAPE, "num_hidden_layers": args.layers, "weights": "random (seed 0)"},
        "chunk_tokens": args.chunk_tokens, "device_kv_tokens": args.device_kv_tokens,
        "host_kv_tokens": args.host_kv_tokens, "repeats": args.repeats, "rounds": args.rounds,
        "baseline_tree": str(args.baseline_tree) if args.baseline_tree else None,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "goal_ratio": GOAL_RATIO,
        "contexts": {str(r["context_tokens"]): r for r in results},
    })


if __name__ == "__main__":
    main()
