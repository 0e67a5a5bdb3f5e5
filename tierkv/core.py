"""The engine core: carries out the scheduler's step plans over the live sequences.

Why this module exists: ``Engine`` is the public facade; this is the machine behind it. Every
``generate``/``stream``/``submit``/``logits`` call becomes a ``Client`` whose sequences join the
scheduler; each ``step()`` asks the scheduler for a plan and carries it out — moves idle sessions'
KV off their caches, opens each admitted sequence's KV cache with its share of the rooms, runs one
packed forward for all rows (``runner``), samples each sequence with its own parameters and seed,
applies stop rules, hands the pieces to their clients and frees what finished. Callers drive it
cooperatively: a thread that waits for its next piece takes the core lock and has the next step
run for everybody on the one engine thread, so concurrent callers are served together and nothing
runs while nobody waits.

Failures stay with the sequences they hit: bad logits end that sequence with a NonFiniteError
(after a replay naming the first bad layer); an error inside a forward (a full disk, a read error)
ends the sequences of that step, whose caches may hold half a step; others carry on.
"""

from __future__ import annotations

import resource
import warnings
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tierkv.cpu_memory import release_freed
from tierkv.errors import TierkvError
from tierkv.generation import GenerationResult, GenerationStats, Piece, SequenceOutput
from tierkv.kvroom import KVRoom
from tierkv.numerics import non_finite_error
from tierkv.openmp import release_pool
from tierkv.pipeline.schedule import profiling_here
from tierkv.pipeline.kv import KVBudgetError
from tierkv.runner import Feed, Runner
from tierkv.sampling import SamplingParams, pick
from tierkv.scheduler import Row, Scheduler, StepPlan

__all__ = ["Client", "EngineCore"]

_GREEDY = SamplingParams(temperature=0.0)


class Client:
    """One call's sequences as their caller sees them: pieces not yet read, results, cancellation."""

    def __init__(self, n: int) -> None:
        self.items: deque[Piece | BaseException] = deque()   # appended by the stepping thread
        self.results: list[Any] = [None] * n
        self.open = n
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.open == 0

    def end_empty(self, index: int, prompt_ids: list[int]) -> None:
        """Sequence ``index`` gets no new tokens (``max_new_tokens=0``, or the context is full): its
        result at once, and nothing is prefilled."""
        self.results[index] = GenerationResult([], "", "length", prompt_ids, GenerationStats(len(prompt_ids)))
        self.open -= 1


@dataclass
class Turn:
    """One call's state of one sequence: what to feed, what came out, how long it took."""

    client: Client
    index: int
    params: SamplingParams
    pending: list[int]                       # tokens to feed before the next sample (kept if unfed)
    out: SequenceOutput | None               # None when scoring (logits of every position)
    stats: GenerationStats
    weights_before: dict[str, float]
    generator: torch.Generator | None = None
    score: torch.Tensor | None = None        # (T, V) fp32 on the CPU when scoring
    fed: int = 0                             # pending tokens fed so far in this call
    started: float = field(default_factory=time.perf_counter)
    first_sample: float | None = None


@dataclass
class Seq:
    """A sequence the core holds: its cache (or where its KV went), its session history, its turn."""

    seq_id: int
    session: bool
    cache: Any = None
    turn: Turn | None = None
    history: list[int] = field(default_factory=list)   # a session's tokens, fed or not
    unfed: list[int] = field(default_factory=list)     # a session's history tokens not in its KV yet
    parked: Any = None                                 # KV off the cache: host tensors or a session file
    geometry: dict[str, Any] | None = None             # the chunking of the cache the parked KV came from
    prompt_cache: bool = False                         # its tokens and KV become a prompt cache entry at its end


