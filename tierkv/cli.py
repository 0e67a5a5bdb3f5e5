"""The ``tierkv`` command line: a thin typer layer over the library.

Why this module exists: people run models from a terminal. Every flag maps one-to-one onto a
library argument, so the CLI never has behaviour the library lacks; this module only parses,
prints (streamed text, prose summaries, or one JSON object with ``--json``) and turns the
library's user-facing errors into one red line and a non-zero exit code instead of a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from tierkv import __version__
from tierkv.cli_batch import batch_command
from tierkv.cli_batchplan import show_batch_plan
from tierkv.cli_flags import LoadFlags, SamplingFlags, expand_flags, flags, kv_budget_value
from tierkv.cli_serve import register as register_serve
from tierkv.config import Budget, ConfigError, ModelConfig, Policy, format_size
from tierkv.engine import (Engine, GenerationResult, Stream, context_limit_tokens, load, model_path,
                           resolve_device)
from tierkv.errors import ArgumentError, TierkvError
from tierkv.session import Session
from tierkv.io.checkpoint import Checkpoint, has_weights, resolve_dtype
from tierkv.io.convert import convert as convert_store, find_cached_store
from tierkv.pipeline.kv.sizing import kv_bytes_per_token
from tierkv.io.gguf import GGUFCheckpoint, is_gguf_source
from tierkv.io.source import held_quant, planned_layout
from tierkv.io.store import Extent, WeightStore, is_store_dir
from tierkv.loader import device_type_of
from tierkv.plan import default_offload_dir, make_plan
from tierkv.plan_compare import COLUMNS, compare_plans, comparison_notes, comparison_rows
from tierkv.quantspec import WeightQuant, parse_weight_quant
from tierkv.trace.cli import trace_app

# typer 0.29 vendors click (older ones use it directly): find its usage-error base through a public name
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _print_error(message: str) -> None:
    """One ``error:`` line on stderr, never wrapped; the message is plain text (no rich markup)."""
    Console(stderr=True).print(Text.assemble(("error:", "bold red"), " " + message), highlight=False, soft_wrap=True)


class _OneLineErrors(TyperGroup):
    """Usage errors (unknown option, bad value) as one ``error:`` line and exit code 2, like every
    other tierkv error, instead of typer's boxed panel; ``--help`` output is unchanged."""

    def main(self, args: Any = None, prog_name: Optional[str] = None, complete_var: Optional[str] = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":     # a bare `tierkv` / `tierkv trace`: the help text
                exc.show()
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            message = " ".join(exc.format_message().split())
            _print_error(message + hint)
            sys.exit(exc.exit_code)
        except typer.Abort:
            Console(stderr=True).print("aborted", highlight=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=_OneLineErrors,
                  help="Run Llama-family models with memory-tiered offloading.")

app.add_typer(trace_app, name="trace", help="TKLQT tracer: is inference CPU-bound or GPU-bound, per batch size?")

ModelArg = typer.Argument(..., help="Hugging Face model directory, a GGUF file (or a directory holding one, or a "
                                    "part of a split set), a store made by `tierkv convert`, or 'demo' for the "
                                    "bundled model")
QuantArg = typer.Option(None, "--quant", help="store the linear weights group-wise quantized: int8 or int4 "
                                              "(default: 16-bit; a GGUF file: its own schemes; none: dequantize)")
GroupSizeArg = typer.Option(None, "--group-size", help="--quant: inputs per scale/minimum group: 32, 64 or 128 "
                                                       "(default 64), or channel (int8 only: one per output row)")
QuantHeadArg = typer.Option(False, "--quant-head", help="--quant: quantize the LM head too")
DEMO_PROMPT = "Return a list of"
register_serve(app, ModelArg)       # tierkv serve (cli_serve.py)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tierkv {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    """Run Llama-family models with memory-tiered offloading."""


USER_ERRORS: tuple[type[BaseException], ...] = (TierkvError, OSError)
"""What the CLI prints as one line: tierkv's user errors (all subclass TierkvError) and the OS's
(a missing file, a full disk, no permission). Anything else is a bug and keeps its traceback."""


@contextmanager
def _user_errors() -> Iterator[None]:
    """Library errors meant for users become one line on stderr and exit code 2."""
    try:
        yield
    except USER_ERRORS as exc:
        _print_error(" ".join(str(exc).split()))
        raise typer.Exit(2) from None


def _prompt_ids(text: str) -> list[int]:
    """``--prompt-ids 1,2,3`` -> [1, 2, 3]; anything else is a usage error naming the bad part."""
    parts = [x for x in text.replace(" ", "").split(",") if x]
    bad = next((x for x in parts if not x.isdigit()), None)
    if bad is not None:
        problem = f"{bad!r} is not a token id"
    elif not parts:
        problem = "it holds no token ids"
    else:
        return [int(x) for x in parts]
    raise typer.BadParameter(f"{text!r}: {problem}; give whole numbers >= 0 separated by commas, e.g. 1,2,3",
                             param_hint="--prompt-ids")


def _pack_device_type(device: Optional[str]) -> str:
    """``convert --device``: the device type the packs are for; packing needs no such device here."""
    if device is None:
        return resolve_device(None).type
    kind = device.strip().lower().split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ArgumentError(f"--device {device!r}: pack for cpu or cuda")
    return kind


def _store_dir(out: str) -> Path:
    """``convert``'s OUT: an empty one would silently mean the current directory."""
    if not out.strip():
        raise ArgumentError(f"OUT {out!r} is empty; give the directory for the store, e.g. /nvme/tierkv/my-model")
    return Path(out).expanduser()


def _emit(stream: Stream, show: bool, ids: bool = False) -> GenerationResult:
    """Write a stream's text to stdout as it comes (token ids, comma-separated, when ``ids``: a model
    without a tokenizer); the stream is closed even when interrupted, so the engine can close."""
    wrote = False
    try:
        for piece in stream:
            if show and ids and piece.token_id is not None:
                sys.stdout.write(("," if wrote else "") + str(piece.token_id))
                wrote = True
            elif show and not ids and piece.text:
                sys.stdout.write(piece.text)
                wrote = True
            sys.stdout.flush()
    except BaseException:
        if wrote:                      # an error mid-stream: its line must not land after the partial text
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    finally:
        stream.close()
    return stream.results[0]


def _set_threads(threads: Optional[int]) -> None:
    """The CLI owns its process, so it may set torch's CPU thread count (the library never does)."""
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter(f"--threads {threads}: give 1 or more")
        torch.set_num_threads(threads)


def _load(model: str, options: LoadFlags, quiet: bool, **extra: Any) -> Engine:
    """Load with a spinner on a terminal (conversion, when needed, shows its own progress bar);
    ``extra``: more ``load`` keyword arguments."""
    err = Console(stderr=True)
    if quiet or not err.is_terminal:
        return load(model, progress=lambda done, total: None, **options.load_kwargs(), **extra)
    with err.status(f"loading {model} ..."):
        engine = load(model, **options.load_kwargs(), **extra)
    if engine.plan is not None and (engine.plan.host_layers or engine.plan.disk_layers):
        err.print(engine.plan.summary(), style="dim", highlight=False, soft_wrap=True)
    return engine


class _PrefillBar:
    """A transient progress bar on stderr for prefills of more than one piece; gone before the first token."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task = None

    def __call__(self, done: int, total: int) -> None:
        if self._progress is None:
            if done >= total:
                return                                    # a one-piece prompt: nothing to show
            self._progress = Progress(TextColumn("prefill"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                                      TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._progress.start()
            self._task = self._progress.add_task("prefill", total=total)
        self._progress.update(self._task, completed=done, total=total)  # type: ignore[arg-type]
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@contextmanager
def _prefill_bar(engine: Engine, quiet: bool) -> Iterator[None]:
    """Show prefill progress on a terminal (stderr) unless ``quiet``; the engine's callback is restored after."""
    if quiet or not Console(stderr=True).is_terminal:
        yield
        return
    bar, before = _PrefillBar(), engine.prefill_progress
    engine.prefill_progress = bar
    try:
        yield
    finally:
        bar.close()
        engine.prefill_progress = before


def _summary(res: GenerationResult, engine: Engine) -> str:
    s = res.stats
    return (f"[{s.new_tokens} tokens ({res.finish_reason}) | prompt {s.prompt_tokens} tokens, "
            f"prefill {s.prefill_s:.3f} s | decode {s.decode_tok_s:.1f} tok/s | "
            f"peak RSS {format_size(s.peak_rss_bytes)} | {engine.device.type} {str(engine.dtype).removeprefix('torch.')}"
            f"{_schemes(engine)}{_compiled(s.compile)}]")


def _compiled(state: dict[str, Any]) -> str:
    """"; compiled: 4 graphs in 31.2 s (2 recompiles)" for the summary line when --compile or --cuda-graph
    was asked ("" otherwise), or why the engine runs without them."""
    comp, graph = state.get("compile", {}), state.get("cuda_graph", {})
    out = ""
    if comp.get("asked"):
        out += (f"; compiled: {comp['graphs']} graphs in {comp['compile_s']:.1f} s ({comp['recompiles']} recompiles)"
                if comp["active"] else f"; compile failed, ran eager: {comp['fallback_reason']}")
    if graph.get("asked"):
        out += (f"; CUDA graphs: {graph['captures']} captured, {graph['replays']} replays" if graph["active"]
                else f"; CUDA graphs {graph['reason']}")
    return out


def _schemes(engine: Engine) -> str:
    """", int4 weights (groups of 64), int8 KV off the device" for the summary line ("" when 16-bit)."""
    quant, kv = engine.policy.weight_quant, engine.policy.kv_quant
    notes = "".join(f"; {n}" for n in (engine.store.notes if engine.store is not None else ()))
    return (f", {quant.describe().replace(' (', ' weights (', 1)}" if quant else "") + \
        (f", {kv} KV off the device" if kv != "none" else "") + notes


@app.command()
@expand_flags
def run(
    model: str = ModelArg,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="prompt text"),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="raw token ids, e.g. 1,2,3"),
    sampling: SamplingFlags = flags(SamplingFlags),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    options: LoadFlags = flags(LoadFlags),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of streamed text"),
) -> None:
    """Generate a completion for one prompt, streaming the text."""
    if (prompt is None) == (prompt_ids is None):
        raise typer.BadParameter("give exactly one of --prompt or --prompt-ids")
    _set_threads(options.threads)
    with _user_errors():
        ids = None if prompt_ids is None else _prompt_ids(prompt_ids)
        engine = _load(model, options, as_json)
        try:
            stream = engine.stream(prompt if ids is None else ids, **sampling.sampling_kwargs(stop))
            with _prefill_bar(engine, as_json):
                res = _emit(stream, show=not as_json, ids=engine.tokenizer is None)
            if as_json:
                print(json.dumps({**res.to_dict(), "plan": engine.plan.to_dict() if engine.plan else None}))
            else:
                print()
                Console(stderr=True).print(_summary(res, engine), style="dim", highlight=False, soft_wrap=True)
        finally:
            engine.close()


