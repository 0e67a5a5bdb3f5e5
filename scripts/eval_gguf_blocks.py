"""The error of converting GGUF quantized blocks directly into tierkv groups, per ggml type.

Why this script exists: ``tierkv.io.gguf_blocks`` is bit-exact for Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 and
rounds the K-quants' scales to fp16 (Q6_K: re-quantized per 32); the README states those errors, and
this measures them against ``gguf.quants.dequantize`` of the same blocks. For each 2-D tensor of a
supported type in the given GGUF files (llama.cpp's own quantizer made them), and for random valid
blocks (``--random``: scales with fp16 exponents -14..-6, every byte else random), it prints per type:

* ``max_abs``: the largest |tierkv - gguf| over all weights;
* ``rel_range``: the worst tensor's max_abs / (max - min of its weights);
* ``rel_group``: the worst group of 32's max error / that group's range;
* ``exact``: the share of weights bit-identical to gguf's;
* ``via16_rel_range``: the same rel_range for the other road, dequantize to fp32 then tierkv's own
  int4/int8 g32 quantization (what a converter without this module does): the gap this closes.

    python scripts/eval_gguf_blocks.py [FILE.gguf ...] [--random]

Prints one table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tierkv.io.gguf_blocks import BLOCK_SIZES, GGUF_SCHEMES, blocks_to_groups, groups_to_weights  # noqa: E402
from tierkv.kernels.quant_reference import quantize_weight_codes  # noqa: E402


def _errors(name: str, raw: np.ndarray, k: int, ref: np.ndarray) -> dict[str, float]:
    """One tensor's errors (see the module docstring); ref: gguf's dequantized (N, K) fp32."""
    ours = groups_to_weights(*blocks_to_groups(name, raw, k))
    bits = 4 if GGUF_SCHEMES[name].scheme == "int4" else 8
    codes, qp = quantize_weight_codes(torch.from_numpy(ref), bits, 32)
    via16 = groups_to_weights(codes.numpy(), qp.numpy())
    span = float(ref.max()) - float(ref.min()) or 1.0
    diff = np.abs(ours.astype(np.float64) - ref).reshape(ref.shape[0], -1, 32)
    groups = ref.reshape(diff.shape)
    gspan = groups.max(-1).astype(np.float64) - groups.min(-1)
    return {"max_abs": float(diff.max()), "rel_range": float(diff.max()) / span,
            "rel_group": float((diff.max(-1) / np.where(gspan > 0, gspan, span)).max()),
            "exact": float((ours == ref).mean()), "n": ref.size,
            "via16_rel_range": float(np.abs(via16.astype(np.float64) - ref).max()) / span}


def _merge(acc: dict[str, dict[str, float]], key: str, e: dict[str, float]) -> None:
    """Worst-case merge of one tensor's errors into ``acc[key]`` (``exact`` weighted by weights)."""
    old = acc.get(key)
    if old is None:
        acc[key] = dict(e)
        return
    n = old["n"] + e["n"]
    old["exact"] = (old["exact"] * old["n"] + e["exact"] * e["n"]) / n
    old["n"] = n
    for f in ("max_abs", "rel_range", "rel_group", "via16_rel_range"):
        old[f] = max(old[f], e[f])


def from_files(paths: list[str], acc: dict[str, dict[str, float]]) -> None:
    import gguf
    from gguf.quants import dequantize
    for path in paths:
        reader = gguf.GGUFReader(path)
        for t in reader.tensors:
            name = t.tensor_type.name
            if name not in GGUF_SCHEMES or len(t.shape) != 2:
                continue
            k = int(t.shape[0])
            raw = np.asarray(t.data).reshape(int(t.shape[1]), -1)
            errors = _errors(name, raw, k, dequantize(raw, t.tensor_type))
            _merge(acc, f"{name} ({Path(path).name.split('-')[0]})", errors)


def random_blocks(acc: dict[str, dict[str, float]], n: int = 256, k: int = 2048) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    rng = np.random.default_rng(0)
    for name, (per_block, block_bytes) in BLOCK_SIZES.items():
        raw = rng.integers(0, 256, (n, k // per_block, block_bytes), dtype=np.uint8)
        offsets = {"Q6_K": (208,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q4_1": (0, 2), "Q5_1": (0, 2)}.get(name, (0,))
        for off in offsets:
            d = rng.uniform(1, 2, raw.shape[:2]) * 2.0 ** rng.integers(-14, -5, raw.shape[:2])
            raw[..., off:off + 2] = d.astype(np.float16)[..., None].view(np.uint8)
        raw = raw.reshape(n, -1)
        _merge(acc, f"{name} (random)", _errors(name, raw, k, dequantize(raw, GGMLQuantizationType[name])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--random", action="store_true", help="also random valid blocks of every type")
    args = ap.parse_args()
    acc: dict[str, dict[str, float]] = {}
    from_files(args.files, acc)
    if args.random or not args.files:
        random_blocks(acc)
    print(f"{'type (source)':24s} {'weights':>10s} {'max_abs':>10s} {'rel_range':>10s} {'rel_group':>10s} "
          f"{'exact':>7s} {'via16_rel_range':>15s}")
    for key in sorted(acc):
        e = acc[key]
        print(f"{key:24s} {int(e['n']):10d} {e['max_abs']:10.3g} {e['rel_range']:10.3g} {e['rel_group']:10.3g} "
              f"{e['exact']:7.1%} {e['via16_rel_range']:15.3g}")
    print(json.dumps({"gguf_block_errors": acc}))


if __name__ == "__main__":
    main()
