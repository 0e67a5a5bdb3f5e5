"""Resident engine vs HF transformers: prefill logits and greedy tokens for every supported option."""

from __future__ import annotations

import pytest
import torch

import tierkv

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

CASES = {
    "llama-gqa2": ("llama", {}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-gqa4": ("llama", {"num_key_value_heads": 1}),
    "llama-headdim": ("llama", {"head_dim": 24}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-tied": ("llama", {"tie_word_embeddings": True, "vocab_size": 97}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "dynamic-rope": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0},
                               "max_position_embeddings": 24}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {"vocab_size": 151}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2-window-layer1": ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "qwen3-gqa4-tied": ("qwen3", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_tokens_match_transformers(make_checkpoint, case: str) -> None:
    arch, overrides = CASES[case]
    model, path = make_checkpoint(arch, **overrides)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = tierkv.load(path, dtype="float32", device="cpu")

    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    ours = engine.logits(ids)
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() < 1e-4 * scale

    expected = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    result = engine.generate(ids, max_new_tokens=32)
    assert result.token_ids == expected
    engine.close()


def test_batch_of_equal_prompts_matches_single_runs(make_checkpoint) -> None:
    _, path = make_checkpoint("llama")
    engine = tierkv.load(path, dtype="float32")
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    batch = engine.generate(prompts, max_new_tokens=12)
    single = [engine.generate(p, max_new_tokens=12).token_ids for p in prompts]
    assert [r.token_ids for r in batch] == single
    assert batch[0].stats.batch_size == 3


def test_bfloat16_compute_runs_and_mostly_agrees(make_checkpoint) -> None:
    model, path = make_checkpoint("llama", dtype=torch.bfloat16)
    engine = tierkv.load(path)  # checkpoint dtype: bfloat16
    assert engine.dtype == torch.bfloat16
    ids = list(range(3, 19))
    with torch.no_grad():
        ref = model.to(torch.bfloat16)(torch.tensor([ids])).logits[0].float()
    ours = engine.logits(ids)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("mistral", {"sliding_window": 5})])
def test_chunked_prefill_gives_the_same_tokens(make_checkpoint, arch, overrides) -> None:
    model, path = make_checkpoint(arch, **overrides)
    ids = list(range(3, 40))
    whole = tierkv.Engine(path, tierkv.Policy(dtype="float32")).generate(ids, max_new_tokens=10)
    pieces = tierkv.Engine(path, tierkv.Policy(dtype="float32", prefill_chunk_tokens=7)).generate(ids, max_new_tokens=10)
    expected = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids):].tolist()
    assert pieces.token_ids == whole.token_ids == expected