@app.command()
@expand_flags
def chat(
    model: str = ModelArg,
    system: Optional[str] = typer.Option(None, help="system message"),
    sampling: SamplingFlags = flags(SamplingFlags, max_new_tokens=256, temperature=0.7, top_k=40, top_p=0.95),
    options: LoadFlags = flags(LoadFlags),
) -> None:
    """Interactive chat with the model's chat template; type /exit (or Ctrl-D) to leave."""
    _set_threads(options.threads)
    with _user_errors():
        engine = _load(model, options, False)
        try:
            _chat_loop(engine, system, sampling.sampling_kwargs())
        finally:
            engine.close()


def _chat_loop(engine: Engine, system: Optional[str], sampling: dict[str, Any]) -> None:
    """Read a line, stream the reply. The conversation is one Session, so each turn prefills only its new
    tokens; where the template renders the history differently from the tokens the model produced (a
    re-tokenized or trimmed reply), the session keeps the common prefix and is fed the rest."""
    if engine.tokenizer is None or not engine.tokenizer.chat_template:
        raise ConfigError(f"{engine.model_dir} has no tokenizer chat_template; use `tierkv run` instead")
    messages = [{"role": "system", "content": system}] if system else []
    console = Console(stderr=True)
    console.print("[dim]chatting; /exit to quit[/]")
    session = engine.session()
    try:
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                break
            if line.strip() in ("/exit", "/quit"):
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            session, reply = _chat_turn(engine, session, engine.tokenizer.encode_chat(messages), sampling)
            messages.append({"role": "assistant", "content": reply})    # as produced: the template trims if it wants
    finally:
        session.close()


