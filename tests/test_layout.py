"""The house rules: no import circle, imports only go down (import-linter), small modules."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[1] / "autodecomp"


def test_no_module_imports_itself_back() -> None:
    graph = grimp.build_graph("autodecomp")
    circles = sorted(
        (module, imported)
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.chain_exists(importer=imported, imported=module)
    )
    assert circles == []


def test_import_contract_holds() -> None:
    linter = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    root = PACKAGE.parent
    done = subprocess.run([linter], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_no_module_over_600_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert long == {}


def test_only_users_import_the_public_api() -> None:
    """`autodecomp/__init__.py` sits above every floor: no module of the package imports it."""
    graph = grimp.build_graph("autodecomp")
    assert sorted(graph.find_modules_that_directly_import("autodecomp")) == []


def _imports_inside_functions(path: Path) -> list[str]:
    """Package modules imported inside a function body (outside ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom):
                names = ["." if node.level else node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(n == "." or n.startswith("autodecomp") for n in names):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_package_imports_sit_at_module_top() -> None:
    """Only the CLI (the top floor) defers imports, so that `--help` loads little; anywhere
    else a deferred import would hide a dependency from the layers contract's reader."""
    deferred = [
        where
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "cli.py" or path.parent != PACKAGE
        for where in _imports_inside_functions(path)
    ]
    assert deferred == []
