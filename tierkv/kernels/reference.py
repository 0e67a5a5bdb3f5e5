"""Pure torch references for every tierkv kernel.

Why this module exists: each Triton kernel in ``tierkv.kernels`` is checked against the function
here, and these functions are also the production path where Triton cannot run (CPU-only
machines, no triton installed). So they are vectorised (no Python loops over chunks or tokens),
stay on the tensors' device, and never synchronise with the host. They import nothing from Triton.

Shapes: B batch, Hq query heads, Hkv KV heads (G = Hq // Hkv query heads per KV head), T tokens,
D head dim, C chunks, N pool slots, S slot capacity in tokens, M table width (max selected).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "Selection",
    "chunk_abstract_ref",
    "abstract_append_ref",
    "piece_abstract_ref",
    "chunk_scores_ref",
    "select_chunks_ref",
    "sketch_scores_ref",
    "sparse_decode_attention_ref",
]


class Selection(NamedTuple):
    """Chunks picked for one decode step, per (sequence, KV head).

    mask:   (B, Hkv, C) bool, True where the chunk is selected.
    ids:    (B, Hkv, C) int32, selected chunk ids in ascending order, then -1 padding.
    counts: (B, Hkv) int32, number of selected chunks (valid prefix length of ``ids``).
    """

    mask: torch.Tensor
    ids: torch.Tensor
    counts: torch.Tensor


def _token_chunk_index(starts: torch.Tensor, T: int) -> torch.Tensor:
    """(T,) int64: which chunk each token belongs to, given (C,) sorted chunk start offsets."""
    tokens = torch.arange(T, device=starts.device, dtype=torch.int64)
    return torch.bucketize(tokens, starts.to(torch.int64), right=True) - 1


def chunk_abstract_ref(keys: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise min/max of the keys of each chunk.

    keys: (B, Hkv, T, D); starts: (C,) int, starts[0] == 0, strictly increasing, < T.
    Returns kmin, kmax: (B, Hkv, C, D) in the dtype of ``keys``.
    """
    B, H, T, D = keys.shape
    C = starts.shape[0]
    idx = _token_chunk_index(starts, T).view(1, 1, T, 1).expand(B, H, T, D)
    kmin = keys.new_zeros(B, H, C, D).scatter_reduce_(2, idx, keys, "amin", include_self=False)
    kmax = keys.new_zeros(B, H, C, D).scatter_reduce_(2, idx, keys, "amax", include_self=False)
    return kmin, kmax


def abstract_append_ref(
    kmin: torch.Tensor, kmax: torch.Tensor, new_keys: torch.Tensor, chunk: int, fresh: bool
) -> None:
    """Fold appended keys into one chunk's abstract, in place.

    kmin, kmax: (B, Hkv, C, D); new_keys: (B, Hkv, n, D), n >= 1; chunk: index into C.
    fresh: the chunk holds no earlier tokens, so its old abstract is overwritten.
    """
    lo = new_keys.amin(dim=2).to(kmin.dtype)  # (B, Hkv, D)
    hi = new_keys.amax(dim=2).to(kmax.dtype)
    if not fresh:
        lo = torch.minimum(lo, kmin[:, :, chunk])
        hi = torch.maximum(hi, kmax[:, :, chunk])
    kmin[:, :, chunk] = lo
    kmax[:, :, chunk] = hi


def piece_abstract_ref(
    kmin: torch.Tensor, kmax: torch.Tensor, keys: torch.Tensor, first: int, fill: int, chunk_tokens: int
) -> None:
    """Fold a piece of appended keys into the abstracts of every chunk it reaches, in place.

    kmin, kmax: (B, Hkv, C, D); keys: (B, Hkv, T, D), T >= 1, the tokens that follow the ``fill``
    (0 <= fill < S) already in chunk ``first``, with chunks of S = chunk_tokens tokens: chunk
    ``first`` takes the first S - fill keys (folded into its abstract when fill > 0, overwriting it
    when fill == 0), each next chunk the next S, the last one possibly fewer. At most three
    reductions (the open chunk's rest, the whole chunks, the partial last), whatever T is.
    """
    B, H, T, D = keys.shape
    s = chunk_tokens
    head = min(T, s - fill) if fill else 0
    if head:
        lo, hi = torch.aminmax(keys[:, :, :head], dim=2)  # (B, Hkv, D)
        kmin[:, :, first] = torch.minimum(lo, kmin[:, :, first])
        kmax[:, :, first] = torch.maximum(hi, kmax[:, :, first])
    c = first + (1 if head else 0)
    full, tail = divmod(T - head, s)
    if full:
        body = keys[:, :, head:head + full * s].reshape(B, H, full, s, D)
        lo, hi = torch.aminmax(body, dim=3)  # (B, Hkv, full, D)
        kmin[:, :, c:c + full] = lo
        kmax[:, :, c:c + full] = hi
    if tail:
        lo, hi = torch.aminmax(keys[:, :, T - tail:], dim=2)
        kmin[:, :, c + full] = lo
        kmax[:, :, c + full] = hi


