"""GGUF files: llama.cpp vs tierkv resident decode on the same file, and converting the file into a store.

Why this script exists: issue 13's speed goal is tierkv's resident decode of a Q4 GGUF file at
>= 0.5x llama.cpp's own ``llama-bench`` on the same file and thread count (a model of >= 0.5B
parameters), set against tierkv on the same model in bf16, and its store must stay 4-5 bits per
weight with bounded conversion memory. All of it is measured in one invocation, on files made
by llama.cpp itself (``convert_hf_to_gguf.py`` + ``llama-quantize``; see ``--gguf-dir``'s
README.txt for how they were made), every engine in its own process:

* ``llama``: ``llama-bench -m FILE -p 0 -n 32 -t T -o json`` (tg32) and ``-p 128 -n 0`` (pp128),
  each its own process, for every build in ``--llama-bins`` (default: the ``GGML_NATIVE`` build
  and an AVX-512 build without AMX, whose kernels die with SIGILL on prompts here); the fastest
  working build's best repetition is the reference (its mean is reported beside it);
* ``tierkv``: ``tierkv.load(FILE, device="cpu")`` with T torch threads, greedy, EOS ignored,
  decode = (t(N) - t(1)) / (N - 1), best of ``--repeats`` (``bench_weights.time_decode``, as
  bench_quant.py); the first load converts the file into the cached store under
  ``--offload-dir`` (outside the timing);
* ``bf16``: the same through the HF checkpoint the GGUF files were made from, in bf16;
  ``own``: that checkpoint with tierkv's own quantization (``--own-quant``, default int4 groups
  of 32, the GGUF Q4 group size);
* ``convert``: ``tierkv convert FILE OUT`` in a fresh process under ``/work/shared/tools/memcap
  CAP`` (page cache included; the file evicted first): wall time, memcap's peak, the process's
  peak RSS, and the store's bits per weight (whole store and decoder layers only) against the
  file's, from ``gguf.GGUFReader`` and the store's manifest.

Bytes per token (everything a decode step reads: all tensors but the embedding, which is one row
per token unless it is also the LM head) times tok/s gives each engine's achieved weight
bandwidth, the number that says what bounds a memory-bound decode. The load average is recorded
next to every number (the machine is shared).

    python scripts/bench_gguf.py [--ggufs A.gguf,B.gguf] [--hf-dir DIR] [--threads 2,1]
        [--parts llama,tierkv,bf16,own,convert] [--cap 896MiB] [--new-tokens 16] [--repeats 3]

``PYTHONPATH=OTHER_TREE python scripts/bench_gguf.py`` measures another checkout's tierkv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_weights as bw  # noqa: E402  (puts the checkout's tierkv on sys.path, after PYTHONPATH's)
from bench_common import goals_row, LLAMA_SRC, llama_label, memcap_usable, run_llama, run_worker_script, emit_json, \
    print_table  # noqa: E402

GGUF_DIR = Path("/work/gguf-models")
LLAMA_BINS = (LLAMA_SRC / "build" / "bin", LLAMA_SRC / "build-noamx" / "bin")
PARTS = ("llama", "tierkv", "bf16", "own", "convert")
RATIO_GOAL = 0.5             # tierkv GGUF decode >= 0.5x llama.cpp tg on the same file and threads


# ---------------------------------------------------------------------------------------------
# the files' own facts


def gguf_facts(path: Path) -> dict[str, Any]:
    """Sizes of a GGUF file from its tensor table: parameters and bytes in all, in the decoder
    layers ("blk.*") and per token of decode (all tensors but the embedding, unless it is tied)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    types: dict[str, int] = {}
    out = {"file_bytes": path.stat().st_size, "params": 0, "tensor_bytes": 0, "layer_params": 0, "layer_bytes": 0}
    embed_bytes, tied = 0, True
    for t in reader.tensors:
        n, nb = int(t.n_elements), int(t.n_bytes)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        out["params"] += n
        out["tensor_bytes"] += nb
        if t.name.startswith("blk."):
            out["layer_params"] += n
            out["layer_bytes"] += nb
        embed_bytes += nb if t.name == "token_embd.weight" else 0
        tied = tied and t.name != "output.weight"
    out["step_bytes"] = out["tensor_bytes"] - (0 if tied else embed_bytes)
    out["types"] = dict(sorted(types.items()))
    out["bpw"] = bits_per_weight(out["tensor_bytes"], out["params"])
    out["layer_bpw"] = bits_per_weight(out["layer_bytes"], out["layer_params"])
    return out


