"""The rule the conftest enforces: test modules share helpers through tests/helpers.py only."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import ROOT, forbidden_imports


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("from tests.test_tick import GOOD", ["tests.test_tick.GOOD"]),
        ("from tests.conftest import unique", ["tests.conftest.unique"]),
        ("from tests import test_cli", ["tests.test_cli"]),
        ("import tests.test_fetch", ["tests.test_fetch"]),
        ("from .test_fetch import run", [".test_fetch.run"]),
        ("from . import conftest", [".conftest"]),
        ("def f():\n    from tests.test_cli import ROOT", ["tests.test_cli.ROOT"]),
        ("from tests.helpers import GOOD, unique", []),
        ("from stream.contracts.tick import decode_tick", []),
    ],
)
def test_imports_of_test_modules_are_found(source: str, found: list[str], tmp_path: Path) -> None:
    module = tmp_path / "test_example.py"
    module.write_text(source + "\n")
    assert forbidden_imports(module) == found


def test_no_test_module_imports_another() -> None:
    assert {p.name: forbidden_imports(p) for p in (ROOT / "tests").glob("test_*.py")} == {
        p.name: [] for p in (ROOT / "tests").glob("test_*.py")
    }
