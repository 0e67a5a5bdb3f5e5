"""Engine: prefill, decode, sampling, streaming and batching over a weight source and a KV cache.

Why this module exists: it is the library contract desktop applications embed (``tierkv.load``
-> ``Engine.generate``/``Engine.stream``). It turns prompts into token ids, drives the one layer
loop of ``pipeline.schedule`` for prefill and each decode step, applies sampling and stop rules,
and reports what happened (timings, memory) in ``stats``. One Engine may be shared by threads:
calls are serialized by a lock, and a stream can be cancelled from any thread.
"""

from __future__ import annotations

import resource
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import torch

from tierkv.config import Budget, ConfigError, ModelConfig, Policy, read_json
from tierkv.errors import ArgumentError
from tierkv.generation import (GenerationResult, GenerationStats, Piece, SequenceOutput, Stream, sampling_params,
                               split_batch, token_ids_of)
from tierkv.io.checkpoint import Checkpoint, resolve_dtype
from tierkv.model import KVCache, decoder_layer, embed, head, step_inputs
from tierkv.pipeline.kv import make_kv_cache, max_kv_batch
from tierkv.pipeline.schedule import ResidentWeights, WeightSource, run_layers
from tierkv.loader import open_weight_source
from tierkv.plan import Plan, activation_bytes, prefill_sizes
from tierkv.io.progress import ProgressFn
from tierkv.numerics import NonFiniteError, non_finite_error
from tierkv.sampling import SamplingParams, pick
from tierkv.tokenizer import Tokenizer

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


