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


@pytest.fixture(autouse=True)
def _in_a_temporary_folder(tmp_path, monkeypatch):
    """``torchem fit`` writes its default outputs into the current folder: keep them out of the repository."""
    monkeypatch.chdir(tmp_path)


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


# ------------------------------------------------------- data files as they come
def _bandit_table(n=6, ntrials=30, seed=0) -> pd.DataFrame:
    from torchem.models.rl import rw1a1b_simulate
    rng = np.random.default_rng(seed)
    true = np.column_stack([rng.uniform(2, 8, n), rng.uniform(0.2, 0.8, n)])
    sim = rw1a1b_simulate(true, nblocks=1, ntrials=ntrials, seed=seed)
    s, t = np.meshgrid(np.arange(n), np.arange(ntrials), indexing="ij")
    return pd.DataFrame({"subjID": s.ravel() + 1, "trial": t.ravel() + 1, "choice": sim["choices"][:, 0].ravel(),
                         "outcome": sim["rewards"][:, 0].ravel()})


def _fit_args(path, *extra):
    return ["fit", str(path), "--model", "rw1a1b", "--subject", "subjID", "--columns", "choice,outcome",
            "--device", "cpu", "--quiet", "--nsamples", "50", *extra]


def test_tab_separated_choices_coded_1_2_as_hbayesdm_ships_them(tmp_path, capsys):
    df = _bandit_table()
    path = tmp_path / "bandit2arm_exampleData.txt"
    df.assign(choice=df["choice"] + 1).to_csv(path, sep="\t", index=False)
    out = tmp_path / "p.csv"
    assert main(_fit_args(path, "--out", str(out))) == 2  # sniffed as TSV, then the 1/2 codes are explained
    err = capsys.readouterr().err
    assert "has value 2" in err and "subtract 1" in err and "--first-option 1" in err
    assert not out.exists()
    assert main(_fit_args(path, "--out", str(out), "--first-option", "1", "--maxit", "30")) == 0
    ref = tmp_path / "ref.csv"
    df.to_csv(tmp_path / "zero_based.csv", sep=";", index=False)
    assert main(_fit_args(tmp_path / "zero_based.csv", "--sep", ";", "--out", str(ref), "--maxit", "30")) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(ref))


def test_a_dot_in_the_reward_column_stops_before_the_fit(tmp_path, capsys):
    df = _bandit_table().astype({"outcome": object})
    df.loc[47, "outcome"] = "."
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    out = tmp_path / "p.csv"
    assert main(_fit_args(path, "--out", str(out))) == 2
    err = capsys.readouterr().err
    assert "subject 2: field 'outcome' must hold numbers but has the text '.' at data row 48 (line 49" in err
    assert not out.exists()


def test_missed_choices_are_skipped_with_na_and_missing_skip(tmp_path, capsys):
    df = _bandit_table().astype({"choice": object, "outcome": object})
    df.loc[[5, 40], ["choice", "outcome"]] = "."
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    assert main(_fit_args(path, "--na", ".", "--out", str(tmp_path / "p.csv"))) == 2
    assert "missing='skip' (torchem fit --missing skip)" in capsys.readouterr().err
    assert main(_fit_args(path, "--na", ".", "--missing", "skip", "--maxit", "20",
                          "--out", str(tmp_path / "p.csv"))) == 0
    table = pd.read_csv(tmp_path / "p.csv")
    assert table["n_trials"].tolist() == [29, 29, 30, 30, 30, 30]


def test_outputs_are_checked_before_the_fit(tmp_path, capsys, monkeypatch):
    df = _bandit_table()
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    before = path.read_bytes()
    fitted = []
    monkeypatch.setattr("torchem.cli.EMModel.fit", lambda *a, **k: fitted.append(1))
    assert main(_fit_args(path, "--out", str(path))) == 2
    assert "--out" in capsys.readouterr().err and path.read_bytes() == before
    assert main(_fit_args(path, "--summary", str(path))) == 2
    assert main(_fit_args(path, "--out", str(tmp_path))) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(_fit_args(path, "--out", str(tmp_path / "x.csv"), "--summary", str(tmp_path / "x.csv"))) == 2
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(_fit_args(path, "--out", str(blocker / "sub" / "p.csv"))) == 2
    assert "cannot create the folder" in capsys.readouterr().err
    assert fitted == []
    for bad in (["--nsamples", "0"], ["--maxit", "0"], ["--maxit", "many"], ["--first-option", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            main(_fit_args(path, *bad))
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["demo", "--subjects", "0"])
    assert fitted == []


def test_outputs_are_written_even_when_the_integrated_bic_fails(tmp_path, capsys, monkeypatch):
    df = _bandit_table()
    path = tmp_path / "d.csv"
    df.drop(columns="trial").to_csv(path, index=False)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory while drawing")

    monkeypatch.setattr("torchem.cli.EMModel.compute_integrated_bic", broken)
    out_dir = tmp_path / "results" / "today"
    assert main(_fit_args(path, "--maxit", "3", "--out", str(out_dir / "p.csv"))) == 1
    captured = capsys.readouterr()
    assert "the integrated BIC failed (RuntimeError: out of memory while drawing)" in captured.err
    assert "subjects: 6   not converged: " in captured.out and "(3)" in captured.out
    assert "warning: no trial column given or found" in captured.out
    table = pd.read_csv(out_dir / "p.csv")
    assert len(table) == 6 and np.isfinite(table["LME (Laplace)"]).all()
    summary = json.loads((tmp_path / "d_rw1a1b_summary.json").read_text())  # the default summary path
    assert summary["converged"] is False and summary["em_iterations"] == 3 and summary["BICint"] is None
    assert "out of memory" in summary["BICint_error"] and summary["warnings"]
    assert np.isfinite(summary["LME"])


def test_an_interrupted_fit_keeps_its_last_iteration(tmp_path, monkeypatch):
    from torchem.api import EMModel

    df = _bandit_table()
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    fit = EMModel.fit

    def interrupted(self, **kwargs):
        def callback(state):
            if state.iteration == 3:
                raise KeyboardInterrupt
        return fit(self, callback=callback, **kwargs)

    monkeypatch.setattr("torchem.cli.EMModel.fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(_fit_args(path, "--out", str(tmp_path / "p.csv"), "--summary", str(tmp_path / "s.json")))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["stopped"] is True and summary["converged"] is False and summary["em_iterations"] >= 2
    assert len(pd.read_csv(tmp_path / "p.csv")) == 6


def test_fit_options_come_from_the_options_dataclass(tmp_path, capsys):
    """--group, --convergence and the other FitOptions fields reach the fit; bad values stop argparse."""
    df = pd.read_csv(__import__("pathlib").Path(__file__).parent / "data" / "rw1a1b_100.csv")
    path = tmp_path / "ref.csv"
    df[df["subject"] <= 30].to_csv(path, index=False)
    out = tmp_path / "p.csv"
    args = ["fit", str(path), "--model", "rw1a1b", "--columns", "choice,reward", "--block", "block", "--device",
            "cpu", "--quiet", "--nsamples", "50", "--out", str(out)]
    assert main(args + ["--group", "student_t", "--df", "5", "--convergence", "npl", "--accelerate", "none"]) == 0
    summary = json.loads((tmp_path / "ref_rw1a1b_summary.json").read_text())
    assert summary["group"] == "student_t" and summary["stop_reason"].startswith("npl rule met")
    for bad in (["--group", "weibull"], ["--convergence", "sometimes"], ["--laplace-cap", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(args + bad)
        assert exit_info.value.code == 2
