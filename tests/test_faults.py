"""Fault matrix for everything tierkv writes: the packed weight store (data file, manifest, damage
record), the conversion's resume state, and KV segments.

Each case truncates, corrupts, deletes or empties a file, fills the disk, or kills a writer with
SIGKILL, and checks that it ends in an automatic repair or in a clear error whose stated fix works
when the test applies it; where tokens come out, they equal a resident run's (never silently
wrong). docs/reliability.md lists the same matrix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from typer.testing import CliRunner

import tierkv
from tierkv.cli import app
from tierkv.config import Budget, ModelConfig, Policy
from tierkv.io import convert as convert_mod
from tierkv.io import store as store_mod
from tierkv.io.kvstore import KVChunk, KVStore, KVStoreError
from tierkv.io.convert import cached_store_dir, convert
from tierkv.io.store import (DAMAGE_FILE, DATA_FILE, MANIFEST_FILE, PARTIAL_SUFFIX, STATE_FILE, StoreError,
                             WeightStore)
from tierkv.plan import LinkSpeeds, make_plan, minimum_device_bytes

ROOT = Path(__file__).resolve().parents[1]
LINKS = LinkSpeeds(disk_read_gbps=1.0, h2d_gbps=float("inf"), layer_compute_s=1e-3)
PROMPT = [5, 17, 42, 99, 3, 150, 7]
NEW_TOKENS = 6


# -- helpers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (3 layers) whose streamed runs read every layer from the store."""
    from conftest import build_hf_model, save_hf_model
    return save_hf_model(build_hf_model("llama", num_hidden_layers=3), tmp_path_factory.mktemp("fault-model"))


@pytest.fixture(scope="module")
def resident_tokens(model: Path) -> list[int]:
    with tierkv.load(model, device="cpu") as eng:
        return eng.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids


def _streaming_kwargs(model: Path, offload: Path) -> dict[str, object]:
    """tierkv.load arguments whose plan streams layers from the store under ``offload``."""
    cfg = ModelConfig.from_dir(model)
    policy = Policy(device="cpu", kv_device_tokens=64)
    roomy = make_plan(cfg, Budget(device_mem_bytes=1 << 30, host_mem_bytes=0, offload_dir=offload), policy,
                      LINKS, context_tokens=64)
    device_mem = minimum_device_bytes(cfg, policy, context_tokens=64) + roomy.layer_bytes // 2
    return dict(device="cpu", device_mem=device_mem, host_mem=0, offload_dir=offload, kv_device_tokens=64)


def _streamed(model: Path, offload: Path) -> list[int]:
    with tierkv.load(model, **_streaming_kwargs(model, offload)) as eng:
        assert eng.plan is not None and eng.plan.disk_layers, "the run must stream layers from the store"
        return eng.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def _named_convert(message: str) -> list[str]:
    """The arguments of the `tierkv convert ...` command an error message names."""
    found = re.search(r"`tierkv convert ([^`]+)`", message)
    assert found, f"no convert command named in: {message}"
    return shlex.split(found.group(1))


def _store_bytes(path: Path) -> bytes:
    return (path / DATA_FILE).read_bytes()


