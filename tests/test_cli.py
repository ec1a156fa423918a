"""The ``torchem`` command: demo and fit from a long CSV (column groups included)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from torchem.cli import main, parse_columns
from torchem.models.glm import glm_simulate

torch.set_num_threads(1)


def test_parse_columns():
    assert parse_columns("choice, reward") == ["choice", "reward"]
    assert parse_columns("[x0, x1,x2],y") == [["x0", "x1", "x2"], "y"]
    assert parse_columns("[o1,o2],[p1,p2],certain,choice") == [["o1", "o2"], ["p1", "p2"], "certain", "choice"]
    with pytest.raises(ValueError, match="unclosed"):
        parse_columns("[x0,x1,y")


def test_demo_prints_a_summary(capsys):
    assert main(["demo", "--subjects", "20", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "LME" in out and "beta" in out


def test_fit_a_regression_from_csv_with_a_column_group(tmp_path, capsys):
    true = np.column_stack([np.full(12, 0.5), np.linspace(-1, 1, 12), np.full(12, -1.0), np.ones(12)])
    sim = glm_simulate(true, ntrials=60, seed=0)
    S, T, _ = sim["X"].shape
    s, t = np.meshgrid(np.arange(S), np.arange(T), indexing="ij")
    df = pd.DataFrame({"id": s.ravel(), "t": t.ravel(), "x0": sim["X"][..., 0].ravel(),
                       "x1": sim["X"][..., 1].ravel(), "x2": sim["X"][..., 2].ravel(), "y": sim["Y"].ravel()})
    csv, out, summary = tmp_path / "d.csv", tmp_path / "params.csv", tmp_path / "s.json"
    df.to_csv(csv, index=False)
    rc = main(["fit", str(csv), "--model", "glm", "--subject", "id", "--columns", "[x0,x1,x2],y", "--trial", "t",
               "--out", str(out), "--summary", str(summary), "--nsamples", "200"])
    assert rc == 0
    params = pd.read_csv(out)
    assert len(params) == S and {"b0", "b1", "b2", "sigma"} <= set(params.columns)
    assert np.corrcoef(params["b1"], true[:, 1])[0, 1] > 0.9
    assert json.loads(summary.read_text())
    assert main(["fit", str(csv), "--model", "glm", "--subject", "id", "--columns", "[x0,x1,y", "--out",
                 str(out)]) == 2
    assert "unclosed" in capsys.readouterr().err
