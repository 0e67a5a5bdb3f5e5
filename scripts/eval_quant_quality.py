"""Quality of quantized weights and KV: logits error, greedy agreement and a perplexity proxy vs 16-bit.

Why this script exists: issue 11 asks that what int8/int4 cost in quality be measured and stated,
not assumed. For each scheme (bf16 reference; int8 and int4 at group sizes 32, 64 and 128) on
each model, over text the bf16 model itself generated (``--prompts`` prompts x ``--new-tokens``
tokens, sampled at ``--temperature`` with a fixed seed; 0 = greedy), scored teacher-forced:

- ``rel_err``: ``||logits_q - logits_bf16|| / ||logits_bf16||`` over every scored position (the
  row ``fp32`` sets bf16's own rounding against an fp32 run, for scale);
- ``agree``: the share of generated positions where the argmax of the scheme's logits equals the
  argmax of bf16's ("greedy agreement": would greedy decoding pick the same next token);
- ``nll`` / ``ppl``: mean negative log-likelihood of the generated tokens under the scheme, and
  its exponential (a perplexity proxy: the bf16 text scored by each scheme).

Two columns per scheme: ``engine`` is tierkv itself (``tierkv.load(..., quant=, group_size=)``,
the fused CPU matmuls or the reference, whatever the checkout runs), ``sim`` is HF transformers
with each layer's linear weights replaced by ``quantize -> dequantize`` of
``tierkv.kernels.quant_reference`` (the scheme's own error, no kernel involved): engine ~ sim says
the kernels add nothing. A checkout whose ``tierkv.load`` has no ``quant`` keyword gets sim only.

KV (``--kv``): with ``kv_quant="int8"|"int4"`` in the tests' ``tiered`` and ``sparse`` placements
(``tests/placements.py``, in bf16: a KV room of a few tokens, a host budget of ~40 tokens, the rest
on disk, 16-token prefill pieces, so later pieces and every decode step read quantized chunks back)
on a ``--kv-context``-token sequence the bf16 model generated: the logits' relative error and
agreement vs exact KV of the same placement, greedy decode agreement after it, and the KV bytes
per tier and bytes read per decode step the engine reports.

Models: tiny random HF checkpoints built like the tests' (``tests/conftest.build_hf_model``, with
hidden 128 / MLP 256 so every group size divides), and ``--model DIR``, a *trained* one. The
bundled demo model cannot be quantized (its MLP width 688 is divisible by none of 32/64/128); a
twin with MLP width 768 is trained, about 15 minutes on one core, with

    python scripts/train_demo_model.py --intermediate 768 --minutes 15 --threads 1 --out /tmp/qm/demo768

Step rows (``--step-rows``): int8 per channel scored one token per forward (``prefill_chunk_tokens=1``,
every position computed as a decode step computes it), with the weight-only CPU op and with dynamic
int8 activations (``TIERKV_CPU_QLINEAR=dynamic_int8``, which only batches under
``kernels.quant.DYNAMIC_MAX_M`` rows take); int4 g64 the same way with the weight-only op and, where
torchao's CPU kernel is installed, its da8w4 kernel (``TIERKV_CPU_QLINEAR=torchao``, 8-bit
activations): the quality of the faster resident decode paths.

Usage:  python scripts/eval_quant_quality.py [--model /tmp/qm/demo768] [--prompts 4] [--new-tokens 96]
            [--no-tiny] [--no-sim] [--kv] [--step-rows] [--threads 2]
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))                 # bench_common
from bench_common import goals_row, emit_json, group_size_arg, prefer_checkout, print_table  # noqa: E402

prefer_checkout(Path(__file__).resolve().parents[1])                     # tierkv from this checkout
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))      # conftest: the tests' tiny models

import tierkv  # noqa: E402
from tierkv.kernels.quant_reference import dequantize_weight_plain, quantize_weight_plain  # noqa: E402
from tierkv.quantspec import BITS, GROUP_SIZES, LAYER_LINEARS  # noqa: E402

TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512)
TINY_ARCHS = ("llama", "qwen2", "qwen3")
TEXT_PROMPTS = ("Return the number of", "This module provides", "Raise ValueError if the",
                "Create a new", "The default value is", "If the file does not exist,")
Seq = tuple[list[int], int]          # (token ids, index of the first generated token)


def configs(groups: list[int | str]) -> list[tuple[str, int | str | None]]:
    """(scheme, group size) rows: bf16 first (the reference), then int8 and int4 at each group."""
    return [("bf16", None)] + [(s, g) for s in ("int8", "int4") for g in groups]


def engine_quant_supported() -> bool:
    return "quant" in inspect.signature(tierkv.load).parameters


def kv_quant_supported() -> bool:
    return "kv_quant" in inspect.signature(tierkv.load).parameters


# ---------------------------------------------------------------------------------------------
# models and text


def tiny_models(root: Path, archs: tuple[str, ...]) -> dict[str, Path]:
    """The tests' tiny random checkpoints (fp32), in a shape every group size divides."""
    from conftest import build_hf_model, save_hf_model

    out = {}
    for arch in archs:
        extra = {"head_dim": 32} if arch == "qwen3" else {}
        path = root / f"tiny-{arch}"
        if not (path / "config.json").is_file():
            save_hf_model(build_hf_model(arch, seed=0, **TINY_SHAPE, **extra), path)
        out[f"tiny-{arch} (random)"] = path
    return out