def bits_per_weight(nbytes: float | None, params: float | None) -> float | None:
    return None if not nbytes or not params else round(8 * nbytes / params, 3)


def store_facts(store_dir: Path) -> dict[str, Any]:
    """Sizes of a tierkv weight store: all its files, its data file, its decoder layers' extents
    and the bytes a decode step reads (every extent but the embedding, unless the head is tied to it)."""
    from tierkv.io.store import WeightStore

    store = WeightStore.open(store_dir)
    try:
        extents = store.extents
        layers = sum(e.nbytes for name, e in extents.items() if name.startswith("layer."))
        total = sum(e.nbytes for e in extents.values())
        step = step_bytes_of({name: e.nbytes for name, e in extents.items()})
        schemes: dict[str, int] = {}
        for e in extents.values():
            for t in e.tensors.values():
                key = t.quant.scheme if t.quant is not None else t.dtype
                schemes[key] = schemes.get(key, 0) + 1
        return {"dir_bytes": sum(p.stat().st_size for p in store_dir.rglob("*") if p.is_file()),
                "data_bytes": store.data_path.stat().st_size, "extent_bytes": total, "layer_bytes": layers,
                "step_bytes": step, "tensor_kinds": dict(sorted(schemes.items())),
                "pack_device": store.pack_device}
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# tierkv workers: each runs in its own process and prints one JSON line


def worker_decode(o: dict[str, Any]) -> dict[str, Any]:
    """tierkv resident decode of ``o["model"]`` (a .gguf file or a HF directory) on CPU."""
    import torch

    import tierkv

    torch.set_num_threads(o["threads"])
    t0 = time.perf_counter()
    engine = tierkv.load(o["model"], offload_dir=o["offload"], device="cpu", dtype=o["dtype"], **o["load_kwargs"])
    load_s = time.perf_counter() - t0
    plan = engine.plan
    resident = plan is None or not (plan.disk_layers or plan.host_layers)
    gen = lambda n: engine.generate(o["ids"], max_new_tokens=n, ignore_eos=True)  # noqa: E731
    first = gen(2)
    timing = bw.time_decode(gen, o["new_tokens"], o["repeats"])
    out = {"tok_s": timing.tok_s, "step_s": timing.step_s, "load_s": round(load_s, 2), "all_resident": resident,
           "peak_rss_bytes": bw.peak_rss_bytes(), "tokens": list(first.token_ids)[:4],
           "step_bytes": _step_bytes(engine, o["load_kwargs"])}
    engine.close()
    return out


def _step_bytes(engine: Any, load_kwargs: dict[str, Any]) -> int:
    """Bytes of weights a decode step reads: the engine's store's (a converted GGUF file), or, for a
    HF directory loaded resident, its layout as ``io.store.plan_layout`` would store it."""
    import torch

    from tierkv.io.store import plan_layout
    from tierkv.quantspec import parse_weight_quant

    if getattr(engine, "store", None) is not None:
        return store_facts(engine.store.dir)["step_bytes"]
    quant = parse_weight_quant(load_kwargs["quant"], load_kwargs["group_size"], False) if load_kwargs else None
    extents = {e.name: e for e in plan_layout(engine.config, torch.bfloat16, quant, "cpu")}
    return step_bytes_of({k: e.nbytes for k, e in extents.items()})


def step_bytes_of(extent_bytes: dict[str, int]) -> int:
    """A decode step reads every extent but the embedding (one row per token), unless the model has
    no separate head and the embedding is the LM head too."""
    total = sum(extent_bytes.values())
    return total - (extent_bytes.get("embed", 0) if "head" in extent_bytes else 0)


def worker_convert(o: dict[str, Any]) -> dict[str, Any]:
    """``tierkv convert FILE OUT --json`` in this process (run under memcap): wall time, peak RSS
    (taken before the store is opened to measure it), then the store's sizes."""
    from typer.main import get_command

    from tierkv.cli import app

    t0 = time.perf_counter()
    rc = get_command(app).main(args=["convert", o["model"], o["out"], "--json", *o["extra"]], standalone_mode=False)
    if isinstance(rc, int) and rc != 0:                  # the CLI said why on stderr
        raise SystemExit(rc)
    seconds = time.perf_counter() - t0
    peak = bw.peak_rss_bytes()
    return {"convert_s": round(seconds, 2), "peak_rss_bytes": peak, "store": store_facts(Path(o["out"]))}


