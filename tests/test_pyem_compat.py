"""pyEM 1.0 compatibility: its import paths and names, used the way pyEM's documentation uses them.

Values are checked against pyEM 1.0.1's own outputs where the project has them
(``tests/data``: the 100-subject reference fit and the group M-step families),
against independent computations (scipy quadrature, hand-derived formulas),
and against torchem's own methods.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
import torch

from torchem import EMModel, FitResult
from torchem.core.compare import ComparisonRow, ModelComparison, compare_models
from torchem.core.em import EMConfig, EMfit
from torchem.core.groupdist import make_group
from torchem.core.modelspec import ModelSpec
from torchem.core.optim import OptimConfig
from torchem.core.posterior import RecoveryResult, parameter_recovery
from torchem.core.priors import GaussianPrior, default_prior
from torchem.models import MODELS
from torchem.utils import plotting
from torchem.utils.math import alpha2norm, beta2norm, calc_fval, norm2alpha, norm2beta, softmax
from torchem.utils.stats import calc_BICint, calc_LME, pseudo_r2_from_nll

DATA = Path(__file__).resolve().parent / "data"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load_example():
    """``docs/pyem_style_rw.py``: the migration guide's worked example."""
    spec = importlib.util.spec_from_file_location("pyem_style_rw", DOCS / "pyem_style_rw.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture(scope="module")
def reference():
    """pyEM-style ``all_data`` of the reference set (choices 'A'/'B', (blocks, trials)) and pyEM's fit."""
    df = pd.read_csv(DATA / "rw1a1b_100.csv").sort_values(["subject", "block", "trial"])
    all_data = [[g.choice.to_numpy().reshape(g.block.nunique(), -1), g.reward.to_numpy().reshape(g.block.nunique(), -1)]
                for _, g in df.groupby("subject")]
    with open(DATA / "rw1a1b_100_pyem.json") as fh:
        return all_data, json.load(fh)


@pytest.fixture(scope="module")
def reference_emfit(reference):
    """``EMfit`` of the reference set with pyEM's default config."""
    from torchem.models.rl_mf import rw1a1b_fit

    all_data, _ = reference
    return EMfit(all_data, rw1a1b_fit, ["beta", "alpha"], verbose=0, config=EMConfig(seed=0, compute_lme=True))


def _bandit(n=30, nblocks=3, ntrials=24, seed=0):
    from torchem.models.rl_mf import rw1a1b_sim

    rng = np.random.default_rng(seed)
    true = np.column_stack([norm2beta(rng.normal(size=n)), norm2alpha(rng.normal(size=n))])
    sim = rw1a1b_sim(true, nblocks=nblocks, ntrials=ntrials, seed=seed + 1)
    return true, sim, [[sim["choices"][s], sim["rewards"][s]] for s in range(n)]


# ------------------------------------------------------------------------- reference fit (EMfit, stats)
def test_emfit_reference_set_agrees_with_pyem(reference, reference_emfit):
    _, ref = reference
    out = reference_emfit
    assert out["m"].shape == (2, 100) and out["inv_h"].shape == (2, 2, 100)  # pyEM's layout
    assert out["convergence"]
    np.testing.assert_allclose(out["posterior"]["mu"], ref["group_mu_normalized"], atol=1e-3)
    np.testing.assert_allclose(out["posterior"]["sigma"], ref["group_var_normalized"], atol=3e-3)
    assert abs(out["NPL"].sum() - ref["NPL_sum"]) < 0.05
    pyem_m = np.asarray(ref["subject_map_normalized"]).T
    assert np.abs(out["m"] - pyem_m).max() < 0.02
    assert min(np.corrcoef(out["m"][j], pyem_m[j])[0, 1] for j in range(2)) > 0.99999
    np.testing.assert_allclose(out["NLL"] + out["NLPrior"], out["NPL"], atol=1e-10)
    # the Laplace evidence from pyEM's (P, P, S) arrays: exact Hessians instead of BFGS's estimate
    lap, lme, good = calc_LME(out["inv_h"], out["NPL"])
    assert abs(lme - ref["LME"]) < 0.5 and good.all()
    assert lme == pytest.approx(out["lme"], abs=1e-6)
    # recovery against the generating parameters, as pyEM reports it
    true = pd.read_csv(DATA / "rw1a1b_100_true.csv").sort_values("subject")[["beta", "alpha"]].to_numpy()
    est = np.column_stack([norm2beta(out["m"][0]), norm2alpha(out["m"][1])])
    np.testing.assert_allclose(parameter_recovery(true, est).corr, ref["recovery_r"], atol=2e-3)


def test_calc_bicint_reference_set(reference, reference_emfit):
    from torchem.models.rl_mf import rw1a1b_fit

    all_data, ref = reference
    out = reference_emfit
    mu, sigma = out["posterior"]["mu"], out["posterior"]["sigma"]
    values = [calc_BICint(all_data, ["beta", "alpha"], mu, sigma, rw1a1b_fit, nsamples=500, seed=s) for s in range(3)]
    # pyEM's value (500 draws, its own Monte Carlo error) lies within the spread of ours
    assert abs(np.mean(values) - ref["BICint_pyem_convention"]) < 8.0
    # the same draws as EMModel.compute_integrated_bic with pyEM's penalty, and n defaults to one subject's trials
    model = out["model"]
    assert values[0] == pytest.approx(model.compute_integrated_bic(nsamples=500, func_output="all", nll_key="nll",
                                                                   convention="pyem"), abs=1e-8)
    moved = calc_BICint(all_data, ["beta", "alpha"], mu, sigma, rw1a1b_fit, nsamples=500, seed=0, ntrials_total=200)
    assert moved - values[0] == pytest.approx(2 * (np.log(200) - np.log(96)), abs=1e-8)


def test_calc_bicint_matches_quadrature():
    """One-parameter Bernoulli model: the integrated likelihood by quadrature, independently of torchem."""
    rng = np.random.default_rng(3)
    y = [rng.binomial(1, p, size=40) for p in (0.2, 0.5, 0.8, 0.65)]
    all_data = [[yi] for yi in y]

    def bern(params, y, prior=None, output="npl"):
        yy = y.to(params.dtype)
        nll = -(yy * torch.nn.functional.logsigmoid(params[0]) + (1 - yy) * torch.nn.functional.logsigmoid(
            -params[0])).sum()
        return calc_fval(nll, params, prior=prior, output=output)

    mu, var = np.array([0.3]), np.array([1.5])
    ilog = []
    for yi in y:
        k, n = yi.sum(), len(yi)
        f = lambda x: np.exp(k * scipy.special.log_expit(x) + (n - k) * scipy.special.log_expit(-x)) \
            * scipy.stats.norm.pdf(x, mu[0], np.sqrt(var[0]))  # noqa: E731
        ilog.append(np.log(scipy.integrate.quad(f, -30, 30)[0]))
    exact = -2 * np.sum(ilog) + 1 * np.log(40)
    got = calc_BICint(all_data, ["logit"], mu, var, bern, nsamples=20000, seed=1)
    assert got == pytest.approx(exact, abs=0.1)


def test_calc_lme_formula_and_pyem_layout():
    nparams, nsubjects = 2, 3
    inv_h = np.stack([np.eye(nparams)] * nsubjects, axis=-1)
    NPL = np.array([1.0, 2.0, 3.0])
    lap, lme, good = calc_LME(inv_h, NPL)
    expected = -NPL + nparams / 2 * np.log(2 * np.pi)
    np.testing.assert_allclose(lap, expected)
    assert lme == pytest.approx(expected.sum() - nparams * np.log(nsubjects))
    assert good.tolist() == [1.0, 1.0, 1.0]
    lap1, _, _ = calc_LME(np.diag([4.0, 1.0])[:, :, None], np.array([0.0]))
    assert lap1[0] == pytest.approx(0.5 * np.log(4.0) + np.log(2 * np.pi))
    # a subject whose inverse Hessian is not positive definite gets the mean of the others (pyEM)
    bad = inv_h.copy()
    bad[:, :, 1] = np.diag([1.0, -1.0])
    lap2, _, good2 = calc_LME(bad, NPL)
    assert good2.tolist() == [1.0, 0.0, 1.0] and lap2[1] == pytest.approx((expected[0] + expected[2]) / 2)
    with pytest.raises(ValueError, match="subjects-first"):
        calc_LME(np.stack([np.eye(2)] * 5), np.zeros(5))  # torchem's (S, P, P)


def test_pseudo_r2_from_nll():
    nll = np.array([50.0, 60.0, 70.0])
    assert pseudo_r2_from_nll(nll, 96, 2) == pytest.approx(1 - 60 / (96 * np.log(2)))
    assert pseudo_r2_from_nll(nll, 96, 3, metric="mean") == pytest.approx(1 - 60 / (96 * np.log(3)))
    assert pseudo_r2_from_nll(nll, np.array([96, 100, 120]), 2) == pytest.approx(1 - 60 / (100 * np.log(2)))


# ------------------------------------------------------------------------------- group M-step families
@pytest.mark.parametrize("case", ["reference_maps", "reference_maps_with_5_outliers"])
@pytest.mark.parametrize("family,tol", [("gaussian", 1e-6), ("laplace", 1e-4), ("student_t", 1e-6),
                                        ("cauchy", 1e-6)])
def test_groupdist_matches_pyem(case, family, tol):
    with open(DATA / "pyem_group_mstep.json") as fh:
        ref = json.load(fh)
    m, inv_h = np.asarray(ref["cases"][case]["m"]), np.asarray(ref["inv_h"])
    want = ref["cases"][case]["families"][family]
    g = make_group(family)
    hyper = g.update(m, inv_h)
    mean, var, ok = g.moments(hyper)
    np.testing.assert_allclose(mean, want["mean"], atol=tol, rtol=0)
    np.testing.assert_allclose(var, want["variance"], atol=tol, rtol=tol)
    assert ok == want["ok"]
    if family != "gaussian":
        np.testing.assert_allclose(hyper["loc"], want["hyper"]["loc"], atol=tol)
        np.testing.assert_allclose(hyper["scale"], want["hyper"]["scale"], atol=tol)
    prior = g.make_prior(hyper)
    np.testing.assert_allclose(prior.mean.numpy(), want["mean"], atol=tol)


def test_emfit_config_maps_onto_fit_options():
    from torchem.models.rl_mf import rw1a1b_fit

    _, _, all_data = _bandit(20)
    cfg = EMConfig(mstep_maxit=40, estep_maxit=77, seed=3, mstep="student_t", df=5.0, convergence_method="median",
                   optim=OptimConfig(max_restarts=1, options={"gtol": 1e-6}), max_subject_retries=2)
    out = EMfit(all_data, rw1a1b_fit, ["beta", "alpha"], verbose=0, config=cfg, convergence_crit=1e-4)
    opts = out["fit_result"].options
    assert (opts.mstep_maxit, opts.estep_maxit, opts.seed, opts.group, opts.df) == (40, 77, 3, "student_t", 5.0)
    assert (opts.convergence, opts.convergence_method, opts.convergence_crit) == ("npl", "median", 1e-4)
    assert (opts.max_restarts, opts.gtol) == (3, 1e-6)
    assert out["fit_result"].group_name == "student_t" and np.isfinite(out["m"]).all()
    with pytest.warns(RuntimeWarning, match="batched L-BFGS"):
        EMfit(all_data, rw1a1b_fit, verbose=0, optim_method="Nelder-Mead", mstep_maxit=2)


# ------------------------------------------------------------------------ simulation-only models
def test_simulation_only_model_recover_fills_data():
    from torchem.models.rl_mf import rw1a1b_fit, rw1a1b_sim

    rng = np.random.default_rng(0)
    true = np.column_stack([norm2beta(rng.normal(size=60)), norm2alpha(rng.normal(size=60))])
    model = EMModel(all_data=None, fit_func=rw1a1b_fit, param_names=["beta", "alpha"],
                    param_xform=[norm2beta, norm2alpha], simulate_func=rw1a1b_sim)
    assert model.all_data is None and "no data" in repr(model)
    with pytest.raises(ValueError, match="no data"):
        model.fit(verbose=0)
    rec = model.recover(true, pr_inputs=["choices", "rewards"], nblocks=4, ntrials=24, seed=1)
    assert rec["correlation"].shape == (2,) and (rec["correlation"] > 0.7).all()
    assert rec["true_params"].shape == rec["estimated_params"].shape == (60, 2)
    # the model now holds the simulated data and their fit (pyEM's behaviour for all_data=None)
    assert len(model.all_data) == 60 and model.result is rec["fit_result"]
    assert model.outfit["params"].shape == (60, 2) and model.outfit["EV"].shape[0] == 60
    np.testing.assert_allclose(model.subject_params().to_numpy(), rec["estimated_params"])
    fig = model.plot_recovery(rec, show=False)
    assert len(fig.axes) == 2
    plt.close(fig)


def test_recover_leaves_a_model_with_data_unchanged():
    true, _, all_data = _bandit(30)
    from torchem.models.rl_mf import rw1a1b_fit

    model = EMModel(all_data, rw1a1b_fit)
    res = model.fit(verbose=0)
    rec = model.recover(true, simulate_func=example_sim_twice, nblocks=3, ntrials=24, seed=5)
    assert model.result is res and model.all_data is all_data
    assert rec["recovery_model"].result is rec["fit_result"] and rec["sim"]["simulated_by"] == "example_sim_twice"


def example_sim_twice(params, **kwargs):
    """A simulator given to recover(simulate_func=...) (pyEM's argument)."""
    from torchem.models.rl_mf import rw1a1b_sim

    return {**rw1a1b_sim(params, **kwargs), "simulated_by": "example_sim_twice"}


def test_identify_with_simulation_only_models():
    from torchem.models.rl_mf import rw1a1b_fit, rw1a1b_sim, rw2a1b_fit, rw2a1b_sim

    model1 = EMModel(all_data=None, fit_func=rw1a1b_fit, param_names=["beta", "alpha"],
                     param_xform=[norm2beta, norm2alpha], simulate_func=rw1a1b_sim)
    model2 = EMModel(all_data=None, fit_func=rw2a1b_fit, param_names=["beta", "alpha_pos", "alpha_neg"],
                     param_xform=[norm2beta, norm2alpha, norm2alpha], simulate_func=rw2a1b_sim)
    mc = ModelComparison([model1, model2], ["RW1", "RW2"])
    df = mc.identify(mi_inputs=["choices", "rewards"], nrounds=2, nsubjects=30,
                     sim_kwargs={"nblocks": 4, "ntrials": 24}, fit_kwargs={"mstep_maxit": 30}, seed=0, verbose=0)
    assert {"Simulated", "Estimated", "LME", "BICint", "pseudoR2", "bestlme", "bestbic", "bestR2"} <= set(df.columns)
    assert len(df) == 4
    own = df[(df.Simulated == "RW1") & (df.Estimated == "RW1")]
    assert int(own.bestlme.iloc[0]) == 2 and int(own.bestbic.iloc[0]) == 2
    for sim_name in ("RW1", "RW2"):
        assert df.loc[df.Simulated == sim_name, "bestbic"].sum() == 2
    # each data-less model now holds the data simulated from itself and its fit
    assert len(model1.all_data) == 30 and model1.result is not None and model2.result.n_params == 3
    fig = mc.plot_identifiability(metric="LME")
    plt.close(fig)


def test_model_comparison_names_optional():
    m = EMModel(None, MODELS["rw1a1b"])
    assert ModelComparison([m, m.with_data(_bandit(5)[2])]).names == ["Model_1", "Model_2"]
    assert ModelComparison([m], model_names=["RW"]).names == ["RW"]


# ----------------------------------------------------------------------------- compare_models
def test_compare_models_rows_and_tuples():
    from torchem.models.rl_mf import rw1a1b_fit, rw2a1b_fit

    _, _, all_data = _bandit(30, seed=4)
    m1, m2 = EMModel(all_data, rw1a1b_fit), EMModel(all_data, rw2a1b_fit)
    r1 = m1.fit(verbose=0)
    m2.fit(verbose=0)
    rows = compare_models([m2, m1], bicint_kwargs={"nsamples": 300, "func_output": "all", "nll_key": "nll"},
                          r2_kwargs={"ntrials_total": 72, "noptions": 2})
    assert all(isinstance(r, ComparisonRow) for r in rows)
    assert [r.name for r in rows] == ["rw1a1b_fit", "rw2a1b_fit"]  # sorted by LME, largest first
    assert rows[0].LME == pytest.approx(m1.compute_lme()[1])
    assert rows[0].BICint == pytest.approx(m1.compute_integrated_bic(300, seed=0, convention="pyem"))
    assert rows[0].R2 == pytest.approx(pseudo_r2_from_nll(r1.NLL.numpy(), 72, 2))
    # pyEM's tuple form, with a torchem FitResult, its __dict__, or EMfit's pyEM-layout dict
    out = EMfit(all_data, rw1a1b_fit, verbose=0, seed=0)
    rows = compare_models([("a", r1, all_data, rw1a1b_fit), ("b", r1.__dict__, all_data, rw1a1b_fit),
                           ("c", out, all_data, rw1a1b_fit)], ["A", "B", "C"], bicint_kwargs={"nsamples": 300},
                          r2_kwargs={"ntrials_total": 72, "noptions": 2}, metric_order=("BICint",))
    by = {r.name: r for r in rows}
    assert by["A"].LME == pytest.approx(m1.compute_lme()[1], abs=1e-6)
    assert by["B"].LME == pytest.approx(by["A"].LME) and by["B"].BICint == pytest.approx(by["A"].BICint)
    assert by["C"].LME == pytest.approx(out["lme"] if "lme" in out else calc_LME(out["inv_h"], out["NPL"])[1])
    assert [r.BICint for r in rows] == sorted(r.BICint for r in rows)
    unfitted = compare_models([EMModel(all_data, rw1a1b_fit), m1])
    assert unfitted[-1].LME is None and unfitted[0].LME == pytest.approx(rows[0].LME, abs=1.0)


# ------------------------------------------------------------------------------------ model bundles
def test_every_library_model_has_a_bundle_and_sim_alias():
    for name, fit in MODELS.items():
        module = sys.modules[fit.__module__]
        spec = getattr(module, f"{name}_model")
        sim = getattr(module, f"{name}_sim")
        assert isinstance(spec, ModelSpec) and spec.id == name
        assert spec.fit is fit and spec.sim is sim is fit.simulate
        assert spec.spec["inputs"] == list(fit.inputs) and list(spec.spec["params"]) == list(fit.param_names)
        assert all(p in spec.desc for p in fit.param_names) and spec.params is None
        assert f"{name}_model" in module.__all__ and f"{name}_sim" in module.__all__


def test_rl_mf_and_rl_mb_modules():
    from torchem.models import rl, rl_mb, rl_mf, social_discounting, twostep

    for n in ("rw1a1b", "rw2a1b", "rw3a1b", "rw4a1b"):
        for suffix in ("_fit", "_sim", "_simulate", "_model"):
            assert getattr(rl_mf, n + suffix) is getattr(rl, n + suffix)
    for n in ("hybrid_mbmf", "model_based", "sarsa_lambda"):
        assert getattr(rl_mb, n + "_model") is getattr(twostep, n + "_model")
        sim = getattr(rl_mb, n + "_sim")(np.array([[3.0, 3.0, 0.5, 0.5, 0.5, 0.5, 0.0]])[:, :len(
            MODELS[n].param_names)], ntrials=60, seed=0)
        assert {"choices1", "states2", "choices2", "rewards"} <= set(sim)
    assert social_discounting.sd_hyp_k_model.id == "sd_hyp_k"


def test_bundle_workflow_as_in_pyem_examples():
    """Simulate with ``<name>_model.sim`` and fit ``<name>_model.fit`` with the inputs the spec lists."""
    from torchem.models.rl_mf import rw1a1b_model

    assert rw1a1b_model.desc.startswith("Rescorla-Wagner") and rw1a1b_model.spec["family"] == "rl"
    rng = np.random.default_rng(2)
    true = np.column_stack([norm2beta(rng.normal(size=50)), norm2alpha(rng.normal(size=50))])
    sim = rw1a1b_model.sim(true, nblocks=4, ntrials=24, seed=3)
    all_data = [[sim[k][s] for k in rw1a1b_model.spec["inputs"]] for s in range(50)]
    model = EMModel(all_data, rw1a1b_model.fit)
    model.fit(verbose=0)
    r = parameter_recovery(true, model.subject_params().to_numpy())
    assert isinstance(r, RecoveryResult) and (r.corr > 0.75).all()


def test_registry_hook_gives_new_models_bundles(monkeypatch):
    """A model added to MODELS (e.g. a new family module) gets <name>_sim and <name>_model automatically."""
    import types

    import torchem.models as models
    from torchem.model import model_spec

    module = types.ModuleType("torchem_test_family")
    module.__all__ = []

    @model_spec(param_names=["theta"], param_xform=[norm2alpha], inputs=["y"])
    def coin_fit(params, y, mask=None, output="nll"):
        """A coin with bias theta."""
        return -(y * torch.nn.functional.logsigmoid(params) + (1 - y) * torch.nn.functional.logsigmoid(-params)).sum(1)

    coin_fit.simulate = lambda params, seed=None: {"y": np.zeros((len(params), 3))}
    coin_fit.__module__ = module.__name__
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(models.MODELS, "coin", coin_fit)
    models._add_pyem_names()
    assert module.coin_model.id == "coin" and module.coin_sim is coin_fit.simulate
    assert module.coin_model.desc.startswith("A coin with bias theta.") and "theta (norm2alpha)" in module.coin_model.desc


def test_ddm_bundles_agree_with_pyem_nll():
    """pyEM's ``ddm4_model`` / ``ddm4_lotto_model`` (from the registry hook) on pyEM 1.0.1's whole-model NLLs."""
    ddm = pytest.importorskip("torchem.models.ddm", reason="the DDM models are not in this checkout")
    path = DATA / "ddm_pyem_reference.json"
    if not path.is_file():
        pytest.skip("tests/data/ddm_pyem_reference.json comes with the DDM models")
    with open(path) as fh:
        ref = json.load(fh)
    for name, case in ref["models"].items():
        bundle = getattr(ddm, f"{name}_model")
        assert bundle.id == name and bundle.sim is getattr(ddm, f"{name}_sim")
        assert bundle.spec["inputs"] == case["columns"]
        n = len(case["data"]["rt"])
        model = EMModel([[np.asarray(case["data"][c][s]) for c in case["columns"]] for s in range(n)], bundle.fit)
        for entry in case["nll"]:
            x = torch.tensor([entry["params_normalized"]] * n, dtype=torch.float64)
            # pyEM has no contaminant component: compare with torchem's switched off
            nll = bundle.fit(x, *model.batch.data, mask=model.batch.mask, p_outlier=0.0)[entry["subject"]]
            assert float(nll) == pytest.approx(entry["nll"], rel=1e-6, abs=1e-6)


# ------------------------------------------------------------------------------- model-specific names
def test_pt_value_and_weight():
    from torchem.models.pt import pt_fit, pt_value, pt_weight

    assert pt_value(4.0, alpha=0.5, beta=0.5, lam=2.0) == pytest.approx(2.0)
    assert pt_value(-4.0, alpha=0.5, beta=0.5, lam=2.0) == pytest.approx(-4.0)
    np.testing.assert_allclose(pt_value(np.array([0.0, 9.0, -1.0]), 0.5, 0.7, 1.5), [0.0, 3.0, -1.5])
    g, p = 0.7, np.array([0.0, 0.3, 0.5, 1.0])
    np.testing.assert_allclose(pt_weight(p, g), np.r_[0.0, p[1:3] ** g / (p[1:3] ** g + (1 - p[1:3]) ** g) ** (1 / g),
                                                      1.0])
    assert isinstance(pt_weight(0.5, g), float)
    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    v = pt_value(torch.tensor([4.0], dtype=torch.float64), a, 0.5, 2.0)
    (grad,) = torch.autograd.grad(v.sum(), a)
    assert float(grad) == pytest.approx(4.0 ** 0.5 * np.log(4.0))
    # the fit uses the same functions: a mixed gamble is weighted outcome by outcome
    alpha, beta, lam, gamma, mu = 0.8, 0.7, 2.0, 0.6, 1.5
    x = torch.tensor([[alpha2norm(alpha), alpha2norm(beta), beta2norm(lam), alpha2norm(gamma), beta2norm(mu)]])
    vg = pt_weight(0.6, gamma) * pt_value(10.0, alpha, beta, lam) + pt_weight(0.4, gamma) * pt_value(-5.0, alpha, beta,
                                                                                                        lam)
    expected = -scipy.special.log_expit(mu * (vg - pt_value(1.0, alpha, beta, lam)))
    got = pt_fit(x, torch.tensor([[[10.0, -5.0]]]), torch.tensor([[[0.6, 0.4]]]), torch.tensor([[1.0]]),
                 torch.tensor([[1.0]]))
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_bayes_sim_n_fish_and_probabilities():
    from torchem.models.bayes import bayes_sim, bayes_simulate

    assert bayes_sim is bayes_simulate
    sim = bayes_sim(np.array([[0.6]]), nblocks=3, ntrials=8, n_fish=3, seed=0)
    assert sim["probabilities"].shape == (1, 3, 9, 3)
    np.testing.assert_allclose(sim["probabilities"].sum(-1), 1.0)
    np.testing.assert_array_equal(bayes_sim(np.array([[0.6]]), nblocks=2, ntrials=6, seed=3)["choices"],
                                  bayes_sim(np.array([[0.6]]), nblocks=2, ntrials=6, seed=3)["choices"])
    with pytest.raises(ValueError, match="n_fish must be 3"):
        bayes_sim(np.array([[0.6]]), n_fish=4)


@pytest.mark.parametrize("name,level,inputs", [
    ("sd_hyp_k", "social_dists", ["self_selfish", "other_selfish", "self_prosocial", "other_prosocial", "distance"]),
    ("td_hyp_k", "delays", ["sooner", "later", "delay"]),
    ("prd_hyp_k", "probs", ["certain", "risky", "prob"]),
    ("ed_par_k", "effort_levels", ["reward_low", "reward_high", "effort"]),
    ("ped_par_2k", "effort_levels", ["reward_low", "reward_high", "effort"]),
])
def test_discounting_simulators_return_pyem_design_arrays(name, level, inputs):
    from torchem.models import discounting

    fit = MODELS[name]
    sim = getattr(discounting, f"{name}_sim")(np.full((2, len(fit.param_names)), 0.3), seed=0)
    S, B, T = sim["choices"].shape
    assert sim[level].shape == (S, B)
    pay = sim["payouts"]
    if name.startswith("sd_"):
        assert pay.shape == (S, B, T, 2, 2)
        columns = [pay[..., 0, 0], pay[..., 0, 1], pay[..., 1, 0], pay[..., 1, 1]]
    else:
        assert pay.shape == (S, B, T, 2)
        columns = [pay[..., 0], pay[..., 1]]
    for col, key in zip(columns + [np.broadcast_to(sim[level][:, :, None], (S, B, T))], inputs):
        np.testing.assert_array_equal(col, sim[key])
    with pytest.raises(ValueError, match="text labels"):
        labels = np.where(sim["choices"] == 1, "yes", "no")
        EMModel([[labels[s]] + [sim[k][s] for k in fit.inputs[1:]] for s in range(S)], fit)


def test_rw4a1b_sim_option_pairs():
    from torchem.models.rl_mf import rw4a1b_sim

    sim = rw4a1b_sim(np.array([[3.0, 0.5, 0.5, 0.5, 0.5]]), nblocks=6, ntrials=20, seed=0)
    np.testing.assert_array_equal(sim["option_pairs"], np.stack([sim["option_left"], sim["option_right"]], -1))


# ----------------------------------------------------------------------- pyEM-style per-subject functions
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 2e-3)])
def test_pyem_style_function_fits_like_the_library_model(dtype, tol):
    from torchem.models.rl import rw1a1b_fit

    _, _, all_data = _bandit(25, nblocks=3, ntrials=20, seed=7)
    model = EMModel(all_data, example.rw_fit_torch, ["beta", "alpha"], [norm2beta, norm2alpha], dtype=dtype)
    assert model.model.per_subject and model.model.pyem_style  # detected from the signature
    lib = EMModel(all_data, rw1a1b_fit, dtype=dtype)
    x = torch.randn(25, 2, dtype=dtype, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.model.nll(x, model.batch.data, model.batch.mask),
                               lib.model.nll(x, lib.batch.data, lib.batch.mask), rtol=tol, atol=tol)
    opts = {"verbose": 0, "mstep_maxit": 25, "accelerate": None}  # the same 25 plain EM steps
    r, rl = model.fit(**opts), lib.fit(**opts)
    assert (r.m - rl.m).abs().max() < 10 * tol and abs(float(r.NPL.sum() - rl.NPL.sum())) < 100 * tol
    # output="all" dicts: the params list is stacked, tensors kept, subjects first
    out = model.outfit
    assert out["params"].shape == (25, 2) and out["EV"].shape == (25, 3, 21, 2)
    np.testing.assert_allclose(out["params"], r.natural_params().numpy(), rtol=1e-5)
    np.testing.assert_allclose(out["nll"], r.NLL.numpy(), rtol=1e-4)
    # pyEM's contract: with prior=None, output="npl" is the NLL
    c, rew = model.batch.data
    p0 = torch.zeros(2, dtype=dtype)
    assert float(example.rw_fit_torch(p0, c[0], rew[0], output="npl")) == pytest.approx(
        float(example.rw_fit_numpy(np.zeros(2), c[0].numpy(), rew[0].numpy(), output="nll")), abs=1e-3)


