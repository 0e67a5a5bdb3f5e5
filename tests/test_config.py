"""ModelConfig parsing (both transformers spellings), sizes, budgets, and clear errors for bad configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import ARCH_CLASSES, TINY, build_hf_model
from tierkv.config import (SUPPORTED_ARCHITECTURES, Budget, ConfigError, ModelConfig, Policy, format_size,
                           parse_size)

torch.set_num_threads(1)


# -- sizes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("640KiB", 640 * 1024), ("512MiB", 512 * 2**20), ("6GiB", 6 * 2**30), ("6GB", 6 * 10**9),
    ("1234", 1234), (1234, 1234), ("1.5GiB", 3 * 2**29), (" 2 mb ", 2 * 10**6), ("0", 0), ("1TiB", 2**40),
    ("10k", 10_000), ("7b", 7), (".5KiB", 512),
])
def test_parse_size(text, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "5XB", "-1GiB", "1e9", "6 G iB", -5])
def test_parse_size_rejects_with_example_units(bad) -> None:
    with pytest.raises(ValueError, match="GiB"):
        parse_size(bad)


def test_format_size() -> None:
    assert format_size(3 * 2**30) == "3.00 GiB"
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.50 KiB"
    assert format_size(5 * 2**40) == "5.00 TiB"


def test_budget_and_policy() -> None:
    b = Budget.parse(device_mem="6GiB", host_mem=1024, offload_dir="/tmp/x")
    assert (b.device_mem_bytes, b.host_mem_bytes, b.offload_dir) == (6 * 2**30, 1024, Path("/tmp/x"))
    assert Budget.parse() == Budget(None, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.device_mem_bytes = 1  # type: ignore[misc]
    assert Policy().dtype is None and Policy(device="cpu").device == "cpu"


# -- parsing HF configs ----------------------------------------------------------------------------
def hf_config_dict(arch: str, **overrides) -> dict:
    import transformers

    cfg = getattr(transformers, ARCH_CLASSES[arch][0])(**{**TINY, **overrides})
    d = cfg.to_dict()
    d["architectures"] = [ARCH_CLASSES[arch][1]]
    return d


def test_llama_fields() -> None:
    cfg = ModelConfig.from_dict(hf_config_dict("llama", head_dim=24, rms_norm_eps=1e-5))
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (64, 2, 4, 2, 24)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.max_position_embeddings) == (211, 96, 256)
    assert (cfg.q_size, cfg.kv_size) == (96, 48)
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope.theta == 10000.0 and cfg.rope.rope_type == "default"
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.qk_norm) == (False, False, False, False)
    assert cfg.sliding_window_tokens == (None, None)
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)


def test_qwen2_qwen3_mistral_specifics() -> None:
    q2 = ModelConfig.from_dict(hf_config_dict("qwen2"))
    assert (q2.qkv_bias, q2.o_bias, q2.qk_norm) == (True, False, False)
    q3 = ModelConfig.from_dict(hf_config_dict("qwen3", head_dim=32))
    assert (q3.qk_norm, q3.head_dim) == (True, 32)
    mistral = ModelConfig.from_dict(hf_config_dict("mistral", sliding_window=8))
    assert mistral.sliding_window_tokens == (8, 8)
    q2_window = dict(hf_config_dict("qwen2", num_hidden_layers=4), use_sliding_window=True, sliding_window=16,
                     max_window_layers=2, layer_types=None)
    assert ModelConfig.from_dict(q2_window).sliding_window_tokens == (None, None, 16, 16)


def test_rope_both_spellings() -> None:
    """transformers 4 wrote rope_theta + rope_scaling; transformers 5 writes rope_parameters."""
    v4 = {"architectures": ["LlamaForCausalLM"], **TINY, "num_hidden_layers": 2, "num_attention_heads": 4,
          "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    v5 = {"architectures": ["LlamaForCausalLM"], **TINY,
          "rope_parameters": {"rope_theta": 500000.0, "rope_type": "linear", "factor": 2.0}}
    a, b = ModelConfig.from_dict(v4), ModelConfig.from_dict(v5)
    assert a.rope == b.rope
    assert (a.rope.theta, a.rope.rope_type, a.rope.factor) == (500000.0, "linear", 2.0)
    llama3 = ModelConfig.from_dict({**v5, "rope_parameters": {"rope_type": "llama3", "factor": 8.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
    assert llama3.rope.original_max_position_embeddings == TINY["max_position_embeddings"]


def test_architecture_from_model_type_when_architectures_missing() -> None:
    raw = hf_config_dict("qwen2")
    raw.pop("architectures")
    assert ModelConfig.from_dict(raw).architecture == "Qwen2ForCausalLM"


def test_eos_list_and_dtype() -> None:
    raw = dict(hf_config_dict("llama"), eos_token_id=[2, 7], dtype="bfloat16")
    cfg = ModelConfig.from_dict(raw)
    assert cfg.eos_token_ids == (2, 7) and cfg.dtype == "bfloat16"
    raw.pop("dtype")
    assert ModelConfig.from_dict(dict(raw, torch_dtype="float16")).dtype == "float16"


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 24}),
    ("mistral", {"num_key_value_heads": 1}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {"head_dim": 32}),
])
def test_param_count_and_tensor_shapes_match_transformers(arch: str, overrides: dict) -> None:
    model = build_hf_model(arch, **overrides)
    cfg = ModelConfig.from_dict({**model.config.to_dict(), "architectures": [ARCH_CLASSES[arch][1]]})
    assert cfg.param_count() == model.num_parameters()           # counts a tied head once
    state = {k: tuple(v.shape) for k, v in model.state_dict().items() if "rotary" not in k}
    ours = dict(cfg.global_tensor_shapes())
    for j in range(cfg.num_layers):
        ours.update({f"model.layers.{j}.{k}": s for k, s in cfg.layer_tensor_shapes().items()})
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)                          # the same tensor as the embedding
    assert ours == state
    layer0 = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.0."))
    assert cfg.layer_param_count() == layer0


# -- errors ----------------------------------------------------------------------------------------
def test_unsupported_architecture_lists_supported_ones() -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, source="x/config.json")
    msg = str(info.value)
    assert "x/config.json" in msg and "GPT2LMHeadModel" in msg
    assert all(a in msg for a in SUPPORTED_ARCHITECTURES)


def test_missing_field_is_named() -> None:
    raw = hf_config_dict("llama")
    raw.pop("intermediate_size")
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("overrides, field", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
])
def test_unsupported_options_are_named(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({**hf_config_dict("llama"), **overrides})


def test_from_dir_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json not found"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{ nope", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict("llama")), encoding="utf-8")
    assert ModelConfig.from_dir(tmp_path).hidden_size == 64


def test_model_config_is_frozen() -> None:
    cfg = ModelConfig.from_dict(hf_config_dict("llama"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 1  # type: ignore[misc]
