"""Interval arithmetic over trace time (microseconds): unions, lengths, overlaps, membership.

Why this module exists: busy time, idle time and "inside a span" tests are the same few operations
on lists of (start, end) intervals, used by the analyzer's GPU/CPU metrics and by the per-link
move summary (``trace.moves``). Pure Python, no torch.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable


def merge_intervals(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of intervals as a sorted list of disjoint (start, end)."""
    out: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def covered_length(merged: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in merged)


def overlap_length(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


class SpanSet:
    """Merged spans with a membership test by bisection."""

    def __init__(self, merged: list[tuple[float, float]]) -> None:
        self.merged = merged
        self.starts = [s for s, _ in merged]

    def contains(self, t: float) -> bool:
        k = bisect.bisect_right(self.starts, t) - 1
        return k >= 0 and t <= self.merged[k][1]


__all__ = ["SpanSet", "covered_length", "merge_intervals", "overlap_length"]
