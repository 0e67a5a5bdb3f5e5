"""tierkv's OpenAI-compatible local server (``tierkv serve``; ``create_app`` for embedding it).

Why this package exists: the server's web stack (starlette, uvicorn) is an optional extra, so the
library imports without it; importing this package without the extra fails with the install line.
"""

from __future__ import annotations

try:
    import starlette
    import uvicorn
except ImportError as exc:
    raise ImportError(f"the tierkv server needs the serve extra ({exc.name} is missing): pip install starlette "
                      "uvicorn, or pip install 'tierkv[serve]' (in a checkout: pip install -e '.[serve]')") from exc

from tierkv.server.app import create_app  # noqa: E402

del starlette, uvicorn                  # imported only to check the extra is there

__all__ = ["create_app"]
