"""CPU-bound or GPU-bound: the verdict rule for one trace, and the transition across a sweep.

Why this module exists: the rule that turns a trace's GPU metrics into a verdict, and the search
for the batch size where the verdict flips (and for the TKLQT knee), are the tracer's policy; the
metrics themselves (``analyze``) stay free of it. Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tierkv.trace.analyze import GpuMetrics, TraceReport

NO_GPU_REASON = "trace holds no GPU kernels"


@dataclass
class Verdict:
    """CPU-bound or GPU-bound for one trace, with the signals the rule used."""

    bound: str | None
    reason: str
    gpu_idle_share: float | None
    queue_to_launch: float | None
    rule: str


@dataclass(frozen=True)
class VerdictRule:
    """When a trace counts as GPU-bound, and how the transition batch size is found.

    A trace is GPU-bound when the GPU idle share is below ``max_idle_share`` AND the mean queuing
    per kernel is at least ``min_queue_to_launch`` times the mean launch (CPU dispatch) cost;
    otherwise it is CPU-bound. Why both signals: while the CPU sets the pace a kernel starts about
    as soon as its launch call returns, so queuing stays at the order of the launch cost and the
    GPU waits between kernels; once the GPU sets the pace kernels wait behind earlier ones, so
    queuing dominates launch and idle time collapses. Either signal alone misleads: a burst of tiny
    kernels behind one long GEMM queues while the GPU still idles most of the inference, and a GPU
    kept just busy by a CPU launching in time has little idle time but no backlog (the CPU is still
    the pace-setter). The factor 2 keeps launch jitter out of the verdict; 25% idle leaves room
    for host-side sampling and synchronisation between decode steps.

    The transition batch size is the first (smallest) batch size judged GPU-bound right after one
    judged CPU-bound. The TKLQT knee is the batch size where TKLQT per kernel rises the most over
    the previous batch size, when that rise is at least ``knee_ratio`` times.
    """

    max_idle_share: float = 0.25
    min_queue_to_launch: float = 2.0
    knee_ratio: float = 2.0

    def describe(self) -> str:
        """The rule in one sentence, as stated in every report."""
        return (f"GPU-bound when GPU idle share < {self.max_idle_share:.0%} and mean queuing per "
                f"kernel >= {self.min_queue_to_launch:g}x the mean launch cost, else CPU-bound; "
                "transition = first batch size judged GPU-bound right after a CPU-bound one; "
                f"TKLQT knee = largest rise (>= {self.knee_ratio:g}x) of TKLQT per kernel "
                "between consecutive batch sizes")

    def judge(self, gpu: GpuMetrics | None) -> Verdict:
        """Verdict for one trace from its whole-trace GPU metrics."""
        if gpu is None:
            return Verdict(None, f"no verdict: {NO_GPU_REASON}", None, None, self.describe())
        if gpu.kernel_count == gpu.orphan_kernel_count or gpu.gpu_idle_share is None:
            return Verdict(None, "no verdict: no kernel could be linked to its launch call",
                           gpu.gpu_idle_share, None, self.describe())
        q = gpu.queue_us
        ratio = q / gpu.launch_us if gpu.launch_us > 0 else (float("inf") if q > 0 else 0.0)
        idle = gpu.gpu_idle_share
        gpu_bound = idle < self.max_idle_share and ratio >= self.min_queue_to_launch
        shown = "inf" if ratio == float("inf") else f"{ratio:.2f}"
        reason = (f"GPU idle {idle:.1%} ({'<' if idle < self.max_idle_share else '>='} "
                  f"{self.max_idle_share:.0%}), queuing/launch {shown}x "
                  f"({'>=' if ratio >= self.min_queue_to_launch else '<'} {self.min_queue_to_launch:g}x)")
        return Verdict("gpu" if gpu_bound else "cpu", reason, idle,
                       None if ratio == float("inf") else ratio, self.describe())


@dataclass
class SweepPoint:
    """Whole-trace figures of one batch size, as plotted and tabulated."""

    batch_size: int
    bound: str | None
    kernel_count: int | None
    tklqt_us: float | None
    tklqt_per_kernel_us: float | None
    gpu_idle_share: float | None
    il_us: float | None


@dataclass
class SweepSummary:
    """Verdicts across batch sizes: the transition and the TKLQT knee, with the rule stated."""

    rule: str
    points: list[SweepPoint]
    transition_batch_size: int | None
    transition_reason: str
    tklqt_knee_batch_size: int | None


def _point(batch_size: int, report: TraceReport) -> SweepPoint:
    g = report.overall.gpu
    return SweepPoint(batch_size, report.verdict.bound, g.kernel_count if g else None,
                      g.tklqt_us if g else None, g.tklqt_per_kernel_us if g else None,
                      g.gpu_idle_share if g else None, report.overall.il_us)


def _knee(points: list[SweepPoint], knee_ratio: float) -> int | None:
    best, best_rise = None, knee_ratio
    for prev, cur in zip(points, points[1:], strict=False):
        a, b = prev.tklqt_per_kernel_us, cur.tklqt_per_kernel_us
        if a is None or b is None:
            continue
        rise = b / a if a > 0 else (float("inf") if b > 0 else 0.0)
        if rise >= best_rise:
            best, best_rise = cur.batch_size, rise
    return best


def summarize_sweep(reports: list[tuple[int, TraceReport]], rule: VerdictRule | None = None) -> SweepSummary:
    """Transition batch size and TKLQT knee from one report per batch size (any order)."""
    rule = rule or VerdictRule()
    points = [_point(b, r) for b, r in sorted(reports, key=lambda br: br[0])]
    bounds = [p.bound for p in points]
    transition, reason = None, ""
    for prev, cur in zip(points, points[1:], strict=False):
        if prev.bound == "cpu" and cur.bound == "gpu":
            transition = cur.batch_size
            reason = f"CPU-bound at batch size {prev.batch_size}, GPU-bound at {cur.batch_size}"
            break
    if transition is None:
        if not points or all(b is None for b in bounds):
            reason = f"no transition: {NO_GPU_REASON}" if points else "no traces"
        elif all(b == "gpu" for b in bounds if b):
            reason = f"GPU-bound at every batch size (from {points[0].batch_size}): lower it to find the transition"
        elif all(b == "cpu" for b in bounds if b):
            reason = f"CPU-bound at every batch size (up to {points[-1].batch_size}): raise it to find the transition"
        else:
            reason = "no CPU-bound batch size directly followed by a GPU-bound one"
    return SweepSummary(rule.describe(), points, transition, reason, _knee(points, rule.knee_ratio))


__all__ = ["NO_GPU_REASON", "SweepPoint", "SweepSummary", "Verdict", "VerdictRule", "summarize_sweep"]
