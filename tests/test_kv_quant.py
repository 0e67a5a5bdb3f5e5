"""int8/int4 KV chunks on the host and disk tiers (``kv_quant``): the quantize/dequantize triplet,
packed disk records, per-tier chunk bytes and budgets, the output error, sessions, and bad values.

Bounds stated here: a code is off by at most half a quantization step (scale / 2, scale = range /
(2**bits - 1) of a key channel or a value row within a chunk) plus the float16 rounding of the
params; attention over int8 chunks is within 2% (relative, measured 0.7%) of exact on unit-scale
random K/V, over int4 within 15% (measured 9.8%).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from typer.testing import CliRunner

import placements
import tierkv
from test_kv_tiered import B, PIECES, _cfg, _drive, _tiered
from tierkv.cli import app
from tierkv.config import Policy
from tierkv.errors import ArgumentError
from tierkv.io.kvstore import KVChunk, KVStore, PackedKV
from tierkv.kernels._select import HAS_TRITON
from tierkv.kernels.kvquant import KVQuantLayout, dequantize_kv, quantize_kv
from tierkv.pipeline.kv import DenseKVCache
from tierkv.pipeline.kv.codec import ChunkCodec, decode_record
from tierkv.quantspec import kv_chunk_bytes

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]
SHAPES = [(2, 16, 16, 16), (3, 7, 10, 5), (1, 33, 64, 33), (4, 64, 128, 1), (2, 9, 7, 4)]   # (Hkv, T, D, tokens)


def _step_bound(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Half a quantization step of x's slices along ``dim`` plus float16 rounding of the params."""
    rng = x.amax(dim, keepdim=True) - x.amin(dim, keepdim=True)
    return rng / (2 ** bits - 1) / 2 * 1.01 + x.abs().amax(dim, keepdim=True) * 2e-3 + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_round_trip_within_half_a_step_and_backends_agree(backend: str, scheme: str, shape: tuple[int, ...]) -> None:
    h, t, d, n = shape
    if scheme == "int4" and d % 2:
        pytest.skip("int4 packs pairs along D")
    g = torch.Generator().manual_seed(h * 1000 + t * 10 + d)
    k = torch.randn(h, t, d, generator=g) * torch.linspace(0.2, 5.0, d)          # channels of different ranges
    v = torch.randn(h, t, d, generator=g) * torch.linspace(0.5, 3.0, t)[:, None]  # rows of different ranges
    layout = KVQuantLayout(scheme, h, t, d)
    packed = quantize_kv(k, v, layout, n)
    assert packed.shape == (layout.nbytes,) and layout.nbytes == kv_chunk_bytes(scheme, h, t, d, 2)
    k_out, v_out = torch.full((h, t, d), math.nan), torch.full((h, t, d), math.nan)    # poisoned
    dequantize_kv(packed, layout, k_out, v_out, backend=backend)
    bits = layout.bits
    assert torch.isfinite(k_out).all() and torch.isfinite(v_out).all()
    assert ((k_out[:, :n] - k[:, :n]).abs() <= _step_bound(k[:, :n], bits, 1)).all()   # per (head, channel)
    assert ((v_out[:, :n] - v[:, :n]).abs() <= _step_bound(v[:, :n], bits, 2)).all()   # per (head, token)
    assert (v_out[:, n:] == 0).all()                                                   # rows past the tokens
    ref_k, ref_v = torch.empty_like(k), torch.empty_like(v)
    dequantize_kv(packed, layout, ref_k, ref_v, backend="torch")
    torch.testing.assert_close(k_out, ref_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_out, ref_v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantize_into_strided_views_and_low_precision(backend: str) -> None:
    """Overflow groups dequantize into (Hkv, S, D) slices of a (B, Hkv, n, S, D) buffer, in bf16 too."""
    h, s, d = 2, 8, 24
    k, v = torch.randn(h, s, d), torch.randn(h, s, d)
    layout = KVQuantLayout("int4", h, s, d)
    packed = quantize_kv(k, v, layout, s)
    buf = torch.full((2, h, 3, s, d), math.nan, dtype=torch.bfloat16)
    dequantize_kv(packed, layout, buf[1, :, 2], buf[0, :, 1], backend=backend)
    ref_k, ref_v = torch.empty(h, s, d), torch.empty(h, s, d)
    dequantize_kv(packed, layout, ref_k, ref_v, backend="torch")
    torch.testing.assert_close(buf[1, :, 2].float(), ref_k, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(buf[0, :, 1].float(), ref_v, rtol=1e-2, atol=1e-2)
    assert torch.isnan(buf[0, :, 0]).all(), "nothing outside the views is written"


def test_requantizing_dequantized_values_gives_the_same_codes() -> None:
    """A chunk fetched back and evicted again is quantized from its dequantized values: no drift."""
    h, s, d = 2, 32, 16
    k, v = torch.randn(h, s, d) * 3, torch.randn(h, s, d)
    for scheme in ("int8", "int4"):
        layout = KVQuantLayout(scheme, h, s, d)
        first = quantize_kv(k, v, layout, s)
        k1, v1 = torch.empty_like(k), torch.empty_like(v)
        dequantize_kv(first, layout, k1, v1, backend="torch")
        k2, v2 = torch.empty_like(k), torch.empty_like(v)
        dequantize_kv(quantize_kv(k1, v1, layout, s), layout, k2, v2, backend="torch")
        torch.testing.assert_close(k2, k1, rtol=0, atol=2e-3 * k.abs().max().item())
        torch.testing.assert_close(v2, v1, rtol=0, atol=2e-3 * v.abs().max().item())


def test_sizes_per_scheme_meet_the_byte_goals() -> None:
    """Against 16-bit K/V at chunks of 64 tokens: int8 <= 0.55x, int4 <= 0.30x (head dims 64, 128)."""
    for d in (64, 128):
        exact = kv_chunk_bytes("none", 8, 64, d, 2)
        assert exact == 2 * 8 * 64 * d * 2
        assert kv_chunk_bytes("int8", 8, 64, d, 2) / exact <= 0.55
        assert kv_chunk_bytes("int4", 8, 64, d, 2) / exact <= 0.30
    assert KVQuantLayout("int8", 2, 16, 7).nbytes == kv_chunk_bytes("int8", 2, 16, 7, 2)   # int8: any head dim


def test_bad_kv_quant_is_refused_listing_the_choices() -> None:
    with pytest.raises(ArgumentError, match="unknown KV quantization 'int3'; choose one of none, int8, int4"):
        Policy(kv_quant="int3")
    assert Policy(kv_quant=" INT8 ").kv_quant == "int8"
    result = CliRunner().invoke(app, ["run", "demo", "--prompt", "hi", "--kv-quant", "fp8"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "choose one of none, int8, int4" in result.stderr, result.stderr


@pytest.mark.parametrize("scheme, h, s, d", [("int8", 2, 16, 8), ("int8", 1, 9, 7), ("int4", 1, 9, 6)])
def test_packed_records_round_trip_through_the_store(tmp_path: Path, scheme: str, h: int, s: int, d: int) -> None:
    """Records of packed chunks (odd sizes: 190 and 114 bytes, fp32 abstracts after them) read back intact."""
    k, v = torch.randn(h, s, d), torch.randn(h, s, d)
    codec = ChunkCodec(scheme, h, s, d, torch.float32)
    n = min(10, s)
    kmin, kmax = k[:, :n].amin(1), k[:, :n].amax(1)
    record = codec.record(3, 1, 0, (k, v, kmin, kmax), tokens=n, snapshot=True)
    assert record.packed is not None and record.n_tokens == n and record.k is None
    exact = KVChunk(3, 2, 0, 2 * s, k, v, kmin, kmax)
    with KVStore(tmp_path / "kv", durable=False) as store:
        store.append([record, exact])
        back, back_exact = store.read([(3, 1, 0), (3, 2, 0)])
    assert isinstance(back.packed, PackedKV) and back.packed.scheme == scheme and back.packed.shape == (h, s, d)
    assert back.start_token == s and torch.equal(back.kmin, kmin) and torch.equal(back.kmax, kmax)
    assert torch.equal(back.packed.data, record.packed.data) and torch.equal(back_exact.k, k)
    k_out, v_out = torch.full((h, s, d), math.nan), torch.full((h, s, d), math.nan)
    decode_record(back, k_out, v_out)
    assert (v_out[:, n:] == 0).all()
    bits = codec.layout.bits                                            # type: ignore[union-attr]
    assert ((k_out[:, :n] - k[:, :n]).abs() <= _step_bound(k[:, :n], bits, 1)).all()
    assert ((v_out[:, :n] - v[:, :n]).abs() <= _step_bound(v[:, :n], bits, 2)).all()


def _run(kv_quant: str, tmp: Path) -> tuple[float, dict[str, Any], list[int]]:
    """Exact tiered attention with chunks on all three tiers: (largest relative output error vs dense,
    stats, chunks per tier of layer 0)."""
    cfg, cap = _cfg(), sum(PIECES)
    dense = DenseKVCache(cfg, B, cap, torch.float32, torch.device("cpu"))
    with _tiered(cfg, Policy(kv="exact", chunk_tokens=32, kv_quant=kv_quant), cap, tmp) as cache:
        exact, approx = _drive([dense, cache], PIECES, windows=(None, 100))
        err = max(((a - b).norm() / a.norm()).item() for a, b in zip(exact, approx))
        cache.check_invariants()
        table = cache._st.layers[0].table
        counts = [table.count(tier) for tier in ("device", "host", "disk")]
        return err, cache.stats(), counts


@pytest.mark.usefixtures("torch_kernels_one_thread")
def test_cold_chunks_take_fewer_bytes_more_fit_the_host_and_the_error_is_bounded(tmp_path: Path) -> None:
    runs = {q: _run(q, tmp_path) for q in ("none", "int8", "int4")}
    (err0, st0, n0), (err8, st8, n8), (err4, st4, n4) = runs["none"], runs["int8"], runs["int4"]
    assert err0 < 1e-5 and err8 < 0.02 and err4 < 0.15, (err0, err8, err4)
    slot = 2 * 2 * 32 * 16 * 4                                          # fp32 K + V of one 32-token chunk
    for st, scheme in ((st8, "int8"), (st4, "int4")):
        ratio = kv_chunk_bytes(scheme, 2, 32, 16, 4) / slot
        assert st["cold_chunk_ratio"] == [ratio, ratio] and st["kv_quant"] == scheme
        # exact decode reads every chunk off the device once per step: the same chunks, fewer bytes
        assert st["bytes_read_per_step"] == pytest.approx(st0["bytes_read_per_step"] * ratio, rel=1e-9)
        assert st["host_bytes"] <= st0["host_bytes"] and st["device_bytes"] == st0["device_bytes"]
        moved = sum(link["bytes"] for name, link in st["moves"].items() if name != "device->device")
        moved0 = sum(link["bytes"] for name, link in st0["moves"].items() if name != "device->device")
        assert moved < moved0 * (ratio + 0.05)
    assert n8[0] == n0[0] and n8[1] > 2 * n0[1] and n8[2] < n0[2]        # the host budget holds ~3.4x the chunks
    assert n4[2] <= n8[2] and st0["host_bytes"] == n0[1] * 2 * slot      # bytes per tier: the compressed size


def test_a_saved_session_with_int8_chunks_restores_and_continues_alike(tiny_model_dir: Callable[..., Path],
                                                                       tmp_path: Path,
                                                                       torch_kernels_one_thread: None) -> None:
    """A session file stores the values the cache holds (dequantized, in the cache dtype): a restored
    session's next turn gives the same tokens as the live session's."""
    model, offload = tiny_model_dir("llama"), tmp_path / "offload"
    kwargs = dict(placements.placement_kwargs("tiered", model, offload), kv_quant="int8")
    turns = [placements.random_prompt(40, seed=300), placements.random_prompt(9, seed=301),
             placements.random_prompt(6, seed=302)]
    reply = dict(max_new_tokens=8, ignore_eos=True)
    with tierkv.load(model, **kwargs) as eng:
        placements.check_placement("tiered", eng)
        session = eng.session()
        for new in turns[:2]:
            session.generate(new, **reply)
        path = session.save()
        third = session.generate(turns[2], **reply)
        assert third.stats.kv["kv_quant"] == "int8" and third.stats.kv["host_bytes"] > 0, third.stats.kv
        live = eng.kv_stats()                       # the session's cache, as its tiers hold it now
        assert live["kv_quant"] == "int8" and live["kv_host_bytes"] == third.stats.kv["host_bytes"], live
        session.close()
    with tierkv.load(model, **kwargs) as later:
        restored = later.restore_session(path)
        again = restored.generate(turns[2], **reply)
        assert again.token_ids == third.token_ids
        restored.close()
