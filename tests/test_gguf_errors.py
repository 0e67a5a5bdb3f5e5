"""Bad GGUF inputs are refused with the file and the reason named, before anything is written, and
nothing already in a store directory is lost."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import gguf_util as gu
import tierkv
from tierkv.errors import TierkvError
from tierkv.io.convert import convert
from tierkv.io.gguf import GGUFCheckpoint, GGUFError
from tierkv.io.store import MANIFEST_FILE, WeightStore


@pytest.fixture()
def good(tmp_path):
    (tmp_path / "src").mkdir()
    return gu.write_gguf(gu.tiny_hf_model("llama"), tmp_path / "src" / "m.gguf", "Q8_0")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a model" * 10)
    with pytest.raises(GGUFError, match=r"x\.gguf is not a GGUF file \(it starts with b'PK"):
        GGUFCheckpoint(path)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file(good, keep):
    data = good.read_bytes()
    good.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(GGUFError, match=r"m\.gguf (is truncated|cannot be read as GGUF).*download it again"):
        GGUFCheckpoint(good)


def test_unsupported_architecture(tmp_path):
    path = gu.write_gguf(gu.tiny_hf_model("llama"), tmp_path / "m.gguf", "F32", arch_name="gpt2")
    with pytest.raises(GGUFError, match=r"m\.gguf holds a 'gpt2' model \(general\.architecture\); tierkv runs GGUF "
                                        r"files of the llama, qwen2, qwen3 architectures"):
        tierkv.load(path, device="cpu", offload_dir=tmp_path / "off")


@pytest.mark.parametrize("key", ["llama.context_length", "llama.attention.layer_norm_rms_epsilon",
                                 "llama.feed_forward_length"])
def test_missing_metadata_key_is_named(tmp_path, key):
    path = gu.write_gguf(gu.tiny_hf_model("llama"), tmp_path / "m.gguf", "F32", skip_keys=(key,))
    with pytest.raises(GGUFError, match=f"m.gguf: the required metadata key {key} is missing"):
        GGUFCheckpoint(path)


def test_unsupported_rope_scaling_is_named(tmp_path):
    path = gu.write_gguf(gu.tiny_hf_model("llama"), tmp_path / "m.gguf", "F32",
                         extra={"llama.rope.scaling.type": ("string", "yarn"),
                                "llama.rope.scaling.factor": ("float32", 4.0)})
    with pytest.raises(GGUFError, match="llama.rope.scaling.type='yarn' is not supported"):
        GGUFCheckpoint(path)


def test_unsupported_tensor_type_is_named(tmp_path):
    path = gu.write_gguf(gu.tiny_hf_model("llama"), tmp_path / "m.gguf", "F64")
    with pytest.raises(GGUFError, match=r"tensor token_embd\.weight in m\.gguf has GGML type F64, which tierkv does "
                                        r"not read"):
        GGUFCheckpoint(path)


def test_a_split_set_with_a_part_missing(tmp_path):
    first = gu.write_gguf(gu.tiny_hf_model("llama"), tmp_path / "m.gguf", "F32", split_max_tensors=8)
    (tmp_path / "m-00002-of-00003.gguf").unlink()
    for given in (first, tmp_path):
        with pytest.raises(GGUFError, match=r"the split GGUF set m has 3 parts but m-00002-of-00003\.gguf is missing"):
            GGUFCheckpoint(given)


def test_a_directory_with_two_models_asks_for_the_file(tmp_path):
    model = gu.tiny_hf_model("llama")
    gu.write_gguf(model, tmp_path / "a.gguf", "F32")
    gu.write_gguf(model, tmp_path / "b.gguf", "F16")
    with pytest.raises(GGUFError, match="holds 2 GGUF models .*pass the .gguf file to use"):
        GGUFCheckpoint(tmp_path)


def test_a_refused_file_leaves_an_existing_store_as_it_was(good, tmp_path):
    out = convert(good, tmp_path / "store")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad = tmp_path / "bad" / "m.gguf"
    bad.parent.mkdir()
    bad.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(GGUFError):
        convert(bad, out)
    other = gu.write_gguf(gu.tiny_hf_model("qwen2"), tmp_path / "bad" / "other.gguf", "F32")
    with pytest.raises(TierkvError, match="holds the weight store of another checkpoint"):
        convert(other, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert WeightStore.open(out).source_dir == str(good.resolve())
    assert json.loads((out / MANIFEST_FILE).read_text())["source_format"] == "gguf"


def test_tierkv_imports_without_gguf_and_says_how_to_get_it(good):
    code = ("import sys; sys.modules['gguf'] = None\n"
            "import tierkv, tierkv.cli\n"
            "from tierkv.io.gguf import GGUFCheckpoint, GGUFError\n"
            f"try:\n    GGUFCheckpoint({str(good)!r})\nexcept GGUFError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'gguf>=0.10' 'transformers>=5.24'" in out      # works without tierkv on a registry
    assert "pip install -e '.[gguf]'" in out


def test_nonfinite_weights_are_refused_naming_the_tensor(tmp_path):
    model = gu.tiny_hf_model("llama")
    with __import__("torch").no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    path = gu.write_gguf(model, tmp_path / "m.gguf", "F32")
    named = r"model\.layers\.1\.mlp\.up_proj\.weight \(blk\.1\.ffn_up\.weight in .*m\.gguf\)"
    with pytest.raises(GGUFError, match=named):
        convert(path, tmp_path / "store")
    assert not (tmp_path / "store" / MANIFEST_FILE).exists()
    assert np.isnan(gu.dequantized(path, "blk.1.ffn_up.weight")).sum() == 1
