"""The documentation: README.md as a landing page, the MkDocs site in docs/ (mkdocs.yml), and the generated blocks
that bench scripts write into both (``replace_marked_block(path, name, block)`` between ``<!-- name:start -->`` and
``<!-- name:end -->``)."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
BENCH = ROOT / "bench"
MARKER = re.compile(r"^<!-- ([A-Za-z0-9_-]+):(start|end) -->$", re.M)  # on a line of its own
# README's two set-up commands, byte for byte: CI runs the second (.ci/run), users paste both.
DEMO_COMMAND = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[dev]" '
                "&& adamerge")
TEST_COMMAND = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[dev]" '
                "&& python -m pytest -q")
# Marked blocks that no bench script writes: the Python API block is run as written by tests/test_python_api.py.
TESTED_BLOCKS = {"python-api": DOCS / "own-models.md"}


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def nav_pages() -> list[str]:
    """Every page the site's nav lists (mkdocs.yml holds no Python-specific YAML tags, so safe_load reads it)."""
    def walk(entries) -> list[str]:
        pages = []
        for entry in entries:
            if isinstance(entry, str):
                pages.append(entry)
            else:
                for value in entry.values():
                    pages.extend(walk(value) if isinstance(value, list) else [value])
        return pages

    return walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])


def bench_targets() -> list[tuple[str, Path, str]]:
    """(script, target file, block name) of every ``replace_marked_block`` call in bench/*.py, the target evaluated
    from the script's own module-level ``ROOT`` / ``RESULTS`` / ``PAGE`` (or its ``--readme`` default)."""
    targets = []
    for script in sorted(BENCH.glob("*.py")):
        tree = ast.parse(script.read_text())
        namespace = {"Path": Path, "__file__": str(script)}
        for node in tree.body:  # ROOT = Path(__file__)..., PAGE = ROOT / "docs" / ...
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id in {"ROOT", "RESULTS", "PAGE"}):
                namespace[node.targets[0].id] = eval(compile(ast.Expression(node.value), str(script), "eval"), namespace)
        defaults = {}  # args.<name> -> the default of its argparse option
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                for keyword in node.keywords:
                    if keyword.arg == "default":
                        defaults[node.args[0].value.lstrip("-").replace("-", "_")] = keyword.value
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "replace_marked_block":
                target, name = node.args[0], node.args[1]
                assert isinstance(name, ast.Constant), f"{script.name}: the block name is not a literal"
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "args":
                    target = defaults[target.attr]
                path = eval(compile(ast.Expression(target), str(script), "eval"), namespace)
                targets.append((script.name, Path(path), name.value))
    return targets


def test_every_start_marker_has_its_end_and_each_block_lives_in_one_place():
    seen: dict[str, Path] = {}
    for path in markdown_files():
        open_block = None
        for name, kind in MARKER.findall(path.read_text()):
            where = f"{path.relative_to(ROOT)}: <!-- {name}:{kind} -->"
            if kind == "start":
                assert open_block is None, f"{where} inside the {open_block} block"
                assert name not in seen, f"{where}: the block is also in {seen[name].relative_to(ROOT)}"
                open_block, seen[name] = name, path
            else:
                assert open_block == name, f"{where} without its start"
                open_block = None
        assert open_block is None, f"{path.relative_to(ROOT)}: <!-- {open_block}:start --> has no end"


def test_every_bench_block_is_where_its_script_writes_it_and_names_its_generator():
    targets = bench_targets()
    assert len(targets) >= 11 and len({name for _, _, name in targets}) == len(targets)
    for script, path, name in targets:
        assert path.is_file(), f"bench/{script} writes {name} into {path}, which does not exist"
        text = path.read_text()
        assert text.count(f"<!-- {name}:start -->") == 1 and text.count(f"<!-- {name}:end -->") == 1, (script, path)
        block = text.split(f"<!-- {name}:start -->", 1)[1].split(f"<!-- {name}:end -->", 1)[0]
        assert f"bench/{script}" in block, f"the {name} block in {path.relative_to(ROOT)} does not name bench/{script}"
    assert dict((name, path) for _, path, name in targets)["demo-table"] == README  # the demo table stays in README
    written = {name for _, _, name in targets} | set(TESTED_BLOCKS)
    for path in markdown_files():
        for name, kind in MARKER.findall(path.read_text()):
            assert name in written, f"{path.relative_to(ROOT)}: no bench script or test owns the {name} block"
    for name, path in TESTED_BLOCKS.items():
        assert f"<!-- {name}:start -->" in path.read_text()


def test_readme_is_a_landing_page_with_the_two_set_up_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    commands = [line for block in fenced_blocks(text, "bash") for line in block.splitlines() if "python3 -m venv" in line]
    assert commands == [DEMO_COMMAND, TEST_COMMAND]
    python = fenced_blocks(text, "python")
    assert len(python) == 1 and len(python[0].splitlines()) <= 10  # the one short example
    for page in nav_pages():  # every page of the site is linked from the landing page
        assert f"](docs/{page}" in text, f"README does not link docs/{page}"
    assert "mkdocs serve" in text


def test_the_ci_script_runs_readmes_test_command_and_builds_the_site():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci and "mkdocs build --strict" in ci and '".[docs]"' in ci


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
    pages = nav_pages()
    assert len(pages) == len(set(pages))
    for page in pages:
        assert (DOCS / page).is_file(), f"mkdocs.yml lists {page}, which is not in docs/"
    assert sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")) == sorted(pages)


def test_every_python_example_parses():
    for path in markdown_files():
        for block in fenced_blocks(path.read_text(), "python"):
            ast.parse(block, filename=str(path))


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("mkdocs", "material", "mkdocstrings_handlers")),
                    reason='the docs extra is not installed (pip install -e ".[docs]")')
def test_the_site_builds_strictly(tmp_path):
    # --strict: a broken link or anchor, a page missing from the nav, or a docstring mkdocstrings cannot render fails.
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()
