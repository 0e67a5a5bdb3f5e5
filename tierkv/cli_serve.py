"""``tierkv serve MODEL``: the OpenAI-compatible local server on uvicorn.

Why this module exists: the serve command has its own concerns (where to bind, the API key, the
refusal to expose a keyless server beyond loopback) and keeps them out of ``cli.py``; it takes the
same load flags as ``tierkv run`` (``cli_flags.LoadFlags``) and builds the app with
``tierkv.server.create_app``.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
from pathlib import Path
from typing import Any, Optional

import typer

from tierkv.cli_flags import LoadFlags, expand_flags, flags
from tierkv.config import ConfigError
from tierkv.errors import ArgumentError

__all__ = ["API_KEY_ENV", "bind_policy", "is_loopback", "register"]

API_KEY_ENV = "TIERKV_API_KEY"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) binds to this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False                # a host name: it may resolve to any interface


def bind_policy(host: str, api_key: Optional[str], insecure_no_key: bool) -> Optional[tuple[str, ...]]:
    """The Host names the server answers (``create_app``'s allowed_hosts: loopback names for a loopback
    bind, None for any); refuses a non-loopback bind without a key unless ``insecure_no_key``."""
    from tierkv.server.app import LOOPBACK_HOSTS
    if is_loopback(host):
        return LOOPBACK_HOSTS
    if not api_key and not insecure_no_key:
        raise ArgumentError(f"--host {host} exposes the server beyond this machine without an API key; give "
                            f"--api-key KEY (or set {API_KEY_ENV}), or --insecure-no-key to serve anyone who can "
                            "reach it")
    return None


def register(app: typer.Typer, model_arg: Any) -> None:
    """Add ``tierkv serve`` to ``app`` (``model_arg``: the CLI's MODEL argument)."""

    @app.command()
    @expand_flags
    def serve(
        model: str = model_arg,
        host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default)"),
        port: int = typer.Option(8000, min=0, max=65535, help="TCP port"),
        api_key: Optional[str] = typer.Option(
            None, "--api-key", help=f"require 'Authorization: Bearer KEY' on every route but /health "
                                    f"(default: ${API_KEY_ENV})"),
        insecure_no_key: bool = typer.Option(
            False, "--insecure-no-key", help="allow a non-loopback --host without an API key"),
        model_name: Optional[str] = typer.Option(
            None, "--model-name", help="the model id clients send (default: the model directory's name)"),
        max_sequences: int = typer.Option(16, "--max-sequences", min=1,
                                          help="requests that decode together; more wait for a place"),
        sessions_dir: Optional[Path] = typer.Option(
            None, "--sessions-dir", help="keep the prompt cache in DIR: written as entries are made, restored "
                                         "at start (the same model and dtype only)"),
        prompt_cache_tokens: Optional[int] = typer.Option(
            None, "--prompt-cache-tokens", min=0, help="most KV tokens of cached prompts kept, oldest evicted "
                                                       "first (default: 4x the planned context; 0: none)"),
        options: LoadFlags = flags(LoadFlags),
    ) -> None:
        """Serve the model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models) with a
        chat page at / and counters at /health."""
        from tierkv.cli import _load, _set_threads, _user_errors     # cli imports this module
        _set_threads(options.threads)
        with _user_errors():
            key = api_key or os.environ.get(API_KEY_ENV) or None
            hosts = bind_policy(host, key, insecure_no_key)
            try:
                importlib.import_module("tierkv.server")     # before loading: the extra may be missing
            except ImportError as exc:
                raise ConfigError(str(exc)) from None
            engine = _load(model, options, False, max_sequences=max_sequences, sessions_dir=sessions_dir,
                           prompt_cache_tokens=prompt_cache_tokens)
            run_server(engine, host, port, key, hosts, model_name or model_id(model))


def model_id(model: str) -> str:
    """The id a model is served as: its directory's (or GGUF file's) name; ``demo`` for the bundled one."""
    from tierkv.engine import model_path
    path = model_path(model)
    return "demo" if model == "demo" else (path.stem if path.suffix == ".gguf" else path.name)


def run_server(engine: Any, host: str, port: int, api_key: Optional[str], allowed_hosts: Optional[tuple[str, ...]],
               model_name: str) -> None:
    """Run uvicorn over ``create_app(engine)`` until Ctrl-C; the engine is closed after."""
    try:
        from tierkv.server import create_app
        import uvicorn
        app = create_app(engine, model_name=model_name, api_key=api_key, allowed_hosts=allowed_hosts)
        shown = f"[{host}]" if ":" in host else host
        typer.echo(f"serving {model_name} at http://{shown}:{port} (OpenAI API under /v1, chat page at /, "
                   f"/health){'; API key required' if api_key else ''}", err=True)
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                      timeout_graceful_shutdown=5)).run()
    finally:
        engine.close()
