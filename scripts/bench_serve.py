"""Serving overhead: `tierkv serve` under N concurrent streaming clients vs the engine called in process.

Why this script exists: issue 16 asks that the OpenAI-compatible server cost at most 10% of the
in-process latency at 8 clients. A bounded load test (a fixed count of requests, N clients each
sending the next one as soon as its last one ended, every request the same prompt and exactly
``--max-tokens`` new tokens) runs on the same model and settings against ``Engine.astream`` in
this process (the peer: no HTTP at all) and over loopback HTTP against a ``tierkv serve``
subprocess with streaming (SSE) requests, in alternating rounds (a shared machine's background
load then falls on both alike). Both report requests/s, time to first
token (TTFT), inter-token latency (ITL, between text-bearing pieces) and whole-request latency,
p50/p90/p99; the ratios are server / in-process. A human table, then one JSON line.

Both sides reuse the prompt's cached KV (``cache_prompt``, the server's default) and run under
the same CPU settings: the same torch thread count (``--threads``, default
torch's choice here, passed to the server as ``--threads``) and the same ``OMP_WAIT_POLICY``
(the environment's, libgomp's default unless set; the server inherits it). With the default
(threads spin at barriers), another busy process on a small machine's cores can make a 2-thread
decode step 10-20x slower, on whichever side happens to run at that moment, which is what made an
earlier in-process peer look 3-20x slower than the server (docs/benchmarks.md, "Serving overhead");
``OMP_WAIT_POLICY=PASSIVE`` in the environment avoids that on a busy machine but costs torch 1.2-1.5x
on a quiet one, so it is opt-in. The 1-minute load average at each round's start is reported per side.

    python scripts/bench_serve.py --model demo --clients 8 --requests 32 --rounds 3 --max-tokens 32
    python scripts/bench_serve.py --model bench-150m --clients 8 --requests 16 --rounds 3 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

# libgomp reads it once, when torch loads; the server inherits the environment
OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "default")
CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT / "scripts"))
from bench_common import bench_model_dir, emit_json, prefer_checkout, print_table  # noqa: E402

prefer_checkout(CHECKOUT)
import tierkv  # noqa: E402

# a ~150M-parameter random Llama with the demo model's vocabulary (its tokenizer is copied in, so text streams)
SERVE_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                   num_key_value_heads=4, vocab_size=4096, max_position_embeddings=2048)
# the server's default (llama.cpp's cache_prompt); given on both sides, so both reuse the prompt's cached KV
CACHE_PROMPT = True
PROMPT = "Return a list of the things a small robot needs to know before it leaves the house"


@dataclass
class Timing:
    """One request as its client saw it: when it was sent, and when each text-bearing piece arrived."""

    sent: float
    pieces: list[float] = field(default_factory=list)
    done: float = 0.0


def model_dir(name: str, root: Path) -> str:
    """``demo``, a model directory, or ``bench-150m`` (built once under ``root`` with the demo tokenizer)."""
    if name != "bench-150m":
        return name
    path = bench_model_dir(root, shape=SERVE_SHAPE)
    demo = tierkv.engine.model_path("demo")
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if not (path / file).is_file():
            shutil.copy(demo / file, path / file)
    return str(path)


async def load_test(send: Callable[[], Awaitable[Timing]], clients: int, requests: int) -> tuple[list[Timing], float]:
    """``requests`` calls of ``send`` by ``clients`` concurrent workers -> (timings, wall seconds)."""
    left = list(range(requests))
    timings: list[Timing] = []

    async def worker() -> None:
        while left:
            left.pop()
            timings.append(await send())
    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(clients)])
    return timings, time.perf_counter() - t0


def summarize(timings: list[Timing], wall: float) -> dict[str, Any]:
    ttft = [(t.pieces[0] - t.sent) * 1e3 for t in timings if t.pieces]
    itl = [(b - a) * 1e3 for t in timings for a, b in zip(t.pieces, t.pieces[1:])]
    latency = [(t.done - t.sent) * 1e3 for t in timings]

    def pct(values: list[float]) -> dict[str, float]:
        if not values:
            return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
        p = np.percentile(values, [50, 90, 99])
        return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2]), "mean": float(np.mean(values))}
    return {"requests": len(timings), "wall_s": wall, "requests_per_s": len(timings) / wall,
            "ttft_ms": pct(ttft), "itl_ms": pct(itl), "latency_ms": pct(latency)}


def local_sender(engine: Any, sampling: dict[str, Any]) -> Callable[[], Awaitable[Timing]]:
    """The peer: one request through ``Engine.astream`` in this process."""
    async def send() -> Timing:
        t = Timing(time.perf_counter())
        async for piece in engine.astream(PROMPT, cache_prompt=CACHE_PROMPT, **sampling):
            if piece.text:
                t.pieces.append(time.perf_counter())
        t.done = time.perf_counter()
        return t
    return send


def http_sender(client: Any, sampling: dict[str, Any]) -> Callable[[], Awaitable[Timing]]:
    """One streaming /v1/completions request to the server, timed as its client sees it."""
    body = {"model": "bench", "prompt": PROMPT, "stream": True, "max_tokens": sampling["max_new_tokens"],
            "temperature": 0, "ignore_eos": True,
            "cache_prompt": CACHE_PROMPT}

    async def send() -> Timing:
        t = Timing(time.perf_counter())
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    t.pieces.append(time.perf_counter())
        t.done = time.perf_counter()
        return t
    return send


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, args: argparse.Namespace, port: int) -> subprocess.Popen:
    """``tierkv serve`` in a subprocess (its own interpreter: the load generator does not share its GIL)."""
    import httpx
    cmd = [sys.executable, "-m", "tierkv", "serve", model, "--port", str(port), "--model-name", "bench",
           "--max-sequences", str(args.clients), "--threads", str(args.threads)]
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--dtype", args.dtype] if args.dtype else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CHECKOUT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + args.start_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tierkv serve exited: {proc.stderr.read()[-2000:]}")   # type: ignore[union-attr]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("tierkv serve did not start in time")
        time.sleep(0.2)


async def interleaved(engine: Any, url: str, args: argparse.Namespace,
                      sampling: dict[str, Any]) -> tuple[dict[str, list[Timing]], dict[str, float], dict[str, list[float]]]:
    """Warm both up, then ``args.rounds`` rounds of (in process, server): on a shared machine the
    interleaving lets both see the same background load. -> timings, wall seconds and the 1-minute
    load average at each round's start, per side."""
    import httpx
    limits = httpx.Limits(max_connections=args.clients + 2, max_keepalive_connections=args.clients + 2)
    timings: dict[str, list[Timing]] = {"in_process": [], "server": []}
    walls = {"in_process": 0.0, "server": 0.0}
    loads: dict[str, list[float]] = {"in_process": [], "server": []}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        senders = {"in_process": local_sender(engine, sampling), "server": http_sender(client, sampling)}
        for send in senders.values():
            await load_test(send, args.clients, args.clients)
        for _ in range(args.rounds):
            for side, send in senders.items():
                loads[side].append(os.getloadavg()[0])
                got, wall = await load_test(send, args.clients, args.requests)
                timings[side] += got
                walls[side] += wall
    return timings, walls, loads


