"""Covariates in the group prior: designs, the GLS M-step, K = 1 = the plain fit, Louis' standard errors
against the exact marginal information, recovery and coverage."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from torchem import EMModel, model_spec
from torchem.covariates import INTERCEPT, _logpdf, build_design, louis_information
from torchem.groups import CovariateGroup, GaussianGroup, StudentTGroup, group_from_state
from torchem.models.rl import rw1a1b_fit, rw1a1b_simulate
from torchem.transforms import identity, norm2alpha, norm2beta


# --------------------------------------------------------------------------------- a model with exact answers
@model_spec(param_names=["a", "b"], param_xform=[identity, identity], inputs=["y1", "y2"])
def gauss2_fit(params, y1, y2, mask=None, output="nll"):
    """``y1_t ~ N(a, 1)``, ``y2_t ~ N(b, 1)``: a Gaussian likelihood, so Laplace posteriors are exact."""
    m = torch.ones_like(y1, dtype=torch.bool) if mask is None else mask
    r1, r2 = y1 - params[:, :1], y2 - params[:, 1:]
    nll = 0.5 * ((r1 ** 2 + r2 ** 2) * m).sum(1) + m.sum(1) * math.log(2 * math.pi)
    return {"nll": nll, "params": params} if output == "all" else nll


def _gauss_data(S: int, T: int, theta: np.ndarray, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [[theta[i, 0] + rng.standard_normal(T), theta[i, 1] + rng.standard_normal(T)] for i in range(S)]


def _exact_moments(group: CovariateGroup, ybar: torch.Tensor, T: int):
    """Posterior means ``(S, 2)`` and covariances of the Gaussian model under ``group`` (closed form)."""
    omega = torch.linalg.inv(group.sigma)
    V = torch.linalg.inv(omega + T * torch.eye(2, dtype=torch.float64)).expand(ybar.shape[0], 2, 2)
    m = torch.einsum("spq,sq->sp", V, group.means() @ omega + T * ybar)
    return m, V


# --------------------------------------------------------------------------------- designs
def test_design_codes_categories_adds_an_intercept_and_aligns_by_subject():
    ids = ["s3", "s1", "s2", "s4"]
    cov = pd.DataFrame({"group": ["patient", "control", "control", "patient"], "age": [30.0, 20.0, 25.0, 40.0],
                        "site": pd.Categorical(["b", "a", "b", "a"], categories=["b", "a"])},
                       index=["s3", "s1", "s2", "s4"]).sample(frac=1.0, random_state=0)  # any row order
    d = build_design(cov, None, ids, ["beta", "alpha"])
    assert d.columns == [INTERCEPT, "group[patient]", "age", "site[a]"]
    np.testing.assert_array_equal(d.X, [[1, 1, 30, 0], [1, 0, 20, 1], [1, 0, 25, 0], [1, 1, 40, 1]])
    assert d.free.all()
    d = build_design(cov, {"alpha": "~ C(group) + age"}, ids, ["beta", "alpha"])
    assert d.columns == [INTERCEPT, "group[patient]", "age"]
    np.testing.assert_array_equal(d.free, [[True, True], [False, True], [False, True]])
    d = build_design(cov, "~ 0 + group", ids, ["beta", "alpha"])
    assert d.columns == ["group[patient]"]
    d = build_design(cov, "~ age - 1", ids, ["beta", "alpha"])
    assert d.columns == ["age"]
    # a subject column, arrays in subject order, numeric ids given as text
    d2 = build_design(cov.reset_index().rename(columns={"index": "subject"}), "~ age", ids, ["beta", "alpha"])
    np.testing.assert_array_equal(d2.X[:, 1], [30, 20, 25, 40])
    d3 = build_design(np.array([1.0, 2.0, 3.0]), None, [0, 1, 2], ["k"])
    assert d3.columns == [INTERCEPT, "x"]
    d4 = build_design(pd.DataFrame({"x": [5.0, 6.0, 7.0]}, index=["0", "1", "2"]), None, [0, 1, 2], ["k"])
    np.testing.assert_array_equal(d4.X[:, 1], [5, 6, 7])


@pytest.mark.parametrize("cov,formula,match", [
    (pd.DataFrame({"x": [1.0, 2.0, 3.0]}, index=[0, 1, 2]), None, r"no covariates for 1 subject\(s\) of the data: \[3\]"),
    (pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0, 5.0]}, index=[0, 1, 2, 3, 9]), None, r"not in the data: \[9\]"),
    (pd.DataFrame({"x": [1.0, np.nan, 3.0, 4.0]}, index=[0, 1, 2, 3]), None, r"'x' is missing for 1 subject\(s\): \[1\]"),
    (pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0]}, index=[0, 1, 2, 3]), "~ y", "no covariate column 'y'"),
    (pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0]}, index=[0, 1, 2, 3]), "~ x:x", "interactions"),
    (pd.DataFrame({"g": ["a"] * 4}, index=[0, 1, 2, 3]), None, "single level"),
    (pd.DataFrame({"x": [1.0, 1.0, 1.0, 1.0]}, index=[0, 1, 2, 3]), None, "collinear"),
    (pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0]}, index=[0, 1, 2, 3]), {"gamma": "~ x"}, "unknown parameter"),
    (pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0]}, index=[0, 0, 2, 3]), None, r"more than one row for subject\(s\) \[0\]"),
    (np.ones((3, 1)), None, "one row per subject"),
])
def test_design_errors_name_the_problem(cov, formula, match):
    with pytest.raises(ValueError, match=match):
        build_design(cov, formula, [0, 1, 2, 3], ["beta", "alpha"])


def test_fit_options_refuse_covariates_with_other_families():
    _, sim, data = _bandit(8, 0.0, seed=0)
    m = EMModel(data, rw1a1b_fit, device="cpu")
    with pytest.raises(ValueError, match="not 'laplace'"):
        m.fit(verbose=0, covariates=np.arange(8.0), group="laplace")
    with pytest.raises(ValueError, match="formula needs covariates"):
        m.fit(verbose=0, formula="~ x")
    m.fit(verbose=0, mstep_maxit=3)
    with pytest.raises(ValueError, match="no covariates in its group prior"):
        m.result.group_coefficients()


# --------------------------------------------------------------------------------- the M-step
@pytest.mark.parametrize("diagonal,formula", [(True, None), (False, None), (False, {"b": "~ x"}),
                                              (True, {"a": "~ g", "b": "~ x"})])
def test_mstep_maximizes_the_expected_complete_data_likelihood(diagonal, formula):
    rng = np.random.default_rng(0)
    S = 30
    cov = pd.DataFrame({"x": rng.normal(size=S), "g": rng.integers(0, 2, S)})
    d = build_design(cov, formula, list(range(S)), ["a", "b"])
    X = torch.as_tensor(d.X)
    grp = CovariateGroup(X, torch.zeros(X.shape[1], 2, dtype=torch.float64), torch.as_tensor(d.free),
                         GaussianGroup(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), diagonal), d.columns)
    m = torch.as_tensor(rng.normal(size=(S, 2)) + d.X @ (rng.normal(size=(X.shape[1], 2)) * d.free))
    A = torch.as_tensor(rng.normal(size=(S, 2, 2)))
    V = 0.1 * A @ A.transpose(1, 2) + 0.05 * torch.eye(2, dtype=torch.float64)
    new, info = grp.mstep(m, V)
    assert info.converged

    def Q(v):
        B, L = new.coefficients(v), _logpdf(new).chol(v[int(new.free.sum()):])
        sigma = L @ L.T
        r = m - X @ B
        om = torch.linalg.inv(sigma)
        return (-0.5 * torch.einsum("sp,pq,sq->s", r, om, r) - 0.5 * torch.logdet(sigma)
                - 0.5 * torch.einsum("pq,sqp->s", om, V)).sum()

    g = torch.func.grad(Q)(new.to_vector())
    assert float(g.abs().max()) < 1e-6 * S
    assert torch.equal(new.B[~new.free], torch.zeros_like(new.B[~new.free]))
    if diagonal:
        assert torch.equal(new.sigma, torch.diag(new.sigma.diagonal()))
    assert new.n_hyper == int(new.free.sum()) + (2 if diagonal else 3)
    # state round trip
    back = group_from_state(new.state_dict())
    torch.testing.assert_close(back.B, new.B)
    torch.testing.assert_close(back.neg_log_prior(m, torch.arange(S)), new.neg_log_prior(m, torch.arange(S)))


@pytest.mark.parametrize("group", ["gaussian", "full"])
def test_intercept_only_reduces_exactly_to_the_plain_fit(group):
    _, _, data = _bandit(30, 0.0, seed=3)
    m = EMModel(data, rw1a1b_fit, device="cpu")
    plain = m.fit(verbose=0, group=group)
    cov = pd.DataFrame({"g": np.arange(30) % 2}, index=range(30))
    one = m.fit(verbose=0, group=group, covariates=cov, formula="~ 1")
    assert isinstance(one.group, CovariateGroup) and one.group.columns == [INTERCEPT]
    assert one.n_iter == plain.n_iter
    torch.testing.assert_close(one.m, plain.m, rtol=0, atol=1e-8)
    torch.testing.assert_close(one.group.B[0], plain.group.mu, rtol=0, atol=1e-8)
    torch.testing.assert_close(one.group.sigma, plain.group.sigma, rtol=0, atol=1e-8)
    torch.testing.assert_close(one.NPL, plain.NPL, rtol=0, atol=1e-8)
    assert one.group.n_hyper == plain.group.n_hyper
    tab = one.group_coefficients()
    assert list(tab.index) == [("beta", INTERCEPT), ("alpha", INTERCEPT)]


# --------------------------------------------------------------------------------- standard errors
@pytest.mark.parametrize("diagonal,formula", [(True, "~ x"), (False, {"b": "~ x + g"})])
def test_louis_information_equals_the_exact_marginal_information(diagonal, formula):
    """Gaussian likelihood: the marginal of each subject's mean data is N(Z_i beta, Sigma + I/T); its
    negative Hessian in the hyperparameters must equal Louis' information from the exact posteriors."""
    rng = np.random.default_rng(5)
    S, T = 25, 6
    cov = pd.DataFrame({"x": rng.normal(size=S), "g": rng.integers(0, 2, S)})
    d = build_design(cov, formula, list(range(S)), ["a", "b"])
    X = torch.as_tensor(d.X)
    B = torch.as_tensor(rng.normal(size=(X.shape[1], 2))) * torch.as_tensor(d.free)
    sig = torch.tensor([[0.8, 0.3], [0.3, 0.5]], dtype=torch.float64)
    grp = CovariateGroup(X, B, torch.as_tensor(d.free),
                         GaussianGroup(torch.zeros(2, dtype=torch.float64), torch.diag(sig.diagonal()) if diagonal else sig, diagonal), d.columns)
    ybar = torch.as_tensor(rng.normal(size=(S, 2))) + X @ B  # any data: the identity holds at every psi
    m, V = _exact_moments(grp, ybar, T)
    info = louis_information(grp, m, V)

    def marginal(v):
        Bv, L = grp.coefficients(v), _logpdf(grp).chol(v[int(grp.free.sum()):])
        C = L @ L.T + torch.eye(2, dtype=torch.float64) / T
        r = ybar - X @ Bv
        return (-0.5 * torch.einsum("sp,pq,sq->s", r, torch.linalg.inv(C), r) - 0.5 * torch.logdet(C)).sum()

    exact = -torch.func.hessian(marginal)(grp.to_vector())
    torch.testing.assert_close(info, exact, rtol=1e-8, atol=1e-8)