def _verify_every_extent(store_dir: Path) -> None:
    """Open the store and read all its extents, each read checking every CRC block (StoreError if one fails)."""
    store = WeightStore.open(store_dir)
    try:
        store.read_bytes(list(store.extents))
    finally:
        store.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """small_fs(size) -> a fresh tmpfs of ``size`` (e.g. "24m") mounted under tmp_path; skips where mounting fails."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if shutil.which("mount") is None or os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root and mount(8)")
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({run.stderr.strip() or 'not root'})")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


# -- weight store: corruption found while streaming ---------------------------------------------

def test_stream_time_checksum_mismatch_names_a_convert_that_repairs(model: Path, tmp_path: Path,
                                                                    resident_tokens: list[int]) -> None:
    offload = tmp_path / "off"
    assert _streamed(model, offload) == resident_tokens
    store = WeightStore.open(cached_store_dir(model, offload))
    e = store.layer(1)
    _flip_byte(store.data_path, e.offset + e.nbytes // 3)
    store.close()
    with pytest.raises(StoreError, match="checksum mismatch in layer 1") as err:
        _streamed(model, offload)
    assert (store.dir / DAMAGE_FILE).is_file(), "the mismatch is recorded so the store no longer opens"
    with pytest.raises(StoreError, match="found corrupt.*layer.1"):
        WeightStore.open(store.dir)
    args = _named_convert(str(err.value))
    assert Path(args[0]) == model.resolve() and Path(args[1]) == store.dir
    code, out = _cli("convert", *args)
    assert code == 0, out
    assert "layer 1 failed its checksum: re-converting it" in out and "1 of 6 extents re-converted" in out
    _verify_every_extent(store.dir)
    assert _streamed(model, offload) == resident_tokens


def test_stream_time_checksum_mismatch_is_repaired_by_the_next_run(model: Path, tmp_path: Path,
                                                                   resident_tokens: list[int],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    offload = tmp_path / "off"
    _streamed(model, offload)
    store = WeightStore.open(cached_store_dir(model, offload))
    _flip_byte(store.data_path, store.layer(2).offset + 100)
    store.close()
    with pytest.raises(StoreError, match=r"checksum mismatch.*tierkv convert.*or just run the same command again"):
        _streamed(model, offload)
    with caplog.at_level(logging.WARNING, logger="tierkv.io.convert"):
        assert _streamed(model, offload) == resident_tokens
    assert any("layer 2 failed its checksum" in r.message for r in caplog.records)
    assert not (store.dir / DAMAGE_FILE).exists()


def test_checksum_mismatch_found_while_loading_is_repaired_within_the_same_load(
        model: Path, tmp_path: Path, resident_tokens: list[int], caplog: pytest.LogCaptureFixture) -> None:
    offload = tmp_path / "off"
    _streamed(model, offload)
    store = WeightStore.open(cached_store_dir(model, offload))
    _flip_byte(store.data_path, store.extents["embed"].offset + 4000)     # read (and verified) at load
    store.close()
    with caplog.at_level(logging.WARNING, logger="tierkv.io.convert"):
        assert _streamed(model, offload) == resident_tokens
    assert any("the embedding failed its checksum" in r.message for r in caplog.records)


# -- weight store: files damaged at rest ------------------------------------------------------------

MANIFEST_FAULTS = {
    "not json": b"{ this is not json",
    "empty": b"",
    "wrong shape": b'{"format": "tierkv-weight-store", "version": 1, "extents": []}',
    "a list": b"[1, 2, 3]",
}


@pytest.mark.parametrize("fault", sorted(MANIFEST_FAULTS))
def test_damaged_manifest_of_a_cached_store_is_rebuilt_on_use(model: Path, tmp_path: Path, fault: str,
                                                              resident_tokens: list[int]) -> None:
    offload = tmp_path / "off"
    _streamed(model, offload)
    out = cached_store_dir(model, offload)
    (out / MANIFEST_FILE).write_bytes(MANIFEST_FAULTS[fault])
    with pytest.raises(StoreError, match=r"damaged.*tierkv convert"):
        WeightStore.open(out)
    assert _streamed(model, offload) == resident_tokens
    _verify_every_extent(out)


@pytest.mark.parametrize("restart", [False, True])
@pytest.mark.parametrize("fault", ["not json", "empty"])
def test_damaged_manifest_named_fix_and_restart_work(model: Path, tmp_path: Path, fault: str, restart: bool) -> None:
    out = tmp_path / "store"
    reference = _store_bytes(convert(model, tmp_path / "clean"))
    convert(model, out)
    (out / MANIFEST_FILE).write_bytes(MANIFEST_FAULTS[fault])
    with pytest.raises(StoreError) as err:
        WeightStore.open(out)
    args = _named_convert(str(err.value))
    assert args[1] == str(out)
    code, text = _cli("convert", str(model), str(out), *(["--restart"] if restart else []))
    assert code == 0, text
    assert restart or "converting everything again" in text
    _verify_every_extent(out)
    assert _store_bytes(out) == reference


@pytest.mark.parametrize("fault", ["truncate", "delete", "empty", "corrupt two"])
def test_damaged_data_file_is_repaired_by_convert(model: Path, tmp_path: Path, fault: str) -> None:
    out = convert(model, tmp_path / "store")
    reference = _store_bytes(out)
    store = WeightStore.open(out)
    data, last = store.data_path, store.extents["head"]
    store.close()
    if fault == "truncate":
        os.truncate(data, last.offset + 4096)          # the head extent is cut off
        expect = ["the LM head lies past the end"]
    elif fault == "delete":
        data.unlink()
        expect = ["layer 0 is missing"]
    elif fault == "empty":
        os.truncate(data, 0)
        expect = ["layer 2 lies past the end"]
    else:
        _flip_byte(data, store.layer(0).offset + 7)
        _flip_byte(data, store.extents["embed"].offset + 5000)
        expect = ["layer 0 failed its checksum", "the embedding failed its checksum"]
    lines: list[str] = []
    convert(model, out, report=lines.append)
    for text in expect:
        assert any(text in line for line in lines), (text, lines)
    if fault == "corrupt two":
        assert lines[-1].endswith("2 of 6 extents re-converted")
    assert _store_bytes(out) == reference
    _verify_every_extent(out)


def test_corrupt_damage_record_still_blocks_and_is_cleared(model: Path, tmp_path: Path) -> None:
    out = convert(model, tmp_path / "store")
    (out / DAMAGE_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(StoreError, match="found corrupt"):
        WeightStore.open(out)
    lines: list[str] = []
    convert(model, out, report=lines.append)
    assert "every extent of" in lines[0] and not (out / DAMAGE_FILE).exists()
    WeightStore.open(out)


# -- conversion state (resume files) ------------------------------------------------------------

def _interrupted(model: Path, out: Path, after_bytes: int) -> None:
    def stop(done: int, total: int) -> None:
        if done > after_bytes:
            raise KeyboardInterrupt("simulated ^C")
    with pytest.raises(KeyboardInterrupt):
        convert(model, out, progress=stop)


STATE_FAULTS = ["state not json", "state empty", "state deleted", "partial truncated", "partial corrupt",
                "partial deleted", "partial empty"]


@pytest.mark.parametrize("fault", STATE_FAULTS)
def test_damaged_resume_state_resumes_safely(model: Path, tmp_path: Path, fault: str) -> None:
    reference = _store_bytes(convert(model, tmp_path / "clean"))
    layout = {e.name: e for e in store_mod.plan_layout(ModelConfig.from_dir(model), torch.float32)}
    out = tmp_path / "store"
    _interrupted(model, out, layout["layer.1"].offset + 1)     # embed and layer 0 done, layer 1 partly written
    state, partial = out / STATE_FILE, out / (DATA_FILE + PARTIAL_SUFFIX)
    assert set(json.loads(state.read_text())["done"]) == {"embed", "layer.0"}
    if fault == "state not json":
        state.write_text("{")
    elif fault == "state empty":
        state.write_bytes(b"")
    elif fault == "state deleted":
        state.unlink()
    elif fault == "partial truncated":
        os.truncate(partial, layout["layer.0"].offset + 4096)
    elif fault == "partial corrupt":
        _flip_byte(partial, layout["layer.0"].offset + 64)
    elif fault == "partial deleted":
        partial.unlink()
    else:
        os.truncate(partial, 0)
    lines: list[str] = []
    calls: list[int] = []
    convert(model, out, report=lines.append, progress=lambda d, t: calls.append(d))
    if fault.startswith("partial t") or fault == "partial corrupt":
        assert calls[0] == layout["layer.0"].offset, "resumes after the extents that still verify"
        assert any("layer 0 of the interrupted conversion" in line and "does not verify" in line for line in lines)
    else:
        assert calls[0] == 0, "unusable state: starts over"
    assert _store_bytes(out) == reference
    assert not state.exists() and not partial.exists()


KILLED_CONVERT = r"""
import os, sys, time
from tierkv.io.convert import convert
marker, after = sys.argv[3], int(sys.argv[4])
def progress(done, total):
    if done > after and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(60)                      # the parent SIGKILLs us here, mid-extent