def _weight_stats_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-generation view of the weight source's cumulative counters: link bytes, busy and wait
    seconds become differences and GB/s is recomputed from them; residency figures are kept as is."""
    out = dict(after)
    for key, value in after.items():
        if "_to_" in key and not key.endswith("_gbps") or key == "wait_s":
            out[key] = value - before.get(key, 0.0)
    for key in [k for k in after if k.endswith("_gbps")]:
        link = key[: -len("_gbps")]
        busy = out.get(f"{link}_busy_s", 0.0)
        out[key] = out.get(f"{link}_bytes", 0.0) / busy / 1e9 if busy > 0 else 0.0
    return out


def _eos_ids(model_dir: Path, cfg: ModelConfig, tokenizer: Tokenizer | None) -> frozenset[int]:
    ids = set(cfg.eos_token_ids)
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        raw = read_json(gen_path, what="generation config")
        ids.update(ModelConfig.token_ids_field(raw, "eos_token_id", str(gen_path)))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


class _BadLogits(Exception):
    """Raised inside ``_steps`` when a live row's logits are unhealthy; ``_run`` turns it into a
    NonFiniteError once the KV cache is closed."""

    def __init__(self, row: int, step: int) -> None:
        super().__init__(row, step)
        self.row, self.step = row, step


class Engine:
    """A loaded model ready to generate. Build it with ``tierkv.load``."""

    def __init__(self, model: str | Path, policy: Policy = Policy(), budget: Budget = Budget(),
                 progress: ProgressFn | None = None, weights: WeightSource | None = None,
                 verify: bool = False, prefill_progress: ProgressFn | None = None) -> None:
        """``weights`` injects a ready weight source (tests, custom placements) and skips planning.
        ``verify`` first checks every checkpoint tensor is finite (``Checkpoint.verify``).

        ``prefill_progress(done, total)`` (also settable later as the attribute of that name) is
        called after each prefill piece with the prompt tokens processed so far and the prompt length.
        """
        self.model_dir = model_path(model)
        self.policy = policy
        self.checkpoint = Checkpoint(self.model_dir)
        self.config: ModelConfig = self.checkpoint.config
        self.dtype = resolve_dtype(policy.dtype, default=self.config.dtype)
        self.device = resolve_device(policy.device)
        if verify:
            self.checkpoint.verify(self.dtype, progress)
        tok_path = self.model_dir / "tokenizer.json"
        self.tokenizer: Tokenizer | None = Tokenizer(self.model_dir) if tok_path.is_file() else None
        self.eos_token_ids = _eos_ids(self.model_dir, self.config, self.tokenizer)
        self.context_limit_tokens = context_limit_tokens(self.config)
        self.plan: Plan | None = None
        if weights is None:
            resolved = replace(policy, dtype=str(self.dtype).removeprefix("torch."), device=str(self.device))
            weights, self.plan = open_weight_source(self.model_dir, self.config, budget, resolved, progress=progress)
        self._weights: WeightSource = weights or ResidentWeights(self.checkpoint, self.dtype, self.device)
        self.prefill_progress = prefill_progress
        # prefill piece and attention scratch: the plan's (sized to the device budget), else the policy's
        self.prefill_chunk_tokens, self.attention_scratch_bytes = (
            (self.plan.prefill_chunk_tokens, self.plan.attention_scratch_bytes) if self.plan is not None
            else prefill_sizes(self.config, self.dtype, policy, 0, 1))
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread holding the lock (to refuse same-thread re-entry)
        self._closed = False

    @contextmanager
    def _serialized(self) -> Iterator[None]:
        """Hold the engine lock; a thread that already holds it (an unfinished stream) gets an error."""
        if self._owner == threading.get_ident():
            raise RuntimeError("a stream from this Engine is still open on this thread; iterate it to the end "
                               "or call stream.close() before starting another call")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

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

    # -- forward -----------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, kv: KVCache) -> torch.Tensor:
        """ids (B, T) at the cache's next positions -> logits (B, V) of the last position."""
        return head(self.config, self._weights.globals(), self._hidden(ids, kv)[:, -1:])[:, 0]

    def _hidden(self, ids: torch.Tensor, kv: KVCache) -> torch.Tensor:
        """ids (B, T) at the cache's next positions -> the last layer's hidden states (B, T, H)."""
        cfg, g = self.config, self._weights.globals()
        start, t = kv.length_tokens, ids.shape[1]
        positions = torch.arange(start, start + t, device=self.device)[None].expand(ids.shape[0], -1)
        step = step_inputs(cfg, positions, start + t, self.dtype)
        h = embed(g, ids)                                                          # (B, T, H)
        h = run_layers(self._weights, h, lambda j, w, x: decoder_layer(cfg, w, x, step, kv, j))
        kv.advance(t)
        return h

    def _make_kv(self, batch: int, capacity_tokens: int) -> KVCache:
        """This generation's KV cache: resident when it fits and attention is exact, else tiered."""
        plan = self.plan
        return make_kv_cache(self.config, self.policy, batch, capacity_tokens, self.dtype, self.device,
                             kv_device_bytes=plan.kv_device_bytes if plan else None,
                             kv_host_bytes=plan.kv_host_bytes if plan else None,
                             offload_dir=Path(plan.offload_dir) / "kv" if plan else None,
                             attention_scratch_bytes=self.attention_scratch_bytes)

    def _prefill(self, ids: torch.Tensor, kv: KVCache, piece: int) -> torch.Tensor:
        """ids (B, T) in pieces of ``piece`` tokens (``_batch_shape``) so activations stay within the
        plan's reserve -> last logits (B, V). Reports ``prefill_progress(done, total)`` after each piece."""
        total = ids.shape[1]
        for start in range(0, total, piece):
            logits = self._forward(ids[:, start:start + piece], kv)
            if self.prefill_progress is not None:
                self.prefill_progress(min(total, start + piece), total)
        return logits

    @torch.inference_mode()
    def logits(self, prompt: Prompt) -> torch.Tensor:
        """Logits (T, V) fp32, on the CPU, for every position of one prompt (scoring, tests against references).

        Runs within the plan like generation's prefill: the KV cache generation would make (the plan's
        KV room, so a long prompt's KV spills to host and disk), the plan's prefill pieces, and the
        LM head over as many rows at a time as one piece's activation reserve holds. The returned
        (T, V) tensor itself (T x V x 4 bytes of host memory) is what the caller asked for and sits
        outside the budgets.
        """
        self._check_open()
        ids = self.encode(prompt)
        with self._serialized():
            self._check_open()       # again under the lock: another thread may have closed it meanwhile
            kv = self._make_kv(1, len(ids))
            try:
                return self._all_logits(torch.tensor([ids], device=self.device), kv)
            finally:
                if hasattr(kv, "close"):
                    kv.close()

    def _all_logits(self, ids: torch.Tensor, kv: KVCache) -> torch.Tensor:
        """ids (1, T) -> logits (T, V) fp32 on the CPU, prefilled in ``prefill_chunk_tokens`` pieces."""
        cfg, g = self.config, self._weights.globals()
        piece, total = self.prefill_chunk_tokens, ids.shape[1]
        item = torch.empty((), dtype=self.dtype).element_size()
        # the head's output in the compute dtype and its fp32 copy, per row, within one piece's reserve
        # (the layers' activations are freed by the time the head runs)
        reserve = activation_bytes(cfg, self.dtype, piece, self.attention_scratch_bytes, total, 1)
        rows = max(1, min(piece, reserve // (cfg.vocab_size * (item + 4))))
        out = torch.empty((total, cfg.vocab_size), dtype=torch.float32)                # (T, V) on the host
        for start in range(0, total, piece):
            h = self._hidden(ids[:, start:start + piece], kv)                          # (1, piece, H)
            for lo in range(0, h.shape[1], rows):
                out[start + lo:start + lo + rows] = head(cfg, g, h[:, lo:lo + rows])[0].cpu()
        return out

    # -- generation --------------------------------------------------------------------------
    def _run(self, prompts: list[list[int]], params: SamplingParams, cancel: threading.Event,
             out: list[GenerationResult]) -> Iterator[Piece]:
        """Generate for equal-length prompts sharing every layer pass; yields pieces, fills ``out``."""
        b, t = len(prompts), len(prompts[0])
        seqs = [SequenceOutput(p, self.tokenizer, self.eos_token_ids, params) for p in prompts]
        stats = GenerationStats(prompt_tokens=t, batch_size=b)
        weights_before = self._weights.stats()
        budget = self._new_tokens_budget(t, params)
        if cancel.is_set():  # cancelled while an earlier group of the batch ran: no prefill, no tokens
            budget = 0
        capacity = max(1, t + budget - 1)
        most, stats.prefill_piece_tokens = self._batch_shape(capacity, b)
        assert most >= b, f"batch {b} was not split by activations (at most {most})"
        kv = self._make_kv(b, capacity)
        try:
            try:
                yield from self._steps(torch.tensor(prompts, device=self.device), kv, seqs, budget, params,
                                       cancel, stats)
            finally:
                stats.kv = kv.stats() if hasattr(kv, "stats") else {}
                if hasattr(kv, "close"):
                    kv.close()
        except _BadLogits as bad:
            raise self._non_finite(bad, seqs) from None
        reason = "cancelled" if cancel.is_set() else "length"
        for i, s in enumerate(seqs):
            tail = s.finish(reason)
            if tail:
                yield Piece(None, tail, i)
        self._finish_stats(stats, max(len(s.token_ids) for s in seqs), weights_before)
        out.extend(GenerationResult(s.token_ids, s.text, s.finish_reason or reason, s.prompt_ids, stats)
                   for s in seqs)

    def _new_tokens_budget(self, prompt_tokens: int, params: SamplingParams) -> int:
        """New tokens a prompt may get: max_new_tokens, within the model's context."""
        return max(0, min(params.max_new_tokens, self.context_limit_tokens - prompt_tokens + 1))

    def _kv_batches(self, group: list[list[int]], params: SamplingParams) -> list[list[list[int]]]:
        """An equal-length group split into batches whose KV cache fits the plan's device room (the
        planner keeps room for one sequence at the model's full context, so one always fits) and
        whose decode step's activations fit the plan's reserve (``_batch_shape``)."""
        t = len(group[0])
        capacity = max(1, t + self._new_tokens_budget(t, params) - 1)
        room = self.plan.kv_device_bytes if self.plan else None
        size = max_kv_batch(self.config, self.policy, len(group), capacity, self.dtype, room)
        size = min(size, self._batch_shape(capacity, size)[0])
        return [group[i:i + size] for i in range(0, len(group), size)]

    def _batch_shape(self, capacity_tokens: int, batch: int) -> tuple[int, int]:
        """(most sequences per batch, up to ``batch``; prefill piece tokens for that many) within the
        activation reserve.

        The planner reserves one prefill piece's activations for one sequence (``plan.activation_bytes``;
        one sequence at a context longer than planned needs ``plan.activation_bytes`` at that
        context, as before). A batch of b sequences prefills in pieces of fewer tokens, so that
        b x piece tokens fit that reserve, and a batch whose one-token decode step alone does not
        fit is made smaller. One sequence always runs, with the plan's piece.
        """
        piece, scratch = self.prefill_chunk_tokens, self.attention_scratch_bytes

        def cost(piece_tokens: int, b: int) -> int:
            return activation_bytes(self.config, self.dtype, piece_tokens, scratch, capacity_tokens, b)

        reserve = max(self.plan.activation_bytes if self.plan else 0, cost(piece, 1))
        most = _largest(1, batch, lambda b: cost(1, b) <= reserve)
        return most, _largest(1, piece, lambda p: cost(p, most) <= reserve)

    def _steps(self, prompt_ids: torch.Tensor, kv: KVCache, seqs: list[SequenceOutput], budget: int,
               params: SamplingParams, cancel: threading.Event, stats: GenerationStats) -> Iterator[Piece]:
        """Prefill prompt_ids (B, T), then sample and feed back up to ``budget`` tokens."""
        gen = None if params.seed is None else torch.Generator(self.device).manual_seed(params.seed)
        t0 = time.perf_counter()
        logits = None
        if budget > 0:
            with torch.profiler.record_function("tierkv::prefill"):
                logits = self._prefill(prompt_ids, kv, stats.prefill_piece_tokens)
        stats.prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for step in range(budget):
            picked = pick(logits, params, gen)                       # ids (B,) and health, one host sync
            bad = [i for i, ok in enumerate(picked.healthy) if not ok and seqs[i].finish_reason is None]
            if bad:
                raise _BadLogits(bad[0], step)
            for i, tok in enumerate(picked.token_ids):
                if seqs[i].finish_reason is None:
                    yield Piece(tok, seqs[i].push(tok), i)
            if all(s.finish_reason for s in seqs) or step == budget - 1 or cancel.is_set():
                break
            with torch.profiler.record_function("tierkv::decode"):
                logits = self._forward(picked.ids[:, None], kv)
        stats.decode_s = time.perf_counter() - t1

    def _non_finite(self, bad: _BadLogits, seqs: list[SequenceOutput]) -> NonFiniteError:
        """Error path: the NonFiniteError for row ``bad.row``, after a replay that names the first bad layer."""
        seq = seqs[bad.row]
        where = "the end of prefill" if bad.step == 0 else f"decode step {bad.step}"
        where += f" of prompt {bad.row} of the batch" if len(seqs) > 1 else ""
        return non_finite_error(self.config, self._weights, seq.prompt_ids + seq.token_ids, self.dtype,
                                self.device, where, str(self.model_dir))

    def _finish_stats(self, stats: GenerationStats, new_tokens: int, weights_before: dict[str, float]) -> None:
        stats.new_tokens = new_tokens
        stats.decode_tok_s = (new_tokens - 1) / stats.decode_s if new_tokens > 1 and stats.decode_s > 0 else 0.0
        stats.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.device.type == "cuda":
            stats.peak_device_bytes = torch.cuda.max_memory_allocated(self.device)
        stats.weights = _weight_stats_delta(weights_before, self._weights.stats())
        busy_s = stats.prefill_s + stats.decode_s
        stats.io_wait_fraction = stats.weights.get("wait_s", 0.0) / busy_s if busy_s > 0 else 0.0

    @torch.inference_mode()  # as a decorator it is on only while the generator runs, not in the caller's loop
    def _pieces(self, prompts: list[list[int]], params: SamplingParams, cancel: threading.Event,
                out: list[GenerationResult]) -> Iterator[Piece]:
        """All prompts under the lock: equal lengths share batches (as large as the KV room holds),
        otherwise one after another."""
        with self._serialized():
            self._check_open()
            groups = [prompts] if len({len(p) for p in prompts}) == 1 else [[p] for p in prompts]
            groups = [batch for group in groups for batch in self._kv_batches(group, params)]
            offset = 0
            for group in groups:
                for piece in self._run(group, params, cancel, out):
                    yield Piece(piece.token_id, piece.text, piece.index + offset)
                offset += len(group)

    def generate(self, prompts: Prompt | Sequence[Prompt], **sampling: Any) -> Any:
        """Generate for one prompt (-> GenerationResult) or a list of prompts (-> list of them).

        Keyword arguments are ``SamplingParams`` fields: max_new_tokens, temperature, top_k,
        top_p, seed, stop (a string or a list of strings), ignore_eos.
        """
        self._check_open()
        batch, is_batch = self._batch(prompts)
        params = sampling_params(sampling)
        out: list[GenerationResult] = []
        for _ in self._pieces(batch, params, threading.Event(), out):
            pass
        return out if is_batch else out[0]

    def stream(self, prompts: Prompt | Sequence[Prompt], **sampling: Any) -> Stream:
        """Like ``generate`` but returns a Stream of Pieces as tokens are produced."""
        self._check_open()
        batch, _ = self._batch(prompts)
        params, cancel = sampling_params(sampling), threading.Event()
        out: list[GenerationResult] = []
        return Stream(self._pieces(batch, params, cancel, out), cancel, out)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Engine is closed; call tierkv.load() again")

    def close(self) -> None:
        """Free the weights and close files. Further calls raise."""
        with self._serialized():
            if self._closed:
                return
            self._closed = True
            self._weights.close()
            self.checkpoint.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
         verify: bool = False) -> Engine:
    """Open a Hugging Face model directory (or ``"demo"``) for generation.

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
    on with CUDA, off on the CPU where the pass costs about as much as dense attention); False
    saves that memory and time but can miss a single strongly attended token. Long prompts are
    prefilled in pieces of prefill_chunk_tokens (default: the largest power of two up to 2048 whose
    activations fit an eighth of the device budget, at least 16; ``engine.plan.prefill_chunk_tokens``
    says which); prefill_progress(done, total) is called after each piece. progress(done, total)
    reports a first-use conversion.

    verify=True first reads every checkpoint tensor once (bounded memory, a bar on a terminal, or
    ``progress(done_bytes, total_bytes)`` before any conversion's calls) and raises CheckpointError
    naming the first one holding NaN, inf or absurdly large values, or values the compute dtype
    cannot hold. Without it such weights are caught during generation: NaN/inf logits raise
    NonFiniteError naming the first bad layer.
    """
    policy = Policy(dtype=None if dtype is None else str(dtype).removeprefix("torch."), device=device,
                    prefill_chunk_tokens=prefill_chunk_tokens, kv=kv, kv_budget=kv_budget,
                    kv_exact_max_tokens=kv_exact_max_tokens, chunk_tokens=chunk_tokens,
                    kv_device_tokens=kv_device_tokens, kv_sketch=kv_sketch)
    return Engine(model, policy, Budget.parse(device_mem, host_mem, offload_dir), progress=progress,
                  prefill_progress=prefill_progress, verify=verify)
