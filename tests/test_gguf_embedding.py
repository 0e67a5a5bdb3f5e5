"""A GGUF file's quantized token embedding stays compressed in tierkv's store (issue 13): stored as
uint8 codes + qparams in the plain pack, looked up row by row (``kernels.quant.dequantize_rows``), and
for a tied model also the LM head, as its own copy of the same codes packed for the quantized matmul.
Logits still match HF transformers loading the same file, resident and streamed; 16-bit files keep a
16-bit embedding."""

from __future__ import annotations

import contextlib

import pytest
import torch

import gguf_util as gu
import tierkv
from tierkv.config import Policy
from tierkv.io.convert import convert
from tierkv.io.store import WeightStore
from tierkv.kernels.quant import dequantize_rows, dequantize_weight, quantize_weight
from tierkv.plan import minimum_device_bytes
from tierkv.quantspec import EMBED_WEIGHT, HEAD_WEIGHT, QPARAMS_SUFFIX, QuantWeight, TensorQuant, choose_pack
from tierkv.errors import ArgumentError

PROMPT = [1, 17, 42, 99, 5, 230, 7, 4000]
NEW_TOKENS = 6
REL_BOUND = 1e-5        # Q8_0/Q4_0 blocks are tierkv groups bit-exactly: in float32 only sum order differs
SCHEME = {"Q8_0": "int8", "Q4_0": "int4"}


@pytest.mark.parametrize("scheme, group", [("int4", 32), ("int8", 32), ("int8", 0)])
def test_a_row_lookup_equals_dequantize_then_index(scheme, group):
    torch.manual_seed(0)
    w = torch.randn(40, 64)
    qw = QuantWeight(*quantize_weight(w, TensorQuant(scheme, group, "plain")), TensorQuant(scheme, group, "plain"))
    ids = torch.tensor([[3, 0, 39, 3], [7, 7, 1, 20]])                       # (B, T), repeats included
    for dtype in (torch.float32, torch.bfloat16):
        rows = dequantize_rows(qw, ids, dtype)
        assert rows.shape == (2, 4, 64) and rows.dtype == dtype
        assert torch.equal(rows, dequantize_weight(qw, dtype, backend="torch")[ids])


