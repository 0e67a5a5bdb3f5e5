"""The prompt cache: a request whose prompt starts with tokens seen before prefills only the rest.

Why this module exists: a chat client re-sends the whole conversation every turn (llama.cpp's
``cache_prompt``, OpenAI's cached prompt tokens). When a ``cache_prompt=True`` request ends, its
tokens (prompt and reply) and their KV stay behind as an *entry*; the next request that starts with
a prefix of an entry's tokens reuses that KV and feeds only the tokens after it.

An entry is a sequence parked in the scheduler exactly like an idle ``Session`` (``core.Seq`` with
``session=True``), so its KV lives in the tiered KV under the budgets: on its cache while the device
room allows, moved to host memory and then to disk (least recently used first) when other sequences
need the room. Entries beyond ``limit_tokens`` of KV are evicted oldest first.

A hit that reuses an entry's whole KV *moves* the entry into the request (no copy; it is out of the
index while in use, so no second sequence gets it); a hit on part of an entry *copies* that prefix
(host tensors, or a parked file when the host room is full) and leaves the entry for others. At the
request's end its sequence becomes the new entry and entries it extends are dropped as redundant.

With a ``directory`` (``load(sessions_dir=...)``) every entry is also written there as a session
file (``session_file``: atomic rename, checksums, the model fingerprint) when it is made, so a crash
loses at most the entry being written; a new engine on that directory restores them (a file of
another model, or a damaged one, is skipped with a warning). All methods run under the core lock.
"""

from __future__ import annotations

import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tierkv.core import Seq
from tierkv.errors import ArgumentError, TierkvError
from tierkv.plan import DEFAULT_CONTEXT_TOKENS
from tierkv.session import ParkedFile, copy_durably, fingerprint_of
from tierkv.session_file import SUFFIX, SessionError, SessionReader

if TYPE_CHECKING:
    from tierkv.core import EngineCore
    from tierkv.engine import Engine

__all__ = ["PromptCache", "default_limit_tokens"]

FILE_PREFIX = "prompt-"
HostKV = list[tuple[torch.Tensor, torch.Tensor]]     # per layer (k, v), each (1, Hkv, T, D) on the CPU


@dataclass
class Entry:
    """One cached prefix: a parked sequence, its tokens, and its durable file (if written)."""

    seq: Seq
    tokens: list[int]               # prompt + reply; KV covers the first kv_tokens of them
    durable: Path | None
    last_used: int
    in_use_kv: int | None = None    # moved into a running request: its KV positions from before (stable)


def default_limit_tokens(engine: "Engine") -> int:
    """KV tokens the cache keeps unless told: four contexts of the size the planner keeps room for."""
    context = engine.policy.kv_device_tokens or min(DEFAULT_CONTEXT_TOKENS, engine.config.max_position_embeddings)
    return 4 * context


