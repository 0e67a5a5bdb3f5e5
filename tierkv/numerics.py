"""Non-finite numbers in a forward pass: the error generation stops with, and the error-path replay
that finds where they started.

Why this module exists: corrupted or NaN weights, or float16 activations past 65504, turn the
logits into NaN, and greedy decoding then emits token 0 forever with exit code 0. The engine
checks each step's logits inside the host transfer sampling makes anyway (``sampling.pick``: no
extra sync on the decode path). Only once they are bad does ``non_finite_error`` replay a short
input with a check after the embedding and after every layer (one sync each, on the error path
only) to name the first stage whose output went bad, and build a message that says what to do.
"""

from __future__ import annotations

import torch

from tierkv.config import ModelConfig
from tierkv.errors import TierkvError
from tierkv.model import decoder_layer, embed, head, step_inputs
from tierkv.model_pieces import piece_decoder_layers
from tierkv.pipeline.kv import DenseKVCache
from tierkv.pipeline.pieces import PieceLayer
from tierkv.pipeline.schedule import WeightSource, run_layers
from tierkv.sampling import logits_healthy

REPLAY_MAX_TOKENS = 256     # the diagnostic replay's input: this many tokens of the failing sequence at most


class NonFiniteError(TierkvError, RuntimeError):
    """Generation produced NaN, infinite or all-equal logits. The message names the likely cause and
    what to run; ``stage`` ("layer 3", "the embedding", ...) and ``layer`` say where the replay
    first saw a bad value (None when it did not). The engine stays usable for the next call."""

    def __init__(self, message: str, stage: str | None = None, layer: int | None = None) -> None:
        super().__init__(message)
        self.stage, self.layer = stage, layer


def hidden_usable(h: torch.Tensor) -> bool:
    """h (B, T, H): every value finite and small enough that the next RMS norm's fp32 mean square
    stays finite (past that the norm returns zeros). Syncs with the host."""
    return bool(torch.isfinite(h.float().square().mean(-1)).all())


def replay_ids(history: list[int]) -> list[int]:
    """The replay's input: the whole history when short, else its start and the last token fed
    (a corrupt embedding row shows up only for the tokens that use it)."""
    if len(history) <= REPLAY_MAX_TOKENS:
        return history
    return history[:REPLAY_MAX_TOKENS - 1] + history[-1:]


def first_bad_stage(cfg: ModelConfig, weights: WeightSource, ids: list[int], dtype: torch.dtype,
                    device: torch.device) -> tuple[str | None, int | None]:
    """Run ``ids`` (one sequence) through a fresh resident KV cache, checking after every stage.

    Returns ("the embedding", None), ("layer j", j), ("the final norm or the LM head", None), or
    (None, None) when everything stayed finite. Every layer still runs (release follows wait).
    """
    g = weights.globals()
    kv = DenseKVCache(cfg, 1, len(ids), dtype, device)
    positions = torch.arange(len(ids), device=device)[None]                   # (1, T)
    step = step_inputs(cfg, positions, len(ids), dtype)
    h = embed(g, torch.tensor([ids], device=device), dtype)                   # (1, T, H)
    if not hidden_usable(h):
        return "the embedding", None
    bad: list[int] = []

    def layer(j: int, w: dict[str, torch.Tensor] | PieceLayer, x: torch.Tensor) -> torch.Tensor:
        out = piece_decoder_layers(cfg, w, x, [x.shape[1]], [step], [kv], j) if isinstance(w, PieceLayer) else \
            decoder_layer(cfg, w, x, step, kv, j)
        if not bad and not hidden_usable(out):
            bad.append(j)
        return out

    h = run_layers(weights, h, layer)
    kv.advance(len(ids))
    if bad:
        return f"layer {bad[0]}", bad[0]
    if not bool(logits_healthy(head(cfg, g, h[:, -1:])[:, 0]).all()):
        return "the final norm or the LM head", None
    return None, None


def non_finite_error(cfg: ModelConfig, weights: WeightSource, history: list[int], dtype: torch.dtype,
                     device: torch.device, where: str, model: str) -> NonFiniteError:
    """The error for bad logits at ``where`` ("the end of prefill", "decode step 3", ...) of the
    sequence whose tokens so far are ``history``, for the model at ``model`` (a path or "demo");
    runs the replay to name the first bad stage."""
    ids = replay_ids(history)
    stage, layer = first_bad_stage(cfg, weights, ids, dtype, device)
    if stage is not None:
        found = (f"a replay with a check after every layer finds {stage} is the first whose output is "
                 "not finite (NaN, inf, or too large to normalize)")
    else:
        found = (f"a replay of {len(ids)} of its tokens stayed finite, so the fault depends on the longer "
                 "context")
    verify = (f"corrupted or non-finite weights: rerun with --verify (`tierkv run {model} --verify ...`, or "
              "verify=True in tierkv.load), which names the bad tensor, and download the checkpoint again if it fails")
    if dtype == torch.float16:
        cause = ("Likely causes: float16 overflow (activations beyond 65504): run with --dtype bfloat16 or "
                 f"--dtype float32 (dtype= in tierkv.load); or {verify}")
    else:
        cause = f"Likely cause: {verify}"
    message = (f"generation stopped: the logits at {where} are NaN, infinite or all equal, so every token "
               f"after would be garbage; {found}. {cause}")
    return NonFiniteError(message, stage, layer)


__all__ = ["NonFiniteError", "REPLAY_MAX_TOKENS", "first_bad_stage", "hidden_usable", "non_finite_error",
           "replay_ids"]
