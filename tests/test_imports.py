"""The package's import graph, read from the source (every import statement, those inside
functions included): no circles, so following a path from `load()` only goes down; and no
module imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "fastinternlm"
ROOT = "fastinternlm"


def _modules() -> Dict[str, Path]:
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = [ROOT, *file.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = file
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph():
    """{module: {imported package modules}}, and [(module, imported module, private name)]."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    private: List[tuple] = []
    for module, file in modules.items():
        is_package = file.name == "__init__.py"
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        graph[module].add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_package, node)
                if not target.startswith(ROOT):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub == f"{ROOT}._C":  # the compiled extension: imports nothing of ours
                        continue
                    if sub in modules:  # `from . import ops`: the submodule itself
                        graph[module].add(sub)
                    elif target in modules:
                        graph[module].add(target)
                        if alias.name.startswith("_") and alias.name != "_C":
                            private.append((module, target, alias.name))
    return graph, private


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module, or a module importing itself."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_circle():
    # The check can fail: a two-module loop and a three-module circle are found.
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph, _ = import_graph()
    assert "fastinternlm.weights.hf" in graph and "fastinternlm.llm" in graph["fastinternlm.weights"]
    assert cycles(graph) == []


def test_config_stands_alone():
    """config.py parses a config without the compiled extension or any other module."""
    graph, _ = import_graph()
    assert graph["fastinternlm.config"] == set()


def test_no_private_names_imported_across_modules():
    _, private = import_graph()
    assert private == []
