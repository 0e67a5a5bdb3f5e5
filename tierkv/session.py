"""Sessions: a conversation whose KV cache stays between turns, saved to disk and restored later.

Why this module exists: a chat re-sends its whole history every turn; re-prefilling it costs more
each turn. A ``Session`` keeps its sequence in the engine between turns (parked: its cache kept,
or moved to host memory or disk when others need the room), so a turn prefills only its new
tokens (and the last reply token, which was sampled but never fed). ``save`` writes the history
and the KV to a session file (``session_file``: crash-safe, checksummed, tied to the model and
dtype by a fingerprint); ``Engine.restore_session`` brings it back. ``ParkedFile`` is the same
file used by the engine itself for sessions it moved to disk.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from tierkv.core import Client, Seq, new_turn
from tierkv.errors import ArgumentError
from tierkv.generation import GenerationResult, SequenceOutput, Stream, sampling_params
from tierkv.session_file import SessionHeader, SessionReader, model_fingerprint, write_session

if TYPE_CHECKING:
    from tierkv.engine import Engine

__all__ = ["ParkedFile", "Session", "copy_durably", "grown_capacity"]

ReadKV = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]


class ParkedFile:
    """A session file holding a sequence's KV off any cache; ``owned`` files are the engine's to delete."""

    def __init__(self, path: Path, fingerprint: str, owned: bool) -> None:
        self.path, self.fingerprint, self.owned = path, fingerprint, owned

    @classmethod
    def write(cls, path: Path, engine: "Engine", seq: Seq, read: ReadKV, kv_tokens: int, owned: bool) -> "ParkedFile":
        """Write ``seq``'s history and ``kv_tokens`` positions of KV (from ``read``) to ``path`` (atomically)."""
        cfg, fingerprint = engine.config, fingerprint_of(engine)
        header = SessionHeader(fingerprint=fingerprint, model=engine.model_dir.name,
                               dtype=str(engine.dtype).removeprefix("torch."), num_layers=cfg.num_layers,
                               num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, token_ids=tuple(seq.history),
                               kv_tokens=kv_tokens, geometry=seq.geometry or {})
        path.parent.mkdir(parents=True, exist_ok=True)
        write_session(path, header, read)
        return cls(path, fingerprint, owned)

    def restore_into(self, cache: Any) -> None:
        """Feed the file's KV into the empty ``cache``, piece by piece (every layer, then advance)."""
        with SessionReader(self.path, expect_fingerprint=self.fingerprint) as reader:
            for start, end, layers in reader.pieces():
                for layer, (k, v) in enumerate(layers):
                    cache.append_kv(layer, k, v)
                cache.advance(end - start)

    def discard(self) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)


def fingerprint_of(engine: "Engine") -> str:
    cached = getattr(engine, "_session_fingerprint", None)
    if cached is None:
        cached = model_fingerprint(engine.model_dir, engine.config, engine.dtype, engine.policy.weight_quant)
        engine._session_fingerprint = cached      # computed once per engine (reads safetensors headers)
    return cached


