"""A decoder layer computed from row blocks of its matrices as they stream in (``pipeline.pieces``).

Why this module exists: a layer streamed in pieces never has all its weights in memory at once, so its
math walks the matrices in stored order (q, k, v, o, gate, up, down), each product filled block of
output columns by block as the pieces land, and the rows of every micro-batch (``runner.Runner``'s
groups) go through a block in one product before the next block is asked for (the pieces behind it
are reused then; one product over all rows reads the block once and gives the GEMM more rows than a
product per group would). Only attention runs group by group, through each group's cache. It computes what
``model.decoder_layer`` computes with the layer's unfused ops: the same norms, RoPE and attention, and
each product's output rows split across blocks (a row's dot product is the same whichever block holds
it).

Shapes: h (1, N, H), the groups' rows packed (T_g rows of group g); Hq/Hkv heads, D head_dim; a matrix
(N, K), a block (r1 - r0, K).
"""

from __future__ import annotations

from typing import Sequence

import torch

from tierkv.config import ModelConfig
from tierkv.kernels.dense_linear import dense_linear
from tierkv.model import KVCache, StepInputs, _heads, rms_norm, silu_mul
from tierkv.pipeline.pieces import PieceLayer

__all__ = ["piece_decoder_layers", "piece_linear"]


def piece_linear(w: PieceLayer, key: str, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ matrix ``key`` (N, K)^T (+ bias (N,)) -> (..., N), one row block of the matrix at a time."""
    n, _ = w.shape(key)
    out = x.new_empty(*x.shape[:-1], n)
    for r0, r1, rows in w.blocks(key):
        out[..., r0:r1] = dense_linear(x, rows, None if bias is None else bias[r0:r1])
    return out


def piece_decoder_layers(cfg: ModelConfig, w: PieceLayer, h: torch.Tensor, cuts: Sequence[int],
                         steps: Sequence[StepInputs], kvs: Sequence[KVCache], layer: int) -> torch.Tensor:
    """``model.decoder_layer`` for every group at once: h (1, N, H), the groups' rows packed one after
    another (group g's ``cuts[g]`` rows at steps[g] through kvs[g]) -> (1, N, H).

    Every product runs once over all N rows (one larger product per block instead of one per group:
    the block is read once and the GEMM sees more rows); only attention goes group by group."""
    s, eps = w.small, cfg.rms_norm_eps
    x = rms_norm(h, s["input_layernorm.weight"], eps)                             # (1, N, H)
    q = piece_linear(w, "self_attn.q_proj.weight", x, s.get("self_attn.q_proj.bias"))
    k = piece_linear(w, "self_attn.k_proj.weight", x, s.get("self_attn.k_proj.bias"))
    v = piece_linear(w, "self_attn.v_proj.weight", x, s.get("self_attn.v_proj.bias"))
    attn = q.new_empty(q.shape)                                                   # (1, N, Hq*D)
    lo = 0
    for t, step, kv in zip(cuts, steps, kvs):
        hi = lo + t
        qg, kg, vg = _heads(cfg, s, q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], step.cos, step.sin)  # (1, T_g, heads, D)
        out = kv.attend(layer, qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), step.positions,
                        cfg.sliding_window_tokens[layer])
        attn[:, lo:hi] = out.transpose(1, 2).reshape(1, t, cfg.q_size)
        lo = hi
    del q, k, v, qg, kg, vg, out                                                  # not held through the MLP
    h = h + piece_linear(w, "self_attn.o_proj.weight", attn, s.get("self_attn.o_proj.bias"))
    x = rms_norm(h, s["post_attention_layernorm.weight"], eps)
    gate = piece_linear(w, "mlp.gate_proj.weight", x, s.get("mlp.gate_proj.bias"))
    up = piece_linear(w, "mlp.up_proj.weight", x, s.get("mlp.up_proj.bias"))
    return h + piece_linear(w, "mlp.down_proj.weight", silu_mul(gate, up), s.get("mlp.down_proj.bias"))
