"""CUDA graphs of the decode step's layer halves: one launch per half instead of dozens of kernels.

Why this module exists: at small batch a GPU decode step is bound by kernel launches (what the
TKLQT tracer measures), not by the GPU. A CUDA graph replays a captured sequence of kernels with
one launch. The KV attention (``kv.attend``: chunk tables, selection, host syncs) cannot be
captured, so, as ``compiled`` does, the graphs cover the two halves around it
(``model.LayerHalves``: norm, q/k/v, RoPE; o projection, residual, norm, MLP, residual), eager or
compiled, whichever the engine runs.

- One graph per (half, layer, token count): a graph bakes in the addresses it read, so it replays
  only while the layer's weight tensors sit where they were at capture (resident layers always do;
  a streamed layer whose ring slot moved runs eagerly, counted as a miss) and for the same token
  count (the decode batch size: ``max_sizes`` distinct counts are kept, least recently used out).
- A token count is captured the ``warmup``-th time it is seen (running eagerly until then, which
  warms cuBLAS and Triton before capture), and only up to ``max_tokens`` tokens: decode batches
  repeat every step, one-off prefill pieces do not.
- Inputs are copied into the graph's static buffers; outputs are cloned out of them, so nothing
  handed to the KV cache or the next layer is overwritten by a later replay.
- On a device that is not CUDA, or when a capture fails, the halves run as they are, and the stats
  say why (``GraphStats.reason``; one warning for a failed capture).

Shapes: T tokens of the packed axis (the decode batch), H hidden, Hq/Hkv heads, D head_dim.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from tierkv.config import ModelConfig
from tierkv.model import LayerHalves

__all__ = ["GraphStats", "GraphedHalves", "Replay", "cuda_capture", "graph_halves"]

Replay = Callable[[], None]
Capture = Callable[[Callable[[], Any]], tuple[Replay, Any]]


@dataclass
class GraphStats:
    """Where the CUDA graphs of the layer halves stand."""

    asked: bool = False         # cuda_graph=True at load
    active: bool = False        # graphs are captured and replayed (False: see reason)
    reason: str = ""            # why not, when asked
    captures: int = 0           # graphs captured (half x layer x token count)
    replays: int = 0            # half calls served by a graph
    eager_calls: int = 0        # half calls run eagerly (warm-up, too many tokens, weights moved)
    weight_misses: int = 0      # of those, calls whose layer's weights were not where its graph read them
    token_counts: list[int] = field(default_factory=list)   # token counts with graphs now (decode batch sizes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cuda_capture(fn: Callable[[], Any]) -> tuple[Replay, Any]:
    """Capture ``fn`` (reading and writing only static tensors) into a CUDA graph: one warm-up run on a
    side stream, then the capture. -> (replay, the captured outputs: tensors the replays overwrite).
    "thread_local" capture: the weight streamer's I/O threads may issue copies meanwhile."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph.replay, out


@dataclass
class _Graph:
    replay: Replay
    inputs: tuple[torch.Tensor, ...]     # the static input buffers the graph reads
    outputs: Any                         # the static outputs it writes (a tensor or a tuple of them)
    weights: tuple[int, ...]             # data_ptr of each weight tensor it read


def _weight_ptrs(w: dict[str, Any]) -> tuple[int, ...] | None:
    """Addresses of a layer's weights in key order, or None when one is not a plain tensor (a quantized
    weight object: its addresses are not all visible here, so it is not graphed)."""
    if not all(isinstance(t, torch.Tensor) for t in w.values()):
        return None
    return tuple(w[k].data_ptr() for k in sorted(w))


def _cloned(out: Any) -> Any:
    return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()


