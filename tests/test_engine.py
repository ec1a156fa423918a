"""The EM engine's options: group families on whole fits, robustness to outliers, user priors, individual
fits, stopping rules, acceleration, per-subject status, option checks and partial results."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from torchem import EMModel
from torchem.estep import SubjectStatus
from torchem.models.rl import rw1a1b_fit, rw1a1b_simulate
from torchem.options import FitOptions, option_table
from torchem.priors import GaussianPrior, IndependentPrior, LaplacePrior, UniformPrior
from torchem.transforms import norm2alpha, norm2beta

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def reference_model() -> EMModel:
    df = pd.read_csv(DATA / "rw1a1b_100.csv")
    return EMModel(df, rw1a1b_fit, columns=["choice", "reward"], block="block", trial="trial", device="cpu")


def _simulate(norm: np.ndarray, seed: int):
    params = np.column_stack([norm2beta(norm[:, 0]), norm2alpha(norm[:, 1])])
    sim = rw1a1b_simulate(params, nblocks=4, ntrials=24, seed=seed)
    return [[c, r] for c, r in zip(sim["choices"], sim["rewards"])]


@pytest.mark.parametrize("family", ["gaussian", "full", "laplace", "student_t", "cauchy"])
def test_every_family_fits_the_reference_set(reference_model, family):
    res = reference_model.fit(verbose=0, group=family)
    assert res.convergence and res.group_name == ("gaussian" if family == "full" else family)
    assert torch.isfinite(res.m).all() and torch.isfinite(res.posterior_mu).all()
    assert torch.isfinite(res.posterior_var).all() and (res.posterior_var > 0).all()
    # the location lies near the Gaussian's (-0.25, 0.02) and the fit reports itself
    np.testing.assert_allclose(res.posterior_mu.numpy(), [-0.25, 0.02], atol=0.25)
    assert res.group.n_hyper == (5 if family == "full" else 4)  # 2P, or P + P(P+1)/2
    assert np.isfinite(reference_model.compute_integrated_bic(nsamples=200))
    lap, lme, good = reference_model.compute_lme()
    assert np.isfinite(lme) and np.isfinite(lap).all() and good.mean() >= 0.98


@pytest.mark.parametrize("family,draw", [
    ("student_t", lambda rng, n: 0.6 * rng.standard_t(8.0, n)),
])
def test_family_recovers_its_own_generating_distribution(family, draw):
    rng = np.random.default_rng(11)
    norm = np.column_stack([draw(rng, 150), draw(rng, 150)]) + np.array([0.5, -0.5])
    res = EMModel(_simulate(norm, 12), rw1a1b_fit, device="cpu").fit(verbose=0, group=family)
    assert res.convergence
    np.testing.assert_allclose(res.posterior_mu.numpy(), [0.5, -0.5], atol=0.2)
    scale = res.group.scale.numpy()
    assert np.all(scale > 0.25) and np.all(scale < 0.9)


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("family,estep,draw,loc", [
    ("laplace", "importance", lambda rng, n: rng.laplace(0.0, 0.5, n), [0.5, -0.5]),
])
def test_heavy_tailed_families_recover_their_own_location(family, estep, draw, loc):
    rng = np.random.default_rng(11)
    norm = np.column_stack([draw(rng, 150), draw(rng, 150)]) + np.array(loc)
    norm = norm.clip(-6, 6)
    res = EMModel(_simulate(norm, 12), rw1a1b_fit, device="cpu").fit(verbose=0, group=family, estep=estep,
                                                                       nsamples=500)
    assert res.convergence and res.group_name == family
    np.testing.assert_allclose(res.posterior_mu.numpy(), loc, atol=0.2)


def _flat_fit(params, x, mask=None, output="nll"):
    """A likelihood that does not depend on the parameters: every subject is uninformed."""
    nll = 0.0 * params.sum(1) + 1.0
    return {"params": params, "nll": nll} if output == "all" else nll


@pytest.mark.parametrize("family", ["laplace", "student_t", "cauchy"])
def test_uninformed_subjects_keep_a_heavy_tailed_group_scale(family):
    """With no information in the data the group stays where it started.

    MAP E-steps put every subject on the location with the prior's curvature
    there: the t M-step then shrank the scale by (df + 1) / (df + 2) per
    E-step (a Cauchy scale reached 1e-6) and the Laplace M-step grew it by
    2 / sqrt(pi).  The variational E-step leaves it at its fixed point.
    """
    data = [[np.zeros(10)] for _ in range(30)]
    model = EMModel(data, _flat_fit, param_names=["a", "b"], device="cpu")
    res = model.fit(verbose=0, group=family, mstep_maxit=40, convergence="group")
    start = model.fit(verbose=0, group=family, mstep_maxit=1).group.scale
    scale = res.group.scale
    assert torch.isfinite(scale).all()
    ratio = (scale / start).numpy()
    assert np.all(ratio > 0.8) and np.all(ratio < 1.25), ratio
    np.testing.assert_allclose(res.posterior_mu.numpy(), 0.0, atol=1e-6)
    # pyEM's MAP E-steps (variational=False) drift: the t scales shrink, the Laplace scale grows
    old = model.fit(verbose=0, group=family, mstep_maxit=15, accelerate=None, convergence="group",
                    variational=False)
    drift = (old.group.scale / start).numpy()
    assert np.all(drift > 3.0) if family == "laplace" else np.all(drift < 0.5), drift


@pytest.mark.parametrize("family,draw,preferred", [
    ("laplace", lambda rng, n: rng.laplace(0.0, 0.5, n), False),  # 96 trials cannot tell it from a Gaussian
    ("cauchy", lambda rng, n: 0.3 * rng.standard_cauchy(n), True),
])
def test_heavy_tailed_groups_with_laplace_esteps_recover_their_own_distribution(family, draw, preferred):
    rng = np.random.default_rng(11)
    loc = np.array([-0.5, 0.0])
    norm = (np.column_stack([draw(rng, 150), draw(rng, 150)]) + loc).clip(-6, 6)
    model = EMModel(_simulate(norm, 12), rw1a1b_fit, device="cpu")
    model.fit(verbose=0)
    gauss_bic = model.compute_integrated_bic(nsamples=2000)
    res = model.fit(verbose=0, group=family)
    assert res.convergence and not res.warnings, res.warnings
    np.testing.assert_allclose(res.posterior_mu.numpy(), loc, atol=0.25)
    scale = res.group.scale.numpy()
    assert np.all(scale > 0.2) and np.all(scale < 0.8), scale
    if preferred:  # the Cauchy group explains Cauchy data better than a Gaussian group (measured: by 62)
        assert model.compute_integrated_bic(nsamples=2000) < gauss_bic - 20


@pytest.mark.slow
def test_robust_groups_resist_gross_outliers():
    """200 subjects from N(mu, 0.5^2) with 5% at +-4: the robust locations stay nearer the inliers' mean."""
    rng = np.random.default_rng(21)
    mu = np.array([0.3, -0.4])
    norm = mu + 0.5 * rng.standard_normal((200, 2))
    out = np.arange(200) < 10
    norm[out] = np.where(rng.random((10, 2)) < 0.5, 4.0, 4.0)
    data = _simulate(norm, 22)
    model = EMModel(data, rw1a1b_fit, device="cpu")
    fits = {f: model.fit(verbose=0, group=f) for f in ("gaussian", "student_t", "laplace")}
    err = {f: np.abs(r.posterior_mu.numpy() - mu).sum() for f, r in fits.items()}
    assert err["student_t"] < 0.7 * err["gaussian"], err
    assert err["laplace"] < 0.6 * err["gaussian"], err  # MAP E-steps left the Laplace location 0.92 off
    # inliers are shrunk less towards the outliers (at +4): their alphas move up less (beta = 19.6 of 20 at +4
    # is saturated: the outliers say little about beta, and no group pulls the inliers' betas up), and the
    # inliers' MAPs are nearer their true values
    inl = ~out
    shift = {f: (r.m.numpy()[inl] - norm[inl]).mean(0) for f, r in fits.items()}
    rmse = {f: np.sqrt(((r.m.numpy()[inl] - norm[inl]) ** 2).mean(0)).sum() for f, r in fits.items()}
    for f in ("student_t", "laplace"):
        assert shift[f][1] < 0.7 * shift["gaussian"][1], shift
        assert rmse[f] < rmse["gaussian"] - 0.01, rmse


