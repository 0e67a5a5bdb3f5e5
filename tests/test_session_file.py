"""The session file format (tierkv/session_file.py): round trips, and every damaged or foreign
file refused with a message that says what happened and what to do."""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

import tierkv
from conftest import build_hf_model, save_hf_model
from tierkv.config import ModelConfig
from tierkv.session_file import (FOOTER_MAGIC, FORMAT_VERSION, MAGIC, SessionError, SessionHeader, SessionReader,
                                 default_session_path, model_fingerprint, read_header, write_session)

LAYERS, HKV, D = 3, 2, 8


KV = list[tuple[torch.Tensor, torch.Tensor]]        # (k, v) per layer, each (1, Hkv, T, D)


def make_kv(layers: int, hkv: int, tokens: int, d: int, dtype: torch.dtype, seed: int = 0) -> KV:
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(1, hkv, tokens, d, generator=g).to(dtype) for _ in "kv") for _ in range(layers)]


def header_for(kv_tokens: int, dtype: str = "float32", layers: int = LAYERS, hkv: int = HKV, d: int = D,
               fingerprint: str = "0123456789abcdef", history: int | None = None) -> SessionHeader:
    history = kv_tokens + 1 if history is None else history
    return SessionHeader(fingerprint=fingerprint, model="tiny-llama", dtype=dtype, num_layers=layers,
                         num_kv_heads=hkv, head_dim=d, token_ids=tuple(range(5, 5 + history)), kv_tokens=kv_tokens,
                         geometry={"chunk_tokens": [16] * layers, "mode": "exact"})


def reader_of(kv: KV, calls: list[tuple[int, int, int]] | None = None):
    def read_kv(layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if calls is not None:
            calls.append((layer, start, end))
        k, v = kv[layer]
        return k[:, :, start:end], v[:, :, start:end]
    return read_kv


def read_back(path: Path, **kwargs) -> tuple[SessionHeader, KV, list[tuple[int, int]]]:
    """The whole file through SessionReader, as a caller restoring a cache would feed it."""
    with SessionReader(path, **kwargs) as reader:
        ranges, parts = [], [([], []) for _ in range(reader.header.num_layers)]
        for start, end, layers in reader.pieces():
            ranges.append((start, end))
            for j, (k, v) in enumerate(layers):
                parts[j][0].append(k)
                parts[j][1].append(v)
        kv = [(torch.cat(ks, dim=2), torch.cat(vs, dim=2)) if ks else None for ks, vs in parts]
        return reader.header, kv, ranges


def saved(tmp_path: Path, kv_tokens: int = 37, dtype: torch.dtype = torch.float32, piece_bytes: int = 1024,
          name: str = "s.tkvs") -> tuple[Path, SessionHeader, list]:
    kv = make_kv(LAYERS, HKV, kv_tokens, D, dtype)
    header = header_for(kv_tokens, str(dtype).removeprefix("torch."))
    return write_session(tmp_path / name, header, reader_of(kv), piece_bytes=piece_bytes), header, kv


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv,layers", [(2, 3), (4, 1), (1, 5)])
@pytest.mark.parametrize("piece_bytes", [1, 700, 4096, 1 << 30])
def test_round_trip(tmp_path, dtype, hkv, layers, piece_bytes) -> None:
    tokens = 29
    kv = make_kv(layers, hkv, tokens, D, dtype, seed=hkv)
    header = header_for(tokens, str(dtype).removeprefix("torch."), layers=layers, hkv=hkv)
    calls: list[tuple[int, int, int]] = []
    path = write_session(tmp_path / "sub" / "conv.tkvs", header, reader_of(kv, calls), piece_bytes=piece_bytes)
    assert path == tmp_path / "sub" / "conv.tkvs" and os.listdir(path.parent) == ["conv.tkvs"]

    got_header, got_kv, ranges = read_back(path, expect_fingerprint=header.fingerprint)
    assert got_header == header and got_header.token_ids == header.token_ids
    for (k, v), (gk, gv) in zip(kv, got_kv):
        assert gk.dtype == dtype and gk.shape == (1, hkv, tokens, D)
        assert torch.equal(gk, k) and torch.equal(gv, v)
    # pieces tile [0, T) in order; each holds at most piece_bytes of KV (at least one position)
    assert ranges[0][0] == 0 and ranges[-1][1] == tokens and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    per_token = header.kv_bytes_per_token
    assert all((e - s) * per_token <= max(piece_bytes, per_token) for s, e in ranges)
    if piece_bytes == 1:
        assert len(ranges) == tokens                            # one position a piece at least
    elif piece_bytes == 1 << 30:
        assert len(ranges) == 1
    # the writer asked for each layer of each piece once, piece by piece
    assert calls == [(j, s, e) for s, e in ranges for j in range(layers)]


def test_an_empty_kv_round_trips(tmp_path) -> None:
    header = header_for(0, history=1)
    path = write_session(tmp_path / "s.tkvs", header, reader_of([]))
    got, kv, ranges = read_back(path)
    assert got == header and ranges == [] and kv == [None] * LAYERS


def test_pieces_can_be_read_twice_and_are_fresh(tmp_path) -> None:
    path, _, kv = saved(tmp_path)
    with SessionReader(path) as reader:
        first = [layers[0][0] for _, _, layers in reader.pieces()]
        first[0].zero_()                                        # the caller owns what it was given
        second = [layers[0][0] for _, _, layers in reader.pieces()]
    assert torch.equal(torch.cat(second, dim=2), kv[0][0]) and not torch.equal(first[0], second[0])


def test_read_header_and_header_fields(tmp_path) -> None:
    path, header, _ = saved(tmp_path)
    got = read_header(path)
    assert got == header and got.format_version == FORMAT_VERSION and got.tierkv_version == tierkv.__version__
    assert got.geometry == {"chunk_tokens": [16] * LAYERS, "mode": "exact"}
    assert got.kv_bytes_per_token == 2 * LAYERS * HKV * D * 4


def test_default_session_path(tmp_path) -> None:
    path = default_session_path(tmp_path, "abc123")
    assert path == tmp_path / "sessions" / "abc123.tkvs"
    saved_path, header, _ = saved(path.parent, name=path.name)          # the sessions folder is made on save
    assert saved_path == path and read_header(path) == header


def test_a_header_that_cannot_be_true_is_a_bug() -> None:
    with pytest.raises(AssertionError, match="kv_tokens"):
        header_for(10, history=5)
    with pytest.raises(AssertionError, match="dtype"):
        header_for(3, dtype="int8")


# -- damaged files --------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["in the marker", "in the prefix", "in the header", "in a piece",
                                   "before the footer", "last byte"])
