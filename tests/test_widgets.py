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
    assert dash.progress.bar_style == ("success" if res.convergence else "warning")
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
    dash.max_iter.value, dash.conv_crit.value = 500, 1e-12  # never converges by itself
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
    mapping = loader.mapping
    assert {k: mapping[k] for k in ("subject", "columns", "block", "trial")} == {
        "subject": "participant", "columns": ["choice", "reward"], "block": "block", "trial": "trial"}
    assert mapping["categorical"] == [(0,)] and mapping["missing"] == "error" and mapping["first_option"] == 0
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


# ------------------------------------------------------------------ polish
def test_history_title_clears_the_axes_labels():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from torchem.widgets._figures import comparison_figure, history_figure

    hist = pd.DataFrame({"iteration": np.arange(1, 21), "NPL": np.linspace(3000, 2300, 20),
                         "mu[beta]": np.linspace(0, -0.3, 20), "sigma[beta]": np.linspace(1, 0.6, 20),
                         "mu[alpha]": np.linspace(0, 0.1, 20), "sigma[alpha]": np.linspace(1, 0.7, 20)})
    table = pd.DataFrame({"dLME": [0.0, -4.0], "pxp": [0.9, 0.1]}, index=["RW1", "RW2"])
    for fig in (history_figure(hist, ["beta", "alpha"], title="rw1a1b: EM history", figsize=(7.5, 3.0)),
                comparison_figure(table)):
        for dpi in (90, 100):
            fig.set_dpi(dpi)
            FigureCanvasAgg(fig).draw()
            renderer = fig.canvas.get_renderer()
            page = fig.bbox
            # the title keeps a visible gap (3 px) to every axis and its labels
            title = fig._suptitle.get_window_extent(renderer).padded(3) if fig._suptitle is not None else None
            for ax in fig.axes:
                box = ax.get_tightbbox(renderer)
                assert box.y1 <= page.y1 + 0.5 and box.x0 >= page.x0 - 0.5, "an axis label is cut off"
                assert title is None or not title.overlaps(box), "the title overlaps an axis label"


def _slow(fit):
    def slow_fit(params, *data, mask=None, output="nll"):
        time.sleep(0.05)
        return fit(params, *data, mask=mask, output=output)
    slow_fit.__dict__.update(fit.__dict__)  # the library model's names, transforms and data roles
    return slow_fit


def test_a_refit_starts_from_an_empty_live_plot(sim):
    dash = tw.FitDashboard(rw1a1b_fit, sim["all_data"])
    dash.max_iter.value, dash.conv_crit.value = 3, 1e-12
    _fit(dash, 60)
    old = dash.live_plot.outputs
    assert old
    dash.candidates["rw1a1b"] = _slow(rw1a1b_fit)
    dash.fit()
    try:
        assert not dash.history, "the first iteration of the re-fit ended too soon for this check"
        assert dash.live_plot.outputs != old  # the previous fit's curve is gone at once
    finally:
        assert dash.wait(120)
    assert len(dash.history) == dash.result.n_iter == 3


def test_a_fit_that_hits_the_cap_is_shown_as_not_converged(sim):
    dash = tw.FitDashboard(rw1a1b_fit, sim["all_data"])
    dash.max_iter.value, dash.conv_crit.value = 3, 1e-12
    _fit(dash, 60)
    assert dash.state == "done" and dash.result.convergence is False and dash.summary["converged"] is False
    assert dash.progress.bar_style == "warning"
    assert "Fit finished: rw1a1b, not converged: " in dash.status.value
    assert "torchem-not-converged" in dash.results_summary.value
    dash.max_iter.value, dash.conv_crit.value = 200, 1.0
    _fit(dash, 120)
    assert dash.result.convergence and dash.progress.bar_style == "success"
    assert "not converged" not in dash.status.value and "torchem-not-converged" not in dash.results_summary.value


