"""A Hugging Face config.json dict built from a GGUF file's metadata, for ``ModelConfig.from_dict``.

Why this module exists: a GGUF file carries the model's shape as ``{arch}.*`` metadata keys
instead of a config.json. Translating them into the HF dict (and nothing else) keeps one parser
of model shapes, ``ModelConfig.from_dict``, validating both kinds of checkpoint; the store then
records that dict in its manifest like a converted HF checkpoint's config.json. llama.cpp stores
Llama 3 RoPE scaling as a ``rope_freqs.weight`` tensor of per-frequency factors rather than
parameters: ``fit_llama3_rope`` finds the parameters that give exactly those factors, or the file
is refused.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from tierkv.errors import TierkvError

# GGUF ``general.architecture`` -> HF architecture (llama files with a sliding window: Mistral)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_FREQS_TENSOR = "rope_freqs.weight"
# Llama 3's published factors (low, high) and original contexts, tried when fitting rope_freqs
_LLAMA3_FREQ_FACTORS = ((1.0, 4.0),)
_LLAMA3_CONTEXTS = (8192, 4096, 2048, 16384, 32768, 131072)


class GGUFMetadataError(TierkvError):
    """GGUF metadata that tierkv cannot turn into a model config (the caller names the file)."""


def hf_config(meta: Callable[[str], Any], arch: str, vocab_size: int, tied: bool,
              rope_freqs: np.ndarray | None, file_dtype: str) -> dict[str, Any]:
    """The HF config dict of a GGUF model.

    ``meta(key)`` returns a metadata value or None when absent; ``arch`` the GGUF architecture (one
    of ``ARCHITECTURES``); ``vocab_size`` the embedding's rows; ``tied``: no ``output.weight``;
    ``rope_freqs`` the ``rope_freqs.weight`` values when present; ``file_dtype`` the compute dtype
    the file's float tensors suggest. GGUFMetadataError names a missing or unusable key.
    """
    def need(key: str) -> Any:
        value = meta(f"{arch}.{key}")
        if value is None:
            raise GGUFMetadataError(f"the required metadata key {arch}.{key} is missing")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(meta(f"{arch}.attention.key_length") or hidden // heads)
    rope_dims = meta(f"{arch}.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise GGUFMetadataError(f"{arch}.rope.dimension_count={rope_dims} rotates part of each head (head_dim "
                                f"{head_dim}); tierkv supports full-head rotary embeddings only")
    value_len = meta(f"{arch}.attention.value_length")
    if value_len is not None and int(value_len) != head_dim:
        raise GGUFMetadataError(f"{arch}.attention.value_length={value_len} differs from the key length {head_dim}; "
                                "tierkv needs equal key and value head sizes")
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch,
        "vocab_size": vocab_size, "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta(f"{arch}.rope.freq_base") or 10000.0),
        "max_position_embeddings": int(need("context_length")),
        "tie_word_embeddings": tied, "hidden_act": "silu", "dtype": file_dtype,
    }
    for key in ("bos_token_id", "eos_token_id"):
        if meta(f"tokenizer.ggml.{key}") is not None:
            config[key] = int(meta(f"tokenizer.ggml.{key}"))
    _sliding_window(config, meta, arch)
    scaling = _rope_scaling(meta, arch, config, rope_freqs)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _sliding_window(config: dict[str, Any], meta: Callable[[str], Any], arch: str) -> None:
    """A llama file with ``attention.sliding_window`` is a Mistral-style model (every layer windowed)."""
    window = meta(f"{arch}.attention.sliding_window")
    if window is None or int(window) == 0:
        return
    if arch != "llama":
        raise GGUFMetadataError(f"{arch}.attention.sliding_window={window} is set, but tierkv applies sliding "
                                f"windows to llama-architecture (Mistral-style) GGUF files only")
    config["architectures"], config["model_type"] = ["MistralForCausalLM"], "mistral"
    config["sliding_window"] = int(window)


def _rope_scaling(meta: Callable[[str], Any], arch: str, config: dict[str, Any],
                  rope_freqs: np.ndarray | None) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``{arch}.rope.scaling.*`` (none, linear) or a llama3 ``rope_freqs`` tensor."""
    kind = str(meta(f"{arch}.rope.scaling.type") or "none")
    factor = meta(f"{arch}.rope.scaling.factor")
    if rope_freqs is not None:
        if kind not in ("none", "linear") or (kind == "linear" and factor not in (None, 1.0)):
            raise GGUFMetadataError(f"the file has both {arch}.rope.scaling.type={kind} and a {ROPE_FREQS_TENSOR} "
                                    "tensor; tierkv cannot combine them")
        return fit_llama3_rope(rope_freqs, config["rope_theta"], config["head_dim"])
    if kind == "none" or (kind == "linear" and float(factor or 1.0) == 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise GGUFMetadataError(f"{arch}.rope.scaling.type={kind!r} is not supported; tierkv runs GGUF files "
                            "with no RoPE scaling, linear scaling or Llama 3 rope_freqs")


def llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float,
                   original: int) -> np.ndarray:
    """The per-frequency factors llama.cpp's convert_hf_to_gguf.py writes as ``rope_freqs.weight``
    (head_dim / 2 values) for Llama 3 RoPE scaling with these parameters."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def fit_llama3_rope(rope_freqs: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """The HF llama3 ``rope_scaling`` whose factors equal ``rope_freqs`` (to float32 rounding); the
    factor is their largest value, the rest is searched among Llama 3's published settings.
    GGUFMetadataError when none reproduces the tensor."""
    values = np.asarray(rope_freqs, dtype=np.float32).reshape(-1)
    if values.size != head_dim // 2:
        raise GGUFMetadataError(f"{ROPE_FREQS_TENSOR} has {values.size} values, but head_dim {head_dim} needs "
                                f"{head_dim // 2}")
    factor = float(values.max())
    if np.all(values == 1.0):
        return {"rope_type": "default"}
    for low, high in _LLAMA3_FREQ_FACTORS:
        for original in _LLAMA3_CONTEXTS:
            if np.allclose(llama3_factors(theta, head_dim, factor, low, high, original), values, rtol=1e-5, atol=0):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                        "original_max_position_embeddings": original}
    raise GGUFMetadataError(f"the {ROPE_FREQS_TENSOR} tensor does not match Llama 3 RoPE scaling (factor {factor:g}, "
                            "low/high frequency factors 1/4, original contexts 2K-128K); tierkv cannot run "
                            "these per-frequency factors")


__all__ = ["ARCHITECTURES", "GGUFMetadataError", "ROPE_FREQS_TENSOR", "fit_llama3_rope", "hf_config",
           "llama3_factors"]
