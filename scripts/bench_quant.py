"""Quantized weights: resident and cold streamed decode, bf16 vs int8 vs int4, against HF peers.

Why this script exists: issue 11's speed goals are ratios of tierkv with group-wise int8/int4
weights over tierkv bf16, measured in the same run on the ~0.85B random bf16 Llama of
``bench_common``, and set against HF's own options. Three parts, each selectable (``--parts``):

* ``resident``: the whole model in memory, ``--threads`` threads: tierkv bf16 / int8 / int4 and HF
  transformers bf16, each in a fresh process, (generate N minus generate 1) timing, greedy, EOS
  ignored. Goals: int4 >= 2x and int8 >= 1.5x tierkv bf16.
* ``stream``: cold streamed decode, each scheme in its own process under
  ``/work/shared/tools/memcap CAP`` (a cgroup: page cache included), CAP below the bf16
  checkpoint's size. The bf16 budget is searched as in ``bench_weights`` (``--stream-fraction`` of
  the layers on disk, host_mem 0 on CPU, the links measured here handed over). Two budget modes
  (``--budget-mode``): ``same-layers`` searches each scheme's own budget so that it streams as many
  layers as bf16 does (bytes per token then measure the compression itself); ``same-budget`` gives
  every scheme bf16's device budget (the smaller layers let more of them stay resident). Cold: the
  store file is evicted from the page cache before every forward (tierkv reads with O_DIRECT
  anyway). Reported: tok/s, bytes read from disk per token (the engine's per-link stats), bytes
  per tier, memcap's peak, ratios vs bf16, and the raw O_DIRECT disk ceiling sampled before and
  after. Goals: bytes <= 0.55x (int8), <= 0.30x (int4); tok/s int4 >= 3x, int8 >= 1.7x bf16.
* ``peer``: HF accelerate disk offload under the same cap and ``max_memory`` as tierkv bf16:
  bf16 (``bench_weights.run_accelerate``), and the 4-/8-bit options (bitsandbytes, optimum-quanto,
  from ``--peer-pkgs`` put on ``sys.path`` in the peer's process only). For each: whether it
  loads, where accelerate placed the layers (decoder layers on "disk", bytes in the offload
  folder, parameters left on the meta device), whether it generates, and its cold tok/s. A
  quantized peer whose layers all fit in RAM at that budget is run again with a quarter of it,
  to see whether it runs when accelerate really offloads. tierkv's speed-up is taken over the
  fastest peer that truly ran with layers on disk (none: said so).

    python scripts/bench_quant.py [--parts resident,stream,peer] [--schemes bf16,int8,int8:channel,int4]
        [--group-size 64] [--quant-head] [--cap 1280MiB] [--budget-mode both|same-layers|same-budget]
        [--peers accelerate,bnb4,bnb8,quanto4,quanto8] [--threads 2] [--new-tokens 8]

Each contender runs as ``python scripts/bench_quant.py --worker KIND --opts JSON`` (under memcap
for ``stream`` and ``peer``) and prints one JSON line. A full run took 4-5 minutes on the quiet
2-core machine (``PYTHONPATH=OTHER_TREE`` measures another checkout's tierkv with this script).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_weights as bw  # noqa: E402  (puts the checkout's tierkv on sys.path, after PYTHONPATH's)
from bench_common import goals_row, memcap_usable, run_worker_script, bench_model_dir, emit_json, group_size_arg, matvec_gbps, print_table  # noqa: E402

SCHEMES = ("bf16", "int8", "int4")
PEERS = ("accelerate", "bnb4", "bnb8", "quanto4", "quanto8")
GOALS_STREAM = {"int8": {"bytes": 0.55, "tok_s": 1.7}, "int4": {"bytes": 0.30, "tok_s": 3.0}}
GOALS_RESIDENT = {"int8": 1.5, "int4": 2.0}
# "@VARIANT" after a --schemes entry (several joined by "+"): the environment its worker runs under
# (kernels/_select.py): "dynamic" rounds activations to 8 bits for per-channel int8 linears,
# "nofuse" keeps q/k/v and gate/up as separate linears (how tierkv computed before fusion).
# "torchao" computes int4 linears with torchao's da8w4 kernel (8-bit activations), "wo" with the weight-only op
# (the default "auto" picks torchao where its CPU kernel is installed).
VARIANTS = {"dynamic": {"TIERKV_CPU_QLINEAR": "dynamic_int8"}, "nofuse": {"TIERKV_FUSE_LINEARS": "0"},
            "fuse": {"TIERKV_FUSE_LINEARS": "1"}, "torchao": {"TIERKV_CPU_QLINEAR": "torchao"},
            "wo": {"TIERKV_CPU_QLINEAR": "weight_only"}}
PEER_SPEEDUP_GOAL = 2.0


# ---------------------------------------------------------------------------------------------
# schemes as the library takes them (bf16 = no quantization)


def split_variant(label: str) -> tuple[str, dict[str, str]]:
    """A ``--schemes`` entry -> (the entry without "@...", the environment of its variants)."""
    base, _, variants = label.partition("@")
    env: dict[str, str] = {}
    for name in filter(None, variants.split("+")):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r} in {label!r}; variants: {', '.join(VARIANTS)}")
        env.update(VARIANTS[name])
    return base, env


def split_scheme(label: str, group_size: int | str) -> tuple[str, int | str]:
    """A ``--schemes`` entry -> (scheme, group size): "int8" takes ``--group-size``, "int8:channel"
    or "int4:32" name their own (an "@variant" is ignored here)."""
    scheme, _, group = split_variant(label)[0].partition(":")
    return scheme, group_size_arg(group) if group else group_size


def load_kwargs(label: str, group_size: int | str, head: bool = False) -> dict[str, Any]:
    """``tierkv.load`` keywords of a scheme entry (``head``: the LM head quantized too)."""
    scheme, group = split_scheme(label, group_size)
    if scheme == "bf16":
        return {}
    return {"quant": scheme, "group_size": group, **({"quant_head": True} if head else {})}


def policy_extra(label: str, group_size: int | str, head: bool = False) -> dict[str, Any]:
    """``Policy`` fields of a scheme entry (the weight quantization as ``tierkv.quantspec`` defines it)."""
    from tierkv.quantspec import parse_weight_quant

    scheme, group = split_scheme(label, group_size)
    return {} if scheme == "bf16" else {"weight_quant": parse_weight_quant(scheme, group, head)}


# ---------------------------------------------------------------------------------------------
# workers: each runs in its own process and returns a JSON-able dict


def worker_resident(o: dict[str, Any]) -> dict[str, Any]:
    """tierkv at one scheme, or HF transformers bf16 ("hf"), all in memory."""
    os.environ.update(split_variant(o["scheme"])[1])
    args = dict(o["common"], load_kwargs=load_kwargs(o["scheme"], o["group_size"], o["common"]["quant_head"]))
    return bw.run_resident("hf" if o["scheme"] == "hf" else "tierkv", o["model_dir"], o["ids"], args)


def worker_stream(o: dict[str, Any]) -> dict[str, Any]:
    """tierkv at one scheme under ``o["budget"]``: cold streamed decode (``bench_weights``' timing);
    when the plan keeps every layer on the device, resident decode inside the same budget."""
    from tierkv.config import Budget, Policy
    from tierkv.io.checkpoint import Checkpoint
    from tierkv.plan import make_plan
    from tierkv.probe import LinkSpeeds

    os.environ.update(split_variant(o["scheme"])[1])
    links = LinkSpeeds(**o["links"])
    extra = policy_extra(o["scheme"], o["group_size"], o["common"]["quant_head"])
    args = dict(o["common"], policy_extra=extra, cold_only=True)
    policy = Policy(dtype="bfloat16", device=args["device"], prefill_chunk_tokens=len(o["ids"]),
                    kv_device_tokens=args.get("kv_device_tokens"), **extra)
    budget = o["budget"]
    plan = make_plan(Checkpoint(o["model_dir"]).config, Budget(budget["device_mem"], budget["host_mem"],
                                                                Path(o["offload"])), policy, links)
    if plan.disk_layers or plan.host_layers:
        return dict(bw.run_tierkv_streaming(o["model_dir"], budget, o["offload"], "", links, o["ids"], args),
                    streamed=True)
    return _resident_in_budget(o, args)


def _resident_in_budget(o: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """Every layer fits ``o["budget"]``: decode speed with nothing streamed (0 disk bytes per token)."""
    import tierkv

    torch.set_num_threads(args["threads"])
    budget = o["budget"]
    engine = tierkv.load(o["model_dir"], device_mem=budget["device_mem"], host_mem=budget["host_mem"],
                         offload_dir=o["offload"], dtype="bfloat16", device=args["device"],
                         kv_device_tokens=args.get("kv_device_tokens"),
                         **load_kwargs(o["scheme"], o["group_size"], args["quant_head"]))
    gen = lambda n: engine.generate(o["ids"], max_new_tokens=n, ignore_eos=True)  # noqa: E731
    gen(2)
    timing = bw.time_decode(gen, args["new_tokens"], args["repeats"])
    plan = engine.plan
    cold = {"tok_s": timing.tok_s, "step_s": timing.step_s, "disk_bytes_per_step": 0.0,
            "stats_decode_tok_s": timing.last.stats.decode_tok_s,
            "tier_weight_bytes": {k: v for k, v in timing.last.stats.weights.items() if k.endswith("_weight_bytes")},
            "timing_consistent": True}
    out = {"cold": cold, "streamed": False, "peak_rss_bytes": bw.peak_rss_bytes(),
           "plan": {"device_layers": len(plan.device_layers) if plan else None, "host_layers": 0, "disk_layers": 0,
                    "layer_bytes": plan.layer_bytes if plan else None,
                    "predicted_tok_s": plan.predicted_tok_s if plan else None}}
    engine.close()
    return out


def _peer_quant_config(peer: str) -> Any:
    """The transformers quantization config of a quantized peer (bitsandbytes or quanto)."""
    from transformers import BitsAndBytesConfig, QuantoConfig

    if peer == "bnb4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                  llm_int8_enable_fp32_cpu_offload=True)
    if peer == "bnb8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
    return QuantoConfig(weights={"quanto4": "int4", "quanto8": "int8"}[peer])


def _placement(model: Any, folder: Path) -> dict[str, Any]:
    """Where accelerate put a loaded model: decoder layers on disk, offload folder bytes, meta params."""
    device_map = getattr(model, "hf_device_map", None)
    files = [p for p in folder.rglob("*") if p.is_file()]
    linear = type(model.model.layers[0].mlp.down_proj).__name__
    return {"device_map": None if device_map is None else {k: str(v) for k, v in device_map.items()},
            "disk_layers": bw.layers_on_disk(device_map or {}, model.config.num_hidden_layers),
            "offload_folder_bytes": sum(p.stat().st_size for p in files), "offload_folder_files": len(files),
            "meta_params": sum(1 for p in model.parameters() if p.device.type == "meta"),
            "linear_class": linear}


def worker_peer(o: dict[str, Any]) -> dict[str, Any]:
    """One HF peer under ``o["max_memory"]`` with ``device_map="auto"`` and an offload folder: what
    loads, where it went, whether it generates, and its cold/warm tok/s when it does."""
    from transformers import AutoModelForCausalLM

    peer, args, folder = o["peer"], o["common"], Path(o["folder"])
    torch.set_num_threads(args["threads"])
    if peer == "accelerate":
        timing = bw.run_accelerate(o["model_dir"], o["max_memory"], str(folder), o["ids"], dict(args, cold_only=True))
        return dict(timing, runs=True)
    sys.path.insert(0, o["peer_pkgs"])                   # the peer's packages: this process only
    out: dict[str, Any] = {"runs": False}
    try:
        model = AutoModelForCausalLM.from_pretrained(o["model_dir"], dtype=torch.bfloat16, device_map="auto",
                                                     max_memory=o["max_memory"], offload_folder=str(folder),
                                                     quantization_config=_peer_quant_config(peer)).eval()
    except Exception as e:                               # a peer's refusal is a result, not a crash
        return dict(out, stage="load", error=f"{type(e).__name__}: {e}"[:400])
    out.update(_placement(model, folder))
    try:
        timing = bw.time_offloaded_hf(model, o["model_dir"], str(folder), o["ids"], dict(args, cold_only=True))
    except Exception as e:
        return dict(out, stage="generate", error=f"{type(e).__name__}: {e}"[:400], peak_rss_bytes=bw.peak_rss_bytes())
    return dict(out, **{k: v for k, v in timing.items() if k != "device_map"}, runs=True)


WORKERS = {"resident": worker_resident, "stream": worker_stream, "peer": worker_peer}


# ---------------------------------------------------------------------------------------------
# the parent: run workers (under the cap), collect


def run_worker(kind: str, opts: dict[str, Any], cap: str | None, timeout_s: float = 900) -> dict[str, Any]:
    """``--worker kind`` in a fresh interpreter (under ``memcap cap`` when given): its JSON line, plus
    memcap's peak and OOM kills; a crash or a timeout becomes {"error": ...}."""
    return run_worker_script(__file__, kind, opts, cap, timeout_s)


def evict_inputs(model_dir: Path, offload: Path) -> None:
    """Drop the checkpoint's and every store's cached pages before a capped run: pages cached by an
    earlier process are charged to its cgroup, not the capped one, and would give a free warm start."""
    files = sorted(model_dir.glob("*.safetensors")) + sorted(p for p in (offload / "stores").rglob("*") if p.is_file())
    bw.evict_files(files)


def _common(args: argparse.Namespace) -> dict[str, Any]:
    return {"threads": args.threads, "device": "cpu", "new_tokens": args.new_tokens, "repeats": args.repeats,
            "resident_tokens": args.resident_tokens, "resident_repeats": args.resident_repeats,
            "kv_device_tokens": args.kv_device_tokens, "quant_head": args.quant_head}


def resident_part(args: argparse.Namespace, model_dir: Path, ids: list[int]) -> dict[str, Any]:
    """Resident decode of every scheme and of HF bf16, each in a fresh process (no cap: it all fits), in
    ``--resident-rounds`` rounds (the order rotated each round): tok/s is the median over the rounds, and
    ``samples`` keeps every round's, so ratios can be taken within a round (a shared machine drifts)."""
    names = [*args.schemes, "hf"]
    out: dict[str, Any] = {}
    for r in range(args.resident_rounds):
        for scheme in names[r % len(names):] + names[: r % len(names)]:
            opts = {"scheme": scheme, "group_size": args.group_size, "model_dir": str(model_dir), "ids": ids,
                    "common": _common(args)}
            res = run_worker("resident", opts, None)
            prev = out.setdefault(scheme, dict(res, samples=[]))
            prev["samples"].append(res.get("tok_s"))
            print(f"resident round {r + 1} {scheme}: {res.get('tok_s', res.get('error'))}", flush=True)
    for res in out.values():
        good = [x for x in res["samples"] if x is not None]
        res["tok_s"] = statistics.median(good) if good else None
    return out


def resident_ceilings(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """The bandwidth ceiling of resident decode, measured now: this machine's bf16 matrix-vector rate
    (``bench_common.matvec_gbps``, as bench_resident.py; weights in DRAM) over the bytes each scheme
    reads per token (every layer and the LM head as stored: ``io.store.plan_layout``)."""
    from tierkv.config import ModelConfig
    from tierkv.io.store import plan_layout

    torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_dir(model_dir)
    read = {"head"} | ({"embed"} if cfg.tie_word_embeddings else set())
    gbps = matvec_gbps()
    out: dict[str, Any] = {"ceiling_matvec_gbps": round(gbps, 2)}
    for label in args.schemes:
        quant = policy_extra(label, args.group_size, args.quant_head).get("weight_quant")
        per_token = sum(e.padded_nbytes for e in plan_layout(cfg, torch.bfloat16, quant, "cpu")
                        if e.name.startswith("layer.") or e.name in read)
        out[f"ceiling_{label}_bytes_per_token"] = per_token
        out[f"ceiling_{label}_tok_s"] = round(gbps * 1e9 / per_token, 3)
    return out


def stream_budgets(args: argparse.Namespace, model_dir: Path, offload: Path,
                   links: Any) -> dict[str, dict[str, dict[str, int]]]:
    """{mode: {scheme: budget}}: bf16's searched budget, and per scheme one streaming as many layers."""
    bf16, plan = bw.choose_budget(model_dir, offload, links, args.stream_fraction, "cpu", args.prompt_len,
                                  args.kv_device_tokens)
    print(f"bf16 budget: device_mem {bf16['device_mem']} B, host_mem 0\n{plan.summary()}\n", flush=True)
    fraction = len(plan.disk_layers) / plan.num_layers
    out: dict[str, dict[str, dict[str, int]]] = {}
    if args.budget_mode in ("both", "same-budget"):
        out["same-budget"] = {s: bf16 for s in args.schemes}
    if args.budget_mode in ("both", "same-layers"):
        out["same-layers"] = {s: bf16 if s == "bf16" else bw.choose_budget(
            model_dir, offload, links, fraction, "cpu", args.prompt_len, args.kv_device_tokens,
            policy_extra(s, args.group_size, args.quant_head))[0] for s in args.schemes}
    return out


def stream_part(args: argparse.Namespace, model_dir: Path, ids: list[int], offload: Path) -> dict[str, Any]:
    """Links and budgets, then every (mode, scheme) in its own process under the cap; raw disk sampled
    before, between the modes and after."""
    from dataclasses import asdict

    links, data_path, raw0 = bw.measure_links(model_dir, offload, "cpu")
    budgets = stream_budgets(args, model_dir, offload, links)
    raw, runs = [raw0], {}
    for mode, per_scheme in budgets.items():
        for scheme, budget in per_scheme.items():
            same = [k for k in runs if k.endswith(f"/{scheme}") and budgets[k.split("/")[0]][scheme] == budget]
            if same:                                      # bf16 in both modes: one run, the same budget
                runs[f"{mode}/{scheme}"] = runs[same[0]]
                continue
            opts = {"scheme": scheme, "group_size": args.group_size, "model_dir": str(model_dir), "ids": ids,
                    "offload": str(offload), "budget": budget, "links": asdict(links), "common": _common(args)}
            evict_inputs(model_dir, offload)
            runs[f"{mode}/{scheme}"] = run_worker("stream", opts, args.cap_arg)
            r = runs[f"{mode}/{scheme}"]
            print(f"stream {mode}/{scheme}: {r.get('cold', {}).get('tok_s', r.get('error'))}", flush=True)
        raw.append(bw.raw_disk_gbps(data_path))
    return {"links": asdict(links), "data_path": str(data_path), "raw_gbps": raw, "budgets": budgets, "runs": runs,
            "bf16_budget": budgets[next(iter(budgets))]["bf16"] if "bf16" in args.schemes else None}


def peer_part(args: argparse.Namespace, model_dir: Path, ids: list[int], offload: Path,
              budget: dict[str, int] | None) -> dict[str, Any]:
    """Every peer under the cap with bf16's ``max_memory``; a quantized peer that offloaded nothing
    is tried again with a quarter of it (then accelerate must put layers on disk)."""
    if budget is None:
        links, _, _ = bw.measure_links(model_dir, offload, "cpu")
        budget, _ = bw.choose_budget(model_dir, offload, links, args.stream_fraction, "cpu", args.prompt_len,
                                     args.kv_device_tokens)
    out: dict[str, Any] = {}
    for peer in args.peers:
        for label, mem in ((peer, budget["device_mem"]), (f"{peer}@quarter", budget["device_mem"] // 4)):
            if label != peer and (peer == "accelerate" or truly_offloaded(out[peer])):
                continue
            folder = Path(tempfile.mkdtemp(prefix="peer-offload-", dir=offload))
            opts = {"peer": peer, "model_dir": str(model_dir), "ids": ids, "max_memory": {"cpu": mem},
                    "folder": str(folder), "peer_pkgs": str(args.peer_pkgs), "common": _common(args)}
            evict_inputs(model_dir, offload)
            try:
                out[label] = dict(run_worker("peer", opts, args.cap_arg), max_memory_cpu_bytes=mem)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            r = out[label]
            print(f"peer {label}: {r.get('cold_tok_s', r.get('error'))}", flush=True)
    return out


def truly_offloaded(peer: dict[str, Any]) -> bool:
    """A peer run that generated with decoder layers on disk."""
    return bool(peer.get("runs")) and not peer.get("error") and bool(peer.get("disk_layers"))


# ---------------------------------------------------------------------------------------------
# ratios, goals, table


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def summarize_resident(res: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bool]]:
    """tok/s per scheme and HF (medians over the rounds), ratios over tierkv bf16 and HF (medians of the
    ratios within each round, with their range); resident goals."""
    tok = {k: r.get("tok_s") for k, r in res.items()}
    out: dict[str, Any] = {f"resident_{k}_tok_s": None if v is None else round(v, 3) for k, v in tok.items()}
    out.update({f"resident_{k}_tok_s_samples": r["samples"] for k, r in res.items() if len(r.get("samples", [])) > 1})
    for k in [k for k in res if len(res[k].get("samples", [])) > 1 and k != "bf16" and "bf16" in res]:
        ratios = [a / b for a, b in zip(res[k]["samples"], res["bf16"]["samples"]) if a and b]
        if ratios and tok.get("bf16"):
            out[f"resident_{k}_vs_bf16_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
            tok[k] = tok["bf16"] * statistics.median(ratios)    # so vs_bf16 below is the median ratio
    out.update({f"resident_{k}_error": r["error"] for k, r in res.items() if r.get("error")})
    goals = {}
    for k in res:
        if k not in ("bf16", "hf"):
            out[f"resident_{k}_vs_bf16"] = _ratio(tok[k], tok.get("bf16"))
            goal = GOALS_RESIDENT.get(split_variant(k)[0].partition(":")[0])
            if goal and out[f"resident_{k}_vs_bf16"] is not None:
                goals[f"resident_{k}_ge_{goal}x_bf16"] = out[f"resident_{k}_vs_bf16"] >= goal
        if k != "hf":
            out[f"resident_{k}_vs_hf"] = _ratio(tok[k], tok.get("hf"))
    return out, goals


def _stream_row(r: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one streamed run that the summary keeps."""
    cold, plan = r.get("cold", {}), r.get("plan", {})
    return {"tok_s": cold.get("tok_s"), "engine_decode_tok_s": cold.get("stats_decode_tok_s"),
            "disk_bytes_per_token": cold.get("disk_bytes_per_step"),
            "disk_layers": plan.get("disk_layers"), "device_layers": plan.get("device_layers"),
            "layer_bytes": plan.get("layer_bytes"), "predicted_tok_s": plan.get("predicted_tok_s"),
            "streamed": r.get("streamed"), "memcap_peak_bytes": r.get("memcap_peak_bytes"),
            "memcap_oom_kills": r.get("memcap_oom_kills"), "peak_rss_bytes": r.get("peak_rss_bytes"),
            "tier_weight_bytes": cold.get("tier_weight_bytes"), "timing_consistent": cold.get("timing_consistent"),
            "overlap_efficiency": cold.get("overlap_efficiency"), "error": r.get("error")}


def summarize_stream(st: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bool]]:
    """Per (mode, scheme): the run's numbers and its ratios over bf16 in the same mode; stream goals."""
    out: dict[str, Any] = {"raw_odirect_gbps": round(max(st["raw_gbps"]), 3),
                           "raw_odirect_gbps_samples": [round(x, 3) for x in st["raw_gbps"]], "stream": {}}
    goals = {}
    for key, r in st["runs"].items():
        mode, scheme = key.split("/")
        row, base = _stream_row(r), _stream_row(st["runs"].get(f"{mode}/bf16", {}))
        if scheme != "bf16":
            row["tok_s_vs_bf16"] = _ratio(row["tok_s"], base["tok_s"])
            row["bytes_vs_bf16"] = _ratio(row["disk_bytes_per_token"], base["disk_bytes_per_token"])
            row["layer_bytes_vs_bf16"] = _ratio(row["layer_bytes"], base["layer_bytes"])
            goal = GOALS_STREAM.get(scheme.partition(":")[0])
            if goal and row["tok_s_vs_bf16"] is not None:
                goals[f"stream_{mode}_{scheme}_tok_s_ge_{goal['tok_s']}x"] = row["tok_s_vs_bf16"] >= goal["tok_s"]
            if goal and row["bytes_vs_bf16"] is not None:
                goals[f"stream_{mode}_{scheme}_bytes_le_{goal['bytes']}x"] = row["bytes_vs_bf16"] <= goal["bytes"]
        if row["disk_bytes_per_token"] and row["tok_s"]:
            row["disk_gbps_achieved"] = round(row["disk_bytes_per_token"] * row["tok_s"] / 1e9, 3)
        out["stream"][key] = row
    return out, goals


def summarize_peers(peers: dict[str, Any], st: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, bool]]:
    """Each peer's outcome; tierkv int8/int4 (same budget as the peer) over the fastest quantized
    peer that truly ran offloaded, and over accelerate bf16."""
    keep = ("runs", "stage", "error", "cold_tok_s", "warm_tok_s", "disk_layers", "offload_folder_bytes",
            "offload_folder_files", "meta_params", "linear_class", "memcap_peak_bytes", "memcap_oom_kills",
            "peak_rss_bytes", "max_memory_cpu_bytes", "device_map")
    out: dict[str, Any] = {"peers": {k: {f: v.get(f) for f in keep} for k, v in peers.items()}}
    for row in out["peers"].values():
        row["truly_offloaded"] = truly_offloaded(row)
    quant = {k: v for k, v in out["peers"].items() if not k.startswith("accelerate") and v["truly_offloaded"]}
    best = max(quant, key=lambda k: quant[k]["cold_tok_s"], default=None)
    out["best_offloaded_quant_peer"] = best
    running = {k: v for k, v in out["peers"].items() if not k.startswith("accelerate") and v.get("runs")
               and not v.get("error") and v.get("cold_tok_s")}       # ran, offloaded or not (fits in RAM)
    best_running = max(running, key=lambda k: running[k]["cold_tok_s"], default=None)
    out["best_running_quant_peer"] = best_running
    goals = {}
    runs = (st or {}).get("runs", {})
    for scheme in sorted({k.split("/")[1] for k in runs} - {"bf16"}) or ["int8", "int4"]:
        r = runs.get(f"same-budget/{scheme}") or runs.get(f"same-layers/{scheme}")
        tok = (r or {}).get("cold", {}).get("tok_s")
        if "accelerate" in peers:
            out[f"stream_{scheme}_vs_accelerate_bf16"] = _ratio(tok, peers["accelerate"].get("cold_tok_s"))
        if best_running is not None:
            out[f"stream_{scheme}_vs_running_quant_peer"] = _ratio(tok, running[best_running]["cold_tok_s"])
        if best is not None:
            out[f"stream_{scheme}_vs_best_quant_peer"] = _ratio(tok, quant[best]["cold_tok_s"])
            if out[f"stream_{scheme}_vs_best_quant_peer"] is not None:
                goals[f"stream_{scheme}_ge_2x_{best}"] = out[f"stream_{scheme}_vs_best_quant_peer"] >= PEER_SPEEDUP_GOAL
    return out, goals


def _fmt(x: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def _gb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e9:.3f} GB"


def table_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The human table of the summary's numbers."""
    rows: list[tuple[str, str]] = []
    for k in [k for k in s if k.startswith("resident_") and k.endswith("_tok_s")]:
        name = k.removeprefix("resident_").removesuffix("_tok_s")
        extra = "" if name in ("bf16", "hf") else f" = {_fmt(s.get(f'resident_{name}_vs_bf16'))}x tierkv bf16"
        ceiling = s.get(f"ceiling_{name}_tok_s")
        rows.append((f"resident {'HF transformers bf16' if name == 'hf' else 'tierkv ' + name}",
                     f"{_fmt(s[k])} tok/s{extra}"
                     + ("" if name == "hf" else f", {_fmt(s.get(f'resident_{name}_vs_hf'))}x HF")
                     + ("" if not ceiling or s[k] is None else
                        f", {s[k] / ceiling:.0%} of its bandwidth ceiling {ceiling:.2f} tok/s")))
    if "ceiling_matvec_gbps" in s:
        rows.append(("ceiling: bf16 matvec bandwidth", f"{s['ceiling_matvec_gbps']:.1f} GB/s (weights in DRAM)"))
    if "raw_odirect_gbps" in s:
        rows.append(("raw O_DIRECT read (bf16 store)", f"{s['raw_odirect_gbps']:.2f} GB/s "
                                                       f"(samples {s['raw_odirect_gbps_samples']})"))
    for key, r in s.get("stream", {}).items():
        if r.get("error"):
            rows.append((f"stream {key}", f"FAILED: {r['error']}"))
            continue
        ratio = "" if "tok_s_vs_bf16" not in r else (
            f" = {_fmt(r['tok_s_vs_bf16'])}x bf16, bytes {_fmt(r['bytes_vs_bf16'])}x "
            f"(layer {_fmt(r['layer_bytes_vs_bf16'])}x)")
        rows.append((f"stream {key}", f"{_fmt(r['tok_s'])} tok/s (engine's own {_fmt(r['engine_decode_tok_s'])}"
                                      f"{'' if r['timing_consistent'] else ', INCONSISTENT: rerun'}), "
                                      f"{_gb(r['disk_bytes_per_token'])}/token read, "
                                      f"{r['disk_layers']} layers on disk{ratio}; memcap peak "
                                      f"{_fmt((r['memcap_peak_bytes'] or 0) / 2**20, '.0f')} MiB"))
    for label, p in s.get("peers", {}).items():
        if p["truly_offloaded"]:
            what = f"{_fmt(p['cold_tok_s'])} tok/s cold, {p['disk_layers']} layers on disk"
        elif p.get("error"):
            what = f"does not run ({p.get('stage')}): {p['error'][:160]}"
        else:
            what = (f"{_fmt(p.get('cold_tok_s'))} tok/s but NOT offloaded (device map {p.get('device_map')}, "
                    f"offload folder {p.get('offload_folder_bytes')} B)")
        rows.append((f"peer {label} (max_memory {(p['max_memory_cpu_bytes'] or 0) / 2**20:.0f} MiB)",
                     what + f"; memcap peak {_fmt((p.get('memcap_peak_bytes') or 0) / 2**20, '.0f')} MiB"))
    for k in [k for k in s if k.startswith("stream_") and ("_vs_" in k)]:
        rows.append((k.replace("_", " "), f"{_fmt(s[k])}x"))
    if "best_offloaded_quant_peer" in s and s["best_offloaded_quant_peer"] is None:
        rows.append(("quantized peer offloaded", "none runs with layers on disk (see the rows above)"))
    rows.append(goals_row(s["goals"]))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="resident,stream,peer", help="comma list of resident, stream, peer")
    ap.add_argument("--schemes", default=",".join(SCHEMES),
                    help="comma list of bf16, int8, int4; int8:channel / int4:32 set that entry's group size; "
                         f"a suffix @VARIANT[+VARIANT] ({', '.join(VARIANTS)}) runs it under that environment")
    ap.add_argument("--group-size", type=group_size_arg, default=64, help="32, 64, 128 (or a word the library takes)")
    ap.add_argument("--quant-head", action="store_true", help="quantize the LM head too (int8/int4 runs)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)}")
    ap.add_argument("--cap", default="1280MiB", help="memcap limit for stream and peer runs ('none': no cap)")
    ap.add_argument("--budget-mode", choices=["both", "same-layers", "same-budget"], default="both")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--stream-fraction", type=float, default=0.7, help="share of bf16's layers on disk")
    ap.add_argument("--prompt-len", type=int, default=16, help="short: prefill noise cancels badly in t(N) - t(1)")
    ap.add_argument("--new-tokens", type=int, default=10, help="decode tokens per streamed/peer timing")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--resident-tokens", type=int, default=16)
    ap.add_argument("--resident-repeats", type=int, default=2)
    ap.add_argument("--resident-rounds", type=int, default=1, help="rounds of fresh processes per contender")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-device-tokens", type=int, default=512,
                    help="KV context tierkv keeps device room for, inside its budget (accelerate keeps none)")
    ap.add_argument("--peer-pkgs", type=Path, default=Path("/tmp/peerpkgs"),
                    help="bitsandbytes / optimum-quanto installed with pip --target (peer processes only)")
    ap.add_argument("--model-root", type=Path, default=Path(tempfile.gettempdir()) / "tierkv-bench")
    ap.add_argument("--offload-dir", type=Path, default=None, help="stores and offload folders (MODEL_ROOT/offload)")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--opts", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.parts, args.schemes, args.peers = (args.parts.split(","), args.schemes.split(","), args.peers.split(","))
    bad = [x for x in args.schemes if split_variant(x)[0].partition(":")[0] not in SCHEMES] + [x for x in args.peers if x not in PEERS]
    if bad:
        ap.error(f"unknown scheme or peer {bad}; schemes: {', '.join(SCHEMES)}; peers: {', '.join(PEERS)}")
    return args


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def main() -> None:
    from tierkv.config import parse_size

    args = parse_args()
    if args.worker:                                   # a contender's process: one JSON line on stdout
        emit_json(WORKERS[args.worker](json.loads(args.opts)))
        return
    t0, load_start = time.perf_counter(), os.getloadavg()
    model_dir = bench_model_dir(args.model_root, args.layers)
    offload = args.offload_dir or args.model_root / "offload"
    offload.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(3, 32000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    capped = args.cap != "none" and memcap_usable()
    args.cap_arg = args.cap if capped else None
    if args.cap != "none" and not capped:
        print("WARNING: memcap cannot cap memory here; stream and peer runs are NOT capped", flush=True)
    if capped and parse_size(args.cap) >= checkpoint_bytes(model_dir):
        print(f"WARNING: the cap {args.cap} is not below the bf16 checkpoint "
              f"({checkpoint_bytes(model_dir) / 2**20:.0f} MiB): the model fits in RAM", flush=True)
    s: dict[str, Any] = {"goals": {}}
    st = None
    if "resident" in args.parts:
        part, goals = summarize_resident(resident_part(args, model_dir, ids))
        s.update(part), s["goals"].update(goals)
        s.update(resident_ceilings(args, model_dir))
    if "stream" in args.parts:
        st = stream_part(args, model_dir, ids, offload)
        part, goals = summarize_stream(st)
        s.update(part), s["goals"].update(goals)
    if "peer" in args.parts:
        peers = peer_part(args, model_dir, ids, offload, (st or {}).get("bf16_budget"))
        part, goals = summarize_peers(peers, st)
        s.update(part), s["goals"].update(goals)
    load_end = os.getloadavg()
    print_table(f"quantized weights, {args.layers}-layer ~0.85B bf16 Llama ({checkpoint_bytes(model_dir) / 2**20:.0f} "
                f"MiB), group {args.group_size}{', head quantized' if args.quant_head else ''}, cpu, "
                f"{args.threads} threads, prompt {args.prompt_len}, cap "
                f"{args.cap if capped else 'none'}, load avg {load_start[0]:.1f} -> {load_end[0]:.1f} on "
                f"{os.cpu_count()} cores", table_rows(s))
    emit_json(dict(s, bench="quant", parts=args.parts, schemes=args.schemes, group_size=args.group_size,
                   quant_head=args.quant_head,
                   cap=args.cap if capped else None, checkpoint_bytes=checkpoint_bytes(model_dir),
                   threads=args.threads, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                   resident_tokens=args.resident_tokens, budget_mode=args.budget_mode,
                   budgets=(st or {}).get("budgets"), links=(st or {}).get("links"),
                   load_avg_start=list(load_start), load_avg_end=list(load_end), cpu_count=os.cpu_count(),
                   wall_s=round(time.perf_counter() - t0, 1)))


if __name__ == "__main__":
    main()
