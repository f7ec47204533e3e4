"""The package layout holds: imports go down the layers only, no module imports itself round a cycle, long modules
say why they are long, and every package says what lives in it.

``LAYERS`` below is the one definition of the allowed direction (docs/architecture.md shows the same table, checked
by :func:`test_docs_show_the_same_layers`). Every module of ``adamerge`` belongs to the longest *unit* that prefixes
its dotted name (``adamerge.methods.learned.merged`` to ``methods.learned.merged``, ``adamerge.methods.registry`` to
``methods``); a unit may import itself and any unit of a *lower* layer, never one of its own layer or above. Imports
are read with ``ast`` from the source -- module level, inside functions and under ``if TYPE_CHECKING`` alike --
so the test needs nothing installed and sees the imports a run would only make late.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adamerge"
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"

# Bottom to top. A unit may import its own unit and the units of lower layers; units of one layer are independent.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("storage",),
    ("pool", "data", "reporting", "methods", "methods.learned.merged_per_module"),
    ("backbones", "methods.data_free", "methods.learned.merged"),
    ("objectives",),
    ("training",),
    ("methods.learned",),
    ("export",),
    ("demo",),
    ("cli",),
    ("adamerge",),  # the facade, adamerge/__init__.py
)
# (importing unit, imported unit): allowed against the direction, each with its reason. Kept empty: fix the code.
EXCEPTIONS: dict[tuple[str, str], str] = {}
LONG_MODULE_LINES = 300
LONG_REASON = "Long because:"

LAYER_OF = {unit: index for index, layer in enumerate(LAYERS) for unit in layer}
FACADE = "adamerge"


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    file: Path
    line: int
    target: str  # the imported adamerge module, dotted (a package's __init__ is the package's name)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``adamerge.x`` for ``adamerge/x/__init__.py``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = modules()


def _resolve(name: str) -> str:
    """The module a dotted import name lands in: itself, else its longest prefix that is a module."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def imports() -> Iterator[Import]:
    """Every import of an adamerge module by an adamerge module, wherever in the file it is."""
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                origin = _absolute(module, path, node)
                # `from package import submodule` imports the submodule; `from module import name` the module.
                names = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in MODULES else origin
                         for alias in node.names]
            else:
                continue
            for name in names:
                if name == FACADE or name.startswith(FACADE + "."):
                    yield Import(module, path, node.lineno, _resolve(name))


IMPORTS = list(imports())


def unit_of(module: str) -> str:
    """The layer unit of a module: the longest unit prefixing its name below ``adamerge.``; the facade is its own."""
    if module == FACADE:
        return FACADE
    relative = module.removeprefix(FACADE + ".")
    candidates = [unit for unit in LAYER_OF if unit != FACADE and (relative == unit or relative.startswith(unit + "."))]
    if not candidates:
        raise AssertionError(f"{module} belongs to no unit of LAYERS: add its package to the table")
    return max(candidates, key=len)


def test_every_module_belongs_to_a_unit():
    assert {module: unit_of(module) for module in MODULES}


def test_imports_go_down_the_layers():
    wrong = []
    for item in IMPORTS:
        source, target = unit_of(item.source), unit_of(item.target)
        if source == target or (source, target) in EXCEPTIONS:
            continue
        if LAYER_OF[target] >= LAYER_OF[source]:
            where = "of its own layer" if LAYER_OF[target] == LAYER_OF[source] else "above it"
            wrong.append(f"{item.file.relative_to(ROOT)}:{item.line}: {item.source} ({source}) imports "
                         f"{item.target} ({target}), {where}")
    assert not wrong, "imports against the allowed direction (tests/test_architecture.py LAYERS):\n" + "\n".join(wrong)


def test_exceptions_are_still_needed():
    used = {(unit_of(i.source), unit_of(i.target)) for i in IMPORTS}
    assert not set(EXCEPTIONS) - used, "exceptions no import needs any more: remove them"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(edges.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules():
    edges: dict[str, set[str]] = {}
    lines: dict[tuple[str, str], str] = {}
    for item in IMPORTS:
        if item.source != item.target:
            edges.setdefault(item.source, set()).add(item.target)
            lines.setdefault((item.source, item.target), f"{item.file.relative_to(ROOT)}:{item.line}")
    cycles = _cycles(edges)
    shown = []
    for component in cycles:
        members = set(component)
        shown.append(" <-> ".join(component) + ": " + ", ".join(
            f"{lines[a, b]} ({a} -> {b})" for a in component for b in sorted(edges.get(a, ())) if b in members))
    assert not cycles, "import cycles:\n" + "\n".join(shown)


def test_long_modules_say_why():
    silent = []
    for module, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if lines > LONG_MODULE_LINES and not any(line.startswith(LONG_REASON) for line in docstring.splitlines()):
            silent.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not silent, (f"modules over {LONG_MODULE_LINES} lines without a line starting {LONG_REASON!r} in their "
                        "docstring: " + ", ".join(silent))


@pytest.mark.parametrize("package", sorted(m for m, p in MODULES.items() if p.name == "__init__.py"))
def test_every_package_says_what_lives_there_and_what_it_may_import(package):
    docstring = ast.get_docstring(ast.parse(MODULES[package].read_text(encoding="utf-8"))) or ""
    assert len(docstring.splitlines()) >= 3, f"{package}: its __init__ docstring should say what lives there"
    if package != FACADE:
        assert "May import" in docstring, f"{package}: its __init__ docstring should say what it may import"


def _doc_table() -> list[tuple[str, ...]]:
    """The rows of the layer table in docs/architecture.md: ``| n | `unit`, `unit` | ... |``, top row first."""
    rows = []
    for line in ARCHITECTURE_DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if match:
            rows.append((int(match.group(1)), tuple(re.findall(r"`([\w.]+)`", match.group(2)))))
    return [units for _, units in sorted(rows)]


def test_docs_show_the_same_layers():
    assert _doc_table() == [tuple(layer) for layer in LAYERS], (
        "docs/architecture.md's layer table differs from tests/test_architecture.py LAYERS")


def test_loading_an_export_does_not_import_lightning():
    """``adamerge.load_merged`` serves a model: it must not pay for (or need) the training stack."""
    import subprocess
    import sys

    code = ("import sys, adamerge; from adamerge.export import loading, multitask; "
            "assert callable(adamerge.load_merged); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'hydra'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", result.stdout
