"""The step scheduler: which sequences run in the next forward, with how many tokens, and who gets KV room.

Why this module exists: one engine serves many sequences (threads streaming at once, ragged batches,
conversations kept between turns). Deciding, before each step, which sequences join, which feed a
prefill piece and which decode one token, and how the KV room is shared, is pure bookkeeping over
counts and byte sizes (vLLM v1's split): it holds no tensors, so it is tested without a model, and
the engine only executes the ``StepPlan`` it returns.

Model:
- A sequence has ``pending_tokens`` to feed before its next sample (its prompt, a session's new
  turn, or the one token it sampled last step) and ``computed_tokens`` already in its KV cache.
- Each step holds every running sequence that has one token pending (decode rows, oldest first),
  then prefill pieces of ``piece_tokens`` (the last piece of a prompt may be shorter) while the step's
  ``token_budget`` lasts. A piece is never cut to fit the budget, so a sequence's pieces fall on the
  same boundaries as when it runs alone (its tokens, chunking and sparse selection are its solo ones).
  When decode rows leave no room for a waiting piece, the next step runs pieces first, so a
  joining request is never starved by a long decode.
- Admission is first come, first served: a waiting sequence joins when fewer than ``max_running``
  run and the device KV room left holds its minimum (``KVSizer.minimum_bytes``); it is allotted
  what it wants (``want_bytes``) or what is left, and host room likewise (possibly nothing: its
  cold chunks then go to disk). Finished sequences return their room at once.
- Sessions keep their KV between turns (status PARKED, room still allotted). When a waiting
  sequence does not fit, idle sessions give their device room back first, least recently used
  first: their KV moves to the host while the host room lasts, else to disk (``StepPlan.offload``);
  a session on the host moves on to disk when the host room is needed. A resumed session whose KV
  was moved is restored when it is admitted again. Only a sequence that could not fit even with
  nothing else holding room is refused.
- Batch jobs (``Limits.longest_first``, and always with micro-batches): prefill pieces are packed
  largest first, ties to the longest prompt, instead of by arrival (first-fit decreasing packs a
  step nearly full, where arrival order left 40% of the groups empty on ragged prompts and ran a
  short prompt alone in a pass the long pieces beside it could not share; and the longest prompts,
  whose decoding ends the job, start first). A server keeps arrival order: a short request's first
  token never waits behind a longer one that came later (longest first, an admitted short prompt may
  wait while longer pieces keep arriving; a batch job's prompts are finite, so the wait is too).
- Throughput mode (``Limits.micro_batches`` > 1, FlexGen's block schedule): a step holds up to that
  many groups of rows, each within ``token_budget`` (the activations the plan keeps room for are one
  group's); the runner runs the groups one after another per layer while the layer's weights stay
  loaded. Rows are packed first-fit into the groups (``Row.group``): decode rows, then prefill pieces
  largest first. With ``share_room``, sequences
  admitted together split the free device and host room evenly (never below a sequence's minimum,
  never above what it wants), so a batch larger than the room holds at full size runs at once, each
  cache spilling its cold KV, instead of the first few taking the whole room.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

__all__ = ["Admission", "KVSizer", "Limits", "Offload", "Row", "Scheduler", "SeqStatus", "StepPlan"]


class KVSizer(Protocol):
    """Byte sizes of one sequence's KV cache, from the KV package's pure sizing functions."""

    def minimum_bytes(self, capacity_tokens: int) -> int:
        """Fewest device bytes a cache for ``capacity_tokens`` runs with (the rest spills)."""
        ...

    def want_bytes(self, capacity_tokens: int) -> int:
        """Most device bytes such a cache would use if the room were unbounded."""
        ...

    def host_bytes(self, tokens: int) -> int:
        """Host bytes that ``tokens`` tokens of KV take (a cache's cold tier, or a parked session)."""
        ...


@dataclass(frozen=True)
class Limits:
    """What one step may hold: tokens (activations), sequences, and the KV rooms (None = unbounded)."""

    token_budget: int
    piece_tokens: int
    max_running: int
    device_room_bytes: int | None
    host_room_bytes: int | None
    micro_batches: int = 1       # groups of rows per step, each within token_budget
    share_room: bool = False     # sequences admitted together split the free room evenly
    longest_first: bool = False  # prefill pieces largest first (always with micro-batches), else by arrival

    def __post_init__(self) -> None:
        assert 1 <= self.piece_tokens <= self.token_budget, (self.piece_tokens, self.token_budget)
        assert self.max_running >= 1 and self.micro_batches >= 1


class SeqStatus(str, Enum):
    WAITING = "waiting"      # not admitted: no cache yet (or its KV was moved off while parked)
    RUNNING = "running"      # has a cache and rows to run
    PARKED = "parked"        # a session between turns: KV kept (on its cache, the host, or disk)


@dataclass
class _Seq:
    seq_id: int
    pending_tokens: int
    capacity_tokens: int
    session: bool
    arrival: int
    status: SeqStatus = SeqStatus.WAITING
    computed_tokens: int = 0
    device_bytes: int = 0          # allotted device room (0 while waiting or offloaded)
    host_bytes: int = 0            # allotted host room: the cache's cold tier, or the parked KV itself
    kv_place: str = "none"         # "none" (no KV yet), "cache", "host", "disk"
    last_used: int = 0


@dataclass(frozen=True)
class Row:
    """One sequence's share of a step: feed tokens [start, start + num_tokens) of its pending ones."""

    seq_id: int
    start: int                   # position of the first token (= tokens already in its KV)
    num_tokens: int
    samples: bool                # this row feeds its last pending token: sample from its logits
    group: int = 0               # the micro-batch it runs in (throughput mode)


@dataclass(frozen=True)
class Admission:
    """Open (or grow) a sequence's cache with this room; ``restore`` says where its kept KV is."""

    seq_id: int
    capacity_tokens: int
    device_bytes: int
    host_bytes: int
    restore: str                 # "none", "cache" (rehouse into a larger cache), "host" or "disk"


@dataclass(frozen=True)
class Offload:
    """Move a parked session's KV off its cache (or off the host) to ``to`` ("host" or "disk")."""

    seq_id: int
    to: str


@dataclass(frozen=True)
class StepPlan:
    """What the engine does this step, in order: offloads, refusals, admissions, then one forward."""

    offload: tuple[Offload, ...] = ()
    refuse: tuple[tuple[int, str], ...] = ()     # (seq_id, why)
    admit: tuple[Admission, ...] = ()
    rows: tuple[Row, ...] = ()


@dataclass
class _Counters:
    steps: int = 0
    arrivals: int = 0
    pieces_first: bool = False    # the last step left a piece waiting behind decode rows


class Scheduler:
    """Pure bookkeeping of live sequences (see the module docstring). Not thread-safe: the engine
    calls it under its step lock."""

    def __init__(self, limits: Limits, sizer: KVSizer) -> None:
        self.limits, self._sizer = limits, sizer
        self._seqs: dict[int, _Seq] = {}
        self._c = _Counters()
        self._device_used = 0
        self._host_used = 0

    # -- requests ---------------------------------------------------------------------------------
    def add(self, seq_id: int, pending_tokens: int, capacity_tokens: int, session: bool = False) -> None:
        """A new sequence with ``pending_tokens`` to prefill and a cache for ``capacity_tokens``."""
        assert seq_id not in self._seqs and pending_tokens >= 1 and capacity_tokens >= pending_tokens
        self._c.arrivals += 1
        self._seqs[seq_id] = _Seq(seq_id, pending_tokens, capacity_tokens, session, self._c.arrivals)

    def add_parked(self, seq_id: int, computed_tokens: int, place: str) -> None:
        """A session restored from a file: ``computed_tokens`` of KV kept at ``place`` ("disk"), no room yet;
        or ("host") a prompt cache prefix copied for a request that resumes it at once (its admission
        takes its room)."""
        assert seq_id not in self._seqs and place in ("host", "disk")
        self._c.arrivals += 1
        self._seqs[seq_id] = _Seq(seq_id, 0, max(1, computed_tokens), True, self._c.arrivals, SeqStatus.PARKED,
                                  computed_tokens, kv_place=place, last_used=self._c.steps)

    def resume(self, seq_id: int, pending_tokens: int, capacity_tokens: int) -> None:
        """A parked session's next turn: ``pending_tokens`` new tokens, room for ``capacity_tokens`` in all."""
        s = self._seqs[seq_id]
        assert s.status is SeqStatus.PARKED and pending_tokens >= 1
        s.pending_tokens = pending_tokens
        self._c.arrivals += 1
        s.arrival = self._c.arrivals
        grow = capacity_tokens > s.capacity_tokens
        s.capacity_tokens = max(s.capacity_tokens, capacity_tokens)
        # its KV must come back from the host or disk, or move into a larger cache: admit it again
        s.status = SeqStatus.RUNNING if s.kv_place == "cache" and not grow else SeqStatus.WAITING

    def fed(self, row: Row) -> None:
        """The engine ran ``row``: its tokens are in the KV now."""
        s = self._seqs[row.seq_id]
        s.computed_tokens += row.num_tokens
        s.pending_tokens -= row.num_tokens
        s.last_used = self._c.steps
        assert s.pending_tokens >= 0

    def sampled(self, seq_id: int) -> None:
        """The sequence sampled a token and goes on: that token is fed next step."""
        s = self._seqs[seq_id]
        assert s.pending_tokens == 0, "sampled before its pending tokens were fed"
        s.pending_tokens = 1

    def finish(self, seq_id: int) -> None:
        """A sequence ended (stop, length, cancel, error): a plain one leaves and frees its room; a
        session parks with its KV (``close`` frees it)."""
        s = self._seqs.get(seq_id)
        if s is None:
            return
        if not s.session:
            self.close(seq_id)
            return
        if s.kv_place == "none":      # nothing kept (refused or cancelled before its first piece ran)
            self._give_back(s, device=True, host=True)
        s.status, s.pending_tokens, s.last_used = SeqStatus.PARKED, 0, self._c.steps

    def truncate(self, seq_id: int, tokens: int) -> str:
        """A parked session keeps only its first ``tokens`` of KV, moved off its cache (the engine copies
        them): to the host while the host room holds them, else to disk. Returns where they go."""
        s = self._seqs[seq_id]
        assert s.status is SeqStatus.PARKED and 0 < tokens <= s.computed_tokens
        self._give_back(s, device=True, host=True)
        s.computed_tokens = tokens
        size, host_room = self._sizer.host_bytes(tokens), self.limits.host_room_bytes
        if host_room is None or host_room - self._host_used >= size:
            s.host_bytes = size
            self._host_used += size
            s.kv_place = "host"
        else:
            s.kv_place = "disk"
        return s.kv_place

    def close(self, seq_id: int) -> None:
        """Forget a sequence and free all its room."""
        s = self._seqs.pop(seq_id, None)
        if s is not None:
            self._give_back(s, device=True, host=True)

    def kept(self, seq_id: int, place: str) -> None:
        """The engine says where a sequence's KV is now ("cache", "host", "disk", "none")."""
        self._seqs[seq_id].kv_place = place

    # -- views ------------------------------------------------------------------------------------
    def status(self, seq_id: int) -> SeqStatus:
        return self._seqs[seq_id].status

    def computed_tokens(self, seq_id: int) -> int:
        return self._seqs[seq_id].computed_tokens

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def counts(self) -> dict[str, int]:
        by = {status: 0 for status in SeqStatus}
        for s in self._seqs.values():
            by[s.status] += 1
        parked = [s.kv_place for s in self._seqs.values() if s.status is SeqStatus.PARKED]
        return {"running_sequences": by[SeqStatus.RUNNING], "waiting_sequences": by[SeqStatus.WAITING],
                "parked_sessions": by[SeqStatus.PARKED], "device_allotted_bytes": self._device_used,
                "host_allotted_bytes": self._host_used, "parked_on_host": parked.count("host"),
                "parked_on_disk": parked.count("disk")}

    def has_work(self) -> bool:
        return any(s.status is not SeqStatus.PARKED for s in self._seqs.values())

    # -- the step ---------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """The next step's plan. Allotments in it are taken at once (the engine must carry them out)."""
        self._c.steps += 1
        offload, refuse, admit = self._admit()
        return StepPlan(tuple(offload), tuple(refuse), tuple(admit), tuple(self._rows()))

    def _rows(self) -> list[Row]:
        running = sorted((s for s in self._seqs.values() if s.status is SeqStatus.RUNNING), key=lambda s: s.arrival)
        decode = [s for s in running if s.pending_tokens == 1 and s.computed_tokens > 0]
        pieces = [s for s in running if s not in decode and s.pending_tokens > 0]
        if self.limits.micro_batches > 1 or self.limits.longest_first:   # largest pieces, longest prompts first
            pieces.sort(key=lambda s: (-min(self.limits.piece_tokens, s.pending_tokens), -s.pending_tokens))
        free, rows = [self.limits.token_budget] * self.limits.micro_batches, []
        order = (pieces, decode) if self._c.pieces_first else (decode, pieces)
        left_behind = False
        for group in order:
            for s in group:
                n = min(self.limits.piece_tokens, s.pending_tokens)
                g = next((g for g, left in enumerate(free) if n <= left), None)     # first fit
                if g is None:
                    left_behind |= group is pieces
                    continue
                free[g] -= n
                rows.append(Row(s.seq_id, s.computed_tokens, n, n == s.pending_tokens, g))
        self._c.pieces_first = left_behind and not self._c.pieces_first
        return sorted(rows, key=lambda r: self._seqs[r.seq_id].arrival)

    def _admit(self) -> tuple[list[Offload], list[tuple[int, str]], list[Admission]]:
        offload: list[Offload] = []
        refuse: list[tuple[int, str]] = []
        admit: list[Admission] = []
        waiting = sorted((s for s in self._seqs.values() if s.status is SeqStatus.WAITING), key=lambda s: s.arrival)
        for i, s in enumerate(waiting):
            if self._running() >= self.limits.max_running:
                break
            joining = waiting[i:i + self.limits.max_running - self._running()]         # s and those after it
            need = self._sizer.minimum_bytes(s.capacity_tokens)
            room = self.limits.device_room_bytes
            if room is not None and self._device_free(s) < need:
                offload += self._free_device(need - self._device_free(s), skip=s.seq_id)
            if room is not None and self._device_free(s) < need:
                if self._device_used == s.device_bytes and self._running() == 0:
                    refuse.append((s.seq_id, self._too_big(s, need, room)))
                    self.close(s.seq_id)
                    continue
                break                                  # first come, first served: wait for room
            admit.append(self._allot(s, joining if self.limits.share_room else [s]))
        return offload, refuse, admit

    def _device_free(self, s: _Seq) -> int:
        """Device room ``s`` may take: what is free plus what it already holds (a cache it outgrew)."""
        assert self.limits.device_room_bytes is not None
        return self.limits.device_room_bytes - self._device_used + s.device_bytes

    def _allot(self, s: _Seq, joining: list[_Seq]) -> Admission:
        """Room for ``s``'s new cache; what it held (an outgrown cache, KV parked on the host) comes back
        first. ``joining``: sequences joining now (``s`` first): when the free room holds what they all
        want, each gets it, else they split it evenly (``s`` never below its minimum)."""
        self._give_back(s, device=True, host=True)
        room, host_room = self.limits.device_room_bytes, self.limits.host_room_bytes
        want, n = self._sizer.want_bytes(s.capacity_tokens), len(joining)
        if room is None:
            s.device_bytes = want
        else:
            free = room - self._device_used
            share = free if sum(self._sizer.want_bytes(j.capacity_tokens) for j in joining) <= free else free // n
            s.device_bytes = min(want, free, max(self._sizer.minimum_bytes(s.capacity_tokens), share))
        host_want = self._sizer.host_bytes(s.capacity_tokens)
        if host_room is None:
            s.host_bytes = host_want
        else:
            free = host_room - self._host_used
            share = free if sum(self._sizer.host_bytes(j.capacity_tokens) for j in joining) <= free else free // n
            s.host_bytes = max(0, min(host_want, share))
        self._device_used += s.device_bytes
        self._host_used += s.host_bytes
        restore = s.kv_place if s.kv_place in ("cache", "host", "disk") else "none"
        s.status = SeqStatus.RUNNING
        return Admission(s.seq_id, s.capacity_tokens, s.device_bytes, s.host_bytes, restore)

    def _free_device(self, deficit: int, skip: int) -> list[Offload]:
        """Idle sessions whose caches give their device room back (least recently used first)."""
        moves: list[Offload] = []
        idle = sorted((s for s in self._seqs.values() if s.status is SeqStatus.PARKED and s.kv_place == "cache"
                       and s.seq_id != skip), key=lambda s: s.last_used)
        for s in idle:
            if deficit <= 0:
                break
            deficit -= s.device_bytes
            moves += self._move_off(s)
        return moves

    def _move_off(self, s: _Seq) -> list[Offload]:
        """A parked session's KV leaves its cache: to the host if the room holds it, else to disk."""
        self._give_back(s, device=True, host=True)
        size = self._sizer.host_bytes(s.computed_tokens)
        host_room = self.limits.host_room_bytes
        moves: list[Offload] = []
        if host_room is not None and host_room - self._host_used < size:
            moves += self._host_to_disk(size - (host_room - self._host_used))
        if host_room is None or host_room - self._host_used >= size:
            s.host_bytes = size
            self._host_used += size
            s.kv_place = "host"
            return moves + [Offload(s.seq_id, "host")]
        s.kv_place = "disk"
        return moves + [Offload(s.seq_id, "disk")]

    def _host_to_disk(self, deficit: int) -> list[Offload]:
        moves = []
        on_host = sorted((s for s in self._seqs.values() if s.status is SeqStatus.PARKED and s.kv_place == "host"),
                         key=lambda s: s.last_used)
        for s in on_host:
            if deficit <= 0:
                break
            deficit -= s.host_bytes
            self._give_back(s, device=False, host=True)
            s.kv_place = "disk"
            moves.append(Offload(s.seq_id, "disk"))
        return moves

    def _give_back(self, s: _Seq, device: bool, host: bool) -> None:
        if device:
            self._device_used -= s.device_bytes
            s.device_bytes = 0
        if host:
            self._host_used -= s.host_bytes
            s.host_bytes = 0

    def _running(self) -> int:
        return sum(s.status is SeqStatus.RUNNING for s in self._seqs.values())

    def _too_big(self, s: _Seq, need: int, room: int) -> str:
        return (f"a sequence of {s.capacity_tokens} tokens needs at least {need} bytes of device KV room, but the "
                f"plan keeps {room}; shorten the prompt or max_new_tokens, or raise --device-mem / --kv-device-tokens")