def _chat_turn(engine: Engine, session: Session, rendered: list[int], sampling: dict[str, Any]) -> tuple[Session, str]:
    """Stream one reply to the rendered conversation ``rendered`` -> (the session holding it, the reply).
    The session keeps the longest prefix its history shares with the rendering (its KV is kept)
    and is fed the rest."""
    history = session.token_ids
    common = next((i for i, (a, b) in enumerate(zip(history, rendered)) if a != b), min(len(history), len(rendered)))
    common = min(common, len(rendered) - 1)                 # at least one new token to feed
    if common < len(history):
        session.keep(common)
    with _prefill_bar(engine, False):
        res = _emit(session.stream(rendered[common:], **sampling), show=True)
    print()
    return session, res.text


def _info_dict(model: Path) -> dict[str, Any]:
    """The facts ``info`` shows of a checkpoint, or of a store made by ``tierkv convert`` (then with
    its weight scheme, pack device and its own bytes per layer)."""
    if is_gguf_source(model):
        return _gguf_info(model)
    if is_store_dir(model):
        with contextlib.closing(WeightStore.open(model)) as store:
            return {**_shape_facts(store.config, model, [store.data_path.name]),
                    "bytes_per_layer": store.layer(0).nbytes, "source": store.source_dir,
                    "weight_quant": store.quant.to_json() if store.quant is not None else None,
                    "pack_device": store.pack_device or None}
    with Checkpoint(model) as ckpt:
        return _shape_facts(ckpt.config, model, [p.name for p in ckpt.files()])


