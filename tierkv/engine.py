"""Engine: the public facade — load a model, then generate, stream, score, and hold sessions.

Why this module exists: it is the library contract desktop applications embed (``tierkv.load``
-> ``Engine.generate``/``Engine.stream``/``Engine.session``). It validates prompts and options and
turns each call into a client of the engine core (``core``: the step scheduler's plans carried out
over the live sequences, one packed forward per step by ``runner``). One Engine may be shared by
threads: their sequences are served together, and a stream can be cancelled from any thread.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch

from tierkv.aio import AsyncStream, agenerate as _agenerate, astream as _astream, close_bridge
from tierkv.config import Budget, ConfigError, ModelConfig, Policy, read_json
from tierkv.errors import ArgumentError
from tierkv.core import Client, EngineCore, Seq, new_turn
from tierkv.generation import (GenerationResult, GenerationStats, Piece, SequenceOutput, Stream, sampling_params,
                               split_batch, token_ids_of)
from tierkv.io.checkpoint import Checkpoint, resolve_dtype
from tierkv.io.progress import ProgressFn, phase_progress
from tierkv.kvroom import KVRoom
from tierkv.io.store import WeightStore, existing_manifest, is_store_dir
from tierkv.io.gguf import is_gguf_source
from tierkv.loader import gguf_store, open_store_source, open_weight_source
from tierkv.pipeline.schedule import ResidentWeights, WeightSource
from tierkv.quantspec import WeightQuant, parse_weight_quant
from tierkv.budgets import default_offload_dir
from tierkv.calibrate import remember as remember_links
from tierkv.compiled import CompileStats, CompiledHalves, inductor_cache_dir
from tierkv.cuda_graphs import GraphStats, graph_halves
from tierkv.model import EAGER_HALVES, LayerHalves
from tierkv.plan import DEFAULT_CONTEXT_TOKENS, Plan, activation_bytes, prefill_sizes, step_rows
from tierkv.prompt_cache import PromptCache
from tierkv.runner import Runner
from tierkv.sampling import SamplingParams
from tierkv.scheduler import Limits, Scheduler
from tierkv.session import ParkedFile, Session, grown_capacity
from tierkv.tokenizer import Tokenizer

__all__ = ["Engine", "GenerationResult", "GenerationStats", "Piece", "Stream", "context_limit_tokens", "load",
           "model_path", "resolve_device"]

Prompt = Union[str, Sequence[int]]


def model_path(model: str | Path) -> Path:
    """``"demo"`` -> the model bundled in the package; anything else is a directory path."""
    if str(model) == "demo":
        return Path(str(resources.files("tierkv") / "demo_model"))
    return Path(model).expanduser()


def resolve_device(name: str | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` -> a usable torch device; None means CUDA when available.
    Any other device (mps, meta, xpu, ...) is refused with an ArgumentError: tierkv runs on those two."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ArgumentError(f"device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise ArgumentError(f"device {name!r} is not supported; tierkv runs on cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ArgumentError(f"device {name!r} is not available ({torch.cuda.device_count()} CUDA devices here); "
                            "use --device cpu or another cuda:N")
    return device


def context_limit_tokens(cfg: ModelConfig) -> int:
    """Longest sequence the model supports (dynamic RoPE stretches it by its factor)."""
    return cfg.context_limit_tokens


def _eos_ids(model_dir: Path, cfg: ModelConfig, tokenizer: Tokenizer | None) -> frozenset[int]:
    ids = set(cfg.eos_token_ids)
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        raw = read_json(gen_path, what="generation config")
        ids.update(ModelConfig.token_ids_field(raw, "eos_token_id", str(gen_path)))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


class Engine:
    """A loaded model ready to generate, for many sequences at once. Build it with ``tierkv.load``.

    Thread-safe: calls from several threads are served together (their sequences share each step's
    layer pass). ``generate``/``stream``/``logits`` are clients of the step scheduler; ``submit`` and
    ``step`` expose it for callers that drive steps themselves.
    """

    def __init__(self, model: str | Path, policy: Policy = Policy(), budget: Budget = Budget(),
                 progress: ProgressFn | None = None, weights: WeightSource | None = None,
                 verify: bool = False, prefill_progress: ProgressFn | None = None, plan: Plan | None = None,
                 prompt_cache_tokens: int | None = None, sessions_dir: str | Path | None = None) -> None:
        """``weights`` injects a ready weight source (tests, custom placements) and skips planning;
        ``plan`` then says what that source's placement left for KV and activations (None: unbounded).
        ``verify`` first checks every checkpoint tensor is finite (``Checkpoint.verify``).

        ``prefill_progress(done, total)`` (also settable later as the attribute of that name) is
        called after each prefill piece with the prompt tokens processed so far and the prompt length.
        ``prompt_cache_tokens`` and ``sessions_dir``: the prompt cache's size and directory (``load``).
        """
        self.model_dir = model_path(model)
        if is_gguf_source(self.model_dir):      # a GGUF model runs from its cached store, converted on first use
            self.model_dir = gguf_store(self.model_dir, budget, policy, progress)
            policy = replace(policy, weight_quant=None)         # the store holds the file's schemes, and what was asked
        # a converted store passed as the model (``tierkv run OUT``) serves its own config and weights
        self.store: WeightStore | None = WeightStore.open(self.model_dir) if is_store_dir(self.model_dir) else None
        self.checkpoint: Checkpoint | None = None
        if self.store is not None:
            self.config: ModelConfig = self.store.config
            policy = replace(policy, weight_quant=policy.weight_quant or self.store.quant)   # unasked: what it holds
        else:
            self.checkpoint = Checkpoint(self.model_dir)
            self.config = self.checkpoint.config
        self.policy = policy
        self.dtype = resolve_dtype(policy.dtype, default=self.config.dtype)
        self.device = resolve_device(policy.device)
        if verify and self.checkpoint is not None:      # a store verifies its checksums as it is read
            self.checkpoint.verify(self.dtype, phase_progress(progress, "verify"))
        tok_path = self.model_dir / "tokenizer.json"
        self.tokenizer: Tokenizer | None = Tokenizer(self.model_dir) if tok_path.is_file() else None
        self.eos_token_ids = _eos_ids(self.model_dir, self.config, self.tokenizer)
        self.context_limit_tokens = context_limit_tokens(self.config)
        self.plan: Plan | None = plan if weights is not None else None
        if weights is None:
            resolved = replace(policy, dtype=str(self.dtype).removeprefix("torch."), device=str(self.device))
            if self.store is not None:
                weights, self.plan = open_store_source(self.store, budget, resolved, progress=progress)
            else:
                weights, self.plan = open_weight_source(self.model_dir, self.config, budget, resolved,
                                                        progress=progress)
        if weights is None:
            assert self.checkpoint is not None
            weights = ResidentWeights(self.checkpoint, self.dtype, self.device, policy.weight_quant,
                                      phase_progress(progress, "load"))
            self.checkpoint.close()       # its file mappings go once no resident tensor views them (CPU: copies)
        self._weights: WeightSource = weights
        self.prefill_progress = prefill_progress
        # prefill piece and attention scratch: the plan's (sized to the device budget), else the policy's
        self.prefill_chunk_tokens, self.attention_scratch_bytes = (
            (self.plan.prefill_chunk_tokens, self.plan.attention_scratch_bytes) if self.plan is not None
            else prefill_sizes(self.config, self.dtype, policy, 0, 1))
        self.compiled, self.graph_stats, halves = step_halves(policy, budget, self.device)
        self.runner = Runner(self.config, self._weights, self.dtype, self.device, halves)
        if self.runner.compiled_gemv and self.device.type == "cpu":   # its kernels' builds outlive a reboot too
            inductor_cache_dir(budget.offload_dir or default_offload_dir())
        limits, head_rows = step_limits(self.config, self.dtype, policy, self.plan, self.prefill_chunk_tokens,
                                        self.attention_scratch_bytes)
        room = KVRoom(self.config, policy, self.dtype, self.device, self.plan, self.attention_scratch_bytes, head_rows,
                      lambda path, seq, read, n: ParkedFile.write(path, self, seq, read, n, owned=True))
        self._core = EngineCore(self, self.runner, room, Scheduler(limits, room))
        self._closed = False
        self._bridge: Any = None                # aio.Bridge once an async request came; False once closed
        self._bridge_lock = threading.Lock()
        self._core.prompt_cache = PromptCache(self, self._core, prompt_cache_tokens, sessions_dir)

    # -- prompts -----------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """A string (tokenized, BOS as the model expects) or token ids -> validated token ids.
        Raises TypeError for anything else (None, floats, bools, nested lists) and ArgumentError
        for ids outside the vocabulary, an empty prompt or one longer than the model's context."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError(f"{self.model_dir} has no tokenizer.json, so text prompts cannot be "
                                  "encoded; pass token ids instead (e.g. --prompt-ids 1,2,3)")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = token_ids_of(prompt)
        if not ids:
            raise ArgumentError("the prompt is empty; give at least one token")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ArgumentError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if len(ids) > self.context_limit_tokens:
            raise ArgumentError(f"the prompt has {len(ids)} tokens but the model allows at most "
                                f"{self.context_limit_tokens} (max_position_embeddings); shorten the prompt")
        return ids

    def _batch(self, prompts: Prompt | Sequence[Prompt]) -> tuple[list[list[int]], bool]:
        """Normalize to a list of id lists; the flag says whether the caller passed a batch."""
        items, is_batch = split_batch(prompts)
        return [self.encode(p) for p in items], is_batch  # type: ignore[arg-type]

    def new_tokens_budget(self, context_tokens: int, params: SamplingParams) -> int:
        """New tokens a sequence of ``context_tokens`` may get: max_new_tokens, within the model's context."""
        return max(0, min(params.max_new_tokens, self.context_limit_tokens - context_tokens + 1))

    # -- requests ----------------------------------------------------------------------------
    def _client(self, batch: list[list[int]], params: SamplingParams, cache_prompt: bool = False) -> Client:
        """Sequences for ``batch`` in the scheduler (they join at the next step); with ``cache_prompt``
        each reuses the longest cached prefix of its prompt and is kept in the prompt cache at its end."""
        client, core = Client(len(batch)), self._core
        with core.held():
            self._check_open()
            for i, ids in enumerate(batch):
                budget = self.new_tokens_budget(len(ids), params)
                if budget == 0:
                    client.end_empty(i, ids)
                    continue
                p = replace(params, max_new_tokens=budget)
                out = SequenceOutput(ids, self.tokenizer, self.eos_token_ids, p)
                seq, cached = core.prompt_cache.take(ids) if cache_prompt else (Seq(core.new_id(), session=False), 0)
                turn = new_turn(client, i, p, list(ids[cached:]), out, self._weights.stats, self.device,
                                self.prefill_chunk_tokens, cached_prompt_tokens=cached)
                core.start(seq, turn, grown_capacity(seq, len(ids) + budget - 1, self.context_limit_tokens))
        return client

    def _stream_of(self, client: Client) -> Stream:
        core = self._core
        stream = Stream(lambda: core.next_item(client), lambda: core.cancel(client),
                        lambda: client.results if client.done else None)
        weakref.finalize(stream, _flag_cancelled, client)      # an abandoned stream stops at the next step
        return stream

    def generate(self, prompts: Prompt | Sequence[Prompt], *, cache_prompt: bool = False, **sampling: Any) -> Any:
        """Generate for one prompt (-> GenerationResult) or a list of prompts (-> list of them).

        Keyword arguments are ``SamplingParams`` fields: max_new_tokens, temperature, top_k,
        top_p, seed, stop (a string or a list of strings), ignore_eos. Prompts of any lengths share
        every layer pass; each gets exactly what it would alone (its own seed, stop rules, length).

        ``cache_prompt=True`` (llama.cpp's option): reuse the KV of the longest prefix of the prompt that
        an earlier cache_prompt request left in the prompt cache, prefilling only the rest
        (``stats.cached_prompt_tokens`` says how many were reused); keep this request's tokens and KV
        there when it ends. The tokens are the same as without it.
        """
        self._check_open()
        batch, is_batch = self._batch(prompts)
        client = self._client(batch, sampling_params(sampling), cache_prompt)
        self._core.drain(client)
        return client.results if is_batch else client.results[0]

    def stream(self, prompts: Prompt | Sequence[Prompt], *, cache_prompt: bool = False, **sampling: Any) -> Stream:
        """Like ``generate`` but returns a Stream of Pieces (``piece.index``: which prompt) as tokens come."""
        self._check_open()
        batch, _ = self._batch(prompts)
        return self._stream_of(self._client(batch, sampling_params(sampling), cache_prompt))

    def submit(self, prompt: Prompt, *, cache_prompt: bool = False, **sampling: Any) -> Stream:
        """Add one request; it joins the live sequences at the next ``step()`` (or when any caller
        iterates a stream). Returns its Stream: ``.done``, ``.result``, ``.cancel()``, or iterate it."""
        self._check_open()
        return self._stream_of(self._client([self.encode(prompt)], sampling_params(sampling), cache_prompt))

    def astream(self, prompt: Prompt, *, cache_prompt: bool = False, **sampling: Any) -> AsyncStream:
        """Like ``submit`` for asyncio: ``async for piece in engine.astream(prompt, ...)``, from a coroutine.
        Async requests share steps with each other and with threaded callers; cancelling the task (or
        ``stream.cancel()`` from any thread) stops the generation and frees its KV at the next step."""
        return _astream(self, prompt, cache_prompt=cache_prompt, **sampling)

    async def agenerate(self, prompt: Prompt, *, cache_prompt: bool = False, **sampling: Any) -> GenerationResult:
        """Like ``generate`` for one prompt, awaited (see ``astream``)."""
        return await _agenerate(self, prompt, cache_prompt=cache_prompt, **sampling)

    def step(self) -> int:
        """Run one step for every live sequence (a prefill piece or one new token each); returns how
        many sequences are still running or waiting."""
        with self._core.held() as core:
            self._check_open()
            core.run_step()
            counts = core.scheduler.counts()
        return counts["running_sequences"] + counts["waiting_sequences"]

    @torch.inference_mode()
    def logits(self, prompt: Prompt) -> torch.Tensor:
        """Logits (T, V) fp32, on the CPU, for every position of one prompt (scoring, tests against references).

        Runs within the plan like generation's prefill (and beside other live sequences): its own
        KV cache within the KV room (so a long prompt's KV spills to host and disk), the plan's
        prefill pieces, and the LM head over as many rows at a time as one piece's activation
        reserve holds. The returned (T, V) tensor itself (T x V x 4 bytes of host memory) is what
        the caller asked for and sits outside the budgets.
        """
        self._check_open()
        ids, client, core = self.encode(prompt), Client(1), self._core
        with core.held():
            self._check_open()
            turn = new_turn(client, 0, SamplingParams(), list(ids), None, self._weights.stats, self.device,
                            self.prefill_chunk_tokens, score_rows=len(ids), vocab=self.config.vocab_size)
            core.start(Seq(core.new_id(), session=False), turn, len(ids))
        core.drain(client)
        return client.results[0]

    # -- sessions ----------------------------------------------------------------------------
    def session(self) -> Session:
        """A conversation whose KV stays between turns: each turn prefills only its new tokens."""
        self._check_open()
        with self._core.held() as core:
            seq = Seq(core.new_id(), session=True)
            core.seqs[seq.seq_id] = seq          # counted in kv_stats() from now; no KV until its first turn
            return Session(self, seq)

    def restore_session(self, path: str | Path) -> Session:
        """A session saved with ``Session.save``; refused (SessionError) if the file is truncated,
        damaged, or was made with another model or dtype."""
        self._check_open()
        return Session.restore(self, Path(path))

    def kv_stats(self) -> dict[str, Any]:
        """Live sequences, parked sessions, and the KV room they hold now (allotted and allocated)."""
        with self._core.held() as core:
            counts = core.scheduler.counts()
            caches = [s.cache for s in core.seqs.values() if s.cache is not None]
            tiered = [c.stats() for c in caches if hasattr(c, "stats")]
            return {**counts, "live_sequences": counts["running_sequences"] + counts["waiting_sequences"],
                    "sessions": sum(s.session and not s.prompt_cache for s in core.seqs.values()),
                    "prompt_cache_entries": len(core.prompt_cache.entries),
                    "kv_device_bytes": sum(c.nbytes for c in caches),
                    # chunks on the host and disk tiers, as held there (compressed under kv_quant)
                    "kv_quant": self.policy.kv_quant, "kv_host_bytes": sum(st["host_bytes"] for st in tiered),
                    "kv_disk_bytes": sum(st["disk_bytes"] for st in tiered),
                    "device_room_bytes": core.room.device_room_bytes, "host_room_bytes": core.room.host_room_bytes}

    def compile_stats(self) -> dict[str, Any]:
        """How the layers' math runs: ``compile`` (``compiled.CompileStats``: asked, active, compile
        seconds, graphs, recompiles, cache directory, fallback reason) and ``cuda_graph``
        (``cuda_graphs.GraphStats``: asked, active, why not, captures, replays)."""
        compiled = self.compiled.stats if self.compiled is not None else CompileStats()
        return {"compile": compiled.to_dict(), "cuda_graph": self.graph_stats.to_dict()}

    def prompt_cache_stats(self) -> dict[str, Any]:
        """The prompt cache: entries, tokens (of KV they hold), hits, hit_tokens (reused), misses,
        evictions, in_use (entries serving a request now), limit_tokens, directory."""
        with self._core.held() as core:
            return core.prompt_cache.stats()

    def save_prompt_cache(self) -> int:
        """Write the prompt cache entries not yet in ``sessions_dir`` (each is written when it is made,
        and ``close()`` saves too); returns how many were written. ArgumentError without a sessions_dir."""
        with self._core.held() as core:
            self._check_open()
            return core.prompt_cache.save()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Engine is closed; call tierkv.load() again")

    def close(self) -> None:
        """Cancel live generations (async streams end), free every KV cache, the weights, and close
        files. Further calls raise."""
        bridge = close_bridge(self)
        with self._core.held() as core:
            if self._closed:
                return
            self._closed = True
            remember_links(self)        # its measured step times calibrate the next plans (tierkv.calibrate)
            core.close()
            self._weights.close()
            if self.checkpoint is not None:
                self.checkpoint.close()
            if self.store is not None:
                self.store.close()
        if bridge is not None:
            bridge.flush()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def step_halves(policy: Policy, budget: Budget, device: torch.device
                ) -> tuple[CompiledHalves | None, GraphStats, LayerHalves]:
    """How each layer's math around its KV attention runs: eager, compiled (``policy.compile``; inductor
    caches under the offload directory), replayed from CUDA graphs (``policy.cuda_graph``), or both."""
    compiled = CompiledHalves(budget.offload_dir or default_offload_dir()) if policy.compile else None
    halves, graphs = graph_halves(compiled.halves if compiled is not None else EAGER_HALVES, device,
                                  policy.cuda_graph)
    return compiled, graphs, halves


