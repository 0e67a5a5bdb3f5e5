"""Quality measures for KV chunk selection: how much of dense attention the selected chunks keep.

Why this module exists: the importance estimator (``importance.chunk_scores`` + ``select_chunks``)
trades exactness for reading less KV. Whether that trade is good is measured, not assumed:
``scripts/eval_kv_selection.py`` sweeps budgets and chunk sizes with these functions, and tests
use them to check the estimator's behaviour. They compare one decode query per head against the
dense attention it replaces:

- ``attention_recall``: the share of the true (dense) softmax mass that falls on selected tokens.
  1.0 means nothing the query attends to was dropped.
- ``relative_output_error``: ``||sparse - dense|| / ||dense||`` of the attention output, where the
  sparse output is the softmax renormalised over the selected tokens only (what sparse decode
  attention computes).
- ``plant_needle``: the test input for "a needle is always found": lift a span of keys along one
  query so that it takes a chosen share of that query's attention.

Pure torch, fp32 math, any device. GQA as everywhere in tierkv: query head h reads KV head h // G.
Not on the hot path: these exist to evaluate, so they favour clarity over speed.
"""

from __future__ import annotations

import torch

__all__ = ["attention_recall", "relative_output_error", "chunk_mask_to_tokens", "plant_needle"]


def plant_needle(q: torch.Tensor, keys: torch.Tensor, start: int, span: int, share: float, scale: float) -> None:
    """Move keys[start:start+span] along q, in place, so that together they take ``share`` of q's attention.

    q: (D,) one query head; keys: (T, D) the keys of its KV head. Each needle key gets the same
    scaled logit, chosen against the other keys' logsumexp; the shift is along q / |q| only, so
    other queries see the needle by their correlation with q.
    """
    logits = (keys @ q) * scale                                                   # (T,)
    rest = torch.cat([logits[:start], logits[start + span:]]).logsumexp(0)
    target = rest + torch.log(torch.tensor(share / (1.0 - share))) - torch.log(torch.tensor(float(span)))
    gains = target - logits[start:start + span]                                   # (span,)
    keys[start:start + span] += (gains / (q.norm() * scale))[:, None] * (q / q.norm())


def chunk_mask_to_tokens(mask: torch.Tensor, starts: torch.Tensor, T: int) -> torch.Tensor:
    """Expand a per-chunk selection to a per-token one.

    mask:   (B, Hkv, C) bool, selected chunks (e.g. ``Selection.mask``).
    starts: (C,) int chunk start offsets: starts[0] == 0, strictly increasing, all < T; chunk c
            covers tokens [starts[c], starts[c+1]) and the last chunk ends at T.
    Returns (B, Hkv, T) bool, True on every token of a selected chunk.
    """
    if mask.dim() != 3 or starts.dim() != 1 or mask.shape[-1] != starts.shape[0]:
        raise ValueError(f"need mask (B, Hkv, C) and starts (C,), got {tuple(mask.shape)}, {tuple(starts.shape)}")
    tokens = torch.arange(T, device=mask.device, dtype=torch.int64)
    chunk_of = torch.bucketize(tokens, starts.to(device=mask.device, dtype=torch.int64), right=True) - 1  # (T,)
    return mask.bool()[..., chunk_of]  # (B, Hkv, T)


def _grouped_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, Hq, D), k (B, Hkv, T, D) -> scaled fp32 logits (B, Hkv, G, T)."""
    if q.dim() != 3 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"need q (B, Hq, D) and k (B, Hkv, T, D), got {tuple(q.shape)}, {tuple(k.shape)}")
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} query heads must be a multiple of Hkv={Hkv} KV heads")
    qg = q.float().view(B, Hkv, Hq // Hkv, D)  # (B, Hkv, G, D)
    return torch.einsum("bhgd,bhtd->bhgt", qg, k.float()) * scale  # (B, Hkv, G, T)


def _check_mask(mask_tokens: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, T) bool mask matching k (B, Hkv, T, D) -> (B, Hkv, 1, T), broadcast over G."""
    if tuple(mask_tokens.shape) != tuple(k.shape[:3]):
        raise ValueError(f"mask_tokens must be {tuple(k.shape[:3])} (B, Hkv, T), got {tuple(mask_tokens.shape)}")
    return mask_tokens.bool().unsqueeze(2)


def attention_recall(q: torch.Tensor, k: torch.Tensor, mask_tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """Share of each query head's dense softmax attention mass that lies on the selected tokens.

    q:           (B, Hq, D) one decode query per head (post-RoPE, unscaled).
    k:           (B, Hkv, T, D) keys the query attends over (post-RoPE).
    mask_tokens: (B, Hkv, T) bool, tokens selected for each KV head.
    scale:       softmax scale (usually 1 / sqrt(D)).
    Returns (B, Hq) float32 in [0, 1].
    """
    logits = _grouped_logits(q, k, scale)  # (B, Hkv, G, T)
    mask = _check_mask(mask_tokens, k)  # (B, Hkv, 1, T)
    p = torch.softmax(logits, dim=-1)
    recall = (p * mask).sum(-1)  # (B, Hkv, G)
    return recall.clamp(0.0, 1.0).reshape(q.shape[0], q.shape[1])


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the True entries of mask only; rows with no True entry give all zeros."""
    masked = logits.masked_fill(~mask, float("-inf"))
    peak = masked.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    w = torch.exp(masked - peak)  # unselected -> 0
    return w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def relative_output_error(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_tokens: torch.Tensor, scale: float
) -> torch.Tensor:
    """``||sparse - dense|| / ||dense||`` of each query head's attention output.

    q: (B, Hq, D); k, v: (B, Hkv, T, D); mask_tokens: (B, Hkv, T) bool; scale: softmax scale.
    The sparse output renormalises the softmax over the selected tokens; with nothing selected it
    is zero (error 1). A zero dense output gives error 0 when sparse is zero too, else inf.
    Returns (B, Hq) float32.
    """
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must match k in (B, Hkv, T), got {tuple(v.shape)} vs {tuple(k.shape)}")
    logits = _grouped_logits(q, k, scale)  # (B, Hkv, G, T)
    mask = _check_mask(mask_tokens, k).expand_as(logits)  # (B, Hkv, G, T)
    vf = v.float()
    dense = torch.einsum("bhgt,bhtd->bhgd", torch.softmax(logits, dim=-1), vf)  # (B, Hkv, G, Dv)
    sparse = torch.einsum("bhgt,bhtd->bhgd", _masked_softmax(logits, mask), vf)
    num = (sparse - dense).norm(dim=-1)  # (B, Hkv, G)
    den = dense.norm(dim=-1)
    err = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny),
                      torch.where(num > 0, float("inf"), 0.0))
    return err.reshape(q.shape[0], q.shape[1])
