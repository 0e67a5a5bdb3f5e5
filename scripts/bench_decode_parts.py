"""Where one resident decode step's time goes: matmuls, norms, RoPE, attention, the rest of the layer.

Why this script exists: a decode step of a small model is hundreds of small torch ops, and the
cure (fewer, larger ops; host work hoisted out of the layer loop) must be measured part by part,
before and after. The script times a resident bf16 decode with every part of ``tierkv.model``
wrapped in a wall-clock timer (exclusive time: a part's children are counted in their own rows),
so the rows add up to the step; "layer other" is what ``decoder_layer``, ``pre_attention``,
``post_attention`` and ``mlp`` do between their calls (residual adds, SiLU x up, views and splits, Python), "outside the layers" is
the engine around them (embedding, sampling, the loop). A second pass under ``torch.profiler``
counts the aten ops per token and their summed self time, so "wall - aten" is the Python and
dispatch time between ops. The peer is HF transformers' decode of the same checkpoint in the same
run; the ceiling is the weight bytes over a raw memory read measured in the run (beside torch's bf16 matvec rate).

    python scripts/bench_decode_parts.py [--shape small|bench] [--prompt-len 128] [--new-tokens 16] [--threads 2]

``--shape small`` is a SmolLM-135M-shaped Llama (hidden 576, 30 layers, 9/3 heads, vocab 49152,
tied); ``bench`` the ~0.85B ``BENCH_MODEL``. Set ``TIERKV_*`` variables to compare paths.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SHAPES, bench_model_dir, emit_json, matvec_gbps, memory_read_gbps, prefer_checkout, print_table  # noqa: E402

prefer_checkout(Path(__file__).resolve().parents[1])

# (module, attribute, row): the parts of a step that get a timer, where the module has them.
# A row in STICKY keeps its children's time (the head's norm and matmul are "lm head").
PARTS = [("tierkv.model", "linear", "matmul (q/k/v/o, gate/up/down)"),
         ("tierkv.model", "rms_norm", "RMSNorm"),
         ("tierkv.model", "apply_rope", "RoPE"),
         ("tierkv.model", "step_inputs", "step inputs (RoPE tables, positions)"),
         ("tierkv.runner", "RaggedKV.attend", "attention (KV append + SDPA)"),
         ("tierkv.model", "attention_inputs", "layer other (views, splits, adds, SiLU, Python)"),
         ("tierkv.model", "pre_attention", "layer other (views, splits, adds, SiLU, Python)"),
         ("tierkv.model", "post_attention", "layer other (views, splits, adds, SiLU, Python)"),
         ("tierkv.model", "mlp", "layer other (views, splits, adds, SiLU, Python)"),
         ("tierkv.model", "decoder_layer", "layer other (views, splits, adds, SiLU, Python)"),
         ("tierkv.runner", "decoder_layer", "layer other (views, splits, adds, SiLU, Python)"),
         ("tierkv.model", "fused_pre_attention", "fused C++ (norm + q/k/v)"),
         ("tierkv.model", "fused_post_attention", "fused C++ (o + residual, norm + gate/up, SiLU + down + residual)"),
         ("tierkv.model", "run_attend_kernel", "fused C++ (RoPE + KV append + attention)"),
         ("tierkv.runner", "head", "lm head (norm + matmul)"),
         ("tierkv.runner", "embed", "embedding")]
STICKY = {"attention (KV append + SDPA)", "lm head (norm + matmul)", "step inputs (RoPE tables, positions)"}


class Timers:
    """Exclusive wall time per row over nested wrapped calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list[Any]] = []          # [row, start, child seconds]
        self.enabled = False

    def wrap(self, fn: Callable[..., Any], row: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled or (self.stack and self.stack[-1][0] in STICKY):
                return fn(*args, **kwargs)
            frame = [row, time.perf_counter(), 0.0]
            self.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                spent = time.perf_counter() - frame[1]
                self.seconds[row] += spent - frame[2]
                self.calls[row] += 1
                if self.stack:
                    self.stack[-1][2] += spent
        return timed

    def install(self) -> None:
        import importlib
        for module_name, attr, row in PARTS:
            owner: Any = importlib.import_module(module_name)
            *path, name = attr.split(".")
            for p in path:
                owner = getattr(owner, p)
            if hasattr(owner, name):
                setattr(owner, name, self.wrap(getattr(owner, name), row))

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


class _Clock:
    """Timestamps of the tokens of one generation (an HF streamer gets ``put`` per token; tierkv's stream
    yields a piece per token): the decode steps are the gaps after the first token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]


def _tierkv_steps(engine: Any, ids: list[int], new_tokens: int, on_step: Callable[[], None] | None = None
                  ) -> list[float]:
    """Seconds of each decode step of one greedy generation (``on_step`` runs after each token)."""
    clock = _Clock()
    for _ in engine.stream(ids, max_new_tokens=new_tokens, ignore_eos=True):
        clock.put(None)
        if on_step is not None:
            on_step()
    return clock.steps()


def _hf_tok_s(model_dir: Path, ids: list[int], new_tokens: int, repeats: int) -> float:
    """HF transformers greedy decode, 1 / the median step (prompt token first, as its streamer sees it)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    x = torch.tensor([ids])
    steps: list[float] = []
    for r in range(repeats + 1):
        clock = _Clock()
        with torch.inference_mode():
            model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0, streamer=clock)
        steps += clock.steps()[1:] if r else []                  # put #1 is the prompt, #2 the prefill's token
    return 1.0 / _median(steps)


