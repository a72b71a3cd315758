"""lava's modules import downward only: no import cycles, and the low layers never reach up.

The graph is read from the source (``ast`` over ``lava/**/*.py``), not by importing anything:
an edge ``a -> b`` for every ``import lava.b`` / ``from lava.b import x`` / ``from .b import x``
in ``a`` (``from lava.p import m`` counts as ``lava.p.m`` where ``m`` is a module). Importing
``lava.p.m`` also runs ``lava/p/__init__.py``, so it adds an edge to each package above ``m``
that is not a package of ``a`` itself (those are already being imported when ``a`` runs; a name
taken from one of them, ``from . import f``, is an edge). So a package's ``__init__`` may
re-export its submodules as long as none of them takes a name from the package. Imports under
``if TYPE_CHECKING:`` never run and do not count; ``importlib`` calls (the CLI's commands, the
lazy exports of ``lava``, ``lava.backends``, ``lava.evaluation``) are not seen.

Imports inside functions are how lava keeps ``import lava`` and ``lava --help`` free of torch,
diffusers and matplotlib; they must not hide a cycle either, so the cycle check runs twice: on
the imports run when a module loads, and on every import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lava"

# Layers that must not depend on the ones above them:
# cli/explore -> generation -> evaluation -> pipeline/compose/config -> stages -> backends/kernels/...
LOW = ("lava.stages", "lava.backends", "lava.kernels", "lava.types", "lava.options", "lava.errors")
HIGH = ("lava.cli", "lava.explore", "lava.evaluation", "lava.generation", "lava.pipeline", "lava.tracing")
RULES = [
    (LOW, HIGH),
    (
        ("lava.pipeline", "lava.compose", "lava.config", "lava.tracing"),
        ("lava.cli", "lava.explore", "lava.evaluation", "lava.generation"),
    ),
    (("lava.evaluation",), ("lava.cli", "lava.explore", "lava.generation")),
    (("lava.generation",), ("lava.cli", "lava.explore")),
]


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package)}`` for every module of lava."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, inside_functions: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module: those run when it loads (its body, class bodies,
    ``if``/``try``/``with`` blocks), or with ``inside_functions`` every one; never those under
    ``if TYPE_CHECKING:``."""
    found = []

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                if inside_functions:
                    visit(ast.iter_child_nodes(node))
            else:
                visit(ast.iter_child_nodes(node))

    visit(tree.body)
    return found


def _known(name: str) -> str | None:
    """The module of lava that ``name`` is, or that defines it (``lava.x.f`` -> ``lava.x``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _packages_of(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(inside_functions: bool = False) -> dict[str, set[str]]:
    """``{module: modules its imports run}`` within lava (see the module docstring)."""
    graph = {}
    for module, (path, package) in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        here = module if package else module.rpartition(".")[0]
        ancestors = {*_packages_of(module), *([module] if package else [])}
        targets = set()
        for node in _imports(tree, inside_functions):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                names = [f"{source}.{alias.name}" for alias in node.names]
            for name in names:
                if name != "lava" and not name.startswith("lava."):
                    continue
                target = _known(name)
                if target is None:
                    continue
                # the module named, and each package above it that is not yet being imported
                targets |= {p for p in _packages_of(target) if p in MODULES and p not in ancestors}
                if target != module:
                    targets.add(target)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _path_within(graph: dict[str, set[str]], component: list[str]) -> str:
    """One cycle through a component, spelled out (``a -> b -> a``)."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    node = start
    while True:
        nxt = sorted(t for t in graph[node] if t in members)
        back = [t for t in nxt if t == start]
        if back and len(path) > 1:
            return " -> ".join([*path, start])
        fresh = [t for t in nxt if t not in seen]
        if not fresh:
            return " -> ".join([*path, *nxt[:1]])
        node = fresh[0]
        path.append(node)
        seen.add(node)


def _in(module: str, layers) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert "lava.stages.processors" in graph["lava.stages.capture"]  # from .processors import ...
    assert "lava.backends" in graph["lava.stages.capture"]  # from ..backends.base runs the package
    assert "lava.kernels" in graph["lava.stages.capture"]  # from ..kernels import (a package)
    assert "lava.options" in graph["lava.cli.args"]  # from .. import options
    assert "lava.backends.loading" in graph["lava.backends.pretrained"]  # from . import loading
    assert "lava.backends.base" not in graph["lava.backends"]  # lazy exports only
    assert "lava.config" not in graph["lava.cli.args"]  # imported inside check_source
    assert "lava.config" in import_graph(inside_functions=True)["lava.cli.args"]
    assert "lava.backends" not in graph["lava.backends.base"]  # its own package, already loading
    assert "lava" in graph["lava.cli.parser"]  # from .. import __version__
    assert "lava.cli.parser" in graph["lava.cli"]  # re-exported by the package


@pytest.mark.parametrize("inside_functions", [False, True], ids=["module-level", "every-import"])
def test_no_import_cycles(inside_functions):
    graph = import_graph(inside_functions)
    found = [f"{', '.join(c)} (e.g. {_path_within(graph, c)})" for c in cycles(graph)]
    advice = "modules in import cycles (move the shared piece into the lower module):"
    assert found == [], "\n".join([advice, *found])


@pytest.mark.parametrize("lower, upper", RULES, ids=["stages", "pipeline", "evaluation", "generation"])
def test_lower_layers_never_import_upper_ones(lower, upper):
    graph = import_graph(inside_functions=True)
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if _in(module, lower)
        for target in targets
        if _in(target, upper)
    )
    assert wrong == []


def test_only_the_command_line_imports_it():
    graph = import_graph(inside_functions=True)
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if not _in(module, ("lava.cli",))
        for target in targets
        if _in(target, ("lava.cli",))
    )
    assert wrong == []


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert _path_within(graph, ["a", "b", "c"]) == "a -> b -> c -> a"