def test_pyem_style_function_with_mask_handles_ragged_subjects():
    from torchem.models.rl import rw1a1b_fit

    _, sim, _ = _bandit(6, nblocks=4, ntrials=16, seed=2)
    ragged = [[sim["choices"][i, :nb], sim["rewards"][i, :nb]] for i, nb in enumerate([2, 4, 3, 4, 1, 2])]

    def rw_masked(params, choices, rewards, mask=None, prior=None, output="npl"):
        nll = example.rw_fit_batched(params[None], choices[None], rewards[None], mask[None])[0]
        return calc_fval(nll, params, prior=prior, output=output)

    with pytest.raises(ValueError, match=r"subject 0 has 32 trials where others have 64.*mask"):
        EMModel(ragged, example.rw_fit_torch, ["beta", "alpha"])
    model = EMModel(ragged, rw_masked, ["beta", "alpha"], per_subject=True)
    lib = EMModel(ragged, rw1a1b_fit)
    x = torch.randn(6, 2, dtype=torch.float64)
    torch.testing.assert_close(model.model.nll(x, model.batch.data, model.batch.mask),
                               lib.model.nll(x, lib.batch.data, lib.batch.mask))


def test_numpy_functions_get_a_pointer_to_the_guide():
    _, _, all_data = _bandit(4)

    def returns_float(params, choices, rewards, prior=None, output="npl"):
        return float(norm2beta(params[0])) * 2.0

    def uses_numpy(params, choices, rewards, prior=None, output="npl"):
        return np.exp(params[0])

    def branches(params, choices, rewards, prior=None, output="npl"):
        alpha = norm2alpha(params[1])
        if not (0.0 <= alpha <= 1.0):
            return 1e7
        return (alpha - 0.3) ** 2 + params[0] ** 2

    with pytest.raises(ValueError, match=r"returned a builtins.float.*cannot be differentiated.*migrating_from_pyem"):
        EMModel(all_data, returns_float, ["beta", "alpha"])
    with pytest.raises(ValueError, match=r"failed on subject 0 with tensor inputs.*numpy.*migrating_from_pyem"):
        EMModel(all_data, uses_numpy, ["beta", "alpha"])
    with pytest.raises(ValueError, match=r"does not depend on params.*migrating_from_pyem"):
        EMModel(all_data, example.rw_fit_numpy, ["beta", "alpha"])
    with pytest.raises(ValueError, match=r"not batched over subjects.*Python `if`.*migrating_from_pyem"):
        EMModel(all_data, branches, ["beta", "alpha"])
    # a per-subject function is also checked when it is given to a simulation-only model's recover
    model = EMModel(None, returns_float, ["beta", "alpha"], simulate_func=MODELS["rw1a1b"].simulate)
    with pytest.raises(ValueError, match="cannot be differentiated"):
        model.recover(np.array([[3.0, 0.5]] * 4), pr_inputs=["choices", "rewards"], seed=0)