WORKERS = {"decode": worker_decode, "convert": worker_convert}


def run_worker(kind: str, opts: dict[str, Any], cap: str | None, timeout_s: float = 1800) -> dict[str, Any]:
    """``--worker kind`` in a fresh interpreter (under ``memcap cap`` when given): its last JSON
    line, memcap's peak and OOM kills, and the load average at its start; a crash or a timeout
    becomes {"error": ...}."""
    load = round(os.getloadavg()[0], 2)
    return {"load_avg": load, **run_worker_script(__file__, kind, opts, cap, timeout_s)}


# ---------------------------------------------------------------------------------------------
# the parent: run every contender, collect, compare


def decode_opts(args: argparse.Namespace, model: Path, threads: int, ids: list[int],
                load_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": str(model), "threads": threads, "ids": ids, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "offload": str(args.offload_dir), "dtype": "bfloat16",
            "load_kwargs": load_kwargs or {}}


def own_quant_kwargs(label: str) -> dict[str, Any]:
    """``--own-quant`` ("int4:32", "int8:64") -> ``tierkv.load`` keywords."""
    scheme, _, group = label.partition(":")
    return {"quant": scheme, "group_size": int(group) if group.isdigit() else (group or 64)}


def run_convert(args: argparse.Namespace, gguf: Path, cap: str | None) -> dict[str, Any]:
    """Convert ``gguf`` into a fresh store under the cap (file evicted first: pages cached by another
    process are charged elsewhere), measure it, then remove the store."""
    out = Path(tempfile.mkdtemp(prefix=f"convert-{gguf.stem}-", dir=args.offload_dir)) / "store"
    bw.evict_files([gguf])
    try:
        return run_worker("convert", {"model": str(gguf), "out": str(out), "extra": args.convert_args}, cap)
    finally:
        if not args.keep_stores:
            shutil.rmtree(out.parent, ignore_errors=True)


def collect(args: argparse.Namespace, ids: list[int], cap: str | None) -> dict[str, Any]:
    """Every measurement, keyed "llama[BUILD]/FILE/tT", "tierkv/FILE/tT", "bf16/tT", "own/tT", "convert/FILE"."""
    runs: dict[str, Any] = {}

    def note(key: str, value: dict[str, Any]) -> None:
        runs[key] = value
        shown = value.get("tg_best", value.get("tok_s", value.get("convert_s")))
        print(f"{key}: {shown if shown is not None else value.get('error')} (load {value.get('load_avg')})", flush=True)

    for t in args.threads:
        for g in args.ggufs:
            for bin_dir in args.llama_bins if "llama" in args.parts else []:
                note(f"llama[{llama_label(bin_dir)}]/{g.name}/t{t}",
                     run_llama(bin_dir / "llama-bench", g, t, args.llama_tokens, 128, args.llama_args))
            if "tierkv" in args.parts:
                note(f"tierkv/{g.name}/t{t}", run_worker("decode", decode_opts(args, g, t, ids), None))
        if "bf16" in args.parts:
            note(f"bf16/t{t}", run_worker("decode", decode_opts(args, args.hf_dir, t, ids), None))
        if "own" in args.parts:
            kw = own_quant_kwargs(args.own_quant)
            note(f"own/t{t}", run_worker("decode", decode_opts(args, args.hf_dir, t, ids, kw), None))
    if "convert" in args.parts:
        for g in args.ggufs:
            note(f"convert/{g.name}", run_convert(args, g, cap))
    return runs


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def _gbps(step_bytes: float | None, tok_s: float | None) -> float | None:
    return None if not step_bytes or not tok_s else round(step_bytes * tok_s / 1e9, 2)


