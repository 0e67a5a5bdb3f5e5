"""The C++ estimator kernel (``kernels.estimate_cpu``) selects what the torch path of select_two_stage selects."""

import warnings

import pytest
import torch

from tierkv.errors import ArgumentError
from tierkv.kernels import KeySketch, chunk_scores, encode_keys, key_ellipsoids
from tierkv.kernels.estimate import select_two_stage
from tierkv.kernels.estimate_cpu import (CPU_ESTIMATOR_VAR, estimator_kernel, kernel_applies, pick_cpu_estimator,
                                         select_two_stage_cpu)
from tierkv.kernels.importance import select_chunks, sketch_candidates

pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")


@pytest.fixture(autouse=True)
def _kernel_built() -> None:
    if estimator_kernel().fn is None:
        pytest.skip(f"the estimator kernel did not build here: {estimator_kernel().error}")


def _case(seed: int, B: int, C: int, uncoded: int, S: int, D: int, H: int, G: int, last: int | None,
          dtype: torch.dtype = torch.float32, q_dtype: torch.dtype | None = None,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KeySketch, torch.Tensor]:
    """q (B, H*G, D), abstracts (B, H, C, D) in ``dtype``, the sketch of the first C - uncoded chunks (last
    chunk: ``last`` tokens) and the keys (B, H, C, S, D)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, C, S, D, generator=g)
    k[..., :2] *= 3.0
    k = k.to(dtype).float()                                          # the keys as the cache stores them
    kmin, kmax = k.amin(3).to(dtype), k.amax(3).to(dtype)
    sizes = torch.full((C,), S, dtype=torch.int32)
    sizes[-1] = S if last is None else last
    sketch = KeySketch(encode_keys(k, kmin, kmax), sizes, C - uncoded, key_ellipsoids(k, dtype))
    q = (torch.randn(B, H * G, D, generator=g) * 2).to(q_dtype or dtype)
    return q, kmin, kmax, sketch, k


def _both(monkeypatch: pytest.MonkeyPatch, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
          sketch: KeySketch, candidates: int, budget: int, sink: int, recent: int) -> tuple[tuple, tuple]:
    def run(mode: str) -> tuple:
        monkeypatch.setenv(CPU_ESTIMATOR_VAR, mode)
        return tuple(select_two_stage(q, kmin, kmax, sketch, candidates, budget_tokens=budget, sink_chunks=sink,
                                      recent_tokens=recent))
    return run("torch"), run("auto")


def _assert_same(want: tuple, got: tuple) -> None:
    for a, b in zip(want, got):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("B, C, uncoded, last, sink, S, D, H, G", [
    (1, 40, 1, 5, 1, 16, 32, 2, 2), (2, 64, 1, 16, 1, 16, 64, 4, 2), (1, 50, 0, None, 2, 16, 40, 2, 3),
    (2, 37, 3, 9, 0, 32, 72, 1, 4), (1, 300, 1, 1, 4, 32, 64, 4, 2), (1, 100, 1, 7, 1, 64, 128, 2, 1),
    (1, 90, 1, 3, 1, 8, 13, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_selects_what_the_torch_path_selects(monkeypatch: pytest.MonkeyPatch, B: int, C: int,
                                                        uncoded: int, last: int | None, sink: int, S: int, D: int,
                                                        H: int, G: int, dtype: torch.dtype) -> None:
    """Random inputs over edge sizes: odd head dims (13, 40, 72: P not a multiple of the vector width),
    no open chunk, several uncoded chunks, no sinks, topk by partial sort (C = 300) and by nth_element."""
    for seed in range(4):
        q, kmin, kmax, sketch, _ = _case(seed, B, C, uncoded, S, D, H, G, last, dtype)
        budget = S * (4 + seed) + seed
        candidates = sketch_candidates(budget - 2 * S, S, 3)
        assert kernel_applies(q, kmin, kmax, sketch) and 0 < candidates < sketch.coded
        want, got = _both(monkeypatch, q, kmin, kmax, sketch, candidates, budget, sink, S)
        _assert_same(want, got)
        assert int(got[2].min()) >= 1


def test_ties_break_as_on_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks repeated four times (equal ranks, equal sketch scores): the kernel selects what the torch
    selection (``select_chunks``) selects over the kernel's own scores, ties by id; and what the whole torch
    path selects wherever that path's bounds of the repeats are equal to the last bit. (They are not
    everywhere: the torch path's sketch bound is a BLAS product, and Intel's MKL can round a row by its
    position in the GEMM's blocking, so repeated chunks then differ in the last bit and no longer tie.)"""
    q, kmin, kmax, sketch, k = _case(5, 2, 12, 1, 16, 32, 2, 2, 4)
    rep = lambda t: t.repeat_interleave(4, dim=2)                      # noqa: E731 - (B, H, 48, ...)
    k = rep(k)
    kmin, kmax = rep(kmin), rep(kmax)
    sizes = torch.full((48,), 16, dtype=torch.int32)
    sizes[-1] = 4
    sketch = KeySketch(encode_keys(k, kmin, kmax), sizes, 47, key_ellipsoids(k, torch.float32))
    for budget in (16 * 6, 16 * 9 + 3, 16 * 14):
        for candidates in (5, 8, 13, 30):
            scores = torch.empty(2, 2, 48)
            got = tuple(select_two_stage_cpu(q, kmin, kmax, sketch, candidates, budget_tokens=budget, sink_chunks=1,
                                             recent_tokens=16, scores=scores))
            live = scores[..., :44].isfinite()                         # the repeats (not the open chunk's group)
            tied = scores[..., :44].view(2, 2, 11, 4)
            assert torch.equal(tied, tied[..., :1].expand_as(tied)) or not live.all()
            _assert_same(tuple(select_chunks(scores, sizes, budget_tokens=budget, sink_chunks=1, recent_tokens=16,
                                             backend="torch")), got)
            ref = chunk_scores(q, kmin, kmax, sketch=sketch, candidates=candidates, backend="torch")[..., :44]
            ref_live = ref.view(2, 2, 11, 4)
            if torch.equal(ref_live.isfinite(), ref_live[..., :1].isfinite().expand_as(ref_live)) and \
                    torch.equal(ref_live.nan_to_num(), ref_live[..., :1].nan_to_num().expand_as(ref_live)):
                want, got2 = _both(monkeypatch, q, kmin, kmax, sketch, candidates, budget, 1, 16)
                _assert_same(want, got2)