convert(sys.argv[1], sys.argv[2], progress=progress)
"""


def _kill_mid_convert(model: Path, out: Path, after_bytes: int, tmp_path: Path) -> None:
    marker = tmp_path / f"reached-{after_bytes}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CONVERT, str(model), str(out), str(marker),
                             str(after_bytes)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
            assert time.monotonic() < deadline, "the conversion never reached the kill point"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_conversion_resumes_byte_identical(model: Path, tmp_path: Path) -> None:
    reference = _store_bytes(convert(model, tmp_path / "clean"))
    layout = {e.name: e for e in store_mod.plan_layout(ModelConfig.from_dir(model), torch.float32)}
    out = tmp_path / "store"
    _kill_mid_convert(model, out, layout["layer.1"].offset + 1, tmp_path)
    with pytest.raises(StoreError, match="did not finish.*tierkv convert"):
        WeightStore.open(out)
    calls: list[int] = []
    convert(model, out, progress=lambda d, t: calls.append(d))
    assert calls[0] == layout["layer.1"].offset, "the extents written before the kill are kept (verified)"
    assert _store_bytes(out) == reference


REPAIR_THEN_HANG = r"""
import os, sys, time
from tierkv.io.convert import convert
damage = os.path.join(sys.argv[2], "damaged.json")
def progress(done, total):
    if os.path.exists(damage) and done > int(sys.argv[3]):
        time.sleep(60)                      # rewriting layer 1: its first tensor is on disk, the rest is not