def test_coefficients_of_the_gaussian_model_recover_the_truth_with_exact_standard_errors():
    rng = np.random.default_rng(2)
    S, T = 80, 8
    g = np.arange(S) % 2
    theta = np.column_stack([0.3 + 0.6 * g + 0.5 * rng.standard_normal(S), -0.2 + 0.7 * rng.standard_normal(S)])
    model = EMModel(_gauss_data(S, T, theta, 3), gauss2_fit, device="cpu")
    res = model.fit(verbose=0, covariates=pd.DataFrame({"g": g}), formula={"a": "~ g"}, convergence_crit=1e-8)
    tab = res.group_coefficients()
    assert list(tab.columns) == ["estimate", "se", "z", "p", "2.5%", "97.5%"]
    assert list(tab.index) == [("a", INTERCEPT), ("a", "g"), ("b", INTERCEPT)]
    # the EM fixed point is the maximum of the closed-form marginal likelihood, and its SEs the exact ones
    ybar = torch.stack([model.batch.data[0].mean(1), model.batch.data[1].mean(1)], 1)
    grp = res.group
    psi = grp.to_vector()

    def marginal(v):
        Bv, L = grp.coefficients(v), _logpdf(grp).chol(v[int(grp.free.sum()):])
        C = L @ L.T + torch.eye(2, dtype=torch.float64) / T
        r = ybar - grp.X @ Bv
        return (-0.5 * torch.einsum("sp,pq,sq->s", r, torch.linalg.inv(C), r) - 0.5 * torch.logdet(C)).sum()

    assert float(torch.func.grad(marginal)(psi).abs().max()) < 1e-3
    exact_se = torch.linalg.inv(-torch.func.hessian(marginal)(psi)).diagonal()[:3].sqrt()
    fk, fp = grp.free.nonzero(as_tuple=True)  # the vector's order: by covariate, then parameter
    keys = [(["a", "b"][int(p)], grp.columns[int(k)]) for k, p in zip(fk, fp)]
    np.testing.assert_allclose(tab.loc[keys, "se"], exact_se.numpy(), rtol=1e-3)
    assert abs(tab.loc[("a", "g"), "estimate"] - 0.6) < 3 * tab.loc[("a", "g"), "se"]
    np.testing.assert_allclose(tab["z"], tab["estimate"] / tab["se"])
    np.testing.assert_allclose(tab["97.5%"] - tab["estimate"], 1.959964 * tab["se"], rtol=1e-6)


