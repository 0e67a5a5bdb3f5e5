"""What one generation asks for and gives back: result types, streamed pieces, per-sequence text
with stop strings, and the validation of prompts and sampling options.

Why this module exists: these are the library's request/result contract (``GenerationResult``,
``Piece``, ``Stream``) and the per-sequence bookkeeping that turns token ids into streamed text
(detokenization, EOS, stop strings held back until they can no longer match). They hold no
tensors and know nothing of weights or KV caches, so the engine that drives the forward passes
stays about scheduling and movement.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from tierkv.errors import ArgumentError
from tierkv.sampling import SamplingParams
from tierkv.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class GenerationStats:
    """What one generation cost. Times in seconds, memory in bytes."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    batch_size: int = 1             # most sequences that shared one step (one layer pass) with this one
    prefill_tokens: int = 0         # tokens this call fed before its first sample (a session's new ones only)
    cached_tokens: int = 0          # earlier tokens whose KV was kept (a session's, the prompt cache's), not prefilled
    cached_prompt_tokens: int = 0   # of prompt_tokens, those whose KV came from the prompt cache (cache_prompt=True)
    prefill_piece_tokens: int = 0   # prompt tokens per sequence in each prefill piece (fewer for larger batches)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tok_s: float = 0.0       # new tokens per second per sequence during decode
    peak_rss_bytes: int = 0
    peak_device_bytes: int = 0      # CUDA allocator peak; 0 on CPU (see peak_rss_bytes)
    io_wait_fraction: float = 0.0   # share of prefill+decode time spent waiting for weights to arrive
    kv: dict[str, Any] = field(default_factory=dict)  # tiered KV cache: chunk sizes, bytes per tier, hit rate
    weights: dict[str, float] = field(default_factory=dict)  # bytes per tier; bytes, GB/s, wait per link
    compile: dict[str, Any] = field(default_factory=dict)   # the engine's compile and CUDA graph state (compile_stats)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    """One prompt's outcome: new tokens only (EOS included when it ended generation)."""

    token_ids: list[int]
    text: str
    finish_reason: str              # "stop" (EOS or stop string), "length", "cancelled"
    prompt_token_ids: list[int]
    stats: GenerationStats

    def to_dict(self) -> dict[str, Any]:
        return {"token_ids": self.token_ids, "text": self.text, "finish_reason": self.finish_reason,
                "prompt_tokens": len(self.prompt_token_ids), "stats": self.stats.to_dict()}


@dataclass(frozen=True)
class Piece:
    """A streamed step: the token produced and the text it completed (may be empty)."""

    token_id: int | None
    text: str
    index: int = 0                  # which prompt of a batch


class SequenceOutput:
    """Per-prompt decode state: tokens, streamed text, EOS and stop-string handling."""

    def __init__(self, prompt_ids: list[int], tokenizer: Tokenizer | None, eos_ids: frozenset[int],
                 params: SamplingParams) -> None:
        self.prompt_ids = prompt_ids
        self.token_ids: list[int] = []
        self.text = ""                  # text emitted so far
        self._pending = ""              # decoded but held back: may be the start of a stop string
        self._decoder = IncrementalDecoder(tokenizer)
        self._eos, self._params = eos_ids, params
        self.finish_reason: str | None = None

    def push(self, token_id: int) -> str:
        """Record a new token; return the text to emit now."""
        self.token_ids.append(token_id)
        self._pending += self._decoder.push(token_id)
        if token_id in self._eos and not self._params.ignore_eos:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self._params.max_new_tokens:
            self.finish_reason = "length"
        return self._release()

    def finish(self, reason: str) -> str:
        if self.finish_reason is None:
            self.finish_reason = reason
        return self._release()

    def _release(self) -> str:
        if self.finish_reason is not None:
            self._pending += self._decoder.flush()
        full = self.text + self._pending
        for stop in self._params.stop:
            cut = full.find(stop)
            if stop and cut >= 0:
                full, self.finish_reason = full[:cut], "stop"
        keep = len(full) if self.finish_reason else len(full) - stop_prefix_len(full, self._params.stop)
        keep = max(keep, len(self.text))
        out, self.text, self._pending = full[len(self.text):keep], full[:keep], full[keep:]
        return out


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could begin a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best


