"""int4 weights times 8-bit activations on the CPU, through torchao's ``da8w4`` kernel (optional).

Why this module exists: PyTorch's weight-only int4 op (``quant_cpu``) is compute-bound on a 2-core
CPU: it unpacks every nibble to floats and multiplies in fp32, and ran at ~12 GB/s of int4 bytes
against bf16's ~21 GB/s, so resident int4 decode stayed below 2x bf16. torchao's
``torch.ops.torchao.da8w4_linear_cpu`` multiplies the int4 codes with activations rounded to 8 bits
per row on the int8 units (VNNI, AMX through ``cpublas``), which streams the int4 weight at about
bf16's rate (measured 0.28 ms against 0.46 ms weight-only and 1.09 ms bf16 per 5632x2048 matvec,
2 threads, weights in DRAM; docs/benchmarks.md). It is opt-in (``TIERKV_CPU_QLINEAR=torchao``: it
changes the tokens), and torchao's x86 wheels ship no CPU kernels (only its aarch64 ones do), so on
x86 torchao must be built with them: ``USE_CPU_KERNELS=1 pip install
--no-build-isolation git+https://github.com/pytorch/ao@v0.18.0``. ``da8w4_status`` says which is
missing; ``kernels.quant.prepare_layer`` then keeps the weight-only op.

Numerics. The kernel's weight is ``(q - z) * s`` with an integer zero point z per group; tierkv's is
``q * s + minimum`` with a 16-bit minimum (``quantspec``). With z = round(-minimum / s) the rest,
``r = minimum + z * s`` (|r| <= s/2), is added back exactly as a rank-G term: ``y = da8w4(x) +
groupsum(x) @ r``, groupsum (M, G) the sums of x over each group, r (G, N) fp32. Activations are
rounded per row, asymmetric, to uint8 (scale (max - min)/255 over the row with 0 inside the range,
as torchao's own ``Int4OpaqueTensor`` does): the error against the weight-only reference is ~1% of
max |out| on random data (tests/test_quant_torchao.py states the bound), the size of the 8-bit
activations of ``quant_cpu.int8_dynamic_mm``.

Batches of ``quant.DYNAMIC_MAX_M`` rows or more (prefill) run the weight-only op on the stored
weights while they are kept (``Da8w4Linear.parts``); a layer that owned its tensors drops them (the
packed copy is then the only one) and runs every batch here, each row rounded on its own.
Bytes per 64-weight group and row: 32 of codes, 4 of fp32 scale, 1 zero point, 4 of compensation
(the kernel's sum of the codes per block), 4 of fp32 rest r: 45 against the weight-only op's 36.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from tierkv.errors import ArgumentError
from tierkv.kernels import quant_cpu
from tierkv.quantspec import QuantWeight

__all__ = ["DA8W4_GROUP_SIZES", "DA8W4_ROWS", "Da8w4Linear", "da8w4_ok", "da8w4_status", "check_da8w4",
           "pack_da8w4", "da8w4_mm", "require_da8w4"]

DA8W4_GROUP_SIZES = (32, 64, 128)     # the kernel's K blocks: min(group, 128), and group a multiple of it
DA8W4_ROWS = 32                       # the kernel packs N in blocks of 32
_OP = "torchao::da8w4_linear_cpu"
_BUILD_HINT = ("build torchao with its CPU kernels (its x86 wheels ship none): USE_CPU_KERNELS=1 pip install "
               "--no-build-isolation git+https://github.com/pytorch/ao@v0.18.0, or set TIERKV_CPU_QLINEAR=weight_only")


def da8w4_status() -> str | None:
    """None when torchao's da8w4 CPU kernel can run in this process, else why not (and the fix)."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed: " + _BUILD_HINT
    import torchao  # noqa: F401  (registers the op schemas, and its CPU kernels when it was built with them)

    if "CPU" not in torch._C._dispatch_dump(_OP):
        return f"this torchao {getattr(torchao, '__version__', '?')} has no CPU da8w4 kernel: " + _BUILD_HINT
    return None


def da8w4_ok(value: object) -> bool:
    """An int4 cpu_int4 weight on the CPU in groups the kernel takes, N a multiple of ``DA8W4_ROWS``."""
    return isinstance(value, QuantWeight) and value.quant.pack == "cpu_int4" and value.quant.bits == 4 and \
        value.device.type == "cpu" and value.quant.group_size in DA8W4_GROUP_SIZES and \
        value.shape[0] % DA8W4_ROWS == 0


