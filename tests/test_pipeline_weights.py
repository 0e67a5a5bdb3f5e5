"""StreamingWeights: same tokens as the resident engine for every placement and depth, within budgets."""

from __future__ import annotations

import pytest
import torch

from tierkv.config import Budget, Policy
from tierkv.engine import Engine
from tierkv.io.convert import convert
from tierkv.io.store import StoreError, WeightStore
from tierkv.io.tiers import TierFullError
from tierkv.pipeline.weights import StreamingWeights
from tierkv.plan import LinkSpeeds, make_plan

PROMPT = [3, 17, 42, 5, 99, 23, 8]
N_LAYERS = 5
BIG = 64 << 20
FIXED_PIECE = Policy(device="cpu", prefill_chunk_tokens=64)   # the reserve does not follow the budget


@pytest.fixture(scope="module")
def model_and_store(tmp_path_factory):
    from conftest import build_hf_model, save_hf_model

    root = tmp_path_factory.mktemp("pipeline")
    ckpt = save_hf_model(build_hf_model("llama", num_hidden_layers=N_LAYERS), root / "model")
    store = WeightStore.open(convert(ckpt, root / "store"))
    reference = Engine(ckpt, Policy(device="cpu")).generate(PROMPT, max_new_tokens=10).token_ids
    return ckpt, store, reference


PLACEMENTS = {
    "all-device": ((0, 1, 2, 3, 4), ()),
    "all-disk": ((), ()),
    "mixed": ((1, 3), (0,)),
    "host-and-disk": ((), (2, 4)),
    "all-host": ((), (0, 1, 2, 3, 4)),
}


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_streamed_tokens_equal_resident(model_and_store, placement, depth):
    ckpt, store, reference = model_and_store
    device_layers, host_layers = PLACEMENTS[placement]
    weights = StreamingWeights(store, "cpu", device_layers, host_layers, depth, BIG, BIG)
    with Engine(ckpt, Policy(device="cpu"), weights=weights) as engine:
        out = engine.generate(PROMPT, max_new_tokens=10)
        assert out.token_ids == reference
        stats = out.stats.weights
    n_disk = N_LAYERS - len(device_layers) - len(host_layers)
    forwards = 10                                     # prefill + 9 decode steps
    layer = store.layer(0).padded_nbytes
    streamed = stats["disk_to_device_bytes"]          # per generation: the one-off load at open is not in it
    assert forwards * n_disk * layer <= streamed <= (forwards * n_disk + depth + 1) * layer
    assert stats["layers_disk"] == n_disk
    # waiting is measured exactly where layers stream (on CPU, host layers are resident: no moves),
    # and it is time spent inside this generation's prefill and decode
    assert (stats["wait_s"] > 0.0) == (n_disk > 0) and stats["wait_s"] == stats.get("disk_to_device_wait_s", 0.0)
    assert 0.0 <= out.stats.io_wait_fraction <= 1.0


def test_while_resident_layers_compute_every_ring_slot_reads(model_and_store):
    _, store, _ = model_and_store
    weights = StreamingWeights(store, "cpu", (0, 1), (), 1, BIG, BIG)     # layers 2, 3, 4 stream; 2 ring slots
    try:
        weights.prefetch(0)                   # resident layer 0: the window's layer 2, and 3 in the free slot
        assert sorted(weights._flights) == [2, 3] and weights.ring.n_free == 0
        weights.wait(2)
        weights.release(2)
        weights.prefetch(4)                   # layer 3 computes next; its successor 4 takes the freed slot
        assert sorted(weights._flights) == [3, 4]
    finally:
        weights.close()


def test_memory_stays_within_budgets(model_and_store):
    ckpt, store, reference = model_and_store
    layer, depth = store.layer(0).padded_nbytes, 2
    globals_bytes = sum(e.padded_nbytes for e in store.global_extents())
    device_budget = globals_bytes + 1 * layer + (depth + 1) * layer
    weights = StreamingWeights(store, "cpu", (2,), (0,), depth, device_budget, layer)
    assert weights.tiers["device"].used_bytes == device_budget
    assert weights.tiers["host"].used_bytes == layer
    with Engine(ckpt, Policy(device="cpu"), weights=weights) as engine:
        assert engine.generate(PROMPT, max_new_tokens=10).token_ids == reference
        assert weights.tiers["device"].used_bytes == device_budget
    with pytest.raises(TierFullError, match="device tier"):
        StreamingWeights(store, "cpu", (2,), (), depth, device_budget - layer, 0)


