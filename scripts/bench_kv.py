"""Decode over a long context with the tiered, chunked KV cache: sparse tiered vs exact tiered vs all resident.

Why this script exists: the KV issue's goals are, at 32K tokens of context on a model whose KV
exceeds the device + host budget, "sparse tiered >= 3x faster than exact tiered", "sparse tiered
within 2x of everything resident", "bytes read per step <= 15% of the full KV" and "estimator
time <= 10% of the step". This script measures all of them in one invocation, per context length:

* the model is a small random HF Llama built here once and cached (``--model-root``): hidden 512,
  ``--layers`` layers, 8 query heads, 4 KV heads of 64 dims, vocab 4096, fp32 on CPU (bf16 on
  CUDA: on the 2-core CPU machine a bf16 batch-1 linear takes ~15 ms with 2 threads and bf16 SDPA
  decode is ~6x slower than fp32, which would swamp what is measured here). Random weights give
  nearly flat attention (normalized entropy ~1), the worst case for the importance estimator,
  and so the largest adaptive chunks (256 tokens); ``--key-scale`` multiplies the key projections
  to sharpen attention;
* three configurations on the same prompt of random token ids: ``resident`` (kv="exact", no
  budgets: the dense cache), ``exact_tiered`` and ``sparse_tiered`` (the same budgets: every layer
  fits the device, its KV room holds ``--device-kv-tokens`` tokens, the host ``--host-kv-tokens``,
  the rest goes to a fresh offload dir; sizing as in tests/test_kv_tiered.py);
* each configuration is one ``engine.stream`` call: prefill (reported, not a goal), then decode
  steps timed one by one (median reported). Tiered runs do ``--new-tokens - 1`` "warm" steps (KV
  segment files as the page cache left them) and as many "cold" steps (the segments are evicted
  from the page cache with posix_fadvise before each step, outside the timed interval: the KV
  store reads through the page cache, so without this the "disk" tier is RAM). Goals use the cold
  steps: KV that exceeds the budgets would not sit in the page cache of a machine that needed them;
* per step, from ``TieredKVCache.stats()`` snapshots: bytes moved host/disk -> device ("bytes read
  per step"; chunks already on the device are read in place and not counted), estimator
  seconds (host wall time of scoring + selection: on CUDA only the launch time), speculation hit
  rate; against the full KV of the context;
* whether the sparse selection fits the device: the mean union of the KV heads' selections per
  layer-step (``sparse_union_tokens``) against what the resident slots hold (``device_room_tokens``)
  and how many sparse layer-steps overflowed (``sparse_overflow_steps``: as much as fits is made
  resident, the rest streams);
* the link ceiling: raw O_DIRECT read speed of the offload disk (``measure_disk_read_gbps`` on a
  scratch file), measured before and after the runs; achieved KV GB/s from disk in the cold steps is
  reported against it.

* ``--kv-quant none,int8,int4``: each tiered configuration also runs with its host/disk chunks held
  as int8/int4 codes (``kv_quant``; same budgets in bytes, so more chunks fit the host). Per scheme
  (``quant`` in the JSON): bytes read per decode step from host + disk (split), the ratio to the
  same run without quantization and to 16-bit KV (the unquantized bytes scaled to 2 bytes per
  value when the run's dtype is wider: chunk counts are the same), greedy token agreement, and the
  output error: relative L2 error of the logits of each step (prefill's last position, then the
  decode steps up to the first differing token) against the unquantized run. Goal: int8 <= 0.55x
  of 16-bit bytes per sparse step at 32K;

Known limit (tierkv/pipeline/kv/tiered.py ``TieredKVCache._check_budgets``): with adaptive chunks the
budget check assumes the smallest chunk size (16 tokens), whose abstracts alone fill a 2K-token
device room at 32K tokens, so the tiered configurations fail at load with KVBudgetError (recorded
in the JSON as that configuration's "error"). ``--chunk-tokens 256`` gives the geometry the
adaptive rule picks on this flat-attention model (256 in every layer at 8K).

Ends with one JSON line (per-context numbers, ratios and a ``goals`` object, judged at
``--goal-context``, default 32768 or the largest context run).

    python scripts/bench_kv.py [--contexts 8192,32768] [--layers 4] [--new-tokens 8] [--kv-budget 0.05]
        [--chunk-tokens 256] [--device-kv-tokens 2048] [--host-kv-tokens 4096] [--device cpu|cuda]
        [--offload-dir DIR] [--threads 2] [--configs resident,exact_tiered,sparse_tiered] [--no-cold]
        [--kv-quant none,int8,int4] [--kv-sketch default|on|off]

Estimator share (goal <= 10% of the step): per phase, the select() wall time (scoring + selection)
over the timed decode steps, and the cache's own ``stats()["estimator_share"]`` (over the decode
steps that selected chunks, advance to advance). ``--kv-sketch`` compares the key sketch on/off
against the policy default (on, two stages). 128K in minutes: ``--contexts 131072 --layers 1
--configs sparse_tiered --no-cold --new-tokens 4`` (prefill dominates; it is not timed per step).

On CPU the kernels' torch references run (the automatic choice; ``TIERKV_KERNELS=torch`` forces
it); on CUDA the Triton kernels compile.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))       # bench_common
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the checkout's tierkv, installed or not
from bench_common import emit_json, print_table  # noqa: E402

# 128K of context plus room for the new tokens (with exactly 131072 positions, --contexts 131072 left no
# position for a new token and the first decode step raised StopIteration)
POSITIONS = 131072 + 4096
MODEL_SHAPE = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=64, vocab_size=4096, max_position_embeddings=POSITIONS, rope_theta=500000.0)
CONFIGS = ("resident", "exact_tiered", "sparse_tiered")
PROBE_BYTES = 256 << 20
GOALS = dict(sparse_speedup_vs_exact_tiered=3.0, sparse_vs_resident_ratio=2.0,
             bytes_per_step_fraction_of_kv=0.15, estimator_share=0.10, kv_int8_bytes_vs_16bit=0.55)


@dataclass(frozen=True)
class Setup:
    """What every configuration shares (from the command line)."""

    model_dir: Path
    device: str
    dtype: str
    new_tokens: int
    kv_budget: float | int
    chunk_tokens: int | None
    device_kv_tokens: int
    host_kv_tokens: int
    offload_root: Path
    cold: bool
    kv_sketch: bool | None = None     # sparse runs: key codes on (True), off (False), the default (None)


# ---------------------------------------------------------------------------------------------
# model, budgets, ceilings


def kv_model_dir(root: Path, layers: int, dtype: str, key_scale: float) -> Path:
    """Build (once) and return the random Llama checkpoint of ``MODEL_SHAPE``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / f"llama-h512-l{layers}-kv4-{dtype}-k{key_scale:g}-p{POSITIONS}"
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    torch.manual_seed(0)
    cfg = LlamaConfig(**MODEL_SHAPE, num_hidden_layers=layers, dtype=dtype)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    if key_scale != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.k_proj.weight.mul_(key_scale)
    model.save_pretrained(path, safe_serialization=True)
    return path


