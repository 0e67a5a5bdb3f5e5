"""Resident bf16 decode and prefill: tierkv vs llama.cpp's ``llama-bench`` vs HF transformers.

Why this script exists: issue 14's goals are ratios to peers on the same model and thread count,
measured in one run: resident bf16 decode >= 0.7x llama.cpp on a ~0.85B Llama and >= 0.5x on a
~135M one, >= 1.5x HF transformers on both; prefill tok/s at 512, 4K and 16K prompt tokens
>= 1.0x HF at every length (llama.cpp's pp beside it). Models: random bf16 Llamas from
``bench_common.bench_model_dir`` with 32K positions: ``135m`` (SmolLM-135M's shape: hidden 576,
30 layers, 9/3 heads, intermediate 1536, vocab 49152, tied head) and ``0.85b`` (``BENCH_MODEL``).
Every contender runs in its own process, with the same ``--threads``:

* ``tierkv``: ``tierkv.load(DIR, device="cpu", dtype="bfloat16", kv="exact")`` (exact attention,
  as the peers compute); decode = (N - 1) / (t(N) - t(1)) of greedy ``generate`` after a
  ``--prompt-len`` prompt, EOS ignored, best of ``--repeats`` (``bench_weights.time_decode``);
  prefill at each length = n / wall time of ``generate(n tokens, max_new_tokens=1)``, best of
  ``--prefill-repeats``, after a short warm-up;
* ``hf``: ``AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.bfloat16)`` (its default SDPA
  attention), timed the same way through ``generate``;
* ``llama``: ``llama-bench -p 0 -n 32 -d P`` (tg32 after a P = ``--prompt-len`` token context, as
  tierkv and HF decode; best repetition) and ``-p 512,4096,16384 -n 0
  -r R`` on the same checkpoint converted to a bf16 GGUF by llama.cpp's own
  ``convert_hf_to_gguf.py`` (cached beside the checkpoint; the random model gets a small
  SentencePiece vocabulary, which the converter pads to the model's, so ``sentencepiece`` must be
  installed). Without ``--llama-bench`` (or the converter) the column is skipped, with why.

Ceilings in the same run: the bf16 matrix-vector stream (GB/s, decode) and the bf16 GEMM
(TFLOP/s, prefill) of ``bench_common``; each engine's decode is also given as the weight bytes it
streams per second. The load average is recorded next to every number (the machine is shared).

``--compile`` adds ``tierkv-compiled``: the same tierkv run with ``tierkv.load(..., compile=True)`` in its
own process (its warm-ups compile, so the timed calls run the compiled graphs), with its ratio to
eager tierkv and what compiling cost (seconds, graphs, recompiles).

    python scripts/bench_step.py [--models 135m,0.85b] [--parts decode,prefill]
        [--engines tierkv,hf,llama] [--compile] [--prefill-lengths 512,4096,16384] [--threads 2]
        [--llama-bench PATH] [--convert-script PATH] [--model-root DIR]

``PYTHONPATH=OTHER_TREE python scripts/bench_step.py --engines tierkv`` measures another checkout
(a before/after). The full run takes 30-60 minutes on 2 cores (HF at 16K dominates).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_weights as bw  # noqa: E402  (puts the checkout's tierkv on sys.path, after PYTHONPATH's)
from bench_common import goals_row, LLAMA_SRC, bench_model_dir, best_of, emit_json, gemm_tflops, matvec_gbps, memory_read_gbps, print_table, \
    run_llama, run_worker_script  # noqa: E402

SMALL_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                   intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
MODELS = {"135m": SMALL_SHAPE, "0.85b": {}}            # shapes over bench_common.BENCH_MODEL
POSITIONS = 32768                                      # every model's max positions: room for 16K prompts
DECODE_GOAL_VS_LLAMA = {"135m": 0.5, "0.85b": 0.7}
DECODE_GOAL_VS_HF = 1.5
PREFILL_GOAL_VS_HF = 1.0
ENGINES = ("tierkv", "hf", "llama")
PARTS = ("decode", "prefill")
LLAMA_TG_TOKENS = 32


# ---------------------------------------------------------------------------------------------
# the models and their GGUF copies


def model_dir(root: Path, name: str) -> Path:
    return bench_model_dir(root, shape=dict(MODELS[name], max_position_embeddings=POSITIONS))


def step_weight_bytes(model: Path) -> int:
    """Weight bytes one decode step reads from a safetensors checkpoint: every tensor but the
    embedding (one row per token), unless there is no separate LM head (tied: it is the head)."""
    sizes: dict[str, int] = {}
    for file in sorted(model.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"})
    embed = sum(n for k, n in sizes.items() if k.endswith("embed_tokens.weight"))
    tied = not any(k.endswith("lm_head.weight") for k in sizes)
    return sum(sizes.values()) - (0 if tied else embed)


def sentencepiece_vocab(path: Path) -> None:
    """A small BPE SentencePiece model (512 pieces of made-up words) at ``path``: llama.cpp's
    converter needs a tokenizer it knows, the random model has none, and llama-bench never reads text."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=512,
                                   model_type="bpe", minloglevel=2)
    path.write_bytes(buf.getvalue())


