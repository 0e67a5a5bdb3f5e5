"""Move spans: the profiler names of the movement layer's transfers, and their per-link summary.

Why this module exists: every transfer that ``tierkv.io.mover`` runs is wrapped, on the thread that
does the work, in a ``torch.profiler.record_function`` span whose name carries the link, what moved
and how many bytes, so any chrome trace of a generation shows weight reads and copies (and KV
traffic routed through the same layer) without extra instrumentation. The name format is written
and parsed here only, torch-free, so the analyzer (which never imports torch) and the mover share
one definition:

    tierkv::move <src>-><dst> <what> <nbytes>B[ <part>/<parts>]

A move done in several pieces (a disk read split into requests over reader threads) gives one span
per piece, each with the piece's bytes and its 1-based part number; a move done in one piece has
no part suffix. So a link's moves are its spans without a part or with part 1, and its bytes are
the sum over all its spans.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from tierkv.trace.intervals import SpanSet, covered_length, merge_intervals

MOVE_SPAN_PREFIX = "tierkv::move "
_TIER_NAME = re.compile(r"\w+")
_SPAN = re.compile(r"tierkv::move (\w+)->(\w+) (.+) (\d+)B(?: (\d+)/(\d+))?")


def check_tier_name(name: str) -> str:
    """``name`` if it can appear in a span (letters, digits, underscore); asserts otherwise."""
    assert _TIER_NAME.fullmatch(name), f"tier name {name!r} must be a word (letters, digits, _)"
    return name


def move_span_name(src: str, dst: str, what: str, nbytes: int, part: int = 1, parts: int = 1) -> str:
    """The span name of one move (``parts == 1``) or of its piece ``part`` of ``parts`` (1-based)."""
    assert nbytes >= 0 and 1 <= part <= parts, (nbytes, part, parts)
    suffix = f" {part}/{parts}" if parts > 1 else ""
    return f"{MOVE_SPAN_PREFIX}{src}->{dst} {what} {nbytes}B{suffix}"


@dataclass(frozen=True)
class MoveSpan:
    """What one move span's name says."""

    src: str
    dst: str
    what: str
    nbytes: int
    part: int
    parts: int

    @property
    def link(self) -> str:
        return f"{self.src}->{self.dst}"

    @property
    def starts_move(self) -> bool:
        """Whether this span counts as one move (the whole move, or its first piece)."""
        return self.part == 1


def parse_move_span(name: str) -> MoveSpan | None:
    """The move a span name describes, or None for any other span."""
    m = _SPAN.fullmatch(name)
    if m is None:
        return None
    part, parts = (int(m[5]), int(m[6])) if m[5] else (1, 1)
    return MoveSpan(m[1], m[2], m[3], int(m[4]), part, parts)


@dataclass
class MoveRow:
    """One link's traffic in a trace: moves, bytes, span time and busy time (union of its spans).

    ``gbps`` is bytes / busy time (1e9 bytes/s; None when the spans take no time). For copies queued
    on a CUDA stream the span covers the host-side enqueue only; ``memcpy_us`` is the GPU time of
    the memcpys launched inside the link's spans (None when the trace holds no GPU activity).
    """

    link: str
    moves: int
    spans: int
    bytes: int
    span_us: float
    busy_us: float
    gbps: float | None
    memcpy_us: float | None


def move_rows(spans: Iterable[tuple[str, float, float]],
              memcpys: Iterable[tuple[float, float]] | None = None) -> list[MoveRow]:
    """One row per link, sorted, from ``(name, start_us, duration_us)`` spans (others are skipped).

    ``memcpys``: ``(launch_start_us, duration_us)`` of the trace's GPU memcpys, or None without GPU
    activity; a memcpy counts for a link when its launch call starts inside one of the link's spans.
    """
    by_link: dict[str, list[tuple[MoveSpan, float, float]]] = {}
    for name, ts, dur in spans:
        move = parse_move_span(name) if name.startswith(MOVE_SPAN_PREFIX) else None
        if move is not None:
            by_link.setdefault(move.link, []).append((move, ts, dur))
    copies = None if memcpys is None else list(memcpys)
    rows = []
    for link, items in sorted(by_link.items()):
        merged = merge_intervals((ts, ts + dur) for _, ts, dur in items)
        busy, inside = covered_length(merged), SpanSet(merged).contains
        nbytes = sum(m.nbytes for m, _, _ in items)
        rows.append(MoveRow(link, sum(m.starts_move for m, _, _ in items), len(items), nbytes,
                            sum(dur for _, _, dur in items), busy, nbytes / busy / 1e3 if busy > 0 else None,
                            None if copies is None else sum(d for t, d in copies if inside(t))))
    return rows


__all__ = ["MOVE_SPAN_PREFIX", "MoveRow", "MoveSpan", "check_tier_name", "move_rows", "move_span_name",
           "parse_move_span"]
