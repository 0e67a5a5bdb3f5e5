"""Corrupted, NaN and out-of-range weights end in a clear error, never in silent garbage tokens.

Covers: NaN/inf/all-equal logits stop generation with NonFiniteError naming the first bad layer
(resident, tiered-KV and streamed paths, greedy and sampled, prefill and decode), the engine stays
usable after it; float16 overflow is told apart; ``verify=True`` / ``--verify`` and ``tierkv
convert`` name the bad tensor and file; 1000 corrupted bytes in a checkpoint's header or data;
tensor dtypes the config does not imply are refused at load.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tierkv
from conftest import build_hf_model, save_hf_model
from tierkv.cli import app
from tierkv.io import checkpoint as checkpoint_mod
from tierkv.io.checkpoint import Checkpoint, CheckpointError
from tierkv.io.convert import convert
from tierkv.io.store import MANIFEST_FILE
from tierkv.sampling import SamplingParams, logits_healthy, pick
from tokenizer_fixtures import byte_level_bpe, write_tokenizer

torch.set_num_threads(1)

PROMPT = [1, 2, 3]
NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"


def saved_with(tmp: Path, name: str, edit, dtype: torch.dtype | None = None, seed: int = 0) -> Path:
    """The tiny Llama of ``seed`` with ``edit(model)`` applied, saved under ``tmp/name``."""
    model = build_hf_model("llama", seed=seed)
    with torch.no_grad():
        edit(model)
    return save_hf_model(model, tmp / name, dtype)


def _nan_weight(model) -> None:
    model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("nonfinite")
    return {"good": saved_with(tmp, "good", lambda m: None), "nan": saved_with(tmp, "nan", _nan_weight)}


def assert_non_finite(exc: tierkv.NonFiniteError, stage: str, layer: int | None = None) -> None:
    msg = str(exc)
    assert isinstance(exc, RuntimeError) and "\n" not in msg
    assert exc.stage == stage and exc.layer == layer, msg
    assert f"{stage} is the first whose output is not finite" in msg and "--verify" in msg, msg


# -- generation stops on bad logits ------------------------------------------------------------------
@pytest.mark.parametrize("options, sampling", [
    ({}, {}),
    ({}, {"temperature": 0.8, "top_p": 0.9, "seed": 1}),       # multinomial must never see NaN
    ({"kv": "sparse", "chunk_tokens": 4}, {}),                  # tiered KV cache: chunking, importance
])
def test_nan_weight_stops_generation_naming_the_layer(dirs, options, sampling) -> None:
    with tierkv.load(dirs["nan"], **options) as eng:
        prompt = list(range(1, 40)) if options else PROMPT
        for _ in range(2):                                      # the engine stays usable: same clear error
            with pytest.raises(tierkv.NonFiniteError) as info:
                eng.generate(prompt, max_new_tokens=5, **sampling)
            assert_non_finite(info.value, "layer 1", 1)
            assert "the end of prefill" in str(info.value)
        stream = eng.stream(prompt, max_new_tokens=5)
        with pytest.raises(tierkv.NonFiniteError):
            list(stream)
        assert not eng._core.lock.locked()                      # the lock is released after the error
        assert eng.kv_stats()["live_sequences"] == 0            # and the failed sequence's KV is freed


def test_streamed_weights_with_a_nan_layer(dirs, tmp_path, monkeypatch) -> None:
    """Streaming converts first, and conversion refuses the NaN tensor; a store converted before
    convert checked values (simulated) streams the NaN layer from disk and generation stops."""
    from tierkv.config import ModelConfig, Policy
    from tierkv.io.store import plan_layout
    from tierkv.plan import minimum_device_bytes

    cfg = ModelConfig.from_dir(dirs["nan"])
    layer = max(e.padded_nbytes for e in plan_layout(cfg, torch.float32) if e.name.startswith("layer."))
    device_mem = minimum_device_bytes(cfg, Policy(device="cpu")) + layer // 2     # every layer streams
    with pytest.raises(CheckpointError, match=NAN_TENSOR):
        tierkv.load(dirs["nan"], device_mem=device_mem, host_mem="0", offload_dir=tmp_path)
    monkeypatch.setattr(Checkpoint, "check_finite", lambda self, name, tensor: None)
    eng = tierkv.load(dirs["nan"], device_mem=device_mem, host_mem="0", offload_dir=tmp_path)
    monkeypatch.undo()
    with eng:
        assert 1 in eng.plan.disk_layers
        for _ in range(2):
            with pytest.raises(tierkv.NonFiniteError) as info:
                eng.generate(PROMPT, max_new_tokens=4)
            assert_non_finite(info.value, "layer 1", 1)


def test_nan_embedding_row_fails_only_prompts_that_use_it(dirs, tmp_path) -> None:
    bad = saved_with(tmp_path, "emb", lambda m: m.model.embed_tokens.weight[7].fill_(float("nan")))
    with tierkv.load(dirs["good"]) as clean:
        expected = clean.generate([1, 2], max_new_tokens=3).token_ids
    with tierkv.load(bad) as eng:
        with pytest.raises(tierkv.NonFiniteError) as info:
            eng.generate([7, 1], max_new_tokens=1)
        assert_non_finite(info.value, "the embedding")
        assert eng.generate([1, 2], max_new_tokens=3).token_ids == expected    # usable, and right
        with pytest.raises(tierkv.NonFiniteError) as info:
            eng.generate([[1, 2], [7, 1]], max_new_tokens=3)
        assert "prompt 1 of the batch" in str(info.value)


def test_nan_at_a_decode_step_stops_after_the_good_tokens(dirs, tmp_path) -> None:
    """The token generated second has a NaN embedding row: two pieces arrive, then the error."""
    with tierkv.load(dirs["good"]) as clean:
        first, second = clean.generate(PROMPT, max_new_tokens=2).token_ids
    assert second not in PROMPT and second != first
    bad = saved_with(tmp_path, "emb", lambda m: m.model.embed_tokens.weight[second].fill_(float("nan")))
    with tierkv.load(bad) as eng:
        pieces = []
        with pytest.raises(tierkv.NonFiniteError) as info:
            for piece in eng.stream(PROMPT, max_new_tokens=6):
                pieces.append(piece.token_id)
    assert pieces == [first, second] and "decode step 2" in str(info.value)
    assert_non_finite(info.value, "the embedding")


def test_nan_head_row_names_the_head(tmp_path) -> None:
    bad = saved_with(tmp_path, "head", lambda m: m.lm_head.weight[11].fill_(float("nan")))
    with tierkv.load(bad) as eng, pytest.raises(tierkv.NonFiniteError) as info:
        eng.generate(PROMPT, max_new_tokens=3)
    assert_non_finite(info.value, "the final norm or the LM head")


def test_huge_finite_weights_are_not_silent_all_zero_logits(tmp_path) -> None:
    """Finite 1e30 weights overflow the next norm's fp32 variance: the norm returns zeros, every logit
    is 0 and greedy decoding emitted token 0 forever. Now: an error naming the layer."""
    bad = saved_with(tmp_path, "huge", lambda m: m.model.layers[0].self_attn.o_proj.weight[:4].fill_(1e30))
    with tierkv.load(bad) as eng, pytest.raises(tierkv.NonFiniteError) as info:
        eng.generate(PROMPT, max_new_tokens=3)
    assert_non_finite(info.value, "layer 0", 0)
    with pytest.raises(CheckpointError, match="o_proj.weight .* holds .* huge"):
        tierkv.load(bad, verify=True)


def test_float16_overflow_suggests_bfloat16(tmp_path) -> None:
    """Weights fine in every dtype, activations past 65504: float16 fails with the dtype advice, and the
    advice works."""
    ckpt = saved_with(tmp_path, "loud", lambda m: [layer.post_attention_layernorm.weight.fill_(3e3)
                                                   for layer in m.model.layers])
    with tierkv.load(ckpt, dtype="float16", verify=True) as eng, pytest.raises(tierkv.NonFiniteError) as info:
        eng.generate(PROMPT, max_new_tokens=3)
    assert "float16 overflow" in str(info.value) and "--dtype bfloat16" in str(info.value)
    with tierkv.load(ckpt, dtype="bfloat16") as eng:
        assert len(eng.generate(PROMPT, max_new_tokens=3).token_ids) == 3


# -- --verify and convert ------------------------------------------------------------------------
def test_verify_passes_on_a_good_checkpoint_and_names_the_bad_tensor(dirs, monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    with tierkv.load(dirs["good"], verify=True,
                     progress=lambda done, total, phase: phase == "verify" and calls.append((done, total))) as eng:
        assert len(eng.generate(PROMPT, max_new_tokens=2).token_ids) == 2
    total = calls[-1][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert total == sum(Checkpoint(dirs["good"])._nbytes.values())
    monkeypatch.setattr(checkpoint_mod, "_CHECK_CHUNK_ELEMS", 64)     # many row blocks per tensor: still found
    blocks: list[torch.Size] = []
    row_blocks = Checkpoint._row_blocks

    def spy(self, name, start):
        for block in row_blocks(self, name, start):
            blocks.append(block.shape)
            yield block

    monkeypatch.setattr(Checkpoint, "_row_blocks", spy)
    with pytest.raises(CheckpointError) as info:
        tierkv.load(dirs["nan"], verify=True)
    assert len(blocks) > 50 and all(s.numel() <= max(64, s[1:].numel()) for s in blocks)    # bounded reads
    msg = str(info.value)
    assert NAN_TENSOR in msg and str(dirs["nan"] / "model.safetensors") in msg and "1 NaN value" in msg


def test_verify_and_convert_refuse_values_the_dtype_cannot_hold(tmp_path) -> None:
    ckpt = saved_with(tmp_path, "big", lambda m: m.model.layers[0].mlp.up_proj.weight.__setitem__((0, 0), 1e5))
    with pytest.raises(CheckpointError, match=r"up_proj.weight .* overflow float16 .*--dtype bfloat16"):
        tierkv.load(ckpt, dtype="float16", verify=True)
    with pytest.raises(CheckpointError, match=r"up_proj.weight .* overflow float16"):
        convert(ckpt, tmp_path / "store16", dtype="float16")
    tierkv.load(ckpt, dtype="bfloat16", verify=True).close()           # the advice works
    assert (convert(ckpt, tmp_path / "store", dtype="bfloat16") / MANIFEST_FILE).is_file()


def test_convert_refuses_a_nan_tensor_and_converts_once_fixed(dirs, tmp_path) -> None:
    ckpt = Path(shutil.copytree(dirs["nan"], tmp_path / "model"))
    out = tmp_path / "store"
    with pytest.raises(CheckpointError) as info:
        convert(ckpt, out)
    assert NAN_TENSOR in str(info.value) and str(ckpt / "model.safetensors") in str(info.value)
    assert not (out / MANIFEST_FILE).exists()
    shutil.copy(dirs["good"] / "model.safetensors", ckpt / "model.safetensors")   # "download it again"
    assert (convert(ckpt, out) / MANIFEST_FILE).is_file()


# -- 1000 corrupted bytes ---------------------------------------------------------------------------
def _corrupt(src: Path, dst: Path, seed: int, in_header: bool) -> tuple[Path, int]:
    """Copy ``src`` and overwrite 1000 bytes with seeded random bytes, in the header or the tensor data."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    data = bytearray(f.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    rnd = random.Random(seed)
    start = rnd.randrange(0, 8 + header - 100) if in_header else rnd.randrange(8 + header, len(data) - 1000)
    data[start:start + 1000] = bytes(rnd.randrange(256) for _ in range(1000))
    f.write_bytes(bytes(data))
    return dst, start


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_1000_corrupted_data_bytes_end_in_a_clear_error(tmp_path, dtype, seed) -> None:
    """Random bytes read as floats: NaN/inf or values up to 3e38. --verify and convert name the tensor;
    generation without --verify either raises NonFiniteError or, when only unused embedding rows
    were hit, matches the clean model (never different tokens)."""
    src = save_hf_model(build_hf_model("llama"), tmp_path / "src", dtype)
    bad, start = _corrupt(src, tmp_path / "bad", seed, in_header=False)
    with tierkv.load(src) as clean:
        expected = clean.generate(PROMPT, max_new_tokens=8).token_ids
    with pytest.raises(CheckpointError, match=r"tensor \S+ in .*model.safetensors holds"):
        tierkv.load(bad, verify=True)
    with pytest.raises(CheckpointError, match=r"tensor \S+ in .*model.safetensors holds"):
        convert(bad, tmp_path / "store")
    with tierkv.load(bad) as eng:
        try:
            got = eng.generate(PROMPT, max_new_tokens=8).token_ids
        except tierkv.NonFiniteError as exc:
            assert "\n" not in str(exc) and "--verify" in str(exc)
        else:
            assert got == expected, "corruption changed the tokens without an error"


