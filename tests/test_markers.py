"""Which tests the default run selects: `gpu` tests run wherever CUDA is and are skipped, with the
reason, elsewhere; `slow` tests are left out unless asked for (`-m slow`, as .ci/run does).

Why this file exists: a `-m` expression in pyproject.toml's addopts once deselected the `gpu`
tests everywhere, so they never ran even on a GPU machine and nothing noticed.
"""

from __future__ import annotations

import pytest
import torch
from _pytest.mark.expression import Expression   # what pytest's own `-m` evaluates

import conftest


def _selects(expression: str, markers: set[str]) -> bool:
    return Expression.compile(expression).evaluate(lambda name, **_: name in markers)


def test_default_selection_keeps_gpu_tests_and_leaves_out_slow_ones(pytestconfig: pytest.Config) -> None:
    addopts = pytestconfig.getini("addopts")
    default = addopts[addopts.index("-m") + 1] if "-m" in addopts else ""
    assert default, f"pyproject.toml's addopts no longer leaves out slow tests: {addopts}"
    assert _selects(default, {"gpu"}) and _selects(default, set())
    assert not _selects(default, {"slow"}) and not _selects(default, {"slow", "gpu"})
    assert _selects("slow", {"slow"}) and not _selects("slow", {"gpu"}) and not _selects("slow", set())


class _Item:
    def __init__(self, *markers: str) -> None:
        self.keywords = {name: True for name in markers}
        self.added: list[pytest.MarkDecorator] = []

    def add_marker(self, marker: pytest.MarkDecorator) -> None:
        self.added.append(marker)


@pytest.mark.parametrize("cuda", [False, True])
def test_gpu_tests_are_skipped_with_a_reason_only_without_cuda(monkeypatch: pytest.MonkeyPatch, cuda: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    gpu, plain = _Item("gpu"), _Item()
    conftest.pytest_collection_modifyitems(None, [gpu, plain])  # type: ignore[arg-type, list-item]
    assert plain.added == []
    if cuda:
        assert gpu.added == []
    else:
        (skip,) = gpu.added
        assert skip.name == "skip" and "needs a CUDA device" in skip.kwargs["reason"]
