"""The house rules that keep the package navigable: no import circle between tierkv's modules,
no module much over 600 lines, no class over 300 (checked on the source, without importing it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tierkv"
MAX_FILE_LINES = 620
MAX_CLASS_LINES = 300


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Module-level imports of tierkv modules (lazy imports inside functions do not make a circle)."""
    found = set()
    for node in tree.body:
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in known:
                found.add(name)
    return found


def test_no_import_circle() -> None:
    modules = _modules()
    graph = {m: _imports(tree, set(modules)) - {m} for m, tree in modules.items()}
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for nxt in sorted(graph[m]):
            assert state.get(nxt) != "open", "import circle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_modules_and_classes_stay_small() -> None:
    big_files, big_classes = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            big_files.append((path.name, text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                big_classes.append((path.name, node.name, node.end_lineno - node.lineno + 1))
    assert not big_files and not big_classes, (big_files, big_classes)