class Stream:
    """Iterator of Pieces for one ``Engine.stream``/``Engine.submit`` call.

    Iterating runs engine steps (for every live sequence) until this call's next piece is ready.
    ``cancel()`` works from any thread: generation stops, the sequences' KV is freed, and the
    stream ends after the text held back so far. ``results`` is filled once every sequence ended.
    """

    def __init__(self, next_piece: Callable[[], "Piece | None"], cancel: Callable[[], None],
                 results: Callable[[], "list[Any] | None"]) -> None:
        self._next, self._cancel, self._results = next_piece, cancel, results
        self._closed = False

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Piece:
        piece = None if self._closed else self._next()
        if piece is None:
            raise StopIteration
        return piece

    @property
    def results(self) -> list[Any]:
        """One GenerationResult per prompt once all have ended; empty before."""
        return self._results() or []

    @property
    def done(self) -> bool:
        return self._results() is not None

    @property
    def result(self) -> Any:
        """The first (for ``submit``: the only) prompt's result once every prompt ended, else None."""
        done = self._results()
        return done[0] if done else None

    def cancel(self) -> None:
        """Stop generation now; the stream then ends (after any text held back for stop strings)."""
        self._cancel()

    def close(self) -> None:
        """Cancel and end the stream at once."""
        self._cancel()
        self._closed = True


PROMPT_HELP = ("a prompt is a string, a list of token ids (whole numbers, or a 1-D integer numpy array or "
               "tensor), or a list of those for a batch")


def _is_array(value: object) -> bool:
    return hasattr(value, "tolist") and hasattr(value, "dtype")


def _is_token_id(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def token_ids_of(prompt: object) -> list[int]:
    """Token ids from a list/tuple of ints or an integer array; TypeError naming what was wrong otherwise."""
    values = prompt.tolist() if _is_array(prompt) else prompt  # type: ignore[union-attr]
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes, bytearray)):
        raise TypeError(f"prompt {_short(prompt)} has type {type(prompt).__name__}; {PROMPT_HELP}")
    for value in values:
        if not _is_token_id(value):
            raise TypeError(f"token id {_short(value)} has type {type(value).__name__}, not a whole number; "
                            f"{PROMPT_HELP}")
    return [int(v) for v in values]




def split_batch(prompts: object) -> tuple[list[object], bool]:
    """One prompt or a batch of them -> (the prompts, whether the caller passed a batch); a prompt
    is a string or token ids (list, tuple, or an integer array/tensor; 2-D arrays are batches)."""
    if _is_array(prompts):  # torch tensors and numpy arrays: 1-D ids or 2-D (a batch of them)
        prompts = prompts.tolist()  # type: ignore[union-attr]
    if isinstance(prompts, str):
        return [prompts], False
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
        raise TypeError(f"prompts {_short(prompts)} have type {type(prompts).__name__}; {PROMPT_HELP}")
    if len(prompts) == 0:
        raise ArgumentError("no prompts given")
    if any(isinstance(p, numbers.Number) for p in prompts):  # token ids (encode names a bad one)
        return [prompts], False
    return list(prompts), True


def sampling_params(sampling: dict[str, Any]) -> SamplingParams:
    stop = sampling.pop("stop", None) or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    try:
        return SamplingParams(stop=stop, **sampling)
    except TypeError as exc:
        raise TypeError(f"{exc}; valid options: max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos") from None


__all__ = ["GenerationResult", "GenerationStats", "PROMPT_HELP", "Piece", "SequenceOutput", "Stream",
           "sampling_params", "split_batch", "stop_prefix_len", "token_ids_of"]