def tiered_budgets(setup: Setup, kv: str) -> dict[str, Any]:
    """load() budgets: every layer on the device, KV room for device_kv_tokens there, host_kv_tokens on
    the host, the rest in a fresh offload dir."""
    import tierkv
    from tierkv.config import ModelConfig, Policy
    from tierkv.pipeline.kv import kv_bytes_per_token
    from tierkv.plan import make_plan, reserve_bytes

    cfg = ModelConfig.from_dir(setup.model_dir)
    dtype = getattr(torch, setup.dtype)
    policy = Policy(dtype=setup.dtype, device=setup.device, kv=kv, chunk_tokens=setup.chunk_tokens,
                    kv_device_tokens=setup.device_kv_tokens)
    roomy = make_plan(cfg, tierkv.Budget(), policy)
    weights = roomy.globals_bytes + cfg.num_layers * roomy.layer_bytes
    device_mem = weights + reserve_bytes(cfg, dtype, policy, setup.device_kv_tokens, 1)
    offload = Path(tempfile.mkdtemp(prefix=f"{kv}-", dir=setup.offload_root))
    return dict(device_mem=device_mem, host_mem=setup.host_kv_tokens * kv_bytes_per_token(cfg, dtype),
                offload_dir=offload, kv_device_tokens=setup.device_kv_tokens)


