"""Model comparison, random-effects BMS, recovery spread and identifiability."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest

from torchem import EMModel, ModelComparison
from torchem.evidence import _betainc, bms, exceedance_probabilities
from torchem.models.rl import rw1a1b_fit, rw2a1b_fit, rw2a1b_simulate
from torchem.transforms import norm2alpha, norm2beta

scipy_special = pytest.importorskip("scipy.special")


# ----------------------------------------------------------------------------- BMS
@pytest.mark.parametrize("a,b,x", [(2.0, 3.0, 0.5), (50.5, 30.2, 0.5), (0.5, 200.0, 0.01), (300.0, 280.0, 0.5),
                                   (1.0, 1.0, 0.3), (7.3, 0.8, 0.9)])
def test_betainc_matches_scipy(a, b, x):
    assert _betainc(a, b, x) == pytest.approx(scipy_special.betainc(a, b, x), rel=1e-11, abs=1e-14)


def test_two_model_exceedance_is_exact_and_matches_sampling():
    alpha = np.array([7.5, 4.2])
    xp, method = exceedance_probabilities(alpha)
    assert method == "exact"
    rng = np.random.default_rng(1)
    r = rng.dirichlet(alpha, size=400_000)
    mc = (r[:, 0] > r[:, 1]).mean()
    assert xp[0] == pytest.approx(mc, abs=3e-3)
    assert xp.sum() == pytest.approx(1.0)


def test_three_model_exceedance_monte_carlo_is_seeded_and_close_to_brute_force():
    alpha = np.array([6.0, 3.0, 2.0])
    xp1, method = exceedance_probabilities(alpha, n_samples=300_000, seed=3)
    xp2, _ = exceedance_probabilities(alpha, n_samples=300_000, seed=3)
    assert method == "monte carlo"
    np.testing.assert_array_equal(xp1, xp2)
    # brute force: integrate the Dirichlet density on a fine simplex grid
    n = 600
    g = (np.arange(n) + 0.5) / n
    r1, r2 = np.meshgrid(g, g, indexing="ij")
    r3 = 1 - r1 - r2
    inside = r3 > 0
    logd = sum((a - 1) * np.log(np.where(inside, r, 1.0)) for a, r in zip(alpha, (r1, r2, r3)))
    dens = np.where(inside, np.exp(logd), 0.0)
    dens /= dens.sum()
    stack = np.stack([r1, r2, np.where(inside, r3, -1)])
    winner = stack.argmax(0)
    brute = np.array([dens[winner == k].sum() for k in range(3)])
    np.testing.assert_allclose(xp1, brute, atol=5e-3)


def test_bms_clear_cut_case():
    rng = np.random.default_rng(0)
    lme = rng.normal(0, 1, (30, 2))
    lme[:, 0] += 8.0  # model 0 better by 8 nats for every subject
    res = bms(lme)
    assert res.exp_r[0] > 0.9
    assert res.xp[0] > 0.999
    assert res.bor < 1e-6
    assert res.pxp[0] > 0.999
    np.testing.assert_allclose(res.g.sum(1), 1.0)
    # variational fixed point: alpha = alpha0 + sum_n g
    np.testing.assert_allclose(res.alpha, 1.0 + res.g.sum(0), rtol=1e-8)


def test_bms_null_case_has_high_omnibus_risk():
    lme = np.tile(np.random.default_rng(2).normal(-50, 5, (40, 1)), (1, 2))  # identical evidence
    res = bms(lme)
    np.testing.assert_allclose(res.exp_r, [0.5, 0.5], atol=1e-9)
    assert res.bor > 0.5
    np.testing.assert_allclose(res.pxp, [0.5, 0.5], atol=1e-9)


def test_bms_free_energy_bounds_exact_two_model_evidence():
    """F1 is a lower bound on the exact log evidence of the RFX model, obtained here by quadrature."""
    rng = np.random.default_rng(4)
    lme = np.column_stack([rng.normal(0, 2, 25), rng.normal(0, 2, 25)])
    res = bms(lme)
    r = (np.arange(200_000) + 0.5) / 200_000
    m = lme.max(1, keepdims=True)
    log_lik = (np.log(r[None] * np.exp(lme[:, :1] - m) + (1 - r[None]) * np.exp(lme[:, 1:] - m)) + m).sum(0)
    top = log_lik.max()
    exact = top + math.log(np.exp(log_lik - top).mean())  # uniform prior on r
    assert res.F1 <= exact + 1e-6
    assert exact - res.F1 < 1.0
    null = np.logaddexp(lme[:, 0], lme[:, 1]).sum() - lme.shape[0] * math.log(2)
    assert res.F0 == pytest.approx(null, rel=1e-12)
    bor_exact = 1 / (1 + math.exp(exact - null))
    assert res.bor == pytest.approx(bor_exact, abs=0.15)


def test_bms_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 models"):
        bms(np.zeros((5, 1)))
    bad = np.zeros((5, 2))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="subject 3, model 1"):
        bms(bad)


# ------------------------------------------------------------------ compare / identify
def _bandit_data(sim):
    return [[c, r] for c, r in zip(sim["choices"], sim["rewards"])]


@pytest.fixture(scope="module")
def asymmetric_comparison():
    """rw2a1b agents with clearly different learning rates (0.8 for gains, 0.1 for losses)."""
    rng = np.random.default_rng(11)
    n = 80
    true = np.column_stack([norm2beta(rng.normal(0.3, 0.6, n)), norm2alpha(rng.normal(1.4, 0.3, n)),
                            norm2alpha(rng.normal(-2.2, 0.3, n))])
    sim = rw2a1b_simulate(true, nblocks=4, ntrials=24, seed=12)
    data = _bandit_data(sim)
    mc = ModelComparison([EMModel(data, rw1a1b_fit, device="cpu"), EMModel(data, rw2a1b_fit, device="cpu")],
                         ["RW1", "RW2"])
    return mc, mc.compare(bicint_kwargs={"nsamples": 300, "func_output": "all", "nll_key": "nll"},
                          r2_kwargs={"ntrials_total": 96, "noptions": 2})


def test_compare_ranks_generating_model_first(asymmetric_comparison):
    mc, df = asymmetric_comparison
    assert list(df.index) == ["RW1", "RW2"]
    for col in ("LME (largest is best)", "BICint (smallest is best)", "pseudoR^2 (largest is best)",
                "dLME", "dBICint", "dpseudoR^2", "exp_r", "xp", "pxp", "BOR"):
        assert col in df.columns
    assert df["LME (largest is best)"].idxmax() == "RW2"
    assert df["BICint (smallest is best)"].idxmin() == "RW2"
    assert df.loc["RW2", "dLME"] == 0.0 and df.loc["RW1", "dLME"] < -5
    assert df.loc["RW2", "pxp"] > 0.9
    assert df["exp_r"].sum() == pytest.approx(1.0)


def test_subject_lme_table(asymmetric_comparison):
    mc, df = asymmetric_comparison
    table = mc.subject_lme()
    assert table.shape == (80, 2) and list(table.columns) == ["RW1", "RW2"]
    lap, total, _ = mc.models[1].compute_lme()
    np.testing.assert_allclose(table["RW2"].to_numpy(), lap)
    assert total == pytest.approx(df.loc["RW2", "LME (largest is best)"])


@pytest.mark.slow
def test_identify_recovers_the_diagonal():
    rng_rates = {"RW2": lambda rng, n: np.column_stack([
        norm2beta(rng.normal(0.5, 0.5, n)), norm2alpha(rng.normal(1.4, 0.3, n)), norm2alpha(rng.normal(-2.2, 0.3, n))])}
    models = [EMModel([[np.zeros((1, 4), int), np.zeros((1, 4))]], rw1a1b_fit, device="cpu"),
              EMModel([[np.zeros((1, 4), int), np.zeros((1, 4))]], rw2a1b_fit, device="cpu")]
    mc = ModelComparison(models, ["RW1", "RW2"])
    df = mc.identify(mi_inputs=["choices", "rewards"], nrounds=2, nsubjects=60,
                     sim_kwargs={"nblocks": 4, "ntrials": 24}, fit_kwargs={"mstep_maxit": 200}, seed=5, verbose=0,
                     bicint_kwargs={"nsamples": 200}, param_samplers=rng_rates)
    assert list(df.columns) == ["Simulated", "Estimated", "LME", "BICint", "pseudoR2", "bestlme", "bestbic", "bestR2"]
    assert len(df) == 4
    won = df.set_index(["Simulated", "Estimated"])["bestlme"]
    assert won[("RW1", "RW1")] == 2 and won[("RW2", "RW2")] == 2
    assert (df.groupby("Simulated")["bestlme"].sum() == 2).all()
    fig = mc.plot_identifiability(metric="LME")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Estimated model" and ax.get_ylabel() == "Simulated model"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["RW1", "RW2"]
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["0.00", "0.00", "1.00", "1.00"]
    with pytest.raises(ValueError, match="metric"):
        mc.plot_identifiability(metric="AIC")


def test_recover_with_rounds_reports_spread():
    rng = np.random.default_rng(3)
    true = np.column_stack([norm2beta(rng.standard_normal(100)), norm2alpha(rng.standard_normal(100))])
    model = EMModel([[np.zeros((1, 4), int), np.zeros((1, 4))]], rw1a1b_fit, device="cpu")
    rec = model.recover(true, pr_inputs=["choices", "rewards"], nrounds=2, nblocks=4, ntrials=24, seed=7)
    assert rec["correlation_rounds"].shape == (2, 2)
    assert (rec["correlation_rounds"] >= 0.75).all()  # r >= 0.8 at one seed is tested in test_em.py
    np.testing.assert_allclose(rec["correlation"], rec["correlation_rounds"].mean(0))
    assert (rec["correlation_sd"] > 0).all()
    assert rec["estimated_params"].shape == (200, 2)
    fig = model.plot_recovery(rec)
    assert len(fig.axes) == 2
    assert fig.axes[0].get_xlabel() == "simulated beta" and fig.axes[1].get_ylabel() == "estimated alpha"
    assert fig.axes[0].get_title().startswith("beta: r = ")


def test_plot_scatter_importable_like_pyem():
    from torchem.plotting import plot_scatter
    from torchem.utils.plotting import plot_scatter as pyem_style

    assert plot_scatter is pyem_style
    ax = plot_scatter([1, 2, 3], "x", [1, 2, 2.5], "y")
    assert ax.get_xlabel() == "x" and ax.get_ylabel() == "y" and ax.get_title().startswith("r = ")


def test_compare_import_paths():
    import torchem
    from torchem.core.compare import ModelComparison as pyem_path

    assert torchem.ModelComparison is ModelComparison is pyem_path
    with pytest.raises(ValueError, match="names"):
        ModelComparison([object()], ["a", "b"])


def test_comparing_group_families_by_laplace_lme_warns(small_data):
    """A heavy-tailed group's LME is a variational bound: comparing families by it gets a stored warning."""
    _, _, data = small_data
    gauss, cauchy = EMModel(data, rw1a1b_fit, device="cpu"), EMModel(data, rw1a1b_fit, device="cpu")
    gauss.fit(verbose=0)
    cauchy.fit(verbose=0, group="cauchy")
    assert gauss.result.lme is None and cauchy.result.lme is not None
    with pytest.warns(RuntimeWarning, match="variational lower bound"):
        df = ModelComparison([gauss, cauchy], ["gauss", "cauchy"]).compare(bicint_kwargs={"nsamples": 200})
    assert len(df.attrs["warnings"]) == 1 and "cauchy" in df.attrs["warnings"][0]
    same = ModelComparison([gauss, EMModel(data, rw1a1b_fit, device="cpu")]).compare(bicint_kwargs={"nsamples": 200})
    assert same.attrs["warnings"] == []
