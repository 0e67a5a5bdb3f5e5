"""Lazy safetensors Checkpoint: sharded == single file, and broken checkpoints fail up front, clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tierkv
from tierkv.config import SUPPORTED_ARCHITECTURES, ConfigError
from tierkv.io.checkpoint import Checkpoint, CheckpointError, resolve_dtype, safetensors_header

torch.set_num_threads(1)

SHARDED = {"max_shard_size": "20KB"}


@pytest.fixture(scope="module")
def single_and_sharded(tmp_path_factory) -> tuple[Path, Path]:
    """The same tiny Llama saved as one file and as many 20 KB shards with an index."""
    from conftest import build_hf_model, save_hf_model

    model = build_hf_model("llama", seed=3)
    root = tmp_path_factory.mktemp("ckpt")
    return save_hf_model(model, root / "single"), save_hf_model(model, root / "sharded", **SHARDED)


def copy_of(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def test_sharded_checkpoint_reads_the_same_tensors(single_and_sharded) -> None:
    single, sharded = single_and_sharded
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    with Checkpoint(single) as a, Checkpoint(sharded) as b:
        assert len(b.files()) > 3 and a.files() == [single / "model.safetensors"]
        names_a = [n for n, _ in a.iter_tensors()]
        assert names_a == [n for n, _ in b.iter_tensors()]
        for (na, ta), (nb, tb) in zip(a.iter_tensors(), b.iter_tensors()):
            assert na == nb and torch.equal(ta, tb)
        assert set(b.layer(1)) == set(a.config.layer_tensor_shapes())
        assert set(b.globals()) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


def test_sharded_checkpoint_generates_the_same_tokens(single_and_sharded) -> None:
    single, sharded = single_and_sharded
    ids = [3, 14, 15, 92, 65]
    with tierkv.load(single, device="cpu") as a, tierkv.load(sharded, device="cpu") as b:
        assert torch.equal(a.logits(ids), b.logits(ids))
        assert a.generate(ids, max_new_tokens=8).token_ids == b.generate(ids, max_new_tokens=8).token_ids


def test_tensor_read_with_cast(single_and_sharded) -> None:
    with Checkpoint(single_and_sharded[1]) as ckpt:
        t = ckpt.tensor("model.norm.weight", dtype=torch.bfloat16)
        assert t.dtype == torch.bfloat16 and t.shape == (64,)
        with pytest.raises(KeyError, match="not.a.tensor"):
            ckpt.tensor("not.a.tensor")


def test_tied_checkpoint_has_no_head(make_checkpoint) -> None:
    _, path = make_checkpoint("qwen2", tie_word_embeddings=True)
    with Checkpoint(path) as ckpt:
        assert "lm_head.weight" not in ckpt.globals()


# -- broken inputs ---------------------------------------------------------------------------------
def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a directory"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="nope"):
        tierkv.load(tmp_path / "nope")


def test_missing_config_json(single_and_sharded, tmp_path: Path) -> None:
    path = copy_of(single_and_sharded[0], tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json not found.*Hugging Face model directory"):
        tierkv.load(path)


def test_unsupported_architecture(single_and_sharded, tmp_path: Path) -> None:
    path = copy_of(single_and_sharded[0], tmp_path)
    raw = json.loads((path / "config.json").read_text())
    raw.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as info:
        tierkv.load(path)
    msg = str(info.value)
    assert "GPT2LMHeadModel" in msg and "not supported" in msg and str(path / "config.json") in msg
    assert all(arch in msg for arch in SUPPORTED_ARCHITECTURES)


def test_shard_listed_in_index_but_missing(single_and_sharded, tmp_path: Path) -> None:
    path = copy_of(single_and_sharded[1], tmp_path)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError) as info:
        tierkv.load(path)
    msg = str(info.value)
    assert victim.name in msg and "model.safetensors.index.json" in msg and "download it again" in msg


def test_index_without_weight_map(single_and_sharded, tmp_path: Path) -> None:
    path = copy_of(single_and_sharded[1], tmp_path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        Checkpoint(path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 100, 4], ids=["half", "last-byte", "in-header", "tiny"])
def test_truncated_safetensors_file(single_and_sharded, tmp_path: Path, keep: float) -> None:
    path = copy_of(single_and_sharded[0], tmp_path)
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(CheckpointError) as info:
        tierkv.load(path)
    msg = str(info.value)
    assert str(f) in msg and "truncated or corrupt" in msg and "download it again" in msg


def test_truncated_shard(single_and_sharded, tmp_path: Path) -> None:
    path = copy_of(single_and_sharded[1], tmp_path)
    victim = sorted(path.glob("model-*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-16])
    with pytest.raises(CheckpointError, match=victim.name):
        Checkpoint(path)


def test_wrong_shape_from_edited_config(single_and_sharded, tmp_path: Path) -> None:
    path = copy_of(single_and_sharded[0], tmp_path)
    raw = json.loads((path / "config.json").read_text())
    raw["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as info:
        tierkv.load(path)
    msg = str(info.value)
    assert "mlp.gate_proj.weight" in msg and "[96, 64]" in msg and "[128, 64]" in msg and "config.json" in msg


def test_missing_tensor(single_and_sharded, tmp_path: Path) -> None:
    path = copy_of(single_and_sharded[0], tmp_path)
    f = path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        Checkpoint(path)


def test_no_safetensors_files(single_and_sharded, tmp_path: Path) -> None:
    path = copy_of(single_and_sharded[0], tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        Checkpoint(path)
    shards = copy_of(single_and_sharded[1], tmp_path / "x")
    (shards / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"found model-00001-of-\d+\.safetensors"):
        Checkpoint(shards)


def test_resolve_dtype() -> None:
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(None, default="bfloat16") is torch.bfloat16
    assert resolve_dtype("auto") is torch.float32
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        resolve_dtype("int8")


def test_safetensors_header_reads_only_the_header(tmp_path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}, str(path))
    header = json.loads(safetensors_header(path))
    assert header["a"]["shape"] == [3, 4] and header["b"]["dtype"] == "BF16"
    data = path.read_bytes()
    for cut in (3, 8 + 5):                                     # inside the length, inside the JSON
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="ends inside its safetensors header"):
            safetensors_header(tmp_path / "cut.safetensors")
