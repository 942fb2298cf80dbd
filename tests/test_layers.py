"""The layers, checked over the source (no import runs): every module's imports of the project's modules, function-local
ones included (`if TYPE_CHECKING:` blocks excepted: they never run), go down the layers below, and no module
reaches itself through them (no cycle).

    serve, bench, train                      (top)
    export, kernels                          (plug-ins: backends, the ONNX export, Triton kernels)
    engine:  cli, backends, api              (front ends: load, Engine and the torch loader)
             scheduler, core, policy, lifecycle, passes, magnet, musicgen, longform, hybrid, rescore, request, graph,
             results                         (decoding and serving one request or many)
             model, codec, text, bert, sampling, masking, ops, loading, audio, config   (the model and the codec)

import-linter was not used: it resolves modules through the installed package, and `magnet_engine`'s folders are
reached only through a `__path__` that magnet_engine/__init__.py extends at run time (README, "Layout").
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = [("serve", "bench", "train"), ("export", "kernels"), ("engine",)]
ENGINE = [
    ("cli", "backends", "api"),
    ("scheduler", "core", "policy", "lifecycle", "passes", "magnet", "musicgen", "longform", "hybrid", "rescore",
     "request", "graph", "results"),
    ("model", "codec", "text", "bert", "sampling", "masking", "ops", "loading", "audio", "config"),
]


def modules() -> dict[str, Path]:
    """'engine.api' -> engine/api.py, for every module of the layered folders."""
    return {f"{folder}.{p.stem}": p for group in TOP for folder in group
            for p in sorted((ROOT / folder).glob("*.py"))}


MODULES = modules()


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, package: str) -> list[tuple[str, int]]:
    """(dotted name, line) of every import in `tree`, at any depth, outside `if TYPE_CHECKING:` blocks; relative
    imports resolved against `package` (a top-level folder)."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(x for x in (package if node.level == 1 else "", node.module) if x)
            found.append((base, node.lineno))
            found.extend((f"{base}.{a.name}", node.lineno) for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _resolve(name: str) -> str | None:
    """A dotted import -> the project module it loads ('magnet_engine.engine.api.Engine' -> 'engine.api')."""
    parts = name.removeprefix("magnet_engine.").split(".")
    key = ".".join(parts[:2])
    return key if key in MODULES else None


def graph() -> dict[str, dict[str, int]]:
    """module -> {imported project module: first line}."""
    out: dict[str, dict[str, int]] = {}
    for name, path in MODULES.items():
        deps: dict[str, int] = {}
        for target, line in _imports(ast.parse(path.read_text(), str(path)), name.split(".")[0]):
            dep = _resolve(target)
            if dep is not None and dep != name:
                deps.setdefault(dep, line)
        out[name] = deps
    return out


def rank(module: str) -> tuple[int, int]:
    """(folder layer, engine layer): lower numbers are higher layers."""
    folder, stem = module.split(".")
    top = next(i for i, group in enumerate(TOP) if folder in group)
    if folder != "engine":
        return top, 0
    inner = [i for i, group in enumerate(ENGINE) if stem in group]
    assert inner, f"engine/{stem}.py is in no layer: add it to ENGINE in tests/test_layers.py"
    return top, inner[0]


def test_every_engine_module_has_a_layer():
    for module in MODULES:
        rank(module)


def test_imports_go_down_the_layers():
    bad = [f"{m} (line {line}) imports {dep}, a layer above it" for m, deps in graph().items()
           for dep, line in deps.items() if rank(dep) < rank(m)]
    assert not bad, "\n".join(bad)


def cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


@pytest.mark.parametrize("source, want", [
    ("from .a import b\n", {"engine.a"}),
    ("def f():\n    from magnet_engine.engine import a\n", {"engine.a"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import b\n", set()),
    ("import magnet_engine.export.ort\n", {"export.ort"}),
])
def test_the_checker_sees_function_local_imports_and_skips_typing_only_ones(source, want, monkeypatch):
    monkeypatch.setitem(MODULES, "engine.a", ROOT / "engine" / "a.py")
    got = {d for t, _ in _imports(ast.parse(source), "engine") if (d := _resolve(t))}
    assert got == want


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