class PromptCache:
    """Entries of one engine (see the module docstring)."""

    def __init__(self, engine: "Engine", core: "EngineCore", limit_tokens: int | None,
                 directory: str | Path | None) -> None:
        if limit_tokens is not None and (isinstance(limit_tokens, bool) or not isinstance(limit_tokens, int)
                                         or limit_tokens < 0):
            raise ArgumentError(f"prompt_cache_tokens={limit_tokens!r}: give a whole number of tokens >= 0 "
                                "(0 keeps no prompts)")
        self.engine, self.core = engine, core
        self.limit_tokens = default_limit_tokens(engine) if limit_tokens is None else limit_tokens
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.entries: dict[int, Entry] = {}          # seq_id -> entry (not in use)
        self._taken: dict[int, Entry] = {}           # seq_id -> a moved entry in use (a source of copies)
        self._clock = 0
        self.hits = self.hit_tokens = self.misses = self.evictions = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            with core.held():
                self._restore_all()

    # -- lookup -------------------------------------------------------------------------------
    def take(self, ids: list[int]) -> tuple[Seq, int]:
        """A sequence for a request of prompt ``ids`` and how many of its first tokens have KV in it.
        The request feeds ``ids[cached:]`` (at least one token, to sample from)."""
        best, n = self._longest(ids)
        seq = None
        if best is not None and best.in_use_kv is None and n == self._kv_tokens(best.seq):
            seq = self._move(best)
        elif best is not None:
            try:
                seq = self._copy(best, n)
            except (SessionError, OSError) as exc:       # its file was damaged since: a miss, and gone
                warnings.warn(f"a prompt cache entry could not be read ({exc}); it is dropped", RuntimeWarning,
                              stacklevel=2)
                if best.in_use_kv is None:
                    self._evict(best)
        if seq is None:
            self.misses += 1
            seq, n = Seq(self.core.new_id(), session=True, prompt_cache=True), 0
        else:
            self.hits += 1
            self.hit_tokens += n
        seq.history, seq.unfed = list(ids), []
        return seq, n

    def _longest(self, ids: list[int]) -> tuple[Entry | None, int]:
        """The entry (idle, or in use: then only copied) sharing the longest usable prefix with ``ids``
        (idle and newest first on a tie), and the length of that prefix."""
        best, best_n = None, 0
        idle = sorted(self.entries.values(), key=lambda e: -e.last_used)
        for entry in idle + list(self._taken.values()):
            kv = self._kv_tokens(entry.seq) if entry.in_use_kv is None else entry.in_use_kv
            n = min(len(os.path.commonprefix([entry.tokens, ids])), kv, len(ids) - 1)
            if n > best_n:
                best, best_n = entry, n
        return best, best_n

    def _kv_tokens(self, seq: Seq) -> int:
        scheduler = self.core.scheduler
        return scheduler.computed_tokens(seq.seq_id) if seq.seq_id in scheduler else 0

    def _move(self, entry: Entry) -> Seq:
        """The whole entry goes to the request: out of the index until the request ends."""
        del self.entries[entry.seq.seq_id]
        entry.in_use_kv = self._kv_tokens(entry.seq)
        self._taken[entry.seq.seq_id] = entry
        return entry.seq

    def _copy(self, entry: Entry, tokens: int) -> Seq:
        """A new parked sequence holding a copy of the first ``tokens`` positions of the entry's KV."""
        core = self.core
        seq = Seq(core.new_id(), session=True, prompt_cache=True, geometry=_geometry(entry.seq))
        seq.parked = self._prefix(entry.seq, tokens)
        entry.last_used = self._tick()
        core.seqs[seq.seq_id] = seq
        # host tensors outside the host budget until the request's admission (the next step) moves them in
        core.scheduler.add_parked(seq.seq_id, tokens, "host")
        return seq

    def _prefix(self, seq: Seq, tokens: int) -> HostKV:
        """Host copies of the first ``tokens`` positions of ``seq``'s KV, wherever it is (between steps:
        a running sequence's cache holds them unchanged, it only appends after them)."""
        room = self.core.room
        if seq.cache is not None or isinstance(seq.parked, list):
            return room.host_copy(room.reader(seq)[0], tokens)
        layers: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in range(self.engine.config.num_layers)]
        with SessionReader(seq.parked.path, expect_fingerprint=seq.parked.fingerprint) as reader:
            for start, end, kv in reader.pieces():
                for (ks, vs), (k, v) in zip(layers, kv):
                    ks.append(k[:, :, :tokens - start])
                    vs.append(v[:, :, :tokens - start])
                if end >= tokens:
                    break
        return [(torch.cat(ks, dim=2), torch.cat(vs, dim=2)) for ks, vs in layers]

    # -- the end of a request ---------------------------------------------------------------------
    def keep(self, seq: Seq) -> None:
        """A request's sequence ended (parked by the scheduler): it becomes an entry."""
        old = _durable(self._taken.pop(seq.seq_id, None))
        kv = self._kv_tokens(seq)
        if kv == 0 or kv > self.limit_tokens:
            self.core.release(seq)
            _unlink(old)
            return
        entry = Entry(seq, list(seq.history), None, self._tick())
        redundant = [e for e in self.entries.values() if self._extends(entry, kv, e)]
        self.entries[seq.seq_id] = entry
        if self.directory is not None:
            self._write(entry)                                  # the new file first: a crash keeps the old ones
        for other in redundant:
            self._evict(other, counted=False)
        _unlink(old)
        self._evict_over_limit()

    def _extends(self, entry: Entry, kv: int, other: Entry) -> bool:
        """Whether ``entry`` (``kv`` tokens of KV) holds all of ``other``'s KV prefix: ``other`` is redundant."""
        n = self._kv_tokens(other.seq)
        return n <= kv and other.tokens[:n] == entry.tokens[:n]

    def lost(self, seq: Seq) -> None:
        """A cache sequence's KV was dropped (an error in a step, a failed move): forget it. A moved
        entry whose durable file still exists comes back from that file."""
        old = _durable(self._taken.pop(seq.seq_id, None))
        self.entries.pop(seq.seq_id, None)
        self.core.release(seq)
        if old is not None and old.is_file():
            self._restore(old, self._tick())

    def refill(self, seq: Seq, exc: Exception) -> bool:
        """The cached KV of a request that has not run yet could not be brought back (its file was
        deleted or damaged since): the request prefills its whole prompt instead. False if it ran."""
        turn = seq.turn
        if turn is None or turn.out is None or turn.fed > 0:
            return False
        warnings.warn(f"a prompt cache entry could not be restored ({exc}); the prompt is prefilled instead",
                      RuntimeWarning, stacklevel=2)
        entry = self._taken.pop(seq.seq_id, None)
        if entry is not None:
            _unlink(entry.durable)
        core, prompt = self.core, list(turn.out.prompt_ids)
        core.room.drop(seq)
        core.scheduler.close(seq.seq_id)
        turn.pending, seq.history = list(prompt), list(prompt)
        turn.stats.cached_prompt_tokens = turn.stats.cached_tokens = 0
        turn.stats.prefill_tokens = len(prompt)
        core.scheduler.add(seq.seq_id, len(prompt), len(prompt) + turn.params.max_new_tokens - 1, session=True)
        return True

    def _evict_over_limit(self) -> None:
        while self.entries and self.tokens() > self.limit_tokens:
            self._evict(min(self.entries.values(), key=lambda e: e.last_used))

    def _evict(self, entry: Entry, counted: bool = True) -> None:
        del self.entries[entry.seq.seq_id]
        self.core.release(entry.seq)
        _unlink(entry.durable)
        self.evictions += counted

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def tokens(self) -> int:
        """KV tokens held by the entries (those in use not counted)."""
        return sum(self._kv_tokens(e.seq) for e in self.entries.values())

    # -- persistence --------------------------------------------------------------------------------
    def save(self) -> int:
        """Write every entry not yet in the directory; returns how many were written."""
        if self.directory is None:
            raise ArgumentError("this engine keeps its prompt cache in memory only; load it with "
                                "sessions_dir=DIR (tierkv serve --sessions-dir DIR) to save it")
        fresh = [e for e in self.entries.values() if e.durable is None or not e.durable.is_file()]
        return sum(self._write(e) for e in fresh)

    def _write(self, entry: Entry) -> bool:
        """Write one entry's tokens and KV to a new file of the directory (atomically); a failure (a full
        disk) leaves the entry in memory only, with a warning, and ``save`` tries again."""
        assert self.directory is not None
        seq, path = entry.seq, self.directory / f"{FILE_PREFIX}{uuid.uuid4().hex[:16]}{SUFFIX}"
        try:
            if isinstance(seq.parked, ParkedFile):        # parked on disk already: a durable copy of that file
                copy_durably(seq.parked.path, path)
            else:
                read, n = self.core.room.reader(seq)
                seq.geometry = _geometry(seq)
                ParkedFile.write(path, self.engine, seq, read, n, owned=False)
        except (OSError, TierkvError) as exc:
            warnings.warn(f"a prompt cache entry could not be written to {self.directory} ({exc}); it is kept "
                          "in memory only", RuntimeWarning, stacklevel=2)
            return False
        entry.durable = path
        return True

    def _restore_all(self) -> None:
        assert self.directory is not None
        files = sorted(self.directory.glob(f"{FILE_PREFIX}*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
        for path in files:
            self._restore(path, self._tick())
        self._evict_over_limit()

    def _restore(self, path: Path, last_used: int) -> None:
        """An entry from its file, parked on disk; a file of another model or a damaged one is skipped."""
        fingerprint = fingerprint_of(self.engine)
        try:
            with SessionReader(path, expect_fingerprint=fingerprint, expect_model=self.engine.model_dir.name,
                               expect_dtype=self.engine.dtype) as reader:
                header = reader.header
                for _ in reader.pieces():                   # every piece's checksum, before a request relies on it
                    pass
        except (SessionError, OSError) as exc:
            warnings.warn(f"prompt cache file skipped: {exc}", RuntimeWarning, stacklevel=2)
            return
        if header.kv_tokens == 0 or header.kv_tokens > self.limit_tokens:
            return
        core = self.core
        seq = Seq(core.new_id(), session=True, prompt_cache=True, history=list(header.token_ids),
                  geometry=header.geometry or None)
        seq.parked = ParkedFile(path, fingerprint, owned=False)
        core.seqs[seq.seq_id] = seq
        core.scheduler.add_parked(seq.seq_id, header.kv_tokens, "disk")
        self.entries[seq.seq_id] = Entry(seq, list(header.token_ids), path, last_used)

    def close(self) -> None:
        """Persist what is not yet in the directory (the engine is closing)."""
        if self.directory is not None:
            self.save()

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self.entries), "tokens": self.tokens(), "hits": self.hits,
                "hit_tokens": self.hit_tokens, "misses": self.misses, "evictions": self.evictions,
                "in_use": len(self._taken), "limit_tokens": self.limit_tokens,
                "directory": str(self.directory) if self.directory is not None else None}


def _geometry(seq: Seq) -> dict[str, Any] | None:
    return seq.cache.geometry() if seq.cache is not None else seq.geometry


def _durable(entry: Entry | None) -> Path | None:
    return entry.durable if entry is not None else None


def _unlink(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)
