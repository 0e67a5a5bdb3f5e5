"""GGUFCheckpoint: config from metadata, tensors under HF names (Llama Q/K un-permuted), discovery of
files, directories and split sets, and the facts ``tierkv info`` shows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gguf_util as gu
from tierkv.io.gguf import GGUFCheckpoint, gguf_parts, is_gguf_source
from tierkv.io.gguf_config import fit_llama3_rope, llama3_factors

ARCHES = ("llama", "qwen2", "qwen3")


def _model(arch: str, **kw):
    # HF's GGUF loader gives Qwen3 its default head_dim of 128 whatever the file says: match it
    return gu.tiny_hf_model(arch, **({"head_dim": 128} if arch == "qwen3" else {}), **kw)


@pytest.mark.parametrize("arch", ARCHES)
def test_config_and_f32_tensors_match_the_hf_model(arch, tmp_path):
    model = _model(arch)
    ckpt = GGUFCheckpoint(gu.write_gguf(model, tmp_path / f"{arch}.gguf", "F32"))
    cfg, hf = ckpt.config, model.config
    assert cfg.architecture == type(model).__name__
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.vocab_size) == (hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size, hf.num_attention_heads,
                                hf.num_key_value_heads, hf.head_dim, hf.vocab_size)
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps) and cfg.rope.theta == pytest.approx(10000.0)
    assert cfg.max_position_embeddings == 256 and not cfg.tie_word_embeddings and cfg.dtype == "float32"
    assert cfg.qkv_bias == (arch == "qwen2") and cfg.qk_norm == (arch == "qwen3")
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (0, (1,))
    for name, want in model.state_dict().items():
        assert torch.equal(ckpt.tensor(name), want), name          # llama's q/k rows back in HF order


def test_f16_bf16_and_tied_files(tmp_path):
    model = gu.tiny_hf_model("qwen2", tied=True)
    ckpt = GGUFCheckpoint(gu.write_gguf(model, tmp_path / "m.gguf", "F16"))
    assert ckpt.config.tie_word_embeddings and "lm_head.weight" not in ckpt.config.global_tensor_shapes()
    assert ckpt.config.dtype == "float16"
    w = ckpt.tensor("model.layers.1.mlp.up_proj.weight")
    assert w.dtype == torch.float16
    assert torch.equal(w, model.state_dict()["model.layers.1.mlp.up_proj.weight"].half())
    assert ckpt.tensor("model.norm.weight").dtype == torch.float32          # norms stay F32 as llama.cpp writes them
    assert ckpt.type_counts() == {"F16": 15, "F32": 11}


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_tensors_dequantize_like_gguf(kind, tmp_path):
    model = gu.tiny_hf_model("llama")
    path = gu.write_gguf(model, tmp_path / "m.gguf", kind)
    ckpt = GGUFCheckpoint(path)
    assert ckpt.config.dtype == "bfloat16"
    q = ckpt.tensor("model.layers.0.self_attn.q_proj.weight")
    ref = gu.dequantized(path, "blk.0.attn_q.weight")                       # file row order
    order = ckpt.row_order("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(q, torch.from_numpy(ref)[order])
    assert not torch.equal(order, torch.arange(len(order)))
    assert ckpt.row_order("model.layers.0.self_attn.v_proj.weight") is None
    assert torch.equal(ckpt.tensor("model.layers.0.mlp.down_proj.weight"),
                       torch.from_numpy(gu.dequantized(path, "blk.0.ffn_down.weight")))
    sq = ckpt.source_quants()
    assert set(sq) == {f"model.layers.{j}.{n}.weight" for j in range(2) for n in
                       ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} | {"lm_head.weight", "model.embed_tokens.weight"}
    assert set(sq.values()) == {("int8" if kind == "Q8_0" else "int4", 32)}
    codes, qparams = ckpt.quantized_codes("model.layers.0.self_attn.k_proj.weight")
    assert codes.shape == (32, 64) and codes.dtype == torch.uint8 and qparams.shape == (2, 32, 2)
    rebuilt = (codes.view(32, 2, 32).float() * qparams.transpose(0, 1)[..., :1].float()
               + qparams.transpose(0, 1)[..., 1:].float()).view(32, 64)
    assert torch.equal(rebuilt, ckpt.tensor("model.layers.0.self_attn.k_proj.weight"))   # bit-exact, rows in HF order


def test_discovery_dir_file_and_split_sets(tmp_path):
    model = gu.tiny_hf_model("llama")
    (tmp_path / "single").mkdir()
    one = gu.write_gguf(model, tmp_path / "single" / "m.gguf", "F32")
    assert is_gguf_source(one) and is_gguf_source(one.parent) and not is_gguf_source(tmp_path)
    assert gguf_parts(one.parent) == [one]
    (tmp_path / "split").mkdir()
    first = gu.write_gguf(model, tmp_path / "split" / "m.gguf", "F16", split_max_tensors=8)
    parts = gguf_parts(first)
    assert [p.name for p in parts] == [f"m-{i:05d}-of-00003.gguf" for i in range(1, 4)]   # 21 tensors, 8 a part
    assert gguf_parts(parts[2]) == parts and gguf_parts(first.parent) == parts
    ckpt = GGUFCheckpoint(parts[1])
    assert ckpt.files() == parts and ckpt.source == parts[0].resolve()
    assert torch.equal(ckpt.tensor("lm_head.weight"), model.state_dict()["lm_head.weight"].half())


def test_llama3_rope_freqs_are_fitted_to_the_hf_parameters():
    factors = llama3_factors(500000.0, 64, 8.0, 1.0, 4.0, 8192)
    assert fit_llama3_rope(factors, 500000.0, 64) == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    with pytest.raises(ValueError, match="does not match Llama 3"):
        fit_llama3_rope(np.linspace(1, 8, 32), 500000.0, 64)


def test_llama3_rope_freqs_tensor_in_a_file(tmp_path):
    model = gu.tiny_hf_model("llama")
    path = tmp_path / "m.gguf"
    factors = llama3_factors(10000.0, 16, 4.0, 1.0, 4.0, 2048)
    gu.write_gguf(model, path, "F32", extra_tensors={"rope_freqs.weight": factors})
    rope = GGUFCheckpoint(path).config.rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("llama3", 4.0, 2048)
