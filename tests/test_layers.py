"""arbor's core is layered, and its imports say so.

From the bottom: `arbor.compat` (transformers' names across versions) and `arbor.plugins`
(the plugin host), then `arbor.model`, `arbor.growth`, `arbor.training` and `arbor.cli`.
A module imports only from its own layer or lower ones, at module level, and the
module-level imports form no cycle. The package ``arbor`` itself imports the growth layer's
`ArborForCausalLM` (importing it registers the model with transformers' Auto classes).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "core"
#: Layer of each top-level name under ``arbor``; lower numbers are lower layers.
LAYERS = {"compat": 0, "plugins": 1, "model": 2, "growth": 3, "training": 4, "cli": 5}
PACKAGE = 6  # ``arbor/__init__.py`` and ``arbor/__main__.py``


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(CORE.rglob("*.py")):
        parts = list(path.relative_to(CORE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(["arbor", *parts])] = path
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 and parts[1] in LAYERS else PACKAGE


def arbor_imports(path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """(modules imported at module level, descriptions of imports made inside functions or classes)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top, nested = set(), []

    def targets(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name for a in node.names if a.name == "arbor" or a.name.startswith("arbor.")}
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == "arbor"
                                                                  or node.module.startswith("arbor.")):
            # ``from arbor.cli import run`` imports the submodule arbor.cli.run; the package's own
            # names come from the package module.
            subs = {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
            return subs | ({node.module} if len(subs) < len(node.names) else set())
        return set()

    for node in tree.body:
        if isinstance(node, ast.If):  # version guards at module level still run at import
            for inner in ast.walk(node):
                top |= targets(inner)
        else:
            top |= targets(node)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for inner in ast.walk(node):
                for name in targets(inner):
                    nested.append(f"{path.relative_to(CORE)}:{inner.lineno} imports {name}")
    return top, nested


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: arbor_imports(path, set(mods))[0] - {name} for name, path in mods.items()}


def test_every_import_points_down_or_sideways():
    wrong = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
             for m, targets in graph().items() for t in targets if layer(t) > layer(m)]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_arbor_inside_a_function():
    mods = modules()
    nested = [line for path in mods.values() for line in arbor_imports(path, set(mods))[1]]
    assert not nested, "\n".join(nested)


def test_module_level_imports_form_no_cycle():
    edges = graph()
    state: dict[str, int] = {}
    order: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 2:
            return
        assert state.get(node) != 1, "import cycle: " + " -> ".join([*path, node])
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if target in edges:
                visit(target, [*path, node])
        state[node] = 2
        order.append(node)

    for node in sorted(edges):
        visit(node, [])
    assert len(order) == len(edges)


@pytest.mark.parametrize("module, absent", [
    ("arbor.plugins", ("arbor.training", "arbor.cli")),
    ("arbor.growth.step", ("arbor.training", "arbor.cli")),
    ("arbor.model.modeling", ("arbor.training", "arbor.cli")),
    ("arbor.training.trainer", ("arbor.cli",)),
    ("arbor.cli.main", ()),
])
def test_importing_a_layer_in_a_fresh_interpreter_loads_nothing_above_it(module, absent):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print(sorted(m for m in sys.modules if any(m == a or m.startswith(a + '.') for a in {absent!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing {module} loaded {result.stdout.strip()}"


def test_every_module_under_core_has_a_layer():
    for name in modules():
        parts = name.split(".")
        assert len(parts) == 1 or parts[1] in LAYERS or parts[1] == "__main__", name
