"""Embedding tierkv in an application: stream a completion into a callback.

A desktop app usually wants the text as it comes (to append to a widget) and a way to stop early.
Here the callback receives each piece of text; returning False from it cancels the generation
(its KV is freed at once). Run: python examples/embed_callback.py --model demo --prompt "Return a list of"
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import tierkv


def generate_into(engine: tierkv.Engine, prompt: str, on_text: Callable[[str], bool],
                  **sampling: object) -> tierkv.GenerationResult:
    """Stream ``prompt``'s completion into ``on_text`` (return False from it to stop); the result after."""
    stream = engine.stream(prompt, **sampling)
    for piece in stream:
        if piece.text and on_text(piece.text) is False:
            stream.cancel()         # the stream still ends with the text held back so far
    return stream.result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--prompt", default="Return a list of")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--stop-after-chars", type=int, default=None, help="cancel once this much text came")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    received: list[str] = []

    def on_text(text: str) -> bool:
        received.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()
        return args.stop_after_chars is None or sum(map(len, received)) < args.stop_after_chars

    with tierkv.load(args.model, device=args.device) as engine:
        result = generate_into(engine, args.prompt, on_text, max_new_tokens=args.max_new_tokens)
    print()
    print(f"[{len(result.token_ids)} tokens, finish_reason={result.finish_reason}, "
          f"{result.stats.decode_tok_s:.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