def disk_ceiling_gbps(root: Path) -> float:
    """Raw O_DIRECT sequential read speed of the offload disk, on a fresh scratch file."""
    from tierkv.io.reader import measure_disk_read_gbps
    from tierkv.probe import scratch_file

    with scratch_file(root / f".bench-kv-probe-{os.getpid()}", PROBE_BYTES) as scratch:
        return measure_disk_read_gbps(scratch, PROBE_BYTES)


def evict_kv_segments(root: Path) -> None:
    """Drop the KV segment files under ``root`` from the page cache (they are fsynced: clean pages)."""
    for path in root.rglob("*.kvseg"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:   # a cache closing under us
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# one configuration


@dataclass
class Phase:
    """Per-step measurements of one phase (warm or cold) of a decode run."""

    seconds: list[float] = field(default_factory=list)
    moved_bytes: list[int] = field(default_factory=list)     # host + disk -> device during the step
    disk_bytes: list[int] = field(default_factory=list)
    estimator_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        total_s = sum(self.seconds)
        return {
            "steps": len(self.seconds),
            "step_s": statistics.median(self.seconds),
            "step_s_min": min(self.seconds),
            "step_s_all": [round(s, 5) for s in self.seconds],
            "bytes_read_per_step": sum(self.moved_bytes) / len(self.seconds),
            "disk_bytes_per_step": sum(self.disk_bytes) / len(self.seconds),
            "disk_gbps": sum(self.disk_bytes) / total_s / 1e9,
            "estimator_share": sum(self.estimator_s) / total_s,
        }


def _kv_totals(caches: list[Any]) -> tuple[int, int, float]:
    """(bytes moved to the device, of which from disk, estimator seconds) so far; zeros for the dense cache."""
    if not caches or not hasattr(caches[-1], "stats"):
        return 0, 0, 0.0
    st = caches[-1].stats()
    return st["bytes_read_host"] + st["bytes_read_disk"], st["bytes_read_disk"], st["estimator_s"]


def _capture_caches(engine: Any) -> list[Any]:
    """Record every KV cache the engine makes, to read its stats between decode steps (bench only)."""
    caches: list[Any] = []
    room = engine._core.room
    make = room.make_cache

    def recording(*args: Any, **kw: Any) -> Any:
        caches.append(make(*args, **kw))
        return caches[-1]

    room.make_cache = recording
    return caches


def _timed_step(stream: Any, caches: list[Any], phase: Phase, before_step: Callable[[], None] | None) -> int:
    """Run one decode step of ``stream`` (timed alone) and log it in ``phase``; returns the new token."""
    if before_step is not None:
        before_step()
    moved0, disk0, est0 = _kv_totals(caches)
    t0 = time.perf_counter()
    piece = next(stream)
    phase.seconds.append(time.perf_counter() - t0)
    moved1, disk1, est1 = _kv_totals(caches)
    phase.moved_bytes.append(moved1 - moved0)
    phase.disk_bytes.append(disk1 - disk0)
    phase.estimator_s.append(est1 - est0)
    return piece.token_id


def _capture_logits(logits: list[torch.Tensor]) -> Callable[[], None]:
    """Record the last position's logits of every forward (bench only); returns the undo."""
    import tierkv.runner as runner_mod

    real = runner_mod.head

    def recording(cfg: Any, g: Any, h: torch.Tensor) -> torch.Tensor:
        out = real(cfg, g, h)
        logits.append(out[0, -1].float().cpu())
        return out

    runner_mod.head = recording
    return lambda: setattr(runner_mod, "head", real)


def run_config(setup: Setup, name: str, ids: list[int], kv_quant: str = "none") -> dict[str, Any]:
    """Prefill ``ids`` and decode in configuration ``name`` (host/disk KV under ``kv_quant``); per-phase
    step numbers, the KV stats, and (under "_logits", not reported) each step's last logits."""
    import tierkv

    kv = "sparse" if name == "sparse_tiered" else "exact"
    budgets = {} if name == "resident" else tiered_budgets(setup, kv)
    engine = tierkv.load(setup.model_dir, device=setup.device, dtype=setup.dtype, kv=kv, kv_budget=setup.kv_budget,
                         chunk_tokens=setup.chunk_tokens, kv_quant=kv_quant,
                         kv_sketch=setup.kv_sketch if kv == "sparse" else None, **budgets)
    logits: list[torch.Tensor] = []
    undo = _capture_logits(logits)
    try:
        caches = _capture_caches(engine)
        steps = setup.new_tokens - 1
        phases = {"warm": Phase()}
        if budgets and setup.cold:
            phases["cold"] = Phase()
        offload = budgets.get("offload_dir")
        stream = engine.stream(ids, max_new_tokens=1 + steps * len(phases), ignore_eos=True)
        tokens = [next(stream).token_id]                       # prefill + the first token
        for phase_name, phase in phases.items():
            evict = (lambda: evict_kv_segments(offload)) if phase_name == "cold" else None
            tokens += [_timed_step(stream, caches, phase, evict) for _ in range(steps)]
        for _ in stream:                                        # let the generation finish and report
            pass
        result = stream.results[0]
        out = {"prefill_s": result.stats.prefill_s, "tokens": tokens, "kv": _kv_report(result.stats.kv),
               "plan_kv_device_bytes": engine.plan.kv_device_bytes if engine.plan else None,
               "plan_kv_host_bytes": engine.plan.kv_host_bytes if engine.plan else None}
        out.update({phase_name: phase.summary() for phase_name, phase in phases.items()})
        out["_logits"] = logits
        return out
    finally:
        undo()
        engine.close()
        if budgets:
            shutil.rmtree(budgets["offload_dir"], ignore_errors=True)


def _kv_report(kv: dict[str, Any]) -> dict[str, Any]:
    """The TieredKVCache.stats() fields worth printing (empty for the dense cache)."""
    keys = ("chunk_tokens", "attention_entropy", "device_bytes", "host_bytes", "disk_bytes", "spec_hit_rate",
            "selected_fraction", "streamed_chunks", "evicted_chunks", "sparse_layer_steps", "exact_layer_steps",
            "sparse_union_tokens", "sparse_overflow_steps", "device_room_tokens", "kv_quant", "cold_chunk_ratio",
            "bytes_read_host", "bytes_read_disk", "sketch", "estimator_s", "estimator_share")
    return {k: kv[k] for k in keys if k in kv}


# ---------------------------------------------------------------------------------------------
# one context length, ratios and goals


def _decode_phase(run: dict[str, Any]) -> dict[str, Any]:
    """The phase the goals use: cold where it was measured (tiered), else warm."""
    return run.get("cold") or run["warm"]


def _agreement(a: list[int], b: list[int]) -> float:
    """Share of the common prefix length on which two greedy token sequences agree."""
    n = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:n], b[:n])) / n if n else float("nan")


