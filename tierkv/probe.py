"""Link measurements -> a frozen ``LinkSpeeds`` for the planner, held still between runs.

Why this module exists: the planner (``plan.py``) stays pure arithmetic over budgets and link
speeds; measuring those links (disk reads, host-to-device copies, one layer's compute) lives here.
And they must hold still: one timed pass on a shared machine can be off by two orders of
magnitude (other work running during the probe), and the planner's verdict ("bound by disk" / "bound by
compute") flipped between two runs of the same command. Disk speed is now the median of several
cold passes over the store's own data file (read-only) or, before a store exists, a small scratch
file; and each measured link is cached in ``OFFLOAD_DIR/links.json``, keyed by the machine, the
filesystem or compute device, and (for compute) the model's layer shape and dtype. The first
``SAMPLES`` runs each add a sample and the best one counts (a run disturbed by other work is
outvoted); after that the cached value is used until it is older than ``MAX_AGE_S``. Deleting the
file forces a fresh probe.

A burst is outvoted, a loaded hour is not: every sample of it is slow. So a compute probe taken
while the machine's load average exceeds its cores is used for that run only, never cached
(``machine_busy``); and the engine's own step timings (``tierkv.calibrate``) are written back as
observations (``LinkCache.observe``), which count instead of the probe while fresh and drop a
cached probe they disagree with by more than ``DISAGREE`` (so the next probe is a fresh one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tierkv.config import ModelConfig
from tierkv.kernels.quant import prepare, quant_linear, quantize_weight
from tierkv.quantspec import CPU_PACK_ROWS, DEFAULT_GROUP_SIZE, QuantWeight, TensorQuant, choose_pack
from tierkv.io.buffers import ALIGN_BYTES, HostBuffer
from tierkv.io.reader import evict_from_page_cache, measure_disk_read_gbps
from tierkv.io.convert import check_offload_dir

LINKS_FILE = "links.json"
MAX_AGE_S = 24 * 3600               # a day: the same command plans the same; an upgrade is noticed soon
SCRATCH_BYTES = 16 << 20            # the disk probe's scratch file, written only while no store exists
DISK_PASSES = 5                     # cold passes; their median is the disk's speed
PASS_BYTES = 64 << 20               # most bytes one pass reads
SAMPLES = 3                         # runs that measure a link before its cached best is used as is
MIN_PROBE_FILE_BYTES = ALIGN_BYTES  # any store file: its layers are read at the speed it shows, small or not
MATVEC_SHAPE = (2048, 4096)         # (N, K) of one weight piece of the matvec probe (divides every group size)
MATVEC_BYTES = 256 << 20            # stored weight bytes one matvec pass reads: more than most caches hold
MATVEC_MIN_PASSES = 4               # timed passes at least (the fastest counts) ...
MATVEC_MAX_PASSES = 50              # ... and at most, within
MATVEC_TIME_S = 1.5
OBSERVED_KEPT = 5                   # the engine's newest observations of a link kept beside the probe's samples
DISAGREE = 1.5                      # an observation this many times off the cached probe drops the probe


class LinkCache:
    """Measured link speeds of this machine in ``directory/links.json`` (a no-op when ``directory`` is None).

    ``measure(key, fn, best)`` keeps up to ``SAMPLES`` results of ``fn`` per key, one per run that
    asks while fewer are stored, and returns ``best`` of them (``min`` for a time, ``max`` for a
    speed: the least disturbed run on a shared machine). Once ``SAMPLES`` are stored the key is
    not measured again until its first sample is older than ``max_age_s``; so a burst of other work
    during one probe is outvoted, and the same command plans the same from then on. A directory
    that cannot be written only loses the cache: probing works as before.
    """

    def __init__(self, directory: Path | None, max_age_s: float = MAX_AGE_S) -> None:
        self.path = None if directory is None else Path(directory) / LINKS_FILE
        self.max_age_s = max_age_s

    def _load(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):      # absent or damaged: measure again and rewrite it
            return {}
        links = raw.get("links") if isinstance(raw, dict) else None
        return links if isinstance(links, dict) else {}

    def samples(self, key: str) -> list[float]:
        """The fresh, valid samples stored for ``key`` ([] when none, stale or damaged)."""
        entry = self._load().get(key)
        if not isinstance(entry, dict):
            return []
        values, at = entry.get("samples"), entry.get("measured_at")
        if not isinstance(values, list) or not isinstance(at, (int, float)):
            return []
        if not 0 <= time.time() - at <= self.max_age_s:
            return []
        ok = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
        return ok if len(ok) == len(values) else []

    def observed(self, key: str) -> list[float]:
        """The engine's fresh observations of ``key`` (``observe``), oldest first ([] when none)."""
        entry = self._load().get(key)
        seen = entry.get("observed") if isinstance(entry, dict) else None
        if not isinstance(seen, list):
            return []
        now = time.time()
        return [float(o["value"]) for o in seen if isinstance(o, dict) and isinstance(o.get("value"), (int, float))
                and isinstance(o.get("at"), (int, float)) and 0 <= now - o["at"] <= self.max_age_s
                and math.isfinite(o["value"]) and o["value"] > 0]

    def observe(self, key: str, value: float, best: Callable[[list[float]], float]) -> None:
        """Record what the engine measured of ``key`` while running (``tierkv.calibrate``). While fresh,
        ``best`` of the newest ``OBSERVED_KEPT`` observations counts instead of the probe's samples; samples
        that disagree with ``value`` by more than ``DISAGREE`` times are dropped (probed again later)."""
        if not math.isfinite(value) or value <= 0:
            return
        entry = self._load().get(key)
        entry = dict(entry) if isinstance(entry, dict) else {}
        samples = self.samples(key)
        if samples and max(best(samples) / value, value / best(samples)) > DISAGREE:
            entry.pop("samples", None)
            entry.pop("measured_at", None)
        seen = [o for o in entry.get("observed", []) if isinstance(o, dict)] if isinstance(
            entry.get("observed"), list) else []
        entry["observed"] = (seen + [{"value": value, "at": time.time()}])[-OBSERVED_KEPT:]
        self._write(key, entry)

    def _store(self, key: str, values: list[float], measured_at: float) -> None:
        entry = self._load().get(key)
        entry = dict(entry) if isinstance(entry, dict) else {}
        entry.update({"samples": values, "measured_at": measured_at})
        self._write(key, entry)

    def _write(self, key: str, entry: dict[str, Any]) -> None:
        if self.path is None:
            return
        links = self._load()
        links[key] = entry
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"version": 3, "links": links}, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:                    # an unwritable offload dir: no cache, the measurement still counts
            tmp.unlink(missing_ok=True)

    def measure(self, key: str, fn: Callable[[], float], best: Callable[[list[float]], float],
                keep: Callable[[], bool] = lambda: True) -> float:
        """``best`` of the fresh observations, else of the samples (measuring one more while fewer than
        ``SAMPLES`` are stored). ``keep()`` False after ``fn`` ran: its value counts for this run only."""
        seen = self.observed(key)
        if seen:
            return best(seen)
        values = self.samples(key)
        if len(values) >= SAMPLES:
            return best(values)
        value = fn()
        if not math.isfinite(value) or value <= 0 or not keep():
            return value
        first_at = self._load().get(key, {}).get("measured_at") if values else None
        self._store(key, values + [value], first_at if isinstance(first_at, (int, float)) else time.time())
        return best(values + [value])


