"""The server's prompt cache, driven by the official openai client: a chat's second turn is served
from the cache (fewer prefilled tokens, ``usage.prompt_tokens_details.cached_tokens``, the same
reply as with ``cache_prompt: false``), and ``--sessions-dir`` keeps the cache across a restart
(two server lifetimes on one directory, a new engine for the second)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import tierkv
from serving import openai_client, running_server

FIRST = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me about a cat."}]
NEXT = {"role": "user", "content": "And then what did the cat do?"}
REPLY = dict(model="demo", max_tokens=8, temperature=0)


def _load(cache_dir: Path | None = None) -> tierkv.Engine:
    return tierkv.load("demo", device="cpu", dtype="float32", sessions_dir=cache_dir)


def _turn(client: Any, messages: list[dict[str, str]], **extra: Any) -> Any:
    return client.chat.completions.create(messages=messages, extra_body={"ignore_eos": True, **extra}, **REPLY)


def _second_turn(client: Any, first: Any) -> list[dict[str, str]]:
    return FIRST + [{"role": "assistant", "content": first.choices[0].message.content}, NEXT]


def test_a_second_chat_turn_is_served_from_the_cache() -> None:
    with _load() as engine, running_server(engine) as url:
        client = openai_client(url)
        first = _turn(client, FIRST)
        assert first.usage.prompt_tokens_details.cached_tokens == 0          # nothing cached yet
        messages = _second_turn(client, first)
        plain = _turn(client, messages, cache_prompt=False)
        assert plain.usage.prompt_tokens_details.cached_tokens == 0
        cached = _turn(client, messages)                                     # cache_prompt defaults to true
        assert cached.choices[0].message.content == plain.choices[0].message.content
        assert cached.usage.prompt_tokens == plain.usage.prompt_tokens
        hit = cached.usage.prompt_tokens_details.cached_tokens
        assert first.usage.prompt_tokens <= hit < cached.usage.prompt_tokens   # the first turn's tokens at least
        stats = engine.prompt_cache_stats()
        assert stats["hits"] == 1 and stats["hit_tokens"] == hit
        chunks = list(client.chat.completions.create(                      # streamed, with usage
            messages=messages, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}, **REPLY))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            plain.choices[0].message.content
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached.usage.prompt_tokens - 1


def test_sessions_dir_keeps_the_cache_across_a_restart(tmp_path: Path) -> None:
    cache_dir = tmp_path / "prompts"
    with _load(cache_dir) as engine, running_server(engine) as url:
        first = _turn(openai_client(url), FIRST)
    assert list(cache_dir.glob("*.tkvs"))
    with _load(cache_dir) as engine, running_server(engine) as url:          # a new engine and server
        client = openai_client(url)
        assert engine.prompt_cache_stats()["entries"] == 1
        messages = _second_turn(client, first)
        plain = _turn(client, messages, cache_prompt=False)
        cached = _turn(client, messages)
        assert cached.choices[0].message.content == plain.choices[0].message.content
        assert cached.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_serve_passes_the_cache_flags_to_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tierkv import cli_serve
    from tierkv.cli import app

    seen: dict[str, Any] = {}

    def fake_run(engine: Any, *args: Any) -> None:
        seen.update(engine.prompt_cache_stats())
        engine.close()

    monkeypatch.setattr(cli_serve, "run_server", fake_run)
    out = CliRunner().invoke(app, ["serve", "demo", "--device", "cpu", "--sessions-dir", str(tmp_path / "d"),
                                   "--prompt-cache-tokens", "321"])
    assert out.exit_code == 0, out.output
    assert seen["limit_tokens"] == 321 and seen["directory"] == str(tmp_path / "d")


def test_health_shows_the_prompt_cache() -> None:
    import httpx

    with _load() as engine, running_server(engine) as url:
        _turn(openai_client(url), FIRST)
        cache = httpx.get(f"{url}/health").json()["prompt_cache"]
        assert cache["entries"] == 1 and cache["tokens"] > 0 and cache["hits"] == 0
