"""Disk layers streamed in pieces (pipeline.pieces, model_pieces): the same tokens as resident weights for
every placement, ring size and micro-batching; the bytes it reads; checksums per piece; a pass cut short;
and the planner's choice of it."""

from __future__ import annotations

import math

import pytest

import tierkv.io.convert as convert_mod
from tierkv.config import Budget, Policy
from tierkv.engine import Engine
from tierkv.io.convert import convert
from tierkv.io.store import DAMAGE_FILE, StoreError, WeightStore
from tierkv.pipeline.pieces import MATRIX_ORDER, PIECE_SLOTS, PieceLayer, block_rows, piece_layout, piece_ring_bytes, \
    small_tensor_bytes
from tierkv.pipeline.weights import StreamingWeights
from tierkv.plan import STREAM_UNIT_VAR, LinkSpeeds, make_plan
from tierkv.plan_sim import simulate_pieces_step_s, simulate_step_s, spread_layers
from tierkv.quantspec import WeightQuant

PROMPTS = [[3, 17, 42, 5, 99, 23, 8], [4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12, 13]]
N_LAYERS = 4
BIG = 64 << 20
PIECE = 4 << 10                      # CRC blocks of 4 KiB: a tiny layer's matrices span many pieces


@pytest.fixture(scope="module")
def small_pieces(tmp_path_factory):
    """(checkpoint, a store with 4 KiB CRC blocks, each prompt's resident tokens)."""
    from conftest import build_hf_model, save_hf_model

    root = tmp_path_factory.mktemp("pieces")
    ckpt = save_hf_model(build_hf_model("llama", num_hidden_layers=N_LAYERS), root / "model")
    patch = pytest.MonkeyPatch()
    patch.setattr(convert_mod, "CRC_BLOCK_BYTES", PIECE)
    try:
        store = WeightStore.open(convert(ckpt, root / "store"))
    finally:
        patch.undo()
    with Engine(ckpt, Policy(device="cpu")) as engine:
        solo = [engine.generate(p, max_new_tokens=8).token_ids for p in PROMPTS]
    return ckpt, store, solo


def _weights(store: WeightStore, device_layers: tuple[int, ...], slots: int) -> StreamingWeights:
    return StreamingWeights(store, "cpu", device_layers, (), 0, BIG, BIG, stream_pieces=slots)


def test_a_store_with_small_crc_blocks_has_matrices_over_many_pieces(small_pieces):
    _, store, _ = small_pieces
    assert store.crc_block_bytes == PIECE
    lp = piece_layout(store.layer(0), 0, PIECE)
    assert lp is not None and lp.count > 10
    spans = [lp.matrices[k] for k in MATRIX_ORDER]
    assert all(m.block_rows * m.row_bytes <= PIECE for m in spans)
    assert any(m.rows > m.block_rows for m in spans)          # a matrix is cut into several row blocks
    assert all(m.block_rows == block_rows(PIECE, m.row_bytes) for m in spans)


def test_block_rows_fill_a_piece_on_a_grid_the_gemm_runs_fast_on() -> None:
    assert block_rows(4 << 20, 2048 * 2) == 1024                # q/k/v/o/gate/up rows of a 2048-wide bf16 model
    assert block_rows(4 << 20, 5632 * 2) == 352                 # down_proj: 372 fit, 352 (11 x 32) is the block
    assert block_rows(4 << 10, 64 * 4) == 16 and block_rows(4 << 10, 48 * 4) == 21   # under 64 rows: all that fit
    assert block_rows(4 << 10, 16 * 4) == 64 and block_rows(4 << 10, 15 * 4) == 64


