"""The architecture gate: import contracts, ruff, mypy --strict and module docstrings over the packages."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("imagecore", "nbdsrv", "nbdproto")
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A console script of the test venv; a missing tool is a broken setup, so it fails."""
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN} (run scripts/setup)")
    return str(path)


def run_tool(*args: str, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NO_COLOR="1")
    return subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_packages_exist() -> None:
    for pkg in PACKAGES:
        assert (REPO / pkg / "__init__.py").is_file(), f"{pkg} is not a package"
    assert len(modules()) >= 2


def test_import_contracts() -> None:
    """The dependency rules of ARCHITECTURE.md, as import-linter contracts in pyproject.toml."""
    proc = run_tool(tool("lint-imports"), "--no-cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff() -> None:
    proc = run_tool(tool("ruff"), "check", "--no-cache", *PACKAGES, "tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict() -> None:
    # the file list and the strict settings come from [tool.mypy] in pyproject.toml
    proc = run_tool(tool("mypy"), "--strict", "--no-error-summary", *PACKAGES)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_docstring(path: Path) -> None:
    """Every module opens with a docstring that says what it is for."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    doc = ast.get_docstring(tree)
    assert doc and doc.strip(), f"{path.relative_to(REPO)} has no module docstring"
    first = tree.body[0]
    assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant), "docstring is not first"
