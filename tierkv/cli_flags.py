"""The flags that several ``tierkv`` commands share, each defined once.

Why this module exists: ``run``, ``chat`` and ``plan`` take the same load flags and ``run`` and
``chat`` the same sampling flags. Declared per command they drifted (``chat``'s ``--dtype`` had lost
its help text). Here each flag is one field of a frozen dataclass that carries its typer Option; a
command takes a whole group as one parameter whose default is ``flags(Group, ...)`` (a command may
pick some of the group's flags and give its own defaults), and ``expand_flags`` turns that
parameter into the group's flags in the signature typer reads, then hands the command the built
dataclass. A flag added to a group reaches every command that takes the group.
"""

from __future__ import annotations

import functools
import inspect
import typing
from copy import copy
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import typer
from typer.models import OptionInfo

_OPTION = "typer_option"        # dataclass field metadata key: the flag's typer Option


def _flag(option: OptionInfo) -> Any:
    """A dataclass field whose default is the flag's default and whose metadata holds the flag."""
    return field(default=option.default, metadata={_OPTION: option})


@dataclass(frozen=True)
class LoadFlags:
    """How ``run``, ``chat`` (and, for the placement ones, ``plan``) load a model."""

    dtype: Optional[str] = _flag(typer.Option(
        None, help="compute dtype: bfloat16, float16, float32 (default: checkpoint's)"))
    device: Optional[str] = _flag(typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda when available)"))
    device_mem: Optional[str] = _flag(typer.Option(
        None, "--device-mem", help="device budget, e.g. 6GiB (default: free memory less headroom)"))
    host_mem: Optional[str] = _flag(typer.Option(
        None, "--host-mem", help="pinned host budget, e.g. 16GiB (default: detected)"))
    offload_dir: Optional[str] = _flag(typer.Option(
        None, "--offload-dir", help="where streamed layers live (default: ~/.cache/tierkv)"))
    kv: str = _flag(typer.Option(
        "auto", "--kv", help="KV attention: exact, sparse, or auto (sparse beyond 4096 tokens)"))
    kv_budget: float = _flag(typer.Option(
        0.05, "--kv-budget", help="sparse KV: fraction of the context (<1) or a token count"))
    chunk_tokens: Optional[int] = _flag(typer.Option(
        None, "--chunk-tokens", help="KV chunk size (default: adaptive per layer)"))
    kv_device_tokens: Optional[int] = _flag(typer.Option(
        None, "--kv-device-tokens",
        help="context whose KV keeps room on the device (default: min(4096, model max))"))
    kv_sketch: Optional[bool] = _flag(typer.Option(
        None, "--kv-sketch/--no-kv-sketch",
        help="sparse KV: score chunks with 2-bit key codes (finds single-token needles; "
             "1/16 of the KV kept on the device); default: on"))
    kv_quant: str = _flag(typer.Option(
        "none", "--kv-quant", help="KV chunks on host/disk: none, int8 or int4 (device KV stays exact)"))
    prefill_chunk_tokens: Optional[int] = _flag(typer.Option(
        None, "--prefill-chunk-tokens", min=1,
        help="prefill the prompt in pieces of this many tokens (default: the largest up to 2048 "
             "whose activations fit an eighth of --device-mem)"))
    quant: Optional[str] = _flag(typer.Option(
        None, "--quant", help="linear weights group-wise quantized: int8 or int4 (default: 16-bit; a converted "
                              "store: what it was converted with)"))
    group_size: Optional[str] = _flag(typer.Option(
        None, "--group-size", help="--quant: inputs per scale/minimum group, 32, 64 or 128 (default 64), or "
                                   "channel (int8: one per output row, the fastest int8 on the CPU)"))
    quant_head: bool = _flag(typer.Option(
        False, "--quant-head", help="--quant: quantize the LM head too (embeddings and norms stay 16-bit)"))
    threads: Optional[int] = _flag(typer.Option(
        None, "--threads", "-t", help="CPU threads for compute (default: torch's choice)"))
    compile: bool = _flag(typer.Option(
        False, "--compile", help="torch.compile the layers' math around the KV attention (fewer ops per step; "
                                 "the same tokens in fp32, bf16 rounds slightly differently); the first run "
                                 "compiles for tens of seconds, later ones reuse the cache under --offload-dir"))
    cuda_graph: bool = _flag(typer.Option(
        False, "--cuda-graph", help="CUDA: replay each resident layer's decode math from CUDA graphs "
                                    "(off elsewhere, and the stats say why)"))
    verify: bool = _flag(typer.Option(
        False, "--verify", help="first check every checkpoint tensor is finite (reads the whole checkpoint "
                                "once; names a corrupt tensor)"))

    def load_kwargs(self) -> dict[str, Any]:
        """``tierkv.load``'s keyword arguments (all but ``threads``, which the CLI sets on torch itself)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "threads"}
        kwargs["kv_budget"] = kv_budget_value(self.kv_budget)
        return kwargs


@dataclass(frozen=True)
class SamplingFlags:
    """How ``run`` and ``chat`` sample (``chat`` gives its own defaults)."""

    max_new_tokens: int = _flag(typer.Option(64, "--max-new-tokens", "-n", help="tokens to generate at most"))
    temperature: float = _flag(typer.Option(0.0, help="0 = greedy"))
    top_k: int = _flag(typer.Option(0, "--top-k", help="keep the k most likely tokens (0 = off)"))
    top_p: float = _flag(typer.Option(1.0, "--top-p", help="nucleus sampling mass (1 = off)"))
    seed: Optional[int] = _flag(typer.Option(None, help="random seed for sampling"))

    def sampling_kwargs(self, stop: Optional[list[str]] = None) -> dict[str, Any]:
        """``Engine.generate``/``stream``'s sampling keyword arguments."""
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p, seed=self.seed, stop=stop or ())