convert(sys.argv[1], sys.argv[2], progress=progress)
"""


def test_sigkill_mid_repair_leaves_a_store_that_refuses_to_open_then_repairs(model: Path, tmp_path: Path) -> None:
    out = convert(model, tmp_path / "store")
    reference = _store_bytes(out)
    store = WeightStore.open(out)
    e = store.layer(1)
    store.close()
    _flip_byte(out / DATA_FILE, e.offset + 10)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", REPAIR_THEN_HANG, str(model), str(out), str(e.offset + 1)],
                            env=env)
    deadline = time.monotonic() + 60
    while not (out / DAMAGE_FILE).exists():          # the repair has begun rewriting layer 1
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)
    assert proc.poll() is None, "the repair finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with pytest.raises(StoreError, match="found corrupt.*tierkv convert"):
        WeightStore.open(out)
    convert(model, out)
    assert _store_bytes(out) == reference and not (out / DAMAGE_FILE).exists()


# -- another checkpoint, a changed checkpoint ------------------------------------------------------

def test_convert_refuses_another_checkpoints_store_and_restart_replaces_it(make_checkpoint, model: Path,
                                                                           tmp_path: Path) -> None:
    _, other = make_checkpoint("llama", seed=3, num_hidden_layers=3)
    out = convert(model, tmp_path / "store")
    before = _store_bytes(out)
    code, text = _cli("convert", str(other), str(out))
    assert code == 2 and "holds the weight store of another checkpoint" in text and "--restart" in text
    assert _store_bytes(out) == before, "nothing was overwritten"
    code, text = _cli("convert", str(other), str(out), "--restart")
    assert code == 0, text
    assert WeightStore.open(out).source_dir == str(other.resolve())
    assert _store_bytes(out) == _store_bytes(convert(other, tmp_path / "other-clean"))


def test_changed_checkpoint_removes_its_stale_store_unless_in_use(make_checkpoint, tmp_path: Path) -> None:
    _, ckpt = make_checkpoint("llama", num_hidden_layers=3)
    offload = tmp_path / "off"
    first = convert_mod.cached_store(ckpt, offload)
    bf16 = convert_mod.cached_store(ckpt, offload, dtype="bfloat16")

    def touch() -> None:
        st = (ckpt / "model.safetensors").stat()
        os.utime(ckpt / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    in_use = WeightStore.open(first)                    # another user holds the old fp32 store
    touch()
    second = convert_mod.cached_store(ckpt, offload)
    assert second != first and first.is_dir(), "a store in use is never removed"
    assert not bf16.exists(), "the stale bf16 store, unused, is removed"
    bf16_new = convert_mod.cached_store(ckpt, offload, dtype="bfloat16")
    assert second.is_dir(), "a store of another dtype that still matches the checkpoint is kept"
    in_use.close()
    touch()
    third = convert_mod.cached_store(ckpt, offload)
    assert not first.exists() and not second.exists() and not bf16_new.exists()
    assert [p.name for p in (offload / "stores").iterdir()] == [third.name]


# -- full disks ---------------------------------------------------------------------------------

def test_streaming_runs_fit_a_small_filesystem_again_and_again(model: Path, small_fs,
                                                               resident_tokens: list[int]) -> None:
    """Issue #9 item 4: no 128 MiB probe file; the second identical run is not refused."""
    fs = small_fs("40m")
    for _ in range(3):
        assert _streamed(model, fs / "off") == resident_tokens
    assert not any(p.name.startswith(".tierkv-probe") for p in (fs / "off").iterdir())


