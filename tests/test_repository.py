"""A clone runs its own tests: reference data inside the repository, the fast and slow suites as documented."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pandas as pd

from conftest import REFERENCE_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_reference_data_ships_with_the_tests():
    assert REFERENCE_DIR == ROOT / "tests" / "data"
    df = pd.read_csv(REFERENCE_DIR / "rw1a1b_100.csv")
    assert len(df) == 100 * 4 * 24 and df["subject"].nunique() == 100
    assert len(pd.read_csv(REFERENCE_DIR / "rw1a1b_100_true.csv")) == 100
    pyem = json.loads((REFERENCE_DIR / "rw1a1b_100_pyem.json").read_text())
    assert len(pyem["subject_map_normalized"]) == 100


def test_no_test_reads_data_from_outside_the_repository():
    for path in ROOT.joinpath("tests").rglob("*.py"):
        if path.name == Path(__file__).name:
            continue
        text = path.read_text()
        assert "shared/reference" not in text and '"shared"' not in text, f"{path} reads outside the repository"


def _slow_tests() -> list[str]:
    """Test functions decorated with ``@pytest.mark.slow`` (read from the source, without importing it)."""
    found = []
    for path in ROOT.joinpath("tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(ast.unparse(d) == "pytest.mark.slow"
                                                         for d in node.decorator_list):
                found.append(f"{path.name}::{node.name}")
    return found


def test_the_slow_marker_selects_the_long_studies():
    slow = _slow_tests()
    assert sum("recovery" in name for name in slow) >= 4, slow  # the long studies leave the everyday suite
    assert sum("identify" in name for name in slow) >= 3, slow
    assert "slow:" in (ROOT / "pyproject.toml").read_text()  # the marker is registered


def test_ci_and_readme_run_the_fast_and_the_slow_suite():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    for selection in ('-m "not slow"', "-m slow"):
        assert selection in ci and f"pytest tests -q {selection}" in readme
    assert '"$rc" -ne 5' in ci  # an empty selection (exit code 5) is not a failure