class Session:
    """A conversation on one engine. Each ``generate``/``stream`` call is a turn: its prompt is the
    turn's NEW text or token ids (a chat template's rendering of the new messages), appended to the
    history; the reply is appended too. One turn at a time per session."""

    def __init__(self, engine: "Engine", seq: Seq) -> None:
        self._engine, self._seq = engine, seq
        self._closed = False

    @property
    def token_ids(self) -> list[int]:
        """The whole history: every turn's prompt and reply tokens."""
        return list(self._seq.history)

    def generate(self, prompt: Any, **sampling: Any) -> GenerationResult:
        """One turn, run to its end. Stats: ``prefill_tokens`` (fed now), ``cached_tokens`` (kept KV)."""
        client = self._turn(prompt, sampling)
        self._engine._core.drain(client)
        return client.results[0]

    def stream(self, prompt: Any, **sampling: Any) -> Stream:
        """One turn as a Stream of Pieces."""
        return self._engine._stream_of(self._turn(prompt, sampling))

    def _turn(self, prompt: Any, sampling: dict[str, Any]) -> Client:
        engine, seq = self._engine, self._seq
        ids, params = engine.encode(prompt), sampling_params(sampling)
        client, core = Client(1), engine._core
        with core.held():
            self._check_usable()
            total = len(seq.history) + len(ids)
            if total > engine.context_limit_tokens:
                raise ArgumentError(f"the conversation would have {total} tokens but the model allows at most "
                                    f"{engine.context_limit_tokens}; start a new session")
            cached = core.scheduler.computed_tokens(seq.seq_id) if seq.seq_id in core.scheduler else 0
            pending = seq.unfed + ids
            seq.history += ids
            budget = engine.new_tokens_budget(total, params)
            if budget == 0:
                seq.unfed = pending                           # fed by the next turn
                client.end_empty(0, ids)
                return client
            params = replace(params, max_new_tokens=budget)
            out = SequenceOutput(ids, engine.tokenizer, engine.eos_token_ids, params)
            turn = new_turn(client, 0, params, pending, out, engine._weights.stats, engine.device,
                            engine.prefill_chunk_tokens, cached_tokens=cached)
            seq.unfed = []
            core.start(seq, turn, self._capacity(cached + len(pending) + budget - 1))
        return client

    def keep(self, tokens: int) -> None:
        """Keep only the first ``tokens`` of the history (and their KV): the next turn continues from there.

        Used when a chat template renders the conversation differently from the tokens the model
        produced: the longest common prefix keeps its KV (copied off the cache, no recompute) and the
        rest is fed again."""
        engine = self._engine
        with engine._core.held() as core:
            self._check_usable()
            seq = self._seq
            tokens = max(0, min(tokens, len(seq.history)))
            kv_n = core.scheduler.computed_tokens(seq.seq_id) if seq.seq_id in core.scheduler else 0
            seq.history = seq.history[:tokens]
            if tokens < kv_n:
                self._keep_kv(core, tokens)
                kv_n = tokens if seq.seq_id in core.scheduler else 0
            seq.unfed = seq.history[kv_n:]

    def _keep_kv(self, core: Any, tokens: int) -> None:
        """The KV of the first ``tokens`` positions, off the cache (host tensors or a file); the rest dropped."""
        seq, room = self._seq, core.room
        if tokens == 0 or (seq.cache is None and not isinstance(seq.parked, list)):
            room.drop(seq)                      # nothing to keep, or it is in a file: the next turn prefills
            core.scheduler.close(seq.seq_id)
            return
        kept = room.host_copy(room.reader(seq)[0], tokens)
        if seq.cache is not None:
            seq.geometry = seq.cache.geometry()
        room.drop(seq)
        seq.parked = kept
        if core.scheduler.truncate(seq.seq_id, tokens) == "disk":
            seq.parked = room.spill(seq)

    def _capacity(self, need: int) -> int:
        return grown_capacity(self._seq, need, self._engine.context_limit_tokens)

    def save(self, path: str | Path | None = None) -> Path:
        """Write the history and KV to ``path`` (default ``<offload_dir>/sessions/<id>.tkvs``), atomically."""
        engine = self._engine
        with engine._core.held() as core:
            self._check_usable()
            seq = self._seq
            if path is None:
                base = core.room.offload_dir
                if base is None:
                    raise ArgumentError("this engine has no offload directory; pass a path to Session.save()")
                path = base / "sessions" / f"session-{seq.seq_id}-{int(time.time())}.tkvs"
            path = Path(path)
            if isinstance(seq.parked, ParkedFile):        # the KV is on disk already: restore, then save
                return self._save_from_file(path)
            read, n = core.room.reader(seq) if (seq.cache is not None or seq.parked is not None) else (None, 0)
            if seq.cache is not None:
                seq.geometry = seq.cache.geometry()
            ParkedFile.write(path, engine, seq, read or _no_kv, n, owned=False)
            return path

    def _save_from_file(self, path: Path) -> Path:
        """The KV was moved to a file of the engine's: the saved file is a durable copy of it."""
        copy_durably(self._seq.parked.path, path)
        return path

    @classmethod
    def restore(cls, engine: "Engine", path: Path) -> "Session":
        """A session from ``path`` (validated against this engine's model and dtype)."""
        fingerprint = fingerprint_of(engine)
        with SessionReader(path, expect_fingerprint=fingerprint) as reader:
            header = reader.header
        with engine._core.held() as core:
            engine._check_open()
            seq = Seq(core.new_id(), session=True, history=list(header.token_ids),
                      unfed=list(header.token_ids[header.kv_tokens:]), geometry=header.geometry or None)
            core.seqs[seq.seq_id] = seq
            if header.kv_tokens > 0:
                seq.parked = ParkedFile(path, fingerprint, owned=False)
                core.scheduler.add_parked(seq.seq_id, header.kv_tokens, "disk")
        return cls(engine, seq)

    def _check_usable(self) -> None:
        self._engine._check_open()
        if self._closed:
            raise RuntimeError("this Session is closed; start a new one with engine.session()")
        if self._seq.turn is not None:
            raise RuntimeError("a turn of this session is still running; iterate its stream to the end or "
                               "close it before the next turn")

    def close(self) -> None:
        """Free the session's KV (every tier and any file the engine wrote for it). Idempotent."""
        if self._closed:
            return
        with self._engine._core.held() as core:
            self._closed = True
            if self._seq.turn is not None:
                core.finish(self._seq, "cancelled")
            if self._seq.seq_id in core.seqs:
                core.release(self._seq)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def grown_capacity(seq: Seq, need: int, limit: int) -> int:
    """A resumed sequence's cache capacity: what it needs; a cache it outgrows is replaced by one twice
    as large (within the model's ``limit``), so a growing conversation is rehoused rarely."""
    have = getattr(seq.cache, "capacity_tokens", 0) if seq.cache is not None else 0
    return need if need <= have else min(limit, max(need, 2 * have))


def copy_durably(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` atomically: a temp file beside ``dst``, fsync, rename, fsync of the directory."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 8 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_kv(layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    raise AssertionError("a session with no KV has nothing to read")
