"""The house's layering, read from the source with ``ast`` (function-local imports included, nothing imported).

Layers, lowest first; a module may import from its own layer and the ones below, never from a higher one:
  0  rl, tools, models, config, errors                      (math, sandbox, model loading, config schemas)
  1  data, rollout, rewards, methods                        (records and prompts, generation, rewards, method parts)
  2  modules, pipelines, eval, callbacks, logging           (LightningModules, data pipelines, benchmarks)
  3  entry points: tirl.train, tirl.evaluate, tirl.export, src/*.py
No module imports itself back through a chain of imports (a cycle), and no package of a layer imports another
package of its layer that imports it back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = {
    **dict.fromkeys(("rl", "tools", "models", "config", "errors"), 0),
    **dict.fromkeys(("data", "rollout", "rewards", "methods"), 1),
    **dict.fromkeys(("modules", "pipelines", "benchmarks", "callbacks", "logging"), 2),
    **dict.fromkeys(("train", "evaluate", "export"), 3),
}
ENTRY_POINT = 3


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The tirl module an imported name lives in (``tirl.a.b`` for ``from tirl.a import b`` when b is a module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(tirl module imported, line) for every import statement in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                 for stmt in block.body for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if id(node) in type_only:     # ``if TYPE_CHECKING:`` imports never run
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "tirl" or name.startswith("tirl."):
                target = resolve(name)
                if target is not None:
                    out.append((target, node.lineno))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def layer_of(module: str) -> int | None:
    """The layer of a tirl module; src/*.py scripts are entry points; None for the ``tirl`` package itself."""
    parts = module.split(".")
    if parts[0] != "tirl":
        return ENTRY_POINT
    return LAYERS[parts[1]] if len(parts) > 1 else None


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "tirl" else module


GRAPH = {m: imports_of(p) for m, p in MODULES.items()}


def test_every_tirl_package_has_a_layer():
    unplaced = sorted({m.split(".")[1] for m in MODULES if m.startswith("tirl.")} - set(LAYERS))
    assert not unplaced, f"add {unplaced} to LAYERS in tests/test_layering.py (and the README's Layout)"


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for module, imports in GRAPH.items():
        own = layer_of(module)
        for target, line in imports:
            theirs = layer_of(target)
            if own is not None and theirs is not None and theirs > own:
                upward.append(f"{MODULES[module].relative_to(SRC)}:{line} imports {target} "
                              f"(layer {theirs}) from layer {own}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}     # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_modules():
    graph = {m: {t for t, _ in imports if t != m} for m, imports in GRAPH.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for module, imports in GRAPH.items():
        for target, _ in imports:
            a, b = package_of(module), package_of(target)
            if a != b and b != "tirl":
                graph.setdefault(a, set()).add(b)
    cycle = find_cycle(graph)
    assert cycle is None, "packages import each other: " + " -> ".join(cycle)


@pytest.mark.parametrize("source,expected", [
    ("from tirl.modules.grpo import GRPOModule\n", [("tirl.modules.grpo", 1)]),
    ("def f():\n    from tirl.rollout import backend\n", [("tirl.rollout.backend", 2)]),
    ("import tirl.rl.core as core\n", [("tirl.rl.core", 1)]),
    ("import os\nfrom typing import Any\n", []),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tirl.config.schema import X\n", []),
])
def test_the_import_reader_sees_function_local_and_aliased_imports(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imports_of(path) == expected


def test_an_upward_import_is_reported_with_file_and_line():
    """The checker itself: a layer-0 module importing a layer-2 one is named (file:line and both layers)."""
    assert layer_of("tirl.rl.core") == 0 and layer_of("tirl.modules.grpo") == 2 and layer_of("train") == ENTRY_POINT
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