def best_llama(runs: dict[str, Any], name: str, t: int) -> dict[str, Any]:
    """Of every llama.cpp build measured on ``name`` at ``t`` threads: the fastest tg (its best
    repetition) and the fastest pp, with the builds they came from, and each build's errors."""
    mine = {k.split("]", 1)[0].removeprefix("llama["): r for k, r in runs.items()
            if k.startswith("llama[") and k.endswith(f"]/{name}/t{t}")}
    out: dict[str, Any] = {"errors": {f"{b} {kind}": r[f"{kind}_error"] for b, r in mine.items()
                                      for kind in ("tg", "pp") if r.get(f"{kind}_error")}}
    for kind in ("tg", "pp"):
        ok = {b: r for b, r in mine.items() if r.get(f"{kind}_best") is not None}
        b = max(ok, key=lambda x: ok[x][f"{kind}_best"], default=None)
        out.update({f"{kind}_build": b, f"{kind}_best": ok[b][f"{kind}_best"] if b else None,
                    f"{kind}_mean": ok[b][f"{kind}_tok_s"] if b else None, f"{kind}_std": ok[b].get(f"{kind}_std") if b else None,
                    f"{kind}_load_avg": ok[b].get("load_avg") if b else None})
    return out


def summarize(runs: dict[str, Any], files: dict[str, dict[str, Any]], threads: list[int]) -> dict[str, Any]:
    """Per file and thread count: llama.cpp's best tg/pp, tierkv on the file, ratios over llama.cpp
    and over tierkv bf16 / own quantization, achieved weight bandwidth; per file: the conversion."""
    s: dict[str, Any] = {"rows": {}, "convert": {}, "goals": {}}
    for name, facts in files.items():
        for t in threads:
            llama, tk = best_llama(runs, name, t), runs.get(f"tierkv/{name}/t{t}", {})
            bf16, own = runs.get(f"bf16/t{t}", {}), runs.get(f"own/t{t}", {})
            row = {"llama_tg_best": llama["tg_best"], "llama_tg_mean": llama["tg_mean"], "llama_tg_std": llama["tg_std"],
                   "llama_tg_build": llama["tg_build"], "llama_pp128_best": llama["pp_best"],
                   "llama_pp_build": llama["pp_build"], "llama_load_avg": llama["tg_load_avg"],
                   "llama_errors": llama["errors"], "tierkv_tok_s": tk.get("tok_s"), "tierkv_load_avg": tk.get("load_avg"),
                   "tierkv_all_resident": tk.get("all_resident"), "tierkv_error": tk.get("error"),
                   "bf16_tok_s": bf16.get("tok_s"), "bf16_load_avg": bf16.get("load_avg"), "own_tok_s": own.get("tok_s")}
            row["tierkv_vs_llama"] = _ratio(row["tierkv_tok_s"], row["llama_tg_best"])
            row["tierkv_vs_llama_mean"] = _ratio(row["tierkv_tok_s"], row["llama_tg_mean"])
            row["tierkv_vs_bf16"] = _ratio(row["tierkv_tok_s"], row["bf16_tok_s"])
            row["tierkv_vs_own"] = _ratio(row["tierkv_tok_s"], row["own_tok_s"])
            row["llama_vs_bf16"] = _ratio(row["llama_tg_best"], row["bf16_tok_s"])
            row["llama_weight_gbps"] = _gbps(facts["step_bytes"], row["llama_tg_best"])
            row["tierkv_weight_gbps"] = _gbps(tk.get("step_bytes"), row["tierkv_tok_s"])
            row["bf16_weight_gbps"] = _gbps(bf16.get("step_bytes"), row["bf16_tok_s"])
            row["own_weight_gbps"] = _gbps(own.get("step_bytes"), row["own_tok_s"])
            s["rows"][f"{name}/t{t}"] = row
            if row["tierkv_vs_llama"] is not None:
                s["goals"][f"{name}_t{t}_ge_{RATIO_GOAL}x_llama"] = row["tierkv_vs_llama"] >= RATIO_GOAL
        conv = runs.get(f"convert/{name}")
        if conv is not None:
            s["convert"][name] = summarize_convert(conv, facts)
    return s


