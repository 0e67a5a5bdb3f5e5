"""tierkv running a GGUF file vs HF transformers loading the same file (``from_pretrained(dir,
gguf_file=...)``, which dequantizes every weight to fp32): the same greedy tokens for F32/F16 files,
resident and streamed under a small device budget, and for Q8_0/Q4_0/Q4_1 files kept quantized; logits
within a stated error; stored weights equal to gguf's dequantization."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gguf_util as gu
import tierkv
from tierkv.config import Policy
from tierkv.io.gguf import GGUFCheckpoint
from tierkv.kernels.quant import dequantize_weight
from tierkv.plan import minimum_device_bytes
from tierkv.quantspec import QuantWeight, WeightQuant

PROMPT = [1, 17, 42, 99, 5, 230, 7]
NEW_TOKENS = 8
# relative logit error (||a - b|| / ||b||) vs HF on the same file. Q8_0/Q4_0/Q4_1 blocks become tierkv groups
# bit-exactly (io.gguf_blocks), so in float32 only the order of the sums differs (measured: 0.0 on every model
# here); computing in bfloat16 (a quantized file's default dtype) adds its rounding (measured 0.006-0.009)
REL_BOUND = {"Q8_0": 1e-5, "Q4_0": 1e-5, "Q4_1": 1e-5}
BF16_BOUND = 0.03


def _model(arch: str) -> torch.nn.Module:
    return gu.tiny_hf_model(arch, **({"head_dim": 128} if arch == "qwen3" else {}))   # HF's Qwen3 GGUF head_dim


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(arch, type) -> (GGUF path, HF model loaded from it), written once for the module."""
    root = tmp_path_factory.mktemp("gguf")
    cache: dict[tuple[str, str], tuple[Path, torch.nn.Module]] = {}

    def get(arch: str, kind: str) -> tuple[Path, torch.nn.Module]:
        if (arch, kind) not in cache:
            (root / f"{arch}-{kind}").mkdir()
            path = gu.write_gguf(_model(arch), root / f"{arch}-{kind}" / "m.gguf", kind)
            cache[arch, kind] = path, gu.hf_from_gguf(path)
        return cache[arch, kind]
    return get


def _hf_greedy(hf: torch.nn.Module) -> list[int]:
    out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    return out[0, len(PROMPT):].tolist()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("kind", ["F32", "F16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_16_bit_files_give_hf_tokens_resident_and_streamed(files, arch, kind, tmp_path):
    path, hf = files(arch, kind)
    expected = _hf_greedy(hf)
    with tierkv.load(path, device="cpu", dtype="float32", offload_dir=tmp_path) as engine:
        assert engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, temperature=0).token_ids == expected
        logits = engine.logits(PROMPT)
        assert engine.plan is not None and not engine.plan.disk_layers
        layer_bytes = engine.plan.layer_bytes
    with torch.no_grad():
        assert torch.allclose(logits, hf(torch.tensor([PROMPT])).logits[0], atol=1e-4, rtol=1e-4)
    policy = Policy(dtype="float32", device="cpu", kv="exact", kv_device_tokens=64)
    budget = minimum_device_bytes(engine.config, policy, context_tokens=64) + layer_bytes // 2
    with tierkv.load(path, device="cpu", dtype="float32", offload_dir=tmp_path, device_mem=budget, host_mem=0,
                     kv="exact", kv_device_tokens=64) as streamed:
        assert streamed.plan is not None and streamed.plan.disk_layers
        assert streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, temperature=0).token_ids == expected


@pytest.mark.parametrize("arch, kind", [("llama", "Q8_0"), ("llama", "Q4_0"), ("llama", "Q4_1"), ("qwen2", "Q4_1"),
                                        ("qwen3", "Q4_0")])
def test_quantized_files_stay_quantized_within_the_stated_logit_error(files, arch, kind, tmp_path):
    path, hf = files(arch, kind)
    with torch.no_grad():
        reference = hf(torch.tensor([PROMPT])).logits[0]
    with tierkv.load(path, device="cpu", dtype="float32", offload_dir=tmp_path) as engine:
        scheme = "int8" if kind == "Q8_0" else "int4"
        assert engine.store is not None and engine.store.quant == WeightQuant(scheme, 32, head=True)
        layer = engine.store.load(["layer.0"])["layer.0"]
        q = layer["self_attn.q_proj.weight"]
        assert isinstance(q, QuantWeight) and q.quant.scheme == scheme and q.quant.group_size == 32
        assert engine.store.layer(0).tensors["self_attn.q_proj.weight"].source_type == kind
        assert _rel(engine.logits(PROMPT), reference) < REL_BOUND[kind]
        assert engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, temperature=0).token_ids == _hf_greedy(hf)
        # the stored weight, dequantized, is gguf's own dequantization of the file's blocks (rows in HF order)
        order = GGUFCheckpoint(path).row_order("model.layers.0.self_attn.q_proj.weight")
        want = torch.from_numpy(gu.dequantized(path, "blk.0.attn_q.weight"))
        assert (order is None) == (arch != "llama")                     # llama.cpp permutes llama's q/k rows only
        want = want if order is None else want[order]
        assert torch.equal(dequantize_weight(q, torch.float32), want)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_bf16_default_dtype_of_a_quantized_file_runs_close_to_hf(files, kind, tmp_path):
    path, hf = files("qwen2", kind)
    with tierkv.load(path, device="cpu", offload_dir=tmp_path) as engine, torch.no_grad():
        assert engine.dtype == torch.bfloat16
        assert _rel(engine.logits(PROMPT), hf(torch.tensor([PROMPT])).logits[0]) < BF16_BOUND


@pytest.mark.parametrize("kind", ["F32", "Q4_0"])
def test_text_prompts_use_the_files_tokenizer_like_hf(files, kind, tmp_path):
    """End to end from text: the store's tokenizer (built from the file's metadata) gives HF's GGUF
    tokenizer's ids, and the model then HF's greedy tokens."""
    from transformers import AutoTokenizer
    path, hf = files("llama", kind)
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "def parse(self, source):\n    return the number of tokens"
    ids = hf_tok(text)["input_ids"]
    want = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                       min_new_tokens=NEW_TOKENS)[0, len(ids):].tolist()
    with tierkv.load(path, device="cpu", dtype="float32", offload_dir=tmp_path) as engine:
        assert engine.tokenizer is not None and engine.encode(text) == ids
        out = engine.generate(text, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        assert out.token_ids == want and out.text == hf_tok.decode(want)