@pytest.mark.parametrize("slots", [2, 3, PIECE_SLOTS])
@pytest.mark.parametrize("device_layers", [(), (1,), (0, 2)])
def test_pieces_give_the_resident_tokens(small_pieces, device_layers, slots):
    ckpt, store, solo = small_pieces
    with Engine(ckpt, Policy(device="cpu"), weights=_weights(store, device_layers, slots)) as engine:
        out = engine.generate(PROMPTS[0], max_new_tokens=8)
        assert out.token_ids == solo[0]
        stats = out.stats.weights
    n_disk = N_LAYERS - len(device_layers)
    assert stats["layers_disk"] == n_disk
    lp = piece_layout(store.layer(0), 0, PIECE)
    per_pass = n_disk * lp.count * PIECE                     # every matrix byte once per forward, in pieces
    forwards = 8                                             # prefill + 7 decode steps
    read = stats["disk_to_device_bytes"]
    assert forwards * per_pass <= read <= (forwards * per_pass + slots * PIECE)
    assert read < forwards * n_disk * store.layer(0).padded_nbytes + slots * PIECE
    assert stats["wait_s"] > 0.0


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_ragged_batches_and_micro_batches_give_each_sequence_its_solo_tokens(small_pieces, micro):
    ckpt, store, solo = small_pieces
    with Engine(ckpt, Policy(device="cpu", micro_batches=micro), weights=_weights(store, (2,), 3)) as engine:
        assert [o.token_ids for o in engine.generate(PROMPTS, max_new_tokens=8)] == solo


def test_the_ring_and_small_tensors_are_counted_in_the_device_budget(small_pieces):
    _, store, _ = small_pieces
    weights = _weights(store, (0,), 3)
    try:
        used = weights.tiers["device"].used_bytes
        globals_ = sum(e.padded_nbytes for e in store.global_extents())
        small = sum(small_tensor_bytes(store.layer(j), piece_layout(store.layer(j), j, PIECE).small)
                    for j in range(1, N_LAYERS))
        # globals, the resident layer, the ring and the streamed layers' small tensors: no layer slot
        assert used == globals_ + store.layer(0).padded_nbytes + piece_ring_bytes(PIECE, 3) + small
    finally:
        weights.close()
    with pytest.raises(Exception, match="device tier"):
        StreamingWeights(store, "cpu", (0,), (), 0, store.layer(0).padded_nbytes, BIG, stream_pieces=3)


def test_a_pass_cut_short_restarts_the_stream_at_the_next_pass(small_pieces):
    ckpt, store, solo = small_pieces
    weights = _weights(store, (), 2)
    with Engine(ckpt, Policy(device="cpu"), weights=weights) as engine:
        layer = weights.wait(1)                              # a pass that starts at layer 1 and stops mid-matrix
        assert isinstance(layer, PieceLayer)
        next(layer.blocks(MATRIX_ORDER[0]))
        assert engine.generate(PROMPTS[0], max_new_tokens=8).token_ids == solo[0]
        assert engine.generate(PROMPTS[2], max_new_tokens=8).token_ids == solo[2]


def test_a_corrupt_piece_names_the_layer_and_is_recorded(small_pieces, tmp_path):
    ckpt, store, _ = small_pieces
    copy = tmp_path / "store"
    import shutil

    shutil.copytree(store.dir, copy)
    damaged = WeightStore.open(copy)
    lp = piece_layout(damaged.layer(2), 2, PIECE)
    down = lp.matrices[MATRIX_ORDER[-1]]
    with open(damaged.data_path, "r+b") as f:               # a byte of the last matrix: read while streaming
        f.seek(damaged.layer(2).offset + down.offset + 5)
        byte = f.read(1)
        f.seek(damaged.layer(2).offset + down.offset + 5)
        f.write(bytes([byte[0] ^ 0x5A]))
    with Engine(ckpt, Policy(device="cpu"), weights=_weights(damaged, (0,), 3)) as engine:
        with pytest.raises(StoreError, match="checksum mismatch in layer 2"):
            engine.generate(PROMPTS[0], max_new_tokens=4)
    assert (copy / DAMAGE_FILE).is_file()


