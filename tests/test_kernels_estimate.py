"""The fused two-stage estimator (``kernels.estimate``) selects what chunk_scores + select_chunks select."""

import pytest
import torch

from tierkv.kernels import KeySketch, chunk_scores, encode_keys, key_ellipsoids, select_chunks
from tierkv.kernels.estimate import full_chunk_sketch, fused_applies, select_two_stage
from tierkv.kernels.importance import sketch_candidates
from tierkv.kernels.reference import sketch_scores_ref

pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")


def _case(seed: int, B: int, C: int, uncoded: int, S: int = 16, D: int = 32, H: int = 2, G: int = 2,
          last: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KeySketch]:
    """q (B, H*G, D), abstracts (B, H, C, D) and the sketch of the first C - uncoded chunks; the last
    chunk holds ``last`` tokens (the open chunk), the others S."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, C, S, D, generator=g)
    k[..., :2] *= 3.0
    kmin, kmax = k.amin(3), k.amax(3)
    sizes = torch.full((C,), S, dtype=torch.int32)
    sizes[-1] = S if last is None else last
    sketch = KeySketch(encode_keys(k, kmin, kmax), sizes, C - uncoded, key_ellipsoids(k, torch.float32))
    return torch.randn(B, H * G, D, generator=g) * 2, kmin, kmax, sketch


def _both(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, sketch: KeySketch, candidates: int,
          budget: int, sink: int, recent: int, full_coded: bool = False
          ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    scores = chunk_scores(q, kmin, kmax, sketch=sketch, candidates=candidates)
    want = select_chunks(scores, sketch.chunk_tokens, budget_tokens=budget, sink_chunks=sink, recent_tokens=recent)
    got = select_two_stage(q, kmin, kmax, sketch, candidates, budget_tokens=budget, sink_chunks=sink,
                           recent_tokens=recent, full_coded=full_coded)
    return tuple(want), tuple(got)


@pytest.mark.parametrize("B, C, uncoded, last, sink", [(1, 40, 1, 5, 1), (2, 64, 1, 16, 1), (1, 50, 0, None, 2),
                                                       (2, 37, 3, 9, 0), (1, 80, 1, 1, 4)])
def test_the_fused_selection_equals_scores_then_select(B: int, C: int, uncoded: int, last: int | None,
                                                       sink: int) -> None:
    S = 16
    for seed in range(6):
        q, kmin, kmax, sketch = _case(seed, B, C, uncoded, S=S, last=last)
        budget = S * (4 + seed) + seed
        candidates = sketch_candidates(budget - 2 * S, S, 3)
        assert 0 < candidates < sketch.coded
        full = uncoded > 0 or last in (None, S)          # every coded chunk holds S keys
        for full_coded in {False, full}:
            want, got = _both(q, kmin, kmax, sketch, candidates, budget, sink, S, full_coded)
            for a, b in zip(want, got):
                assert a.dtype == b.dtype and torch.equal(a, b)
        assert int(got[2].min()) >= 1


def test_when_every_candidate_fits_it_takes_the_pruned_chunks_as_select_chunks_does() -> None:
    """A pool smaller than the budget (not what sketch_candidates makes): the pruned chunks come next."""
    q, kmin, kmax, sketch = _case(7, 2, 40, 1, last=3)
    budget = 16 * 20
    want, got = _both(q, kmin, kmax, sketch, 4, budget, 1, 16)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert int(got[2].min()) > 4 + 2            # more than the candidates and the forced chunks


@pytest.mark.parametrize("D", [64, 128, 40])
def test_the_full_chunk_sketch_is_the_reference_bound(D: int) -> None:
    """Codes unpacked a word at a time (D = 64, 128: P divisible by 4) or by the reference (40: P = 10)."""
    q, kmin, kmax, sketch = _case(3, 2, 24, 0, D=D)   # 2 x 2 x 9 x 16 x D values: unblocked
    ids = torch.randperm(24, generator=torch.Generator().manual_seed(D))[:9].view(1, 1, 9).repeat(2, 2, 1)
    sizes = sketch.chunk_tokens.expand(2, 24)
    want = sketch_scores_ref(q, kmin, kmax, sketch.codes, sizes, ids)
    assert torch.equal(full_chunk_sketch(q, kmin, kmax, sketch.codes, ids), want)


def test_it_applies_to_two_stages_on_the_torch_path_only() -> None:
    q, _, _, sketch = _case(0, 1, 20, 1)
    assert fused_applies(q, sketch, 8)
    assert not fused_applies(q, sketch, 0)                         # nothing to score: forced chunks only
    assert not fused_applies(q, sketch, sketch.coded)              # one stage: every coded chunk sketched
    assert not fused_applies(q, sketch._replace(ellipsoid=None), 8)   # coarse-sketch ranking
    assert not fused_applies(q, None, 8)