def test_prior_starts_em_and_is_replaced_at_the_first_mstep(reference_model):
    default = reference_model.fit(verbose=0)
    pm = reference_model.fit(verbose=0, prior_mu=[0.0, 0.0], prior_sigma=[1.0, 1.0])
    torch.testing.assert_close(pm.posterior_mu, default.posterior_mu, atol=1e-4, rtol=0)  # same start as init_var=1
    obj = reference_model.fit(verbose=0, prior=GaussianPrior([0.0, 0.0], [100.0, 100.0]))
    wide = reference_model.fit(verbose=0, init_var=100.0)
    torch.testing.assert_close(obj.posterior_mu, wide.posterior_mu, atol=1e-4, rtol=0)
    # any prior object starts EM; the same fixed point is reached
    box = reference_model.fit(verbose=0, prior=UniformPrior([-3.0, -3.0], [3.0, 3.0]))
    mixed = reference_model.fit(verbose=0, prior=IndependentPrior([GaussianPrior([0.0], [4.0]),
                                                                   LaplacePrior([0.0], [1.0])]))
    for r in (box, mixed):
        torch.testing.assert_close(r.posterior_mu, default.posterior_mu, atol=5e-3, rtol=0)


@pytest.mark.parametrize("kwargs,msg", [
    ({"prior": GaussianPrior([0.0], [1.0])}, "1 parameters, the model 2"),
    ({"prior_mu": [0.0, 0.0]}, "give both prior_mu and prior_sigma"),
    ({"prior": GaussianPrior([0, 0], [1, 1]), "prior_mu": [0, 0], "prior_sigma": [1, 1]}, "either prior or"),
    ({"prior_mu": [0.0, 0.0], "prior_sigma": [1.0, -1.0]}, "must be positive"),
    ({"mstep": "weibull"}, "group must be one of"),
    ({"mstep_maxit": 0}, "mstep_maxit must be an integer >= 1"),
    ({"nsamples": 0}, "nsamples must be an integer >= 1"),
    ({"init_var": 0.0}, "init_var must be a positive number"),
    ({"laplace_cap": 0}, "laplace_cap must be a positive number"),
    ({"convergence_method": "max"}, "convergence_method must be one of"),
    ({"convergence_custom": "fast"}, "convergence_custom must be one of"),
    ({"convergence_type": "BIC"}, "convergence_type must be 'NPL' or 'LME'"),
    ({"accelerate": "aitken"}, "accelerate must be one of"),
    ({"group": "laplace", "mstep": "cauchy"}, "give the group family once"),
])
def test_bad_options_are_refused_before_any_work(reference_model, kwargs, msg):
    before = reference_model.result
    with pytest.raises(ValueError, match=msg):
        reference_model.fit(verbose=0, **kwargs)
    del before


