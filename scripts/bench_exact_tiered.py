"""Exact tiered KV against the dense cache: same tokens and logits? and what prefill costs.

Why this script exists: the README promises that exact tiered mode gives the resident engine's
tokens wherever the KV sits (issue 12). This builds a random bf16 Llama (no download), prefills one
long prompt and decodes greedily with the dense cache, with a tiered cache whose KV is all on the
device, and with one whose KV spills to host and disk, then (``--sparse``) sparse mode resident and
spilled. Per run: prefill seconds, decode tokens/s, tokens and logits equal to the reference run.
Ratios are measured in the same process. Ends with one JSON line.

    PYTHONPATH=. python scripts/bench_exact_tiered.py --tokens 7168 --new 8 --sparse
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import tierkv.runner as runner_mod
from tierkv.config import Policy
from tierkv.engine import Engine
from tierkv.kvroom import KVRoom
from tierkv.pipeline.kv import TieredKVCache, keeps_sketch, layer_index_bytes
from tierkv.pipeline.kv.sizing import slot_bytes


def build_model(path: Path, layers: int, hidden: int, heads: int, kv_heads: int, context: int) -> Path:
    """A random Llama saved in bf16 (weights drawn wide enough for peaked logits)."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, intermediate_size=2 * hidden, vocab_size=1024,
                                   max_position_embeddings=context)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    return path


def run(model: Path, policy: Policy, placement: str, prompt: list[int], new: int, offload: Path,
        slots: int, host_chunks: int) -> dict[str, Any]:
    """One generation; placement "dense" (the engine's resident cache), "device" (tiered, all
    resident) or "spilled" (``slots`` device and ``host_chunks`` host chunks per layer, then disk)."""
    logits: list[torch.Tensor] = []
    head, make = runner_mod.head, KVRoom.make_cache
    stats: dict[str, Any] = {}

    def recording_head(*args: Any) -> torch.Tensor:
        out = head(*args)
        logits.append(out.clone())
        return out

    def tiered(room: KVRoom, capacity: int, *_: Any, **__: Any) -> TieredKVCache:
        dev = host = None
        if placement == "spilled":
            chunk, cfg, dt = policy.chunk_tokens or 64, room.cfg, room.dtype
            index = layer_index_bytes(cfg, dt, 1, capacity, chunk, keeps_sketch(policy))
            dev = cfg.num_layers * (slots * slot_bytes(cfg, dt, chunk) + index)
            host = cfg.num_layers * host_chunks * slot_bytes(cfg, dt, chunk)
        cache = TieredKVCache(room.cfg, room.policy, 1, capacity, room.dtype, room.device, kv_device_bytes=dev,
                              kv_host_bytes=host, offload_dir=offload, attention_scratch_bytes=room.scratch_bytes,
                              workers=room.workers)
        close = cache.close
        cache.close = lambda: (stats.update(cache.stats()), close())   # type: ignore[method-assign]
        return cache

    runner_mod.head = recording_head
    KVRoom.make_cache = tiered if placement != "dense" else make      # type: ignore[method-assign]
    try:
        with Engine(model, policy) as engine:
            t0 = time.perf_counter()
            out = engine.generate(prompt, max_new_tokens=new, ignore_eos=True)
            wall = time.perf_counter() - t0
    finally:
        runner_mod.head, KVRoom.make_cache = head, make                # type: ignore[method-assign]
    return dict(tokens=out.token_ids, logits=logits, prefill_s=round(out.stats.prefill_s, 3),
                decode_tok_s=round(out.stats.decode_tok_s, 2), wall_s=round(wall, 3),
                host_bytes=stats.get("host_bytes", 0), disk_bytes=stats.get("disk_bytes", 0))


def compare(runs: dict[str, dict[str, Any]], ref: str) -> None:
    """Add, per run, whether its tokens and logits equal the reference run's and the largest logit gap."""
    base = runs[ref]
    for r in runs.values():
        same = len(r["logits"]) == len(base["logits"])
        gap = max(float((a - b).abs().max()) for a, b in zip(r["logits"], base["logits"])) if same else None
        r.update(tokens_equal=r["tokens"] == base["tokens"], logits_bitwise=same and gap == 0.0, max_logit_gap=gap,
                 prefill_vs_ref=round(r["prefill_s"] / base["prefill_s"], 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=7168)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--piece", type=int, default=512)
    ap.add_argument("--slots", type=int, default=16, help="device chunk slots per layer of the spilled runs")
    ap.add_argument("--host-chunks", type=int, default=32, help="host chunks per layer of the spilled runs")
    ap.add_argument("--sparse", action="store_true", help="also sparse mode (kv_budget 0.1), resident and spilled")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model", args.layers, args.hidden, args.heads, args.kv_heads,
                            args.tokens + args.new + 64)
        prompt = torch.randint(0, 1024, (args.tokens,), generator=torch.Generator().manual_seed(1)).tolist()
        common = dict(dtype="bfloat16", device="cpu", chunk_tokens=args.chunk, prefill_chunk_tokens=args.piece)
        exact = Policy(kv="exact", **common)  # type: ignore[arg-type]
        runs = {p: run(model, exact, p, prompt, args.new, Path(tmp), args.slots, args.host_chunks)
                for p in ("dense", "device", "spilled")}
        compare(runs, "dense")
        report: dict[str, Any] = {f"exact_{k}": v for k, v in runs.items()}
        if args.sparse:
            sparse = Policy(kv="sparse", kv_budget=0.1, **common)  # type: ignore[arg-type]
            sruns = {p: run(model, sparse, p, prompt, args.new, Path(tmp), args.slots, args.host_chunks)
                     for p in ("device", "spilled")}
            compare(sruns, "device")
            report.update({f"sparse_{k}": v for k, v in sruns.items()})
    for name, r in report.items():
        r.pop("logits")
        print(f"{name:16s} prefill {r['prefill_s']:7.2f}s (x{r['prefill_vs_ref']}) decode {r['decode_tok_s']:6.2f} tok/s"
              f"  tokens equal {r['tokens_equal']}  logits bitwise {r['logits_bitwise']}  host/disk "
              f"{r['host_bytes']}/{r['disk_bytes']}")
    print(json.dumps({"args": vars(args), **{k: {x: y for x, y in v.items() if x != "tokens"} for k, v in report.items()}}))


if __name__ == "__main__":
    main()