def ratios(runs: dict[str, dict[str, Any]], full_kv_bytes: int) -> dict[str, Any]:
    """The issue's ratios (cold steps for tiered runs) plus warm variants and token agreement."""
    res, ex, sp = (runs.get(name) for name in CONFIGS)
    out: dict[str, Any] = {}
    if sp is not None:
        s = _decode_phase(sp)
        out["bytes_per_step_fraction_of_kv"] = s["bytes_read_per_step"] / full_kv_bytes
        out["estimator_share"] = s["estimator_share"]
        out["sparse_selected_fraction"] = sp["kv"].get("selected_fraction")
    if sp is not None and ex is not None:
        out["sparse_speedup_vs_exact_tiered"] = _decode_phase(ex)["step_s"] / _decode_phase(sp)["step_s"]
        out["sparse_speedup_vs_exact_tiered_warm"] = ex["warm"]["step_s"] / sp["warm"]["step_s"]
        out["sparse_token_agreement_with_exact"] = _agreement(sp["tokens"], ex["tokens"])
    if sp is not None and res is not None:
        out["sparse_vs_resident_ratio"] = _decode_phase(sp)["step_s"] / res["warm"]["step_s"]
        out["sparse_vs_resident_ratio_warm"] = sp["warm"]["step_s"] / res["warm"]["step_s"]
    if ex is not None and res is not None:
        out["exact_tiered_vs_resident_ratio"] = _decode_phase(ex)["step_s"] / res["warm"]["step_s"]
        out["exact_tiered_tokens_match_resident"] = _agreement(ex["tokens"], res["tokens"]) == 1.0
    return out


