"""Resident CPU weights on huge pages: ``aligned_host_tensor`` asks for them, ``into_huge_pages`` moves a
layer's tensors there keeping their values, views and sharing; a resident engine does it and closes its
checkpoint's file mappings."""

from __future__ import annotations

from pathlib import Path

import os

import pytest
import torch

import tierkv
from tierkv.io.buffers import HUGE_PAGE_BYTES, aligned_host_tensor, into_huge_pages, page_out_file_pages


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text.split("[")[1].split("]")[0]


def _anon_huge_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="transparent huge pages are off here")
def test_large_aligned_buffers_get_huge_pages() -> None:
    before = _anon_huge_kb()
    buf = aligned_host_tensor(64 << 20)
    buf.fill_(1)                                            # fault the pages in
    assert _anon_huge_kb() - before >= 32 << 10, "at least half of a 64 MiB buffer on huge pages"
    assert buf.data_ptr() % 4096 == 0 and int(buf[-1]) == 1


def test_into_huge_pages_keeps_values_views_and_sharing() -> None:
    torch.manual_seed(0)
    fused = torch.randn(3 * 512, 1024).bfloat16()           # (3N, K) like a fused q/k/v
    raw = torch.randn(1024 * 1024 + 4).bfloat16()
    odd = raw[4:].view(1024, 1024)                           # an 8-byte offset, as in a safetensors buffer
    tied = torch.randn(2048, 1024).bfloat16()
    layer = {"qkv": fused, "q": fused[:512], "k": fused[512:1024], "odd": odd, "embed": tied, "head": tied,
             "t": odd.t(), "norm": torch.ones(1024).bfloat16(), "not_a_tensor": 3, "empty": torch.empty(0)}
    want = {k: v.clone() for k, v in layer.items() if isinstance(v, torch.Tensor)}
    out = into_huge_pages(dict(layer))
    for key, value in want.items():
        assert torch.equal(out[key], value) and out[key].stride() == value.stride(), key
    assert out["not_a_tensor"] == 3
    assert out["q"].untyped_storage().data_ptr() == out["qkv"].untyped_storage().data_ptr()
    assert out["head"].data_ptr() == out["embed"].data_ptr()
    assert out["t"].data_ptr() == out["odd"].data_ptr()
    assert out["qkv"].data_ptr() != fused.data_ptr()
    for key in ("qkv", "odd", "embed", "norm"):
        assert out[key].data_ptr() % 64 == 0, key           # every storage's bytes start on a cache line
    out["q"][0, 0] = 7.0                                    # still a view of the fused weight
    assert out["qkv"][0, 0] == 7.0 and torch.equal(fused, want["qkv"])   # the original is untouched


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        got = tuple(int(p) for p in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return got >= (major, minor)


@pytest.mark.skipif(not Path("/proc/self/status").exists() or not _kernel_at_least(5, 4),
                    reason="MADV_PAGEOUT needs Linux 5.4")
def test_page_out_drops_read_file_pages_keeps_their_bytes_and_leaves_anonymous_memory(tmp_path: Path) -> None:
    data = os.urandom(32 << 20)
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    mapped = torch.from_file(str(path), shared=False, size=len(data), dtype=torch.uint8)
    anon = torch.full((8 << 20,), 7, dtype=torch.uint8)
    assert int(mapped[:: 4096].sum()) >= 0                  # read every page once
    before = _rss_kb("RssFile")
    page_out_file_pages([(mapped.data_ptr(), mapped.data_ptr() + mapped.numel()),
                         (anon.data_ptr(), anon.data_ptr() + anon.numel())])
    assert before - _rss_kb("RssFile") >= 16 << 10, "most of the 32 MiB left RSS"
    assert mapped.numpy().tobytes() == data                 # faulted back in from the file
    assert bool((anon == 7).all())


def test_small_layers_are_left_where_they_are() -> None:
    small = {"w": torch.randn(64, 64)}
    assert small["w"].numel() * 4 < HUGE_PAGE_BYTES
    assert into_huge_pages(small)["w"] is small["w"]


def test_resident_cpu_engine_owns_its_weights_after_load(tmp_path: Path) -> None:
    """The checkpoint's file is no longer mapped once a resident CPU engine holds copies; it generates as
    before (the same greedy tokens as a second engine in fp32)."""
    from conftest import build_hf_model, save_hf_model

    model = build_hf_model("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    path = save_hf_model(model, tmp_path / "m")
    with tierkv.load(path, dtype="float32") as engine:
        maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
        assert str(path / "model.safetensors") not in maps
        got = engine.generate([5, 6, 7], max_new_tokens=5, temperature=0).token_ids
    ids = torch.tensor([[5, 6, 7]])
    want = model.generate(ids, max_new_tokens=5, do_sample=False)[0, 3:].tolist()
    assert got == want