def _gguf_info(model: Path) -> dict[str, Any]:
    """``info`` of a GGUF model: its shape, tensor types, and bits per weight in the file and in the
    store it converts into by default (its own schemes, packed for this machine's device)."""
    with GGUFCheckpoint(model) as ckpt:
        extents = planned_layout(ckpt, device_type=device_type_of(Policy()))
        held = held_quant(ckpt, extents, None)
        params = ckpt.config.param_count()
        return {**_shape_facts(ckpt.config, model, [p.name for p in ckpt.files()]),
                "bytes_per_layer": max(e.nbytes for e in extents if e.name.startswith("layer.")),
                "gguf_architecture": ckpt.architecture,
                "tensor_types": ", ".join(f"{n} {t}" for t, n in sorted(ckpt.type_counts().items())),
                "file_bytes": sum(p.stat().st_size for p in ckpt.files()),
                "bits_per_weight_file": round(ckpt.bits_per_weight(), 2),
                "bits_per_weight_store": round(8 * sum(e.nbytes for e in extents) / params, 2),
                "weight_quant": held.to_json() if held is not None else None}


def _shape_facts(cfg: ModelConfig, path: Path, files: list[str]) -> dict[str, Any]:
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype, torch.float32)
    elem = dtype.itemsize
    return {
        "path": str(path), "architecture": cfg.architecture, "dtype": cfg.dtype,
        "parameters": cfg.param_count(), "layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "context_length_tokens": context_limit_tokens(cfg), "rope_type": cfg.rope.rope_type,
        "sliding_window_tokens": next((w for w in cfg.sliding_window_tokens if w), None),
        "tied_embeddings": cfg.tie_word_embeddings,
        "bytes_per_layer": cfg.layer_param_count() * elem,
        "kv_bytes_per_token": kv_bytes_per_token(cfg, dtype),
        "checkpoint_files": files,
    }


@app.command()
def info(model: str = ModelArg, as_json: bool = typer.Option(False, "--json")) -> None:
    """Architecture, parameter count, bytes per layer, context length."""
    with _user_errors():
        data = _info_dict(model_path(model))
    if as_json:
        print(json.dumps(data))
        return
    table = Table(show_header=False, box=None)
    for key, value in data.items():
        shown = format_size(value) if key.endswith(("bytes_per_layer", "per_token", "file_bytes")) else value
        if key == "weight_quant":
            shown = value and WeightQuant.from_json(value).describe() or "16-bit"
        table.add_row(key.replace("_", " "), f"{shown:,}" if isinstance(shown, int) and not isinstance(shown, bool)
                      else str(shown))
    Console().print(table)


