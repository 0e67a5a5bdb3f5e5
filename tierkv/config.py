"""Model shape, budgets and policy as frozen dataclasses with named fields and units in the names.

Why this module exists: every other part of tierkv (model math, planner, pipeline, CLI) needs the
same facts about a checkpoint and the same user choices. Parsing them once, here, from the HF
``config.json`` (both the transformers 4 ``rope_scaling``/``rope_theta`` spelling and the
transformers 5 ``rope_parameters`` one) keeps that knowledge in one place and makes unsupported
inputs fail early with an error that says what to do.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierkv.errors import ArgumentError, TierkvError
from tierkv.quantspec import WeightQuant, check_kv_scheme

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class ConfigError(TierkvError):
    """A checkpoint's configuration cannot be used; the message names the file/field and the fix."""


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


MAX_SIZE_BYTES = 1 << 60               # 1 EiB: above any machine's memory; larger sizes are typos
PREFILL_ORDERS = ("arrival", "longest")   # Policy.prefill_order: the scheduler's order for waiting prompt pieces


def parse_size(text: str | int | float) -> int:
    """Parse a byte size such as ``640KiB``, ``512MiB``, ``6GiB``, ``6GB`` or ``1234`` into bytes.

    Raises ArgumentError (naming the value and example units) for anything that is not a finite,
    non-negative size of at most 1 EiB."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ArgumentError(f"size {text!r} is not a size; give a number with a unit such as 512MiB or 6GiB")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise ArgumentError(f"size {text} is negative or not finite; give a size such as 512MiB or 6GiB")
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ArgumentError(
                f"cannot read size {text!r}; write a number with a unit such as 640KiB, 512MiB, 6GiB or 6GB"
            )
        value = float(m.group(1)) * _SIZE_UNITS[unit]
    if value > MAX_SIZE_BYTES:
        raise ArgumentError(f"size {text!r} is larger than 1 EiB, more than any machine has; "
                            "give a size such as 512MiB or 6GiB")
    return int(value)


def format_size(n_bytes: int | float) -> str:
    """Human-readable binary size: ``format_size(3 * 2**30) == '3.00 GiB'``."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; ``rope_type`` is one of default, linear, dynamic, llama3."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder, parsed from a HF ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False          # bias on q/k/v projections (Llama attention_bias, Qwen2 always)
    o_bias: bool = False            # bias on the output projection (Llama/Qwen3 attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False           # Qwen3: RMS norm over head_dim on q and k before RoPE
    sliding_window_tokens: tuple[int | None, ...] = ()  # per layer; None = full attention
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"          # the checkpoint's dtype name ("bfloat16", "float16", "float32")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def context_limit_tokens(self) -> int:
        """Longest sequence the model supports (dynamic RoPE stretches it by its factor)."""
        if self.rope.rope_type == "dynamic":
            return int(self.max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings

    def layer_param_count(self) -> int:
        """Parameters in one decoder layer (norms and biases included)."""
        h, i = self.hidden_size, self.intermediate_size
        n = h * self.q_size + 2 * h * self.kv_size + self.q_size * h + 3 * h * i + 2 * h
        n += (self.q_size + 2 * self.kv_size) if self.qkv_bias else 0
        n += h if self.o_bias else 0
        n += (2 * i + h) if self.mlp_bias else 0
        n += 2 * self.head_dim if self.qk_norm else 0
        return n

    def param_count(self) -> int:
        """All parameters, counting a tied head once."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.hidden_size + self.num_layers * self.layer_param_count()

    def layer_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of one decoder layer, keyed by its HF name after ``model.layers.{j}.``."""
        h, i, q, kv, d = self.hidden_size, self.intermediate_size, self.q_size, self.kv_size, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
        }
        if self.qkv_bias:
            shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                           "self_attn.v_proj.bias": (kv,)})
        if self.o_bias:
            shapes["self_attn.o_proj.bias"] = (h,)
        if self.mlp_bias:
            shapes.update({"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (h,)})
        if self.qk_norm:
            shapes.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
        return shapes

    def global_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensors outside the layers, keyed by full HF name (no lm_head when embeddings are tied)."""
        shapes = {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
                  "model.norm.weight": (self.hidden_size,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from the parsed JSON; raise ConfigError naming the file and field for anything unusable
        (a missing field, a wrong type, a size that is not positive, heads that do not divide)."""
        arch = _architecture(raw, source)
        f = _Fields(raw, source)
        hidden, heads = f.int("hidden_size"), f.int("num_attention_heads")
        n_layers, kv_heads = f.int("num_hidden_layers"), f.int("num_key_value_heads", heads)
        head_dim = f.int("head_dim", None)
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads="
                                  f"{heads} and head_dim is not given; fix one of them")
            head_dim = hidden // heads
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}; fix one of them")
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim={head_dim} is odd; rotary embeddings need an even head_dim")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
        attn_bias = f.bool("attention_bias", False)
        qwen2 = arch == "Qwen2ForCausalLM"
        return cls(
            architecture=arch, vocab_size=f.int("vocab_size"), hidden_size=hidden, intermediate_size=f.int("intermediate_size"),
            num_layers=n_layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=f.float("rms_norm_eps", 1e-6),
            rope=_rope(raw, source),
            max_position_embeddings=f.int("max_position_embeddings", 2048),
            tie_word_embeddings=f.bool("tie_word_embeddings", False),
            qkv_bias=True if qwen2 else attn_bias,
            o_bias=False if qwen2 else attn_bias,
            mlp_bias=f.bool("mlp_bias", False),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window_tokens=_sliding_windows(raw, arch, n_layers, source),
            bos_token_id=next(iter(f.token_ids("bos_token_id")), None),
            eos_token_ids=f.token_ids("eos_token_id"),
            dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
        )

    @staticmethod
    def token_ids_field(raw: dict[str, Any], name: str, source: str) -> tuple[int, ...]:
        """A token-id field (one id or a list) of a JSON file such as generation_config.json; ConfigError
        naming the file and field when it holds anything else."""
        return _Fields(raw, source).token_ids(name)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        return cls.from_dict(read_json(path, what="model configuration"), source=str(path))


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object file; missing or malformed files raise ConfigError naming the path."""
    if not path.is_file():
        raise ConfigError(f"{path} not found: a {what} file is required here "
                          "(point tierkv at a Hugging Face model directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); restore the file from the original checkpoint") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} should hold a JSON object; restore the file from the original checkpoint")
    return data


_REQUIRED = object()


class _Fields:
    """Typed reads of config.json fields; every failure is a ConfigError naming the file and field.
    ``None`` (JSON null) counts as absent, as in transformers."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def _get(self, name: str, default: Any) -> Any:
        value = self.raw.get(name)
        if value is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.source}: required field {name!r} is missing; "
                                  "is this a complete Hugging Face config.json?")
            return default
        return value

    def _bad(self, name: str, value: Any, want: str) -> ConfigError:
        return ConfigError(f"{self.source}: {name}={value!r} is not {want}; fix the field "
                           "(or restore the file from the original checkpoint)")

    def int(self, name: str, default: Any = _REQUIRED, minimum: int = 1) -> Any:
        value = self._get(name, default)
        if value is default and default is not _REQUIRED:
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(name, value, f"a whole number >= {minimum}")
        return value

    def float(self, name: str, default: float, positive: bool = True) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            raise self._bad(name, value, "a finite number > 0" if positive else "a finite number")
        return float(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise self._bad(name, value, "true or false")
        return value

    def token_ids(self, name: str) -> tuple[int, ...]:
        """A token id or a list of them (absent: none); ids beyond the vocabulary are harmless (never sampled)."""
        value = self._get(name, None)
        if value is None:
            return ()
        ids = value if isinstance(value, list) else [value]
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise self._bad(name, value, "a token id >= 0 (or a list of them)")
        return tuple(ids)


def _architecture(raw: dict[str, Any], source: str) -> str:
    archs = raw.get("architectures") or []
    if not archs and raw.get("model_type") in _MODEL_TYPE_TO_ARCH:
        archs = [_MODEL_TYPE_TO_ARCH[raw["model_type"]]]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    named = ", ".join(archs) or f"model_type={raw.get('model_type')!r}"
    raise ConfigError(f"{source}: architecture {named} is not supported; tierkv runs "
                      f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def _rope(raw: dict[str, Any], source: str) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters/rope_scaling={params!r} is not a JSON object; fix the field")
    f = _Fields({"rope_theta": raw.get("rope_theta"), **params}, source)
    theta = f.float("rope_theta", 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(_ROPE_TYPES)}")
    orig = f.int("original_max_position_embeddings", None)
    if rope_type in ("dynamic", "llama3") and orig is None:
        orig = _Fields(raw, source).int("max_position_embeddings", None)
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=f.float("factor", 1.0),
        low_freq_factor=f.float("low_freq_factor", 1.0),
        high_freq_factor=f.float("high_freq_factor", 4.0),
        original_max_position_embeddings=orig,
    )


def _sliding_windows(raw: dict[str, Any], arch: str, n_layers: int, source: str) -> tuple[int | None, ...]:
    """Per-layer sliding window (None = full attention), following each architecture's rules."""
    f = _Fields(raw, source)
    window = f.int("sliding_window", None)
    layer_types = raw.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != n_layers):
        raise ConfigError(f"{source}: layer_types should list one type per layer ({n_layers}); fix the field")
    if arch == "MistralForCausalLM":
        return tuple([window] * n_layers)
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        if not f.bool("use_sliding_window", False) or not window:
            return tuple([None] * n_layers)
        if layer_types:
            return tuple(window if t == "sliding_attention" else None for t in layer_types)
        first_full = f.int("max_window_layers", n_layers, minimum=0)
        return tuple(window if i >= first_full else None for i in range(n_layers))
    if layer_types and window:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return tuple([None] * n_layers)


