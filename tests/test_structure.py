"""The package's structure: no import cycle, arrows only downward, no branch on a benchmark's name.

Every import of every module is read (those inside functions too). The layers, from the bottom:

* ``functional/``: pure maths; imports nothing of the package outside ``functional/``;
* the glue (everything else but ``study/``): never imports ``study/``;
* ``study/``: may import anything below it.

A benchmark's name (``"tofu"``, ``"muse"``) is compared with or looked up nowhere but in
``benchmarks/registry.py``: everything else asks the benchmark object.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "perta_lightning"
NAMES = {"tofu", "muse"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """The package's modules ``path`` imports, anywhere in the file (a package import counts as its ``__init__``;
    ``from package import module`` as the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in MODULES}
    return found


GRAPH = {name: imports(path) - {name} for name, path in MODULES.items()}


def layer(name: str) -> int:
    if name.startswith("perta_lightning.functional"):
        return 0
    if name.startswith("perta_lightning.study"):
        return 2
    return 1


def test_no_import_cycle():
    """Depth-first search over the import graph; a back edge is a cycle, reported with its path."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(GRAPH[node]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_imports_only_go_down():
    upward = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
                    if layer(b) > layer(a) and b != "perta_lightning.errors")
    assert not upward, upward
    functional = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() if layer(a) == 0 for b in targets if layer(b) != 0)
    assert not functional, functional


def test_no_branch_on_a_benchmark_name_outside_the_registry():
    found = []
    for name, path in MODULES.items():
        if name == "perta_lightning.benchmarks.registry":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            constants = []
            if isinstance(node, ast.Compare):
                constants = [n for n in [node.left, *node.comparators] if isinstance(n, ast.Constant)]
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                constants = [node.slice]
            if any(c.value in NAMES for c in constants):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not found, found


def test_the_checks_above_can_fail():
    """The same checks catch what they are for (a made-up graph with a cycle and an upward arrow)."""
    assert layer("perta_lightning.functional.weights") < layer("perta_lightning.merge") < layer("perta_lightning.study.graph")
    tree = ast.parse('if benchmark == "muse":\n    pass\nx = AXES["tofu"]\n')
    hits = [n for n in ast.walk(tree) if isinstance(n, (ast.Compare, ast.Subscript))]
    assert len(hits) == 2
