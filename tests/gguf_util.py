"""Test helper: tiny random HF Llama/Qwen2/Qwen3 models written as GGUF files the way llama.cpp's
convert_hf_to_gguf.py writes them (tensor names, metadata keys, Llama's Q/K row permutation), in
F32, F16, BF16 or a quantized type via ``gguf.quants.quantize``.

Why this module exists: the GGUF tests need real files built at test time, and HF transformers
loading the same file (``from_pretrained(dir, gguf_file=name)``) is their oracle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

gguf = __import__("pytest").importorskip("gguf")   # noqa: the tests skip without the gguf extra

from gguf_tok_util import add_tokenizer  # noqa: E402  (ggtok's: tokenizer keys as llama.cpp writes them)

ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
DEMO_DIR = Path(__file__).resolve().parents[1] / "tierkv" / "demo_model"   # its byte-level BPE tokenizer
VOCAB = 4096                # the demo tokenizer's; bos 0, eos 1


def tiny_hf_model(arch: str = "llama", seed: int = 0, tied: bool = False, **overrides: Any) -> torch.nn.Module:
    """A random HF causal LM of ``arch`` small enough to run in milliseconds (hidden 64, 2 layers, GQA 4/2)."""
    import transformers
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[arch]
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = cls[1](cls[0](**fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))      # not all ones: a wrong norm mapping shows
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of q/k rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: torch.nn.Module, path: Path, weight_type: str = "F32", embed_type: str | None = None,
               head_type: str | None = None, tokenizer: bool = True, skip_keys: tuple[str, ...] = (),
               arch_name: str | None = None, extra: dict[str, Any] | None = None, split_max_tensors: int = 0,
               extra_tensors: dict[str, np.ndarray] | None = None, types: dict[str, str] | None = None) -> Path:
    """Write ``model`` as a GGUF file: 2-D weights in ``weight_type`` (embedding ``embed_type``, head
    ``head_type``: default the same), norms and biases F32, metadata as llama.cpp writes it.
    ``skip_keys`` leaves metadata keys out (bad-input tests); ``arch_name`` overrides general.architecture;
    ``types`` sets the type of single tensors by HF name (llama-quantize's mixes: Q6_K
    ffn_down, an F16 fallback for a width no block divides); ``extra_tensors`` are written as they
    are (F32 for float32 arrays, e.g. rope_freqs.weight);
    ``split_max_tensors`` writes a split set ``STEM-0000i-of-0000N.gguf`` (returns its first part)."""
    cfg = model.config
    arch = cfg.model_type
    writer = gguf.GGUFWriter(str(path), arch_name or gguf.MODEL_ARCH_NAMES[ARCH[arch]],
                             split_max_tensors=split_max_tensors)
    meta = _metadata(cfg, arch)
    meta.update(extra or {})
    for key, (kind, value) in meta.items():
        if key not in skip_keys:
            getattr(writer, f"add_{kind}")(key, value)
    if tokenizer:
        _tokenizer(writer)
    names = gguf.get_tensor_name_map(ARCH[arch], cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = t.float().numpy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = llama_permute(w, cfg.num_attention_heads, cfg.num_attention_heads)
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = llama_permute(w, cfg.num_attention_heads, cfg.num_key_value_heads)
        kind = weight_type
        if hf_name == "model.embed_tokens.weight":
            kind = embed_type or weight_type
        elif hf_name == "lm_head.weight":
            kind = head_type or weight_type
        kind = (types or {}).get(hf_name, kind)
        if w.ndim == 1:
            kind = "F32"
        _add_tensor(writer, names.get_name(hf_name, try_suffixes=(".weight", ".bias")), w, kind)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return sorted(path.parent.glob(f"{path.stem}-00001-of-*.gguf"))[0]
    return path


def _metadata(cfg: Any, arch: str) -> dict[str, tuple[str, Any]]:
    a = gguf.MODEL_ARCH_NAMES[ARCH[arch]]
    return {
        "general.name": ("string", f"tiny-{arch}"),
        f"{a}.context_length": ("uint32", cfg.max_position_embeddings),
        f"{a}.embedding_length": ("uint32", cfg.hidden_size),
        f"{a}.block_count": ("uint32", cfg.num_hidden_layers),
        f"{a}.feed_forward_length": ("uint32", cfg.intermediate_size),
        f"{a}.attention.head_count": ("uint32", cfg.num_attention_heads),
        f"{a}.attention.head_count_kv": ("uint32", cfg.num_key_value_heads),
        f"{a}.rope.freq_base": ("float32", float(getattr(cfg, "rope_theta", None) or 10000.0)),
        f"{a}.attention.layer_norm_rms_epsilon": ("float32", cfg.rms_norm_eps),
        f"{a}.attention.key_length": ("uint32", cfg.head_dim),
        f"{a}.attention.value_length": ("uint32", cfg.head_dim),
        f"{a}.rope.dimension_count": ("uint32", cfg.head_dim),
        f"{a}.vocab_size": ("uint32", cfg.vocab_size),
    }


def _tokenizer(writer: Any) -> None:
    """The demo model's byte-level BPE tokenizer (VOCAB tokens, GPT-2's split) as llama.cpp's convert
    writes it, like the project's llama.cpp-made files (tokenizer.ggml.pre = "gpt-2")."""
    add_tokenizer(writer, DEMO_DIR, "gpt2", pre="gpt-2")


def _add_tensor(writer: Any, name: str, w: np.ndarray, kind: str) -> None:
    qtype = gguf.GGMLQuantizationType[kind]
    if kind == "F32":
        writer.add_tensor(name, w.astype(np.float32))
    elif kind == "F16":
        writer.add_tensor(name, w.astype(np.float16))
    elif kind == "F64":                                     # a type tierkv refuses
        writer.add_tensor(name, w.astype(np.float64))
    elif kind == "Q2_K":                                    # gguf.quants cannot quantize it: random blocks
        writer.add_tensor(name, random_q2_k(w.shape), raw_dtype=qtype)
    else:
        writer.add_tensor(name, gguf.quants.quantize(w.astype(np.float32), qtype), raw_dtype=qtype)


def random_q2_k(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """(N, K/256*84) uint8 Q2_K blocks with random scales and codes and small super-block scales: a
    weight of a type tierkv keeps no int4/int8 form of (block: 16 scales, 64 code bytes, fp16 d, dmin)."""
    n, k = shape
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, k // 256, 84), dtype=np.uint8)
    blocks[..., 80:84] = np.array([0.004, 0.002], dtype=np.float16).view(np.uint8)
    return blocks.reshape(n, -1)


def dequantized(path: Path, gguf_name: str) -> np.ndarray:
    """A tensor of the file as ``gguf.quants.dequantize`` gives it (file row order), float32."""
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == gguf_name)
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def hf_from_gguf(path: Path) -> torch.nn.Module:
    """HF transformers' own model loaded from the GGUF file (its weights dequantized to fp32): the oracle."""
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             torch_dtype=torch.float32).eval()