def _logits_error(base: list[torch.Tensor], other: list[torch.Tensor], steps: int) -> list[float]:
    """Relative L2 error of ``other``'s logits against ``base``'s, for the first ``steps`` steps."""
    return [float((b - o).norm() / b.norm()) for b, o in zip(base[:steps], other[:steps])]


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None     # None: the unquantized run read nothing (every selected chunk was resident)


def quant_ratios(runs: dict[str, dict[str, Any]], quants: tuple[str, ...], elt_bytes: int) -> dict[str, Any]:
    """Per quantized tiered run: bytes read per decode step (host, disk) against the same run in the
    cache dtype and against 16-bit KV, token agreement and the logits' relative error."""
    out: dict[str, Any] = {}
    for name in ("exact_tiered", "sparse_tiered"):
        base = runs.get(name)
        for q in quants:
            run = runs.get(f"{name}_{q}")
            if base is None or run is None or q == "none":
                continue
            p, p0 = _decode_phase(run), _decode_phase(base)
            same = next((i for i, (a, b) in enumerate(zip(base["tokens"], run["tokens"])) if a != b),
                        min(len(base["tokens"]), len(run["tokens"])))
            errors = _logits_error(base["_logits"], run["_logits"], same + 1)   # step i's logits chose token i
            out[f"{name}_{q}"] = {
                "bytes_read_per_step": p["bytes_read_per_step"],
                "host_bytes_per_step": p["bytes_read_per_step"] - p["disk_bytes_per_step"],
                "disk_bytes_per_step": p["disk_bytes_per_step"],
                "bytes_vs_same_dtype": _ratio(p["bytes_read_per_step"], p0["bytes_read_per_step"]),
                "bytes_vs_16bit": _ratio(p["bytes_read_per_step"], p0["bytes_read_per_step"] * 2 / elt_bytes),
                "step_s_vs_same_dtype": p["step_s"] / p0["step_s"],
                "token_agreement": _agreement(base["tokens"], run["tokens"]),
                "logits_rel_error_prefill": errors[0] if errors else None,
                "logits_rel_error_max": max(errors) if errors else None,
                "logits_rel_error_mean": statistics.fmean(errors) if errors else None,
                "steps_compared": len(errors),
            }
    return out


def run_context(setup: Setup, context: int, configs: list[str], quants: tuple[str, ...] = ("none",)) -> dict[str, Any]:
    """All configurations (tiered ones under each KV scheme of ``quants``) on one prompt of ``context`` random ids."""
    from tierkv.config import ModelConfig
    from tierkv.pipeline.kv import kv_bytes_per_token

    cfg = ModelConfig.from_dir(setup.model_dir)
    ids = torch.randint(0, cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(context)).tolist()
    runs: dict[str, dict[str, Any]] = {}
    for name, q in [(n, q) for n in configs for q in (quants if n != "resident" else ["none"])]:
        key, t0 = name if q == "none" else f"{name}_{q}", time.perf_counter()
        try:
            runs[key] = run_config(setup, name, ids, q)
        except Exception as exc:   # a failed configuration is a result too: record it, run the others
            traceback.print_exc()
            runs[key] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"[{context} tokens] {key}: {time.perf_counter() - t0:.1f} s, load {os.getloadavg()[0]:.2f}",
              file=sys.stderr, flush=True)
    dtype = getattr(torch, setup.dtype)
    full_kv = kv_bytes_per_token(cfg, dtype) * context
    ok = {name: run for name, run in runs.items() if "error" not in run}
    quant = quant_ratios(ok, quants, torch.empty((), dtype=dtype).element_size())
    for run in runs.values():
        run.pop("_logits", None)
    return {"context_tokens": context, "full_kv_bytes": full_kv, "runs": runs, "ratios": ratios(ok, full_kv),
            "quant": quant}