def test_a_layer_that_cannot_stream_in_pieces_is_refused_with_the_fix(tmp_path):
    from conftest import build_hf_model, save_hf_model

    ckpt = save_hf_model(build_hf_model("llama", num_hidden_layers=2), tmp_path / "model")
    store = WeightStore.open(convert(ckpt, tmp_path / "q", quant=WeightQuant("int8", 32)))
    assert piece_layout(store.layer(0), 0, store.crc_block_bytes) is None
    with pytest.raises(ValueError, match="pass stream_pieces=0, or build the source from a plan"):
        StreamingWeights(store, "cpu", (), (), 0, BIG, BIG, stream_pieces=3)
    plan = make_plan(store.config, Budget(device_mem_bytes=BIG, host_mem_bytes=0, offload_dir=tmp_path / "off"),
                     Policy(device="cpu", weight_quant=WeightQuant("int8", 32), kv_device_tokens=64), CPU_LINKS,
                     context_tokens=64, layout=list(store.extents.values()))
    assert plan.stream_pieces == 0
    StreamingWeights(store, "cpu", (), (), 0, BIG, BIG, stream_pieces=0).close()    # the fix named works
    StreamingWeights.from_plan(store, plan).close()


# -- the planner ---------------------------------------------------------------------------------

CPU_LINKS = LinkSpeeds(disk_read_gbps=2.0, h2d_gbps=math.inf, layer_compute_s=0.006)


def _plan(config, device_mem: str, policy: Policy = Policy(device="cpu")):
    budget = Budget.parse(device_mem=device_mem, host_mem="0", offload_dir="/tmp/tierkv-pieces-test")
    return make_plan(config, budget, policy, CPU_LINKS, context_tokens=1024)


@pytest.fixture(scope="module")
def big_config():
    from tierkv.config import ModelConfig

    return ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                                  "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
                                  "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 4096,
                                  "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16", "tie_word_embeddings": False})


def test_the_planner_streams_in_pieces_on_the_cpu_and_holds_more_layers(big_config, monkeypatch):
    pieces = _plan(big_config, "1GiB")
    assert pieces.stream_pieces == PIECE_SLOTS and pieces.prefetch_depth == 0
    assert pieces.ring_bytes < pieces.layer_bytes
    assert "at a time" in pieces.summary()
    monkeypatch.setenv(STREAM_UNIT_VAR, "layer")
    layers = _plan(big_config, "1GiB")
    assert layers.stream_pieces == 0 and layers.ring_bytes == (layers.prefetch_depth + 1) * layers.layer_bytes
    assert len(pieces.device_layers) > len(layers.device_layers)
    assert pieces.predicted_tok_s > layers.predicted_tok_s


def test_the_planner_keeps_the_layer_ring_where_pieces_do_not_apply(big_config, monkeypatch):
    assert _plan(big_config, "1GiB", Policy(device="cpu", weight_quant=WeightQuant("int8"))).stream_pieces == 0
    assert _plan(big_config, "16GiB").stream_pieces == 0              # nothing streams
    monkeypatch.setenv(STREAM_UNIT_VAR, "piece")
    assert _plan(big_config, "1GiB").stream_pieces == PIECE_SLOTS
    monkeypatch.setenv(STREAM_UNIT_VAR, "sideways")
    with pytest.raises(Exception, match="TIERKV_STREAM_UNIT"):
        _plan(big_config, "1GiB")