def test_pyem_names_select_the_same_options():
    assert FitOptions(mstep="student_t").group == "student_t"
    assert FitOptions(convergence_type="NPL").convergence == "npl"
    table = option_table()
    for name in FitOptions.names():
        assert f"`{name}`" in table


def test_individual_fits_match_an_independent_multistart_search(reference_model):
    """Every subject's NLL is at most 1e-6 above scipy's best of 8 BFGS starts on a numpy likelihood."""
    from scipy.optimize import minimize

    res = reference_model.fit_individual(nstarts=8, seed=1)
    assert res.estep == "individual" and res.group is None
    batch = reference_model.batch
    ch, rw = (t.numpy() for t in batch.data)
    mask = batch.mask.numpy()

    def nll(x, c, r, msk):
        beta, alpha = norm2beta(x[0]), norm2alpha(x[1])
        total = 0.0
        for b in range(c.shape[0]):
            q = np.full(2, 0.5)  # values start at 0.5 in every block
            for t in range(c.shape[1]):
                if not msk[b, t]:
                    continue
                k = int(c[b, t])
                total -= beta * q[k] - np.logaddexp(beta * q[0], beta * q[1])
                q[k] += alpha * (r[b, t] - q[k])
        return total

    rng = np.random.default_rng(0)
    worse = []
    for i in range(0, batch.n_subjects, 7):  # every 7th subject keeps the test quick
        best = min(minimize(nll, x0, args=(ch[i], rw[i], mask[i]), method="BFGS").fun
                   for x0 in [np.zeros(2)] + list(rng.normal(0, 1.5, (7, 2))))
        worse.append(float(res.NLL[i]) - best)
    assert max(worse) <= 1e-6, worse
    se = res.standard_errors()
    ok = res.hessian_ok.numpy()
    assert np.isfinite(se.to_numpy()[ok]).all() and (se.to_numpy()[ok] > 0).all()
    assert np.isnan(se.to_numpy()[~ok]).all()
    alias = reference_model.scipy_minimize(seed=1, nstarts=8)
    torch.testing.assert_close(alias.m, res.m)