def _flag_cancelled(client: Client) -> None:
    client.cancelled = True


def step_limits(cfg: ModelConfig, dtype: torch.dtype, policy: Policy, plan: Plan | None, piece: int,
                scratch: int) -> tuple[Limits, int]:
    """(the scheduler's limits, LM-head rows per block when scoring) within the plan's activation reserve.

    The planner reserves one step's activations (``plan.activation_bytes``): a prefill piece and the
    one-token rows of up to ``max_sequences - 1`` other sequences packed beside it
    (``plan.activation_bytes(..., decode_rows=)``). The step's token budget is the piece plus as many
    rows as that reserve holds (an injected weight source without a plan gets the full count).
    With ``policy.micro_batches`` > 1 that budget is one micro-batch's (``plan.step_rows``): a step
    runs up to that many of them per layer pass, and sequences admitted together share the KV room
    (where layers stream in pieces every group's rows are held at once: the reserve counts them all).
    """
    context = policy.kv_device_tokens or min(DEFAULT_CONTEXT_TOKENS, cfg.max_position_embeddings)
    rows = step_rows(policy)
    groups = policy.micro_batches if plan is not None and plan.stream_pieces else 1   # held at once in pieces

    def cost(extra: int) -> int:
        return activation_bytes(cfg, dtype, piece, scratch, context, 1, extra, policy, groups)

    reserve = max(plan.activation_bytes if plan is not None else 0, cost(rows))
    extra = _largest(0, rows, lambda e: cost(e) <= reserve)
    item = torch.empty((), dtype=dtype).element_size()
    head_rows = max(1, min(piece, reserve // (cfg.vocab_size * (item + 4))))
    room = plan.kv_device_bytes if plan is not None else None
    host = plan.kv_host_bytes if plan is not None else None
    return Limits(piece + extra, piece, policy.max_sequences, room, host, policy.micro_batches,
                  share_room=policy.micro_batches > 1, longest_first=policy.prefill_order == "longest"), head_rows


def _largest(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """The largest n in [lo, hi] with fits(n) (fits is monotone: true up to some n); lo if none."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def load(model: str | Path, *, device_mem: str | int | None = None, host_mem: str | int | None = None,
         offload_dir: str | Path | None = None, dtype: str | torch.dtype | None = None,
         device: str | None = None, kv: str = "auto", kv_budget: float | int = 0.05,
         chunk_tokens: int | None = None, kv_exact_max_tokens: int = 4096, kv_device_tokens: int | None = None,
         kv_sketch: bool | None = None, prefill_chunk_tokens: int | None = None,
         progress: ProgressFn | None = None, prefill_progress: ProgressFn | None = None,
         verify: bool = False, max_sequences: int = 16, quant: str | None = None, group_size: int | str | None = None,
         quant_head: bool = False, kv_quant: str = "none", prompt_cache_tokens: int | None = None,
         sessions_dir: str | Path | None = None, micro_batches: int = 1, prefill_order: str = "arrival",
         compile: bool = False, cuda_graph: bool = False) -> Engine:
    """Open a Hugging Face model directory (or ``"demo"``, or a store made by ``tierkv convert``,
    which brings its config, tokenizer and weight scheme, or a GGUF model: a .gguf file, a directory
    holding one, or a part of a split set) for generation. A GGUF model is converted on first use
    into a cached store under offload_dir, which it then runs from (resident or streamed).

    device_mem / host_mem: budgets such as "6GiB" or a byte count; default: detected free memory
    less headroom. Layers that do not fit the device budget are held in host memory or streamed
    from a packed copy under offload_dir (default: $TIERKV_OFFLOAD_DIR or ~/.cache/tierkv),
    converted on first use. dtype: compute dtype ("bfloat16", "float16", "float32"; default: the
    checkpoint's). device: "cpu", "cuda", "cuda:1" (default: CUDA when available).

    KV cache: kv="exact" attends to every chunk wherever it lives; "sparse" attends only to the
    chunks the importance estimator picks within kv_budget (a fraction of the context below 1, or a
    number of tokens), always with the first chunk and the recent window; "auto" is exact up to
    kv_exact_max_tokens of context, sparse beyond. chunk_tokens fixes the chunk size (default:
    adaptive per layer from the attention skew at prefill). kv_device_tokens: context whose KV the
    planner keeps device room for (default min(4096, model max)), and never less than the tiered
    cache needs to run the model's full context (chunk abstracts and the fewest chunk slots), so any
    prompt the model allows runs; KV beyond what the device room holds goes to host memory, then to
    offload_dir. Equal-length prompts share a batch as large as that room holds at their context.
    kv_sketch: sparse selection scores each chunk by a token-level bound from 2-bit key codes kept
    on the device (D/4 bytes per token and KV head) instead of the chunk's min/max alone (default:
    on, every device; each closed chunk's key ellipsoid, 2D values per KV head, ranks every chunk
    without reading the codes, and only the 2x the budget's chunks (at least 16) that rank best get
    the full token-level bound); False saves that memory and time but can miss a single strongly
    attended token. Long prompts are
    prefilled in pieces of prefill_chunk_tokens (default: the largest power of two up to 2048 whose
    activations fit an eighth of the device budget, at least 16; ``engine.plan.prefill_chunk_tokens``
    says which); prefill_progress(done, total) is called after each piece. progress(done, total)
    reports loading in phases, each counting from 0 to its own total: a first-use conversion
    ("convert", bytes), then the weights placed on the device or host ("load": bytes of a store's
    resident extents, or the globals and layers of a checkpoint loaded whole, total = layers + 1);
    a callback with a ``phase`` keyword parameter (``def progress(done, total, phase)``) is told which.

    quant: "int8" or "int4" stores and computes the linear weights of every layer group-wise
    quantized (groups of group_size = 32, 64 or 128 inputs, default 64, each with a 16-bit scale and
    minimum; quant_head=True quantizes the LM head too); the embedding and norms stay 16-bit. The
    weights are quantized once at load (resident) or into the cached store (streamed), packed for
    the device. A converted store passed as ``model`` uses the scheme it was converted with; asking
    for another (quant="none" for 16-bit) is refused with what it holds and how to get the other.
    A GGUF model keeps its Q4/Q5/Q6/Q8 weights in their own int4/int8 groups of 32 whatever quant
    says (its token embedding too, looked up row by row, and for a tied model a head packed from the
    same codes); quant then covers its 16-bit and other-type weights; quant="none" dequantizes them all.

    max_sequences: most sequences that decode together (prompts of a batch, concurrent calls,
    sessions' turns); more wait for a place. The planner reserves one step's activations: a prefill
    piece plus one token for each of the others. micro_batches (throughput mode, usually from
    ``tierkv.batchplan.choose_batch(...).load_kwargs()``): each step's rows run in up to this many
    groups per layer pass while the layer's weights stay loaded, activations are reserved for one
    group, and sequences admitted together share the KV room (their cold KV spills to host and disk).
    prefill_order: which waiting prompts' pieces a step takes first: "arrival" (default: first come,
    first served, as a server wants) or "longest" (a batch job: the largest pieces first, so short
    prompts fill the room beside long ones and the passes over the streamed layers are fuller;
    ``choose_batch(...).load_kwargs()`` asks for it). Each prompt's pieces are the same either way.

    kv_quant: "int8" or "int4" holds the KV chunks on the host and disk tiers as KIVI-style codes
    (keys per channel within a chunk, values per token, 16-bit params): about 0.52x / 0.27x of the
    16-bit bytes moved and stored there, so more chunks fit the host budget. Chunks on the device,
    the recent window, the chunk abstracts and key codes stay exact; "none" (default) keeps all exact.

    prompt_cache_tokens: most KV tokens the prompt cache keeps for ``cache_prompt=True`` requests
    (default: four times the context the planner keeps device room for); the least recently used
    entries are evicted first, and idle ones move to host memory and disk under the budgets like
    idle sessions. sessions_dir: a directory where every entry is also written (atomically) when it
    is made and on ``close()``, and from which a later engine of the same model and dtype restores
    them (files of another model, or damaged ones, are skipped with a warning).

    compile=True runs each layer's math around its KV attention (norms, q/k/v, RoPE; o projection,
    MLP, residuals) through ``torch.compile`` (inductor; graphs cached under offload_dir/inductor, so
    later runs skip part of the compile time): fewer ops per step, the same tokens in fp32 (in 16
    bits the fused kernels round less often, so tokens may differ as between two BLAS builds). The
    compile costs tens of seconds per process (less with the cache), so it is off by default; it
    pays for long generations and prompts (docs/benchmarks.md, "Compiled steps"). A compile failure
    (no C++ compiler, an unsupported op) runs the layers eagerly, with one warning;
    ``engine.compile_stats()`` (and every result's ``stats.compile``) says what compiling cost, how
    many graphs and recompiles, and any fallback's reason.
    cuda_graph=True (CUDA only) replays those halves of each resident layer from CUDA graphs at
    decode, one per batch size seen (a few kept); elsewhere it is off and the stats say why.

    verify=True first reads every checkpoint tensor once (bounded memory, a bar on a terminal, or
    ``progress(done_bytes, total_bytes)`` before any conversion's calls) and raises CheckpointError
    naming the first one holding NaN, inf or absurdly large values, or values the compute dtype
    cannot hold. Without it such weights are caught during generation: NaN/inf logits raise
    NonFiniteError naming the first bad layer.
    """
    budget = Budget.parse(device_mem, host_mem, offload_dir)
    policy = Policy(dtype=None if dtype is None else str(dtype).removeprefix("torch."), device=device,
                    prefill_chunk_tokens=prefill_chunk_tokens, kv=kv, kv_budget=kv_budget,
                    kv_exact_max_tokens=kv_exact_max_tokens, chunk_tokens=chunk_tokens,
                    kv_device_tokens=kv_device_tokens, kv_sketch=kv_sketch, max_sequences=max_sequences,
                    kv_quant=kv_quant, micro_batches=micro_batches, prefill_order=prefill_order, compile=compile,
                    cuda_graph=cuda_graph)
    if is_gguf_source(model_path(model)):
        # quant=None keeps the file's quantized weights as they are (16-bit ones stay 16-bit); "int4"/"int8"
        # quantizes its 16-bit and other-type weights too; "none" dequantizes everything to 16-bit
        asked = parse_weight_quant(quant, group_size, quant_head)
        model = gguf_store(model_path(model), budget, replace(policy, weight_quant=asked), progress,
                           keep_source=quant is None or asked is not None)
    else:
        policy = replace(policy, weight_quant=_asked_quant(model_path(model), quant, group_size, quant_head, device))
    return Engine(model, policy, budget, progress=progress, prefill_progress=prefill_progress, verify=verify,
                  prompt_cache_tokens=prompt_cache_tokens, sessions_dir=sessions_dir)


def _asked_quant(model_dir: Path, scheme: str | None, group_size: int | str | None, head: bool,
                 device: str | None) -> WeightQuant | None:
    """The weight quantization ``load`` asks for. For a converted store passed as the model, an
    unasked scheme is what the store holds, an unasked group size the store's for the same scheme,
    and an explicit request for 16-bit weights (``quant="none"``) of a quantized store is refused."""
    if not is_store_dir(model_dir):
        return parse_weight_quant(scheme, group_size, head)
    raw, _ = existing_manifest(model_dir)
    recorded = WeightQuant.from_json((raw or {}).get("weight_quant"))
    if scheme is None:
        parse_weight_quant(None, group_size, head)          # --quant-head without a scheme: refused
        return recorded
    if group_size is None and recorded is not None and recorded.scheme == str(scheme).strip().lower():
        group_size = recorded.group_size
    asked = parse_weight_quant(scheme, group_size, head)
    if asked is None and recorded is not None:
        with contextlib.closing(WeightStore.open(model_dir)) as store:
            store.check_quant(None, resolve_device(device).type)
    return asked