def chunk_scores_ref(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, n_chunks: torch.Tensor | None
) -> torch.Tensor:
    """Upper bound of q.k over each chunk, max over the query heads of each KV group.

    q: (B, Hq, D); kmin, kmax: (B, Hkv, C, D); n_chunks: (B,) int or None (chunks >= n_chunks[b]
    score -inf). Returns (B, Hkv, C) float32.
    """
    B, Hq, D = q.shape
    Hkv, C = kmin.shape[1], kmin.shape[2]
    qg = q.float().view(B, Hkv, Hq // Hkv, D)  # (B, Hkv, G, D)
    lo = kmin.float()  # (B, Hkv, C, D)
    # max(q*lo, q*hi) = q*lo + relu(q)*(hi - lo) since lo <= hi: two matmuls, no (G, C, D) temporary
    bound = qg @ lo.transpose(-1, -2) + qg.clamp(min=0) @ (kmax.float() - lo).transpose(-1, -2)  # (B, Hkv, G, C)
    scores = bound.amax(dim=2)  # (B, Hkv, C)
    if n_chunks is not None:
        valid = torch.arange(C, device=q.device) < n_chunks.view(B, 1, 1)
        scores = scores.masked_fill(~valid, float("-inf"))
    return scores


def sketch_scores_ref(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, codes: torch.Tensor, sizes: torch.Tensor
) -> torch.Tensor:
    """Token-level upper bound of q.k from 2-bit key codes, max over each chunk's keys and each KV group.

    q: (B, Hq, D); kmin, kmax: (B, Hkv, n, D); codes: (B, Hkv, n, S, P) uint8 (channel d = i*P + j
    in bits 2i..2i+1 of byte j, see ``tierkv.kernels.sketch``); sizes: (B, n) int, keys per chunk.
    Returns (B, Hkv, n) float32: max over keys and query heads of q.kmin + relu(q).w + (q*w).code.
    The codes are unpacked in blocks of chunks (~1M values each): the one loop in this module,
    because a whole-context float copy of the codes costs more in page faults than the arithmetic.
    """
    B, Hq, D = q.shape
    H, n, S, P = codes.shape[1], codes.shape[2], codes.shape[3], codes.shape[4]
    G = Hq // H
    qg = q.float().view(B, H, G, D)                                               # (B, Hkv, G, D)
    lo = kmin.float()
    w = (kmax.float() - lo) * 0.25                                                 # (B, Hkv, n, D)
    base = torch.einsum("bhgd,bhnd->bhng", qg, lo) + torch.einsum("bhgd,bhnd->bhng", qg.clamp(min=0), w)
    qw = torch.nn.functional.pad(qg.unsqueeze(2) * w.unsqueeze(3), (0, 4 * P - D))  # (B, Hkv, n, G, 4P)
    valid = torch.arange(S, device=q.device) < sizes.view(B, 1, n, 1, 1).to(q.device)  # (B, 1, n, 1, S)
    best = torch.empty(B, H, n, G, device=q.device)
    step = max(1, (1 << 20) // max(1, B * H * S * 4 * P))
    unpacked = torch.empty(B, H, min(step, n), S, 4, P, device=q.device)          # (B, Hkv, blk, S, 4, P)
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        block, part = codes[:, :, c0:c1], unpacked[:, :, :c1 - c0]
        for i in range(4):  # the four bit pairs: contiguous channel blocks i*P .. i*P + P - 1
            part[..., i, :] = (block >> (2 * i)) & 3
        tok = torch.matmul(qw[:, :, c0:c1], part.view(B, H, c1 - c0, S, 4 * P).transpose(-1, -2))  # (.., G, S)
        best[:, :, c0:c1] = tok.masked_fill_(~valid[:, :, c0:c1], float("-inf")).amax(dim=-1)
    return (best + base).amax(dim=-1)


def _forced_chunks(
    sizes: torch.Tensor, valid: torch.Tensor, sink_chunks: int, recent_tokens: int
) -> torch.Tensor:
    """(B, C) bool: the sink chunks plus the shortest suffix of chunks holding recent_tokens."""
    C = sizes.shape[-1]
    total = sizes.sum(-1, keepdim=True)  # (B, 1)
    after = total - sizes.cumsum(-1)  # (B, C) tokens in later chunks
    sink = torch.arange(C, device=sizes.device) < sink_chunks
    return valid & (sink | (after < recent_tokens))


def select_chunks_ref(
    scores: torch.Tensor,
    chunk_tokens: torch.Tensor,
    budget_tokens: int,
    sink_chunks: int,
    recent_tokens: int,
    n_chunks: torch.Tensor | None,
) -> Selection:
    """Forced sink/recent chunks plus the best-scoring others that fit in the token budget.

    scores: (B, Hkv, C) float; chunk_tokens: (B, C) or (C,) int, tokens per chunk;
    n_chunks: (B,) int or None (all C valid). The rule is documented in ``importance``.
    """
    B, H, C = scores.shape
    dev = scores.device
    valid = torch.ones(B, C, dtype=torch.bool, device=dev)
    if n_chunks is not None:
        valid = torch.arange(C, device=dev) < n_chunks.view(B, 1)
    sizes = (chunk_tokens.to(torch.int64).expand(B, C) * valid).view(B, 1, C)  # (B, 1, C)
    forced = _forced_chunks(sizes.view(B, C), valid, sink_chunks, recent_tokens).view(B, 1, C)
    cand = valid.view(B, 1, C) & ~forced  # (B, 1, C)
    remaining = budget_tokens - (sizes * forced).sum(-1, keepdim=True)  # (B, 1, 1)
    key = torch.where(cand, scores.float(), float("-inf"))  # (B, H, C)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # (B, H, C)
    cand_sizes = (sizes * cand).expand(B, H, C)
    taken = cand_sizes.gather(-1, order).cumsum(-1) <= remaining  # (B, H, C), sorted order
    chosen = torch.zeros(B, H, C, dtype=torch.bool, device=dev).scatter_(-1, order, taken)
    mask = forced | (cand & chosen)  # (B, H, C)
    arange = torch.arange(C, device=dev, dtype=torch.int32)
    ids = torch.where(mask, arange, C).sort(dim=-1).values  # selected ids first, ascending
    ids = torch.where(ids == C, -1, ids).to(torch.int32)
    return Selection(mask, ids, mask.sum(-1, dtype=torch.int32))


def sparse_decode_attention_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    counts: torch.Tensor,
    slot_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention of each query over the chunk slots listed in its KV head's table row.

    q: (B, Hq, D); k_pool, v_pool: (N, Hkv, S, D); table: (B, Hkv, M) int slot ids, entries at
    or past counts[b, h] ignored; counts: (B, Hkv) int; slot_lens: (N,) int valid tokens per slot.
    Rows with no token at all give zeros. Returns (B, Hq, D) in the dtype of q.
    """
    B, Hq, D = q.shape
    _, Hkv, S, _ = k_pool.shape
    M = table.shape[-1]
    slots = table.clamp(min=0).long()  # (B, Hkv, M)
    heads = torch.arange(Hkv, device=q.device).view(1, Hkv, 1)
    k = k_pool[slots, heads].reshape(B, Hkv, M * S, D).float()  # (B, Hkv, M*S, D)
    v = v_pool[slots, heads].reshape(B, Hkv, M * S, D).float()
    in_table = torch.arange(M, device=q.device) < counts.view(B, Hkv, 1)  # (B, Hkv, M)
    in_slot = torch.arange(S, device=q.device) < slot_lens[slots].unsqueeze(-1)  # (B, Hkv, M, S)
    valid = (in_table.unsqueeze(-1) & in_slot).view(B, Hkv, 1, M * S)
    k = k.masked_fill(~valid.view(B, Hkv, M * S, 1), 0.0)  # unused slot space may hold NaN
    v = v.masked_fill(~valid.view(B, Hkv, M * S, 1), 0.0)
    qg = q.float().view(B, Hkv, Hq // Hkv, D)  # (B, Hkv, G, D)
    logits = torch.einsum("bhgd,bhtd->bhgt", qg, k) * scale  # (B, Hkv, G, M*S)
    logits = logits.masked_fill(~valid, float("-inf"))
    peak = logits.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    p = torch.exp(logits - peak)  # masked entries -> 0
    denom = p.sum(-1, keepdim=True)
    out = torch.einsum("bhgt,bhtd->bhgd", p, v) / denom.clamp_min(torch.finfo(torch.float32).tiny)
    return out.reshape(B, Hq, D).to(q.dtype)