def test_when_every_candidate_fits_the_pruned_chunks_come_next_by_id(monkeypatch: pytest.MonkeyPatch) -> None:
    q, kmin, kmax, sketch, _ = _case(7, 2, 40, 1, 16, 32, 2, 2, 3)
    want, got = _both(monkeypatch, q, kmin, kmax, sketch, 4, 16 * 20, 1, 16)
    _assert_same(want, got)
    assert int(got[2].min()) > 4 + 2


def test_mixed_dtypes_and_strided_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 query on an fp32 cache, fp16 both, and abstracts / codes sliced from larger buffers (the cache's)."""
    for q_dtype, dtype in ((torch.bfloat16, torch.float32), (torch.float16, torch.float16)):
        q, kmin, kmax, sketch, _ = _case(2, 2, 70, 1, 16, 64, 2, 2, 6, dtype, q_dtype)
        want, got = _both(monkeypatch, q, kmin, kmax, sketch, 20, 16 * 8, 1, 16)
        _assert_same(want, got)
    q, kmin, kmax, sketch, _ = _case(3, 1, 60, 1, 16, 64, 2, 2, 6)
    big = lambda t: torch.cat([t, torch.zeros_like(t)], dim=2)[:, :, :60]   # noqa: E731 - chunk stride of 120
    ell = sketch.ellipsoid
    sliced = sketch._replace(codes=big(sketch.codes), ellipsoid=type(ell)(big(ell.centre), big(ell.axes2)))
    q4 = torch.cat([q.unsqueeze(2), q.unsqueeze(2)], 2)[:, :, 0]          # (B, Hq, D) with a head stride of 2D
    want, got = _both(monkeypatch, q4, big(kmin), big(kmax), sliced, 20, 16 * 8, 1, 16)
    _assert_same(want, got)


def test_its_scores_are_chunk_scores_and_upper_bounds_of_the_keys() -> None:
    """The kernel's scores: what chunk_scores gives (the candidates' sketch bound, the open chunk's min/max
    bound, -inf for the pruned), up to fp32 rounding, and never below a chunk's true max logit."""
    for dtype in (torch.float32, torch.bfloat16):
        q, kmin, kmax, sketch, k = _case(11, 2, 64, 1, 16, 64, 2, 2, 9, dtype)
        scores = torch.empty(2, 2, 64)
        select_two_stage_cpu(q, kmin, kmax, sketch, 20, budget_tokens=16 * 8, sink_chunks=1, recent_tokens=16,
                             scores=scores)
        want = chunk_scores(q, kmin, kmax, sketch=sketch, candidates=20, backend="torch")
        assert torch.equal(torch.isinf(scores), torch.isinf(want))
        live = torch.isfinite(want)
        assert int(live.sum(-1).min()) == 21                                       # 20 candidates + the open chunk
        assert torch.allclose(scores[live], want[live], rtol=1e-5, atol=1e-4)
        keys = k.clone()
        keys[:, :, -1, 9:] = float("-inf")                                         # the open chunk holds 9
        logits = torch.einsum("bhgd,bhcsd->bhgcs", q.float().view(2, 2, 2, 64), keys.nan_to_num(neginf=0.0))
        logits = logits.masked_fill(torch.isinf(keys[..., 0]).unsqueeze(2), float("-inf"))
        true = logits.amax(-1).amax(2)                                             # (B, H, C)
        assert bool((scores[live] >= true[live]).all())


def test_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    q, kmin, kmax, sketch, _ = _case(0, 1, 20, 1, 16, 32, 2, 2, 4)
    monkeypatch.setenv(CPU_ESTIMATOR_VAR, "torch")
    assert not kernel_applies(q, kmin, kmax, sketch)
    monkeypatch.setenv(CPU_ESTIMATOR_VAR, "auto")
    assert kernel_applies(q, kmin, kmax, sketch)
    assert not kernel_applies(q, kmin, kmax, sketch._replace(ellipsoid=None))
    assert not kernel_applies(q, kmin.double(), kmax.double(), sketch)
    monkeypatch.setenv(CPU_ESTIMATOR_VAR, "fast")
    with pytest.raises(ArgumentError, match=CPU_ESTIMATOR_VAR):
        pick_cpu_estimator()


def test_a_failed_build_warns_once_and_the_torch_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor import codecache

    import tierkv.kernels.estimate_cpu as mod

    def broken(*args: object, **kw: object) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(codecache.CppPythonBindingsCodeCache, "load_pybinding", broken)
    mod.estimator_kernel.cache_clear()
    try:
        q, kmin, kmax, sketch, _ = _case(0, 1, 30, 1, 16, 32, 2, 2, 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not kernel_applies(q, kmin, kmax, sketch)
            assert not kernel_applies(q, kmin, kmax, sketch)
            sel = select_two_stage(q, kmin, kmax, sketch, 10, budget_tokens=16 * 5, sink_chunks=1, recent_tokens=16)
        assert len([c for c in caught if f"{CPU_ESTIMATOR_VAR}=torch" in str(c.message)]) == 1
        assert int(sel.counts.min()) >= 2
    finally:
        monkeypatch.undo()
        mod.estimator_kernel.cache_clear()


def test_a_sparse_cpu_cache_builds_the_kernel_when_it_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare_estimator (called by TieredKVCache when it keeps codes): the build belongs to loading, not
    to the first decode step; never under TIERKV_CPU_ESTIMATOR=torch."""
    import tierkv.kernels.estimate as est

    calls: list[int] = []
    monkeypatch.setattr(est, "estimator_kernel", lambda: calls.append(1))
    monkeypatch.setenv(CPU_ESTIMATOR_VAR, "torch")
    est.prepare_estimator(torch.device("cpu"))
    assert calls == []
    monkeypatch.setenv(CPU_ESTIMATOR_VAR, "auto")
    est.prepare_estimator(torch.device("cpu"))
    assert calls == [1]