def kv_budget_value(value: float) -> float | int:
    """--kv-budget 0.05 is a fraction of the context (1 = all of it); 512 (a whole number > 1) is a token count."""
    return int(value) if value > 1 and float(value).is_integer() else value


@dataclass(frozen=True)
class _FlagGroup:
    """A command parameter's default: take the flags ``names`` of ``group`` (in that order), with
    ``defaults`` replacing the group's defaults."""

    group: type
    names: tuple[str, ...]
    defaults: dict[str, Any]


def flags(group: type, *, only: Optional[tuple[str, ...]] = None, **defaults: Any) -> Any:
    """The default of a command parameter that stands for the flags of ``group`` (a dataclass above):
    all of them in field order, or those named in ``only`` in that order; ``defaults`` per flag name."""
    names = tuple(f.name for f in fields(group)) if only is None else only
    known = {f.name for f in fields(group)}
    assert set(names) <= known and set(defaults) <= set(names), (group, names, defaults)
    return _FlagGroup(group, names, defaults)


def _group_parameters(spec: _FlagGroup) -> list[inspect.Parameter]:
    """The typer parameters one group stands for: each flag's Option (its default replaced where asked)."""
    hints = typing.get_type_hints(spec.group)
    by_name = {f.name: f for f in fields(spec.group)}
    params = []
    for name in spec.names:
        option = copy(by_name[name].metadata[_OPTION])
        if name in spec.defaults:
            option.default = spec.defaults[name]
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option,
                                        annotation=hints[name]))
    return params


def expand_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a typer command (below ``@app.command()``): each parameter whose default is
    ``flags(...)`` becomes its group's flags in the signature typer reads, and the command is
    called with that parameter set to the group's dataclass built from them."""
    hints = typing.get_type_hints(command)
    params: list[inspect.Parameter] = []
    groups: dict[str, _FlagGroup] = {}
    for param in inspect.signature(command).parameters.values():
        if isinstance(param.default, _FlagGroup):
            groups[param.name] = param.default
            params.extend(_group_parameters(param.default))
        else:
            params.append(param.replace(annotation=hints.get(param.name, param.annotation)))
    names = [p.name for p in params]
    assert groups and len(names) == len(set(names)), f"{command.__name__}: a flag name is taken twice: {names}"

    @functools.wraps(command)
    def expanded(**kwargs: Any) -> Any:
        for name, spec in groups.items():
            kwargs[name] = spec.group(**{n: kwargs.pop(n) for n in spec.names})   # the others: the group's defaults
        return command(**kwargs)

    expanded.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    expanded.__annotations__ = {p.name: p.annotation for p in params}
    return expanded
