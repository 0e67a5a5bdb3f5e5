"""The layer loop: prefetch ahead, wait, compute, release — one screen, for every placement.

Why this module exists: whether a layer's weights are resident, held in host memory or streamed
from disk, the forward pass is the same loop. Keeping it here, driven through the small
``WeightSource`` protocol, means the resident engine and the streaming pipeline share one code
path (so they produce the same tokens) and the wrap-around into the next decode step's first
layers lives in one helper.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Protocol

import torch

from tierkv.config import ModelConfig
from tierkv.io.buffers import into_huge_pages, page_out_file_pages
from tierkv.io.checkpoint import Checkpoint
from tierkv.kernels.quant import layer_nbytes, prepare_layer, quantize_weight
from tierkv.quantspec import QuantWeight, TensorQuant, WeightQuant, tensor_quants

LayerFn = Callable[[int, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


class WeightSource(Protocol):
    """Where the layer loop gets each layer's weights from."""

    num_layers: int
    prefetch_depth: int

    def globals(self) -> dict[str, torch.Tensor]:
        """Embedding, final norm and head, resident on the compute device."""
        ...

    def prefetch(self, j: int) -> None:
        """Start moving layer j toward the device; idempotent; a no-op for resident layers."""
        ...

    def wait(self, j: int) -> dict[str, torch.Tensor]:
        """Block until layer j is usable on the device; tensors keyed like ``self_attn.q_proj.weight``."""
        ...

    def release(self, j: int) -> None:
        """Layer j's compute is finished; the memory it used may be reused."""
        ...

    def stats(self) -> dict[str, float]:
        ...

    def close(self) -> None:
        ...


def ahead(j: int, depth: int, num_layers: int) -> list[int]:
    """Layers to have in flight while layer j computes: j+1..j+depth, wrapping into the next step."""
    return [(j + k) % num_layers for k in range(1, min(depth, num_layers - 1) + 1)]


def profiling_here() -> bool:
    """Whether a torch profiler records this thread (profilers are per thread)."""
    enabled = getattr(torch._C._autograd, "_profiler_enabled", None)
    return bool(enabled()) if enabled is not None else False


def run_layers(source: WeightSource, h: torch.Tensor, layer_fn: LayerFn) -> torch.Tensor:
    """h (B, T, H) through every layer: prefetch(j+1..j+d), wait(j), compute(j), release(j). Each layer is a
    ``tierkv::layer_j`` span when a profiler records (a span costs ~5 us, 1% of a small model's step)."""
    spans = profiling_here()
    source.prefetch(0)
    for j in range(source.num_layers):
        for nxt in ahead(j, source.prefetch_depth, source.num_layers):
            source.prefetch(nxt)
        with torch.profiler.record_function(f"tierkv::layer_{j}") if spans else nullcontext():
            h = layer_fn(j, source.wait(j), h)
        source.release(j)
    return h


class ResidentWeights:
    """Every layer loaded once onto the compute device; prefetch and release cost nothing.

    With ``quant`` the linear weights it covers are quantized as they are loaded, one at a time
    (the same ``quantize_weight`` and packs for the device as ``tierkv convert``, so a resident
    model computes exactly what a streamed one does) and held as ``QuantWeight``.
    """

    prefetch_depth = 0

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device,
                 quant: WeightQuant | None = None, progress: Callable[[int, int], None] | None = None) -> None:
        """``progress(done, total)`` after the globals and after each layer (total: layers + 1)."""
        cfg: ModelConfig = ckpt.config
        self.num_layers = cfg.num_layers
        report = progress or (lambda done, total: None)
        layer_quants = tensor_quants(cfg.layer_tensor_shapes(), quant, device.type)
        self._globals = _placed(ckpt.globals(), tensor_quants(cfg.global_tensor_shapes(), quant, device.type),
                                dtype, device)
        report(1, cfg.num_layers + 1)
        self._layers = []
        for j in range(cfg.num_layers):
            self._layers.append(_placed(ckpt.layer(j), layer_quants, dtype, device))
            report(j + 2, cfg.num_layers + 1)
        self.nbytes = sum(layer_nbytes(d) for d in [self._globals, *self._layers])

    def globals(self) -> dict[str, torch.Tensor]:
        return self._globals

    def prefetch(self, j: int) -> None:
        return None

    def wait(self, j: int) -> dict[str, torch.Tensor]:
        return self._layers[j]

    def release(self, j: int) -> None:
        return None

    def stats(self) -> dict[str, float]:
        return {"device_weight_bytes": float(self.nbytes)}

    def close(self) -> None:
        self._layers.clear()
        self._globals.clear()


def _placed(tensors: dict[str, torch.Tensor], quants: dict[str, TensorQuant], dtype: torch.dtype,
            device: torch.device) -> dict[str, Any]:
    """Checkpoint tensors on ``device`` in ``dtype``; those in ``quants`` quantized (on the host) first, with
    their CPU op parameters prepared once and q/k/v, gate/up fused (``kernels.quant.prepare_layer``: resident
    weights stay put)."""
    out: dict[str, Any] = {}
    read = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors.values() if t.device.type == "cpu"]
    for key in list(tensors):
        t = tensors.pop(key).to(dtype)
        out[key] = QuantWeight(*quantize_weight(t, quants[key]), quants[key]).to(device) if key in quants \
            else t.to(device)
        del t
    out = prepare_layer(out, dtype, owned=True)
    if device.type != "cpu":
        return out
    out = into_huge_pages(out)          # the decode products read them every token
    page_out_file_pages(read)           # what the layer read of a mapped checkpoint leaves RSS now, not at close
    return out