@app.command("convert")
def convert_cmd(
    model: str = ModelArg,
    out: str = typer.Argument(..., help="directory for the packed weight store"),
    dtype: Optional[str] = typer.Option(None, help="store dtype (default: the checkpoint's)"),
    restart: bool = typer.Option(False, help="discard whatever OUT holds (an interrupted conversion, a damaged "
                                             "store, another checkpoint's store) and convert from scratch"),
    quant: Optional[str] = QuantArg,
    group_size: Optional[str] = GroupSizeArg,
    quant_head: bool = QuantHeadArg,
    device: Optional[str] = typer.Option(None, help="--quant: pack for computing on cpu or cuda (no such device "
                                                    "needed here; default: cuda when available)"),
    as_json: bool = typer.Option(False, "--json", help="print the store's path, dtype and scheme as one JSON object"),
) -> None:
    """Rewrite a checkpoint into a packed store: one 4 KiB-aligned extent per layer, checksummed.

    Run on an existing store, it re-verifies every extent and re-converts the damaged ones; run
    with another --quant, it converts again. `tierkv run OUT` then runs the store itself."""
    err = Console(stderr=True)
    with _user_errors():
        quiet = not err.is_terminal or as_json
        asked = parse_weight_quant(quant, group_size, quant_head)
        path = convert_store(model_path(model), _store_dir(out), dtype=dtype, restart=restart,
                             progress=(lambda done, total: None) if quiet else None,
                             report=lambda line: err.print(f"repair: {line}", highlight=False, soft_wrap=True, markup=False),
                             quant=asked, device_type=_pack_device_type(device),
                             keep_source=quant is None or asked is not None)   # GGUF: --quant none dequantizes
        with contextlib.closing(WeightStore.open(path)) as store:
            facts = {"path": str(path), "dtype": str(store.dtype).removeprefix("torch."),
                     "quant": store.quant.to_json() if store.quant is not None else None,
                     "pack_device": store.pack_device or None, "data_bytes": store.data_path.stat().st_size}
            scheme = store.quant.describe() if store.quant is not None else "16-bit"
    if as_json:
        print(json.dumps(facts))
        return
    packed = f", packed for {facts['pack_device']}" if store.quant is not None else ""
    err.print(f"store ready: {path} ({facts['dtype']}, weights {scheme}{packed}, "
              f"{format_size(facts['data_bytes'])})", highlight=False, soft_wrap=True, markup=False)


@app.command("plan")
@expand_flags
def plan_cmd(
    model: str = typer.Argument(..., help="a Hugging Face model directory, one with only its config.json, a "
                                          "GGUF file, a store made by tierkv convert, or 'demo'"),
    options: LoadFlags = flags(LoadFlags, only=("device_mem", "host_mem", "offload_dir", "dtype", "device",
                                                "kv", "kv_budget", "chunk_tokens", "kv_sketch", "kv_device_tokens",
                                                "prefill_chunk_tokens", "quant", "group_size", "quant_head",
                                                "kv_quant")),
    compare: bool = typer.Option(False, "--compare", help="one table: 16-bit, int8 and int4 weights side by side"),
    as_json: bool = typer.Option(False, "--json"),
    batch: Optional[str] = typer.Option(None, help="plan a batch job: auto or N sequences per layer pass"),
    prompts: int = typer.Option(64, help="--batch: prompts in the job"),
    prompt_tokens: str = typer.Option("256", help="--batch: prompt length, or a ragged range such as 64-512"),
    new_tokens: int = typer.Option(64, help="--batch: new tokens per prompt"),
) -> None:
    """Show where each layer would live, the prefetch depth, and the predicted tokens/s
    (with --batch: the batch size and micro-batches that maximise a job's throughput).

    MODEL may hold only a config.json: the plan is then a what-if (budgets are not checked against
    this machine, and compute is estimated from a measured matmul rate)."""
    with _user_errors():
        budget = Budget.parse(options.device_mem, options.host_mem, options.offload_dir)
        cfg, policy, data_path, config_only, layout = _plan_inputs(model_path(model), options, budget)
        if batch is not None:
            return show_batch_plan((cfg, budget, policy, data_path, config_only, layout), batch, prompts,
                                   prompt_tokens, new_tokens, as_json)
        if compare:
            plans = compare_plans(cfg, budget, policy, data_path=data_path, config_only=config_only)
        else:
            plans = [make_plan(cfg, budget, policy, data_path=data_path, config_only=config_only, layout=layout)]
    if as_json:
        print(json.dumps({"plans": [p.to_dict() for p in plans]} if compare else plans[0].to_dict()))
    elif compare:
        table = Table(*COLUMNS, box=None, highlight=False)
        for row in comparison_rows(plans):
            table.add_row(*row)
        console = Console(width=max(Console().width, 120))     # piped: one row per scheme, never folded
        console.print(table)
        console.print("\n".join(comparison_notes(plans)), highlight=False, soft_wrap=True)
    else:
        Console().print(plans[0].summary(), highlight=False, soft_wrap=True)


PlanInputs = tuple[ModelConfig, Policy, Optional[Path], bool, Optional[list[Extent]]]


