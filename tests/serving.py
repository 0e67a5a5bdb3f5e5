"""Test helpers for the server: a real uvicorn server on a free loopback port, and the openai client.

Why this module exists: the server tests (and the prompt-cache and chat-page tests that build on
them) must drive the app over real HTTP with the official client, each with its own server that
is shut down when the test ends.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Iterator

import uvicorn

from tierkv.server import create_app


@contextlib.contextmanager
def running_server(engine: Any, *, api_key: str | None = None, model_name: str = "demo",
                   **app_options: Any) -> Iterator[str]:
    """Serve ``engine`` with uvicorn in a background thread on a free 127.0.0.1 port; yields the base URL
    (``http://127.0.0.1:PORT``) and shuts the server down on exit. ``app_options`` go to create_app."""
    app = create_app(engine, model_name=model_name, api_key=api_key, **app_options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def openai_client(base_url: str, api_key: str | None = None) -> Any:
    """The official OpenAI client pointed at ``base_url`` (no retries, so a refusal shows at once)."""
    import openai
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key or "unused", max_retries=0, timeout=60)
