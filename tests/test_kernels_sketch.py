"""2-bit key sketch: encoding, the token-level bound (Triton interpreted vs torch reference), needles."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch

from tierkv.kernels import KeySketch, chunk_abstract, chunk_scores, encode_keys, select_chunks
from tierkv.kernels._select import HAS_TRITON
from tierkv.kernels.quality import plant_needle
from tierkv.kernels.sketch import sketch_bytes_per_token

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]


def _chunked(B: int, H: int, C: int, S: int, D: int, seed: int, dtype=torch.float32):
    """Keys (B, H, C*S, D) with a few wide channels, their abstracts and codes."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, C * S, D, generator=gen)
    keys[..., : max(1, D // 16)] *= 4.0
    keys = keys.to(dtype)
    kmin, kmax = chunk_abstract(keys, torch.arange(0, C * S, S), backend="torch")
    return keys, kmin, kmax, encode_keys(keys.view(B, H, C, S, D), kmin, kmax)


def _decode(codes: torch.Tensor, D: int) -> torch.Tensor:
    """(…, P) packed bytes -> (…, D) codes 0..3, channel d = i*P + j in bits 2i of byte j."""
    parts = [(codes >> (2 * i)) & 3 for i in range(4)]
    return torch.cat(parts, dim=-1)[..., :D]


@pytest.mark.parametrize("D", [64, 40, 7])
def test_codes_place_every_key_in_its_cell(D):
    B, H, C, S = 2, 3, 5, 9
    keys, kmin, kmax, codes = _chunked(B, H, C, S, D, seed=D)
    assert codes.shape == (B, H, C, S, sketch_bytes_per_token(D)) and codes.dtype == torch.uint8
    code = _decode(codes, D).float()                                   # (B, H, C, S, D)
    w = ((kmax - kmin) / 4).unsqueeze(3)
    lo = kmin.unsqueeze(3) + code * w
    k = keys.view(B, H, C, S, D)
    assert ((k >= lo - 1e-5) & (k <= lo + w + 1e-5)).all()
    assert code.min() == 0 and code.max() == 3                         # the cells are all used


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,C,S,D", [(1, 2, 1, 4, 16, 64), (2, 6, 2, 7, 13, 40), (1, 3, 3, 3, 5, 7)])
def test_sketch_bound_holds_is_tighter_and_matches_the_reference(backend, dtype, B, Hq, Hkv, C, S, D):
    keys, kmin, kmax, codes = _chunked(B, Hkv, C, S, D, seed=C * S + D, dtype=dtype)
    q = torch.randn(B, Hq, D, generator=torch.Generator().manual_seed(D)).to(dtype)
    sizes = torch.full((C,), S, dtype=torch.int32)
    sizes[-1] = S - 2                                                  # a partial last chunk
    coded = C - 1                                                      # ... without codes: chunk bound
    coarse = chunk_scores(q, kmin, kmax, backend=backend)
    got = chunk_scores(q, kmin, kmax, sketch=KeySketch(codes, sizes, coded), backend=backend)
    ref = chunk_scores(q, kmin, kmax, sketch=KeySketch(codes, sizes, coded), backend="torch")
    scale = q.float().norm(dim=-1).max() * keys.float().abs().amax() * D**0.5
    assert ((got - ref).abs().max() / scale).item() < 1e-5
    logits = torch.einsum("bhgd,bhtd->bhgt", q.float().view(B, Hkv, Hq // Hkv, D), keys.float())
    peak = logits.amax(2).view(B, Hkv, C, S)                          # (B, Hkv, C, S) max over the group
    for c in range(C):
        n = int(sizes[c])
        assert (got[..., c] >= peak[..., c, :n].amax(-1) - 1e-3 * scale / D).all()   # still an upper bound
    assert (got <= coarse + 1e-3).all()
    assert torch.equal(got[..., coded:], coarse[..., coded:])
    assert (got[..., :coded] < coarse[..., :coded] - 1e-3).float().mean() > 0.9   # and a tighter one


def test_sketch_rejects_codes_that_do_not_fit():
    _, kmin, kmax, codes = _chunked(1, 2, 4, 8, 16, seed=0)
    q = torch.randn(1, 2, 16)
    with pytest.raises(ValueError, match="sketch codes must be"):
        chunk_scores(q, kmin, kmax, sketch=KeySketch(codes[..., :2], torch.full((4,), 8), 4))
    with pytest.raises(ValueError, match="coded=5"):
        chunk_scores(q, kmin, kmax, sketch=KeySketch(codes, torch.full((4,), 8), 5))


def _needle(seed: int, T: int = 2048, H: int = 2, G: int = 2, D: int = 64) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Random keys (two wide channels) and one key, per KV head, taking half of one query head's attention."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, H, T, D, generator=g)
    k[..., :2] *= 3.0
    q = torch.randn(1, H * G, D, generator=g)
    q = q / q.norm(dim=-1, keepdim=True) * math.sqrt(D)
    pos = int(torch.randint(64, T - 64, (1,), generator=g))
    for h in range(H):
        plant_needle(q[0, h * G], k[0, h], pos, 1, 0.5, D**-0.5)
    return q, k, pos


def test_a_single_token_needle_is_selected_with_the_sketch():
    backend = "torch"   # the Triton kernels equal it (above); interpreted they would take ~15 s here
    S, found = 64, {False: 0, True: 0}
    for seed in range(6):
        q, k, pos = _needle(seed)
        C = k.shape[2] // S
        kmin, kmax = chunk_abstract(k, torch.arange(0, k.shape[2], S), backend="torch")
        sizes = torch.full((C,), S, dtype=torch.int32)
        for use in (False, True):
            sketch = KeySketch(encode_keys(k.view(1, 2, C, S, -1), kmin, kmax), sizes, C) if use else None
            scores = chunk_scores(q, kmin, kmax, sketch=sketch, backend=backend)
            sel = select_chunks(scores, sizes, budget_tokens=k.shape[2] // 10, backend=backend)
            found[use] += int(sel.mask[0, :, pos // S].all())
    assert found[True] == 6            # always, within 10% of the tokens
    assert found[False] <= 2           # the min/max bound alone mostly misses it