@dataclass(frozen=True)
class Budget:
    """Memory budgets in bytes; ``None`` means auto-detect. Disk has no byte budget: the rest goes there."""

    device_mem_bytes: int | None = None
    host_mem_bytes: int | None = None
    offload_dir: Path | None = None

    @classmethod
    def parse(cls, device_mem: str | int | None = None, host_mem: str | int | None = None,
              offload_dir: str | Path | None = None) -> "Budget":
        return cls(
            device_mem_bytes=None if device_mem is None else parse_size(device_mem),
            host_mem_bytes=None if host_mem is None else parse_size(host_mem),
            offload_dir=None if offload_dir is None else _offload_path(offload_dir),
        )


def _offload_path(offload_dir: str | Path) -> Path:
    """An empty offload directory would silently mean the current directory: refuse it."""
    if not isinstance(offload_dir, (str, Path)) or not str(offload_dir).strip():
        raise ArgumentError(f"offload_dir {str(offload_dir)!r} is empty; give a directory such as "
                            "/nvme/tierkv, or leave it out for the default (~/.cache/tierkv)")
    return Path(offload_dir).expanduser()


@dataclass(frozen=True)
class Policy:
    """User choices that are not budgets: compute dtype and device, prefill piece size, KV cache mode."""

    dtype: str | None = None            # compute dtype; None = the checkpoint's
    device: str | None = None           # "cpu", "cuda", "cuda:1"; None = cuda if available, else cpu
    prefill_chunk_tokens: int | None = None  # prompts are prefilled in pieces of this many tokens;
                                             # None = chosen by the planner from the device budget
    kv: str = "auto"                    # "exact" | "sparse" | "auto" (exact up to kv_exact_max_tokens)
    kv_budget: float | int = 0.05       # sparse mode: fraction of the context (< 1) or a number of tokens
    kv_exact_max_tokens: int = 4096     # auto mode switches to sparse beyond this context length
    chunk_tokens: int | None = None     # KV chunk size; None = adaptive per layer from prefill attention skew
    kv_device_tokens: int | None = None  # context whose KV the planner keeps room for on the device;
                                         # None = min(4096, the model's maximum); beyond it KV spills to host/disk
    kv_sketch: bool | None = None       # sparse mode: token-level chunk scores from 2-bit key codes on the device;
                                        # None = on (every device; sketches only the best few x budget chunks)
    max_sequences: int = 16             # sequences decoding together at most (more wait for a place)
    micro_batches: int = 1              # throughput mode: a step's rows run in this many groups per layer pass
                                        # (the layer's weights stay loaded); activations are kept for one group
    prefill_order: str = "arrival"      # which waiting prompts' pieces fill a step first: "arrival" (a server's
                                        # first come, first served) or "longest" (a batch job: fuller passes)
    weight_quant: WeightQuant | None = None  # group-wise int8/int4 layer weights; None = 16-bit (the compute dtype)
    kv_quant: str = "none"              # KV chunks on the host and disk tiers: "none" (exact), "int8" or "int4"
                                        # (KIVI-style codes; device chunks, abstracts and key codes stay exact)
    compile: bool = False               # torch.compile the layers' math around the KV attention (``compiled``)
    cuda_graph: bool = False            # CUDA: replay the decode step's layer halves from graphs (``cuda_graphs``)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv_quant", check_kv_scheme(self.kv_quant))
        if self.kv not in ("exact", "sparse", "auto"):
            raise ArgumentError(f"kv={self.kv!r}: use 'exact', 'sparse' or 'auto'")
        if self.prefill_order not in PREFILL_ORDERS:
            raise ArgumentError(f"prefill_order={self.prefill_order!r}: use 'arrival' (first come, first served) "
                                "or 'longest' (a batch job's prompts, longest first)")
        if isinstance(self.kv_budget, bool) or not isinstance(self.kv_budget, (int, float)) \
                or not math.isfinite(self.kv_budget) or self.kv_budget <= 0:
            raise ArgumentError(f"kv_budget={self.kv_budget!r} must be > 0 (a fraction like 0.05 or a token count)")
        for name in ("prefill_chunk_tokens", "kv_exact_max_tokens", "chunk_tokens", "kv_device_tokens",
                     "max_sequences", "micro_batches"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ArgumentError(f"{name}={value!r} must be a whole number >= 1"
                                    + ("" if name in ("prefill_chunk_tokens", "max_sequences", "micro_batches")
                                       else " (or leave it out for the default)"))
        if self.dtype is not None and not isinstance(self.dtype, str):
            raise ArgumentError(f"dtype={self.dtype!r}: give a name such as 'bfloat16', 'float16' or 'float32'")
        if self.device is not None and not isinstance(self.device, str):
            raise ArgumentError(f"device={self.device!r}: give a name such as 'cpu', 'cuda' or 'cuda:1'")
        if self.weight_quant is not None and not isinstance(self.weight_quant, WeightQuant):
            raise ArgumentError(f"weight_quant={self.weight_quant!r}: give a tierkv.quantspec.WeightQuant "
                                "(tierkv.load takes quant='int8'|'int4', group_size=, quant_head=)")
        for name in ("compile", "cuda_graph"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(f"{name}={getattr(self, name)!r}: give True or False")
        if self.kv_sketch is not None and not isinstance(self.kv_sketch, bool):
            raise ArgumentError(f"kv_sketch={self.kv_sketch!r}: give True, False or None (the default)")
