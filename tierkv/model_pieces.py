"""A decoder layer computed from row blocks of its matrices as they stream in (``pipeline.pieces``).

Why this module exists: a layer streamed in pieces never has all its weights in memory at once, so its
math walks the matrices in stored order (q, k, v, o, gate, up, down), each product filled block of
output columns by block as the pieces land, and every micro-batch (``runner.Runner``'s groups) uses a
block before the next one is asked for (the pieces behind it are reused then). It computes what
``model.decoder_layer`` computes with the layer's unfused ops: the same norms, RoPE and attention, and
each product's output rows split across blocks (a row's dot product is the same whichever block holds
it).

Shapes: hs[g] (1, T_g, H) per group g; Hq/Hkv heads, D head_dim; a matrix (N, K), a block (r1 - r0, K).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from tierkv.config import ModelConfig
from tierkv.kernels.cpu_rows import silu_mul_rows
from tierkv.kernels.dense_linear import dense_linear
from tierkv.model import KVCache, StepInputs, _heads, rms_norm
from tierkv.pipeline.pieces import PieceLayer

__all__ = ["piece_decoder_layers", "piece_linear"]


def piece_linear(w: PieceLayer, key: str, xs: Sequence[torch.Tensor], bias: torch.Tensor | None = None
                 ) -> list[torch.Tensor]:
    """xs[g] (..., K) @ matrix ``key`` (N, K)^T (+ bias (N,)) -> (..., N) for every g, one row block at a time."""
    n, _ = w.shape(key)
    outs = [x.new_empty(*x.shape[:-1], n) for x in xs]
    for r0, r1, rows in w.blocks(key):
        part = None if bias is None else bias[r0:r1]
        for x, out in zip(xs, outs):
            out[..., r0:r1] = dense_linear(x, rows, part)
    return outs


def piece_decoder_layers(cfg: ModelConfig, w: PieceLayer, hs: Sequence[torch.Tensor], steps: Sequence[StepInputs],
                         kvs: Sequence[KVCache], layer: int) -> list[torch.Tensor]:
    """``model.decoder_layer`` for each group g: hs[g] (1, T_g, H) at steps[g] through kvs[g] -> (1, T_g, H)."""
    s, eps = w.small, cfg.rms_norm_eps
    xs = [rms_norm(h, s["input_layernorm.weight"], eps) for h in hs]
    qs = piece_linear(w, "self_attn.q_proj.weight", xs, s.get("self_attn.q_proj.bias"))
    ks = piece_linear(w, "self_attn.k_proj.weight", xs, s.get("self_attn.k_proj.bias"))
    vs = piece_linear(w, "self_attn.v_proj.weight", xs, s.get("self_attn.v_proj.bias"))
    attn = []
    for q, k, v, h, step, kv in zip(qs, ks, vs, hs, steps, kvs):
        b, t, _ = h.shape
        q, k, v = _heads(cfg, s, q, k, v, step.cos, step.sin)                 # (B, T, heads, D)
        out = kv.attend(layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), step.positions,
                        cfg.sliding_window_tokens[layer])
        attn.append(out.transpose(1, 2).reshape(b, t, cfg.q_size))            # (B, T, Hq*D)
    outs = piece_linear(w, "self_attn.o_proj.weight", attn, s.get("self_attn.o_proj.bias"))
    hs = [h + o for h, o in zip(hs, outs)]
    xs = [rms_norm(h, s["post_attention_layernorm.weight"], eps) for h in hs]
    gates = piece_linear(w, "mlp.gate_proj.weight", xs, s.get("mlp.gate_proj.bias"))
    ups = piece_linear(w, "mlp.up_proj.weight", xs, s.get("mlp.up_proj.bias"))
    acts = []
    for gate, up in zip(gates, ups):
        act = silu_mul_rows(gate, up)                                         # one C++ pass on the CPU
        acts.append(act if act is not None else F.silu(gate) * up)
    downs = piece_linear(w, "mlp.down_proj.weight", acts, s.get("mlp.down_proj.bias"))
    return [h + d for h, d in zip(hs, downs)]
