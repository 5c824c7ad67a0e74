"""The package's shape: no import cycle between layerif modules, and no library module importing the commands or
the command line, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import layerif

ROOT = Path(layerif.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    """The absolute name of a relative import ``from .{level}target``."""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the layerif modules it imports anywhere in its source (top level or inside a function)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module) if node.level else (node.module or "")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                # the deepest layerif module the name refers to, and every package above it (importing
                # layerif.commands.base runs layerif/commands/__init__.py first) -- except the packages
                # that hold the importing module itself, which are running already
                while name and name not in files:
                    name = name.rpartition(".")[0]
                while name and name != "layerif":
                    if name != mod and not mod.startswith(name + "."):
                        graph[mod].add(name)
                    name = name.rpartition(".")[0]
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert "layerif.scores" in graph and graph["layerif.scores"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


ENTRY_POINTS = {"layerif.cli", "layerif.__main__"}
"""The modules above the commands: the command line and ``python -m layerif``."""


def layering_violations(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """{library module: the command modules or entry points it imports}; a library module is one outside
    ``layerif.commands`` and :data:`ENTRY_POINTS`."""
    def above(name: str) -> bool:
        return name in ENTRY_POINTS or name == "layerif.commands" or name.startswith("layerif.commands.")

    out = {m: sorted(n for n in deps if above(n)) for m, deps in graph.items() if not above(m)}
    return {m: names for m, names in out.items() if names}


def test_the_checker_finds_a_library_module_importing_a_command():
    graph = {"layerif.report": {"layerif.commands.base", "layerif.commands", "layerif.io"},
             "layerif.commands.score": {"layerif.report"}, "layerif.cli": {"layerif.commands.score"},
             "layerif.io": {"layerif.cli"}}
    assert layering_violations(graph) == {"layerif.report": ["layerif.commands", "layerif.commands.base"],
                                          "layerif.io": ["layerif.cli"]}


def test_library_modules_do_not_import_the_commands():
    graph = import_graph()
    assert graph["layerif.cli"] and "layerif.command_registry" in graph
    assert layering_violations(graph) == {}