# --------------------------------------------------------------------------------- a learning model
def _bandit(S: int, delta: float, seed: int):
    """Two groups whose normalized learning rates differ by ``delta``; the data of ``S`` subjects."""
    rng = np.random.default_rng(seed)
    g = np.arange(S) % 2
    nat = np.column_stack([norm2beta(rng.normal(0.5, 0.7, S)), norm2alpha(rng.normal(-0.3 + delta * g, 0.7, S))])
    sim = rw1a1b_simulate(nat, nblocks=4, ntrials=24, seed=seed + 1)
    return g, sim, [[sim["choices"][i], sim["rewards"][i]] for i in range(S)]


def test_a_learning_rate_difference_is_recovered_and_carried_into_ppc_cv_and_ibic():
    g, _, data = _bandit(60, 0.8, seed=11)
    model = EMModel(data, rw1a1b_fit, device="cpu")
    cov = pd.DataFrame({"group": np.where(g == 1, "patient", "control")})
    res = model.fit(verbose=0, covariates=cov)
    tab = res.group_coefficients()
    row = tab.loc[("alpha", "group[patient]")]
    assert abs(row["estimate"] - 0.8) < 2.5 * row["se"] and row["p"] < 0.01 and 0.1 < row["se"] < 0.3
    assert abs(tab.loc[("beta", "group[patient]"), "estimate"]) < 3 * tab.loc[("beta", "group[patient]"), "se"]
    # each subject's prior is its own group's: the patients' prior mean of alpha is higher
    means = res.group.means()
    assert torch.allclose(means[g == 1, 1] - means[g == 0, 1][0], torch.tensor(row["estimate"], dtype=torch.float64))
    assert res.group.n_hyper == 4 + 2
    assert np.isfinite(model.compute_integrated_bic(nsamples=200))
    ppc = model.ppc(nsims=20, seed=0)
    assert (ppc.coverage("subject") > 0.85).all()
    cv = model.cross_validate(nsamples=300, fit_kwargs={"mstep_maxit": 30})
    assert all(isinstance(r.group, CovariateGroup) for r in cv.fits) and np.isfinite(cv.total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_covariate_fit_in_both_dtypes(dtype):
    g, _, data = _bandit(20, 0.5, seed=4)
    res = EMModel(data, rw1a1b_fit, device="cpu", dtype=dtype).fit(verbose=0, covariates=g.astype(float),
                                                                   mstep_maxit=40)
    assert res.group.B.dtype == dtype and res.group.X.dtype == dtype
    assert np.isfinite(res.group_coefficients()["se"].to_numpy()).all()


def test_coverage_and_false_positives_of_the_gaussian_model():
    """60 small studies of the exact Gaussian model: the 95% intervals cover the truth and the null rarely rejects."""
    cover, reject = [], []
    for k in range(60):
        rng = np.random.default_rng(100 + k)
        S, T = 30, 5
        g = np.arange(S) % 2
        delta = 0.5 if k % 2 else 0.0
        theta = np.column_stack([delta * g + 0.6 * rng.standard_normal(S), 0.6 * rng.standard_normal(S)])
        model = EMModel(_gauss_data(S, T, theta, 200 + k), gauss2_fit, device="cpu")
        row = model.fit(verbose=0, covariates=g.astype(float), formula={"a": "~ x"}).group_coefficients().loc[("a", "x")]
        cover.append(row["2.5%"] <= delta <= row["97.5%"])
        if delta == 0.0:
            reject.append(row["p"] < 0.05)
    assert 0.85 <= np.mean(cover) <= 1.0
    assert np.mean(reject) <= 0.15


@pytest.mark.parametrize("group", ["student_t", "cauchy"])
def test_student_t_groups_take_covariates_and_intercept_only_is_the_plain_fit(group):
    g, _, data = _bandit(30, 0.8, seed=6)
    m = EMModel(data, rw1a1b_fit, device="cpu")
    # both fits stop within 1e-5 (relative) of their fixed point, well inside the comparison's 2e-4
    tight = {"mstep_maxit": 300, "group_tol": 1e-5}
    plain = m.fit(verbose=0, group=group, **tight)
    one = m.fit(verbose=0, group=group, covariates=g.astype(float), formula="~ 1", **tight)
    assert plain.convergence and one.convergence
    assert isinstance(one.group.base, StudentTGroup) and one.group.name == f"{group}+covariates"
    # the same fixed point, up to the inner iterations' tolerances (they start from different points)
    torch.testing.assert_close(one.group.B[0], plain.group.loc, rtol=0, atol=2e-4)
    torch.testing.assert_close(one.group.base.scale, plain.group.scale, rtol=0, atol=2e-4)
    torch.testing.assert_close(one.m, plain.m, rtol=0, atol=1e-3)
    res = m.fit(verbose=0, group=group, covariates=g.astype(float), formula={"alpha": "~ x"}, mstep_maxit=60)
    tab = res.group_coefficients()
    assert np.isfinite(tab["se"]).all() and (tab["se"] > 0).all()
    assert tab.loc[("alpha", "x"), "estimate"] > 0
    back = group_from_state(res.group.state_dict())
    torch.testing.assert_close(back.neg_log_prior(res.m, torch.arange(30)), res.group.neg_log_prior(res.m, torch.arange(30)))


def test_monte_carlo_louis_of_a_nearly_gaussian_t_matches_the_closed_form():
    rng = np.random.default_rng(8)
    S = 40
    d = build_design(pd.DataFrame({"x": rng.normal(size=S)}), None, list(range(S)), ["a", "b"])
    X, free = torch.as_tensor(d.X), torch.as_tensor(d.free)
    B = torch.as_tensor(rng.normal(size=(2, 2)))
    m = torch.as_tensor(rng.normal(size=(S, 2))) + X @ B
    V = torch.diag_embed(torch.as_tensor(rng.uniform(0.1, 0.4, (S, 2))))
    scale = torch.tensor([0.7, 0.9], dtype=torch.float64)
    gauss = CovariateGroup(X, B, free, GaussianGroup(torch.zeros(2, dtype=torch.float64), scale ** 2, True), d.columns)
    t = CovariateGroup(X, B, free, StudentTGroup(torch.zeros(2, dtype=torch.float64), scale, df=1e7), d.columns)
    exact = louis_information(gauss, m, V)
    mc = louis_information(t, m, V, nsamples=20000)
    # the t vector holds log scales, the Gaussian's log variances: d log var = 2 d log scale
    J = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(mc, J @ exact @ J, rtol=0.05, atol=0.3)


@pytest.mark.slow
def test_coverage_of_the_learning_rate_difference_in_simulated_studies():
    """A smaller version of benchmarks/bench_group_regression.py (12 effect and 12 null studies of 60 subjects,
    importance E-step, wider bands): the intervals cover the truth, the null rarely rejects, and the
    difference is not attenuated (the Laplace E-step's estimates are, by about a quarter: see the README)."""
    cover, reject_null, effect = [], [], []
    for k in range(24):
        delta = 0.6 if k % 2 else 0.0
        g, _, data = _bandit(60, delta, seed=500 + k)
        row = EMModel(data, rw1a1b_fit, device="cpu").fit(
            verbose=0, covariates=g.astype(float), estep="importance", nsamples=200, group_tol=5e-3,
        ).group_coefficients().loc[("alpha", "x")]
        cover.append(row["2.5%"] <= delta <= row["97.5%"])
        (effect if delta else reject_null).append(row["estimate"] if delta else row["p"] < 0.05)
    assert np.mean(cover) >= 0.8
    assert np.mean(reject_null) <= 2 / 12
    assert abs(np.mean(effect) - 0.6) < 0.15
