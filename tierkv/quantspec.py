"""What a quantization scheme is, as facts: names, valid choices, stored tensors and their sizes.

Why this module exists: the converter writes quantized tensors, the store reads them back, the
planner counts their bytes and the kernels compute on them, and all four must agree on what a
scheme means without importing each other (``io`` holds no model math, the planner stays pure).
This module is that one source of truth. It does no arithmetic on weights (the math lives in
``tierkv.kernels.quant``); ``QuantWeight`` only holds a quantized weight's tensors together with
the facts that say how to read them.

Weights are quantized asymmetrically, group-wise along the input dimension K of a (N, K) linear
weight: each group of ``group_size`` consecutive inputs of one output row has a 16-bit scale and
a 16-bit minimum, and ``w = q * scale + minimum`` with q in [0, 2**bits - 1]. int8 may also use
one group per output row spanning all of K ("channel", ``CHANNEL`` = 0 as a number; the word
"channel" in the CLI, the library and the manifest): the fastest int8 on the CPU. int4 per channel
is refused (PyTorch's int4 op wants groups of 32..256, and one 4-bit range per row loses too much).
The packed bytes come in one of three layouts ("packs"), chosen at conversion for the device that
will compute:

- ``plain``: int4 as two values per byte along K (low nibble = even k), (N, K/2) uint8; int8 as
  (N, K) uint8. Read by the torch reference and the Triton kernels.
- ``cpu_int4``: PyTorch's CPU tinygemm layout (``_convert_weight_to_int4pack_for_cpu``), read by
  ``torch.ops.aten._weight_int4pack_mm_for_cpu``. int4 is one such (N, K/2) plane; int8 is two
  (2, N, K/2): the high and the low nibbles of q, each a 4-bit matmul (``q = 16*hi + lo``).
  It needs N divisible by 16; other shapes get ``plain``.
- ``cpu_int8``: int8 per channel for ``torch.ops.aten._weight_int8pack_mm``: (N, K) uint8 holding
  the bits of the int8 ``q - 128`` (``q ^ 0x80``), read as int8. It needs K divisible by 16; other
  shapes get ``plain``.

Every quantized weight ``X.weight`` is stored as ``X.weight`` (the packed bytes) plus
``X.weight.qparams``: (G, N, 2) float16, [..., 0] the scale and [..., 1] the minimum, where
G = K/group_size (1 per channel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tierkv.errors import ArgumentError

SCHEMES = ("int8", "int4")
KV_SCHEMES = ("none", "int8", "int4")
CHANNEL = 0                 # group_size of one group per output row spanning all of K (int8 only)
CHANNEL_WORD = "channel"
GROUP_SIZES = (32, 64, 128, CHANNEL)
DEFAULT_GROUP_SIZE = 64
PACKS = ("plain", "cpu_int4", "cpu_int8")
QPARAMS_SUFFIX = ".qparams"
QPARAMS_DTYPE = "float16"
CPU_PACK_ROWS = 16          # _convert_weight_to_int4pack_for_cpu needs N divisible by this
CPU_INT8_K_MULTIPLE = 16    # _weight_int8pack_mm's bf16 path reads K in steps of 16 (others: wrong or a crash)
BITS = {"int8": 8, "int4": 4}

# the linear weights of a decoder layer that a scheme quantizes (norms and biases stay 16-bit)
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
HEAD_WEIGHT = "lm_head.weight"
EMBED_WEIGHT = "model.embed_tokens.weight"     # quantized only when a GGUF source holds it so (row lookups: plain pack)


def group_size_name(group_size: int) -> str:
    """How a group size is written for users and in the manifest: "64", or "channel"."""
    return CHANNEL_WORD if group_size == CHANNEL else str(group_size)


GROUP_SIZE_CHOICES = ", ".join(group_size_name(g) for g in GROUP_SIZES)


def parse_group_size(value: int | str | None) -> int:
    """A group size from user-facing values (32, "64", "channel", 0) -> int (``CHANNEL`` for "channel");
    None gives the default. ArgumentError listing the choices otherwise."""
    if value is None:
        return DEFAULT_GROUP_SIZE
    word = str(value).strip().lower()
    if word in (CHANNEL_WORD, "per-channel", str(CHANNEL)):
        return CHANNEL
    if word.isdigit() and int(word) in GROUP_SIZES:
        return int(word)
    raise ArgumentError(f"group size {value} is not supported; choose one of {GROUP_SIZE_CHOICES}")


def group_len(group_size: int, k: int) -> int:
    """Inputs per group of a (N, K) weight: ``group_size``, or K per channel."""
    return k if group_size == CHANNEL else group_size


@dataclass(frozen=True)
class WeightQuant:
    """What the user asked for: a scheme, its group size, and whether the LM head is quantized too.

    The embedding and the norms stay 16-bit (a GGUF file's quantized embedding keeps its own scheme:
    ``io.store.plan_layout``); ``head=True`` quantizes ``lm_head.weight``
    (models with tied embeddings have no separate head, so it changes nothing for them).
    """

    scheme: str
    group_size: int = DEFAULT_GROUP_SIZE        # 32, 64, 128 or CHANNEL; "channel" is accepted and stored as CHANNEL
    head: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ArgumentError(f"unknown weight quantization {self.scheme!r}; choose one of "
                                f"{', '.join(SCHEMES)} (or leave --quant out for 16-bit weights)")
        object.__setattr__(self, "group_size", parse_group_size(self.group_size))
        if self.group_size == CHANNEL and self.scheme != "int8":
            raise ArgumentError(f"per-channel groups are for int8 only; use --group-size 32, 64 or 128 with "
                                f"{self.scheme}, or --quant int8 --group-size channel")

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "group_size": _group_json(self.group_size), "head": self.head}

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> "WeightQuant | None":
        return None if not raw else cls(str(raw["scheme"]), raw["group_size"], bool(raw.get("head", False)))

    def describe(self) -> str:
        groups = "per output channel" if self.group_size == CHANNEL else f"groups of {self.group_size}"
        return f"{self.scheme} ({groups}{', head too' if self.head else ''})"


def parse_weight_quant(scheme: str | None, group_size: int | str | None = None,
                       head: bool = False) -> WeightQuant | None:
    """``WeightQuant`` from user-facing values; None for 16-bit ("none", "", None)."""
    if scheme is None or str(scheme).strip().lower() in ("", "none", "bf16", "fp16", "16"):
        if head:
            raise ArgumentError("--quant-head needs a scheme: add --quant int8 or --quant int4")
        return None
    return WeightQuant(str(scheme).strip().lower(), parse_group_size(group_size), head)


def check_kv_scheme(scheme: str) -> str:
    """The KV scheme, validated: "none", "int8" or "int4"."""
    value = str(scheme).strip().lower()
    if value not in KV_SCHEMES:
        raise ArgumentError(f"unknown KV quantization {scheme!r}; choose one of {', '.join(KV_SCHEMES)}")
    return value


@dataclass(frozen=True)
class TensorQuant:
    """How one stored tensor is quantized: recorded per tensor in the store manifest."""

    scheme: str                 # "int8" | "int4"
    group_size: int             # 32, 64, 128 or CHANNEL
    pack: str                   # "plain" | "cpu_int4" | "cpu_int8"

    def __post_init__(self) -> None:
        assert self.scheme in SCHEMES and self.group_size in GROUP_SIZES and self.pack in PACKS, self
        assert self.group_size != CHANNEL or self.scheme == "int8", self
        assert self.pack != "cpu_int8" or (self.scheme, self.group_size) == ("int8", CHANNEL), self

    @property
    def bits(self) -> int:
        return BITS[self.scheme]

    def stored(self, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Stored tensors of a logical (N, K) weight: {suffix: (dtype name, shape)}; "" is the data."""
        n, k = shape
        group = group_len(self.group_size, k)
        assert k % group == 0, (shape, self.group_size)
        if self.pack == "cpu_int4" and self.scheme == "int8":
            data: tuple[int, ...] = (2, n, k // 2)
        elif self.scheme == "int4":
            data = (n, k // 2)
        else:
            data = (n, k)
        return {"": ("uint8", data), QPARAMS_SUFFIX: (QPARAMS_DTYPE, (k // group, n, 2))}

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of every stored tensor of a logical (N, K) weight."""
        return sum(_numel(s) * (1 if dt == "uint8" else 2) for dt, s in self.stored(shape).values())

    def prepared_nbytes(self, shape: tuple[int, ...], dtype_bytes: int) -> int:
        """Bytes ``kernels.quant.prepare`` adds to a (N, K) weight placed to stay on the CPU: the CPU
        ops' ready parameters in the compute dtype (int4: one (G, N, 2) set, int8 in groups: two,
        per channel: an (N,) scale and an (N,) fp32 center). 0 for the plain pack."""
        n, k = shape
        if self.pack == "cpu_int8":
            return n * (dtype_bytes + 4)
        if self.pack == "cpu_int4":
            return (k // group_len(self.group_size, k)) * n * 2 * dtype_bytes * (2 if self.scheme == "int8" else 1)
        return 0

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "group_size": _group_json(self.group_size), "pack": self.pack}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "TensorQuant":
        return cls(str(raw["scheme"]), parse_group_size(raw["group_size"]), str(raw["pack"]))


@dataclass(frozen=True)
class QuantWeight:
    """A quantized (N, K) linear weight as stored: packed bytes, (G, N, 2) float16 qparams, its scheme.

    It stands where a layer's weight dict holds ``X.weight`` for 16-bit models; the store builds it
    from the manifest (never from names), and ``tierkv.kernels.quant.quant_linear`` computes on it.
    ``prepared`` holds the CPU ops' parameters derived from ``qparams`` in one compute dtype
    (``tierkv.kernels.quant.prepare`` fills it once for weights that stay put; empty: derived per call).
    """

    data: torch.Tensor          # uint8, shape TensorQuant.stored(shape)[""]
    qparams: torch.Tensor       # (G, N, 2) float16: [..., 0] scale, [..., 1] minimum
    quant: TensorQuant
    prepared: tuple[torch.Tensor, ...] = ()     # op-ready parameters (kernels.quant.prepare), or ()

    @property
    def shape(self) -> tuple[int, int]:
        """The logical (N, K) of the weight."""
        g, n, _ = self.qparams.shape
        if self.quant.group_size == CHANNEL:        # int8 only: the data's last dim is K (plain, cpu_int8)
            return n, self.data.shape[-1]
        return n, g * self.quant.group_size

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.qparams.numel() * self.qparams.element_size()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "QuantWeight":
        """A copy on ``device`` (self when already there), like ``Tensor.to``; prepared parameters move too."""
        return QuantWeight(self.data.to(device, non_blocking=non_blocking),
                           self.qparams.to(device, non_blocking=non_blocking), self.quant,
                           tuple(p.to(device, non_blocking=non_blocking) for p in self.prepared))


def choose_pack(scheme: str, shape: tuple[int, ...], device_type: str, group_size: int = DEFAULT_GROUP_SIZE) -> str:
    """The layout for computing a (N, K) weight in groups of ``group_size`` on ``device_type`` ("cpu", "cuda", ...)."""
    if device_type != "cpu":
        return "plain"
    if group_size == CHANNEL:
        return "cpu_int8" if scheme == "int8" and shape[-1] % CPU_INT8_K_MULTIPLE == 0 else "plain"
    return "cpu_int4" if shape[0] % CPU_PACK_ROWS == 0 else "plain"


def quantized_keys(shapes: dict[str, tuple[int, ...]], quant: WeightQuant | None) -> list[str]:
    """Which of a group's tensors (layer keys like ``self_attn.q_proj.weight`` or global HF names)
    ``quant`` quantizes: the layer linears' weights, and the head when asked."""
    if quant is None:
        return []
    wanted = {f"{name}.weight" for name in LAYER_LINEARS} | ({HEAD_WEIGHT} if quant.head else set())
    return [key for key in shapes if key in wanted]


def tensor_quants(shapes: dict[str, tuple[int, ...]], quant: WeightQuant | None,
                  device_type: str) -> dict[str, TensorQuant]:
    """Key -> how it is stored, for the tensors of a group that ``quant`` covers (``quantized_keys``),
    packed for computing on ``device_type``; ArgumentError when a group size does not divide one.
    The converter's layout and the resident loader both ask this, so they store the same thing."""
    out = {}
    for key in quantized_keys(shapes, quant):
        assert quant is not None
        shape = tuple(shapes[key])
        check_divides(key, shape, quant)
        out[key] = TensorQuant(quant.scheme, quant.group_size,
                               choose_pack(quant.scheme, shape, device_type, quant.group_size))
    return out


def check_divides(key: str, shape: tuple[int, ...], quant: WeightQuant) -> None:
    """ArgumentError when ``quant``'s group size does not divide the input dimension of ``key``."""
    k = shape[-1]
    if k % group_len(quant.group_size, k):
        fits = [group_size_name(g) for g in GROUP_SIZES
                if k % group_len(g, k) == 0 and (g != CHANNEL or quant.scheme == "int8")]
        hint = f"use --group-size {' or '.join(fits)}" if fits else "leave --quant out for this model" + (
            ", or use --quant int8 --group-size channel (one scale per output row fits any width)"
            if quant.scheme == "int4" else "")
        raise ArgumentError(f"group size {quant.group_size} does not divide the input dimension {k} of {key}; "
                            f"{hint}")


def weight_bytes_per_param(scheme: str | None, group_size: int = DEFAULT_GROUP_SIZE, dtype_bytes: int = 2) -> float:
    """Average stored bytes per weight of a (large) linear layer: the planner's rate (per channel: the
    4 bytes of one row's scale and minimum over K inputs are counted as nothing)."""
    if scheme is None or scheme == "none":
        return float(dtype_bytes)
    return BITS[scheme] / 8 + (0.0 if group_size == CHANNEL else 4 / group_size)


def kv_chunk_bytes(scheme: str, kv_heads: int, tokens: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of one KV chunk (one sequence, one layer, ``tokens`` rows) held off the device under KV
    ``scheme``: K and V in the cache dtype ("none"), or KIVI-style ``bits``-bit codes of K and V with
    one 16-bit (scale, minimum) per (head, channel) for K over the chunk's tokens and one per
    (head, token) for V over the head dimension. int4 packs two codes per byte along the head dim (model
    configs with an odd head dim are refused when parsed: rotary embeddings need it even)."""
    check_kv_scheme(scheme)
    if scheme == "none":
        return 2 * kv_heads * tokens * head_dim * dtype_bytes
    assert head_dim * BITS[scheme] % 8 == 0, f"{scheme} packs code pairs along the head dim: {head_dim} is odd"
    codes = 2 * kv_heads * tokens * head_dim * BITS[scheme] // 8
    params = kv_heads * (head_dim + tokens) * 2 * 2          # (scale, minimum) float16 pairs
    return codes + params


def _group_json(group_size: int) -> int | str:
    """A group size as the manifest records it: the number, or "channel"."""
    return CHANNEL_WORD if group_size == CHANNEL else group_size


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


__all__ = ["BITS", "CHANNEL", "CPU_INT8_K_MULTIPLE", "CHANNEL_WORD", "DEFAULT_GROUP_SIZE", "EMBED_WEIGHT", "GROUP_SIZES", "GROUP_SIZE_CHOICES", "HEAD_WEIGHT", "KV_SCHEMES", "LAYER_LINEARS", "PACKS",
           "QPARAMS_DTYPE", "QuantWeight", "QPARAMS_SUFFIX", "SCHEMES", "TensorQuant", "WeightQuant", "check_divides",
           "check_kv_scheme", "choose_pack", "group_len", "group_size_name", "kv_chunk_bytes", "parse_group_size", "parse_weight_quant", "quantized_keys",
           "tensor_quants",
           "weight_bytes_per_param"]
