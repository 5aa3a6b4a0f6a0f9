"""The package's structure: one direction of dependence, no import cycle, no private name used
across modules. Walks the source of ``flowgym`` and ``algos`` (every import, also those inside
functions; ``if TYPE_CHECKING:`` blocks excepted) without importing anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flowgym", "algos")

#: the layers from the bottom up; a module may import its own layer and those below it
LAYERS: list[tuple[str, ...]] = [
    ("flowgym.registry", "flowgym.hub", "flowgym.schedules", "flowgym.kernels", "flowgym.td_utils", "flowgym.metrics"),
    ("flowgym.backends",),
    ("flowgym.rewards",),
    ("flowgym.env", "flowgym.policy", "flowgym.rollout"),
    ("flowgym.gym", "flowgym.registration", "flowgym"),
    ("flowgym.testing",),
    ("algos.advantages", "algos.losses", "algos.ema", "algos.checkpoint", "algos.config", "algos.health", "algos.atomic_io", "algos.collectives"),
    ("algos.strategy", "algos.distributed", "algos.updater", "algos.evaluation", "algos.run_logger", "algos.sample_grid", "algos.report"),
    ("algos.trainer",),
    ("algos.run", "algos.multirun_summary", "algos.bench", "algos"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"module {module} has no layer in tests/test_structure.py"
    return best


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, names taken from it, line)`` for every project import in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    found: list[tuple[str, list[str], int]] = []
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                return
            plain = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # ``from package import submodule``
                    found.append((sub, [], node.lineno))
                else:
                    plain.append(alias.name)
            if plain:
                found.append((base, plain, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def resolve(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = []
    for module in MODULES:
        for target, _, line in imports(module):
            target = resolve(target)
            if layer_of(target) > layer_of(module):
                bad.append(f"{module}:{line} imports {target} (layer {layer_of(target)} > {layer_of(module)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {resolve(t) for t, _, _ in imports(m)} - {m} for m in MODULES}
    # a package's __init__ re-exporting its own sub-modules is not a cycle through the package
    for module in graph:
        graph[module] = {t for t in graph[module] if not (module.startswith(t + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _private_attributes_defined(module: str) -> set[str]:
    """Private names a module defines: functions, classes, assignments and ``self._x = ...`` attributes."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id.startswith("_"):
                    names.add(target.id)
                elif isinstance(target, ast.Attribute) and target.attr.startswith("_"):
                    names.add(target.attr)
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}


def test_no_private_name_is_imported_or_reached_into_across_modules():
    defined = {m: _private_attributes_defined(m) for m in MODULES}
    owners: dict[str, set[str]] = {}
    for module, names in defined.items():
        for name in names:
            owners.setdefault(name, set()).add(module)
    bad = []
    for module in MODULES:
        for target, names, line in imports(module):
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    bad.append(f"{module}:{line} imports the private name {name} from {target}")
        # obj._private where the attribute belongs to another project module (env._state, ...)
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                if isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "super":
                    continue
                others = owners.get(node.attr, set()) - {module}
                if others and node.attr not in defined[module]:
                    bad.append(f"{module}:{node.lineno} reaches into {node.attr} of {sorted(others)[0]}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("family", ["digits", "sd3", "toy"])
def test_no_branch_on_a_backend_name_outside_its_folder(family):
    """A family's name appears as a string only in its own folder (and in configs/tests), never as a
    branch elsewhere in the package."""
    offenders = []
    for module, path in MODULES.items():
        if module.startswith(f"flowgym.backends.{family}"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for comparator in [node.left, *node.comparators]:
                    if isinstance(comparator, ast.Constant) and comparator.value == family:
                        offenders.append(f"{module}:{node.lineno}")
    assert not offenders, f"branches on backend name {family!r}: {offenders}"
