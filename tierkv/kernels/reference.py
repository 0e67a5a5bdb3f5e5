"""Pure torch references for every tierkv kernel.

Why this module exists: each Triton kernel in ``tierkv.kernels`` is checked against the function
here, and these functions are also the production path where Triton cannot run (CPU-only
machines, no triton installed). So they are vectorised (no Python loops over chunks or tokens),
stay on the tensors' device, and never synchronise with the host (``decode_partials_ref``, which
computes only the entries it writes, once). They import nothing from Triton.

Shapes: B batch, Hq query heads, Hkv KV heads (G = Hq // Hkv query heads per KV head), T tokens,
D head dim, C chunks, N pool slots, S slot capacity in tokens, M table width (max selected).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "Partials",
    "Selection",
    "chunk_abstract_ref",
    "chunk_partials_ref",
    "combine_partials_ref",
    "decode_partials_ref",
    "empty_partials",
    "abstract_append_ref",
    "piece_abstract_ref",
    "chunk_scores_ref",
    "select_chunks_ref",
    "forced_chunks_ref",
    "gathered_rows",
    "sketch_scores_ref",
    "coarse_sketch_scores_ref",
    "ellipsoid_scores_ref",
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


def _rows(t: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """t (B, Hkv, C, *rest) as rows (R, *rest) viewed in place, and its (batch, head) strides in rows;
    None when t is not a (sliced) chunk-major tensor (e.g. expanded)."""
    B, H = ids.shape[:2]
    rest, (sb, sh, sc) = t.shape[3:], t.stride()[:3]
    if not (sc > 0 and sb % sc == 0 and sh % sc == 0):
        return None
    rows = (B - 1) * (sb // sc) + (H - 1) * (sh // sc) + t.shape[2]
    return t.as_strided((rows, *rest), (sc, *t.stride()[3:])), (sb // sc, sh // sc)


def _row_index(ids: torch.Tensor, row_b: int, row_h: int) -> torch.Tensor:
    """Chunk ids (B, Hkv, K) -> row numbers (B * Hkv * K,) of a ``_rows`` view with these strides."""
    B, H = ids.shape[:2]
    start = torch.arange(0, H * row_h, row_h, device=ids.device).view(1, H, 1)
    if B > 1:
        start = start + torch.arange(0, B * row_b, row_b, device=ids.device).view(B, 1, 1)
    return (ids.long() + start).view(-1)


def gathered_rows(ts: tuple[torch.Tensor, ...], ids: torch.Tensor) -> list[torch.Tensor]:
    """Each t (B, Hkv, C, *rest) at chunk ids (B, Hkv, K) -> (B, Hkv, K, *rest): whole rows by index_select
    (a contiguous copy per chunk, measured ~3x faster on the CPU than an element-wise gather). Tensors
    with the same chunk strides (a layer's abstracts and codes) share one row index."""
    B, H, K = ids.shape
    out, index = [], {}
    for t in ts:
        viewed = _rows(t, ids)
        if viewed is None:                           # e.g. an expanded (broadcast) tensor: copy it once
            base = t.reshape(B * H * t.shape[2], *t.shape[3:])
            rows = _row_index(ids, H * t.shape[2], t.shape[2])
        else:
            base, key = viewed
            if key not in index:
                index[key] = _row_index(ids, *key)
            rows = index[key]
        out.append(base.index_select(0, rows).view(B, H, K, *t.shape[3:]))
    return out


def sketch_scores_ref(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, codes: torch.Tensor, sizes: torch.Tensor,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-level upper bound of q.k from 2-bit key codes, max over each chunk's keys and each KV group.

    q: (B, Hq, D); kmin, kmax: (B, Hkv, C, D); codes: (B, Hkv, C, S, P) uint8 (channel d = i*P + j
    in bits 2i..2i+1 of byte j, see ``tierkv.kernels.sketch``); sizes: (B, C) int, keys per chunk.
    ids: None scores chunks 0..C-1 (returns (B, Hkv, C)); (B, Hkv, K) int scores the chunks each KV
    head lists (returns (B, Hkv, K), entry k for chunk ids[b, h, k]).
    Value: max over keys and query heads of q.kmin + relu(q).w + (q*w).code, float32. Codes unpack
    by four shift/mask passes (measured faster on the CPU than a 256-entry table gather or one
    broadcast shift) in blocks of chunks (~1M values each): a whole-context float copy costs more in
    page faults than the math. Few ops (a decode step calls it per layer on a few dozen candidates,
    where the per-op overhead is most of the time).
    """
    B, Hq, D = q.shape
    H, S, P = codes.shape[1], codes.shape[3], codes.shape[4]
    G = Hq // H
    if ids is not None:
        kmin, kmax, codes = gathered_rows((kmin, kmax, codes), ids)
        sizes = sizes.to(q.device).gather(1, ids.view(B, -1).long()).view(ids.shape)   # (B, Hkv, K)
    else:
        sizes = sizes.to(q.device).view(B, 1, -1)[:, :, :codes.shape[2]]              # (B, 1, C)
    n = codes.shape[2]
    qg = q.float().view(B, H, G, D)                                               # (B, Hkv, G, D)
    lo = kmin[:, :, :n].float()
    w = (kmax[:, :, :n].float() - lo).mul_(0.25)                                  # (B, Hkv, n, D)
    base = torch.matmul(lo, qg.transpose(-1, -2)).add_(torch.matmul(w, qg.clamp(min=0).transpose(-1, -2)))
    qw = qg.unsqueeze(2) * w.unsqueeze(3)                                         # (B, Hkv, n, G, D)
    if 4 * P != D:
        qw = torch.nn.functional.pad(qw, (0, 4 * P - D))                          # (B, Hkv, n, G, 4P)
    invalid = torch.arange(S, device=q.device) >= sizes.unsqueeze(-1)              # (B, Hkv|1, n, S)
    step = max(1, (1 << 20) // max(1, B * H * S * 4 * P))
    unpacked = torch.empty(B, H, min(step, n), S, 4, P, device=q.device)          # (B, Hkv, blk, S, 4, P)
    blocks = []
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        block, part = codes[:, :, c0:c1], unpacked[:, :, :c1 - c0]
        for i in range(4):  # the four bit pairs: contiguous channel blocks i*P .. i*P + P - 1
            part[..., i, :] = (block >> (2 * i)) & 3
        tok = torch.matmul(qw[:, :, c0:c1], part.view(B, H, c1 - c0, S, 4 * P).transpose(-1, -2))  # (.., G, S)
        blocks.append(tok.masked_fill_(invalid[:, :, c0:c1, None], float("-inf")).amax(dim=-1))
    best = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)           # (B, Hkv, n, G)
    return best.add_(base).amax(dim=-1)


def coarse_sketch_scores_ref(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, codes: torch.Tensor, sizes: torch.Tensor, channels: int,
) -> torch.Tensor:
    """A cheaper token-level upper bound of q.k: the codes of ``channels`` of the D channels per key.

    Per KV head, the channels that weigh most (max over the group of |q_d|, times the mean cell
    width over the chunks) are read from the codes; every other channel takes its cell-free bound
    max(q*kmin, q*kmax) = q*kmin + relu(q)*4w, as in the min/max bound. Still >= q.k for every key
    of the chunk, and between the min/max bound and the full sketch bound. Shapes as
    ``sketch_scores_ref`` (ids None); returns (B, Hkv, n) float32. Reads channels / D of the values.
    """
    B, Hq, D = q.shape
    H, n, S, P = codes.shape[1], codes.shape[2], codes.shape[3], codes.shape[4]
    G, m = Hq // H, min(channels, D)
    qg = q.float().view(B, H, G, D)                                               # (B, Hkv, G, D)
    lo = kmin[:, :, :n].float()
    w = (kmax[:, :, :n].float() - lo) * 0.25                                      # (B, Hkv, n, D)
    qw = qg.unsqueeze(2) * w.unsqueeze(3)                                         # (B, Hkv, n, G, D)
    chan = (qg.abs().amax(2) * w.mean(2)).topk(m, dim=-1).indices                 # (B, Hkv, m) channel ids
    qw_sel = qw.gather(-1, chan.view(B, H, 1, 1, m).expand(B, H, n, G, m))         # (B, Hkv, n, G, m)
    free = 3 * qw.clamp(min=0)                                                     # each channel's best cell
    base = (torch.matmul(lo, qg.transpose(-1, -2)) + torch.matmul(w, qg.clamp(min=0).transpose(-1, -2))
            + free.sum(-1) - free.gather(-1, chan.view(B, H, 1, 1, m).expand(B, H, n, G, m)).sum(-1))  # (.., n, G)
    byte = (chan % P).view(B, H, 1, 1, m).expand(B, H, n, S, m)                    # channel d = i*P + j: byte j,
    shift = (2 * (chan // P)).to(torch.uint8).view(B, H, 1, 1, m)                  # bits 2i..2i+1
    vals = ((codes.gather(-1, byte) >> shift) & 3).float()                         # (B, Hkv, n, S, m)
    tok = torch.matmul(qw_sel, vals.transpose(-1, -2))                             # (B, Hkv, n, G, S)
    valid = torch.arange(S, device=q.device) < sizes.to(q.device).view(B, 1, -1, 1, 1)[:, :, :n]
    return (tok.masked_fill_(~valid, float("-inf")).amax(-1) + base).amax(-1)


def ellipsoid_scores_ref(q: torch.Tensor, centre: torch.Tensor, axes2: torch.Tensor) -> torch.Tensor:
    """Per query head bound q.c + sqrt(q^2 . a^2) of each chunk's ellipsoid (``tierkv.kernels.ellipsoid``).

    q: (B, Hq, D); centre, axes2: (B, Hkv, N, D). Returns (B, Hkv, G, N) float32: all query heads
    of all KV heads in two batched matmuls.
    """
    B, Hq, D = q.shape
    H = centre.shape[1]
    qg = q.float().view(B, H, Hq // H, D)                                         # (B, Hkv, G, D)
    spread = torch.matmul(qg * qg, axes2.float().transpose(-1, -2)).clamp_min_(0).sqrt_()  # (B, Hkv, G, N)
    return torch.matmul(qg, centre.float().transpose(-1, -2)).add_(spread)


def forced_chunks_ref(
    sizes: torch.Tensor, sink_chunks: int, recent_tokens: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, C) bool: the sink chunks plus the shortest suffix of chunks holding recent_tokens.

    sizes: (B, C) int tokens per chunk (0 past a ragged sequence's end); valid: (B, C) bool or None (all).
    """
    C = sizes.shape[-1]
    total = sizes.sum(-1, keepdim=True)  # (B, 1)
    after = total - sizes.cumsum(-1)  # (B, C) tokens in later chunks
    sink = torch.arange(C, device=sizes.device) < sink_chunks
    forced = sink | (after < recent_tokens)
    return forced if valid is None else valid & forced


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
    forced = forced_chunks_ref(sizes.view(B, C), sink_chunks, recent_tokens, valid).view(B, 1, C)
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


class Partials(NamedTuple):
    """Per-chunk softmax partials of decode attention, fp32, one entry per table position.

    m:   (B, Hq, P) running max of the entry's logits (scaled; -inf: no token).
    l:   (B, Hq, P) sum of exp(logit - m) over the entry's tokens.
    acc: (B, Hq, P, D) sum of exp(logit - m) * v.
    """

    m: torch.Tensor
    l: torch.Tensor
    acc: torch.Tensor


def empty_partials(B: int, Hq: int, P: int, D: int, device: torch.device) -> Partials:
    """Partials of entries no token reached (-inf, 0, 0): what unwritten table positions hold."""
    m = torch.full((B, Hq, P), float("-inf"), dtype=torch.float32, device=device)
    return Partials(m, torch.zeros_like(m), torch.zeros((B, Hq, P, D), dtype=torch.float32, device=device))


def chunk_partials_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The softmax partial of each chunk, alone: q (N, G, D), k/v (N, S, D), lens (N,) valid tokens.

    Returns m, l (N, G) and acc (N, G, D) in fp32. Entry n depends only on q[n], k[n], v[n],
    lens[n]: a batched fp32 matmul per entry (``torch.bmm``, each product of the same (G, D) x (D, S)
    shape), never a product over several entries' keys, so an entry's bits do not depend on how
    many chunks are computed at once or where they sit in the batch (``test_kernels_attention``
    checks it). That is what makes the tiered cache's result independent of KV placement.
    """
    valid = torch.arange(k.shape[1], device=k.device) < lens.view(-1, 1)  # (N, S)
    kf = k.float().masked_fill(~valid[..., None], 0.0)  # unused slot space may hold NaN
    vf = v.float().masked_fill(~valid[..., None], 0.0)
    logits = torch.bmm(q.float(), kf.transpose(1, 2)) * scale  # (N, G, S)
    logits.masked_fill_(~valid[:, None], float("-inf"))
    m = logits.amax(-1)  # (N, G)
    peak = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = logits.sub_(peak[..., None]).exp_()  # masked tokens -> 0
    return m, p.sum(-1), torch.bmm(p, vf)


def combine_partials_ref(parts: Partials) -> torch.Tensor:
    """One fixed reduction over the entry axis P: (B, Hq, P[, D]) partials -> (B, Hq, D) fp32.

    Rows whose entries hold no token give zeros.
    """
    peak = parts.m.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    w = torch.exp(parts.m - peak)  # (B, Hq, P); empty entries -> 0
    den = (w * parts.l).sum(-1)  # (B, Hq)
    num = (w[..., None] * parts.acc).sum(-2)  # (B, Hq, D)
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)[..., None]


def _entry_inputs(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_lens: torch.Tensor,
    b: torch.Tensor, h: torch.Tensor, slots: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Per-entry chunk_partials_ref inputs for entries (b[n], KV head h[n], pool slot slots[n])."""
    B, Hq, D = q.shape
    Hkv = k_pool.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, D)[b, h]  # (N, G, D)
    return qg, k_pool[slots, h], v_pool[slots, h], slot_lens[slots]


def decode_partials_ref(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor, counts: torch.Tensor,
    slot_lens: torch.Tensor, scale: float, parts: Partials,
) -> None:
    """Write the partial of each table entry (b, h, e) with e < counts[b, h] and table[b, h, e] >= 0
    into ``parts`` at position e (query heads of KV head h); other positions are left as they are.

    q (B, Hq, D); k_pool/v_pool (N, Hkv, S, D); table (B, Hkv, M) slot ids (-1: skip); counts (B, Hkv).
    Only the written entries are computed (their indices are found with ``nonzero``: on CUDA this
    synchronises once; the Triton kernel is used there).
    """
    B, Hq, _ = q.shape
    Hkv, M = table.shape[1], table.shape[2]
    G = Hq // Hkv
    ok = (torch.arange(M, device=q.device) < counts.view(B, Hkv, 1)) & (table >= 0)  # (B, Hkv, M)
    b, h, e = ok.nonzero(as_tuple=True)
    if b.numel() == 0:
        return
    m, l, acc = chunk_partials_ref(*_entry_inputs(q, k_pool, v_pool, slot_lens, b, h, table[b, h, e].long()), scale)
    heads = h[:, None] * G + torch.arange(G, device=q.device)  # (N, G) query heads
    parts.m[b[:, None], heads, e[:, None]] = m
    parts.l[b[:, None], heads, e[:, None]] = l
    parts.acc[b[:, None], heads, e[:, None]] = acc


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

    Every entry's partial comes from ``chunk_partials_ref`` (all M entries at once, those past the
    count as empty chunks: no host sync) and one ``combine_partials_ref`` merges them, so this
    equals ``decode_partials_ref`` into ``empty_partials`` then ``combine_partials_ref``, bit for bit.
    """
    B, Hq, D = q.shape
    Hkv, M = table.shape[1], table.shape[2]
    G = Hq // Hkv
    slots = table.clamp(min=0).long().reshape(-1)  # (B*Hkv*M,)
    b = torch.arange(B, device=q.device).repeat_interleave(Hkv * M)
    h = torch.arange(Hkv, device=q.device).repeat_interleave(M).repeat(B)
    qg, k, v, lens = _entry_inputs(q, k_pool, v_pool, slot_lens, b, h, slots)
    in_table = (torch.arange(M, device=q.device) < counts.view(B, Hkv, 1)).reshape(-1)
    m, l, acc = chunk_partials_ref(qg, k, v, lens * in_table, scale)  # (B*Hkv*M, G[, D])
    parts = Partials(m.view(B, Hkv, M, G).transpose(2, 3).reshape(B, Hq, M),
                     l.view(B, Hkv, M, G).transpose(2, 3).reshape(B, Hq, M),
                     acc.view(B, Hkv, M, G, D).transpose(2, 3).reshape(B, Hq, M, D))
    return combine_partials_ref(parts).to(q.dtype)
