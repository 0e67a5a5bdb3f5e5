"""The device room a step needs beside the weights: the KV cache and one step's activations.

Why this module exists: the planner places layers in what the device budget leaves after this room, so
an undercount lets a step run past the budget and an overcount streams layers that would fit. The
activations are counted from what the model math and the KV caches allocate on each path (the prefill
piece's projections, norms, RoPE and SwiGLU tensors; attention's scratch, its score blocks where they
exist; the logits), and ``tests/test_activation_peak.py`` checks the count against each prefill step's
allocations as torch's profiler records them. The auto-sized prefill piece (``prefill_sizes``) and its
attention scratch come from the device budget here too.
"""

from __future__ import annotations

import torch

from tierkv.config import ModelConfig, Policy
from tierkv.errors import ArgumentError
from tierkv.model import ATTENTION_SCRATCH_BYTES, FUSED_TAIL_DTYPES, attention_pair_bytes
from tierkv.pipeline.kv.sizing import MIN_CONTEXT_CHUNKS, element_bytes, gathered_kv_bytes, keeps_sketch, \
    kv_bytes_per_token, kv_device_minimum_bytes

__all__ = ["ACTIVATION_FRACTION", "CPU_ACTIVATION_FRACTION", "DEFAULT_PREFILL_TOKENS", "MIN_ATTENTION_SCRATCH_BYTES",
           "MIN_PREFILL_TOKENS", "activation_bytes", "activation_fraction", "fused_tail_attention", "kv_reserve_bytes",
           "pieces_groups_bytes", "plan_device", "prefill_sizes", "reserve_bytes", "scratch_for", "step_rows"]

DEFAULT_PREFILL_TOKENS = 2048          # the largest prefill piece the planner picks
MIN_PREFILL_TOKENS = 16                # the smallest (below it every piece re-reads the streamed layers for little work)
# of the device budget: what one auto-sized prefill piece's activations may take (``activation_fraction``).
# Where layers stream, a larger piece saves prefill passes and a resident layer saves a read on every pass;
# the batch planner weighs larger pieces against the layers they displace, so the planner's own piece is
# the modest one. On the CPU, where the count is leaner (``fused_tail_attention``), an eighth gave the 0.85B
# bench at 1 GiB 512-token pieces in place of a ninth resident layer (6.8 against 7.3 predicted tok/s at
# batch 4): a twelfth there. A GPU keeps the eighth (unmeasured since: no GPU lent).
ACTIVATION_FRACTION = 1 / 8
CPU_ACTIVATION_FRACTION = 1 / 12
MIN_ATTENTION_SCRATCH_BYTES = 256 << 10


