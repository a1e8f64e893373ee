"""The package's import graph has no cycles, counting imports inside functions too (so no lazy
import hides one), every import goes to the same layer or one below it (the layers are folders),
and the vocabulary modules stay leaves."""

from __future__ import annotations

import ast
from pathlib import Path

import slimctl

PACKAGE = Path(slimctl.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """slimctl module → the slimctl modules it imports anywhere in its source."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from slimctl.x import y`: the module slimctl.x.y if there is one, else slimctl.x.
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_import_graph_is_acyclic() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_vocabulary_modules_are_leaves() -> None:
    """errors and _version import nothing of slimctl; the base modules nothing outside base but errors."""
    graph = import_graph()
    for leaf in ("slimctl._version", "slimctl.errors"):
        assert graph[leaf] <= {"slimctl.errors"}, f"{leaf} imports {sorted(graph[leaf])}"
    base = [name for name in graph if name.startswith("slimctl.base.")]
    assert {"slimctl.base.groups", "slimctl.base.inserted", "slimctl.base.registry"} <= set(base)
    for name in base:
        outside = {m for m in graph[name] if not m.startswith("slimctl.base.")}
        assert outside <= {"slimctl.errors"}, f"{name} imports {sorted(outside)}"


def test_plan_is_pure_and_trace_needs_no_family() -> None:
    graph = import_graph()
    assert graph["slimctl.core.plan"] <= {"slimctl.errors", "slimctl.base.groups"}
    # The trace package and each of its modules, and whatever they import in turn: no family.
    trace = [name for name in graph if name == "slimctl.trace" or name.startswith("slimctl.trace.")]
    assert len(trace) > 1
    reached, todo = set(), list(trace)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += graph[name]
    assert not any(m.startswith("slimctl.models") for m in reached), sorted(reached)
    assert "slimctl.io.config" not in graph["slimctl.core.plan"]


# The layers, bottom up: a module may import its own layer's modules and any layer below.
LAYERS = [
    ("slimctl._version", "slimctl.errors"),
    ("slimctl.base",),
    ("slimctl.models", "slimctl.trace"),
    ("slimctl.core",),
    ("slimctl.io",),
    ("slimctl.data",),
    ("slimctl.train",),
    ("slimctl.output",),
    ("slimctl.pipeline",),
    ("slimctl.cli", "slimctl.__main__", "slimctl"),  # the front ends, and the public API
]


def layer_of(module: str) -> int:
    """The index in LAYERS of the most specific entry that is `module` or a package holding it."""
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + ".") and prefix != "slimctl":
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add its package to LAYERS"
    return best[0]


def test_every_import_goes_down_the_layers() -> None:
    upward = [f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})"
              for a, targets in import_graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_the_layers_are_folders() -> None:
    """Every module lives in a layer package, except the leaves and the entry point."""
    loose = sorted(m for m in import_graph() if m.count(".") == 1 and not (PACKAGE / m.split(".")[1]).is_dir())
    assert loose == ["slimctl.__main__", "slimctl._version", "slimctl.errors"], loose


def test_an_upward_import_is_caught() -> None:
    assert layer_of("slimctl.core.plan") < layer_of("slimctl.pipeline.pruning")
    assert layer_of("slimctl.trace.walk") == layer_of("slimctl.models.vgg") < layer_of("slimctl.core.fold")


def test_no_god_module_no_long_function_no_long_signature() -> None:
    """docs/design.md's size rules: modules up to 400 lines, functions up to 80, and at most 12
    parameters except click commands (their options are their parameters)."""
    too_long, too_wide = [], []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        assert len(source.splitlines()) <= 400, f"{path.relative_to(PACKAGE)}: {len(source.splitlines())} lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > 80:
                    too_long.append(f"{path.name}:{node.name}")
                count = len(node.args.posonlyargs) + len(node.args.args) + len(node.args.kwonlyargs)
                is_command = any("command" in ast.unparse(d) for d in node.decorator_list)
                if count > 12 and not is_command:
                    too_wide.append(f"{path.name}:{node.name}")
    assert not too_long and not too_wide, (too_long, too_wide)