def machine_busy() -> bool:
    """Whether other work loads this machine now: its 1-minute load average is above its cores (then a
    compute probe measures the load, not the machine, and is not cached)."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:                 # no load average on this platform: trust the probe
        return False


def machine_id() -> str:
    """This machine and software: the host, its CPU count, and torch's version and thread count."""
    return f"{platform.node()}|{platform.machine()}|cpus={os.cpu_count()}|torch={torch.__version__}|" \
           f"threads={torch.get_num_threads()}"


def disk_key(path: Path) -> str:
    """Cache key of the disk holding ``path`` (its filesystem's device number)."""
    return f"disk|{machine_id()}|dev={os.stat(path).st_dev}"


def h2d_key(device: torch.device) -> str:
    return f"h2d|{machine_id()}|{device}|{torch.cuda.get_device_name(device)}"


def compute_key(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> str:
    """Cache key of one layer's decode compute: the machine, the device, the dtype and the model's shape."""
    shape = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    digest = hashlib.sha256(shape.encode()).hexdigest()[:16]
    return f"compute|{machine_id()}|{device}|{name}|{str(dtype).removeprefix('torch.')}|model={digest}"


def matvec_bytes(working_set_bytes: int) -> int:
    """Weight bytes the matvec probe cycles through for a decode step reading ``working_set_bytes``:
    the next power of two, at most ``MATVEC_BYTES`` (beyond it every cache is missed alike)."""
    return min(MATVEC_BYTES, 1 << max(0, working_set_bytes - 1).bit_length())


def matvec_key(scheme: str | None, group_size: int, dtype: torch.dtype, device: torch.device, nbytes: int) -> str:
    """Cache key of a decode matvec rate: the machine, the device, the dtype, the weight scheme and
    the bytes the probe cycles through (``matvec_bytes``)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return f"matvec|{machine_id()}|{device}|{name}|{str(dtype).removeprefix('torch.')}|" \
           f"{scheme or '16bit'}|g={group_size if scheme else 0}|bytes={nbytes}"


def disk_read_gbps(data_path: Path | None, offload_dir: Path | None) -> float:
    """Cold sequential read speed (GB/s): of the store's data file when there is one (read-only),
    else of a ``SCRATCH_BYTES`` scratch file in ``offload_dir`` that is removed afterwards."""
    if data_path is not None and data_path.stat().st_size >= MIN_PROBE_FILE_BYTES:
        return median_cold_read_gbps(data_path)
    assert offload_dir is not None, "probing the disk needs the store file or an offload directory"
    check_offload_dir(offload_dir, need_bytes=SCRATCH_BYTES)     # a clear error before any work
    with scratch_file(offload_dir / f".tierkv-probe-{os.getpid()}", SCRATCH_BYTES) as scratch:
        evict_from_page_cache(scratch)
        return median_cold_read_gbps(scratch)


@contextmanager
def scratch_file(path: Path, nbytes: int) -> Iterator[Path]:
    """A file of ``nbytes`` random bytes (whole MiB), on disk (fsynced), removed on exit: what a
    disk probe reads when no store file exists yet."""
    try:
        block = os.urandom(1 << 20)
        with open(path, "wb") as f:
            for _ in range(nbytes >> 20):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        yield path
    finally:
        path.unlink(missing_ok=True)


def median_cold_read_gbps(path: Path, passes: int = DISK_PASSES, nbytes: int = PASS_BYTES) -> float:
    """Median over ``passes`` cold reads of the first ``nbytes`` of ``path`` (each pass evicts it first)."""
    return statistics.median(measure_disk_read_gbps(path, nbytes) for _ in range(passes))


@dataclass(frozen=True)
class LinkSpeeds:
    """Measured (or given) speeds of the links a token's forward pass uses."""

    disk_read_gbps: float              # cold sequential reads of the store (O_DIRECT where allowed)
    h2d_gbps: float                    # pinned host -> device copy; inf on CPU-only (nothing to copy)
    layer_compute_s: float             # one decoder layer, batch 1, one new token
    compute_estimated_gbps: float | None = None  # None: layer_compute_s was timed on a layer of the model's
                                                 # shapes; else estimated: the layer's bytes at this measured
                                                 # decode matvec rate (``matvec_gbps``)


def probe_links(config: ModelConfig, dtype: torch.dtype, device: torch.device, data_path: Path | None,
                offload_dir: Path | None, need_disk: bool = True, need_h2d: bool = True,
                estimate: ComputeEstimate | None = None) -> LinkSpeeds:
    """Measure the links (about a second), or reuse this machine's best measurements of the last
    day cached in ``offload_dir/links.json`` (``tierkv.probe``): disk on the store file, read-only (or a
    small scratch file in ``offload_dir`` before a store exists), host->device with a pinned
    buffer, and one decoder layer's decode compute: timed on zero weights of the model's shapes,
    or, with ``estimate``, estimated from a measured matvec rate (``estimate_layer_compute``)."""
    cache = LinkCache(offload_dir)
    disk = math.inf
    if need_disk:
        if data_path is None or data_path.stat().st_size < MIN_PROBE_FILE_BYTES:
            assert offload_dir is not None, "probing the disk needs the store file or an offload directory"
            check_offload_dir(offload_dir)                       # exists and is writable, or a clear error
        where = data_path.parent if data_path is not None else offload_dir
        disk = cache.measure(disk_key(where), lambda: disk_read_gbps(data_path, offload_dir), max)
    h2d = math.inf
    if need_h2d and device.type == "cuda":
        h2d = cache.measure(h2d_key(device), lambda: _probe_h2d(device), max)
    if estimate is not None:
        compute_s, rate = estimate_layer_compute(estimate, dtype, device, cache)
        return LinkSpeeds(disk_read_gbps=disk, h2d_gbps=h2d, layer_compute_s=compute_s, compute_estimated_gbps=rate)
    compute = cache.measure(compute_key(config, dtype, device),
                            lambda: _probe_layer_compute_s(config, dtype, device), min,
                            keep=lambda: device.type != "cpu" or not machine_busy())
    return LinkSpeeds(disk_read_gbps=disk, h2d_gbps=h2d, layer_compute_s=compute)


@dataclass(frozen=True)
class ComputeEstimate:
    """What a layer's decode compute is estimated from when no layer can be timed: a plan from a
    config alone (no weights), or quantized weights (timed through the matvec of their scheme)."""

    layer_bytes: int                   # one decoder layer's stored weights (compressed when quantized)
    working_set_bytes: int             # what one decode step reads: every layer (a small model stays in cache)
    scheme: str | None = None          # None: 16-bit weights in the compute dtype; "int8" | "int4"
    group_size: int = DEFAULT_GROUP_SIZE


def estimate_layer_compute(estimate: ComputeEstimate, dtype: torch.dtype, device: torch.device,
                           cache: LinkCache | None = None) -> tuple[float, float]:
    """(seconds per layer, the matvec rate in GB/s it came from): the layer's bytes over the rate at
    which this device's decode matvec of the scheme streams stored weight bytes (batch 1, one token).

    Decode at batch 1 reads every weight once and does two FLOPs per weight, so a matvec over
    weights larger than the caches measures what bounds it here, memory or arithmetic (on a small
    CPU the int4 matvec is bound by its unpacking, not by its bytes). Attention at short context and
    the norms are not counted: a few percent of a layer.
    """
    cache = cache or LinkCache(None)
    nbytes = matvec_bytes(estimate.working_set_bytes)
    rate = cache.measure(matvec_key(estimate.scheme, estimate.group_size, dtype, device, nbytes),
                         lambda: matvec_gbps(estimate.scheme, estimate.group_size, dtype, device, nbytes), max)
    return estimate.layer_bytes / (rate * 1e9), rate


def _probe_h2d(device: torch.device, nbytes: int = 256 << 20) -> float:
    host = HostBuffer(nbytes, pinned=True)
    src = host.tensor
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return 3 * nbytes / (time.perf_counter() - t0) / 1e9


def _probe_layer_compute_s(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> float:
    """Fastest timing of one decoder layer at batch 1, one token, on zero weights of the real shapes."""
    from tierkv.model import decoder_layer, dense_attention, step_inputs

    class _OneTokenKV:
        def attend(self, layer, q, k, v, positions, window_tokens):   # q (1, Hq, 1, D), k/v (1, Hkv, 1, D)
            return dense_attention(q, k, v, positions, positions, window_tokens)

    weights = {k: torch.zeros(shape, dtype=dtype, device=device) for k, shape in config.layer_tensor_shapes().items()}
    h = torch.zeros((1, 1, config.hidden_size), dtype=dtype, device=device)            # (B, T, H)
    positions = torch.zeros((1, 1), dtype=torch.int64, device=device)
    step = step_inputs(config, positions, 1, dtype)
    times: list[float] = []
    start = time.perf_counter()
    with torch.inference_mode():
        # 12 runs at least; on a busy machine keep sampling (up to 0.5 s or 200 runs), since a
        # thread of the parallel region preempted by another process stalls a whole run
        while len(times) < 12 or (len(times) < 200 and time.perf_counter() - start < 0.5):
            _sync(device)
            t0 = time.perf_counter()
            decoder_layer(config, weights, h, step, _OneTokenKV(), 0)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return min(times[1:])   # the fastest run: the least disturbed on a shared machine


def matvec_gbps(scheme: str | None, group_size: int, dtype: torch.dtype, device: torch.device,
                nbytes: int = MATVEC_BYTES) -> float:
    """Stored weight bytes per second (GB/s) of this device's batch-1 matvec in ``scheme``: the fastest
    of several passes over ``nbytes`` of weights in ``MATVEC_SHAPE`` pieces (more than the caches hold).

    16-bit: ``F.linear`` in ``dtype``. On the CPU, a quantized scheme runs the engine's own
    ``kernels.quant.quant_linear`` on weights stored as the converter stores them for the CPU (int4
    and int8 in groups: PyTorch's fused int4 op, int8 as two nibble planes; int8 per channel: its int8
    op), with the op parameters prepared as for resident layers. On CUDA the quantized matvec is not timed:
    its bytes are counted at the 16-bit matvec's rate (a fused dequantize-matmul streams its bytes
    like cuBLAS's bf16 matvec at best), so the estimate is optimistic there.
    """
    n, k = MATVEC_SHAPE
    cpu_quant = scheme is not None and device.type == "cpu"
    tq = TensorQuant(scheme, group_size, choose_pack(scheme, (n, k), "cpu", group_size)) if cpu_quant else None
    per_row = tq.nbytes((CPU_PACK_ROWS, k)) // CPU_PACK_ROWS if tq is not None else k * _itemsize(dtype)
    n = max(CPU_PACK_ROWS, min(n, nbytes // per_row // CPU_PACK_ROWS * CPU_PACK_ROWS))   # small models: fewer rows
    piece = n * per_row
    count = max(1, -(-nbytes // piece))
    x = torch.randn((1, k), dtype=torch.float32).to(device=device, dtype=dtype)              # (1, K)
    one_pass = _quant_pass(x, n, count, tq) if tq is not None else _dense_pass(x, n, count)
    best = math.inf
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(MATVEC_MAX_PASSES):
            _sync(device)
            t0 = time.perf_counter()
            one_pass()
            _sync(device)
            if i:                                        # the first pass warms up
                best = min(best, time.perf_counter() - t0)
            if i >= MATVEC_MIN_PASSES and time.perf_counter() - start > MATVEC_TIME_S:
                break
    return count * piece / best / 1e9


def _dense_pass(x: torch.Tensor, n: int, count: int) -> Callable[[], None]:
    """One pass of ``F.linear(x (1, K), w)`` over ``count`` distinct (n, K) weights in x's dtype."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn((n, x.shape[1]), generator=gen).to(device=x.device, dtype=x.dtype)
    weights = [base.clone() for _ in range(count)]

    def one_pass() -> None:
        for w in weights:
            torch.nn.functional.linear(x, w)                                                # (1, N)
    return one_pass


def _quant_pass(x: torch.Tensor, n: int, count: int, tq: TensorQuant) -> Callable[[], None]:
    """One pass of the engine's own quantized linear (``kernels.quant.quant_linear`` with the CPU op
    parameters prepared, as for resident layers) over ``count`` distinct (n, K) weights stored as ``tq``."""
    gen = torch.Generator().manual_seed(0)
    one = prepare(QuantWeight(*quantize_weight(torch.randn((n, x.shape[1]), generator=gen), tq), tq), x.dtype)
    weights = [QuantWeight(one.data.clone(), one.qparams.clone(), tq, tuple(t.clone() for t in one.prepared))
               for _ in range(count)]                                           # distinct memory, one weight

    def one_pass() -> None:
        for w in weights:
            quant_linear(x, w)                                                  # (1, N)
    return one_pass


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["DISAGREE", "LINKS_FILE", "ComputeEstimate", "LinkCache", "LinkSpeeds", "MAX_AGE_S", "OBSERVED_KEPT",
           "SAMPLES", "SCRATCH_BYTES", "compute_key", "disk_key", "disk_read_gbps", "estimate_layer_compute", "h2d_key",
           "machine_busy", "machine_id", "matvec_bytes", "matvec_gbps", "matvec_key", "median_cold_read_gbps", "probe_links", "scratch_file"]