def test_individual_map_under_a_fixed_prior_is_the_hierarchical_estep(reference_model):
    fit = reference_model.fit(verbose=0)
    prior = GaussianPrior(fit.estep_prior.mean.numpy(), fit.estep_prior.var.numpy())  # the last E-step's group
    ind = reference_model.fit_individual(prior=prior, nstarts=3)
    torch.testing.assert_close(ind.m, fit.m, atol=2e-4, rtol=0)
    assert np.isfinite(reference_model.compute_lme()[1])


@pytest.mark.parametrize("accelerate", ["squarem", "quasi_newton"])
def test_accelerators_reach_the_plain_em_fixed_point_in_fewer_esteps(reference_model, accelerate):
    tight = {"convergence": "group", "group_tol": 1e-7, "group_window": 5, "mstep_maxit": 2000}
    plain = reference_model.fit(verbose=0, accelerate=None, **tight)
    fast = reference_model.fit(verbose=0, accelerate=accelerate, **tight)
    assert fast.n_iter <= plain.n_iter
    assert plain.convergence and fast.convergence
    torch.testing.assert_close(fast.posterior_mu, plain.posterior_mu, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.posterior_var, plain.posterior_var, atol=1e-5, rtol=0)
    assert float(fast.NPL.sum()) == pytest.approx(float(plain.NPL.sum()), abs=1e-3)
    default = reference_model.fit(verbose=0, accelerate=accelerate)
    assert float(default.NPL.sum()) == pytest.approx(float(plain.NPL.sum()), abs=1e-2)
    labels = {"squarem": "extrapolated", "quasi_newton": "quasi-newton"}
    assert set(default.history["step"]) <= {"em", labels[accelerate], "rejected"}
    # the reported gap is an honest bound: the default stop is within its stated tolerances of the fixed point
    gap = default.fixed_point_gap
    assert default.convergence and gap["lme"] < 1e-3 and gap["hyper"] < 1e-3
    rel = ((default.posterior_mu - plain.posterior_mu).abs() / (1 + plain.posterior_mu.abs())).max()
    assert float(rel) < 1e-3


def test_pyem_npl_rules_and_group_rule_say_what_stopped_them(reference_model):
    base = {"accelerate": None}
    s = reference_model.fit(verbose=0, convergence="npl", **base)
    npl = s.history["NPL"].round(6).to_numpy()
    assert abs(npl[-1] - npl[-2]) < 1e-3 and abs(npl[-2] - npl[-3]) >= 1e-3
    assert s.stop_reason.startswith("npl rule met")
    mean = reference_model.fit(verbose=0, convergence="npl", convergence_method="mean", **base)
    assert mean.n_iter <= s.n_iter  # the mean changes 100x less than the sum
    rel = reference_model.fit(verbose=0, convergence="npl", convergence_custom="relative_npl",
                              convergence_crit=1e-6, **base)
    v = rel.history["NPL"].to_numpy()
    assert abs((v[-1] - v[-2]) / v[-2]) < 1e-6
    run = reference_model.fit(verbose=0, convergence="npl", convergence_custom="running_average", **base)
    v = run.history["NPL"].round(6).to_numpy()
    assert abs(v[-1] - v[-6:-1].mean()) < 1e-3 and run.n_iter >= 7
    grp = reference_model.fit(verbose=0, convergence="group", group_tol=1e-4, group_window=2, **base)
    assert grp.stop_reason.startswith("group rule met")
    capped = reference_model.fit(verbose=0, mstep_maxit=3)
    assert not capped.convergence and "mstep_maxit (3)" in capped.stop_reason
    assert any("EM did not converge" in w for w in capped.warnings)