def test_an_engine_planned_to_stream_in_pieces_gives_the_resident_tokens(tmp_path, monkeypatch):
    """Through the planner: layers of 13 MiB (four pieces each) on a budget that holds two of them beside the ring."""
    from conftest import build_hf_model, save_hf_model
    from tierkv.config import ModelConfig
    from tierkv.plan import minimum_device_bytes

    ckpt = save_hf_model(build_hf_model("llama", num_hidden_layers=6, hidden_size=512, intermediate_size=1536,
                                        num_attention_heads=8, num_key_value_heads=4, std=0.05), tmp_path / "model")
    with Engine(ckpt, Policy(device="cpu")) as engine:
        solo = engine.generate(PROMPTS[0], max_new_tokens=6).token_ids
    cfg = ModelConfig.from_dir(ckpt)
    policy = Policy(device="cpu", kv_device_tokens=64)
    budget = Budget(device_mem_bytes=minimum_device_bytes(cfg, policy, 64) + piece_ring_bytes(4 << 20),
                    host_mem_bytes=0, offload_dir=tmp_path / "off")
    monkeypatch.setenv(STREAM_UNIT_VAR, "piece")
    with Engine(ckpt, policy, budget=budget) as engine:
        plan = engine.plan
        assert plan is not None and len(plan.disk_layers) >= 2 and plan.stream_pieces == PIECE_SLOTS
        out = engine.generate(PROMPTS[0], max_new_tokens=6)
        assert out.token_ids == solo
        assert out.stats.weights["disk_to_device_bytes"] > 0
    monkeypatch.setenv(STREAM_UNIT_VAR, "piece")                 # where the ring does not fit: the layer ring
    small = Budget(device_mem_bytes=minimum_device_bytes(cfg, policy, 64), host_mem_bytes=0, offload_dir=tmp_path / "off")
    with Engine(ckpt, policy, budget=small) as engine:
        assert engine.plan is not None and engine.plan.stream_pieces == 0 and engine.plan.disk_layers
        assert engine.generate(PROMPTS[0], max_new_tokens=6).token_ids == solo


# -- the timing model ----------------------------------------------------------------------------

def test_the_piece_simulation_is_bound_by_the_disk_or_the_compute():
    layer = 64 << 20
    kinds = spread_layers(16, 8, 0)
    slow_disk = LinkSpeeds(disk_read_gbps=1.0, h2d_gbps=math.inf, layer_compute_s=0.001)
    step = simulate_pieces_step_s(kinds, layer, slow_disk, PIECE_SLOTS, 4 << 20)
    assert 8 * layer / 1e9 - 1e-9 <= step <= 8 * layer / 1e9 + 16 * 0.001
    slow_compute = LinkSpeeds(disk_read_gbps=100.0, h2d_gbps=math.inf, layer_compute_s=0.05)
    step = simulate_pieces_step_s(kinds, layer, slow_compute, PIECE_SLOTS, 4 << 20)
    assert 16 * 0.05 - 1e-9 <= step <= 16 * 0.05 + 8 * layer / 100e9 + 1e-3
    assert simulate_step_s(kinds, 0, layer, slow_disk, False, PIECE_SLOTS) == \
        simulate_pieces_step_s(kinds, layer, slow_disk, PIECE_SLOTS, 4 << 20)
    # a ring too small to read through the resident layers' compute leaves the disk idle meanwhile
    balanced = LinkSpeeds(disk_read_gbps=2.0, h2d_gbps=math.inf, layer_compute_s=0.02)
    assert simulate_pieces_step_s(kinds, layer, balanced, 2, 4 << 20) > \
        simulate_pieces_step_s(kinds, layer, balanced, 16, 4 << 20)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_biases_and_qk_norms_stored_after_the_matrices_are_read_once_and_kept(arch, tmp_path, monkeypatch):
    """Qwen2's q/k/v biases and Qwen3's q/k norms sit after down_proj in the extent: read at construction."""
    from conftest import build_hf_model, save_hf_model

    ckpt = save_hf_model(build_hf_model(arch, num_hidden_layers=3), tmp_path / "model")
    monkeypatch.setattr(convert_mod, "CRC_BLOCK_BYTES", PIECE)
    store = WeightStore.open(convert(ckpt, tmp_path / "store"))
    monkeypatch.undo()
    with Engine(ckpt, Policy(device="cpu")) as engine:
        solo = [engine.generate(p, max_new_tokens=6).token_ids for p in PROMPTS]
    weights = _weights(store, (1,), 3)
    assert weights.pieces is not None and all(weights.pieces.small[j] for j in (0, 2))
    with Engine(ckpt, Policy(device="cpu", micro_batches=2), weights=weights) as engine:
        assert [o.token_ids for o in engine.generate(PROMPTS, max_new_tokens=6)] == solo