@pytest.mark.parametrize("seed", range(2))
def test_1000_corrupted_header_bytes_end_in_a_clear_error(dirs, tmp_path, seed) -> None:
    bad, _ = _corrupt(dirs["good"], tmp_path / "bad", seed, in_header=True)
    with pytest.raises(CheckpointError, match="cannot be read as safetensors .*download it again"):
        tierkv.load(bad)


# -- tensor dtypes --------------------------------------------------------------------------------
def _with_dtypes(src: Path, dst: Path, cast: dict[str, torch.dtype], config_dtype: str | None = None) -> Path:
    """Copy of ``src`` with the named tensors stored in other dtypes (and config.json's dtype set)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for name, dtype in cast.items():
        tensors[name] = tensors[name].to(dtype)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config_dtype is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["dtype"] = config_dtype
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("dtype, fragment", [
    (torch.int32, "dtype I32, but tierkv reads float32, float16 and bfloat16 weights; this looks like a quantized"),
    (torch.int8, "dtype I8"),
    (torch.uint8, "dtype U8"),
    (torch.float64, "dtype F64, but tierkv reads float32, float16 and bfloat16 weights; re-save the model in float32"),
    (torch.float8_e4m3fn, "FP8 checkpoints are not supported"),
])
def test_non_float_tensor_dtypes_are_refused_at_load(dirs, tmp_path, dtype, fragment) -> None:
    bad = _with_dtypes(dirs["good"], tmp_path / "bad", {"model.layers.0.self_attn.k_proj.weight": dtype})
    with pytest.raises(CheckpointError) as info:
        tierkv.load(bad)
    assert "model.layers.0.self_attn.k_proj.weight in model.safetensors" in str(info.value)
    assert fragment in str(info.value)


def test_half_dtype_mismatch_is_refused_and_the_fix_works(dirs, tmp_path) -> None:
    names = list(load_file(dirs["good"] / "model.safetensors"))
    mixed = _with_dtypes(dirs["good"], tmp_path / "mixed", {**{n: torch.bfloat16 for n in names},
                                                             names[0]: torch.float16}, "bfloat16")
    with pytest.raises(CheckpointError, match=f"tensor {names[0]} .* is float16 but .* declares bfloat16.*"
                                              "download the model again"):
        tierkv.load(mixed)
    all_f16 = _with_dtypes(dirs["good"], tmp_path / "f16", {n: torch.float16 for n in names}, "bfloat16")
    with pytest.raises(CheckpointError, match='set "dtype": "float16" in config.json'):
        tierkv.load(all_f16)
    cfg = json.loads((all_f16 / "config.json").read_text())
    (all_f16 / "config.json").write_text(json.dumps({**cfg, "dtype": "float16"}))
    tierkv.load(all_f16).close()


def test_float_mixes_transformers_loads_are_accepted(dirs, tmp_path) -> None:
    """fp32 norms in a bf16 checkpoint (common in real releases) and half tensors in a declared fp32 one."""
    names = list(load_file(dirs["good"] / "model.safetensors"))
    bf16 = {n: torch.bfloat16 for n in names if "norm" not in n}
    with tierkv.load(_with_dtypes(dirs["good"], tmp_path / "a", bf16, "bfloat16"), verify=True) as eng:
        assert eng.dtype == torch.bfloat16 and len(eng.generate(PROMPT, max_new_tokens=2).token_ids) == 2
    with tierkv.load(_with_dtypes(dirs["good"], tmp_path / "b", {names[1]: torch.float16}, "float32")) as eng:
        assert len(eng.generate(PROMPT, max_new_tokens=2).token_ids) == 2


# -- sampling ---------------------------------------------------------------------------------------
def test_logits_health_and_pick() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [0.0, float("nan"), 1.0], [float("-inf"), 0.0, 1.0],
                           [0.0, 0.0, 0.0]])
    assert logits_healthy(logits).tolist() == [True, False, False, False]
    for params in (SamplingParams(), SamplingParams(temperature=0.9, top_k=2, top_p=0.9)):
        picked = pick(logits, params, torch.Generator().manual_seed(0))
        assert picked.healthy == [True, False, False, False] and picked.ids.tolist() == picked.token_ids
        assert all(0 <= t < 3 for t in picked.token_ids)
    assert pick(logits[:1], SamplingParams(), None).token_ids == [1]


# -- CLI ------------------------------------------------------------------------------------------
runner = CliRunner()


def one_line_error(args: list[str], *fragments: str, input: str | None = None) -> str:
    result = runner.invoke(app, args, input=input)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_cli_nan_weights_run_and_verify(dirs) -> None:
    one_line_error(["run", str(dirs["nan"]), "--prompt-ids", "1,2,3"], "layer 1 is the first", "--verify")
    one_line_error(["run", str(dirs["nan"]), "--prompt-ids", "1,2,3", "--verify"], NAN_TENSOR, "1 NaN value")
    ok = runner.invoke(app, ["run", str(dirs["good"]), "--prompt-ids", "1,2,3", "-n", "2", "--verify", "--json"])
    assert ok.exit_code == 0 and len(json.loads(ok.stdout)["token_ids"]) == 2, ok.output


def test_cli_convert_refuses_a_nan_tensor(dirs, tmp_path) -> None:
    one_line_error(["convert", str(dirs["nan"]), str(tmp_path / "store")], NAN_TENSOR, "download the checkpoint again")


def test_cli_chat_verify_and_nan(tmp_path) -> None:
    tok = byte_level_bpe()
    good = write_tokenizer(save_hf_model(build_hf_model("llama", vocab_size=tok.get_vocab_size(), seed=2),
                                         tmp_path / "good"), tok)
    model = build_hf_model("llama", vocab_size=tok.get_vocab_size(), seed=2)
    with torch.no_grad():
        _nan_weight(model)
    bad = write_tokenizer(save_hf_model(model, tmp_path / "bad"), tok)
    ok = runner.invoke(app, ["chat", str(good), "--verify", "-n", "3"], input="hi\n/exit\n")
    assert ok.exit_code == 0, ok.output
    one_line_error(["chat", str(bad), "-n", "3"], "layer 1 is the first", input="hi\n/exit\n")
    one_line_error(["chat", str(bad), "--verify"], NAN_TENSOR, input="hi\n/exit\n")
