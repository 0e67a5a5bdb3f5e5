"""Packed weight store: round trip, alignment, crash safety, resume, corruption and disk-space errors."""

from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from tierkv.io import convert as convert_mod
from tierkv.io import store as store_mod
from tierkv.io.checkpoint import Checkpoint
from tierkv.io.convert import cached_store, check_offload_dir, convert, store_key
from tierkv.io.store import DATA_FILE, MANIFEST_FILE, StoreError, WeightStore, tensors_from_buffer

TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=128)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so equality is bit-for-bit (NaN-safe, -0.0 != 0.0)."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def _assert_store_matches(store: WeightStore, ckpt_dir: Path, dtype: torch.dtype) -> None:
    ckpt = Checkpoint(ckpt_dir)
    loaded = store.load(list(store.extents))
    for j in range(ckpt.config.num_layers):
        ref = ckpt.layer(j, dtype)
        got = loaded[f"layer.{j}"]
        assert set(got) == set(ref)
        for key, t in ref.items():
            assert got[key].dtype == dtype and got[key].shape == t.shape, key
            assert torch.equal(_bits(got[key]), _bits(t)), f"layer {j} {key}"
    ref_globals = ckpt.globals(dtype)
    got_globals = {k: v for name in ("embed", "norm", "head") if name in loaded for k, v in loaded[name].items()}
    assert set(got_globals) == set(ref_globals)
    for name, t in ref_globals.items():
        assert torch.equal(_bits(got_globals[name]), _bits(t)), name


@pytest.mark.parametrize("saved, target", [(torch.float32, None), (torch.bfloat16, None),
                                           (torch.float32, "bfloat16")])
def test_round_trip_bit_exact(make_checkpoint, tmp_path, saved, target):
    _, ckpt_dir = make_checkpoint("llama", dtype=saved, **TINY)
    out = convert(ckpt_dir, tmp_path / "store", dtype=target)
    store = WeightStore.open(out)
    expected = saved if target is None else torch.bfloat16
    assert store.dtype == expected
    assert store.config.dtype == str(expected).removeprefix("torch.")
    assert store.config.num_layers == 3 and store.config.hidden_size == 64
    _assert_store_matches(store, ckpt_dir, expected)


def test_tied_and_sharded_checkpoint(make_checkpoint, tmp_path):
    _, ckpt_dir = make_checkpoint("qwen2", tie_word_embeddings=True, save_kwargs={"max_shard_size": "40KB"},
                                  **TINY)
    assert (ckpt_dir / "model.safetensors.index.json").is_file()
    store = WeightStore.open(convert(ckpt_dir, tmp_path / "store"))
    assert "head" not in store.extents and store.config.tie_word_embeddings
    assert "self_attn.q_proj.bias" in store.layer(0).tensors
    _assert_store_matches(store, ckpt_dir, torch.float32)


def test_extents_aligned_and_disjoint(make_checkpoint, tmp_path):
    _, ckpt_dir = make_checkpoint("llama", **TINY)
    store = WeightStore.open(convert(ckpt_dir, tmp_path / "store"))
    spans = sorted((e.offset, e.offset + e.padded_nbytes) for e in store.extents.values())
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 <= b0
    for e in store.extents.values():
        assert e.offset % 4096 == 0 and e.padded_nbytes % 4096 == 0 and e.nbytes <= e.padded_nbytes
        assert all(t.offset % 64 == 0 and t.offset + t.nbytes <= e.nbytes for t in e.tensors.values())
    assert store.data_path.stat().st_size == spans[-1][1]
    manifest = json.loads((store.dir / MANIFEST_FILE).read_text())
    assert manifest["architecture"] == "LlamaForCausalLM" and manifest["dtype"] == "float32"