def prompts_for(engine: Any, n: int, seed: int) -> list[list[int]]:
    """``n`` prompts: docstring openings for a model with a tokenizer, random ids (16) otherwise."""
    if engine.tokenizer is not None:
        return [engine.encode(TEXT_PROMPTS[i % len(TEXT_PROMPTS)]) for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, engine.config.vocab_size, (16,), generator=gen).tolist() for _ in range(n)]


def generate_text(engine: Any, prompts: list[list[int]], new_tokens: int, temperature: float, seed: int) -> list[Seq]:
    """The reference text: each prompt continued by the bf16 engine, EOS ignored."""
    out = []
    for i, ids in enumerate(prompts):
        res = engine.generate(ids, max_new_tokens=new_tokens, temperature=temperature, seed=seed + i,
                              ignore_eos=True)
        out.append((list(ids) + list(res.token_ids), len(ids)))
    return out


# ---------------------------------------------------------------------------------------------
# scoring


def engine_logits(model: Path, seqs: list[Seq], dtype: str, **load: Any) -> list[torch.Tensor]:
    """(T, V) fp32 logits of every sequence from a tierkv engine."""
    engine = tierkv.load(model, dtype=dtype, device="cpu", **load)
    try:
        return [engine.logits(ids).float() for ids, _ in seqs]
    finally:
        engine.close()