# ------------------------------------------------------------------------------- EMModel extras
def test_outfit_cached_per_fit_and_posterior():
    from torchem.models.rl_mf import rw1a1b_fit

    _, _, all_data = _bandit(20)
    model = EMModel(all_data, rw1a1b_fit, ["beta", "alpha"], [norm2beta, norm2alpha])
    with pytest.raises(RuntimeError, match="fit"):
        model.outfit
    res = model.fit(verbose=0)
    first = model.outfit
    assert model.outfit is first and {"params", "nll", "EV", "PE", "choices", "rewards"} <= set(first)
    post = model.posterior()
    np.testing.assert_allclose(post["mu"], res.posterior_mu.numpy())
    np.testing.assert_allclose(post["sigma"], res.posterior_var.numpy())
    model.fit(verbose=0, mstep_maxit=3)
    assert model.outfit is not first
    ind = model.scipy_minimize(seed=0)
    assert isinstance(ind, FitResult) and ind.m.shape == (20, 2)
    post = model.posterior()  # an individual fit: each subject's estimate and the inverse Hessian's diagonal
    np.testing.assert_allclose(post["mu"], ind.m.numpy())
    np.testing.assert_allclose(post["sigma"], ind.inv_h.diagonal(dim1=-2, dim2=-1).numpy())