def test_convert_into_a_too_small_filesystem_names_a_fix_that_works(model: Path, small_fs, tmp_path: Path) -> None:
    fs = small_fs("256k")
    code, text = _cli("convert", str(model), str(fs / "store"))
    assert code == 2 and "free but needs" in text and "tierkv convert MODEL OTHER_DIR" in text
    assert "--offload-dir" not in text, "convert has no --offload-dir"
    code, text = _cli("convert", str(model), str(tmp_path / "elsewhere"))
    assert code == 0, text
    _verify_every_extent(tmp_path / "elsewhere")


def test_disk_filling_up_mid_conversion_resumes_after_space_is_freed(model: Path, small_fs, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _store_bytes(convert(model, tmp_path / "clean"))
    fs = small_fs(f"{len(reference) // 2 // 4096 * 4}k")          # half the store fits
    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as patch:               # the free-space check passes; then the disk really fills
        patch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 0, 1 << 40))
        with pytest.raises(StoreError, match=r"ran out of space.*run the same command again.*resumes"):
            convert(model, fs / "store")
    subprocess.run(["mount", "-o", "remount,size=8m", str(fs)], check=True)     # "free space there"
    calls: list[int] = []
    convert(model, fs / "store", progress=lambda d, t: calls.append(d))
    assert calls[0] > 0, "resumed after the extents that reached the disk"
    assert _store_bytes(fs / "store") == reference


# -- KV segments --------------------------------------------------------------------------------

def _kv_chunk(layer: int, chunk: int, n: int = 9) -> KVChunk:
    g = torch.Generator().manual_seed(layer * 100 + chunk)
    k, v = torch.randn(2, n, 16, generator=g), torch.randn(2, n, 16, generator=g)
    return KVChunk(layer, chunk, 0, chunk * n, k, v, k.amin(1), k.amax(1))


def _kv_same(a: KVChunk, b: KVChunk) -> bool:
    return a.key == b.key and all(torch.equal(x, y) for x, y in ((a.k, b.k), (a.v, b.v), (a.kmin, b.kmin),
                                                                 (a.kmax, b.kmax)))


def test_kv_segment_truncated_while_in_use_fails_its_checksum(tmp_path: Path) -> None:
    chunks = [_kv_chunk(0, c) for c in range(3)]
    with KVStore(tmp_path / "kv-a") as store:
        store.append(chunks)
        path = store.segment_path(0)
        os.truncate(path, path.stat().st_size - 100)
        assert all(_kv_same(a, b) for a, b in zip(chunks[:2], store.read([c.key for c in chunks[:2]])))
        with pytest.raises(KVStoreError, match=r"layer0000\.kvseg.*failed its checksum.*delete its KV files"):
            store.read([chunks[2].key])


def test_kv_segment_deleted_while_in_use_still_reads_the_right_bytes(tmp_path: Path) -> None:
    chunks = [_kv_chunk(1, c) for c in range(3)]
    with KVStore(tmp_path / "kv-b") as store:
        store.append(chunks)
        store.segment_path(1).unlink()
        assert all(_kv_same(a, b) for a, b in zip(chunks, store.read([c.key for c in chunks])))
        store.append([_kv_chunk(1, 3)])
        assert _kv_same(store.read([(1, 3, 0)])[0], _kv_chunk(1, 3))


def test_kv_segment_empty_or_deleted_before_reopen_opens_clean(tmp_path: Path) -> None:
    root = tmp_path / "kv-c"
    with KVStore(root) as store:
        store.append([_kv_chunk(0, 0), _kv_chunk(1, 0)])
    os.truncate(root / "layer0000.kvseg", 0)
    (root / "layer0001.kvseg").unlink()
    with KVStore(root) as store:
        assert len(store) == 0
        with pytest.raises(KeyError):
            store.read([(0, 0, 0)])
        store.append([_kv_chunk(0, 1)])
        assert _kv_same(store.read([(0, 1, 0)])[0], _kv_chunk(0, 1))