def _plan_inputs(path: Path, options: LoadFlags, budget: Budget) -> PlanInputs:
    """(config, policy, data file to probe or None, config-only, the store's own layout or None) for
    ``plan`` of ``path``: a checkpoint, a directory with only a config.json, a GGUF model, or a store
    made by ``tierkv convert`` (its config, scheme and layout)."""
    store_quant, data_path, config_only, layout = None, None, False, None
    asked = parse_weight_quant(options.quant, options.group_size, options.quant_head)
    if is_gguf_source(path):
        return _gguf_plan_inputs(path, options, budget, asked)
    if is_store_dir(path):
        with contextlib.closing(WeightStore.open(path)) as opened:
            cfg, store_quant, data_path = opened.config, opened.quant, opened.data_path
            layout = list(opened.extents.values()) if options.quant is None else None
    elif not has_weights(path):
        cfg, config_only = ModelConfig.from_dir(path), True
    else:
        with Checkpoint(path) as ckpt:
            cfg = ckpt.config
    policy = _plan_policy(options, cfg, asked if options.quant is not None else store_quant)
    if data_path is None and not config_only:                   # a checkpoint: its cached store, if any
        store = find_cached_store(path, budget.offload_dir or default_offload_dir(), policy.dtype,
                                  policy.weight_quant, device_type_of(policy))
        data_path = store.data_path if store is not None else None
    return cfg, policy, data_path, config_only, layout


def _gguf_plan_inputs(path: Path, options: LoadFlags, budget: Budget, asked: WeightQuant | None) -> PlanInputs:
    """``_plan_inputs`` of a GGUF model: planned with the layout its store gets (the file's own schemes,
    ``asked`` for the rest), probing its cached store's data file when there is one."""
    keep = options.quant is None or asked is not None
    with GGUFCheckpoint(path) as ckpt:
        cfg = ckpt.config
        device_type = device_type_of(_plan_policy(options, cfg, None))
        layout = planned_layout(ckpt, options.dtype, asked, device_type, keep)
        policy = _plan_policy(options, cfg, held_quant(ckpt, layout, asked))
    store = find_cached_store(path, budget.offload_dir or default_offload_dir(), policy.dtype, asked, device_type,
                              keep)
    return cfg, policy, store.data_path if store is not None else None, False, layout


def _plan_policy(options: LoadFlags, cfg: ModelConfig, weight_quant: WeightQuant | None) -> Policy:
    return Policy(dtype=str(resolve_dtype(options.dtype, cfg.dtype)).removeprefix("torch."),
                  device=None if options.device is None else str(resolve_device(options.device)),
                  kv=options.kv, kv_budget=kv_budget_value(options.kv_budget), chunk_tokens=options.chunk_tokens,
                  kv_sketch=options.kv_sketch,     # the KV room the plan keeps depends on them
                  kv_device_tokens=options.kv_device_tokens, prefill_chunk_tokens=options.prefill_chunk_tokens,
                  weight_quant=weight_quant, kv_quant=options.kv_quant)


@app.command()
def demo(
    prompt: str = typer.Option(DEMO_PROMPT, "--prompt", "-p"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.6, help="0 = greedy (the tiny model then repeats itself)"),
    top_k: int = typer.Option(20, "--top-k"),
    seed: Optional[int] = typer.Option(2, help="sampling seed (fixed, so the demo is reproducible)"),
    threads: int = typer.Option(1, "--threads", "-t", help="CPU threads (the demo model is tiny: 1 is fastest)"),
) -> None:
    """Run the small model bundled with tierkv (no download) and show what it did."""
    _set_threads(threads)
    with _user_errors():
        t0 = time.perf_counter()
        engine = load("demo")
        try:
            load_s = time.perf_counter() - t0
            cfg = engine.config
            console = Console(stderr=True)
            console.print(f"[bold]tierkv demo[/]: {cfg.architecture}, {cfg.param_count() / 1e6:.1f}M parameters, "
                          f"{cfg.num_layers} layers, loaded in {load_s:.2f} s on {engine.device.type}",
                          highlight=False, soft_wrap=True)
            sys.stdout.write(prompt)
            res = _emit(engine.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      seed=seed), show=True)
            print()
            console.print(_summary(res, engine), style="dim", highlight=False, soft_wrap=True)
        finally:
            engine.close()


app.command("batch")(batch_command)


def _show_library_notes() -> None:
    """The library reports automatic repairs (a damaged store re-converted, a stale one removed) as
    ``tierkv`` logging warnings; on the command line they are ``note:`` lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("note: %(message)s"))
    logger = logging.getLogger("tierkv")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)


def main() -> None:
    _show_library_notes()
    app()


if __name__ == "__main__":
    main()