class GraphedHalves:
    """``inner``'s halves replayed from CUDA graphs where they can be (see the module docstring).

    ``capture`` makes a graph (``cuda_capture`` on CUDA; tests pass a stand-in that replays by
    calling again, to check the bookkeeping on the CPU). ``halves`` is what the runner uses.
    """

    def __init__(self, inner: LayerHalves, capture: Capture = cuda_capture, max_tokens: int = 64,
                 max_sizes: int = 4, warmup: int = 2) -> None:
        assert max_tokens >= 1 and max_sizes >= 1 and warmup >= 1
        self.inner, self._capture = inner, capture
        self.max_tokens, self.max_sizes, self.warmup = max_tokens, max_sizes, warmup
        self.stats = GraphStats(asked=True, active=True)
        self._graphs: dict[tuple[str, int, int], _Graph] = {}
        self._sizes: OrderedDict[int, int] = OrderedDict()      # token count -> times seen (LRU order)
        self.halves = LayerHalves(self.pre, self.post)

    def pre(self, cfg: ModelConfig, w: dict[str, Any], h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (1, T, H), cos/sin (1, T, 1, D) -> q (1, T, Hq, D), k/v (1, T, Hkv, D)."""
        if layer == 0:
            self._count(h.shape[1])
        run = lambda a, b, c: self.inner.pre(cfg, w, a, b, c, layer)      # noqa: E731
        return self._call("pre", layer, w, run, (h, cos, sin))

    def post(self, cfg: ModelConfig, w: dict[str, Any], h: torch.Tensor, attn: torch.Tensor,
             layer: int) -> torch.Tensor:
        """h (1, T, H), attn (1, T, Hq*D) -> (1, T, H)."""
        run = lambda a, b: self.inner.post(cfg, w, a, b, layer)           # noqa: E731
        return self._call("post", layer, w, run, (h, attn))

    def _count(self, tokens: int) -> None:
        """One more step of ``tokens`` tokens (counted at layer 0's first half): the LRU of token counts."""
        if tokens > self.max_tokens:
            return
        self._sizes[tokens] = self._sizes.pop(tokens, 0) + 1
        while len(self._sizes) > self.max_sizes:
            old, _ = self._sizes.popitem(last=False)
            self._graphs = {k: g for k, g in self._graphs.items() if k[2] != old}
        self.stats.token_counts = sorted({k[2] for k in self._graphs})

    def _call(self, half: str, layer: int, w: dict[str, Any], run: Callable[..., Any],
              args: Sequence[torch.Tensor]) -> Any:
        tokens = args[0].shape[1]
        key = (half, layer, tokens)
        graph = self._graphs.get(key) if self.stats.active else None
        ptrs = _weight_ptrs(w) if self.stats.active else None
        if graph is None and ptrs is not None and self._sizes.get(tokens, 0) >= self.warmup:
            graph = self._new_graph(key, run, args, ptrs)
        if graph is None or graph.weights != ptrs:
            self.stats.eager_calls += 1
            self.stats.weight_misses += int(graph is not None)
            return run(*args)
        for static, value in zip(graph.inputs, args):
            static.copy_(value)
        graph.replay()
        self.stats.replays += 1
        return _cloned(graph.outputs)

    def _new_graph(self, key: tuple[str, int, int], run: Callable[..., Any], args: Sequence[torch.Tensor],
                   ptrs: tuple[int, ...]) -> _Graph | None:
        """Capture ``run`` over static copies of ``args``; on failure, graphs off for good (one warning)."""
        inputs = tuple(a.clone() for a in args)
        try:
            replay, outputs = self._capture(lambda: run(*inputs))
        except RuntimeError as exc:
            self.stats.active = False
            self.stats.reason = f"capture failed, halves run without graphs: {type(exc).__name__}: {exc}"[:400]
            self._graphs.clear()
            warnings.warn(f"tierkv: {self.stats.reason}", RuntimeWarning, stacklevel=4)
            return None
        graph = self._graphs[key] = _Graph(replay, inputs, outputs, ptrs)
        self.stats.captures += 1
        self.stats.token_counts = sorted({k[2] for k in self._graphs})
        return graph


def graph_halves(inner: LayerHalves, device: torch.device, asked: bool) -> tuple[LayerHalves, GraphStats]:
    """The halves the engine runs with ``cuda_graph=asked`` on ``device``, and their stats: graphs on
    CUDA; elsewhere ``inner`` as it is, the stats saying why."""
    if not asked:
        return inner, GraphStats()
    if device.type != "cuda":
        return inner, GraphStats(asked=True, reason=f"off: no CUDA device (the engine runs on {device.type}); "
                                                   "CUDA graphs need --device cuda")
    graphed = GraphedHalves(inner)
    return graphed.halves, graphed.stats
