"""CUDA graphs of the layer halves (tierkv/cuda_graphs.py): off with the reason where there is no CUDA;
the bookkeeping (capture after warm-up, replay per token count, weights that moved run eagerly,
a failed capture falls back once) checked on the CPU with a stand-in capture that replays by
running the halves again into the same static outputs, as a graph does; on CUDA (``gpu``) the real
graphs give the eager tokens."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import tierkv
from placements import random_prompt
from tierkv.config import Policy
from tierkv.cuda_graphs import GraphedHalves, graph_halves
from tierkv.engine import Engine
from tierkv.model import EAGER_HALVES

pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")

PROMPTS = [random_prompt(n, seed=90 + n) for n in (7, 12, 3)]


def _outputs(out: Any) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def replay_capture(fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
    """A graph's contract on the CPU: outputs are static tensors that each replay overwrites."""
    static = fn()

    def replay() -> None:
        for dst, src in zip(_outputs(static), _outputs(fn())):
            dst.copy_(src)

    return replay, static


def _graphed(engine: Engine, **options: Any) -> GraphedHalves:
    graphed = GraphedHalves(EAGER_HALVES, capture=replay_capture, **options)
    engine.runner.halves, engine.graph_stats = graphed.halves, graphed.stats
    return graphed


def test_cuda_graph_on_the_cpu_is_off_and_says_why(tiny_llama_dir: Path) -> None:
    with tierkv.load(tiny_llama_dir, device="cpu", cuda_graph=True) as engine:
        result = engine.generate(PROMPTS[0], max_new_tokens=3)
    state = result.stats.compile["cuda_graph"]
    assert state["asked"] and not state["active"] and "no CUDA" in state["reason"] and state["replays"] == 0
    halves, stats = graph_halves(EAGER_HALVES, torch.device("cpu"), asked=False)
    assert halves is EAGER_HALVES and not stats.asked


def test_graphed_decode_replays_per_token_count_and_gives_the_eager_tokens(tiny_llama_dir: Path) -> None:
    with Engine(tiny_llama_dir, Policy(device="cpu", dtype="float32", kv="exact")) as engine:
        want_solo = engine.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True).token_ids
        want = [o.token_ids for o in engine.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)]
        graphed = _graphed(engine, max_tokens=8, warmup=2)
        solo = engine.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True).token_ids
        got = [o.token_ids for o in engine.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)]
    layers = engine.config.num_layers
    s = graphed.stats
    assert (solo, got) == (want_solo, want)
    # one token (solo decode) and three (the batch's decode): captured at the second step of each,
    # one graph per half and layer; the prefills (7 and 22 tokens) are not
    assert s.active and s.token_counts == [1, 3] and s.captures == 2 * 2 * layers
    assert s.replays == 2 * layers * (4 + 4) and s.weight_misses == 0


def test_weights_that_moved_run_eagerly_and_old_token_counts_are_dropped(tiny_llama_dir: Path) -> None:
    with Engine(tiny_llama_dir, Policy(device="cpu", dtype="float32", kv="exact")) as engine:
        graphed = _graphed(engine, max_tokens=4, max_sizes=1, warmup=1)
        cfg, w = engine.config, engine._weights.wait(0)
        h = torch.randn(1, 1, cfg.hidden_size)
        attn = torch.randn(1, 1, cfg.q_size)
        want = EAGER_HALVES.post(cfg, w, h, attn, 0)
        graphed.pre(cfg, w, h, torch.ones(1, 1, 1, cfg.head_dim), torch.zeros(1, 1, 1, cfg.head_dim), 0)  # counts
        first = graphed.post(cfg, w, h, attn, 0)
        again = graphed.post(cfg, w, h, attn, 0)
        moved = graphed.post(cfg, {k: v.clone() for k, v in w.items()}, h, attn, 0)
        assert torch.equal(first, want) and torch.equal(again, want) and torch.equal(moved, want)
        assert again.data_ptr() != first.data_ptr()                  # outputs are cloned out of the graph
        s = graphed.stats
        assert (s.captures, s.replays, s.weight_misses) == (2, 3, 1)     # pre once, post twice
        two = torch.randn(1, 2, cfg.hidden_size)
        graphed.pre(cfg, w, two, torch.ones(1, 2, 1, cfg.head_dim), torch.zeros(1, 2, 1, cfg.head_dim), 0)
        assert s.token_counts == [2]                                   # max_sizes=1: the 1-token graphs went


def test_a_failed_capture_turns_graphs_off_once(tiny_llama_dir: Path) -> None:
    def failing(fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        raise RuntimeError("operation not permitted when stream is capturing")

    with Engine(tiny_llama_dir, Policy(device="cpu", dtype="float32", kv="exact")) as engine:
        want = engine.generate(PROMPTS[1], max_new_tokens=5, ignore_eos=True).token_ids
        graphed = GraphedHalves(EAGER_HALVES, capture=failing, warmup=1)
        engine.runner.halves, engine.graph_stats = graphed.halves, graphed.stats
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = engine.generate(PROMPTS[1], max_new_tokens=5, ignore_eos=True).token_ids
    assert got == want
    assert len([w for w in caught if "capture failed" in str(w.message)]) == 1
    assert not graphed.stats.active and "not permitted" in graphed.stats.reason and graphed.stats.replays == 0


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graphs_give_the_eager_tokens_on_cuda(tiny_llama_dir: Path, tmp_path: Path, compile: bool) -> None:
    kwargs = dict(device="cuda", dtype="float32", kv="exact", offload_dir=tmp_path)
    with tierkv.load(tiny_llama_dir, **kwargs) as engine:
        want = [o.token_ids for o in engine.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)]
    with tierkv.load(tiny_llama_dir, cuda_graph=True, compile=compile, **kwargs) as engine:
        got = [o.token_ids for o in engine.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)]
        state = engine.compile_stats()
    assert got == want
    assert state["cuda_graph"]["active"] and state["cuda_graph"]["replays"] > 0, state
    assert state["compile"]["active"] == compile, state
