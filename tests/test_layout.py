"""The package's shape: a module or package per CLI verb, shared packages below them, no cycles.

The contracts live in pyproject.toml ([tool.importlinter]); these tests run them on the real
package, and on a copy with one bad import added, to show they would catch it.
"""

from __future__ import annotations

import importlib
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "neighbourhoods"
COMMANDS = ("ingest", "cluster", "select", "train", "evaluate", "report", "generate", "publish", "serve", "sign", "export",
            "upscale", "demo")

# Runs in a child process so that it sees the package under `sys.argv[1]`, not the installed one.
LINT = """
import sys
from importlinter.cli import lint_imports
sys.path.insert(0, sys.argv[1])
sys.exit(lint_imports(config_filename=sys.argv[2], no_cache=True, no_logo=True))
"""

CYCLES = """
import sys
sys.path.insert(0, sys.argv[1])
import grimp

graph = grimp.build_graph("neighbourhoods", cache_dir=None)
state, stack = {}, []

def visit(module):
    state[module] = "open"
    stack.append(module)
    for other in sorted(graph.find_modules_directly_imported_by(module)):
        if state.get(other) == "open":
            print(" -> ".join(stack[stack.index(other):] + [other]))
            sys.exit(1)
        if other not in state:
            visit(other)
    stack.pop()
    state[module] = "done"

for module in sorted(graph.modules):
    if module not in state:
        visit(module)
"""


def run(script: str, src: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, str(src), *args], capture_output=True, text=True,
                          cwd=src, timeout=120)


@pytest.fixture
def package_copy(tmp_path) -> Path:
    """A copy of the package to break on purpose; returns the folder that holds it."""
    shutil.copytree(PACKAGE, tmp_path / "src" / "neighbourhoods", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "src" / "pyproject.toml")
    return tmp_path / "src"


def add_import(module_file: Path, line: str) -> None:
    module_file.write_text(module_file.read_text() + f"\n{line}\n")


def test_every_cli_verb_lives_in_the_module_of_its_name():
    from neighbourhoods.cli import build_parser

    verbs = build_parser()._subparsers._group_actions[0].choices
    assert set(verbs) == set(COMMANDS)
    for verb, parser in verbs.items():
        module = importlib.import_module(f"neighbourhoods.{verb}")
        assert module.__doc__.startswith(f"`neighbourhoods {verb}`"), f"neighbourhoods.{verb} does not say it is the verb"
        handler = inspect.getsource(parser.get_default("func"))
        assert f"from neighbourhoods.{verb} import" in handler, f"`{verb}` calls into another module"


def test_the_import_contracts_are_kept():
    result = run(LINT, REPO / "src", str(REPO / "pyproject.toml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_a_shared_module_importing_a_command_breaks_the_contract(package_copy):
    add_import(package_copy / "neighbourhoods" / "thumbnails" / "postprocess.py", "import neighbourhoods.generate")
    result = run(LINT, package_copy, str(package_copy / "pyproject.toml"))
    assert result.returncode != 0 and "BROKEN" in result.stdout
    assert "neighbourhoods.thumbnails.postprocess -> neighbourhoods.generate" in result.stdout


def test_one_command_importing_another_breaks_the_contract(package_copy):
    add_import(package_copy / "neighbourhoods" / "report.py", "from neighbourhoods.evaluate import evaluate")
    result = run(LINT, package_copy, str(package_copy / "pyproject.toml"))
    assert result.returncode != 0 and "neighbourhoods.report -> neighbourhoods.evaluate" in result.stdout


def test_the_package_has_no_import_cycle():
    result = run(CYCLES, REPO / "src")
    assert result.returncode == 0, f"import cycle: {result.stdout}{result.stderr}"


def test_an_import_cycle_is_found(package_copy):
    add_import(package_copy / "neighbourhoods" / "core" / "errors.py", "from neighbourhoods.core import workspace")
    result = run(CYCLES, package_copy)
    assert result.returncode == 1
    assert "neighbourhoods.core.errors -> neighbourhoods.core.workspace -> neighbourhoods.core.errors" in result.stdout
