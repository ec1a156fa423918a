"""The Jupyter widget layer, driven through its traits and button handlers (no browser)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("ipywidgets")

from torchem import norm2alpha, norm2beta  # noqa: E402
from torchem.models.rl import rw1a1b_fit, rw1a1b_simulate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _import_widgets():
    """``torchem.widgets``: installed (``pip install -e .``) or, in a bare checkout, loaded from ``widgets/``."""
    try:
        import torchem.widgets as tw
        return tw
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "torchem.widgets", ROOT / "widgets" / "__init__.py", submodule_search_locations=[str(ROOT / "widgets")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["torchem.widgets"] = mod
        spec.loader.exec_module(mod)
        return mod


tw = _import_widgets()
S, NBLOCKS, NTRIALS = 16, 2, 16


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sim():
    rng = np.random.default_rng(0)
    true = np.column_stack([norm2beta(rng.standard_normal(S)), norm2alpha(rng.standard_normal(S))])
    out = rw1a1b_simulate(true, nblocks=NBLOCKS, ntrials=NTRIALS, seed=1)
    out["true"] = true
    out["all_data"] = [[c, r] for c, r in zip(out["choices"], out["rewards"])]
    return out


def _long_df(sim) -> pd.DataFrame:
    rows = [{"participant": f"s{i:02d}", "block": b, "trial": t, "choice": int(sim["choices"][i, b, t]),
             "reward": float(sim["rewards"][i, b, t])}
            for i in range(S) for b in range(NBLOCKS) for t in range(NTRIALS)]
    return pd.DataFrame(rows)


def _body_rows(table_html: str) -> int:
    return table_html.split("<tbody>", 1)[1].count("<tr")


def _fit(dash, timeout: float = 120.0):
    dash.fit_button.click()
    assert dash.wait(timeout), "the fit did not end in time"
    return dash


def test_core_does_not_import_ipywidgets():
    code = "import sys, torchem, torchem.models, torchem.compare; sys.exit('ipywidgets' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_fit_runs_to_the_end_and_fills_results(sim):
    dash = tw.FitDashboard(rw1a1b_fit, sim["all_data"], true_params=sim["true"])
    assert list(dash.model_picker.options) == ["rw1a1b"]
    dash.max_iter.value, dash.conv_crit.value = 40, 1e-2
    dash.fit_button.click()
    assert dash.running and dash.stop_button.disabled is False and dash.fit_button.disabled is True
    assert dash.wait(120)
    res = dash.result
    assert dash.state == "done" and dash.error is None and dash.error_area.value == ""
    # the progress bar reached its end, one history entry per EM iteration
    assert dash.progress.value == dash.progress.max == res.n_iter
    assert dash.progress.bar_style == "success"
    assert len(dash.history) == res.n_iter == len(res.history)
    assert [s.iteration for s in dash.history] == list(range(1, res.n_iter + 1))
    np.testing.assert_allclose([s.npl for s in dash.history], res.history["NPL"].to_numpy())
    # results: one row per subject, evidence, plots (recovery, history, posterior predictive check), buttons back to idle
    assert len(dash.results_df) == S and list(dash.results_df.columns[:2]) == ["beta", "alpha"]
    assert _body_rows(dash.results_table.value) == S
    assert "torchem-results" in dash.results_table.value
    assert np.isfinite(dash.summary["LME"]) and np.isfinite(dash.summary["iBIC"])
    assert "LME" in dash.results_summary.value and "iBIC" in dash.results_summary.value
    assert len(dash.results_plot.outputs) == 3 and all("image/png" in o["data"] for o in dash.results_plot.outputs)
    # the posterior predictive check of the fit: the bandit statistics, observed inside most of their bands
    ppc = dash.ppc_result
    assert ppc.nsims == dash.ppc_nsims and len(ppc.subject_ids) == S
    assert set(ppc.statistics) == {"p(better) by trial", "p(better) by block", "win-stay / lose-shift"}
    assert (ppc.coverage("subject") > 0.8).all()
    assert len(dash.live_plot.outputs) == 1
    assert dash.tabs.selected_index == 1
    assert dash.fit_button.disabled is False and dash.stop_button.disabled is True
    assert "rw1a1b" in dash.fitted


def test_stop_ends_early_and_keeps_the_partial_result(sim):
    dash = tw.FitDashboard(None, sim["all_data"])  # the library models
    assert {"rw1a1b", "rw2a1b"} <= set(dash.model_picker.options)
    dash.model_picker.value = "rw1a1b"
    dash.max_iter.value, dash.conv_crit.value = 500, 0.0  # never converges by itself
    dash.fit_button.click()
    t0 = time.monotonic()
    while len(dash.history) < 2 and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    assert len(dash.history) >= 2
    dash.stop_button.click()
    assert dash.wait(60)
    res = dash.result
    assert dash.state == "stopped" and res.stopped and not res.convergence
    assert res.n_iter < 500 and len(dash.history) == res.n_iter
    assert dash.progress.value == dash.progress.max == res.n_iter and dash.progress.bar_style == "warning"
    assert len(dash.results_df) == S
    assert "stopped" in dash.status.value


def test_fit_every_model_shows_a_comparison(sim):
    from torchem.models.rl import rw2a1b_fit

    dash = tw.FitDashboard({"RW1": rw1a1b_fit, "RW2": rw2a1b_fit}, sim["all_data"], ibic_nsamples=200)
    dash.fit_all.value = True
    dash.max_iter.value, dash.conv_crit.value = 15, 1e-2
    _fit(dash, 180)
    assert dash.state == "done", dash.error
    assert set(dash.fitted) == {"RW1", "RW2"}
    assert list(dash.comparison_df.index) == ["RW1", "RW2"]
    assert {"pxp", "exp_r", "dLME"} <= set(dash.comparison_df.columns)
    assert "torchem-comparison" in dash.results_summary.value
    assert len(dash.results_plot.outputs) == 3  # comparison, history, posterior predictive check


def test_bad_data_is_shown_not_raised(sim):
    bad = [[c.copy(), r.copy()] for c, r in sim["all_data"]]
    bad[3][1] = bad[3][1].astype(float)
    bad[3][1][0, 2] = np.nan
    dash = tw.FitDashboard(rw1a1b_fit, bad)
    _fit(dash, 30)
    assert dash.state == "error" and "ValueError" in dash.error
    assert "torchem-error" in dash.error_area.value and "NaN" in dash.error_area.value
    assert dash.progress.bar_style == "danger"
    assert dash.fit_button.disabled is False and dash.stop_button.disabled is True


def test_a_model_that_raises_is_shown(sim):
    def broken_fit(params, choices, rewards, mask=None, output="nll"):
        raise RuntimeError("boom in the likelihood")

    dash = tw.FitDashboard(broken_fit, sim["all_data"], model_kwargs={"param_names": ["a"]})
    assert list(dash.model_picker.options) == ["broken"]
    _fit(dash, 30)
    assert dash.state == "error" and "boom in the likelihood" in dash.error
    assert "boom in the likelihood" in dash.error_area.value
    # the dashboard is still alive: a good model fits afterwards
    dash.candidates["broken"] = rw1a1b_fit
    dash.model_kwargs = {}
    dash.max_iter.value = 3
    _fit(dash, 60)
    assert dash.state == "done" and dash.error_area.value == ""


def test_data_loader_upload_mapping_preview_and_errors(sim):
    df = _long_df(sim)
    got = []
    loader = tw.DataLoader(model=rw1a1b_fit, on_batch=lambda b, _l: got.append(b))
    assert list(loader.field_dropdowns) == ["choices", "rewards"]
    content = df.sample(frac=1.0, random_state=0).to_csv(index=False).encode()
    loader.upload.value = ({"name": "data.csv", "type": "text/csv", "size": len(content),
                            "content": memoryview(content),
                            "last_modified": datetime.now(timezone.utc)},)
    assert loader.df is not None and len(loader.df) == len(df)
    # guessed mapping; the preview shows the first rows
    assert loader.mapping == {"subject": "participant", "columns": ["choice", "reward"],
                              "block": "block", "trial": "trial"}
    assert _body_rows(loader.preview.value) == 5
    batch = loader.build_button.click() or loader.batch
    assert batch is not None and batch.n_subjects == S and tuple(batch.trial_shape) == (NBLOCKS, NTRIALS)
    assert got and got[-1] is batch and "16 subjects" in loader.message.value
    # the rows were shuffled; (block, trial) order is restored
    np.testing.assert_array_equal(batch.data[0].cpu().numpy(), sim["choices"])
    # validation errors appear in place
    loader.field_dropdowns["choices"].value = "participant"
    assert loader.build() is None and "more than one role" in loader.error
    loader.field_dropdowns["choices"].value = "trial"  # codes 0..15: out of range for a two-armed bandit
    assert loader.build() is None and "torchem-error" in loader.message.value
    loader.field_dropdowns["choices"].value = "choice"
    loader.load_csv(b"\x00\x01 not a csv", "junk.csv")
    assert loader.error and "junk.csv" in loader.error


def test_dashboard_with_a_dataframe_builds_through_the_data_tab(sim):
    df = _long_df(sim)
    dash = tw.FitDashboard(rw1a1b_fit, df)
    assert dash.tabs.selected_index == 2 and dash.loader.batch is not None
    assert "16 subjects" in dash.data_label.value
    dash.max_iter.value = 3
    _fit(dash, 60)
    assert dash.state == "done", dash.error
    assert list(dash.results_df.index) == sorted(df["participant"].unique())
