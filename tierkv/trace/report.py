"""Presentation of tracer results: rich tables on the terminal, JSON files, and the sweep plot.

Why this module exists: the analyzer produces dataclasses with raw microsecond figures; people
read tables and plots. Keeping formatting here leaves ``analyze`` pure and testable and lets the
CLI stay thin. GPU figures that do not exist are printed as ``n/a`` with the reason, never as
zeros that look like measurements. The plot is drawn on a bare ``matplotlib.figure.Figure`` (Agg
canvas), so no global pyplot state or display is touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tierkv.config import format_size
from tierkv.trace.analyze import ScopeReport, TraceReport
from tierkv.trace.verdict import SweepSummary

_NA = "n/a"


def fmt_us(value: float | None) -> str:
    """A duration in microseconds, shown in us, ms or s; ``n/a`` when absent."""
    if value is None:
        return _NA
    if abs(value) >= 1e6:
        return f"{value / 1e6:.3g} s"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.4g} ms"
    return f"{value:.3g} us"


def fmt_share(value: float | None) -> str:
    """A fraction shown as a percentage; ``n/a`` when absent."""
    return _NA if value is None else f"{value:.1%}"


def _scope_row(scope: ScopeReport, gpu: bool) -> list[str]:
    g, c = scope.gpu, scope.cpu
    cpu_cells = [scope.name, fmt_us(scope.il_us), str(c.cpu_op_count), fmt_us(c.cpu_op_time_us),
                 fmt_us(c.outside_ops_us)]
    if not gpu:
        return cpu_cells
    if g is None:
        return cpu_cells + [_NA] * 7
    return cpu_cells + [
        str(g.kernel_count), fmt_us(g.tklqt_us), fmt_us(g.tklqt_per_kernel_us),
        f"{fmt_share(g.launch_share)}/{fmt_share(g.queue_share)}", fmt_us(g.akd_us),
        f"{fmt_share(g.gpu_idle_share)}", str(g.orphan_kernel_count)]


def scope_table(report: TraceReport) -> Table:
    """One row per scope (whole trace, prefill, decode) with the headline metrics.

    Without GPU kernels the GPU columns are left out and the caption says why.
    """
    gpu = report.gpu_available
    caption = None if gpu else f"GPU metrics n/a: {report.gpu_reason}"
    table = Table(title=f"trace {report.source}", title_justify="left", caption=caption)
    names = ["scope", "IL", "CPU ops", "op time", "outside ops"]
    if gpu:
        names += ["kernels", "TKLQT", "per kernel", "launch/queue", "AKD", "GPU idle", "orphans"]
    for name in names:
        table.add_column(name, justify="left" if name == "scope" else "right", no_wrap=True)
    table.add_row(*_scope_row(report.overall, gpu))
    for scope in report.phases.values():
        if scope is not None:
            table.add_row(*_scope_row(scope, gpu))
    return table


def _detail_tables(report: TraceReport) -> list[Table]:
    tables = []
    g = report.overall.gpu
    if g is not None:
        t = Table(title="top kernels (by GPU time)", title_justify="left")
        for col in ("kernel", "count", "total", "mean"):
            t.add_column(col, justify="left" if col == "kernel" else "right", overflow="fold")
        for row in g.top_kernels:
            t.add_row(row.name[:80], str(row.count), fmt_us(row.total_us), fmt_us(row.mean_us))
        tables.append(t)
        t = Table(title="operators -> kernels (External id)", title_justify="left")
        for col in ("operator", "kernels", "kernel time", "launch", "queuing"):
            t.add_column(col, justify="left" if col == "operator" else "right")
        for row in g.top_operators:
            t.add_row(row.name, str(row.kernel_count), fmt_us(row.kernel_time_us),
                      fmt_us(row.launch_us), fmt_us(row.queue_us))
        tables.append(t)
    t = Table(title="CPU operators (by self time)", title_justify="left")
    for col in ("operator", "calls", "self", "total"):
        t.add_column(col, justify="left" if col == "operator" else "right")
    for row in report.overall.cpu.top_operators:
        t.add_row(row.name, str(row.count), fmt_us(row.self_us), fmt_us(row.total_us))
    tables.append(t)
    if report.tierkv_spans:
        t = Table(title="tierkv spans", title_justify="left")
        for col in ("span", "count", "total", "GPU idle during"):
            t.add_column(col, justify="left" if col == "span" else "right")
        for row in report.tierkv_spans:
            t.add_row(row.name, str(row.count), fmt_us(row.total_us), fmt_us(row.gpu_idle_during_us))
        tables.append(t)
    return tables


def moves_table(report: TraceReport) -> Table:
    """One row per link of the movement layer: moves, bytes, busy time, GB/s (and GPU memcpy time)."""
    table = Table(title="moves (tierkv::move spans)", title_justify="left")
    gpu = any(row.memcpy_us is not None for row in report.moves)
    for name in ("link", "moves", "bytes", "busy", "GB/s", "span time") + (("GPU memcpy",) if gpu else ()):
        table.add_column(name, justify="left" if name == "link" else "right", no_wrap=True)
    for row in report.moves:
        cells = [row.link, str(row.moves), format_size(row.bytes), fmt_us(row.busy_us),
                 _NA if row.gbps is None else f"{row.gbps:.3g}", fmt_us(row.span_us)]
        table.add_row(*cells, *([fmt_us(row.memcpy_us)] if gpu else []))
    return table


def print_trace_report(report: TraceReport, console: Console, details: bool = True) -> None:
    """The scope table, the moves per link, then kernels/operators/spans, the verdict and any warnings."""
    console.print(scope_table(report))
    if report.moves:
        console.print(moves_table(report))
    if details:
        for table in _detail_tables(report):
            console.print(table)
    if report.python is not None:
        console.print(f"Python: {report.python.function_event_count} function events, "
                      f"{fmt_us(report.python.python_only_us)} in Python outside operators")
    bound = report.verdict.bound
    console.print(f"verdict: {bound.upper() + '-bound' if bound else 'none'} ({report.verdict.reason})")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def sweep_table(summary: SweepSummary) -> Table:
    """One row per batch size: verdict, kernels, TKLQT, TKLQT per kernel, GPU idle, latency."""
    table = Table(title="TKLQT sweep", title_justify="left")
    for name in ("batch", "verdict", "kernels", "TKLQT", "TKLQT/kernel", "GPU idle", "IL"):
        table.add_column(name, justify="right")
    for p in summary.points:
        table.add_row(str(p.batch_size), f"{p.bound.upper()}-bound" if p.bound else _NA,
                      _NA if p.kernel_count is None else str(p.kernel_count), fmt_us(p.tklqt_us),
                      fmt_us(p.tklqt_per_kernel_us), fmt_share(p.gpu_idle_share), fmt_us(p.il_us))
    return table


def print_sweep(summary: SweepSummary, console: Console) -> None:
    """The sweep table and the transition line."""
    console.print(sweep_table(summary))
    console.print(f"rule: {summary.rule}")
    if summary.transition_batch_size is not None:
        console.print(f"transition: batch size {summary.transition_batch_size} "
                      f"({summary.transition_reason})")
    else:
        console.print(f"transition: none ({summary.transition_reason})")
    if summary.tklqt_knee_batch_size is not None:
        console.print(f"TKLQT knee: batch size {summary.tklqt_knee_batch_size}")


def write_json(data: Any, path: Path) -> None:
    """Write JSON data to a file (UTF-8, indented)."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _panel(ax: Any, xs: list[int], ys: list[float | None], scale: float, ylabel: str,
           transition: int | None) -> None:
    pts = [(x, y * scale) for x, y in zip(xs, ys, strict=True) if y is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    else:
        ax.text(0.5, 0.5, "trace holds no GPU kernels", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_yticks([])
    if transition is not None:
        ax.axvline(transition, linestyle="--", color="grey", label=f"transition B={transition}")
        ax.legend(loc="best")
    ax.set_xscale("log", base=2)
    if xs:
        ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_sweep(summary: SweepSummary, path: Path, title: str = "") -> None:
    """PNG with TKLQT, GPU idle share and inference latency against batch size."""
    from matplotlib.figure import Figure  # deferred: matplotlib import costs ~0.3 s

    xs = [p.batch_size for p in summary.points]
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    t = summary.transition_batch_size
    _panel(axes[0], xs, [p.tklqt_us for p in summary.points], 1e-3, "TKLQT (ms)", t)
    _panel(axes[1], xs, [p.gpu_idle_share for p in summary.points], 100.0, "GPU idle (% of IL)", t)
    _panel(axes[2], xs, [p.il_us for p in summary.points], 1e-3, "inference latency (ms)", t)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
