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
from tierkv.io.store import CRC_BLOCK_BYTES
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
# hidden-size rows per row of a product the CPU GEMM allocates beside its output (oneDNN's workspace in the
# down projection: 0.67 MiB at 256 rows, 2.13 MiB at 512 on the 0.85B shape in bf16, where two rows are 2 and 4)
GEMM_WORKSPACE_ROWS = 2


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


def _bytes_per_piece_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Activation bytes per token of a prefill piece, outside attention's score blocks, every tensor counted as
    if held at once (``activation_bytes`` off the CPU flash path)."""
    item = element_bytes(dtype)
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    # compute dtype: residual, normed input, attention and MLP outputs (4 h); q and its RoPE temporaries
    # (3 q); k, v, rotated k (3 kv); gate, up and their product (3 i: ``model.silu_mul`` makes one tensor)
    # fp32: RMS norm's upcasts (2 h); the grouped fold's attention state: scaled q, accumulator, result
    # (3 q), and the piece's K/V (2 kv)
    per_token = item * (4 * h + 3 * q + 3 * kv + 3 * i) + 4 * (2 * h + 3 * q + 2 * kv)
    # the tiered cache's chunk-size probe at the first piece (pipeline.chunking.attention_entropy): fp32
    # keys repeated per query head, five score-sized tensors and the positions of 32 sampled queries
    return per_token + q * 4 + 32 * (config.num_heads * 20 + 10)


def _whole_context_gather_bytes(config: ModelConfig, dtype: torch.dtype, policy: Policy, batch: int,
                                piece_tokens: int) -> int:
    """The K/V the tiered cache's exact attention gathers for a piece at the model's whole context, padded to a
    chunk (at most a sixteenth of it when chunks adapt, else ``policy.chunk_tokens``)."""
    context = config.context_limit_tokens
    pad = policy.chunk_tokens or max(1, context // MIN_CONTEXT_CHUNKS)
    return gathered_kv_bytes(batch, config.num_kv_heads, context + pad + piece_tokens, config.head_dim, dtype)


def activation_bytes(config: ModelConfig, dtype: torch.dtype, piece_tokens: int, scratch_bytes: int,
                     context_tokens: int, batch: int, decode_rows: int = 0, policy: Policy | None = None,
                     groups: int = 1) -> int:
    """Working memory of one step: a prefill piece of ``piece_tokens`` per sequence of ``batch`` and
    ``decode_rows`` other sequences' one-token rows packed beside it (the engine's steps), attending
    to up to ``context_tokens`` keys, counted from what the model math and the KV caches allocate.
    ``groups``: micro-batches of that size whose rows are held at once (a layer streamed in pieces
    takes every group's rows through each block together; a whole layer runs them one at a time).

    Where a piece's attention is the CPU flash kernel (``fused_tail_attention`` for ``policy``'s device)
    the count is the largest of the step's phases (``_flash_step_bytes``), as measured there. Elsewhere
    (a GPU, a window that cuts the keys, no policy) every tensor is counted as if held at once: attention
    runs one sequence at a time, so its scratch is counted once, plus once more for the K/V the tiered
    cache's exact attention gathers (up to one scratch: ``streamed.gathered_fits``) and holds beside that
    block."""
    fused = policy is not None and fused_tail_attention(config, dtype, plan_device(policy).type)
    rows = piece_tokens * batch + decode_rows
    logits = 2 * groups * (batch + decode_rows) * config.vocab_size * 4    # each row's last position, fp32 and a copy
    if fused:
        assert policy is not None
        gathered = _whole_context_gather_bytes(config, dtype, policy, batch, piece_tokens)
        whole_layer_groups = policy.micro_batches if groups == 1 and policy.micro_batches > 1 else 1
        return _flash_step_bytes(config, dtype, rows, piece_tokens * batch, groups, whole_layer_groups,
                                 min(scratch_bytes, gathered), gathered <= scratch_bytes, logits)
    per_token = _bytes_per_piece_token(config, dtype)
    # one attention block: the scratch cap, or a single query row over every key when that is larger
    block = max(scratch_bytes, attention_pair_bytes(batch, config.num_heads) * max(context_tokens, piece_tokens))
    return groups * rows * per_token + block + scratch_bytes + logits


def _flash_step_bytes(config: ModelConfig, dtype: torch.dtype, rows: int, piece_rows: int, groups: int,
                      whole_layer_groups: int, gather_bytes: int, lean: bool, logits: int) -> int:
    """A step's peak on the CPU flash path, phase by phase (per row of the ``groups`` groups of ``rows`` that
    run together, ``piece_rows`` of each a prefill piece; ``whole_layer_groups`` groups of them take a whole
    layer one after another; ``gather_bytes``: the most K/V exact attention gathers).

    Held through the layers: each row's layer input (``runner.hidden``; the embedding's output is not kept),
    the RoPE tables and positions, and, where whole layers take the groups one at a time, the other groups'
    inputs and outputs (two rows each, three while the outputs are concatenated). Then the largest of:

    * the MLP (``model.post_attention``, ``model_pieces``): the residual after attention, the normed input,
      gate, up and their product (``model.silu_mul``: one tensor), the attention output, the down product
      and the layer's output, the GEMM's workspace (``GEMM_WORKSPACE_ROWS``), and one row block's product
      where a layer streams in pieces;
    * attention: the normed input, q/k/v and their rotated copies, the attention output (and, in pieces,
      every group's q/k/v with one group's rotated heads), the grouped fold's fp32 state where exact
      attention may not gather (not ``lean``: the whole context's K/V does not fit the scratch,
      ``pipeline.kv.streamed.gathered_fits``), the tiered cache's chunk-size probe over one piece at a
      first piece (``pipeline.chunking.attention_entropy``), and the gathered K/V (``gather_bytes``);
    * an RMS norm where its C++ pass is missing (``torch.rms_norm``): fp32 upcasts beside the residuals;
    * the LM head's logits."""
    item = element_bytes(dtype)
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    working = groups * rows
    held_rows = working * item * h + working * (2 * config.head_dim * 4 + 8)
    others = (whole_layer_groups - 1) * rows * item * h
    block_product = item * min(h, CRC_BLOCK_BYTES // (item * i)) if i else 0
    mlp = item * (4 * h + q + 3 * i + GEMM_WORKSPACE_ROWS * h) + block_product
    fold = 0 if lean else 4 * (3 * q + 2 * kv)
    attention = item * (h + 4 * q + 3 * kv) + fold
    probe = piece_rows * (q * 4 + 32 * (config.num_heads * 20 + 10))
    norm = item * (3 * h + q) + 4 * 2 * h
    layer = max(working * mlp, working * norm, working * attention + probe + gather_bytes) + 2 * others
    return held_rows + max(layer, 3 * others + 2 * working * item * h, logits)


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
