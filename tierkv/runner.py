"""One forward over a ragged batch: many sequences' tokens packed into one pass through the layers.

Why this module exists: when weights stream from host memory or disk, reading a layer costs the
same for one sequence or for many, so every live sequence's tokens of a step (one token for a
decoding sequence, a prefill piece for a joining one) go through each layer together. The tokens
are packed along one axis — hidden states (1, N, H) with N the sum of the rows' token counts — so
projections and MLPs run once over all of them, while RoPE (dynamic RoPE per sequence: each
row's own length sets its scaling) and attention stay per sequence: ``RaggedKV`` hands each row's
slice of q/k/v to that sequence's own KV cache, at that sequence's positions, so each sequence
computes what it computes alone.

Micro-batches (throughput mode, FlexGen's block schedule): a step's rows may come in groups
(``Scheduler`` packs them, ``Row.group``); each layer then runs group after group while its weights
stay loaded, so a large batch reads every streamed layer once per step while only one group's
activations (and the K/V its attention gathers) are live at a time. Rows never change what they
compute: the projections of a row do not depend on the rows beside it beyond the matmul's own
rounding, and attention is per sequence already.

Shapes: N packed tokens, H hidden, Hq/Hkv heads, D head_dim, V vocab; row i holds tokens
[offset_i, offset_i + q_len_i) of the packed axis at positions kv_len_i .. kv_len_i + q_len_i - 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from tierkv.calibrate import StepLog
from tierkv.config import ModelConfig
from tierkv.kernels.dense_linear import COMPILED_GEMV_MIN_PARAMS, compiled_gemv_allowed
from tierkv.model import EAGER_HALVES, KVCache, LayerHalves, StepInputs, decoder_layer, embed, head, rope_inv_freq, \
    rope_varies_with_length, step_inputs
from tierkv.model_pieces import piece_decoder_layers
from tierkv.pipeline.pieces import PieceLayer
from tierkv.pipeline.schedule import WeightSource, run_layers

__all__ = ["Feed", "RaggedKV", "Runner"]


@dataclass(frozen=True)
class Feed:
    """One sequence's row of a step: ``ids`` go in at the cache's next positions.

    logits: "last" (the row's last position, to sample from), "all" (every position: scoring)
    or "none" (a prefill piece that does not end the prompt).
    """

    cache: KVCache
    ids: Sequence[int]
    logits: str = "none"


class RaggedKV:
    """The ``KVCache`` protocol over packed rows: per-sequence query lengths ``q_lens`` (B,) and KV
    lengths ``kv_lens`` (B,) before this step; each row attends through its own cache."""

    def __init__(self, caches: Sequence[KVCache], q_lens: Sequence[int]) -> None:
        self.caches, self.q_lens = list(caches), list(q_lens)
        self.kv_lens = [c.length_tokens for c in self.caches]
        self._bounds = []
        start = 0
        for n in self.q_lens:
            self._bounds.append((start, start + n))
            start += n

    @property
    def length_tokens(self) -> int:
        assert len(self.caches) == 1, "a ragged batch has one length per sequence: use kv_lens"
        return self.kv_lens[0]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, window_tokens: int | None) -> torch.Tensor:
        """q (1, Hq, N, D), k/v (1, Hkv, N, D), positions (1, N) packed -> (1, Hq, N, D)."""
        if len(self.caches) == 1:
            return self.caches[0].attend(layer, q, k, v, positions, window_tokens)
        outs = [cache.attend(layer, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], positions[:, a:b], window_tokens)
                for cache, (a, b) in zip(self.caches, self._bounds)]
        return torch.cat(outs, dim=2)

    def decode_buffers(self, layer: int, window_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """One sequence's one new row: its cache's ``decode_buffers`` where it has them, else None."""
        buffers = getattr(self.caches[0], "decode_buffers", None)
        if len(self.caches) != 1 or self.q_lens != [1] or buffers is None:
            return None
        return buffers(layer, window_tokens)

    def advance(self, t: int) -> None:
        """After the last layer: every sequence's cache moves on by its own row length."""
        assert t == sum(self.q_lens), (t, self.q_lens)
        for cache, n in zip(self.caches, self.q_lens):
            cache.advance(n)


class Runner:
    """Runs packed steps through a weight source: embed, every layer (``run_layers``), the LM head.

    ``halves``: how each layer's math around its KV attention runs (``model.LayerHalves``: eager by
    default; ``compiled.CompiledHalves`` or ``cuda_graphs.GraphedHalves`` when the engine asks)."""

    def __init__(self, cfg: ModelConfig, weights: WeightSource, dtype: torch.dtype, device: torch.device,
                 halves: LayerHalves = EAGER_HALVES) -> None:
        self.cfg, self.weights, self.dtype, self.device, self.halves = cfg, weights, dtype, device, halves
        # RoPE inverse frequencies (D/2,) on the device, built once: every step's tables start from them
        # (a dynamic RoPE past its trained length rescales per length: ``step_inputs`` builds those per step)
        self._inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim, 1, cfg.max_position_embeddings).to(device)
        # every step's layer compute, for the planner's calibration (CPU: a step's wall time is its compute)
        self.log: StepLog | None = StepLog(cfg.num_layers) if torch.device(device).type == "cpu" else None
        # compiled CPU matrix-vector kernels pay for their one-time build on models this large (kernels.dense_linear)
        self.compiled_gemv = cfg.param_count() >= COMPILED_GEMV_MIN_PARAMS

    def _inv_for(self, seq_len: int) -> torch.Tensor | None:
        """The engine's inverse frequencies when they serve a sequence ``seq_len`` long, else None."""
        return None if rope_varies_with_length(self.cfg.rope, seq_len, self.cfg.max_position_embeddings) \
            else self._inv_freq

    def step_inputs(self, feeds: Sequence[Feed]) -> StepInputs:
        """Positions (1, N) and RoPE tables (1, N, 1, D) for the packed rows, once per step (every layer
        shares them); dynamic RoPE is scaled per row by that sequence's length after this step."""
        starts = [f.cache.length_tokens for f in feeds]
        ends = [s + len(f.ids) for s, f in zip(starts, feeds)]
        if self.cfg.rope.rope_type != "dynamic" or len(feeds) == 1:
            positions = torch.arange(starts[0], ends[0], device=self.device)[None] if len(feeds) == 1 else \
                torch.tensor([[p for s, e in zip(starts, ends) for p in range(s, e)]], device=self.device)  # (1, N)
            return step_inputs(self.cfg, positions, max(ends), self.dtype, self._inv_for(max(ends)))
        spans = [torch.arange(s, e, device=self.device) for s, e in zip(starts, ends)]
        parts = [step_inputs(self.cfg, p[None], e, self.dtype, self._inv_for(e)) for p, e in zip(spans, ends)]
        return StepInputs(cos=torch.cat([p.cos for p in parts], dim=1), sin=torch.cat([p.sin for p in parts], dim=1),
                          positions=torch.cat([p.positions for p in parts], dim=1))

    def hidden(self, feeds: Sequence[Feed], groups: Sequence[int] | None = None) -> torch.Tensor:
        """Packed rows -> the last layer's hidden states (1, N, H) in row order; every row's cache has
        advanced. ``groups`` (one per row, default all 0): micro-batches run one after another per layer."""
        order = sorted(range(len(feeds)), key=lambda i: groups[i]) if groups else list(range(len(feeds)))
        spans = _group_spans([groups[i] for i in order] if groups else [0] * len(feeds))
        ordered = [feeds[i] for i in order]
        parts = [ordered[a:b] for a, b in spans]
        kvs = [RaggedKV([f.cache for f in part], [len(f.ids) for f in part]) for part in parts]
        steps = [self.step_inputs(part) for part in parts]
        cuts = [sum(len(f.ids) for f in part) for part in parts]
        ids = [i for f in ordered for i in f.ids]
        halves = self.halves

        def layer(j: int, w: dict[str, torch.Tensor] | PieceLayer, x: torch.Tensor) -> torch.Tensor:
            if isinstance(w, PieceLayer):         # streamed in pieces: all groups' rows use each block at once
                return piece_decoder_layers(self.cfg, w, x, cuts, steps, kvs, j)
            if len(parts) == 1:
                return decoder_layer(self.cfg, w, x, steps[0], kvs[0], j, halves)
            return torch.cat([decoder_layer(self.cfg, w, xg, st, kv, j, halves)  # one group at a time
                              for xg, st, kv in zip(x.split(cuts, dim=1), steps, kvs)], dim=1)

        # (1, N, H) rows embedded into the call: no name here keeps them alive through the layers
        h = run_layers(self.weights, embed(self.weights.globals(), torch.tensor([ids], device=self.device),
                                           self.dtype), layer)
        for kv, n in zip(kvs, cuts):
            kv.advance(n)
        if order == sorted(order):
            return h
        pieces = dict(zip(order, h.split([len(f.ids) for f in ordered], dim=1)))
        return torch.cat([pieces[i] for i in range(len(feeds))], dim=1)                    # back in row order

    def forward(self, feeds: Sequence[Feed], head_rows: int, groups: Sequence[int] | None = None
                ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """One step. -> (logits (n_last, V) fp32 on the device for the rows asking "last", in row
        order, or None; per row asking "all", its logits (q_len, V) fp32 on the CPU, computed
        ``head_rows`` positions at a time so the head's output stays within the activation reserve).
        ``groups``: each row's micro-batch (see ``hidden``)."""
        with compiled_gemv_allowed(self.compiled_gemv):
            return self._forward(feeds, head_rows, groups)

    def _forward(self, feeds: Sequence[Feed], head_rows: int, groups: Sequence[int] | None
                 ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        t0, waited = time.perf_counter(), self.weights.stats().get("wait_s", 0.0) if self.log is not None else 0.0
        h = self.hidden(feeds, groups) if groups and any(groups) else self.hidden(feeds)
        if self.log is not None:
            self.log.record(len(feeds), sum(len(f.ids) for f in feeds), time.perf_counter() - t0,
                            self.weights.stats().get("wait_s", 0.0) - waited)
        g, ends, all_rows = self.weights.globals(), [], []
        offset = 0
        for f in feeds:
            n = len(f.ids)
            if f.logits == "last":
                ends.append(offset + n - 1)
            elif f.logits == "all":
                all_rows.append(self._all_logits(g, h[:, offset:offset + n], head_rows))
            offset += n
        last = head(self.cfg, g, h[:, ends])[0] if ends else None                           # (n_last, V)
        return last, all_rows

    def _all_logits(self, g: dict[str, torch.Tensor], h: torch.Tensor, rows: int) -> torch.Tensor:
        """h (1, T, H) -> logits (T, V) fp32 on the CPU, ``rows`` positions at a time."""
        out = torch.empty((h.shape[1], self.cfg.vocab_size), dtype=torch.float32)
        for lo in range(0, h.shape[1], rows):
            out[lo:lo + rows] = head(self.cfg, g, h[:, lo:lo + rows])[0].cpu()
        return out


def _group_spans(groups: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) row ranges of each run of equal group numbers (rows sorted by group)."""
    spans, start = [], 0
    for i in range(1, len(groups) + 1):
        if i == len(groups) or groups[i] != groups[start]:
            spans.append((start, i))
            start = i
    return spans