def goals(result: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's goals at one context length (None where a configuration was not run)."""
    r = result["ratios"]

    def check(key: str, ok: Callable[[float], bool]) -> bool | None:
        return None if r.get(key) is None else bool(ok(r[key]))

    return {
        "sparse_3x_faster_than_exact_tiered": check("sparse_speedup_vs_exact_tiered",
                                                    lambda x: x >= GOALS["sparse_speedup_vs_exact_tiered"]),
        "sparse_within_2x_of_resident": check("sparse_vs_resident_ratio",
                                              lambda x: x <= GOALS["sparse_vs_resident_ratio"]),
        "bytes_per_step_le_15pct_of_kv": check("bytes_per_step_fraction_of_kv",
                                               lambda x: x <= GOALS["bytes_per_step_fraction_of_kv"]),
        "estimator_le_10pct_of_step": check("estimator_share", lambda x: x <= GOALS["estimator_share"]),
        "kv_int8_bytes_le_055x_of_16bit": _int8_goal(result.get("quant", {}).get("sparse_tiered_int8")),
    }


def _int8_goal(quant: dict[str, Any] | None) -> bool | None:
    if quant is None or quant["bytes_vs_16bit"] is None:
        return None
    return quant["bytes_vs_16bit"] <= GOALS["kv_int8_bytes_vs_16bit"]


# ---------------------------------------------------------------------------------------------
# output


def _row(run: dict[str, Any], phase: str, full_kv: int) -> str:
    p = run[phase]
    kv = run["kv"]
    text = (f"step {p['step_s'] * 1e3:8.1f} ms (min {p['step_s_min'] * 1e3:.1f})  prefill {run['prefill_s']:6.1f} s"
            f"  read/step {p['bytes_read_per_step'] / 2**20:7.2f} MiB"
            f" ({p['bytes_read_per_step'] / full_kv:6.1%} of KV)")
    if kv:
        hit = kv.get("spec_hit_rate")
        ceiling = f" ({p['disk_fraction_of_ceiling']:.0%} of ceiling)" if "disk_fraction_of_ceiling" in p else ""
        text += (f"  disk tier {p['disk_gbps']:.2f} GB/s{ceiling}  est {p['estimator_share']:5.1%}"
                 f"  spec hit {'-' if hit is None else f'{hit:.0%}'}  chunks {sorted(set(kv['chunk_tokens']))}")
        if kv.get("sparse_union_tokens") is not None:   # does the selection fit the device room?
            room = min(r for r in kv["device_room_tokens"] if r is not None)
            text += (f"  union {kv['sparse_union_tokens']:.0f} tok / room {room} tok"
                     f"  overflow {kv['sparse_overflow_steps']}/{kv['sparse_layer_steps']} layer-steps")
    return text


def print_report(results: list[dict[str, Any]], ceilings: list[float]) -> None:
    for res in results:
        rows = []
        for name, run in res["runs"].items():
            if "error" in run:
                rows.append((name, f"FAILED: {run['error']}"))
            rows += [(f"{name} {phase}", _row(run, phase, res["full_kv_bytes"])) for phase in ("warm", "cold")
                     if phase in run]
        rows += [(key, f"{value:.3f}" if isinstance(value, float) else str(value))
                 for key, value in res["ratios"].items()]
        rows += [(name, "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in q.items()))
                 for name, q in res.get("quant", {}).items()]
        print_table(f"context {res['context_tokens']} tokens (full KV {res['full_kv_bytes'] / 2**20:.0f} MiB)", rows)
        print()
    print(f"disk ceiling (O_DIRECT, before / after): {ceilings[0]:.2f} / {ceilings[1]:.2f} GB/s")


# ---------------------------------------------------------------------------------------------
# main


def _budget(text: str) -> float | int:
    value = float(text)
    return value if value < 1.0 else int(value)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,32768", help="comma-separated context lengths in tokens")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens per phase: new-tokens - 1 timed steps")
    ap.add_argument("--kv-budget", type=_budget, default=0.05, help="sparse budget: fraction (<1) or tokens")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="fixed chunk size (default: adaptive)")
    ap.add_argument("--device-kv-tokens", type=int, default=2048, help="KV room on the device, tokens")
    ap.add_argument("--host-kv-tokens", type=int, default=4096, help="KV room in host memory, tokens")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--key-scale", type=float, default=1.0, help="multiply k_proj weights (sharper attention)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--kv-sketch", default="default", choices=("default", "on", "off"),
                    help="sparse runs: 2-bit key codes on, off, or the policy's default (kv_sketch)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold (page cache evicted) steps")
    ap.add_argument("--kv-quant", default="none", help="comma-separated host/disk KV schemes: none,int8,int4")
    ap.add_argument("--goal-context", type=int, default=None, help="default: 32768 if run, else the largest")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--model-root", type=Path, default=Path(tempfile.gettempdir()) / "tierkv-bench-models")
    ap.add_argument("--offload-dir", type=Path, default=None, help="default: a temporary dir under /tmp")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    contexts = [int(c) for c in args.contexts.split(",")]
    configs = [c for c in args.configs.split(",") if c]
    assert set(configs) <= set(CONFIGS), f"--configs: choose from {CONFIGS}"
    room = POSITIONS - max(contexts) - 2 * args.new_tokens          # warm and cold phases
    if room < 0:
        raise SystemExit(f"--contexts {max(contexts)} with --new-tokens {args.new_tokens} needs "
                         f"{max(contexts) + 2 * args.new_tokens} positions; the bench model has {POSITIONS}: "
                         f"use a context of at most {POSITIONS - 2 * args.new_tokens}")
    quants = tuple(dict.fromkeys(["none", *(q.strip() for q in args.kv_quant.split(",") if q.strip())]))
    assert set(quants) <= {"none", "int8", "int4"}, "--kv-quant: choose from none, int8, int4"
    owned = args.offload_dir is None
    root = Path(tempfile.mkdtemp(prefix="tierkv-bench-kv-")) if owned else args.offload_dir
    root.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    setup = Setup(kv_model_dir(args.model_root, args.layers, dtype, args.key_scale), args.device, dtype,
                  args.new_tokens, args.kv_budget, args.chunk_tokens, args.device_kv_tokens, args.host_kv_tokens,
                  root, not args.no_cold, {"default": None, "on": True, "off": False}[args.kv_sketch])
    try:
        ceilings = [disk_ceiling_gbps(root)]
        results = [run_context(setup, c, configs, quants) for c in contexts]
        ceilings.append(disk_ceiling_gbps(root))
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    goal_context = args.goal_context or (32768 if 32768 in contexts else max(contexts))
    by_context = {r["context_tokens"]: r for r in results}
    for r in results:   # achieved disk-tier GB/s of the cold steps against the slower ceiling measurement
        for run in r["runs"].values():
            if "cold" in run:
                run["cold"]["disk_fraction_of_ceiling"] = run["cold"]["disk_gbps"] / min(ceilings)
    print_report(results, ceilings)
    emit_json({
        "bench": "kv", "device": args.device, "dtype": dtype, "layers": args.layers, "threads": torch.get_num_threads(),
        "model": {**MODEL_SHAPE, "num_hidden_layers": args.layers, "key_scale": args.key_scale,
                  "weights": "random (seed 0)"},
        "new_tokens": args.new_tokens, "kv_budget": args.kv_budget, "chunk_tokens": args.chunk_tokens,
        "kv_sketch": args.kv_sketch,
        "kv_quant": quants,
        "device_kv_tokens": args.device_kv_tokens, "host_kv_tokens": args.host_kv_tokens,
        "disk_ceiling_gbps": ceilings, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "contexts": {str(c): r for c, r in by_context.items()},
        "goal_context": goal_context, "goal_thresholds": GOALS,
        "goals": goals(by_context[goal_context]) if goal_context in by_context else {},
    })


if __name__ == "__main__":
    main()
