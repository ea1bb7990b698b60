"""``make check``: the import rules of docs/internals.md (Architecture), and no import cycles.

Each module of ``stagetx`` belongs to one *unit*: a package (``child``, ``lua``, one
``stages.<type>`` ...) or a top-level module. A unit may import itself and the units ``RULES``
lists for it; imports under ``if TYPE_CHECKING:`` are for type hints only and not counted. The
modules' top-level imports must form no cycle. Prints one line per broken rule; exit status 1.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

CORE = {
    "address",
    "codec",
    "message",
    "wire",
    "linkqueue",
    "unixport",
    "locks",
    "ratelog",
    "bounded",
    "shared",
    "reactors",
}
STAGE_TYPES = {"stages.index", "stages.curl", "stages.route", "stages.ticket", "stages.lua"}

#: unit -> the units it may import (besides itself). Keep in step with docs/internals.md.
RULES: dict[str, set[str]] = {
    **{name: CORE for name in CORE},
    "config": CORE | {"lua", "stages"},
    "logsetup": CORE | {"config"},
    "lua": CORE | {"config"},
    "broker": CORE | {"config", "lua"},
    "stages": CORE,
    "stages.index": CORE | {"stages"},
    "stages.curl": CORE | {"stages"},
    "stages.route": CORE | {"stages"},
    "stages.ticket": CORE | {"stages"},
    "stages.lua": CORE | {"stages", "config", "lua", "broker"},
    "router": CORE | {"cluster"},
    "cluster": CORE | {"config", "router"},
    "child": CORE | {"config", "controllink", "logsetup", "router", "cluster", "stages"} | STAGE_TYPES,
    "controllink": CORE,
    "admin": CORE | {"config", "controllink"},
    "supervisor": CORE | {"config"},
    "client": CORE | {"broker"},
    "tap": CORE | {"config", "lua", "admin", "supervisor"},
}


def unit_of(module: str) -> str:
    """``stagetx.stages.index.store`` -> ``stages.index``; ``stagetx.router`` -> ``router``."""
    parts = module.split(".")[1:]
    if not parts:
        return "stagetx"
    if parts[0] == "stages" and len(parts) > 1 and f"stages.{parts[1]}" in STAGE_TYPES:
        return f"stages.{parts[1]}"
    return parts[0]


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(all run-time imports of stagetx modules, the top-level ones among them)."""
    every: set[str] = set()
    top: set[str] = set()

    def visit(node: ast.AST, at_top: bool) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child, at_top)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name == "stagetx" or name.startswith("stagetx."):
                every.add(name)
                if at_top:
                    top.add(name)
        nested = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, at_top and not nested)

    for statement in tree.body:
        visit(statement, True)
    return every, top


def main(root: Path) -> int:
    files = {}
    for path in sorted((root / "stagetx").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[module] = path
    problems = []
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        every, top = imports(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        unit = unit_of(module)
        allowed = RULES.get(unit)
        if allowed is None and module != "stagetx":
            problems.append(f"{path}: unit {unit!r} has no import rule (tools/check_imports.py, docs/internals.md)")
            allowed = set()
        for name in sorted(name for name in every if name in files):  # not the names imported from them
            target = unit_of(name)
            if target not in (unit, "stagetx") and target not in (allowed or set()):
                problems.append(f"{path}: {unit} may not import {name} ({target})")
        # edges to modules only (``from stagetx.x import name`` also lists ``stagetx.x.name``)
        graph[module] = {name for name in top if name in files and name != module}
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules that import each other at load time."""
    found, state, stack = [], {}, []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return found


if __name__ == "__main__":
    sys.exit(main(Path(__file__).resolve().parent.parent))
