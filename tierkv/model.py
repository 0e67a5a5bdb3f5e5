"""Llama-family decoder math as plain functions over one layer's weights.

Why this module exists: the pipeline streams weights layer by layer, so the math must not own
its parameters the way an ``nn.Module`` does. Every function here takes the tensors it needs as
arguments (a layer's weights are a dict keyed like ``self_attn.q_proj.weight``), works on a batch
dimension from the start, and leaves the KV cache behind a small protocol so that a resident
cache and a tiered, chunked one can serve the same attention code.

Shapes: B batch, T new tokens, S cached+new tokens, H hidden, Hq/Hkv heads, D head_dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from tierkv.config import ModelConfig, RopeConfig
from tierkv.kernels import norm_rope
from tierkv.kernels.cpu_rows import silu_mul_rows
from tierkv.kernels.cpu_decode_attention import attend_kernel, run_attend_kernel
from tierkv.kernels.decode_fusion import fused_decode_wanted, fused_head, fused_post_attention, fused_pre_attention
from tierkv.kernels.dense_linear import dense_linear
from tierkv.kernels.quant import FUSED_LINEARS, PACKED_LINEARS, Da8w4Linear, DynamicInt8Linear, dequantize_rows, \
    quant_linear
from tierkv.quantspec import EMBED_WEIGHT, HEAD_WEIGHT, QuantWeight


class KVCache(Protocol):
    """What attention needs from a KV cache: store this step's K/V, then attend over the layer's context.

    ``length_tokens`` counts the positions stored so far; the engine calls ``advance(t)`` after the
    last layer of each forward of ``t`` tokens.
    """

    length_tokens: int

    def advance(self, t: int) -> None:
        ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, window_tokens: int | None) -> torch.Tensor:
        """q (B, Hq, T, D), k/v (B, Hkv, T, D) post-RoPE, positions (B, T) -> output (B, Hq, T, D)."""
        ...


@dataclass(frozen=True)
class StepInputs:
    """Per-forward values shared by every layer, built once per step: RoPE tables and token positions.

    ``sin`` is the signed table of ``kernels.norm_rope.rope`` (first half negated), laid out per token
    so that it broadcasts over the heads of a (B, T, heads, D) projection output.
    """

    cos: torch.Tensor        # (B, T, 1, D) compute dtype
    sin: torch.Tensor        # (B, T, 1, D) signed sine table
    positions: torch.Tensor  # (B, T) int64


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm computed in fp32 and cast back, as HF does. x (..., H), weight (H,).
    One Triton kernel on CUDA; on the CPU one C++ pass or ``torch.rms_norm`` (``kernels.norm_rope``)."""
    return norm_rope.rms_norm(x, weight, eps)