def sim_logits(model: Path, seqs: list[Seq], scheme: str | None, group: int | str | None) -> list[torch.Tensor]:
    """(T, V) fp32 logits from HF transformers in bf16, its layer linears quantized and dequantized
    with the reference (scheme None: as is)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    if scheme is not None:
        with torch.no_grad():
            for layer in hf.model.layers:
                for name in LAYER_LINEARS:
                    lin = layer.get_submodule(name)
                    g = group if isinstance(group, int) else lin.weight.shape[1]   # "channel": one group spans K
                    data, qparams = quantize_weight_plain(lin.weight, BITS[scheme], g)
                    lin.weight.copy_(dequantize_weight_plain(data, qparams, BITS[scheme]))
    hf = hf.to(torch.bfloat16)
    with torch.inference_mode():
        return [hf(torch.tensor([ids])).logits[0].float() for ids, _ in seqs]


def compare(ref: list[torch.Tensor], got: list[torch.Tensor], seqs: list[Seq]) -> dict[str, float]:
    """rel_err over all positions; agreement and NLL over the positions that predict generated tokens."""
    num = sum(float((g - r).square().sum()) for r, g in zip(ref, got))
    den = sum(float(r.square().sum()) for r in ref)
    agree, nll, n = 0, 0.0, 0
    for r, g, (ids, start) in zip(ref, got, seqs):
        pos = torch.arange(start - 1, len(ids) - 1)                     # logits[t] predicts ids[t + 1]
        agree += int((g[pos].argmax(-1) == r[pos].argmax(-1)).sum())
        nll -= float(torch.log_softmax(g[pos], -1).gather(1, torch.tensor(ids)[pos + 1, None]).sum())
        n += len(pos)
    return {"rel_err": math.sqrt(num / den), "agree": agree / n, "nll": nll / n, "ppl": math.exp(nll / n),
            "tokens": n}


def eval_model(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every scheme on one model: engine and sim columns, against bf16 of the same column."""
    engine = tierkv.load(model, dtype="bfloat16", device="cpu")
    seqs = generate_text(engine, prompts_for(engine, args.prompts, args.seed), args.new_tokens, args.temperature,
                         args.seed)
    engine.close()
    out: dict[str, Any] = {"tokens": sum(len(ids) - s for ids, s in seqs), "rows": {}}
    ref = engine_logits(model, seqs, "bfloat16")
    out["rows"]["fp32"] = {"engine": compare(ref, engine_logits(model, seqs, "float32"), seqs)}
    sim_ref = sim_logits(model, seqs, None, None) if args.sim else None
    for scheme, group in configs(args.groups):
        key = scheme if group is None else f"{scheme}/g{group}" if isinstance(group, int) else f"{scheme}/{group}"
        row: dict[str, Any] = {}
        if engine_quant_supported() or scheme == "bf16":
            load = {} if scheme == "bf16" else {"quant": scheme, "group_size": group}
            try:
                row["engine"] = compare(ref, engine_logits(model, seqs, "bfloat16", **load), seqs)
            except tierkv.TierkvError as e:            # e.g. a group size that does not divide: a result
                row["engine_error"] = str(e)
        if sim_ref is not None:
            row["sim"] = compare(sim_ref, sim_logits(model, seqs, None if scheme == "bf16" else scheme, group), seqs)
        out["rows"][key] = row
        print(f"  {key}: {_cell(row.get('engine'))} | sim {_cell(row.get('sim'))}", flush=True)
    from tierkv.kernels.quant_torchao import da8w4_status

    steps = [("int8", "channel", "weight_only"), ("int8", "channel", "dynamic_int8"), ("int4", 64, "weight_only")]
    steps += [("int4", 64, "torchao")] if da8w4_status() is None else []       # torchao's CPU kernel installed
    for scheme, group, mode in steps if args.step_rows else ():
        key = f"{scheme}/{group} {mode}, 1 token/forward"
        os.environ["TIERKV_CPU_QLINEAR"] = mode                  # read when the engine prepares its layers
        try:
            row = {"engine": compare(ref, engine_logits(model, seqs, "bfloat16", quant=scheme, group_size=group,
                                                        prefill_chunk_tokens=1), seqs)}
        finally:
            del os.environ["TIERKV_CPU_QLINEAR"]
        out["rows"][key] = row
        print(f"  {key}: {_cell(row['engine'])}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# KV quantization on the host and disk tiers


def _kv_engine(model: Path, kind: str, kv_quant: str, offload: Path) -> Any:
    """The tests' ``tiered`` / ``sparse`` placement (``tests/placements.py``'s sizes: resident
    weights, a KV room of a few tokens, host budget for ``HOST_KV_TOKENS`` fp32 tokens, the rest on
    disk), sized and computed in bf16 so that exact KV is 16-bit, with ``kv_quant``."""
    import placements as pl
    from tierkv.config import ModelConfig, Policy
    from tierkv.plan import make_plan, reserve_bytes

    cfg = ModelConfig.from_dir(model)
    policy = Policy(dtype="bfloat16", device="cpu", kv="exact", chunk_tokens=pl.CHUNK_TOKENS,
                    kv_device_tokens=pl.KV_ROOM_TOKENS, prefill_chunk_tokens=pl.PIECE_TOKENS)
    roomy = make_plan(cfg, tierkv.Budget(), policy)
    device_mem = roomy.globals_bytes + cfg.num_layers * roomy.layer_bytes + reserve_bytes(
        cfg, torch.bfloat16, policy, pl.KV_ROOM_TOKENS, 1)
    kv = dict(kv="exact") if kind == "tiered" else dict(kv="sparse", kv_budget=pl.SPARSE_BUDGET_TOKENS, kv_sketch=False)
    return tierkv.load(model, device="cpu", dtype="bfloat16", offload_dir=offload / f"{kind}-{kv_quant}",
                       chunk_tokens=pl.CHUNK_TOKENS, kv_device_tokens=pl.KV_ROOM_TOKENS,
                       prefill_chunk_tokens=pl.PIECE_TOKENS, device_mem=device_mem,
                       host_mem=pl.HOST_KV_TOKENS * pl.kv_token_bytes(cfg), kv_quant=kv_quant, **kv)


def _kv_run(model: Path, kind: str, kv_quant: str, seq: Seq, decode_tokens: int,
            offload: Path) -> tuple[torch.Tensor, list[int], dict[str, Any]]:
    """(teacher-forced logits, greedy continuation, KV stats of the continuation) of one engine."""
    engine = _kv_engine(model, kind, kv_quant, offload)
    try:
        logits = engine.logits(seq[0]).float()
        res = engine.generate(seq[0], max_new_tokens=decode_tokens, ignore_eos=True)
    finally:
        engine.close()
    keep = ("device_bytes", "host_bytes", "disk_bytes", "bytes_read_per_step", "kv_quant")
    kv = {k: res.stats.kv.get(k) for k in keep}
    assert kv["host_bytes"] and kv["disk_bytes"], f"the {kind} placement kept the KV on the device: {kv}"
    return logits, res.token_ids, kv


def eval_kv(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """KV int8/int4 vs exact KV, exact and sparse attention, on one long bf16-generated sequence:
    logits error and agreement (teacher-forced), greedy decode agreement after it, KV bytes per tier
    and bytes read per decode step."""
    engine = tierkv.load(model, dtype="bfloat16", device="cpu")
    prompt = prompts_for(engine, 1, args.seed)[0]
    seqs = generate_text(engine, [prompt], args.kv_context - len(prompt), args.temperature, args.seed)
    engine.close()
    offload = Path(tempfile.mkdtemp(prefix="eval-kv-"))
    out: dict[str, Any] = {"context_tokens": len(seqs[0][0]), "rows": {}}
    for kind in ("tiered", "sparse"):
        ref_logits, ref_tokens, ref_kv = _kv_run(model, kind, "none", seqs[0], args.kv_decode_tokens, offload)
        out["rows"][f"{kind}/none"] = dict(compare([ref_logits], [ref_logits], seqs), kv_stats=ref_kv)   # its own ppl
        for kv_quant in ("int8", "int4"):
            logits, tokens, kv = _kv_run(model, kind, kv_quant, seqs[0], args.kv_decode_tokens, offload)
            row = dict(compare([ref_logits], [logits], seqs), kv_stats=kv,
                       decode_agree=sum(a == b for a, b in zip(tokens, ref_tokens)) / len(ref_tokens),
                       decode_first_diff=next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None))
            if ref_kv.get("bytes_read_per_step"):
                row["bytes_read_per_step_vs_none"] = kv["bytes_read_per_step"] / ref_kv["bytes_read_per_step"]
            out["rows"][f"{kind}/{kv_quant}"] = row
            print(f"  kv {kind}/{kv_quant}: {_cell(row)} {kv}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# output


def _cell(m: dict[str, float] | None) -> str:
    if not m:
        return "n/a"
    return f"rel_err {m['rel_err']:.4f}, agree {m['agree']:.3f}, ppl {m['ppl']:.3f}"


def table_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for name, res in results["models"].items():
        rows.append((f"{name} ({res['tokens']} generated tokens)", "engine | sim (HF + reference dequantize)"))
        for key, row in res["rows"].items():
            engine = row.get("engine_error") or _cell(row.get("engine"))
            rows.append((f"  {key}", f"{engine} | {_cell(row.get('sim'))}"))
    if "kv" in results:
        kv = results["kv"]
        rows.append((f"KV on host/disk, {kv['context_tokens']}-token context", "vs exact KV (none)"))
        for key, row in kv["rows"].items():
            st = row["kv_stats"]
            where = (f"KV device/host/disk {st['device_bytes']}/{st['host_bytes']}/{st['disk_bytes']} B, "
                     f"read {st['bytes_read_per_step']:.0f} B/step")
            if key.endswith("/none"):
                rows.append((f"  kv {key}", f"reference, ppl {row['ppl']:.3f}; {where}"))
                continue
            ratio = row.get("bytes_read_per_step_vs_none")
            rows.append((f"  kv {key}", f"{_cell(row)}, decode agree {row['decode_agree']:.3f} (first diff "
                                        f"{row['decode_first_diff']}); {where}"
                                        + ("" if ratio is None else f" = {ratio:.2f}x")))
    for note in results["notes"]:
        rows.append(("note", note))
    return rows


def goals_of(results: dict[str, Any]) -> dict[str, bool]:
    """The issue's quality goal, on every model's engine column (sim where the engine has no quant):
    int8 agrees with bf16 on most steps (>= 90% here)."""
    goals = {}
    for name, res in results["models"].items():
        for key, row in res["rows"].items():
            m = row.get("engine") or row.get("sim")
            if key.startswith("int8") and m:
                goals[f"{name.split()[0]}_{key}_agree_ge_0.9"] = m["agree"] >= 0.9
    return goals


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, action="append", default=None,
                    help="a trained model directory (repeatable; default /tmp/qm/demo768 when it exists)")
    ap.add_argument("--no-tiny", dest="tiny", action="store_false", help="skip the tiny random models")
    ap.add_argument("--no-sim", dest="sim", action="store_false", help="skip the HF + reference column")
    ap.add_argument("--no-weights", dest="weights", action="store_false", help="skip the weight schemes (KV only)")
    ap.add_argument("--groups", default=",".join(map(str, GROUP_SIZES)),
                    help="comma list of group sizes (numbers, or a word the library takes such as channel)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling of the reference text (0 = greedy)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step-rows", action="store_true",
                    help="also int8 per channel one token per forward, weight-only and dynamic int8 activations")
    ap.add_argument("--kv", action="store_true", help="also KV int8/int4 vs exact (needs kv_quant in tierkv.load)")
    ap.add_argument("--kv-context", type=int, default=400)
    ap.add_argument("--kv-decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "tierkv-eval-quant")
    args = ap.parse_args()
    args.groups = [group_size_arg(g) for g in args.groups.split(",")]
    if args.model is None:
        args.model = [p for p in [Path("/tmp/qm/demo768")] if (p / "config.json").is_file()]
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    args.root.mkdir(parents=True, exist_ok=True)
    models = tiny_models(args.root, TINY_ARCHS) if args.tiny else {}
    models.update({f"{p.name} (trained)": p for p in args.model})
    notes = []
    if not engine_quant_supported():
        notes.append("this checkout's tierkv.load has no quant=: engine column for bf16/fp32 only")
    results: dict[str, Any] = {"models": {}, "notes": notes}
    for name, path in models.items() if args.weights else ():
        print(f"{name}: {path}", flush=True)
        results["models"][name] = eval_model(path, args)
    if args.kv:
        target = args.model[0] if args.model else next(iter(models.values()))
        if kv_quant_supported():
            results["kv"] = eval_kv(target, args)
            results["kv"]["model"] = str(target)
        else:
            notes.append("this checkout's tierkv.load has no kv_quant=: KV part skipped")
    results["goals"] = goals_of(results)
    print_table(f"quantization quality, bf16 compute on cpu, {args.prompts} x {args.new_tokens} tokens of bf16 text "
                f"(temperature {args.temperature})", table_rows(results) +
                [goals_row(results["goals"])])
    emit_json(dict(results, bench="quant_quality", groups=args.groups, prompts=args.prompts,
                   new_tokens=args.new_tokens, temperature=args.temperature, seed=args.seed,
                   models_paths={k: str(v) for k, v in models.items()}, wall_s=round(time.perf_counter() - t0, 1)))


if __name__ == "__main__":
    main()
