"""Embedding tierkv in an asyncio application: two requests at once on one engine.

``engine.astream`` yields pieces without blocking the event loop; concurrent requests share each
step's layer pass (the result's ``stats.batch_size`` says how many ran together). Cancelling the task
that iterates a stream stops its generation. Run: python examples/embed_asyncio.py --model demo
"""

from __future__ import annotations

import argparse
import asyncio

import tierkv


async def reply(engine: tierkv.Engine, name: str, prompt: str, max_new_tokens: int) -> tierkv.GenerationResult:
    stream = engine.astream(prompt, max_new_tokens=max_new_tokens, temperature=0.8, seed=len(name))
    async for piece in stream:
        if piece.text:
            print(f"{name}: {piece.text!r}")
    assert stream.result is not None
    return stream.result


async def run(model: str, device: str | None, max_new_tokens: int) -> None:
    with tierkv.load(model, device=device) as engine:
        first, second = await asyncio.gather(
            reply(engine, "a", "Once upon a time", max_new_tokens),
            reply(engine, "b", "The little robot", max_new_tokens))
        for name, result in (("a", first), ("b", second)):
            print(f"{name} done: {len(result.token_ids)} tokens, finish_reason={result.finish_reason}, "
                  f"shared steps with up to {result.stats.batch_size} sequences: {result.text!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    asyncio.run(run(args.model, args.device, args.max_new_tokens))


if __name__ == "__main__":
    main()