def test_a_truncated_file_is_refused(tmp_path, where) -> None:
    path, _, _ = saved(tmp_path)
    data = path.read_bytes()
    header_len = struct.unpack_from("<I", data, len(MAGIC) + 4)[0]
    cut = {"in the marker": 5, "in the prefix": len(MAGIC) + 3, "in the header": len(MAGIC) + 8 + header_len // 2,
           "in a piece": len(data) // 2, "before the footer": len(data) - len(FOOTER_MAGIC) - 8,
           "last byte": len(data) - 1}[where]
    path.write_bytes(data[:cut])
    with pytest.raises(SessionError, match="truncated") as info:
        SessionReader(path)
    message = str(info.value)
    assert f"({cut} of " in message and "the save was interrupted" in message and "start a new session" in message
    if where in ("in a piece", "before the footer", "last byte"):
        assert f"({cut} of {len(data)} bytes)" in message             # the exact length is known from the header


@pytest.mark.parametrize("where,fragment", [("header", "header fails its checksum"),
                                            ("piece start", "positions 0..8 fails its checksum"),
                                            ("payload", "fails its checksum"),
                                            ("last payload byte", "fails its checksum"),
                                            ("footer", "footer is damaged")])
def test_a_flipped_byte_is_refused(tmp_path, where, fragment) -> None:
    path, header, _ = saved(tmp_path, piece_bytes=header_for(1).kv_bytes_per_token * 8)    # 8 positions a piece
    data = bytearray(path.read_bytes())
    header_len = struct.unpack_from("<I", data, len(MAGIC) + 4)[0]
    data_start = len(MAGIC) + 8 + header_len + 4
    at = {"header": len(MAGIC) + 8 + 10, "piece start": data_start, "payload": data_start + 16 + 100,
          "last payload byte": len(data) - len(FOOTER_MAGIC) - 8 - 5, "footer": len(data) - 3}[where]
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(SessionError, match=fragment) as info:
        read_back(path)
    assert "damaged" in str(info.value) and "start a new session" in str(info.value)


def test_garbage_and_empty_files_are_not_sessions(tmp_path) -> None:
    garbage = tmp_path / "garbage.tkvs"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(SessionError, match="is not a tierkv session file"):
        SessionReader(garbage)
    text = tmp_path / "notes.tkvs"
    text.write_text("{\"session\": 1}\n")
    with pytest.raises(SessionError, match="is not a tierkv session file"):
        SessionReader(text)
    empty = tmp_path / "empty.tkvs"
    empty.write_bytes(b"")
    with pytest.raises(SessionError, match="is empty, not a tierkv session file"):
        SessionReader(empty)


def test_a_missing_file_is_named(tmp_path) -> None:
    with pytest.raises(SessionError, match="no session file at .*nothing.tkvs"):
        SessionReader(tmp_path / "nothing.tkvs")


def test_a_newer_format_version_is_refused(tmp_path) -> None:
    path, _, _ = saved(tmp_path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, len(MAGIC), FORMAT_VERSION + 1)
    path.write_bytes(bytes(data))
    with pytest.raises(SessionError, match=f"newer tierkv \\(session format version {FORMAT_VERSION + 1}.*upgrade"):
        SessionReader(path)


