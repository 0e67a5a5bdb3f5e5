"""The embedding left in the store (io.rows): the same tokens, outside the device budget, checked, planned."""

from __future__ import annotations

import pytest
import torch

import tierkv
from tierkv.config import Budget, ModelConfig, Policy
from tierkv.engine import Engine
from tierkv.io.convert import convert
from tierkv.io.rows import MappedEmbedding, lookup_embedding_bytes
from tierkv.io.store import StoreError, WeightStore, plan_layout
from tierkv.pipeline.weights import StreamingWeights
from tierkv.plan import LinkSpeeds, make_plan, minimum_device_bytes
from tierkv.quantspec import EMBED_WEIGHT

PROMPTS = [[3, 17, 42, 5, 99, 23, 8], [7, 7, 150, 1, 2]]
BIG = 64 << 20
LINKS = LinkSpeeds(disk_read_gbps=1.5, h2d_gbps=float("inf"), layer_compute_s=0.001)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    from conftest import build_hf_model, save_hf_model

    root = tmp_path_factory.mktemp("rows")
    ckpt = save_hf_model(build_hf_model("llama", num_hidden_layers=4, vocab_size=1500), root / "model")
    store = WeightStore.open(convert(ckpt, root / "store"))
    reference = Engine(ckpt, Policy(device="cpu")).generate(PROMPTS, max_new_tokens=8)
    return ckpt, store, [r.token_ids for r in reference]


def test_streamed_with_the_table_in_the_store_gives_the_resident_tokens(untied):
    ckpt, store, reference = untied
    for device_layers in [(), (1, 2), (0, 1, 2, 3)]:
        weights = StreamingWeights(store, "cpu", device_layers, (), 1, BIG, BIG, lookup_embedding=True)
        table = weights.globals()[EMBED_WEIGHT]
        assert table.shape == (1500, 64) and weights.tiers["device"].used_bytes < BIG
        with Engine(ckpt, Policy(device="cpu"), weights=weights) as engine:
            assert [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=8)] == reference
        held = StreamingWeights(store, "cpu", device_layers, (), 1, BIG, BIG)
        # the device tier holds everything but the table: exactly its extent less
        assert held.tiers["device"].used_bytes - weights.tiers["device"].used_bytes == store.extents["embed"].padded_nbytes
        assert torch.equal(held.globals()[EMBED_WEIGHT], table)
        held.close()


def test_a_corrupt_table_is_caught_when_it_is_mapped(tmp_path):
    from conftest import build_hf_model, save_hf_model

    ckpt = save_hf_model(build_hf_model("llama", num_hidden_layers=2), tmp_path / "model")
    store = WeightStore.open(convert(ckpt, tmp_path / "store"))
    e = store.extents["embed"]
    with open(store.data_path, "r+b") as f:
        f.seek(e.offset + e.nbytes // 2)
        byte = f.read(1)
        f.seek(e.offset + e.nbytes // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreError, match="checksum mismatch in the embedding"):
        MappedEmbedding(store)
    assert MappedEmbedding(store, verify=False).table.shape == (211, 64)     # unchecked, it maps


def test_only_an_untied_16_bit_table_is_left_in_the_store():
    raw = dict(architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=512, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=3000, max_position_embeddings=512)
    untied = ModelConfig.from_dict(raw)
    tied = ModelConfig.from_dict({**raw, "tie_word_embeddings": True})
    assert lookup_embedding_bytes(plan_layout(untied, torch.float32), False) == 3000 * 256 * 4
    assert lookup_embedding_bytes(plan_layout(tied, torch.float32), True) == 0            # the head reuses it
    # a streamed plan counts the table out of the device budget; the minimum does too
    policy = Policy(device="cpu", prefill_chunk_tokens=64)
    tight = minimum_device_bytes(untied, policy, 256)
    p = make_plan(untied, Budget(device_mem_bytes=tight, host_mem_bytes=0, offload_dir="/tmp/tierkv-rows-test"), policy,
                  LINKS, context_tokens=256)
    assert p.disk_layers and p.embedding_lookup_bytes == 3000 * 256 * 4
    # untied: the head stays, the table does not; tied: the table is the head. Held alike, so the same minimum
    assert minimum_device_bytes(tied, policy, 256) == tight


def test_load_under_a_tight_budget_leaves_the_table_and_matches(untied):
    ckpt, _, reference = untied
    roomy = tierkv.load(ckpt, device="cpu", device_mem="256MiB", host_mem=0, offload_dir=str(ckpt.parent / "off"))
    with roomy:
        assert roomy.plan.embedding_lookup_bytes == 0 and not roomy.plan.disk_layers
    budget = minimum_device_bytes(ModelConfig.from_dir(ckpt), Policy(device="cpu"))
    with tierkv.load(ckpt, device="cpu", device_mem=budget, host_mem=0, offload_dir=str(ckpt.parent / "off")) as e:
        assert e.plan.disk_layers and e.plan.embedding_lookup_bytes > 0
        assert [r.token_ids for r in e.generate(PROMPTS, max_new_tokens=8)] == reference


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_rows_are_gathered_on_the_host_and_copied(untied):
    ckpt, store, _ = untied
    reference = [r.token_ids for r in Engine(ckpt, Policy(device="cuda")).generate(PROMPTS, max_new_tokens=8)]
    for device_layers in [(), (1, 2)]:
        weights = StreamingWeights(store, "cuda", device_layers, (), 1, BIG, BIG, lookup_embedding=True)
        assert weights.globals()[EMBED_WEIGHT].device.type == "cpu"
        with Engine(ckpt, Policy(device="cuda"), weights=weights) as engine:
            assert [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=8)] == reference
