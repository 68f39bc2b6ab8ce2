"""What the wheel ships: the product packages, never the benchmarks or the tests."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("tickserve", "stream", "features", "inference", "training", "deploy")
NOT_PRODUCT = ("bench", "tests")


def _imported(tree: ast.AST) -> set[str]:
    """Top-level names of every module `tree` imports, lazy imports inside functions too."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_wheel_packages_are_the_product_only() -> None:
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    packages = find_packages(
        str(ROOT), include=find["find"]["include"], exclude=find["find"]["exclude"]
    )
    assert {p.split(".")[0] for p in packages} == set(PRODUCT)
    assert "stream.kafka" in packages and "features.feature_repo" in packages


def test_product_code_never_imports_bench_or_tests() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for package in PRODUCT
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in sorted(_imported(ast.parse(path.read_text(), str(path))) & set(NOT_PRODUCT))
    ]
    assert offenders == []


def test_benchmarks_have_their_own_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "e2e", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: python -m bench e2e" in done.stdout and "--rounds" in done.stdout


def test_the_record_schemas_ship_as_package_data() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = data["package-data"]["stream.contracts"]
    shipped = {p.name for pattern in patterns for p in (ROOT / "stream/contracts").glob(pattern)}
    assert shipped == {"signal-1.0.json", "tick-1.0.json", "deadletter-headers-1.0.json"}
