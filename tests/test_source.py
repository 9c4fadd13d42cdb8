"""The source's own rules: one direction of imports between layers, ruff and mypy --strict."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "zenith"

# What each layer may import from zenith (besides itself and the value-type modules).
BASE = {"lsn", "ids", "errors", "__init__"}
ALLOWED = {
    "storage": set(),
    "pgwire": set(),
    "transfer": {"storage", "pgwire"},
    "postgres": {"storage", "pgwire"},
    "bucket": {"storage", "transfer"},
    "pageserver": {"storage", "pgwire", "transfer", "postgres", "bucket"},
    "cli": {"pageserver", "pgwire", "storage", "transfer", "postgres", "bucket"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []  # imports only for type checking do not count
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zenith"):
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("zenith."):
                    found.add(alias.name.split(".")[1])
    return {f.removesuffix(".py") for f in found}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_one_way(layer: str) -> None:
    bad = {}
    for path in (SRC / layer).rglob("*.py"):
        wrong = _imports(path) - BASE - ALLOWED[layer] - {layer}
        if wrong:
            bad[str(path.relative_to(SRC))] = sorted(wrong)
    assert not bad, f"imports against the layering: {bad}"


def test_ruff_is_clean() -> None:
    res = subprocess.run([sys.executable, "-m", "ruff", "check", str(SRC)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_strict_is_clean() -> None:
    res = subprocess.run([sys.executable, "-m", "mypy", "--strict", str(SRC)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