class EngineCore:
    """Live sequences, the scheduler, the runner and the KV room of one engine (see module docstring)."""

    def __init__(self, engine: Any, runner: Runner, room: KVRoom, scheduler: Scheduler) -> None:
        self.engine, self.runner, self.room, self.scheduler = engine, runner, room, scheduler
        self.seqs: dict[int, Seq] = {}
        self.lock = threading.Lock()
        self.owner: int | None = None              # the thread holding the lock
        self.stepper: int | None = None            # the thread running a step for it (the engine thread)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tierkv-engine")
        self._next_id = 0
        self.prompt_cache: Any = None              # prompt_cache.PromptCache, set by the engine

    # -- joining ----------------------------------------------------------------------------------
    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def start(self, seq: Seq, turn: Turn, capacity_tokens: int) -> None:
        """Put ``turn`` on ``seq`` and into the scheduler (a new sequence, or a parked session's next turn)."""
        assert self.owner == threading.get_ident()
        seq.turn = turn
        if seq.seq_id in self.scheduler:
            self.scheduler.resume(seq.seq_id, len(turn.pending), capacity_tokens)
        else:
            self.seqs[seq.seq_id] = seq
            self.scheduler.add(seq.seq_id, len(turn.pending), capacity_tokens, session=seq.session)

    # -- driving ----------------------------------------------------------------------------------
    def next_item(self, client: Client) -> Piece | None:
        """The client's next piece (None once it is done), running steps for everybody meanwhile."""
        while True:
            if client.items:
                item = client.items.popleft()
                if isinstance(item, BaseException):
                    raise item
                return item
            if client.done:
                return None
            with self.held():
                if not client.items and not client.done and not self.run_step():
                    raise AssertionError("the scheduler made no progress for a live request")

    @torch.inference_mode()
    def drain(self, client: Client) -> None:
        """Run steps until every sequence of ``client`` ended; an error cancels the rest and is raised."""
        try:
            while self.next_item(client) is not None:
                pass
        except BaseException:
            self.cancel(client)
            raise

    def held(self) -> "_Held":
        return _Held(self)

    def cancel(self, client: Client) -> None:
        """Stop the client's sequences; frees their KV now unless called from inside a step."""
        client.cancelled = True
        if threading.get_ident() in (self.owner, self.stepper):
            return                                     # inside a step (a callback): reaped at the next one
        with self.held():
            self._reap_cancelled()

    def run_step(self) -> bool:
        """``step()`` on the engine thread, for the caller holding the lock: every forward of every caller
        allocates in one thread (one malloc arena, so RSS does not grow with the number of calling
        threads), and the calling thread's OpenMP pool is freed first (``tierkv.openmp``). Under a torch
        profiler active in the caller's thread, the step runs right here, so the trace sees it (profilers
        record their own thread only)."""
        assert self.owner == threading.get_ident(), "run_step() runs under the core lock"
        if profiling_here():
            return self.step()
        release_pool()              # this thread's idle OpenMP workers would slow the engine thread's (tierkv.openmp)
        job = self._thread.submit(self._step_job)
        try:
            return job.result()
        except BaseException:
            wait_futures([job])     # interrupted while waiting (Ctrl-C): let the step end before the lock goes
            raise

    def _step_job(self) -> bool:
        self.stepper = threading.get_ident()
        try:
            with torch.inference_mode():
                return self.step()
        finally:
            self.stepper = None

    def step(self) -> bool:
        """One step for every live sequence; False when there was nothing to do."""
        assert self.lock.locked(), "step() runs under the core lock"
        reaped = self._reap_cancelled()
        if not self.scheduler.has_work():
            return reaped           # a step whose only work was ending cancelled streams made progress
        plan = self.scheduler.schedule()
        self._carry_out(plan)
        rows = [r for r in plan.rows if r.seq_id in self.scheduler and self.seqs[r.seq_id].cache is not None
                and self.seqs[r.seq_id].turn is not None]
        if rows:
            self._run(rows)
        return bool(rows or plan.admit or plan.offload or plan.refuse)

    def _carry_out(self, plan: StepPlan) -> None:
        for move in plan.offload:
            seq = self.seqs[move.seq_id]
            try:
                self.room.offload(seq, move.to)
            except (OSError, TierkvError) as exc:     # e.g. a full disk: the idle session's KV is dropped
                warnings.warn(f"an idle session's KV could not be moved to {move.to} ({exc}); its next turn "
                              "prefills its history again", RuntimeWarning, stacklevel=2)
                self._drop_kv(seq)
                continue
            self.scheduler.kept(move.seq_id, move.to)
        for seq_id, why in plan.refuse:
            self.fail(seq_id, KVBudgetError(why))
        for adm in plan.admit:
            seq = self.seqs[adm.seq_id]
            try:
                self.room.open(seq, adm)
            except Exception as exc:    # noqa: BLE001 - a budget or disk error ends this sequence only
                if not (seq.prompt_cache and adm.restore != "none" and self.prompt_cache.refill(seq, exc)):
                    self.fail(adm.seq_id, exc)
                continue
            self.scheduler.kept(adm.seq_id, "cache")

    def _run(self, rows: list[Row]) -> None:
        seqs = [self.seqs[r.seq_id] for r in rows]
        feeds = [Feed(s.cache, s.turn.pending[:r.num_tokens],  # type: ignore[union-attr]
                      "all" if s.turn.score is not None else "last" if r.samples else "none")  # type: ignore[union-attr]
                 for s, r in zip(seqs, rows)]
        prefill = any(s.turn.first_sample is None for s in seqs)   # type: ignore[union-attr]
        try:       # the tracer's phases: a step that feeds any prompt piece counts as prefill
            with torch.profiler.record_function("tierkv::prefill" if prefill else "tierkv::decode"):
                groups = [r.group for r in rows]          # micro-batches (throughput mode), else all 0
                last, scored = self.runner.forward(feeds, self.room.head_rows, *([groups] if any(groups) else []))
        except BaseException as exc:
            for r in rows:
                self.fail(r.seq_id, exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            if prefill:
                release_freed()     # the activations' freed memory, kept by malloc, goes back (tierkv.cpu_memory)
        for s, r in zip(seqs, rows):
            self.scheduler.fed(r)
            self._fed(s, r, len(rows))
        self._score([s for s, f in zip(seqs, feeds) if f.logits == "all"], scored)
        sampling = [s for s, f in zip(seqs, feeds) if f.logits == "last"]
        if sampling:
            assert last is not None
            self._sample(sampling, last)

    def _fed(self, seq: Seq, row: Row, batch: int) -> None:
        turn = seq.turn
        assert turn is not None
        turn.stats.batch_size = max(turn.stats.batch_size, batch)
        turn.pending = turn.pending[row.num_tokens:]
        turn.fed += row.num_tokens
        progress = self.engine.prefill_progress
        if progress is not None and turn.first_sample is None and turn.stats.prefill_tokens > 1:
            progress(turn.fed, turn.stats.prefill_tokens)

    def _score(self, seqs: list[Seq], scored: list[torch.Tensor]) -> None:
        for seq, logits in zip(seqs, scored):
            turn = seq.turn
            assert turn is not None and turn.score is not None
            turn.score[turn.fed - logits.shape[0]:turn.fed] = logits
            if not turn.pending:
                self.finish(seq, "length")

    def _sample(self, rows: list[Seq], logits: torch.Tensor) -> None:
        """logits (n, V): one row per sampling sequence. Greedy rows share one pick (one host sync)."""
        picks: list[tuple[int, bool] | None] = [None] * len(rows)
        greedy = [i for i, s in enumerate(rows) if s.turn.params.temperature == 0.0]  # type: ignore[union-attr]
        if greedy:
            got = pick(logits[greedy], _GREEDY, None)
            for i, tok, ok in zip(greedy, got.token_ids, got.healthy):
                picks[i] = (tok, ok)
        for i, s in enumerate(rows):
            if picks[i] is None:
                turn = s.turn
                assert turn is not None
                got = pick(logits[i:i + 1], turn.params, turn.generator)
                picks[i] = (got.token_ids[0], got.healthy[0])
        for s, chosen in zip(rows, picks):
            assert chosen is not None
            self._take(s, chosen[0], chosen[1])

    def _take(self, seq: Seq, token: int, healthy: bool) -> None:
        turn = seq.turn
        assert turn is not None and turn.out is not None
        if turn.first_sample is None:
            turn.first_sample = time.perf_counter()
            turn.stats.prefill_s = turn.first_sample - turn.started
        if not healthy:
            self._non_finite(seq)
            return
        turn.client.items.append(Piece(token, turn.out.push(token), turn.index))
        turn.pending = [token]
        if seq.session:
            seq.history.append(token)
        if turn.out.finish_reason is not None:
            self.finish(seq, turn.out.finish_reason)
        else:
            self.scheduler.sampled(seq.seq_id)

    def _non_finite(self, seq: Seq) -> None:
        turn = seq.turn
        assert turn is not None and turn.out is not None
        step = len(turn.out.token_ids)
        where = "the end of prefill" if step == 0 else f"decode step {step}"
        if len(turn.client.results) > 1:
            where += f" of prompt {turn.index} of the batch"
        e = self.engine
        history = (seq.history if seq.session else turn.out.prompt_ids + turn.out.token_ids)
        self.fail(seq.seq_id, non_finite_error(e.config, e._weights, list(history), e.dtype, e.device, where,
                                               str(e.model_dir)))

    # -- leaving ----------------------------------------------------------------------------------
    def finish(self, seq: Seq, reason: str) -> None:
        """End the sequence's turn with ``reason``: its result, then its KV freed (or kept, for a session)."""
        turn = seq.turn
        assert turn is not None
        seq.turn = None
        _finish_stats(self.engine, seq, turn)
        if turn.out is None:
            turn.client.results[turn.index] = turn.score
        else:
            tail = turn.out.finish(reason)
            if tail:
                turn.client.items.append(Piece(None, tail, turn.index))
            turn.client.results[turn.index] = GenerationResult(
                turn.out.token_ids, turn.out.text, turn.out.finish_reason or reason, turn.out.prompt_ids, turn.stats)
        turn.client.open -= 1
        if seq.session:
            seq.unfed = turn.pending
            self.scheduler.finish(seq.seq_id)
            if seq.prompt_cache:
                self.prompt_cache.keep(seq)
        else:
            self.release(seq)

    def fail(self, seq_id: int, exc: BaseException) -> None:
        """End the sequence with an error its caller will see; its KV is dropped (a session keeps its history)."""
        seq = self.seqs[seq_id]
        turn, seq.turn = seq.turn, None
        if turn is not None:
            turn.client.items.append(exc)
            turn.client.open -= 1
        if seq.session:                     # the KV may hold half a step: the next turn prefills the history again
            self._drop_kv(seq)
        else:
            self.release(seq)

    def _drop_kv(self, seq: Seq) -> None:
        """A session's KV is gone (a failed step or move): its next turn prefills the history again."""
        self.room.drop(seq)
        seq.unfed = list(seq.history)
        self.scheduler.close(seq.seq_id)
        if seq.prompt_cache:
            self.prompt_cache.lost(seq)

    def release(self, seq: Seq) -> None:
        """Forget a sequence: its cache (every tier) and its room."""
        self.room.drop(seq)
        self.scheduler.close(seq.seq_id)
        self.seqs.pop(seq.seq_id, None)

    def _reap_cancelled(self) -> bool:
        """End every cancelled client's sequences (their KV freed); whether there were any."""
        cancelled = [s for s in self.seqs.values() if s.turn is not None and s.turn.client.cancelled]
        for seq in cancelled:
            if seq.turn.out is None:  # type: ignore[union-attr]
                self.fail(seq.seq_id, RuntimeError("cancelled"))
            else:
                self.finish(seq, "cancelled")
        return bool(cancelled)

    def close(self) -> None:
        """Cancel every live sequence and free every cache (sessions included)."""
        for seq in list(self.seqs.values()):
            if seq.turn is not None:
                self.finish(seq, "cancelled")
        self.prompt_cache.close()
        for seq in list(self.seqs.values()):
            self.release(seq)
        self.room.close()
        self._thread.shutdown(wait=True)


class _Held:
    """The core lock, remembering its owner (so a cancel from inside a step does not deadlock)."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core

    def __enter__(self) -> EngineCore:
        self.core.lock.acquire()
        self.core.owner = threading.get_ident()
        return self.core

    def __exit__(self, *exc: object) -> None:
        self.core.owner = None
        self.core.lock.release()


def _finish_stats(engine: Any, seq: Seq, turn: Turn) -> None:
    """The turn's stats at its end: times, rates, memory peaks, weight and KV counters."""
    stats, now = turn.stats, time.perf_counter()
    if turn.first_sample is None:
        stats.prefill_s = now - turn.started
    else:
        stats.decode_s = now - turn.first_sample
    new = len(turn.out.token_ids) if turn.out is not None else 0
    stats.new_tokens = new
    stats.decode_tok_s = (new - 1) / stats.decode_s if new > 1 and stats.decode_s > 0 else 0.0
    stats.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    device = engine.device
    if device.type == "cuda":
        stats.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    stats.weights = weight_stats_delta(turn.weights_before, engine._weights.stats())
    stats.compile = engine.compile_stats()
    if seq.cache is not None and hasattr(seq.cache, "stats"):
        stats.kv = seq.cache.stats()
    busy = stats.prefill_s + stats.decode_s
    stats.io_wait_fraction = stats.weights.get("wait_s", 0.0) / busy if busy > 0 else 0.0


def weight_stats_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-call view of the weight source's cumulative counters: link bytes, busy and wait seconds
    become differences and GB/s is recomputed from them; residency figures are kept as is."""
    out = dict(after)
    for key, value in after.items():
        if "_to_" in key and not key.endswith("_gbps") or key == "wait_s":
            out[key] = value - before.get(key, 0.0)
    for key in [k for k in after if k.endswith("_gbps")]:
        link = key[: -len("_gbps")]
        busy = out.get(f"{link}_busy_s", 0.0)
        out[key] = out.get(f"{link}_bytes", 0.0) / busy / 1e9 if busy > 0 else 0.0
    return out


def new_turn(client: Client, index: int, params: SamplingParams, pending: list[int], out: SequenceOutput | None,
             weights_stats: Callable[[], dict[str, float]], device: torch.device, piece_tokens: int,
             cached_tokens: int = 0, score_rows: int = 0, vocab: int = 0, cached_prompt_tokens: int = 0) -> Turn:
    """A Turn with its stats, its own seeded generator, and (when scoring) its (T, V) output."""
    stats = GenerationStats(prompt_tokens=len(out.prompt_ids) if out is not None else len(pending),
                            prefill_tokens=len(pending), cached_tokens=cached_tokens + cached_prompt_tokens,
                            cached_prompt_tokens=cached_prompt_tokens, prefill_piece_tokens=piece_tokens)
    gen = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
    score = torch.empty((score_rows, vocab), dtype=torch.float32) if score_rows else None
    return Turn(client, index, params, pending, out, stats, weights_stats(), gen, score)