def _aten_profile(gen: Callable[[int], Any], new_tokens: int) -> tuple[float, float, int]:
    """(wall s, s inside top-level aten ops, top-level aten op calls) per decoded token under the
    profiler, from (generate n) - (generate 1). Top level: an op not called by another op."""
    from torch.profiler import ProfilerActivity, profile

    def one(n: int) -> tuple[float, float, int]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            gen(n)
            wall = time.perf_counter() - t
        top = [e for e in prof.events() if e.name.startswith("aten::") and not _under_aten(e)]
        return wall, sum(e.cpu_time_total for e in top) / 1e6, len(top)

    a, b = one(1), one(new_tokens)
    return tuple((y - x) / (new_tokens - 1) for x, y in zip(a, b))  # type: ignore[return-value]


def _under_aten(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quant", default=None, help="int8, int4 or int8:channel / int4:32 (SCHEME[:GROUP]): the "
                    "engine's weights in that scheme (default: bf16)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    ap.add_argument("--model-root", type=Path, default=Path(tempfile.gettempdir()) / "tierkv-bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = bench_model_dir(args.model_root, shape=SHAPES[args.shape])
    ids = torch.randint(3, 32000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    import tierkv

    scheme, _, group = (args.quant or "").partition(":")
    engine = tierkv.load(model_dir, dtype="bfloat16", quant=scheme or None, group_size=group or None)
    gen = lambda n: engine.generate(ids, max_new_tokens=n, ignore_eos=True)  # noqa: E731
    gen(2)
    wall_s, aten_s, aten_ops = _aten_profile(gen, args.new_tokens)
    timers = Timers()
    timers.install()
    snaps: list[tuple[dict[str, float], dict[str, int]]] = []
    timed: list[float] = []
    untimed: list[float] = []
    deltas: list[tuple[dict[str, float], dict[str, int]]] = []   # per decode step: (seconds, calls) per row
    for _ in range(args.repeats):                                 # untimed and timed runs alternate
        timers.enabled = False
        untimed += _tierkv_steps(engine, ids, args.new_tokens)
        timers.enabled = True
        timers.reset()
        snaps.clear()
        timed += _tierkv_steps(engine, ids, args.new_tokens,
                               lambda: snaps.append((dict(timers.seconds), dict(timers.calls))))
        deltas += [({k: v - a[0].get(k, 0.0) for k, v in b[0].items()}, {k: v - a[1].get(k, 0) for k, v in b[1].items()})
                   for a, b in zip(snaps, snaps[1:])]
    step_s = _median(untimed)
    timed_s = _median(timed)
    names = {k for d, _ in deltas for k in d}
    rows = {k: _median([d.get(k, 0.0) for d, _ in deltas]) for k in names}          # median step, per row
    calls = {k: _median([c.get(k, 0) for _, c in deltas]) for k in names}
    rows["outside the layers (engine, sampling)"] = timed_s - sum(rows.values())
    calls["outside the layers (engine, sampling)"] = 1
    weight_bytes = engine.config.param_count() * 2
    engine.close()
    hf = None if args.no_hf else _hf_tok_s(model_dir, ids, args.new_tokens, args.repeats)
    bw, read = matvec_gbps(), memory_read_gbps()
    timed_step = timed_s
    table = [(f"{k} ({calls[k]:.0f} calls)", f"{v * 1e3:7.2f} ms  {v / timed_step:5.1%}")
             for k, v in sorted(rows.items(), key=lambda kv: -kv[1])]
    print_table(f"resident bf16 decode step, {args.shape} model ({weight_bytes / 1e6:.0f} MB), {args.threads} threads, "
                f"prompt {args.prompt_len}; timed {timed_s * 1e3:.1f} ms/token",
                table + [
                    ("decode (untimed)", f"{step_s * 1e3:.2f} ms/token = {1 / step_s:.1f} tok/s"),
                    ("aten ops per token", f"{aten_ops:.0f} top-level, inside them {aten_s * 1e3:.1f} ms of {wall_s * 1e3:.1f} ms "
                                           f"under the profiler ({1 - aten_s / wall_s:.0%} outside ops)"),
                    ("ceiling: weights / raw memory read", "n/a (no C++ compiler)" if read is None else
                     f"{read:.1f} GB/s -> {read * 1e9 / weight_bytes:.1f} tok/s (tierkv: "
                     f"{weight_bytes / step_s / 1e9 / read:.0%} of it)"),
                    ("torch matvec bandwidth", f"{bw:.1f} GB/s -> {bw * 1e9 / weight_bytes:.1f} tok/s"),
                    ("HF transformers decode", "skipped" if hf is None else f"{hf:.1f} tok/s -> tierkv/HF "
                                                                           f"{1 / step_s / hf:.2f}x")])
    emit_json({"bench": "decode_parts", "shape": args.shape, "threads": args.threads, "prompt_len": args.prompt_len,
               "weight_bytes": weight_bytes, "tierkv_decode_tok_s": round(1 / step_s, 2),
               "hf_decode_tok_s": None if hf is None else round(hf, 2),
               "ratio_vs_hf": None if hf is None else round(1 / step_s / hf, 3),
               "ceiling_matvec_gbps": round(bw, 2), "ceiling_decode_tok_s": round(bw * 1e9 / weight_bytes, 2),
               "ceiling_memory_read_gbps": None if read is None else round(read, 2),
               "aten_ops_per_token": round(aten_ops), "aten_top_ms": round(aten_s * 1e3, 2),
               "profiled_wall_ms": round(wall_s * 1e3, 2), "timed_step_ms": round(timed_s * 1e3, 2),
               "parts_ms": {k: round(v * 1e3, 3) for k, v in rows.items()}})


if __name__ == "__main__":
    main()
