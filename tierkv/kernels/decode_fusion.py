"""A decoder layer's batch-1 decode step on the CPU as four C++ calls: the ops around each product folded in.

Why this module exists: at one token a layer's products are small (the 135M's are 0.7-3.5 MB) and the
norms, activation and residual adds between them are a dozen aten ops of tens of microseconds each,
so on the CPU a small model's step is mostly per-op overhead (docs/benchmarks.md, "Decode: one C++
call per product, norms and activations folded in"). With ``kernels.cpu_decode``'s kernels a layer
around its attention is:

- pre:  qkv = W_qkv @ rmsnorm(h) (+ bias)                         one call (input norm folded in)
- post: h1  = h + W_o @ attn (+ bias)                             one call (residual folded in)
        gu  = W_gate_up @ rmsnorm(h1) (+ bias)                    one call (norm folded in)
        out = h1 + W_down @ (SiLU(gate) * up) (+ bias)            one call (activation, residual)

and the head is one call (final norm folded in). Each call's values are the eager ops' (same
roundings to the compute dtype; fp32 sums in another order).

When it applies (``fused_decode_wanted``; otherwise the callers in ``tierkv.model`` run the eager
ops): one row (batch 1, one token) on the CPU, outside a ``torch.compile`` trace, the layer prepared
with fused q/k/v and gate/up weights (``TIERKV_FUSE_LINEARS``, the default), every weight a plain
tensor in the hidden state's dtype, the compiled matrix-vector path in force for it
(``dense_linear.compiled_gemv_wanted``: "auto" for 16-bit weights of models of 50M+ parameters,
"compiled" for every dtype and size) and ``TIERKV_CPU_FUSED_DECODE`` not "off" (read per call:
"auto", the default, or "off"), and every kernel built.

Shapes: h (1, 1, H); attn (1, 1, Hq*D); qkv (1, 1, (Hq + 2 Hkv) D); weights as the layer holds them.
"""

from __future__ import annotations

import torch

from tierkv.kernels._select import env_choice
from tierkv.kernels.cpu_decode import FUSED_DECODE_VAR, DecodeKernel, Prologue, decode_kernel, run_decode_kernel
from tierkv.kernels.dense_linear import compiled_gemv_wanted, pick_cpu_matvec

__all__ = ["FUSED_DECODE_CHOICES", "FUSED_DECODE_VAR", "fused_decode_wanted", "fused_head", "fused_post_attention",
           "fused_pre_attention", "pick_fused_decode"]

FUSED_DECODE_CHOICES = ("auto", "off")
_AUTO_DTYPES = (torch.bfloat16, torch.float16)


def pick_fused_decode(choice: str | None = None) -> str:
    """``choice`` (one of ``FUSED_DECODE_CHOICES`` or None) else ``$TIERKV_CPU_FUSED_DECODE`` else "auto"."""
    return env_choice(choice, FUSED_DECODE_VAR, FUSED_DECODE_CHOICES, "the fused CPU decode path")


def fused_decode_wanted(x: torch.Tensor, weights: list[object | None]) -> bool:
    """Whether the fused calls should compute a decode step on x (..., K) with these weights (None: a
    weight the layer lacks, which refuses the path)."""
    if x.device.type != "cpu" or x.numel() != x.shape[-1] or torch.compiler.is_compiling():
        return False
    if pick_fused_decode() == "off":
        return False
    for w in weights:
        if not isinstance(w, torch.Tensor) or w.dtype != x.dtype or w.device.type != "cpu":
            return False
    mode = pick_cpu_matvec()
    if mode != "compiled" and x.dtype not in _AUTO_DTYPES:
        return False
    return compiled_gemv_wanted(min(w.numel() for w in weights if w.dim() == 2), mode)   # type: ignore[union-attr]


def _kernel(weight: torch.Tensor, prologue: Prologue, bias: torch.Tensor | None, residual: bool) -> DecodeKernel | None:
    kernel = decode_kernel(weight, prologue, bias is not None, residual)
    return kernel if kernel is not None and kernel.fn is not None else None


def _vec(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as a contiguous vector (a view where it can be)."""
    return None if t is None else t.reshape(-1).contiguous()


def _kernels(specs: list[tuple[torch.Tensor, Prologue, torch.Tensor | None, bool]]) -> list[DecodeKernel] | None:
    """The built kernels of (weight, prologue, bias, residual) specs, or None if any does not apply."""
    kernels = [_kernel(*spec) for spec in specs]
    return None if any(k is None for k in kernels) else kernels     # type: ignore[return-value]


def fused_pre_attention(w: dict[str, torch.Tensor], h: torch.Tensor, eps: float) -> torch.Tensor | None:
    """qkv = W_qkv @ rmsnorm(h) (+ bias), (1, 1, (Hq + 2 Hkv) D), or None where the fused path does not
    apply (the caller runs the eager ops)."""
    weight, norm, bias = w.get("self_attn.qkv_proj.weight"), w.get("input_layernorm.weight"), \
        w.get("self_attn.qkv_proj.bias")
    if not fused_decode_wanted(h, [weight, norm] + ([bias] if bias is not None else [])):
        return None
    kernels = _kernels([(weight, "rmsnorm", bias, False)])
    if kernels is None:
        return None
    out = run_decode_kernel(kernels[0], weight, _vec(h), _vec(norm), eps, _vec(bias))
    return out.view(1, 1, -1)


def fused_post_attention(w: dict[str, torch.Tensor], h: torch.Tensor, attn: torch.Tensor,
                         eps: float) -> torch.Tensor | None:
    """``model.post_attention``'s result (1, 1, H) in three calls, or None where the fused path does not apply."""
    o, gate_up, down = w.get("self_attn.o_proj.weight"), w.get("mlp.gate_up_proj.weight"), w.get("mlp.down_proj.weight")
    norm = w.get("post_attention_layernorm.weight")
    biases = [w.get("self_attn.o_proj.bias"), w.get("mlp.gate_up_proj.bias"), w.get("mlp.down_proj.bias")]
    if not fused_decode_wanted(h, [o, gate_up, down, norm] + [b for b in biases if b is not None]):
        return None
    kernels = _kernels([(o, "none", biases[0], True), (gate_up, "rmsnorm", biases[1], False),
                        (down, "swiglu", biases[2], True)])
    if kernels is None:
        return None
    b_o, b_gu, b_down = (_vec(b) for b in biases)
    h1 = run_decode_kernel(kernels[0], o, _vec(attn), bias=b_o, residual=_vec(h))                       # (H,)
    gu = run_decode_kernel(kernels[1], gate_up, h1, _vec(norm), eps, bias=b_gu)                          # (2I,)
    return run_decode_kernel(kernels[2], down, gu, bias=b_down, residual=h1).view(1, 1, -1)             # (1, 1, H)


def fused_head(weight: object, norm: torch.Tensor, h: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The head's logits W @ rmsnorm(h), (1, 1, V) in h's dtype, or None where the fused path does not apply."""
    if not isinstance(weight, torch.Tensor) or not fused_decode_wanted(h, [weight, norm]):
        return None
    kernels = _kernels([(weight, "rmsnorm", None, False)])
    if kernels is None:
        return None
    return run_decode_kernel(kernels[0], weight, _vec(h), _vec(norm), eps).view(1, 1, -1)
