"""Adaptive KV chunk sizes per layer, from how concentrated attention is at prefill.

Why this module exists: the tiered KV cache moves and selects KV in chunks. Where a layer's
attention concentrates on a few scattered tokens, small chunks let a token budget pick just those
tokens (a large chunk around one important token wastes the rest of its budget); where attention
is flat, selection gains little and large chunks mean fewer abstracts to score, fewer table
entries and larger, cheaper transfers. The size is chosen once per layer, from the first prefill
piece, before that layer's KV is cut into chunks.

Measure (``attention_entropy``): for a sample of the piece's last queries (at most
``ChunkRule.sample_queries``), the softmax attention over every key each query may see; the
Shannon entropy of each distribution divided by log(number of visible keys) gives 0 (all mass on
one key) .. 1 (uniform). The layer's skew value is the mean over sampled queries and query heads.

Rule (``chunk_tokens_for_entropy``, a pure function of numbers):
- normalized entropy <= ``concentrated_entropy`` (0.5): ``min_chunk_tokens`` (16);
- normalized entropy >= ``flat_entropy`` (0.9): ``max_chunk_tokens`` (256);
- in between: geometric interpolation between the two sizes, rounded to a power of two
  (so 0.6 -> 32, 0.7 -> 64, 0.8 -> 128 with the defaults);
- too few visible keys to measure (< ``min_keys``): ``default_chunk_tokens`` (64).
``pipeline.kv.sizing.chunk_tokens_for`` then caps the size so that the sparse budget holds a few
chunks (``MIN_BUDGET_CHUNKS``). The device room never enters: a layer's chunks, so which tokens a
sparse step can pick, are the same wherever its KV lives; a budget too small for the working set
at any size the rule may pick is refused when the cache is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch

from tierkv.model import visibility_mask

__all__ = ["ChunkRule", "chunk_tokens_for_entropy", "attention_entropy"]


@dataclass(frozen=True)
class ChunkRule:
    """Parameters of the adaptive chunk-size rule (see the module docstring)."""

    min_chunk_tokens: int = 16
    max_chunk_tokens: int = 256
    concentrated_entropy: float = 0.5
    flat_entropy: float = 0.9
    default_chunk_tokens: int = 64
    min_keys: int = 64
    sample_queries: int = 32

    def __post_init__(self) -> None:
        for n in (self.min_chunk_tokens, self.max_chunk_tokens, self.default_chunk_tokens):
            assert n >= 1 and n & (n - 1) == 0, f"chunk sizes must be powers of two, got {n}"
        assert self.min_chunk_tokens <= self.max_chunk_tokens
        assert 0.0 <= self.concentrated_entropy < self.flat_entropy <= 1.0


def chunk_tokens_for_entropy(normalized_entropy: float | None, rule: ChunkRule = ChunkRule()) -> int:
    """Chunk size in tokens for a layer whose attention has this normalized entropy (None: unmeasured)."""
    if normalized_entropy is None or math.isnan(normalized_entropy):
        return rule.default_chunk_tokens
    span = rule.flat_entropy - rule.concentrated_entropy
    frac = min(1.0, max(0.0, (normalized_entropy - rule.concentrated_entropy) / span))
    lo, hi = math.log2(rule.min_chunk_tokens), math.log2(rule.max_chunk_tokens)
    return 1 << int(round(lo + frac * (hi - lo)))


def attention_entropy(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                      window_tokens: int | None = None, rule: ChunkRule = ChunkRule()) -> float | None:
    """Mean normalized attention entropy of the last ``rule.sample_queries`` queries (None if unmeasurable).

    q (B, Hq, T, D) and k (B, Hkv, S, D) post-RoPE; q_pos (B, T), k_pos (B, S) token positions.
    One host sync (the returned float); called once per layer at prefill.
    """
    n_q = min(rule.sample_queries, q.shape[2])
    q, q_pos = q[:, :, -n_q:].float(), q_pos[:, -n_q:]                      # (B, Hq, n, D), (B, n)
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)                          # (B, Hq, S, D)
    visible = visibility_mask(q_pos, k_pos, window_tokens)                  # (B, n, S)
    n_visible = visible.sum(-1)                                             # (B, n)
    if int(n_visible.min()) < rule.min_keys:
        return None
    logits = (q @ kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])            # (B, Hq, n, S)
    logp = torch.log_softmax(logits.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    plogp = torch.where(visible[:, None], logp.exp() * logp, torch.zeros_like(logp))
    entropy = -plogp.sum(-1)                                                # (B, Hq, n)
    return float((entropy / n_visible[:, None].float().log()).mean())