def test_trailing_bytes_are_refused(tmp_path) -> None:
    path, _, _ = saved(tmp_path)
    with open(path, "ab") as f:
        f.write(b"x" * 10)
    with pytest.raises(SessionError, match="damaged: it has .* bytes but its header accounts for"):
        SessionReader(path)


def test_a_session_of_another_model_is_refused_naming_both(tmp_path) -> None:
    path, header, _ = saved(tmp_path)
    with pytest.raises(SessionError) as info:
        SessionReader(path, expect_fingerprint="fedcba9876543210", expect_model="other-model",
                      expect_dtype=torch.bfloat16)
    message = str(info.value)
    assert "saved with model tiny-llama (float32, fingerprint 0123456789abcdef)" in message
    assert "this engine runs other-model (bfloat16, fingerprint fedcba9876543210)" in message
    assert "load tiny-llama with dtype float32 to restore it, or start a new session" in message
    assert isinstance(info.value, tierkv.TierkvError)


# -- crash safety ---------------------------------------------------------------------------------
def test_a_write_that_fails_midway_keeps_the_earlier_file(tmp_path) -> None:
    path, header, kv = saved(tmp_path, piece_bytes=256)
    before = path.read_bytes()

    def failing(layer: int, start: int, end: int):
        if start >= 16:
            raise RuntimeError("device lost")
        return reader_of(make_kv(LAYERS, HKV, 37, D, torch.float32, seed=9))(layer, start, end)

    with pytest.raises(RuntimeError, match="device lost"):
        write_session(path, header, failing, piece_bytes=256)
    assert os.listdir(tmp_path) == [path.name] and path.read_bytes() == before
    got, got_kv, _ = read_back(path)
    assert got == header and torch.equal(got_kv[1][1], kv[1][1])


def test_a_failing_fsync_keeps_the_earlier_file(tmp_path, monkeypatch) -> None:
    """A full disk or I/O error at the end (here: fsync) leaves the old file and no temporary file."""
    path, header, kv = saved(tmp_path)
    before = path.read_bytes()

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        write_session(path, header_for(37, fingerprint="aaaaaaaaaaaaaaaa"), reader_of(kv))
    assert os.listdir(tmp_path) == [path.name] and path.read_bytes() == before


def test_a_new_save_replaces_the_old_one(tmp_path) -> None:
    path, _, _ = saved(tmp_path, kv_tokens=37)
    kv = make_kv(LAYERS, HKV, 50, D, torch.float32, seed=5)
    write_session(path, header_for(50), reader_of(kv))
    got, got_kv, _ = read_back(path)
    assert got.kv_tokens == 50 and torch.equal(got_kv[2][0], kv[2][0]) and os.listdir(tmp_path) == [path.name]


# -- model fingerprint ----------------------------------------------------------------------------
def test_fingerprint_is_stable_and_names_model_and_dtype(tiny_llama_dir, tmp_path) -> None:
    cfg = ModelConfig.from_dir(tiny_llama_dir)
    fp = model_fingerprint(tiny_llama_dir, cfg, "float32")
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert model_fingerprint(tiny_llama_dir, cfg, torch.float32) == fp              # stable; dtype spelled either way
    assert model_fingerprint(tiny_llama_dir, cfg, "bfloat16") != fp                 # another compute dtype
    assert model_fingerprint(tiny_llama_dir, dataclasses.replace(cfg, rms_norm_eps=cfg.rms_norm_eps * 2),
                             "float32") != fp                                      # another config
    copy = shutil.copytree(tiny_llama_dir, tmp_path / "copied-elsewhere")           # new mtimes, same model
    assert model_fingerprint(copy, ModelConfig.from_dir(copy), "float32") == fp


def test_fingerprint_tells_apart_weights_of_the_same_shapes(tiny_llama_dir, tmp_path) -> None:
    """Two fine-tunes of one base have the same tensor names, shapes and file sizes."""
    other = save_hf_model(build_hf_model("llama", seed=1), tmp_path / "same-shapes")
    cfg = ModelConfig.from_dir(tiny_llama_dir)
    assert ModelConfig.from_dir(other) == cfg
    assert {p.name: p.stat().st_size for p in other.glob("*.safetensors")} == \
        {p.name: p.stat().st_size for p in tiny_llama_dir.glob("*.safetensors")}
    assert model_fingerprint(other, cfg, "float32") != model_fingerprint(tiny_llama_dir, cfg, "float32")


@pytest.mark.gpu
def test_kv_on_the_device_round_trips(tmp_path) -> None:
    """read_kv may hand out device tensors (a tiered cache's device slots); they come back on the CPU."""
    kv = [(k.cuda(), v.cuda()) for k, v in make_kv(LAYERS, HKV, 40, D, torch.bfloat16)]
    header = header_for(40, "bfloat16")
    path = write_session(tmp_path / "s.tkvs", header, reader_of(kv), piece_bytes=2048)
    _, got, _ = read_back(path)
    for (k, v), (gk, gv) in zip(kv, got):
        assert gk.device.type == "cpu" and torch.equal(gk.cuda(), k) and torch.equal(gv.cuda(), v)