def summarize_convert(conv: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """One conversion: time, memory, and the store's bits per weight against the file's."""
    store = conv.get("store", {})
    return {"convert_s": conv.get("convert_s"), "wall_s": conv.get("wall_s"), "error": conv.get("error"),
            "memcap_limit_bytes": conv.get("memcap_limit_bytes"), "memcap_peak_bytes": conv.get("memcap_peak_bytes"),
            "memcap_oom_kills": conv.get("memcap_oom_kills"), "peak_rss_bytes": conv.get("peak_rss_bytes"),
            "load_avg": conv.get("load_avg"), "gguf_bpw": facts["bpw"], "gguf_layer_bpw": facts["layer_bpw"],
            "store_bpw": bits_per_weight(store.get("extent_bytes"), facts["params"]),
            "store_layer_bpw": bits_per_weight(store.get("layer_bytes"), facts["layer_params"]),
            "store_dir_bytes": store.get("dir_bytes"), "gguf_file_bytes": facts["file_bytes"],
            "store_vs_gguf_bytes": _ratio(store.get("extent_bytes"), facts["tensor_bytes"]),
            "store_tensor_kinds": store.get("tensor_kinds")}


def _f(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else f"{x:{spec}}"


def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f} MiB"


def table_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, r in s["rows"].items():
        for build, err in r["llama_errors"].items():
            rows.append((f"{key} llama.cpp {build}", f"FAILED: {err}"))
        if r["llama_tg_best"] is not None:
            rows.append((f"{key} llama.cpp", f"tg {_f(r['llama_tg_best'])} tok/s best (mean {_f(r['llama_tg_mean'])} "
                         f"+- {_f(r['llama_tg_std'])}, {r['llama_tg_build']}), pp128 {_f(r['llama_pp128_best'], '.1f')} "
                         f"tok/s ({r['llama_pp_build']}), {_f(r['llama_weight_gbps'])} GB/s of weights "
                         f"(load {_f(r['llama_load_avg'], '.1f')})"))
        if r["tierkv_tok_s"] is not None or r["tierkv_error"]:
            rows.append((f"{key} tierkv", f"FAILED: {r['tierkv_error']}" if r["tierkv_error"] else
                         f"{_f(r['tierkv_tok_s'])} tok/s = {_f(r['tierkv_vs_llama'])}x llama.cpp best "
                         f"({_f(r['tierkv_vs_llama_mean'])}x its mean), {_f(r['tierkv_vs_bf16'])}x tierkv bf16, "
                         f"{_f(r['tierkv_vs_own'])}x tierkv own quant, {_f(r['tierkv_weight_gbps'])} GB/s of weights "
                         f"(load {_f(r['tierkv_load_avg'], '.1f')})"))
    for t_key in sorted({k.rsplit("/", 1)[1] for k in s["rows"]}):
        r = next(v for k, v in s["rows"].items() if k.endswith("/" + t_key))
        if r["bf16_tok_s"] is not None:
            rows.append((f"{t_key} tierkv bf16 (HF dir)", f"{_f(r['bf16_tok_s'])} tok/s, {_f(r['bf16_weight_gbps'])} GB/s "
                         f"of weights (load {_f(r['bf16_load_avg'], '.1f')})"))
        if r["own_tok_s"] is not None:
            rows.append((f"{t_key} tierkv own quant (HF dir)", f"{_f(r['own_tok_s'])} tok/s, "
                         f"{_f(r['own_weight_gbps'])} GB/s of weights"))
    for name, c in s["convert"].items():
        rows.append((f"convert {name}", f"FAILED: {c['error']}" if c["error"] else
                     f"{_f(c['convert_s'], '.1f')} s, store {_f(c['store_bpw'])} bpw (layers {_f(c['store_layer_bpw'])}) "
                     f"vs file {_f(c['gguf_bpw'])} (layers {_f(c['gguf_layer_bpw'])}); memcap peak "
                     f"{_mib(c['memcap_peak_bytes'])} of {_mib(c['memcap_limit_bytes'])}, peak RSS "
                     f"{_mib(c['peak_rss_bytes'])}, OOM kills {c['memcap_oom_kills']} (load {_f(c['load_avg'], '.1f')})"))
    rows.append(goals_row(s["goals"]))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--gguf-dir", type=Path, default=GGUF_DIR, help="where the llama.cpp-made files are")
    ap.add_argument("--ggufs", default="llama-0.85b-Q4_0.gguf,llama-0.85b-Q4_K_M.gguf",
                    help="comma list of GGUF files (relative to --gguf-dir, or absolute)")
    ap.add_argument("--hf-dir", type=Path, default=None,
                    help="the HF checkpoint the files were made from (default GGUF_DIR/hf/llama-h2048-l16-bf16)")
    ap.add_argument("--llama-bins", default=",".join(map(str, LLAMA_BINS)),
                    help="comma list of llama.cpp build/bin dirs (each measured; the fastest working one is compared)")
    ap.add_argument("--llama-args", default="", help="extra llama-bench arguments, space separated (e.g. '--repack 0')")
    ap.add_argument("--threads", default="2,1", help="comma list of thread counts")
    ap.add_argument("--llama-tokens", type=int, default=32, help="llama-bench -n (tg) tokens")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16, help="tierkv decode tokens N in (t(N) - t(1)) / (N - 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--own-quant", default="int4:32", help="tierkv's own quantization of --hf-dir for 'own'")
    ap.add_argument("--cap", default="896MiB", help="memcap limit for the conversion ('none': no cap)")
    ap.add_argument("--convert-args", default="", help="extra `tierkv convert` arguments, space separated")
    ap.add_argument("--keep-stores", action="store_true", help="keep the converted stores (under --offload-dir)")
    ap.add_argument("--offload-dir", type=Path, default=Path(tempfile.gettempdir()) / "tierkv-bench-gguf")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--opts", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.parts = args.parts.split(",")
    if bad := [p for p in args.parts if p not in PARTS]:
        ap.error(f"unknown part {bad}; parts: {', '.join(PARTS)}")
    args.threads = [int(t) for t in args.threads.split(",")]
    args.ggufs = [p if p.is_absolute() else args.gguf_dir / p for p in map(Path, args.ggufs.split(","))]
    args.hf_dir = args.hf_dir or args.gguf_dir / "hf" / "llama-h2048-l16-bf16"
    args.convert_args = args.convert_args.split()
    args.llama_args = args.llama_args.split()
    args.llama_bins = [Path(p) for p in args.llama_bins.split(",") if p]
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse missing inputs with what makes them."""
    missing = [str(g) for g in args.ggufs if not g.is_file()]
    if {"bf16", "own"} & set(args.parts) and not (args.hf_dir / "config.json").is_file():
        missing.append(str(args.hf_dir))
    if "llama" in args.parts:
        built = [b for b in args.llama_bins if (b / "llama-bench").is_file()]
        for b in sorted(set(args.llama_bins) - set(built)):
            print(f"WARNING: no llama-bench in {b}: that build is skipped", flush=True)
        args.llama_bins = built
        missing += [] if built else ["llama-bench (in any of --llama-bins)"]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: build llama.cpp and the files as {args.gguf_dir}/README.txt "
                 f"says (or pass --ggufs / --hf-dir / --llama-bins; --parts without llama needs no build)")


def main() -> None:
    args = parse_args()
    if args.worker:                                   # a contender's process: one JSON line on stdout
        emit_json(WORKERS[args.worker](json.loads(args.opts)))
        return
    check_inputs(args)
    t0, load_start = time.perf_counter(), os.getloadavg()
    args.offload_dir.mkdir(parents=True, exist_ok=True)
    import torch

    ids = torch.randint(3, 4096, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    cap = args.cap if args.cap != "none" and memcap_usable() else None
    if args.cap != "none" and cap is None and "convert" in args.parts:
        print("WARNING: memcap cannot cap memory here; the conversion is NOT capped", flush=True)
    files = {g.name: gguf_facts(g) for g in args.ggufs}
    runs = collect(args, ids, cap)
    s = summarize(runs, files, args.threads)
    load_end = os.getloadavg()
    build = next((r.get("build") for k, r in runs.items() if k.startswith("llama[") and r.get("build")), None)
    print_table(f"GGUF decode: llama.cpp {build or ''} vs tierkv, cpu, threads {args.threads}, tierkv prompt "
                f"{args.prompt_len} + {args.new_tokens} new, load avg {load_start[0]:.1f} -> {load_end[0]:.1f} "
                f"on {os.cpu_count()} cores", table_rows(s))
    emit_json(dict(s, bench="gguf", files=files, runs=runs, parts=args.parts, threads=args.threads,
                   hf_dir=str(args.hf_dir), cap=cap, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                   llama_tokens=args.llama_tokens, llama_args=args.llama_args,
                   llama_bins=[str(b) for b in args.llama_bins], repeats=args.repeats, own_quant=args.own_quant,
                   llama_build=build, load_avg_start=list(load_start), load_avg_end=list(load_end),
                   cpu_count=os.cpu_count(), wall_s=round(time.perf_counter() - t0, 1)))


if __name__ == "__main__":
    main()