def ratios(server: dict[str, Any], local: dict[str, Any]) -> dict[str, float]:
    def r(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")
    out = {"requests_per_s": r(server["requests_per_s"], local["requests_per_s"])}
    for metric in ("ttft_ms", "itl_ms", "latency_ms"):
        for key in ("p50", "p90", "p99", "mean"):
            out[f"{metric}_{key}"] = r(server[metric][key], local[metric][key])
    return out


def table_rows(args: argparse.Namespace, model: str, local: dict[str, Any], server: dict[str, Any],
               ratio: dict[str, float]) -> list[tuple[str, str]]:
    """The human table: the load, the CPU settings, each side's figures and the ratios."""
    rows = [("model", f"{args.model} ({model})"),
            ("load", f"{args.clients} clients, {args.rounds} x {args.requests} requests per side (interleaved), "
                     f"{args.max_tokens} new tokens each, streamed"),
            ("CPU settings (both sides)", f"{args.threads} torch threads, OMP_WAIT_POLICY={OMP_WAIT_POLICY}")]
    for name, res in (("in-process", local), ("server", server)):
        rows.append((f"{name} requests/s", f"{res['requests_per_s']:.2f}"))
        rows.append((f"{name} load avg at rounds", " ".join(f"{v:.1f}" for v in res["load_avg_1min"])))
        for metric in ("ttft_ms", "itl_ms", "latency_ms"):
            m = res[metric]
            rows.append((f"{name} {metric[:-3]} ms", f"p50 {m['p50']:.1f}  p90 {m['p90']:.1f}  p99 {m['p99']:.1f}"))
    rows.append(("server / in-process latency", f"p50 {ratio['latency_ms_p50']:.3f}  mean {ratio['latency_ms_mean']:.3f}"
                                                f"  (goal <= 1.10)"))
    rows.append(("server / in-process TTFT p50", f"{ratio['ttft_ms_p50']:.3f}"))
    rows.append(("server / in-process requests/s", f"{ratio['requests_per_s']:.3f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="tierkv serve overhead vs the engine in process")
    parser.add_argument("--model", default="demo", help="demo, a model directory, or bench-150m (built once)")
    parser.add_argument("--model-root", type=Path, default=Path("/tmp/tierkv-bench-models"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads on both sides (default: torch's choice in this process)")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    args = parser.parse_args()
    import torch
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    model = model_dir(args.model, args.model_root)
    import httpx
    sampling = dict(max_new_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    port = free_port()
    proc = start_server(model, args, port)
    try:
        with tierkv.load(model, device=args.device, dtype=args.dtype, max_sequences=args.clients) as engine:
            timings, walls, loads = asyncio.run(interleaved(engine, f"http://127.0.0.1:{port}", args, sampling))
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    local, server = (summarize(timings[side], walls[side]) for side in ("in_process", "server"))
    server["server_health"] = health
    for side, res in (("in_process", local), ("server", server)):
        res["load_avg_1min"] = loads[side]
    ratio = ratios(server, local)
    print_table("tierkv serve vs in-process (loopback HTTP, SSE)", table_rows(args, model, local, server, ratio))
    emit_json({"bench": "serve", "model": args.model, "clients": args.clients, "requests": args.requests,
               "rounds": args.rounds, "threads": args.threads, "omp_wait_policy": OMP_WAIT_POLICY,
               "max_tokens": args.max_tokens, "in_process": local, "server": server, "ratio": ratio,
               "overhead_latency_p50": ratio["latency_ms_p50"] - 1.0,
               "goal_met": bool(ratio["latency_ms_p50"] <= 1.10)})


if __name__ == "__main__":
    main()