def test_status_per_subject_and_boolean_views(reference_model):
    res = reference_model.fit(verbose=0)
    assert res.status.dtype == torch.int8 and res.status.shape == (100,)
    assert torch.equal(res.estep_success, res.status <= SubjectStatus.RECOVERED)
    table = res.subject_table()
    assert set(table["status"]) <= {s.name.lower() for s in SubjectStatus}
    summary = res.summary()
    assert summary["converged"] and summary["group"] == "gaussian" and summary["warnings"] == res.warnings
    torch.testing.assert_close(res.posterior_sigma, res.posterior_var)


def test_with_data_is_an_unfitted_twin(reference_model):
    twin = reference_model.with_data(reference_model.batch.index(list(range(10))))
    assert twin.result is None and twin.batch.n_subjects == 10
    assert twin.param_names == reference_model.param_names and twin.device == reference_model.device


def test_an_exception_mid_fit_keeps_the_last_completed_step(reference_model):
    calls = {"n": 0}

    def boom(state):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    twin = reference_model.with_data(reference_model.batch)
    twin.fit(verbose=0)
    with pytest.raises(KeyboardInterrupt):
        twin.fit(verbose=0, callback=boom)
    assert twin.result is not None and twin.result.stopped and twin.result.n_iter == 3
    assert "interrupted by KeyboardInterrupt" in twin.result.stop_reason and not twin.result.convergence
    with pytest.raises(ValueError):
        twin.fit(verbose=0, mstep_maxit=-1)
    assert twin.result is not None  # a refused option runs nothing and keeps the previous result


def test_readme_option_table_is_the_options_dataclass():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- options:start -->")[1].split("<!-- options:end -->")[0].strip()
    assert block == option_table()


def test_pyem_npl_options_select_the_npl_rule_and_optimizer_names_map(reference_model):
    assert FitOptions(convergence_method="median").convergence == "npl"
    assert FitOptions(convergence_custom="relative_npl").convergence == "npl"
    assert FitOptions().convergence == "lme" and FitOptions(convergence="group").convergence == "group"
    res = reference_model.fit(verbose=0, convergence_method="mean", optim_method="BFGS",
                              optim_options={"maxiter": 150, "gtol": 1e-6})
    assert res.options.convergence == "npl" and res.options.estep_maxit == 150 and res.options.gtol == 1e-6
    with pytest.raises(ValueError, match="Nelder-Mead"):
        reference_model.fit(verbose=0, optim_method="Nelder-Mead")
    with pytest.raises(ValueError, match="no torchem counterpart"):
        reference_model.fit(verbose=0, optim_options={"eps": 1e-8})
    prior = GaussianPrior([0.0, 1.0], [1.0, 4.0])
    expected = -0.5 * (math.log(2 * math.pi) * 2 + math.log(4.0) + 0.25)
    assert prior.logpdf([0.0, 2.0]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("group", ["gaussian", "student_t"])
def test_float32_default_fit_agrees_with_float64(reference_model, group):
    f64 = reference_model.fit(verbose=0, group=group)
    f32 = reference_model.with_data(reference_model.batch, dtype=torch.float32).fit(verbose=0, group=group)
    assert f32.m.dtype == torch.float32 and f32.estep_success.float().mean() > 0.95, f32.status
    torch.testing.assert_close(f32.posterior_mu.double(), f64.posterior_mu, atol=2e-3, rtol=0)
    torch.testing.assert_close(f32.posterior_var.double(), f64.posterior_var, atol=5e-3, rtol=0)
    if group != "gaussian":  # the variational LME in float32
        assert f32.lme.dtype == torch.float32
        torch.testing.assert_close(f32.lme.double().sum(), f64.lme.sum(), atol=0.05, rtol=0)


def test_a_sign_error_in_a_custom_choice_model_is_warned(small_data):
    _, _, all_data = small_data

    def flipped(params, choices, rewards, mask=None, output="nll"):
        return -rw1a1b_fit(params, choices, rewards, mask=mask)

    model = EMModel(all_data[:8], flipped, param_names=["beta", "alpha"], device="cpu")
    with pytest.warns(RuntimeWarning, match="negative for most subjects"):
        res = model.fit(verbose=0, mstep_maxit=5)
    assert any("check the sign" in w for w in res.warnings)
    good = EMModel(all_data[:8], rw1a1b_fit, device="cpu").fit(verbose=0)
    assert not any("check the sign" in w for w in good.warnings)