@dataclass(frozen=True)
class Da8w4Linear:
    """int4 weights (one, or a fused group along N) packed for ``da8w4_linear_cpu``.

    ``packed``: the kernel's (weight, scales, zero points, compensation); ``rest`` (G, N) float32 the
    exact remainder r of every group and row; ``qparams`` (G, N, 2) float16 the parts' own; ``parts``
    the stored weights in output order (for large batches), or () once dropped.
    """

    packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    rest: torch.Tensor                 # (G, N) float32
    qparams: torch.Tensor              # (G, N, 2) float16 [scale, minimum]
    group_size: int
    k: int
    parts: tuple[QuantWeight, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """The logical (N, K), N summed over the parts."""
        return self.rest.shape[1], self.k

    @property
    def device(self) -> torch.device:
        return self.rest.device

    @property
    def extra_nbytes(self) -> int:
        """Bytes it holds beside its parts: the packed tensors, the rest and the qparams."""
        held = (*self.packed, self.rest, self.qparams)
        return sum(t.numel() * t.element_size() for t in held)


def pack_da8w4(parts: tuple[QuantWeight, ...], keep: bool = True) -> Da8w4Linear:
    """``da8w4_ok`` weights of one K and group size, concatenated along N, packed for the kernel (a copy:
    the codes are unpacked from the tinygemm layout and packed again). ``keep``: hold the parts for
    large batches (else every batch runs the kernel)."""
    k, group = parts[0].shape[1], parts[0].quant.group_size
    assert all(da8w4_ok(p) and p.shape[1] == k and p.quant.group_size == group for p in parts), parts
    codes = torch.cat([quant_cpu.unpack_codes(p.data, p.shape[0], k) for p in parts])       # (N, K) uint8
    qparams = torch.cat([p.qparams for p in parts], dim=1).contiguous()                      # (G, N, 2)
    scale, minimum = qparams[..., 0].float(), qparams[..., 1].float()                        # (G, N)
    zero = torch.where(scale > 0, -minimum / scale.clamp_min(1e-30), 0).round_().clamp_(-128, 127)
    rest = (minimum + zero * scale).contiguous()                                             # (G, N), |r| <= s/2
    packed = torch.ops.torchao.da8w4_linear_prepack_cpu(codes, scale.t().contiguous(),
                                                        zero.t().to(torch.int8).contiguous())
    return Da8w4Linear(tuple(packed), rest, qparams, group, k, parts if keep else ())


def da8w4_mm(x2: torch.Tensor, lin: Da8w4Linear) -> torch.Tensor:
    """x2 (M, K) float @ W^T with each row of x rounded to uint8 -> (M, N) in x2's dtype (fp32 inside)."""
    m, k = x2.shape
    xf = x2.float()
    lo, hi = torch.aminmax(xf, dim=1, keepdim=True)                                  # (M, 1) each
    lo.clamp_(max=0.0)
    scale = (hi.clamp_(min=0.0) - lo).div_(255.0).clamp_(min=1e-12)                  # (M, 1)
    zero = (lo / scale).neg_().round_()                                              # (M, 1) in [0, 255]
    xq = (xf / scale).round_().add_(zero).clamp_(0.0, 255.0).to(torch.uint8)        # (M, K)
    out = torch.ops.torchao.da8w4_linear_cpu(xq, scale.view(m), zero.view(m).to(torch.int32), *lin.packed,
                                            None, torch.float32)                    # (M, N) fp32
    sums = xf.view(m, k // lin.group_size, lin.group_size).sum(-1)                  # (M, G)
    return out.addmm_(sums, lin.rest).to(x2.dtype)


def check_da8w4() -> str | None:
    """Run the kernel on a small random weight against the fp32 weight-only reference: None when within
    ``2e-2`` of max |out| (8-bit activations; the bound tests/test_quant_torchao.py holds), else what differed."""
    from tierkv.kernels.quant import quantize_weight
    from tierkv.kernels.quant_reference import pack_nibbles, quant_linear_ref
    from tierkv.quantspec import TensorQuant

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen) * 0.05                                  # (N, K)
    x = torch.randn(3, 128, generator=gen)                                          # (M, K)
    tq = TensorQuant("int4", 32, "cpu_int4")
    qw = QuantWeight(*quantize_weight(w, tq), tq)
    got = da8w4_mm(x, pack_da8w4((qw,)))
    want = quant_linear_ref(x, pack_nibbles(quant_cpu.unpack_codes(qw.data, 64, 128)), qw.qparams, 4)
    err = float((got - want).abs().max() / want.abs().max())
    return None if err <= 2e-2 else f"torchao's da8w4 kernel is off by {err:.3g} of max |out| on a self-check"


def require_da8w4() -> None:
    """ArgumentError naming the fix unless the kernel is here and passes ``check_da8w4``."""
    why = da8w4_status() or check_da8w4()
    if why:
        raise ArgumentError(f"TIERKV_CPU_QLINEAR=torchao cannot run: {why}")