def make_gguf(model: Path, convert_script: Path) -> Path:
    """The checkpoint as a bf16 GGUF made by llama.cpp's converter (once: cached beside it). The
    converter reads a sibling folder of links to the checkpoint plus the SentencePiece vocabulary."""
    out = model.parent / f"{model.name}.gguf"
    if out.is_file():
        return out
    src = model.parent / f"{model.name}-gguf-src"
    src.mkdir(exist_ok=True)
    for item in model.iterdir():
        if item.suffix in (".json", ".safetensors") and item.name.startswith(("config", "model")):
            link = src / item.name
            if not link.exists():
                link.symlink_to(item.resolve())
    if not (src / "tokenizer.model").is_file():
        sentencepiece_vocab(src / "tokenizer.model")
    tmp = out.with_suffix(".gguf.part")
    proc = subprocess.run([sys.executable, str(convert_script), str(src), "--outtype", "bf16", "--outfile", str(tmp)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{convert_script.name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    tmp.rename(out)
    return out


def llama_unavailable(args: argparse.Namespace) -> str | None:
    """Why the llama.cpp column cannot run here (None: it can)."""
    if not args.llama_bench.is_file():
        return (f"no llama-bench at {args.llama_bench}: the llama.cpp column is skipped (build llama.cpp as "
                f"/work/shared/FACTS.md says, or pass --llama-bench PATH)")
    if not args.convert_script.is_file():
        return f"no {args.convert_script}: the llama.cpp column is skipped (pass --convert-script PATH)"
    if importlib.util.find_spec("sentencepiece") is None:
        return "the GGUF conversion needs sentencepiece (pip install sentencepiece): the llama.cpp column is skipped"
    return None


# ---------------------------------------------------------------------------------------------
# workers: each runs in its own process and prints one JSON line


def prompt_ids(n: int) -> list[int]:
    import torch

    return torch.randint(3, 4000, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def _timed_prefills(first_token: Any, lengths: list[int], repeats: int) -> dict[str, Any]:
    """tok/s of ``first_token(ids)`` (a prefill and one token) at each prompt length, best of ``repeats``."""
    first_token(prompt_ids(64))                                             # warm-up
    out: dict[str, Any] = {"prefill_tok_s": {}, "prefill_load_avg": {}}
    for n in lengths:
        ids = prompt_ids(n)
        seconds = best_of(lambda: first_token(ids), repeats)
        out["prefill_tok_s"][str(n)] = round(n / seconds, 2)
        out["prefill_load_avg"][str(n)] = round(os.getloadavg()[0], 2)
        print(f"  prefill {n}: {n / seconds:.1f} tok/s", file=sys.stderr, flush=True)
    return out


def worker_tierkv(o: dict[str, Any]) -> dict[str, Any]:
    import torch

    import tierkv

    torch.set_num_threads(o["threads"])
    longest = max(o["lengths"] or [o["prompt_len"] + o["new_tokens"]])
    engine = tierkv.load(o["model"], device="cpu", dtype="bfloat16", kv="exact", kv_device_tokens=longest + 8,
                         compile=bool(o.get("compile")))
    out: dict[str, Any] = {"load_avg": round(os.getloadavg()[0], 2), "prefill_chunk_tokens": engine.prefill_chunk_tokens}
    if o["decode"]:
        ids = prompt_ids(o["prompt_len"])
        gen = lambda n: engine.generate(ids, max_new_tokens=n, ignore_eos=True)  # noqa: E731
        gen(2)                                                              # warm-up (and, compiled, the compile)
        out["warm_compile"] = engine.compile_stats()["compile"]
        timing = bw.time_decode(gen, o["new_tokens"], o["repeats"])
        out.update(tok_s=round(timing.tok_s, 2), tokens=list(timing.last.token_ids)[:8])
    if o["lengths"]:
        out.update(_timed_prefills(lambda ids: engine.generate(ids, max_new_tokens=1, ignore_eos=True),
                                   o["lengths"], o["prefill_repeats"]))
    out["compile"] = engine.compile_stats()["compile"]          # graphs, recompiles, seconds, cache directory
    engine.close()
    return out


def worker_hf(o: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(o["threads"])
    model = AutoModelForCausalLM.from_pretrained(o["model"], dtype=torch.bfloat16).eval()
    out: dict[str, Any] = {"load_avg": round(os.getloadavg()[0], 2), "attn": model.config._attn_implementation}
    if o["decode"]:
        gen = bw._hf_generate(model, prompt_ids(o["prompt_len"]), "cpu")
        gen(2)                                                              # warm-up
        timing = bw.time_decode(gen, o["new_tokens"], o["repeats"])
        out["tok_s"] = round(timing.tok_s, 2)
    if o["lengths"]:
        out.update(_timed_prefills(lambda ids: bw._hf_generate(model, ids, "cpu")(1), o["lengths"],
                                   o["prefill_repeats"]))
    return out


WORKERS = {"tierkv": worker_tierkv, "hf": worker_hf}
COMPILED = "tierkv-compiled"        # --compile: tierkv.load(..., compile=True) in its own process beside tierkv


# ---------------------------------------------------------------------------------------------
# the run


def collect(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every measurement, keyed "MODEL/PART/ENGINE", and per model its facts (dir, GGUF, step bytes)."""
    runs: dict[str, Any] = {}
    facts: dict[str, Any] = {}
    for name in args.models:
        model = model_dir(args.model_root, name)
        facts[name] = {"dir": str(model), "step_bytes": step_weight_bytes(model)}
        gguf = None
        if "llama" in args.engines and args.llama_skip is None:
            try:
                gguf = make_gguf(model, args.convert_script)
                facts[name]["gguf"] = str(gguf)
            except RuntimeError as e:
                facts[name]["gguf_error"] = str(e)
                print(f"WARNING: {name}: {e}; its llama.cpp column is skipped", flush=True)
        for part in args.parts:
            lengths = args.prefill_lengths if part == "prefill" else []
            for engine in [*args.engines, *([COMPILED] if args.compile else [])]:
                key = f"{name}/{part}/{engine}"
                if engine == "llama":
                    if gguf is None:
                        continue
                    tg, pp = (LLAMA_TG_TOKENS, 0) if part == "decode" else (0, lengths)
                    depth = ["-d", str(args.prompt_len)] if part == "decode" and args.prompt_len else []
                    runs[key] = run_llama(args.llama_bench, gguf, args.threads, tg, pp, args.llama_args + depth,
                                          None if part == "decode" else args.prefill_repeats, args.timeout_s)
                else:
                    opts = {"model": str(model), "threads": args.threads, "decode": part == "decode",
                            "lengths": lengths, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                            "repeats": args.repeats, "prefill_repeats": args.prefill_repeats,
                            "compile": engine == COMPILED}
                    runs[key] = run_worker_script(__file__, "tierkv" if engine == COMPILED else engine, opts, None,
                                                  args.timeout_s)
                shown = runs[key].get("tok_s", runs[key].get("tg_best", runs[key].get("prefill_tok_s",
                                      runs[key].get("pp_best_by_tokens"))))
                print(f"{key}: {shown if shown is not None else runs[key].get('error')} "
                      f"(load {runs[key].get('load_avg')})", flush=True)
    return runs, facts


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def summarize(runs: dict[str, Any], facts: dict[str, Any], models: list[str], lengths: list[int],
              read_gbps: float | None = None) -> dict[str, Any]:
    """Per model: decode tok/s of each engine with tierkv's ratios, weight GB/s (and its share of the
    memory-read ceiling ``read_gbps``), and per prompt length the prefill tok/s and ratios; the goals
    that could be judged, met or not."""
    s: dict[str, Any] = {"decode": {}, "prefill": {}, "goals": {}}
    for name in models:
        tk, hf, ll = (runs.get(f"{name}/decode/{e}", {}) for e in ENGINES)
        row = {"tierkv": tk.get("tok_s"), "hf": hf.get("tok_s"), "llama": ll.get("tg_best"),
               "llama_mean": ll.get("tg_tok_s"), "errors": {e: r["error"] for e, r in zip(ENGINES, (tk, hf, ll))
                                                            if r.get("error")}}
        row["tierkv_vs_llama"], row["tierkv_vs_hf"] = _ratio(row["tierkv"], row["llama"]), _ratio(row["tierkv"], row["hf"])
        step = facts.get(name, {}).get("step_bytes")
        row["weight_gbps"] = {e: round(step * row[e] / 1e9, 2) for e in ENGINES if step and row[e]}
        row["of_read_ceiling"] = {e: round(v / read_gbps, 3) for e, v in row["weight_gbps"].items()} if read_gbps else {}
        row["load_avg"] = {e: r.get("load_avg") for e, r in zip(ENGINES, (tk, hf, ll)) if r}
        _compiled_ratio(row, runs.get(f"{name}/decode/{COMPILED}"), "tok_s", None)
        if any(runs.get(f"{name}/decode/{e}") for e in ENGINES):
            s["decode"][name] = row
        if row["tierkv_vs_llama"] is not None:
            goal = DECODE_GOAL_VS_LLAMA[name]
            s["goals"][f"{name}_decode_ge_{goal}x_llama"] = row["tierkv_vs_llama"] >= goal
        if row["tierkv_vs_hf"] is not None:
            s["goals"][f"{name}_decode_ge_{DECODE_GOAL_VS_HF}x_hf"] = row["tierkv_vs_hf"] >= DECODE_GOAL_VS_HF
        tk, hf, ll = (runs.get(f"{name}/prefill/{e}", {}) for e in ENGINES)
        for n in lengths:
            p = {"tierkv": tk.get("prefill_tok_s", {}).get(str(n)), "hf": hf.get("prefill_tok_s", {}).get(str(n)),
                 "llama": (ll.get("pp_best_by_tokens") or {}).get(n),
                 "load_avg": {e: r.get("prefill_load_avg", {}).get(str(n), r.get("load_avg"))
                              for e, r in zip(ENGINES, (tk, hf, ll)) if r}}
            p["tierkv_vs_hf"], p["tierkv_vs_llama"] = _ratio(p["tierkv"], p["hf"]), _ratio(p["tierkv"], p["llama"])
            _compiled_ratio(p, runs.get(f"{name}/prefill/{COMPILED}"), "prefill_tok_s", str(n))
            if any((tk, hf, ll)):
                s["prefill"][f"{name}/{n}"] = p
            if p["tierkv_vs_hf"] is not None:
                s["goals"][f"{name}_prefill{n}_ge_{PREFILL_GOAL_VS_HF}x_hf"] = p["tierkv_vs_hf"] >= PREFILL_GOAL_VS_HF
        errors = {e: r["error"] for e, r in zip(ENGINES, (tk, hf, ll)) if r.get("error")}
        errors.update({f"{e} pp": r["pp_error"] for e, r in (("llama", ll),) if r.get("pp_error")})
        if errors:
            s["prefill"][f"{name}/errors"] = errors
    return s


def _compiled_ratio(row: dict[str, Any], run: dict[str, Any] | None, field: str, length: str | None) -> None:
    """--compile: the compiled engine's tok/s beside tierkv's (``row["tierkv"]``), its ratio to it and
    what compiling cost (seconds, graphs, recompiles); nothing when it did not run."""
    if run is None:
        return
    value = run.get(field) if length is None else run.get(field, {}).get(length)
    row["tierkv_compiled"], row["compiled_vs_eager"] = value, _ratio(value, row["tierkv"])
    row["compile"] = {k: run.get("compile", {}).get(k) for k in ("compile_s", "graphs", "recompiles", "fallback_reason")}
    if run.get("error"):
        row.setdefault("errors", {})[COMPILED] = run["error"]


def _f(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else f"{x:{spec}}"


def table_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for name, r in s["decode"].items():
        gbps = ", ".join(f"{e} {v}" + (f" ({r['of_read_ceiling'][e]:.0%} of the read ceiling)" if e in r.get("of_read_ceiling", {})
                                       else "") for e, v in r["weight_gbps"].items())
        rows.append((f"{name} decode", f"tierkv {_f(r['tierkv'], '.2f')} tok/s, llama.cpp tg{LLAMA_TG_TOKENS} "
                     f"{_f(r['llama'], '.2f')} (mean {_f(r['llama_mean'], '.2f')}), HF {_f(r['hf'], '.2f')}: "
                     f"{_f(r['tierkv_vs_llama'], '.2f')}x llama.cpp, {_f(r['tierkv_vs_hf'], '.2f')}x HF; weight GB/s "
                     f"{gbps or 'n/a'} (load {r['load_avg']})"))
        for e, err in r["errors"].items():
            rows.append((f"{name} decode {e}", f"FAILED: {err}"))
        if "compiled_vs_eager" in r:
            rows.append((f"{name} decode compiled", _compiled_text(r, ".2f")))
    for key, p in s["prefill"].items():
        if key.endswith("/errors"):
            rows.extend((f"{key.split('/')[0]} prefill {e}", f"FAILED: {err}") for e, err in p.items())
            continue
        name, n = key.split("/")
        rows.append((f"{name} prefill {n}", f"tierkv {_f(p['tierkv'])} tok/s, HF {_f(p['hf'])}, llama.cpp pp "
                     f"{_f(p['llama'])}: {_f(p['tierkv_vs_hf'], '.2f')}x HF, {_f(p['tierkv_vs_llama'], '.2f')}x "
                     f"llama.cpp (load {p['load_avg']})"))
        if "compiled_vs_eager" in p:
            rows.append((f"{name} prefill {n} compiled", _compiled_text(p, ".1f")))
    rows.append(goals_row(s["goals"]))
    return rows


def _compiled_text(r: dict[str, Any], spec: str) -> str:
    c = r["compile"]
    return (f"tierkv compile=True {_f(r['tierkv_compiled'], spec)} tok/s vs eager {_f(r['tierkv'], spec)}: "
            f"{_f(r['compiled_vs_eager'], '.2f')}x (its process compiled {c['graphs']} graphs in "
            f"{_f(c['compile_s'])} s, {c['recompiles']} recompiles{'; ' + c['fallback_reason'] if c['fallback_reason'] else ''})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    ap.add_argument("--prefill-lengths", default="512,4096,16384", help="comma list of prompt lengths")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true",
                    help="also run tierkv with compile=True (its own process, warmed up first) beside tierkv")
    ap.add_argument("--prompt-len", type=int, default=16, help="decode: context tokens before the timed tokens (llama-bench -d)")
    ap.add_argument("--new-tokens", type=int, default=16, help="decode tokens N in (N - 1) / (t(N) - t(1))")
    ap.add_argument("--repeats", type=int, default=3, help="decode: best of this many")
    ap.add_argument("--prefill-repeats", type=int, default=1, help="prefill: best of this many (llama-bench -r)")
    ap.add_argument("--llama-bench", type=Path, default=LLAMA_SRC / "build" / "bin" / "llama-bench")
    ap.add_argument("--convert-script", type=Path, default=LLAMA_SRC / "convert_hf_to_gguf.py",
                    help="llama.cpp's HF -> GGUF converter")
    ap.add_argument("--llama-args", default="", help="extra llama-bench arguments, space separated")
    ap.add_argument("--model-root", type=Path, default=Path("/tmp/tierkv-bench-step"))
    ap.add_argument("--timeout-s", type=float, default=3600, help="per contender process")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--opts", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for field, allowed in (("models", MODELS), ("parts", PARTS), ("engines", ENGINES)):
        setattr(args, field, getattr(args, field).split(","))
        if bad := [x for x in getattr(args, field) if x not in allowed]:
            ap.error(f"unknown {field} {bad}; choose from {', '.join(allowed)}")
    args.prefill_lengths = [int(n) for n in args.prefill_lengths.split(",") if n]
    args.llama_args = args.llama_args.split()
    return args


def main() -> None:
    args = parse_args()
    if args.worker:                                   # a contender's process: one JSON line on stdout
        emit_json(WORKERS[args.worker](json.loads(args.opts)))
        return
    args.llama_skip = llama_unavailable(args) if "llama" in args.engines else None
    if args.llama_skip:
        print(f"WARNING: {args.llama_skip}", flush=True)
    t0, load_start = time.perf_counter(), os.getloadavg()
    import torch

    torch.set_num_threads(args.threads)
    read = memory_read_gbps()
    ceilings = {"memory_read_gbps": round(read, 2) if read else None, "matvec_bf16_gbps": round(matvec_gbps(), 2),
                "gemm_bf16_tflops": round(gemm_tflops(), 3)}
    print(f"ceilings: {ceilings} (load {os.getloadavg()[0]:.1f})", flush=True)
    runs, facts = collect(args)
    s = summarize(runs, facts, args.models, args.prefill_lengths, ceilings["memory_read_gbps"])
    load_end = os.getloadavg()
    build = next((r.get("build") for r in runs.values() if r.get("build")), None)
    print_table(f"Resident bf16 decode and prefill, cpu, {args.threads} threads: tierkv vs llama.cpp {build or ''} "
                f"vs HF; ceilings {ceilings['memory_read_gbps']} GB/s memory read, {ceilings['matvec_bf16_gbps']} GB/s "
                f"torch matvec, {ceilings['gemm_bf16_tflops']} TFLOP/s "
                f"GEMM; load avg {load_start[0]:.1f} -> {load_end[0]:.1f} on {os.cpu_count()} cores", table_rows(s))
    emit_json(dict(s, bench="step", runs=runs, facts=facts, ceilings=ceilings, models=args.models, parts=args.parts,
                   engines=args.engines, threads=args.threads, prefill_lengths=args.prefill_lengths,
                   prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                   prefill_repeats=args.prefill_repeats, llama_bench=str(args.llama_bench), llama_skipped=args.llama_skip,
                   llama_build=build, load_avg_start=list(load_start), load_avg_end=list(load_end),
                   cpu_count=os.cpu_count(), wall_s=round(time.perf_counter() - t0, 1)))


if __name__ == "__main__":
    main()