def rope_inv_freq(rope: RopeConfig, head_dim: int, seq_len: int, max_positions: int) -> torch.Tensor:
    """Inverse frequencies (D/2,) fp32 for the given RoPE variant at the current sequence length."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    base = rope.theta
    if rope.rope_type == "dynamic" and seq_len > max_positions:
        # NTK-aware rescaling of the base once the context outgrows the trained length
        base = base * ((rope.factor * seq_len / max_positions) - (rope.factor - 1)) ** (head_dim / (head_dim - 2))
    inv = 1.0 / (base ** exponents)
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(inv, rope)
    return inv


def _llama3_inv_freq(inv: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.x frequency-dependent scaling: long wavelengths scaled by 1/factor, short kept, smooth between."""
    orig = rope.original_max_position_embeddings
    assert orig is not None, "llama3 rope needs original_max_position_embeddings"
    low_wavelen = orig / rope.low_freq_factor
    high_wavelen = orig / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (orig / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_varies_with_length(rope: RopeConfig, seq_len: int, max_positions: int) -> bool:
    """Whether ``rope_inv_freq`` depends on ``seq_len`` (dynamic NTK RoPE past the trained length); when
    not, one table of inverse frequencies serves every step (``runner.Runner`` keeps it)."""
    return rope.rope_type == "dynamic" and seq_len > max_positions


def step_inputs(cfg: ModelConfig, positions: torch.Tensor, seq_len: int, dtype: torch.dtype,
                inv_freq: torch.Tensor | None = None) -> StepInputs:
    """RoPE cos and signed sin (B, T, 1, D) for positions (B, T) of a sequence now ``seq_len`` long; fp32
    math then cast, as HF does. Built once per step: every layer reads the same tables. ``inv_freq``
    (D/2,) on the positions' device: ``rope_inv_freq``'s result for this length, if the caller holds it."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim, seq_len, cfg.max_position_embeddings).to(positions.device)
    freqs = positions[..., None, None].float() * inv_freq          # (B, T, 1, D/2)
    sin = freqs.sin()
    return StepInputs(cos=torch.cat((freqs, freqs), dim=-1).cos().to(dtype),
                      sin=torch.cat((-sin, sin), dim=-1).to(dtype), positions=positions)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) rotated by the (B, T, 1, D) tables of ``step_inputs`` (rotate-half convention):
    one Triton kernel on CUDA; on the CPU one C++ pass or four torch ops (``kernels.norm_rope.rope``)."""
    return norm_rope.rope(x, cos, sin)


def linear(x: torch.Tensor, weight: torch.Tensor | QuantWeight | DynamicInt8Linear | Da8w4Linear,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T (+ bias) -> (..., N); a quantized weight is computed on as stored, a
    16-bit one through the op that is fastest for few rows on the CPU (``kernels.dense_linear``)."""
    if isinstance(weight, (QuantWeight, *PACKED_LINEARS)):
        return quant_linear(x, weight, bias)
    return dense_linear(x, weight, bias)


def _linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def _linears(x: torch.Tensor, w: dict[str, torch.Tensor], fused: str, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """The outputs (..., sizes[i]) of ``FUSED_LINEARS[fused]``'s linears on x: one call where the layer
    was prepared with the fused weight (``kernels.quant.prepare_layer``), split along the last dim;
    else one each (the parts)."""
    weight = w.get(f"{fused}.weight")
    if weight is None:
        return tuple(_linear(x, w, p) for p in FUSED_LINEARS[fused])
    return linear(x, weight, w.get(f"{fused}.bias")).split(sizes, dim=-1)


def attention_inputs(cfg: ModelConfig, w: dict[str, torch.Tensor], x: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v of the normed x (B, T, H), post-RoPE with the (B, T, 1, D) tables of ``step_inputs``:
    q (B, T, Hq, D), k and v (B, T, Hkv, D) (views of the projections where they can be)."""
    fused = w.get("self_attn.qkv_proj.weight")
    if fused is not None:
        return qkv_heads(cfg, w, linear(x, fused, w.get("self_attn.qkv_proj.bias")), cos, sin)
    return _heads(cfg, w, *_linears(x, w, "self_attn.qkv_proj", [cfg.q_size, cfg.kv_size, cfg.kv_size]), cos, sin)


def qkv_heads(cfg: ModelConfig, w: dict[str, torch.Tensor], qkv: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attention_inputs``' q/k/v from the fused projection's output qkv (B, T, (Hq + 2 Hkv) D)."""
    b, t, _ = qkv.shape
    d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    if not cfg.qk_norm:                                                      # q and k heads side by side: one RoPE
        qkv = qkv.view(b, t, hq + 2 * hkv, d)
        qk = apply_rope(qkv[:, :, :hq + hkv], cos, sin)                      # (B, T, Hq+Hkv, D)
        return qk[:, :, :hq], qk[:, :, hq:], qkv[:, :, hq + hkv:]
    return _heads(cfg, w, *qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1), cos, sin)


def _heads(cfg: ModelConfig, w: dict[str, torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, T, Hq D), k/v (B, T, Hkv D) as heads, q/k normed (Qwen3) and rotated."""
    b, t, _ = q.shape
    d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    q = q.view(b, t, hq, d)                                                  # (B, T, Hq, D)
    k = k.view(b, t, hkv, d)                                                 # (B, T, Hkv, D)
    v = v.view(b, t, hkv, d)
    if cfg.qk_norm:
        q = rms_norm(q, w["self_attn.q_norm.weight"], cfg.rms_norm_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], cfg.rms_norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def mlp(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """SwiGLU feed-forward. x (B, T, H) -> (B, T, H)."""
    gate, up = _linears(x, w, "mlp.gate_up_proj", [w["mlp.down_proj.weight"].shape[1]] * 2)
    return _linear(silu_mul(gate, up), w, "mlp.down_proj")


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``F.silu(gate) * up`` (..., I) as one new tensor beside gate and up (the planner counts
    three): one C++ pass on the CPU, else SiLU into a new tensor multiplied in place (the same bits)."""
    act = silu_mul_rows(gate, up)
    return act if act is not None else F.silu(gate).mul_(up)


def pre_attention(cfg: ModelConfig, w: dict[str, torch.Tensor], h: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's half before its KV attention: input norm, q/k/v projection, RoPE. h (B, T, H) ->
    q (B, T, Hq, D), k/v (B, T, Hkv, D). Pure tensor math (``compiled`` traces it). One row on the CPU:
    the norm and the projection in one C++ call where ``kernels.decode_fusion`` applies."""
    qkv = fused_pre_attention(w, h, cfg.rms_norm_eps)
    if qkv is not None:
        return qkv_heads(cfg, w, qkv, cos, sin)
    return attention_inputs(cfg, w, rms_norm(h, w["input_layernorm.weight"], cfg.rms_norm_eps), cos, sin)


def post_attention(cfg: ModelConfig, w: dict[str, torch.Tensor], h: torch.Tensor,
                   attn: torch.Tensor) -> torch.Tensor:
    """A layer's half after its KV attention: o projection, residual, post-attention norm, MLP, residual.
    h (B, T, H) the layer's input, attn (B, T, Hq*D) the attention output -> (B, T, H). Pure tensor math.
    One row on the CPU: three C++ calls where ``kernels.decode_fusion`` applies."""
    out = fused_post_attention(w, h, attn, cfg.rms_norm_eps)
    if out is not None:
        return out
    h = h + _linear(attn, w, "self_attn.o_proj")
    return h + mlp(w, rms_norm(h, w["post_attention_layernorm.weight"], cfg.rms_norm_eps))


@dataclass(frozen=True)
class LayerHalves:
    """The two halves of a decoder layer around its KV attention, with ``pre_attention``'s and
    ``post_attention``'s signatures: eager (``EAGER_HALVES``), compiled (``compiled.CompiledHalves``)
    or CUDA-graphed (``cuda_graphs``). ``layer`` says which layer they run (graphs keep one per layer)."""

    pre: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    post: Callable[..., torch.Tensor]


def _eager_pre(cfg: ModelConfig, w: dict[str, torch.Tensor], h: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pre_attention(cfg, w, h, cos, sin)


def _eager_post(cfg: ModelConfig, w: dict[str, torch.Tensor], h: torch.Tensor, attn: torch.Tensor,
                layer: int) -> torch.Tensor:
    return post_attention(cfg, w, h, attn)


EAGER_HALVES = LayerHalves(_eager_pre, _eager_post)


def decoder_layer(cfg: ModelConfig, w: dict[str, torch.Tensor], h: torch.Tensor, step: StepInputs,
                  kv: KVCache, layer: int, halves: LayerHalves = EAGER_HALVES) -> torch.Tensor:
    """One pre-norm decoder layer with residuals. h (B, T, H) -> (B, T, H): ``halves.pre``, the KV
    cache's attention (Python bookkeeping: never traced or captured), ``halves.post``."""
    b, t, _ = h.shape
    if halves is EAGER_HALVES:
        out = fused_decode_layer(cfg, w, h, step, kv, layer)
        if out is not None:
            return out
    q, k, v = halves.pre(cfg, w, h, step.cos, step.sin, layer)
    # (B, Hq, T, D) and (B, Hkv, T, D) views
    out = kv.attend(layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), step.positions,
                    cfg.sliding_window_tokens[layer])
    attn = out.transpose(1, 2).reshape(b, t, cfg.q_size)                         # (B, T, Hq*D)
    del q, k, v, out                                # the projections are not held through the MLP
    return halves.post(cfg, w, h, attn, layer)


def fused_decode_layer(cfg: ModelConfig, w: dict[str, torch.Tensor], h: torch.Tensor, step: StepInputs, kv: KVCache,
                       layer: int) -> torch.Tensor | None:
    """``decoder_layer``'s result for one token of one sequence over a dense resident cache on the CPU in
    five C++ calls (norm + q/k/v; RoPE + KV append + attention; o + residual; norm + gate/up; SiLU x up +
    down + residual: ``kernels.decode_fusion``, ``kernels.cpu_decode_attention``), or None where they do
    not apply (q/k norms, a window cutting the context, a cache without ``decode_buffers``)."""
    buffers = getattr(kv, "decode_buffers", None)
    if cfg.qk_norm or buffers is None or h.device.type != "cpu" or h.numel() != h.shape[-1]:
        return None
    slots = buffers(layer, cfg.sliding_window_tokens[layer])
    if slots is None or slots[0].dtype != h.dtype or step.cos.dtype != h.dtype or \
            not fused_decode_wanted(h, [w.get("self_attn.qkv_proj.weight")]):     # before any kernel build
        return None
    k_cache, v_cache, pos = slots
    kernel = attend_kernel(cfg.num_heads, k_cache)
    if kernel is None:
        return None
    qkv = fused_pre_attention(w, h, cfg.rms_norm_eps)
    if qkv is None:
        return None
    attn = run_attend_kernel(kernel, qkv.view(-1), step.cos.reshape(-1).contiguous(), step.sin.reshape(-1).contiguous(),
                             k_cache, v_cache, pos, cfg.num_heads).view(1, 1, -1)          # (1, 1, Hq*D)
    return post_attention(cfg, w, h, attn)


def embed(g: dict[str, torch.Tensor], ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Token ids (B, T) -> hidden (B, T, H) in the compute ``dtype``; a quantized embedding (a GGUF
    store's) dequantizes only the looked-up rows. A table left in host memory (``io.rows``: mapped from
    the store) while ``ids`` are on a GPU is gathered on the host and only the rows are copied."""
    weight = g[EMBED_WEIGHT]
    if isinstance(weight, QuantWeight):
        return dequantize_rows(weight, ids, dtype)
    if weight.device != ids.device:
        return F.embedding(ids.to(weight.device), weight).to(ids.device)      # (B, T, H) rows only
    return F.embedding(ids, weight)


def head(cfg: ModelConfig, g: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head. h (B, T, H) -> logits (B, T, V) fp32. A tied model uses its embedding,
    unless its store holds the head as a tensor of its own (a quantized embedding's codes packed for
    the quantized matmul: ``io.store.plan_layout``)."""
    weight = g[HEAD_WEIGHT] if HEAD_WEIGHT in g or not cfg.tie_word_embeddings else g[EMBED_WEIGHT]
    logits = fused_head(weight, g["model.norm.weight"], h, cfg.rms_norm_eps)   # one row on the CPU: one call
    if logits is not None:
        return logits.float()
    return linear(rms_norm(h, g["model.norm.weight"], cfg.rms_norm_eps), weight).float()


ATTENTION_SCRATCH_BYTES = 64 << 20   # default cap on the temporaries of one block of prefill attention


def attention_pair_bytes(batch: int, q_heads: int) -> int:
    """Worst-case temporary bytes per (query, key) pair of one attention block.

    Per query head three fp32 score-sized tensors (the scores, the masked copy, their
    exponentials: the tiered cache's online softmax, or SDPA's math fallback); per pair shared by
    the heads an int64 position difference, two bool masks and SDPA's fp32 copy of the mask.
    """
    return batch * (12 * q_heads + 16)


def attention_block_rows(batch: int, q_heads: int, keys: int, scratch_bytes: int) -> int:
    """Queries per block so that one block's temporaries over ``keys`` keys fit ``scratch_bytes`` (>= 1)."""
    return max(1, scratch_bytes // (attention_pair_bytes(batch, q_heads) * max(1, keys)))


def visibility_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window_tokens: int | None) -> torch.Tensor:
    """q_pos (B, T), k_pos (B, S) -> (B, T, S) bool: key visible (k_pos <= q_pos, inside the window)."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]                             # (B, T, S)
    allowed = diff >= 0
    if window_tokens is not None:
        allowed &= diff < window_tokens
    return allowed


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                    k_pos: torch.Tensor, window_tokens: int | None,
                    scratch_bytes: int = ATTENTION_SCRATCH_BYTES) -> torch.Tensor:
    """Causal (optionally sliding-window) GQA attention, in blocks of queries for prefill.

    q (B, Hq, T, D), k/v (B, Hkv, S, D), q_pos (B, T), k_pos (B, S) -> (B, Hq, T, D).
    A key is visible when k_pos <= q_pos and q_pos - k_pos < window_tokens. Positions ascend
    along T and S (caches store keys in position order). Decode (T = 1, every key visible) is one
    unmasked SDPA call. Otherwise queries go in blocks whose mask and scores stay within
    ``scratch_bytes`` (``attention_block_rows``; at least one query row), each block attending only
    to the key range it can see: no (T, S) score or mask tensor exists at once. When the queries
    are the last T keys and no window cuts the context (a prefill piece over a resident cache) and a
    fused kernel with its log-sum-exp serves the device and dtype, the piece is two fused calls
    instead (``causal_tail_attention``), which hold no score tensor beyond the kernel's tiles.
    """
    t, s = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if t == 1 and (window_tokens is None or s <= window_tokens):
        return decode_attention(q, k, v)                                    # decode: every key is visible
    if tail_queries_see_all(q, q_pos, k_pos, window_tokens):
        return causal_tail_attention(q, k, v)
    rows = attention_block_rows(q.shape[0], q.shape[1], s, scratch_bytes)
    starts = list(range(0, t, rows))
    ends = [min(t, a + rows) for a in starts]
    first_q, last_q = q_pos[:, starts], q_pos[:, [e - 1 for e in ends]]      # (B, n_blocks)
    lo_pos = first_q - (window_tokens - 1) if window_tokens is not None else torch.full_like(first_q, -2**62)
    kp = k_pos.contiguous()
    lo = torch.searchsorted(kp, lo_pos.contiguous()).amin(0)                 # first key any batch row may see
    hi = torch.searchsorted(kp, last_q.contiguous(), right=True).amax(0)     # one past the last such key
    spans = torch.stack([lo, hi]).tolist()                                   # the one host sync
    out = torch.empty_like(q)
    for a, e, k_lo, k_hi in zip(starts, ends, spans[0], spans[1]):
        k_lo = min(k_lo, s - 1)
        k_hi = max(k_hi, k_lo + 1)                                          # a block always sees its own keys
        mask = visibility_mask(q_pos[:, a:e], k_pos[:, k_lo:k_hi], window_tokens)[:, None]   # (B, 1, rows, span)
        out[:, :, a:e] = F.scaled_dot_product_attention(q[:, :, a:e], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi],
                                                        attn_mask=mask, enable_gqa=gqa)
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query per sequence over every key, unmasked. q (B, Hq, 1, D), k/v (B, Hkv, S, D) -> (B, Hq, 1, D).

    On the CPU, GQA goes in as G = Hq / Hkv query rows per KV head, (B, Hkv, G, D): query head h uses
    KV head h // G, so the rows of one group are consecutive heads. PyTorch's CPU SDPA with
    ``enable_gqa`` at one query row runs a 16-bit path that reads K/V at ~0.3 GB/s (bf16, 16/4 heads
    of 128, 1K keys: 7.6 ms a layer); the grouped call is the flash kernel over G rows of each KV
    head (0.27 ms, the same error against fp64). CUDA keeps ``enable_gqa``."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    if hq == hkv or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)
    out = F.scaled_dot_product_attention(q.reshape(b, hkv, hq // hkv, d), k, v)   # (B, Hkv, G, D)
    return out.reshape(b, hq, 1, d)


FUSED_TAIL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # what the CPU flash kernel computes in


def tail_queries_see_all(q: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window_tokens: int | None) -> bool:
    """Whether ``causal_tail_attention`` computes ``dense_attention``'s result: q (B, Hq, T, D) on the
    CPU in a dtype of ``FUSED_TAIL_DTYPES``, the query positions (B, T) those of the last T keys
    (B, S) (so with ascending positions query i sees exactly keys 0 .. S - T + i), and no window
    shorter than the span. One host sync."""
    t, s = q_pos.shape[1], k_pos.shape[1]
    if q.device.type != "cpu" or q.dtype not in FUSED_TAIL_DTYPES or t > s:
        return False
    if window_tokens is not None and int((q_pos[:, -1] - k_pos[:, 0]).max()) >= window_tokens:
        return False
    return torch.equal(q_pos, k_pos[:, s - t:])


def causal_tail_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of the last T of S positions. q (B, Hq, T, D), k/v (B, Hkv, S, D) ->
    (B, Hq, T, D); query i sees keys 0 .. S - T + i.

    The CPU flash kernel (tiles of queries x keys, never a (T, S) tensor; GQA without copying K/V)
    runs twice: causal over the square of the piece's own keys, unmasked over the P = S - T keys
    before them; the two softmaxes merge by their log-sum-exps (B, Hq, T) fp32:
    out = prefix + (own - prefix) * sigmoid(lse_own - lse_prefix)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    p = k.shape[2] - q.shape[2]
    own, own_lse = flash(q, k[:, :, p:], v[:, :, p:], 0.0, True)           # (B, Hq, T, D), (B, Hq, T)
    if p == 0:
        return own
    prefix, prefix_lse = flash(q, k[:, :, :p], v[:, :, :p], 0.0, False)
    return prefix.lerp_(own, torch.sigmoid(own_lse - prefix_lse).unsqueeze(-1).to(own.dtype))
