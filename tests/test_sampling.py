"""Sampling: greedy at temperature 0, seeded reproducibility, top-k/top-p never leave the allowed set."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tierkv
from tierkv.sampling import SamplingParams, filter_logits, sample

torch.set_num_threads(1)

finite = st.floats(-30.0, 30.0, allow_nan=False, allow_infinity=False, width=32)
logit_rows = st.lists(finite, min_size=1, max_size=40)


def allowed_top_k(row: list[float], k: int) -> set[int]:
    """Indices whose logit is at least the k-th largest (ties at the boundary are all allowed)."""
    if k == 0 or k >= len(row):
        return set(range(len(row)))
    kth = sorted(row, reverse=True)[k - 1]
    return {i for i, x in enumerate(row) if x >= kth}


def allowed_top_p(row: list[float], p: float, candidates: set[int]) -> set[int]:
    """Nucleus over ``candidates``: a token is allowed when the mass strictly above it is below p."""
    if p >= 1.0:
        return set(candidates)
    m = max(row[i] for i in candidates)
    weights = {i: math.exp(row[i] - m) for i in candidates}
    total = sum(weights.values())
    probs = {i: w / total for i, w in weights.items()}
    return {i for i in candidates if sum(q for j, q in probs.items() if q > probs[i]) < p + 1e-5}


# -- filter_logits ---------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(row=logit_rows, k=st.integers(0, 45), p=st.floats(0.01, 1.0))
def test_filter_keeps_exactly_the_allowed_set(row: list[float], k: int, p: float) -> None:
    logits = torch.tensor([row], dtype=torch.float32)
    kept = set(torch.nonzero(torch.isfinite(filter_logits(logits, k, p)[0])).flatten().tolist())
    allowed = allowed_top_p(row, p, allowed_top_k(row, k))
    assert kept, "filtering must keep at least one token"
    assert kept <= allowed
    # nothing more probable than a kept token is dropped
    for i in kept:
        assert all(j in kept for j in allowed_top_k(row, k) if row[j] > row[i])
    if k and p == 1.0:
        assert len(kept) >= min(k, len(row))


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.lists(finite, min_size=12, max_size=12), min_size=1, max_size=4),
       k=st.integers(1, 12), p=st.floats(0.05, 1.0), temperature=st.floats(0.1, 3.0),
       seed=st.integers(0, 2**31 - 1))
def test_sample_never_leaves_the_allowed_set(rows, k: int, p: float, temperature: float, seed: int) -> None:
    logits = torch.tensor(rows, dtype=torch.float32)
    params = SamplingParams(temperature=temperature, top_k=k, top_p=p)
    ids = sample(logits, params, torch.Generator().manual_seed(seed))
    assert ids.shape == (len(rows),) and ids.dtype == torch.int64
    for row, tok in zip(rows, ids.tolist()):
        scaled = [x / temperature for x in row]
        assert tok in allowed_top_p(scaled, p, allowed_top_k(scaled, k))


def test_filter_logits_batch_rows_are_independent() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    out = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(out).tolist() == [[False, False, True, True], [True, True, False, False]]
    out = filter_logits(torch.tensor([[0.0, 10.0, 0.0], [10.0, 0.0, 0.0]]), top_k=0, top_p=0.5)
    assert torch.isfinite(out).tolist() == [[False, True, False], [True, False, False]]


def test_greedy_when_temperature_is_zero() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.0, top_k=5, top_p=0.3)
    for seed in range(3):
        assert torch.equal(sample(logits, params, torch.Generator().manual_seed(seed)), logits.argmax(-1))
    assert torch.equal(sample(logits, params, None), logits.argmax(-1))


def test_same_seed_same_tokens_different_seed_differs() -> None:
    logits = torch.zeros(1, 1000)  # uniform: 64 draws collide across seeds with negligible probability
    params = SamplingParams(temperature=1.0)

    def draws(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [int(sample(logits, params, gen)) for _ in range(64)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(16, 30, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, SamplingParams(temperature=5.0, top_k=1), gen), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingParams(temperature=0.5, top_p=1e-6), gen), logits.argmax(-1))


# -- SamplingParams validation ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"max_new_tokens": 1.5}, "max_new_tokens"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": -3}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
])
def test_sampling_params_reject_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_are_greedy_and_valid() -> None:
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.stop) == (0.0, 0, 1.0, ())
    SamplingParams(max_new_tokens=0, temperature=0.0, top_k=0, top_p=1.0)


# -- through the engine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    eng = tierkv.load(tiny_llama_dir, dtype="float32", device="cpu")
    yield eng
    eng.close()


PROMPT = [5, 17, 42, 9]


def test_engine_bad_sampling_values_are_rejected(engine) -> None:
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(PROMPT, top_p=2.0)
    with pytest.raises(TypeError, match="valid options"):
        engine.generate(PROMPT, temprature=0.5)


def test_engine_seeded_sampling_is_reproducible(engine) -> None:
    def run(seed: int) -> list[int]:
        return engine.generate(PROMPT, max_new_tokens=24, temperature=2.0, seed=seed).token_ids

    assert run(3) == run(3)
    assert run(3) != run(4)
    streamed = [p.token_id for p in engine.stream(PROMPT, max_new_tokens=24, temperature=2.0, seed=3)
                if p.token_id is not None]
    assert streamed == run(3)


def test_engine_top_k_tokens_come_from_the_top_k_logits(engine) -> None:
    k = 3
    res = engine.generate(PROMPT, max_new_tokens=12, temperature=3.0, top_k=k, seed=11)
    assert len(res.token_ids) == 12
    logits = engine.logits(PROMPT + res.token_ids[:-1])[len(PROMPT) - 1:]      # (12, V): one row per step
    for row, tok in zip(logits.tolist(), res.token_ids):
        assert tok in allowed_top_k(row, k)
    assert res.token_ids != engine.generate(PROMPT, max_new_tokens=12).token_ids  # it did sample


def test_engine_top_p_tokens_come_from_the_nucleus(engine) -> None:
    p, temperature = 0.6, 1.5
    res = engine.generate(PROMPT, max_new_tokens=12, temperature=temperature, top_p=p, seed=5)
    logits = engine.logits(PROMPT + res.token_ids[:-1])[len(PROMPT) - 1:]
    for row, tok in zip(logits.tolist(), res.token_ids):
        scaled = [x / temperature for x in row]
        assert tok in allowed_top_p(scaled, p, set(range(len(row))))


def test_engine_top_k_one_equals_greedy(engine) -> None:
    greedy = engine.generate(PROMPT, max_new_tokens=16)
    assert engine.generate(PROMPT, max_new_tokens=16, temperature=4.0, top_k=1, seed=1).token_ids == greedy.token_ids
    assert engine.generate(PROMPT, max_new_tokens=16, temperature=0.0, seed=99).token_ids == greedy.token_ids