def test_corruption_is_caught_while_streaming(model_and_store, tmp_path):
    ckpt, _, _ = model_and_store
    store = WeightStore.open(convert(ckpt, tmp_path / "store"))
    e = store.layer(3)
    with open(store.data_path, "r+b") as f:
        f.seek(e.offset + 100)
        f.write(b"\xff\xfe")
    weights = StreamingWeights(store, "cpu", (), (), 1, BIG, 0)
    with Engine(ckpt, Policy(device="cpu"), weights=weights) as engine:
        with pytest.raises(StoreError, match=r"layer 3.*weights\.bin.*tierkv convert"):
            engine.generate(PROMPT, max_new_tokens=2)


def test_plan_drives_streaming_end_to_end(model_and_store, tmp_path):
    ckpt, store, reference = model_and_store
    layer = store.layer(0).padded_nbytes
    globals_bytes = sum(e.padded_nbytes for e in store.global_extents())
    links = LinkSpeeds(disk_read_gbps=1.5, h2d_gbps=float("inf"), layer_compute_s=1e-4)
    probe = make_plan(store.config, Budget(device_mem_bytes=1 << 30, host_mem_bytes=0, offload_dir=tmp_path),
                      FIXED_PIECE, links, context_tokens=64)
    budget = Budget(device_mem_bytes=probe.reserve_bytes + globals_bytes + 3 * layer, host_mem_bytes=layer,
                    offload_dir=tmp_path)
    plan = make_plan(store.config, budget, FIXED_PIECE, links, context_tokens=64)
    assert plan.disk_layers and len(plan.device_layers) + len(plan.host_layers) + len(plan.disk_layers) == N_LAYERS
    weights = StreamingWeights.from_plan(store, plan)
    with Engine(ckpt, Policy(device="cpu"), weights=weights) as engine:
        assert engine.generate(PROMPT, max_new_tokens=10).token_ids == reference


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_streamed_tokens_equal_resident_cuda(model_and_store, depth):
    ckpt, store, _ = model_and_store
    reference = Engine(ckpt, Policy(device="cuda")).generate(PROMPT, max_new_tokens=10).token_ids
    for device_layers, host_layers in PLACEMENTS.values():
        weights = StreamingWeights(store, "cuda", device_layers, host_layers, depth, BIG, BIG)
        assert weights.tiers["host"].pinned
        with Engine(ckpt, Policy(device="cuda"), weights=weights) as engine:
            out = engine.generate(PROMPT, max_new_tokens=10)
            assert out.token_ids == reference, (device_layers, host_layers, depth)
            assert out.stats.weights.get("host_to_device_gbps", 1.0) > 0


def test_open_weight_source_converts_only_when_needed(model_and_store, tmp_path):
    from tierkv.loader import open_weight_source

    ckpt, store, reference = model_and_store
    links = LinkSpeeds(disk_read_gbps=1.5, h2d_gbps=float("inf"), layer_compute_s=1e-4)
    roomy = Budget(device_mem_bytes=1 << 30, host_mem_bytes=0, offload_dir=tmp_path / "offload")
    source, plan = open_weight_source(ckpt, store.config, roomy, FIXED_PIECE, links=links, context_tokens=64)
    assert source is None and len(plan.device_layers) == N_LAYERS and not (tmp_path / "offload").exists()
    layer = store.layer(0).padded_nbytes
    globals_bytes = sum(e.padded_nbytes for e in store.global_extents())
    tight = Budget(device_mem_bytes=plan.reserve_bytes + globals_bytes + 2 * layer, host_mem_bytes=0,
                   offload_dir=tmp_path / "offload")
    source, plan = open_weight_source(ckpt, store.config, tight, FIXED_PIECE, links=links, context_tokens=64)
    assert source is not None and plan.disk_layers and (tmp_path / "offload" / "stores").is_dir()
    with Engine(ckpt, Policy(device="cpu"), weights=source) as engine:
        assert engine.generate(PROMPT, max_new_tokens=10).token_ids == reference


class _FailingRead:
    """Stands in for a prefetch's read record whose wait() raises ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def wait(self) -> None:
        raise self.exc


@pytest.mark.parametrize("exc, escapes", [(StoreError("checksum mismatch"), False), (OSError(5, "EIO"), False),
                                          (RuntimeError("a bug"), True)])
def test_close_swallows_only_read_failures_and_always_releases(model_and_store, exc, escapes):
    """close() waits for in-flight reads: a failed read (corrupt extent, I/O error) was already raised to
    the layer loop or belongs to an unconsumed prefetch, so close ignores it; anything else is a bug and
    propagates. Either way the buffers and the reader are released."""
    _, store, _ = model_and_store
    weights = StreamingWeights(store, "cpu", (), (), 1, BIG, 0)
    weights.prefetch(2)
    real = weights._flights[2].read
    real.wait()
    weights._flights[2].read = _FailingRead(exc)
    if escapes:
        with pytest.raises(type(exc)):
            weights.close()
    else:
        weights.close()
    assert not weights._flights and not weights._globals
    assert weights.tiers["disk"].reader._closed