def test_calc_fval_and_softmax():
    assert calc_fval(np.nan, np.zeros(2)) == 1e7 and calc_fval(np.inf, np.zeros(2), output="nll") == 1e7

    class FinitePrior:
        def logpdf(self, x):
            return 0.0

    assert calc_fval(np.nan, np.zeros(2), prior=FinitePrior(), output="npl") == 1e7
    prior = GaussianPrior(mu=[0.0, 1.0], sigma=[1.0, 4.0])  # sigma holds variances (pyEM)
    x = np.array([0.5, -1.0])
    lp = scipy.stats.norm.logpdf(x, [0.0, 1.0], [1.0, 2.0]).sum()
    assert calc_fval(3.0, x, prior=prior) == pytest.approx(3.0 - lp)
    assert calc_fval(3.0, x, prior=prior, output="nll") == 3.0
    xt = torch.tensor(x, requires_grad=True)
    f = calc_fval((xt ** 2).sum(), xt, prior=prior)
    (g,) = torch.autograd.grad(f, xt)
    np.testing.assert_allclose(g.numpy(), 2 * x + (x - np.array([0.0, 1.0])) / np.array([1.0, 4.0]))
    assert default_prior(3).var.tolist() == [100.0] * 3
    p = softmax(np.array([0.2, 0.8]), beta=3.0)
    np.testing.assert_allclose(p, np.exp([0.6, 2.4]) / np.exp([0.6, 2.4]).sum())
    np.testing.assert_allclose(softmax(torch.tensor([0.2, 0.8], dtype=torch.float64), 3.0).numpy(), p)