def test_a_row_lookup_refuses_a_cpu_pack():
    w = torch.randn(32, 64)
    tq = TensorQuant("int4", 32, "cpu_int4")
    with pytest.raises(ArgumentError, match="plain pack"):
        dequantize_rows(QuantWeight(*quantize_weight(w, tq), tq), torch.tensor([[1]]), torch.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(kind, tied) -> (GGUF path of a tiny llama with every 2-D weight of that type, HF model loaded from it)."""
    root = tmp_path_factory.mktemp("gguf-embed")
    cache: dict[tuple[str, bool], tuple[object, torch.nn.Module]] = {}

    def get(kind: str, tied: bool) -> tuple[object, torch.nn.Module]:
        if (kind, tied) not in cache:
            d = root / f"{kind}-{'tied' if tied else 'untied'}"
            d.mkdir()
            path = gu.write_gguf(gu.tiny_hf_model("llama", tied=tied), d / "m.gguf", kind)
            cache[kind, tied] = path, gu.hf_from_gguf(path)
        return cache[kind, tied]
    return get


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("tied", [False, True])
def test_the_embedding_is_stored_compressed_and_a_tied_head_gets_a_packed_copy(files, kind, tied, tmp_path):
    path, _ = files(kind, tied)
    with contextlib.closing(WeightStore.open(convert(path, tmp_path / "store"))) as store:
        cfg = store.config
        embed = store.extents["embed"].tensors
        entry, qparams = embed[EMBED_WEIGHT], embed[EMBED_WEIGHT + QPARAMS_SUFFIX]
        assert entry.dtype == "uint8" and entry.quant == TensorQuant(SCHEME[kind], 32, "plain")
        assert entry.source_type == kind and qparams.dtype == "float16"
        assert qparams.shape == (cfg.hidden_size // 32, cfg.vocab_size, 2)
        bits = 8 * store.extents["embed"].nbytes / (cfg.vocab_size * cfg.hidden_size)
        assert bits == pytest.approx({"int8": 9.0, "int4": 5.0}[SCHEME[kind]], abs=0.01)   # 16-bit: 16
        head = store.extents["head"].tensors[HEAD_WEIGHT]                       # tied or not, a packed head
        shape = (cfg.vocab_size, cfg.hidden_size)
        assert head.quant == TensorQuant(SCHEME[kind], 32, choose_pack(SCHEME[kind], shape, "cpu", 32))
        assert head.source_type == kind
        assert any("tied LM head is stored twice" in note for note in store.notes) == tied
        loaded = store.load(["embed", "head"])
        table = dequantize_weight(loaded["embed"][EMBED_WEIGHT], torch.float32)
        if tied:                          # the head is the embedding's own codes, in another pack
            assert torch.equal(dequantize_weight(loaded["head"][HEAD_WEIGHT], torch.float32), table)
        want = torch.from_numpy(gu.dequantized(path, "token_embd.weight"))
        assert torch.equal(table, want)                                          # gguf's own dequantization


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_hf_resident_and_streamed(files, kind, tied, tmp_path):
    path, hf = files(kind, tied)
    with torch.no_grad():
        reference = hf(torch.tensor([PROMPT])).logits[0]
    with tierkv.load(path, device="cpu", dtype="float32", offload_dir=tmp_path) as engine:
        assert engine.config.tie_word_embeddings == tied
        assert isinstance(engine.runner.weights.globals()[EMBED_WEIGHT], QuantWeight)
        assert isinstance(engine.runner.weights.globals()[HEAD_WEIGHT], QuantWeight)
        logits = engine.logits(PROMPT)
        assert _rel(logits, reference) < REL_BOUND
        expected = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True).token_ids
        layer_bytes, layout = engine.plan.layer_bytes, list(engine.store.extents.values())
    policy = Policy(dtype="float32", device="cpu", kv="exact", kv_device_tokens=64,
                    weight_quant=engine.store.quant)
    budget = minimum_device_bytes(engine.config, policy, context_tokens=64, layout=layout) + layer_bytes // 2
    with tierkv.load(path, device="cpu", dtype="float32", offload_dir=tmp_path, device_mem=budget, host_mem=0,
                     kv="exact", kv_device_tokens=64) as streamed:
        assert streamed.plan.disk_layers
        assert _rel(streamed.logits(PROMPT), reference) < REL_BOUND
        assert streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, temperature=0,
                                 ignore_eos=True).token_ids == expected


@pytest.mark.parametrize("tied", [False, True])
def test_16_bit_files_keep_a_16_bit_embedding(files, tied, tmp_path):
    path, _ = files("F16", tied)
    with contextlib.closing(WeightStore.open(convert(path, tmp_path / "store"))) as store:
        entry = store.extents["embed"].tensors[EMBED_WEIGHT]
        assert entry.quant is None and entry.dtype == "float16" and len(store.extents["embed"].tensors) == 1
        assert ("head" in store.extents) == (not tied)


def test_a_dequantizing_conversion_keeps_a_16_bit_embedding(files, tmp_path):
    path, _ = files("Q4_0", True)
    with contextlib.closing(WeightStore.open(convert(path, tmp_path / "store", keep_source=False))) as store:
        assert store.extents["embed"].tensors[EMBED_WEIGHT].quant is None and "head" not in store.extents


def test_a_tied_files_head_names_the_embeddings_codes(files):
    from tierkv.io.gguf import GGUFCheckpoint
    tied, untied = GGUFCheckpoint(files("Q4_0", True)[0]), GGUFCheckpoint(files("Q4_0", False)[0])
    assert tied.tied_head() and not untied.tied_head()
    assert tied.source_quants()[HEAD_WEIGHT] == tied.source_quants()[EMBED_WEIGHT] == ("int4", 32)
    assert tied.source_types()[HEAD_WEIGHT] == "Q4_0"
    for a, b in zip(tied.quantized_codes(HEAD_WEIGHT), tied.quantized_codes(EMBED_WEIGHT)):
        assert torch.equal(a, b)
    assert not GGUFCheckpoint(files("F16", True)[0]).tied_head()
