"""The OpenAI-compatible HTTP server: a Starlette app over one Engine.

Why this module exists: desktop front ends and tools speak the OpenAI API to a local server
(llama.cpp's llama-server, Ollama, LM Studio). ``create_app`` answers /v1/models, /v1/completions
and /v1/chat/completions (``stream: true`` as server-sent events) with requests generated through
``Engine.astream``, so concurrent requests share the scheduler's steps. A client that disconnects
has its generation cancelled (its KV freed at the next step), counted in /health. Guards: an API
key (constant-time compare) on everything but /health and the static chat page, a Host header
allow-list against DNS rebinding for loopback binds, a body size limit, and JSON-only bodies.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from tierkv.aio import AsyncStream
from tierkv.errors import TierkvError
from tierkv.server.protocol import (APIError, ParsedRequest, chat_chunk, chat_response, completion_chunk,
                                    completion_response, error_body, parse_request, sse, usage)

__all__ = ["LOOPBACK_HOSTS", "MAX_BODY_BYTES", "ServerStats", "create_app"]

MAX_BODY_BYTES = 1 << 20            # 1 MiB: a longer request body is answered 413
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
PUBLIC_PATHS = ("/health",)         # answered without the API key; the chat page's files are too (no data)


@dataclass
class ServerStats:
    """Counters shown by /health: generation requests received, running now, finished, cancelled
    (the client went away), failed during generation, and refused with a 4xx before it."""

    requests: int = 0
    active: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0


def static_dir() -> Path:
    return Path(str(resources.files("tierkv") / "server" / "static"))


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _host_name(host: str) -> str:
    """``"127.0.0.1:8000"`` -> ``"127.0.0.1"``, ``"[::1]:8000"`` -> ``"::1"``."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _Guard:
    """ASGI middleware: Host allow-list, then the bearer key (everything but PUBLIC_PATHS and the page)."""

    def __init__(self, app: Any, api_key: str | None, allowed_hosts: Iterable[str] | None) -> None:
        self.app, self.key = app, None if api_key is None else api_key.encode()
        self.hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if self.hosts is not None:
            host = _host_name(headers.get("host", b"").decode("latin-1")).lower()
            if host not in self.hosts:
                await _error(APIError(400, f"the Host header {host!r} is not allowed here (a loopback server "
                                      "answers only localhost names); use http://127.0.0.1:PORT",
                                      code="invalid_host"))(scope, receive, send)
                return
        path = scope["path"]
        public = path in PUBLIC_PATHS or path == "/" or path.startswith("/static/")
        if self.key is not None and not public:
            given = headers.get("authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.key):
                await _error(APIError(401, "a valid API key is required: send the header "
                                      "'Authorization: Bearer KEY' (the key given to tierkv serve)",
                                      type_="authentication_error", code="invalid_api_key"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _json_body(request: Request) -> Any:
    """The request's JSON body: 415 unless JSON, 413 beyond MAX_BODY_BYTES (declared or streamed), 400 if malformed."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"the body must be JSON (Content-Type: application/json), not {kind or 'unset'!r}",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes; send a shorter prompt",
                       code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_big
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _SSE(Response):
    """A server-sent-events response that notices the client leaving while nothing is being sent:
    ``on_disconnect`` runs then (the route cancels its generation) and the stream stops."""

    def __init__(self, chunks: AsyncIterator[bytes], on_disconnect: Callable[[], None]) -> None:
        # no Response.__init__: it would declare Content-Length 0 for the empty body
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.chunks, self.on_disconnect = chunks, on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        watcher = asyncio.create_task(_wait_disconnect(receive))
        watcher.add_done_callback(lambda t: t.cancelled() or self.on_disconnect())
        try:
            async for chunk in self.chunks:
                if watcher.done():
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:             # the connection went away mid-write
            self.on_disconnect()
        finally:
            watcher.cancel()
            await self.chunks.aclose()   # type: ignore[attr-defined]


class _Routes:
    """The endpoints of one app (engine, served model name, counters)."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine, self.model, self.stats = engine, model_name, ServerStats()
        self.created = int(time.time())

    async def health(self, request: Request) -> Response:
        live = self.engine.kv_stats()["live_sequences"] if not self.engine._closed else 0
        cache = self.engine.prompt_cache_stats() if not self.engine._closed else {}
        return JSONResponse({"status": "ok", "model": self.model, **asdict(self.stats), "live_sequences": live,
                             "prompt_cache": {k: cache[k] for k in ("entries", "tokens", "hits", "hit_tokens")
                                              if k in cache}})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": self.created, "owned_by": "tierkv",
             "context_length": self.engine.context_limit_tokens}]})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def _generate(self, request: Request, kind: str) -> Response:
        self.stats.requests += 1
        try:
            req = parse_request(await _json_body(request), kind, self.engine, self.model)
            stream = self.engine.astream(req.prompt_ids, cache_prompt=req.cache_prompt, **req.sampling)
        except APIError as exc:
            self.stats.rejected += 1
            return _error(exc)
        except (TierkvError, TypeError) as exc:
            self.stats.rejected += 1
            return _error(APIError(400, str(exc)))
        self.stats.active += 1
        if req.stream:
            return _SSE(self._events(req, stream), lambda: self._cancel(stream))
        return await self._whole(request, req, stream)

    def _cancel(self, stream: AsyncStream) -> None:
        if not stream.done:
            stream.cancel()

    def _ended(self, stream: AsyncStream) -> None:
        """Count one generation leaving: finished, cancelled because its client went away, or failed."""
        self.stats.active -= 1
        result = stream.result
        if result is not None and result.finish_reason != "cancelled":
            self.stats.completed += 1
        elif stream.cancelled:
            self.stats.cancelled += 1
        else:
            self.stats.failed += 1

    async def _whole(self, request: Request, req: ParsedRequest, stream: AsyncStream) -> Response:
        """A non-streamed answer; a client that leaves before it is ready cancels the generation."""
        async def collect() -> str:
            return "".join([piece.text async for piece in stream])
        job, gone = asyncio.create_task(collect()), asyncio.create_task(_wait_disconnect(request.receive))
        try:
            await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not job.done():
                stream.cancel()
            text = await job
        except Exception as exc:        # noqa: BLE001 - this request failed (e.g. a KV budget): its error
            return _error(APIError(400 if isinstance(exc, TierkvError) else 500, str(exc),
                                   type_="invalid_request_error" if isinstance(exc, TierkvError) else "server_error"))
        finally:
            gone.cancel()
            self._ended(stream)
        result = stream.result
        assert result is not None
        build = completion_response if req.kind == "completion" else chat_response
        return JSONResponse(build(req, self.model, text, result.finish_reason, len(result.token_ids),
                                  result.stats.cached_prompt_tokens))

    async def _events(self, req: ParsedRequest, stream: AsyncStream) -> AsyncIterator[bytes]:
        chat = req.kind == "chat"
        try:
            if chat:
                yield sse(chat_chunk(req, self.model, {"role": "assistant", "content": ""}, None))
            try:
                async for piece in stream:
                    if piece.text:
                        yield sse(chat_chunk(req, self.model, {"content": piece.text}, None) if chat
                                  else completion_chunk(req, self.model, piece.text, None))
            except Exception as exc:    # noqa: BLE001 - the error ends this stream only
                kind = "invalid_request_error" if isinstance(exc, TierkvError) else "server_error"
                yield sse(error_body(str(exc), kind))
                yield sse("[DONE]")
                return
            result = stream.result
            if result is None or result.finish_reason == "cancelled":
                return
            yield sse(chat_chunk(req, self.model, {}, result.finish_reason) if chat
                      else completion_chunk(req, self.model, "", result.finish_reason))
            if req.include_usage:
                use = usage(len(req.prompt_ids), len(result.token_ids), result.stats.cached_prompt_tokens)
                yield sse(chat_chunk(req, self.model, None, None, use) if chat
                          else completion_chunk(req, self.model, None, None, use))
            yield sse("[DONE]")
        finally:
            self._cancel(stream)
            self._ended(stream)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return JSONResponse(error_body(message.get(exc.status_code, str(exc.detail)),
                                   code="not_found" if exc.status_code == 404 else None),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


def create_app(engine: Any, *, model_name: str, api_key: str | None = None,
               allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS) -> Starlette:
    """The server over ``engine`` serving it as ``model_name``. ``api_key``: every route but /health and the
    chat page's files requires ``Authorization: Bearer api_key``. ``allowed_hosts``: the Host names answered
    (default: loopback names, against DNS rebinding; None answers any, for a non-loopback bind)."""
    routes = _Routes(engine, model_name)
    page: Callable[[Request], Awaitable[Response]] = _page
    app = Starlette(routes=[
        Route("/", page), Route("/health", routes.health), Route("/v1/models", routes.models),
        Route("/v1/completions", routes.completions, methods=["POST"]),
        Route("/v1/chat/completions", routes.chat, methods=["POST"]),
        Mount("/static", StaticFiles(directory=static_dir()), name="static"),
    ], exception_handlers={HTTPException: _http_error})
    app.state.stats = routes.stats
    app.add_middleware(_Guard, api_key=api_key, allowed_hosts=allowed_hosts)
    return app


async def _page(request: Request) -> Response:
    return FileResponse(static_dir() / "index.html", media_type="text/html")
