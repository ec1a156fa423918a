"""A clone runs its own tests: reference data inside the repository, the fast and slow suites as documented."""
from __future__ import annotations

import json
import re
import subprocess
import sys
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


def test_the_slow_marker_selects_the_long_studies():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow", "-p", "no:cacheprovider",
                          str(ROOT / "tests")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    slow = [line for line in out.stdout.splitlines() if "::" in line]
    assert len(slow) >= 8, out.stdout[-2000:]
    assert all(re.search(r"recovery|identify", line) for line in slow), slow


def test_ci_and_readme_run_the_fast_and_the_slow_suite():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    for selection in ('-m "not slow"', "-m slow"):
        assert selection in ci and f"pytest tests -q {selection}" in readme
    assert '"$rc" -ne 5' in ci  # an empty selection (exit code 5) is not a failure