def test_tensors_from_buffer_are_views(make_checkpoint, tmp_path):
    _, ckpt_dir = make_checkpoint("llama", **TINY)
    store = WeightStore.open(convert(ckpt_dir, tmp_path / "store"))
    e = store.layer(1)
    buf = torch.zeros(e.padded_nbytes, dtype=torch.uint8)
    with store.open_reader() as reader:
        store.read_extent(reader, "layer.1", buf).wait()
    views = tensors_from_buffer(e, buf)
    assert views["mlp.up_proj.weight"].shape == (128, 64)
    assert views["mlp.up_proj.weight"].untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


def _interrupt_after(limit_bytes: int):
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if done > limit_bytes:
            raise KeyboardInterrupt("simulated ^C")
    return progress, calls


def test_interrupted_conversion_is_not_a_store_and_resumes(make_checkpoint, tmp_path):
    _, ckpt_dir = make_checkpoint("llama", **TINY)
    out = tmp_path / "store"
    progress, _ = _interrupt_after(240_000)    # embed (32 KiB) and layer 0 (148 KiB) done, layer 1 partly
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt_dir, out, progress=progress)
    assert not (out / MANIFEST_FILE).exists() and not (out / DATA_FILE).exists()
    with pytest.raises(StoreError, match="did not finish.*tierkv convert"):
        WeightStore.open(out)
    calls: list[int] = []
    convert(ckpt_dir, out, progress=lambda done, total: calls.append(done))
    assert calls[0] > 0, "the second run should resume after the extents already on disk"
    assert calls[-1] == WeightStore.open(out).data_path.stat().st_size
    _assert_store_matches(WeightStore.open(out), ckpt_dir, torch.float32)
    assert not (out / store_mod.STATE_FILE).exists()


def test_restart_and_reuse(make_checkpoint, tmp_path):
    _, ckpt_dir = make_checkpoint("llama", **TINY)
    out = tmp_path / "store"
    progress, _ = _interrupt_after(100_000)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt_dir, out, progress=progress)
    calls: list[int] = []
    convert(ckpt_dir, out, progress=lambda d, t: calls.append(d), restart=True)
    assert calls[0] == 0
    calls.clear()
    data = out / DATA_FILE
    before = (data.stat().st_ino, data.stat().st_mtime_ns)
    convert(ckpt_dir, out, progress=lambda d, t: calls.append(d))
    assert (data.stat().st_ino, data.stat().st_mtime_ns) == before, \
        "a complete store of the same checkpoint is re-verified and reused without rewriting"
    assert calls and calls[-1] == data.stat().st_size      # the verification reports its progress


def test_reconverting_a_changed_dtype_invalidates_first(make_checkpoint, tmp_path):
    _, ckpt_dir = make_checkpoint("llama", **TINY)
    out = convert(ckpt_dir, tmp_path / "store")
    progress, _ = _interrupt_after(50_000)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt_dir, out, dtype="bfloat16", progress=progress)
    with pytest.raises(StoreError):
        WeightStore.open(out)       # the old fp32 store must not pass for the new one


def test_checksum_corruption_names_layer_and_file(make_checkpoint, tmp_path):
    _, ckpt_dir = make_checkpoint("llama", **TINY)
    store = WeightStore.open(convert(ckpt_dir, tmp_path / "store"))
    e = store.layer(1)
    with open(store.data_path, "r+b") as f:
        f.seek(e.offset + e.nbytes // 2)
        byte = f.read(1)
        f.seek(e.offset + e.nbytes // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    store.load(["layer.0", "layer.2", "embed"])      # the others still verify
    with pytest.raises(StoreError, match=r"layer 1.*weights\.bin.*tierkv convert"):
        store.load(["layer.1"])


def test_truncated_or_missing_data_file_is_named(make_checkpoint, tmp_path):
    _, ckpt_dir = make_checkpoint("llama", **TINY)
    out = convert(ckpt_dir, tmp_path / "store")
    data = out / DATA_FILE
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 4096 * 3)
    with pytest.raises(StoreError, match=r"weights\.bin is truncated.*tierkv convert"):
        WeightStore.open(out)
    data.unlink()
    with pytest.raises(StoreError, match=r"weights\.bin is missing.*tierkv convert"):
        WeightStore.open(out)
    with pytest.raises(StoreError, match="not a tierkv weight store"):
        WeightStore.open(tmp_path)


def test_manifest_from_another_version_is_refused(make_checkpoint, tmp_path):
    _, ckpt_dir = make_checkpoint("llama", **TINY)
    out = convert(ckpt_dir, tmp_path / "store")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["version"] = 999
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="version 999.*tierkv convert"):
        WeightStore.open(out)