def test_natural_space_group_means_and_the_table_download(sim):
    import base64
    import io

    dash = tw.FitDashboard(rw1a1b_fit, sim["all_data"])
    dash.max_iter.value, dash.conv_crit.value = 40, 1e-2
    _fit(dash, 120)
    g = dash.group_table
    mu = dash.result.posterior_mu.numpy()
    np.testing.assert_allclose(g["mu (natural)"], [norm2beta(mu[0]), norm2alpha(mu[1])], rtol=1e-12)
    np.testing.assert_allclose(g["subjects' mean (natural)"], dash.results_df[["beta", "alpha"]].mean(0), rtol=1e-12)
    assert "torchem-group" in dash.results_summary.value and "mu (natural)" in dash.results_summary.value
    link = dash.download.value
    assert 'download="rw1a1b_subjects.csv"' in link
    csv = base64.b64decode(link.split("base64,", 1)[1].split('"', 1)[0]).decode()
    back = pd.read_csv(io.StringIO(csv), index_col=0)
    np.testing.assert_allclose(back[["beta", "alpha", "NLL"]].to_numpy(),
                               dash.results_df[["beta", "alpha", "NLL"]].to_numpy(), rtol=1e-9)
    # the table scrolls inside its own box instead of being cut off at the right
    box = next(c for c in dash.tabs.children[1].children if isinstance(c, tw.dashboard.W.Box)
               and dash.results_table in c.children)
    assert box.layout.overflow == "auto" and box.layout.max_width == "100%"


def test_data_warnings_are_shown(sim):
    df = _long_df(sim).drop(columns="trial")
    dash = tw.FitDashboard(rw1a1b_fit, df)
    dash.max_iter.value = 3
    _fit(dash, 60)
    assert dash.state == "done", dash.error
    assert any("no trial column" in w for w in dash.summary["warnings"])
    assert "torchem-warning" in dash.results_summary.value


def test_data_tab_builds_column_groups_for_a_regression():
    from torchem.models.glm import glm_fit, glm_simulate

    true = np.column_stack([np.full(8, 0.5), np.linspace(-1, 1, 8), np.full(8, -1.0), np.ones(8)])
    sim = glm_simulate(true, ntrials=40, seed=0)
    S_, T_, _ = sim["X"].shape
    s, t = np.meshgrid(np.arange(S_), np.arange(T_), indexing="ij")
    df = pd.DataFrame({"subject": s.ravel(), "trial": t.ravel(), "x0": sim["X"][..., 0].ravel(),
                       "x1": sim["X"][..., 1].ravel(), "x2": sim["X"][..., 2].ravel(), "y": sim["Y"].ravel()})
    dash = tw.FitDashboard({"glm": glm_fit}, df)
    loader = dash.loader
    assert loader.field_dropdowns["X"].value == "[x0, x1, x2]"  # numbered columns are guessed as a group
    assert loader.mapping["columns"] == [["x0", "x1", "x2"], "y"]
    assert loader.batch is not None and tuple(loader.batch.fields["[x0, x1, x2]"].shape) == (S_, T_, 3)
    loader.field_dropdowns["X"].value = "[x0, x2]"  # typed by hand
    assert loader.build().fields["[x0, x2]"].shape[-1] == 2
    loader.field_dropdowns["X"].value = "[x0, x1, x2]"
    loader.build()
    dash.max_iter.value = 30
    _fit(dash, 120)
    assert dash.state == "done", dash.error
    assert list(dash.results_df.columns[:4]) == ["b0", "b1", "b2", "sigma"]
    assert np.corrcoef(dash.results_df["b1"], true[:, 1])[0, 1] > 0.9


def test_data_tab_offers_the_recodings(sim):
    df = _long_df(sim)
    df["choice"] = df["choice"] + 1  # coded 1/2
    df.loc[5, ["choice", "reward"]] = np.nan  # one missed trial
    loader = tw.DataLoader(model=rw1a1b_fit, df=df)
    assert loader.batch is None and not loader.first_option.disabled and not loader.skip_missing.disabled
    loader.skip_missing.value = True
    assert loader.build() is None and "options coded from 1" in loader.error
    loader.first_option.value = True
    batch = loader.build()
    assert batch is not None and int(batch.n_obs.sum()) == len(df) - 1
    np.testing.assert_array_equal(batch.fields["choice"][batch.mask].numpy(),
                                  df["choice"].dropna().to_numpy() - 1)
    from torchem.models.bayes import bayes_fit
    loader.set_model(bayes_fit)  # no skipped trials defined: the box is disabled and cleared
    assert loader.skip_missing.disabled and loader.skip_missing.value is False
    tsv = _long_df(sim).to_csv(sep="\t", index=False).encode()
    loader.set_model(rw1a1b_fit)
    loader.load_csv(tsv, "data.tsv")
    assert loader.error is None and loader.df.shape[1] == 5
