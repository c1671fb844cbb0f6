"""Imports flow one way: server -> adapters_store -> reft_core; reft_core knows nothing of HTTP or storage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "reft_core": {"server", "adapters_store", "fastapi", "starlette", "uvicorn", "sqlite3", "httpx"},
    "adapters_store": {"server", "fastapi", "starlette", "uvicorn"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upward(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if imported_modules(path) & FORBIDDEN[package]
    }
    assert not offenders, offenders


def test_the_check_sees_imports() -> None:
    assert "server" in imported_modules(ROOT / "server" / "app.py")


def test_only_the_ray_module_imports_ray() -> None:
    """Ray is an optional extra and its multiplex API is beta: everything Ray-specific stays in one module."""
    importers = {str(path.relative_to(ROOT)) for package in ("server", "adapters_store", "reft_core")
                 for path in (ROOT / package).rglob("*.py") if "ray" in imported_modules(path)}
    assert importers == {"server/ray_serve.py"}