def test_manifest_writes_no_unread_field_and_reads_older_ones(make_checkpoint, tmp_path):
    """Each extent's entry holds only what the reader uses; a store from an earlier tierkv, whose
    entries also carry "scheme": "plain", still opens and loads, and convert reuses it as is."""
    _, ckpt_dir = make_checkpoint("llama", **TINY)
    out = convert(ckpt_dir, tmp_path / "store")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    fields = {"offset", "nbytes", "padded_nbytes", "crc32", "tensors"}
    assert all(set(e) == fields for e in manifest["extents"].values()), manifest["extents"]["layer.0"].keys()
    for e in manifest["extents"].values():
        e["scheme"] = "plain"
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    store = WeightStore.open(out)
    try:
        _assert_store_matches(store, ckpt_dir, torch.float32)
    finally:
        store.close()
    data = out / DATA_FILE
    before = (data.stat().st_ino, data.stat().st_mtime_ns)
    lines: list[str] = []
    convert(ckpt_dir, out, report=lines.append)
    assert (data.stat().st_ino, data.stat().st_mtime_ns) == before, lines


def test_unwritable_offload_dir_fails_before_work(make_checkpoint, tmp_path):
    _, ckpt_dir = make_checkpoint("llama", **TINY)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot write to the directory.*tierkv convert MODEL OTHER_DIR"):
        convert(ckpt_dir, blocker / "store")
    with pytest.raises(StoreError, match="cannot write"):
        cached_store(ckpt_dir, blocker)


def test_full_offload_dir_fails_before_work(make_checkpoint, tmp_path, monkeypatch):
    _, ckpt_dir = make_checkpoint("llama", **TINY)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 1000))
    out = tmp_path / "store"
    with pytest.raises(StoreError, match=r"free but needs.*tierkv convert MODEL OTHER_DIR"):
        convert(ckpt_dir, out)
    assert not any(p.name.startswith("weights") for p in out.iterdir()), "nothing may be written"
    with pytest.raises(StoreError, match="free but needs"):
        check_offload_dir(tmp_path / "other", need_bytes=1 << 20)


def test_cached_store_converts_once_and_follows_changes(make_checkpoint, tmp_path, monkeypatch):
    _, ckpt_dir = make_checkpoint("llama", **TINY)
    offload = tmp_path / "offload"
    runs = []
    real_convert = convert_mod.convert
    monkeypatch.setattr(convert_mod, "convert", lambda *a, **k: runs.append(1) or real_convert(*a, **k))
    first = cached_store(ckpt_dir, offload)
    assert cached_store(ckpt_dir, offload) == first and len(runs) == 1
    bf16 = cached_store(ckpt_dir, offload, dtype="bfloat16")
    assert bf16 != first and WeightStore.open(bf16).dtype == torch.bfloat16 and len(runs) == 2
    key = store_key(ckpt_dir)
    st = (ckpt_dir / "model.safetensors").stat()
    os.utime(ckpt_dir / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert store_key(ckpt_dir) != key
    changed = cached_store(ckpt_dir, offload)
    assert changed != first and len(runs) == 3
    with open(WeightStore.open(changed).data_path, "r+b") as f:    # a damaged cache is rebuilt
        f.truncate(4096)
    assert cached_store(ckpt_dir, offload) == changed and len(runs) == 4
    WeightStore.open(changed)
