"""Adaptive chunk sizes: the rule on numbers and the skew measure on tensors."""

from __future__ import annotations

import math

import pytest
import torch

from tierkv.pipeline.chunking import ChunkRule, attention_entropy, chunk_tokens_for_entropy


def test_rule_endpoints_steps_and_default() -> None:
    rule = ChunkRule()
    assert chunk_tokens_for_entropy(0.0) == chunk_tokens_for_entropy(0.5) == rule.min_chunk_tokens == 16
    assert chunk_tokens_for_entropy(0.9) == chunk_tokens_for_entropy(1.0) == rule.max_chunk_tokens == 256
    assert [chunk_tokens_for_entropy(x) for x in (0.6, 0.7, 0.8)] == [32, 64, 128]
    assert chunk_tokens_for_entropy(None) == chunk_tokens_for_entropy(math.nan) == rule.default_chunk_tokens


def test_rule_is_monotonic_and_powers_of_two() -> None:
    sizes = [chunk_tokens_for_entropy(i / 100) for i in range(101)]
    assert sizes == sorted(sizes)
    assert all(s & (s - 1) == 0 for s in sizes)
    custom = ChunkRule(min_chunk_tokens=8, max_chunk_tokens=64, concentrated_entropy=0.2, flat_entropy=0.4)
    assert chunk_tokens_for_entropy(0.1, custom) == 8 and chunk_tokens_for_entropy(0.5, custom) == 64


def test_rule_rejects_bad_parameters() -> None:
    with pytest.raises(AssertionError):
        ChunkRule(min_chunk_tokens=24)
    with pytest.raises(AssertionError):
        ChunkRule(concentrated_entropy=0.9, flat_entropy=0.5)


def _keys(b: int, h: int, s: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, h, s, d, generator=torch.Generator().manual_seed(seed))


def test_entropy_flat_vs_concentrated() -> None:
    b, hkv, s, d = 2, 2, 200, 16
    pos = torch.arange(s)[None].expand(b, s)
    k = _keys(b, hkv, s, d)
    flat = attention_entropy(torch.zeros(b, 4, s, d), k, pos, pos)          # q = 0: uniform attention
    assert flat == pytest.approx(1.0, abs=1e-5)
    k_peaked = k.clone()
    k_peaked[:, :, 3] = 50.0                                                 # one key dominates every query
    q = torch.ones(b, 4, s, d)
    peaked = attention_entropy(q, k_peaked, pos, pos)
    assert peaked is not None and peaked < 0.05
    assert chunk_tokens_for_entropy(flat) == 256 and chunk_tokens_for_entropy(peaked) == 16


def test_entropy_needs_enough_keys_and_honours_the_window() -> None:
    b, s, d = 1, 40, 8
    pos = torch.arange(s)[None]
    assert attention_entropy(torch.zeros(b, 2, s, d), _keys(b, 2, s, d), pos, pos) is None   # < 64 keys
    s = 300
    pos = torch.arange(s)[None]
    k = _keys(b, 2, s, d)
    assert attention_entropy(torch.zeros(b, 2, s, d), k, pos, pos, window_tokens=32) is None
    assert attention_entropy(torch.zeros(b, 2, s, d), k, pos, pos, window_tokens=100) == pytest.approx(1.0, abs=1e-5)
