"""docs/ARCHITECTURE.md stays true: every framework.X.Y it names resolves, and the layout holds."""

from __future__ import annotations

import ast
import importlib
import re

from .helpers import ROOT

DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_name_in_the_architecture_page_exists():
    names = set(re.findall(r"`(framework(?:\.\w+)+)`", DOC.read_text()))
    names |= set(re.findall(r"(?<![\w/])(framework(?:\.\w+)+)", DOC.read_text()))
    assert len(names) > 20
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ModuleNotFoundError, AttributeError):
            missing.append(name)
    assert not missing, f"docs/ARCHITECTURE.md names things that do not exist: {missing}"


def test_the_fit_loop_shows_the_five_steps_in_order():
    src = (ROOT / "framework" / "engine.py").read_text()
    start = src.index("    def _fit_loop(")  # (fit() takes the run dir's lock, then runs this)
    fit = src[start : src.index("    def ", start + 10)]
    marks = [
        fit.index(m)
        for m in ("# 1. zero gradients", "# 2. forward", "# 3. loss", "# 4. backward", "# 5. optimizer step")
    ]
    assert marks == sorted(marks)


def test_no_framework_file_imports_a_sibling_in_a_cycle():
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "framework").glob("*.py"):
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            # Only module-level imports form cycles at import time; lazy ones inside functions do not.
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node in tree.body:
                deps |= {node.module} if node.module else {a.name for a in node.names}
        graph[path.stem] = deps

    def visit(node: str, stack: list[str]) -> None:
        assert node not in stack, f"circular import: {' -> '.join([*stack, node])}"
        for dep in graph.get(node, ()):
            visit(dep, [*stack, node])

    for name in graph:
        visit(name, [])