def plan_device(policy: Policy) -> torch.device:
    """The device a plan is for: ``policy.device``, else CUDA when available, else the CPU."""
    device = torch.device(policy.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise ArgumentError(f"device {policy.device!r} is not supported; tierkv runs on cpu, cuda or cuda:N")
    return device


def reserve_bytes(config: ModelConfig, dtype: torch.dtype, policy: Policy, context_tokens: int, batch: int,
                  device_mem_bytes: int | None = None) -> int:
    """Device memory for the KV cache (``kv_reserve_bytes``) and one prefill piece's activations
    (the piece and attention scratch of ``prefill_sizes`` for this device budget)."""
    piece, scratch = prefill_sizes(config, dtype, policy, context_tokens, batch, device_mem_bytes)
    return kv_reserve_bytes(config, dtype, policy, context_tokens, batch) + activation_bytes(
        config, dtype, piece, scratch, context_tokens, batch, step_rows(policy), policy)


def kv_reserve_bytes(config: ModelConfig, dtype: torch.dtype, policy: Policy, context_tokens: int, batch: int) -> int:
    """Device room kept for the KV cache: the resident KV of ``context_tokens``, and never less than
    the tiered cache needs to run the model's full context at any chunk size it may choose (its
    per-chunk index, with key codes when the cache keeps them (``keeps_sketch``), beside the fewest
    chunk slots; ``kv_device_minimum_bytes``), so that any prompt the model allows runs and what the
    room does not hold spills to host memory, then disk."""
    dense = kv_bytes_per_token(config, dtype) * context_tokens * batch
    tiered = kv_device_minimum_bytes(config, policy, dtype, batch, config.context_limit_tokens,
                                     keeps_sketch(policy))
    return max(dense, tiered)


def prefill_sizes(config: ModelConfig, dtype: torch.dtype, policy: Policy, context_tokens: int, batch: int,
                  device_mem_bytes: int | None = None) -> tuple[int, int]:
    """(prefill piece in tokens, attention scratch in bytes) for a device budget.

    The piece is ``policy.prefill_chunk_tokens`` when given, else the largest power of two from
    ``DEFAULT_PREFILL_TOKENS`` down to ``MIN_PREFILL_TOKENS`` whose activations fit
    ``activation_fraction`` of the budget (no budget: the default). The scratch, the cap on one
    block of attention's temporaries, follows the piece: half of the piece's other activations,
    between ``MIN_ATTENTION_SCRATCH_BYTES`` and ``model.ATTENTION_SCRATCH_BYTES``.
    """
    piece = policy.prefill_chunk_tokens or DEFAULT_PREFILL_TOKENS
    if policy.prefill_chunk_tokens is None and device_mem_bytes is not None:
        allowance = int(device_mem_bytes * activation_fraction(policy))
        while piece > MIN_PREFILL_TOKENS and activation_bytes(
                config, dtype, piece, scratch_for(config, dtype, piece, batch), context_tokens, batch,
                step_rows(policy), policy) > allowance:
            piece //= 2
    return piece, scratch_for(config, dtype, piece, batch)


def activation_fraction(policy: Policy) -> float:
    """The share of the device budget the auto prefill piece's activations may take on ``policy``'s device."""
    return CPU_ACTIVATION_FRACTION if plan_device(policy).type == "cpu" else ACTIVATION_FRACTION


def scratch_for(config: ModelConfig, dtype: torch.dtype, piece_tokens: int, batch: int) -> int:
    half = piece_tokens * batch * _bytes_per_piece_token(config, dtype) // 2
    return max(MIN_ATTENTION_SCRATCH_BYTES, min(ATTENTION_SCRATCH_BYTES, half))


def _bytes_per_piece_token(config: ModelConfig, dtype: torch.dtype, lean: bool = False) -> int:
    """Activation bytes per token of a prefill piece, outside attention's score blocks. ``lean``: attention
    is the CPU flash kernel over resident or gathered K/V only (``_lean_attention``), which keeps no fp32
    state of its own."""
    item = element_bytes(dtype)
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    # compute dtype: residual, normed input, attention and MLP outputs (4 h); q and its RoPE temporaries
    # (3 q); k, v, rotated k (3 kv); gate, up and their product (3 i: ``model.silu_mul`` makes one tensor)
    # fp32: RMS norm's upcasts (2 h); the grouped fold's attention state: scaled q, accumulator, result
    # (3 q), and the piece's K/V (2 kv)
    fp32 = 2 * h if lean else 2 * h + 3 * q + 2 * kv
    per_token = item * (4 * h + 3 * q + 3 * kv + 3 * i) + 4 * fp32
    # the tiered cache's chunk-size probe at the first piece (pipeline.chunking.attention_entropy): fp32
    # keys repeated per query head, five score-sized tensors and the positions of 32 sampled queries
    return per_token + q * 4 + 32 * (config.num_heads * 20 + 10)


def _lean_attention(config: ModelConfig, dtype: torch.dtype, policy: Policy, scratch_bytes: int, batch: int,
                    piece_tokens: int) -> bool:
    """Where the CPU flash kernel serves (``fused_tail_attention``): whether a piece's attention never takes
    the tiered cache's grouped fold (fp32 state, fp32 K/V), because the K/V of the model's whole context,
    padded to a chunk (at most a sixteenth of it when chunks adapt, else ``policy.chunk_tokens``), plus a
    piece fits the scratch, so exact attention always gathers (``pipeline.kv.streamed.gathered_fits``)."""
    context = config.context_limit_tokens
    pad = policy.chunk_tokens or max(1, context // MIN_CONTEXT_CHUNKS)
    return gathered_kv_bytes(batch, config.num_kv_heads, context + pad + piece_tokens, config.head_dim,
                             dtype) <= scratch_bytes


def activation_bytes(config: ModelConfig, dtype: torch.dtype, piece_tokens: int, scratch_bytes: int,
                     context_tokens: int, batch: int, decode_rows: int = 0, policy: Policy | None = None,
                     groups: int = 1) -> int:
    """Working memory of one step: a prefill piece of ``piece_tokens`` per sequence of ``batch`` and
    ``decode_rows`` other sequences' one-token rows packed beside it (the engine's steps), attending
    to up to ``context_tokens`` keys, counted from what the model math and the KV caches allocate.
    ``groups``: micro-batches of that size whose rows are held at once (a layer streamed in pieces
    takes every group's rows through each block together; a whole layer runs them one at a time).
    Attention runs one sequence at a time, so its scratch is counted once, plus once more for the K/V
    the tiered cache's exact attention gathers (up to one scratch: ``streamed.gathered_fits``) and
    holds beside that block. Where a piece's attention is the CPU flash kernel (``fused_tail_attention``
    for ``policy``'s device; None counts as not) no score block exists: the gathered K/V, or the
    grouped fold's buffers and scores (one scratch as well), are counted alone, and where the fold
    never runs (``_lean_attention``) neither is its fp32 state."""
    fused = policy is not None and fused_tail_attention(config, dtype, plan_device(policy).type)
    lean = policy is not None and fused and _lean_attention(config, dtype, policy, scratch_bytes, batch, piece_tokens)
    per_token = _bytes_per_piece_token(config, dtype, lean)
    if fused:
        attention = scratch_bytes
    else:   # one attention block: the scratch cap, or a single query row over every key when that is larger
        block = max(scratch_bytes, attention_pair_bytes(batch, config.num_heads) * max(context_tokens, piece_tokens))
        attention = block + scratch_bytes
    logits = 2 * groups * (batch + decode_rows) * config.vocab_size * 4    # each row's last position, fp32 and a copy
    return groups * (piece_tokens * batch + decode_rows) * per_token + attention + logits


def fused_tail_attention(config: ModelConfig, dtype: torch.dtype, device_type: str) -> bool:
    """Whether every prefill piece's attention over resident or gathered K/V runs the CPU flash kernel
    (``model.causal_tail_attention``: no score tensor): the CPU, a dtype it computes in, and no layer
    whose sliding window is shorter than the model's context (a window that cuts the keys takes the
    masked blocks of ``model.dense_attention``)."""
    return device_type == "cpu" and dtype in FUSED_TAIL_DTYPES and all(
        w is None or w >= config.context_limit_tokens for w in config.sliding_window_tokens)


def pieces_groups_bytes(config: ModelConfig, dtype: torch.dtype, policy: Policy, piece: int, scratch: int,
                        context: int, batch: int) -> int:
    """A step's activations when layers stream in pieces: every micro-batch's rows at once (``activation_bytes``
    with ``groups=policy.micro_batches``)."""
    return activation_bytes(config, dtype, piece, scratch, context, batch, step_rows(policy), policy,
                            max(1, policy.micro_batches))


def step_rows(policy: Policy) -> int:
    """Decode rows the planner keeps activation room for beside a prefill piece: the other sequences
    of one micro-batch (``Policy.max_sequences`` over ``Policy.micro_batches``, rounded up)."""
    return -(-policy.max_sequences // policy.micro_batches) - 1