def test_kv_real_full_filesystem_is_clear_and_keeps_what_was_written(small_fs) -> None:
    fs = small_fs("64k")
    written: list[KVChunk] = []
    with KVStore(fs / "kv-d") as store:
        with pytest.raises(KVStoreError, match="full after .* MiB of KV.*free space"):
            for c in range(64):
                store.append([_kv_chunk(0, c)])
                written.append(_kv_chunk(0, c))
        assert written and len(store) == len(written)
        assert all(_kv_same(a, b) for a, b in zip(written, store.read([c.key for c in written])))


KILLED_KV_WRITER = r"""
import sys, torch
from tierkv.io.kvstore import KVChunk, KVStore
store = KVStore(sys.argv[1])
for c in range(100000):
    g = torch.Generator().manual_seed(c)
    k, v = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    store.append([KVChunk(c % 3, c, 0, c * 9, k, v, k.amin(1), k.amax(1))])
    print(c, flush=True)
"""


def test_kv_sigkill_mid_append_reopens_consistent_and_the_dir_is_swept(tmp_path: Path) -> None:
    root = tmp_path / "kv-killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_KV_WRITER, str(root)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    lines = 0
    while lines < 30:
        assert proc.stdout is not None and proc.stdout.readline(), "the writer died early"
        lines += 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with KVStore(root) as store:            # the owner is gone: its lock is free, its last record may be torn
        keys = sorted(store.keys(), key=lambda k: k[1])
        assert len(keys) >= 30 and [k[1] for k in keys] == list(range(len(keys)))
        for (layer, c, seq), got in zip(keys, store.read(keys)):
            g = torch.Generator().manual_seed(c)
            assert torch.equal(got.k, torch.randn(2, 9, 16, generator=g)) and got.layer == c % 3
    from tierkv.io.kvstore import remove_abandoned
    with KVStore(tmp_path / "kv-live"):
        assert remove_abandoned(tmp_path) == [root], "only the dead writer's directory goes"
        assert (tmp_path / "kv-live").is_dir()


def test_kv_corrupted_mid_generation_stops_and_the_named_fix_works(tmp_path_factory: pytest.TempPathFactory,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import build_hf_model, save_hf_model
    from tierkv.pipeline.kv import kv_bytes_per_token
    from tierkv.plan import reserve_bytes
    model = save_hf_model(build_hf_model("llama", max_position_embeddings=2048),
                          tmp_path_factory.mktemp("kv-fault-model"))
    prompt = torch.randint(0, 211, (700,), generator=torch.Generator().manual_seed(3)).tolist()
    with tierkv.load(model, device="cpu", kv="exact") as eng:
        dense = eng.generate(prompt, max_new_tokens=4).token_ids
        cfg = eng.config
    policy = Policy(dtype="float32", device="cpu", kv="exact", chunk_tokens=32, kv_device_tokens=256)
    roomy = make_plan(cfg, Budget(), policy, LINKS)
    device_mem = roomy.globals_bytes + cfg.num_layers * roomy.layer_bytes + reserve_bytes(cfg, torch.float32,
                                                                                          policy, 256, 1)
    offload = tmp_path_factory.mktemp("kv-fault-off")
    kwargs = dict(device="cpu", kv="exact", chunk_tokens=32, kv_device_tokens=256, device_mem=device_mem,
                  host_mem=200 * kv_bytes_per_token(cfg, torch.float32), offload_dir=offload)
    real_append, hit = KVStore.append, []

    def corrupting_append(self: KVStore, chunks: list[KVChunk]) -> None:
        real_append(self, chunks)
        for chunk in chunks:                # every record on disk is damaged: whichever is read back fails
            hit.append(chunk.key)
            entry = self._index[chunk.key]
            _flip_byte(self.segment_path(entry.layer), entry.offset + entry.header["payload_offset"] + 3)

    with monkeypatch.context() as patch:
        patch.setattr(KVStore, "append", corrupting_append)
        with tierkv.load(model, **kwargs) as eng:
            with pytest.raises(KVStoreError, match=r"failed its checksum.*delete its KV files and rerun") as err:
                eng.generate(prompt, max_new_tokens=4)
    assert hit and "kvseg" in str(err.value)
    shutil.rmtree(offload / "kv", ignore_errors=True)         # the stated fix: delete the KV files, rerun
    with tierkv.load(model, **kwargs) as eng:
        out = eng.generate(prompt, max_new_tokens=4)
    assert out.token_ids == dense and out.stats.kv["disk_bytes"] > 0
