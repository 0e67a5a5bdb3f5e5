"""Shared fixtures: tiny random Hugging Face checkpoints built at test time (transformers is the oracle)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run on CPU tensors through Triton's interpreter

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread avoids oversubscribing the 2-core CI machine

ARCH_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=211, max_position_embeddings=256)


def build_hf_model(arch: str = "llama", seed: int = 0, std: float = 0.15, **overrides: Any):
    """A random HF model (eval mode, fp32) with weights drawn wide enough to give peaked logits."""
    import transformers

    cfg_name, model_name = ARCH_CLASSES[arch]
    cfg = getattr(transformers, cfg_name)(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def save_hf_model(model, path: Path, dtype: torch.dtype | None = None, **save_kwargs: Any) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    return path


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., tuple[Any, Path]]:
    """make_checkpoint(arch, **config_overrides) -> (hf_model, directory)."""
    counter = iter(range(1000))

    def _make(arch: str = "llama", seed: int = 0, dtype: torch.dtype | None = None,
              save_kwargs: dict[str, Any] | None = None, **overrides: Any):
        model = build_hf_model(arch, seed=seed, **overrides)
        path = save_hf_model(model, tmp_path / f"{arch}-{next(counter)}", dtype, **(save_kwargs or {}))
        return model, path

    return _make


@pytest.fixture
def torch_kernels_one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tiny tensors: one thread, and the torch references of the kernels (the Triton interpreter is slow)."""
    monkeypatch.setenv("TIERKV_KERNELS", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Every supported architecture with the feature that sets it apart switched on (for tests that must
# hold on all of them: ragged batches, concurrent streams, sessions), each with a 128-token context
# (so a tiered cache's index at the full context leaves less device room than a 70-token prompt).
# "llama-dynamic-rope" stretches its 32-position RoPE (x4) once a sequence passes 32 tokens, so the
# sequences of one batch are scaled differently.
ARCH_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {"max_position_embeddings": 128}),
    "llama-dynamic-rope": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0},
                                     "max_position_embeddings": 32}),
    "mistral-window": ("mistral", {"sliding_window": 40, "max_position_embeddings": 128}),
    "qwen2-bias": ("qwen2", {"max_position_embeddings": 128}),                 # q/k/v projections with biases
    "qwen3-qknorm": ("qwen3", {"head_dim": 32, "max_position_embeddings": 128}),  # RMS norm on q and k per head
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_model_dir(variant, **config_overrides) -> a saved fp32 checkpoint of an ``ARCH_VARIANTS``
    entry, built once per session for each distinct set of arguments (seed 0 unless overridden)."""
    built: dict[str, Path] = {}

    def _dir(variant: str, seed: int = 0, **overrides: Any) -> Path:
        key = repr((variant, seed, sorted(overrides.items())))
        if key not in built:
            arch, base = ARCH_VARIANTS[variant]
            model = build_hf_model(arch, seed=seed, **{**base, **overrides})
            built[key] = save_hf_model(model, tmp_path_factory.mktemp(f"{variant}-{len(built)}"))
        return built[key]

    return _dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shared tiny Llama checkpoint (fp32) for tests that only need some model."""
    return save_hf_model(build_hf_model("llama"), tmp_path_factory.mktemp("tiny-llama"))


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu`-marked tests are skipped, with the reason, where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


