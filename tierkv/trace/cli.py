"""``tierkv trace``: the TKLQT tracer's command line (``run`` a sweep, ``analyze`` any trace).

Why this module exists: it maps flags 1:1 onto ``capture.run_sweep`` and ``analyze.analyze_trace``
and nothing more; the lead mounts ``trace_app`` under the main app. Bad input (not a trace, a
truncated trace, bad batch sizes) is printed as one line on stderr with a non-zero exit status,
never as a traceback (exit code 2, like the other commands).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from tierkv.errors import TierkvError

from tierkv.trace.analyze import analyze_trace, round_floats
from tierkv.trace.events import TraceError
from tierkv.trace.report import print_sweep, print_trace_report

trace_app = typer.Typer(
    help="TKLQT tracer: kernel launch and queuing time, GPU idle time, CPU/GPU-bound verdicts.",
    no_args_is_help=True,
)


def _fail(message: str) -> None:
    """One ``error:`` line and exit code 2, as for every tierkv command's user errors."""
    Console(stderr=True, soft_wrap=True).print(Text.assemble(("error:", "red"), " " + " ".join(message.split())),
                                               highlight=False)
    raise typer.Exit(code=2)


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; raises ``typer.BadParameter`` on anything else."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"{text!r} is not a list of positive integers; use e.g. 1,2,4,8,16")
    return sizes


@trace_app.command("run")
def run_command(
    model: Annotated[str, typer.Argument(help="HF model directory (or 'demo').")],
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "1,2,4,8,16",
    prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, help="Tokens per prompt.")] = 128,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens generated per prompt.")] = 16,
    out: Annotated[Path, typer.Option("--out", help="Directory for the traces, report.json, tklqt.png.")] = Path("tierkv-trace"),
    device: Annotated[str | None, typer.Option("--device", help="Compute device (default: auto).")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Weight dtype, e.g. bfloat16.")] = None,
    device_mem: Annotated[str | None, typer.Option("--device-mem", help="Device budget, e.g. 6GiB.")] = None,
    host_mem: Annotated[str | None, typer.Option("--host-mem", help="Host budget, e.g. 16GiB.")] = None,
    offload_dir: Annotated[str | None, typer.Option("--offload-dir", help="Where streamed layers live.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", "-t", min=1,
                                                help="CPU threads for torch (default: torch's choice).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print report.json's content instead of tables.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the layers (tierkv.load(compile=True)); "
                                                            "the warm-up generation compiles")] = False,
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", help="CUDA: replay the layers' decode math from "
                                                                  "CUDA graphs (captured during the warm-up)")] = False,
) -> None:
    """Profile generation at each batch size and find the CPU-bound -> GPU-bound transition."""
    import torch

    from tierkv.trace.capture import run_sweep  # deferred: imports torch and the engine

    if threads is not None:
        torch.set_num_threads(threads)  # the CLI owns its process; the library never changes this
    sizes = parse_batch_sizes(batch_sizes)
    progress = Console(stderr=True)

    def on_run(run: object) -> None:
        if not json_out:
            progress.print(f"batch size {run.batch_size}: traced in {run.wall_us / 1e6:.2f} s -> {run.trace_path}")

    try:
        result = run_sweep(model, sizes, prompt_len, new_tokens, out, device=device, dtype=dtype, on_run=on_run,
                           device_mem=device_mem, host_mem=host_mem, offload_dir=offload_dir,
                           **({"compile": True} if compile else {}), **({"cuda_graph": True} if cuda_graph else {}))
    except (TierkvError, OSError) as exc:     # TraceError, bad budgets, a missing model ...
        _fail(str(exc))
        return
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        return
    console = Console()
    for run in result.runs:
        console.rule(f"batch size {run.batch_size}")
        print_trace_report(run.report, console, details=False)
    print_sweep(result.summary, console)
    console.print(f"wrote {result.report_path}, {result.plot_path} and "
                  f"{len(result.runs)} chrome trace(s) in {out} (open them in https://ui.perfetto.dev)",
                  soft_wrap=True)


@trace_app.command("analyze")
def analyze_command(
    traces: Annotated[list[Path], typer.Argument(help="Chrome trace(s) from the PyTorch profiler (.json or .json.gz).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (times in microseconds).")] = False,
    top: Annotated[int, typer.Option("--top", min=1, help="Rows in the top-kernel/operator lists.")] = 10,
) -> None:
    """Compute TKLQT, AKD, latency, GPU idle and the verdict from existing trace files."""
    try:
        reports = [analyze_trace(path, top_n=top) for path in traces]
    except (TraceError, OSError) as exc:
        _fail(str(exc))
        return
    if json_out:
        data = [r.to_dict() for r in reports]
        typer.echo(json.dumps(data[0] if len(data) == 1 else round_floats({"traces": data})))
        return
    console = Console()
    for report in reports:
        print_trace_report(report, console)
