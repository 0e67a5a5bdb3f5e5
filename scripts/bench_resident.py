"""Resident decode tokens/s and prefill time: tierkv vs HF transformers on the same random bf16 model.

Why this script exists: the foundation issue's goal is "tierkv at least as fast as transformers"
with the whole model in memory. Both run in this one process, with the same threads, prompt and
number of new tokens, timed the same way (generate with N tokens minus generate with 1 token gives
decode time). Each is also set against the ceiling of the machine measured in the same run:
bf16 matrix-vector bandwidth for decode (weights bytes / GB/s = best possible seconds per token)
and bf16 GEMM throughput for prefill.

    python scripts/bench_resident.py [--layers 16] [--prompt-len 128] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import bench_model_dir, best_of, emit_json, gemm_tflops, matvec_gbps, print_table  # noqa: E402


def _time_tierkv(model_dir: Path, ids: list[int], new_tokens: int, repeats: int,
                 device: str) -> tuple[float, float, float]:
    """(prefill seconds, decode tok/s, weight bytes) for tierkv, timed like the peer."""
    import tierkv

    engine = tierkv.load(model_dir, dtype="bfloat16", device=device)
    gen = lambda n: engine.generate(ids, max_new_tokens=n, ignore_eos=True)  # noqa: E731  (as the peer: no EOS)
    gen(2)  # warm-up
    t1 = best_of(lambda: gen(1), repeats)
    tn = best_of(lambda: gen(new_tokens), repeats)
    weight_bytes = engine.config.param_count() * 2
    engine.close()
    return t1, (new_tokens - 1) / (tn - t1), weight_bytes


def _time_hf(model_dir: Path, ids: list[int], new_tokens: int, repeats: int, device: str) -> tuple[float, float]:
    """(prefill seconds, decode tok/s) for HF transformers generate(), greedy, EOS disabled."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval().to(device)
    x = torch.tensor([ids], device=device)

    def gen(n: int) -> None:
        with torch.inference_mode():
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)

    gen(2)
    t1 = best_of(lambda: gen(1), repeats)
    tn = best_of(lambda: gen(new_tokens), repeats)
    del model
    return t1, (new_tokens - 1) / (tn - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--model-root", type=Path, default=Path(tempfile.gettempdir()) / "tierkv-bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = bench_model_dir(args.model_root, args.layers)
    ids = torch.randint(3, 32000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()

    bw = matvec_gbps(device=args.device)
    tflops = gemm_tflops(device=args.device)
    tk_prefill, tk_tok_s, weight_bytes = _time_tierkv(model_dir, ids, args.new_tokens, args.repeats, args.device)
    hf_prefill, hf_tok_s = _time_hf(model_dir, ids, args.new_tokens, args.repeats, args.device)
    ceiling_tok_s = bw * 1e9 / weight_bytes
    prefill_floor_s = 2 * weight_bytes / 2 * args.prompt_len / (tflops * 1e12)

    print_table(f"resident bf16, {weight_bytes / 1e9:.2f} GB weights, {args.threads} threads, "
                f"prompt {args.prompt_len}, {args.new_tokens} new tokens", [
        ("ceiling: matvec bandwidth", f"{bw:.1f} GB/s -> {ceiling_tok_s:.2f} tok/s"),
        ("ceiling: bf16 GEMM", f"{tflops:.2f} TFLOP/s -> prefill >= {prefill_floor_s:.3f} s"),
        ("tierkv decode", f"{tk_tok_s:.2f} tok/s ({tk_tok_s / ceiling_tok_s:.0%} of ceiling)"),
        ("HF transformers decode", f"{hf_tok_s:.2f} tok/s ({hf_tok_s / ceiling_tok_s:.0%} of ceiling)"),
        ("decode ratio tierkv/HF", f"{tk_tok_s / hf_tok_s:.2f}x"),
        ("tierkv prefill", f"{tk_prefill:.3f} s"),
        ("HF prefill", f"{hf_prefill:.3f} s"),
        ("prefill speed ratio tierkv/HF", f"{hf_prefill / tk_prefill:.2f}x"),
    ])
    emit_json({"bench": "resident", "device": args.device, "threads": args.threads, "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "weight_bytes": weight_bytes,
               "ceiling_matvec_gbps": round(bw, 2), "ceiling_decode_tok_s": round(ceiling_tok_s, 3),
               "ceiling_gemm_tflops": round(tflops, 3),
               "tierkv_decode_tok_s": round(tk_tok_s, 3), "hf_decode_tok_s": round(hf_tok_s, 3),
               "decode_ratio_vs_hf": round(tk_tok_s / hf_tok_s, 3),
               "decode_ratio_vs_ceiling": round(tk_tok_s / ceiling_tok_s, 3),
               "tierkv_prefill_s": round(tk_prefill, 4), "hf_prefill_s": round(hf_prefill, 4),
               "prefill_speedup_vs_hf": round(hf_prefill / tk_prefill, 3)})


if __name__ == "__main__":
    main()