def test_parameter_recovery():
    true = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 3.0]])
    res = parameter_recovery(true, true + 0.1)
    np.testing.assert_allclose(res.rmse, 0.1)
    np.testing.assert_allclose(res.corr, 1.0)
    with pytest.raises(ValueError, match="subjects, parameters"):
        parameter_recovery(true, true[:2])


def test_plotting_pyem_options():
    x = np.linspace(0, 1, 20)
    y = x + np.random.default_rng(0).normal(scale=0.1, size=20)
    ax = plotting.plot_scatter(x, "true", y, "est", show_line=True, colorname="royalblue", annotate=True,
                               equal_limits=True)
    r = np.corrcoef(x, y)[0, 1]
    assert any(t.get_text() == f"Pearson r = {r:.2f}" for t in ax.texts)
    assert len(ax.lines) == 1 and ax.get_xlim() == ax.get_ylim()
    assert len(plotting.plot_scatter(x, "a", y, "b", show_line=False).lines) == 0
    choices_a = np.random.default_rng(1).integers(0, 2, (5, 3, 10)).astype(float)
    fig = plotting.plot_choices(choices_a)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), choices_a.mean((0, 1)))
    np.testing.assert_allclose(fig.axes[0].lines[1].get_ydata(), 1 - choices_a.mean((0, 1)))
    plt.close("all")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pyem_style_function_on_cuda():
    from torchem.models.rl import rw1a1b_fit

    _, _, all_data = _bandit(30, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = EMModel(all_data, example.rw_fit_torch, ["beta", "alpha"], device="cuda").fit(verbose=0)
        rl = EMModel(all_data, rw1a1b_fit, device="cpu").fit(verbose=0)
    assert r.m.device.type == "cuda" and (r.m.cpu() - rl.m).abs().max() < 1e-5
