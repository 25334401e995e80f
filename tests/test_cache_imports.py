"""The cache package's import graph: no circle, and no import hidden inside a function.

Read from the source with `ast` (not by importing), so a lazy import cannot hide an arrow."""
from __future__ import annotations

import ast
from pathlib import Path

import spot_fast.cache

PACKAGE = Path(spot_fast.cache.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def arrows(source: str) -> tuple[set[str], list[int]]:
    """(cache modules this one imports, line numbers of spot_fast imports inside functions)."""
    tree = ast.parse(source)
    out, lazy = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spot_fast"):
            names = [node.module + "." + a.name for a in node.names] + [node.module]
            out |= {n.split(".")[2] for n in names if n.startswith("spot_fast.cache.") and n.split(".")[2] in MODULES}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("spot_fast.cache.")}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lazy += [n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))
                     and (getattr(n, "module", None) or n.names[0].name).startswith("spot_fast")]
    return out, lazy


def graph() -> dict[str, set[str]]:
    return {m: arrows((PACKAGE / f"{m}.py").read_text())[0] - {m} for m in MODULES}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                return path + [m, n]
            if n not in state and (c := visit(n, path + [m])):
                return c
        state[m] = 2
        return None
    for m in g:
        if m not in state and (c := visit(m, [])):
            return c
    return None


def test_cache_modules_import_without_a_circle():
    g = graph()
    assert "cache" in g["splits"] or "build" in g["splits"]            # the graph is really read
    assert find_cycle(g) is None, find_cycle(g)


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_readers_stand_below_the_cache_object():
    g = graph()
    for reader in ("train_reader", "eval_reader", "wds_reader"):
        assert "cache" not in g[reader], reader
        assert reader in g["cache"]


def test_no_spot_fast_import_is_hidden_in_a_function():
    for m in MODULES:
        _, lazy = arrows((PACKAGE / f"{m}.py").read_text())
        assert not lazy, f"{m}.py lines {lazy}"
