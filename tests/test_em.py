"""The hierarchical EM fit: agreement with pyEM, recovery, ragged data, custom models, determinism."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import torchem.estep
from torchem import EMModel, FitResult, IterationState, Model, SubjectBatch, run_em
from torchem.estep import neg_log_posterior
from torchem.groups import GaussianGroup
from torchem.models.rl import rw1a1b_fit
from torchem.optim import minimize
from torchem.transforms import identity, norm2alpha, norm2beta

from conftest import lists_to_dataframe, ragged_bandit_data, simulate_bandit

DT = torch.float64


def _prior_of_last_estep(res: FitResult) -> GaussianGroup:
    """The group prior the final E-step used."""
    assert isinstance(res.estep_prior, GaussianGroup)
    return res.estep_prior


def _check_mstep_identity(res: FitResult, diagonal: bool = True):
    """The reported group is the M-step of the reported MAPs and inverse Hessians."""
    m, V = res.m, res.inv_h
    mu = m.mean(0)
    cov = (m.unsqueeze(-1) * m.unsqueeze(-2) + V).mean(0) - torch.outer(mu, mu)
    torch.testing.assert_close(res.posterior_mu, mu, rtol=0, atol=1e-13)
    if diagonal:
        torch.testing.assert_close(res.posterior_cov, torch.diag(cov.diagonal()), rtol=1e-12, atol=1e-13)
    else:
        torch.testing.assert_close(res.posterior_cov, cov, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.posterior_sigma, res.posterior_cov.diagonal(), rtol=0, atol=0)


# ======================================================================= reference
class TestReference:
    """The 100-subject reference data set against pyEM's fit of the same model."""

    def test_converged_cleanly(self, reference_model):
        res = reference_model.result
        assert res.convergence and not res.stopped
        assert res.hessian_ok.dtype == torch.bool and res.hessian_ok.shape == (100,)
        assert bool(res.hessian_ok.all()) and bool(res.estep_success.all())
        assert res.m.dtype == DT and res.m.shape == (100, 2)
        assert res.n_obs.tolist() == [96] * 100

    def test_group_mean_and_variance(self, reference_model, pyem_reference):
        res = reference_model.result
        mu = res.posterior_mu.numpy()
        np.testing.assert_allclose(mu, pyem_reference["group_mu_normalized"], rtol=0, atol=0.15)
        np.testing.assert_allclose(res.posterior_sigma.numpy(), pyem_reference["group_var_normalized"],
                                   rtol=0, atol=0.15)
        _check_mstep_identity(res)

    def test_subject_maps_correlate_with_pyem(self, reference_model, pyem_reference):
        ours = reference_model.result.m.numpy()
        theirs = np.asarray(pyem_reference["subject_map_normalized"])
        assert theirs.shape == ours.shape == (100, 2)
        for j in range(2):
            assert np.corrcoef(ours[:, j], theirs[:, j])[0, 1] >= 0.98
        assert float(reference_model.result.NPL.sum()) == pytest.approx(pyem_reference["NPL_sum"], abs=1.0)

    def test_maps_are_stationary_points_of_the_posterior(self, reference_model):
        res = reference_model.result
        prior = _prior_of_last_estep(res)
        batch = reference_model.batch
        x = res.m.clone().requires_grad_(True)
        nll = rw1a1b_fit(x, *batch.data, mask=batch.mask)
        npl = nll + prior.neg_log_prior(x)
        (g,) = torch.autograd.grad(npl.sum(), x)
        assert g.abs().max() < 1e-5
        torch.testing.assert_close(npl.detach(), res.NPL, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(nll.detach(), res.NLL, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(res.NPL, res.NLL + res.NLPrior, rtol=0, atol=1e-10)

    def test_lme(self, reference_model, pyem_reference):
        lap, total, good = reference_model.compute_lme()
        assert isinstance(lap, np.ndarray) and lap.shape == (100,)
        assert isinstance(total, float)
        assert isinstance(good, np.ndarray) and good.shape == (100,) and good.dtype == bool and good.all()
        assert total == pytest.approx(lap.sum() - 2 * math.log(100), rel=1e-13)
        assert abs(total - pyem_reference["LME"]) < 5.0
        # independent Laplace evidence of a few subjects from an autograd Hessian
        res = reference_model.result
        prior = _prior_of_last_estep(res)
        batch = reference_model.batch
        for i in (0, 41, 99):
            def npl(z, i=i):
                zz = z.unsqueeze(0)
                return (rw1a1b_fit(zz, *(d[i : i + 1] for d in batch.data), mask=batch.mask[i : i + 1])
                        + prior.neg_log_prior(zz))[0]

            H = torch.autograd.functional.hessian(npl, res.m[i])
            expected = -float(npl(res.m[i])) + math.log(2 * math.pi) - 0.5 * float(torch.logdet(H))
            assert lap[i] == pytest.approx(expected, abs=1e-7)
            torch.testing.assert_close(res.inv_h[i], torch.linalg.inv(H), rtol=1e-8, atol=1e-10)

    def test_integrated_bic(self, reference_model, pyem_reference):
        bic = reference_model.compute_integrated_bic(nsamples=500, convention="pyem")
        assert isinstance(bic, float)
        assert abs(bic - pyem_reference["BICint_pyem_convention"]) < 10.0
        again = reference_model.compute_integrated_bic(nsamples=500, convention="pyem")
        assert again == bic
        other = reference_model.compute_integrated_bic(nsamples=500, convention="pyem", seed=1)
        assert other != bic and abs(other - bic) < 10.0
        # the two conventions differ only in the penalty
        huys = reference_model.compute_integrated_bic(nsamples=500, convention="huys")
        assert huys - bic == pytest.approx(4 * math.log(9600) - 2 * math.log(96), rel=1e-9)
        with pytest.raises(ValueError, match="convention"):
            reference_model.compute_integrated_bic(nsamples=10, convention="bogus")

    def test_integrated_log_likelihood_is_below_the_best_fit(self, reference_model):
        ilog = reference_model.integrated_log_likelihood(nsamples=300, seed=3)
        assert ilog.shape == (100,) and torch.isfinite(ilog).all()
        # an average of likelihoods over the group cannot exceed the likelihood at the MAP by much; here
        # the MAP is close to the maximum likelihood, so it bounds the average from above
        assert (ilog <= -reference_model.result.NLL + 1e-9).all()
        small_chunks = reference_model.integrated_log_likelihood(nsamples=300, seed=3, max_elements=5000)
        torch.testing.assert_close(small_chunks, ilog, rtol=0, atol=1e-10)

    def test_pseudo_r2(self, reference_model):
        r2 = reference_model.compute_pseudo_r2()
        assert 0.0 < r2 < 1.0
        nll = reference_model.result.NLL.numpy()
        assert r2 == pytest.approx(1 - np.median(nll) / (96 * math.log(2)), rel=1e-12)
        r2_mean = reference_model.compute_pseudo_r2(metric="mean")
        assert r2_mean == pytest.approx(1 - nll.mean() / (96 * math.log(2)), rel=1e-12)
        with pytest.raises(ValueError, match="metric"):
            reference_model.compute_pseudo_r2(metric="max")

    def test_params_df_and_recovery_of_true_parameters(self, reference_model, reference_true):
        df = reference_model.result.params_df()
        assert list(df.columns) == ["beta", "alpha"]
        assert df.index.name == "subject" and list(df.index) == list(range(1, 101))
        true = reference_true.set_index("subject").loc[df.index]
        for name in ("beta", "alpha"):
            assert np.corrcoef(df[name], true[name])[0, 1] >= 0.8
        assert ((df["beta"] > 0) & (df["beta"] < 20)).all() and ((df["alpha"] > 0) & (df["alpha"] < 1)).all()


# ======================================================================== recovery
@pytest.fixture(scope="module")
def recovery_set():
    return simulate_bandit(100, nblocks=4, ntrials=24, seed=0)


@pytest.fixture(scope="module")
def recovery_fit(recovery_set):
    _, _, all_data = recovery_set
    model = EMModel(all_data, rw1a1b_fit, device="cpu")
    model.fit(verbose=0)
    return model


def test_parameter_recovery_direct(recovery_set, recovery_fit):
    true, _, _ = recovery_set
    est = recovery_fit.result.natural_params().numpy()
    for j in range(2):
        assert np.corrcoef(true[:, j], est[:, j])[0, 1] >= 0.8


def test_parameter_recovery_with_emmodel_recover(recovery_set, recovery_fit, small_data):
    true, _, _ = recovery_set
    _, _, small = small_data
    model = EMModel(small, rw1a1b_fit, device="cpu")
    # simulate_bandit draws the simulation with seed + 1000; recover repeats it exactly
    rec = model.recover(true, nblocks=4, ntrials=24, seed=1000)
    assert set(rec) >= {"true_params", "estimated_params", "correlation", "rmse", "param_names", "fit_result", "sim"}
    assert rec["param_names"] == ["beta", "alpha"]
    assert rec["estimated_params"].shape == (100, 2) and rec["correlation"].shape == (2,)
    assert (rec["correlation"] >= 0.8).all()
    # same simulated data and same seed: the same fit as the direct one
    np.testing.assert_array_equal(rec["estimated_params"], recovery_fit.result.natural_params().numpy())
    direct_r = [np.corrcoef(true[:, j], rec["estimated_params"][:, j])[0, 1] for j in range(2)]
    np.testing.assert_allclose(rec["correlation"], direct_r, rtol=1e-14)
    np.testing.assert_allclose(rec["rmse"], np.sqrt(((true - rec["estimated_params"]) ** 2).mean(0)), rtol=1e-14)
    # the model it was called on is left alone
    assert model.result is None


# ========================================================================== ragged
def test_ragged_maps_under_a_fixed_prior_match_unpadded_subjects():
    data = ragged_bandit_data(seed=11, blocks=(2, 3, 4, 2, 4))  # 48, 72, 96, 48, 96 trials
    batch = SubjectBatch.from_lists(data, names=["choices", "rewards"])
    assert batch.n_obs.tolist() == [48, 72, 96, 48, 96]
    model = Model.resolve(rw1a1b_fit)
    group = GaussianGroup(torch.tensor([-0.3, 0.2], dtype=DT), torch.diag(torch.tensor([0.8, 1.3], dtype=DT)))
    x0 = torch.zeros(batch.n_subjects, 2, dtype=DT)
    padded = minimize(neg_log_posterior(model, batch, group), x0, gtol=1e-10, max_iter=500)
    assert padded.success.all()
    for i, subject in enumerate(data):
        alone = SubjectBatch.from_lists([subject], names=["choices", "rewards"])
        assert bool(alone.mask.all())  # no padding at all
        res = minimize(neg_log_posterior(model, alone, group), x0[:1], gtol=1e-10, max_iter=500)
        assert res.success.all()
        torch.testing.assert_close(padded.x[i], res.x[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(padded.fun[i], res.fun[0], rtol=0, atol=1e-9)
    # a different prior really moves the MAPs (the test above is not vacuous)
    wide = GaussianGroup(torch.zeros(2, dtype=DT), 100 * torch.eye(2, dtype=DT))
    other = minimize(neg_log_posterior(model, batch, wide), x0, gtol=1e-10, max_iter=500)
    assert (other.x - padded.x).abs().max() > 0.05


def test_ragged_em_fit_lists_equals_dataframe():
    data = ragged_bandit_data(seed=12, blocks=(2, 3, 4) * 4)
    ids = list(range(len(data)))
    from_lists = EMModel(data, rw1a1b_fit, device="cpu")
    from_df = EMModel(lists_to_dataframe(data, ids), rw1a1b_fit, columns=["choice", "reward"],
                      block="block", trial="trial", device="cpu")
    torch.testing.assert_close(from_lists.batch.mask, from_df.batch.mask)
    a = from_lists.fit(verbose=0)
    b = from_df.fit(verbose=0)
    assert a.convergence and b.convergence
    assert a.n_obs.tolist() == [48, 72, 96] * 4
    torch.testing.assert_close(a.m, b.m, rtol=0, atol=1e-10)
    torch.testing.assert_close(a.posterior_mu, b.posterior_mu, rtol=0, atol=1e-10)
    torch.testing.assert_close(a.NPL, b.NPL, rtol=0, atol=1e-9)
    assert a.n_iter == b.n_iter
    _check_mstep_identity(a)
    # evidence accounts for each subject's own trial count
    lap, total, good = from_lists.compute_lme()
    assert good.all() and np.isfinite(lap).all()
    assert from_lists.compute_pseudo_r2(metric="mean") == pytest.approx(
        1 - a.NLL.mean().item() / (a.n_obs.double().mean().item() * math.log(2)), rel=1e-12)


# ===================================================================== per_subject
def rw1a1b_one_subject(params, choices, rewards, mask=None, output="nll"):
    """One subject's rw1a1b nll: params (2,), choices/rewards/mask (B, T)."""
    beta = norm2beta(params[0])
    alpha = norm2alpha(params[1])
    B, T = choices.shape
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool)
    v0 = torch.full((B,), 0.5, dtype=params.dtype)
    v1 = torch.full((B,), 0.5, dtype=params.dtype)
    nll = params.new_zeros(())
    for t in range(T):
        c = choices[:, t].to(params.dtype)
        r = rewards[:, t]
        m = mask[:, t].to(params.dtype)
        dv = v1 - v0
        nll = nll - (F.logsigmoid(beta * (2 * c - 1) * dv) * m).sum()
        pe = r - (v0 + c * dv)
        v0 = v0 + alpha * pe * (1 - c) * m
        v1 = v1 + alpha * pe * c * m
    if output == "all":
        return {"nll": nll, "params": torch.stack([beta, alpha])}
    return nll


def test_per_subject_function_matches_batched_model(small_data, small_model):
    _, _, all_data = small_data
    model = EMModel(all_data, rw1a1b_one_subject, param_names=["beta", "alpha"],
                    param_xform=[norm2beta, norm2alpha], per_subject=True, device="cpu")
    batched = small_model.result
    res = model.fit(verbose=0)
    assert res.convergence
    torch.testing.assert_close(res.posterior_mu, batched.posterior_mu, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.posterior_sigma, batched.posterior_sigma, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.m, batched.m, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.inv_h, batched.inv_h, rtol=0, atol=1e-5)
    # evaluation through vmap agrees with the batched model exactly
    x = batched.m
    torch.testing.assert_close(model.model.nll(x, model.batch.data, model.batch.mask),
                               rw1a1b_fit(x, *small_model.batch.data, mask=small_model.batch.mask),
                               rtol=1e-12, atol=1e-10)
    out = model.get_outfit()
    assert out["params"].shape == (20, 2) and out["nll"].shape == (20,)


def test_per_subject_on_ragged_data():
    data = ragged_bandit_data(seed=21, blocks=(2, 4, 3, 1))
    batch = SubjectBatch.from_lists(data, names=["choices", "rewards"])
    model = Model(rw1a1b_one_subject, ["beta", "alpha"], [norm2beta, norm2alpha], per_subject=True)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    torch.testing.assert_close(model.nll(x, batch.data, batch.mask), rw1a1b_fit(x, *batch.data, mask=batch.mask),
                               rtol=1e-12, atol=1e-10)


def test_wrong_nll_shape_is_explained():
    def summed(params, choices, rewards, mask=None, output="nll"):
        return rw1a1b_fit(params, choices, rewards, mask=mask).sum()  # a scalar, not (S,)

    data = ragged_bandit_data(seed=1, blocks=(1, 1, 1))
    with pytest.raises(ValueError, match=r"shape \(1,\), got \(\).*per_subject=True"):  # one subject is tried at once
        EMModel(data, summed, param_names=["beta", "alpha"], device="cpu")


# ================================================================== custom model
def bernoulli_bias(params, choices, mask=None, output="nll"):
    """Choices are Bernoulli(p) with p = sigmoid(x): a batched custom model."""
    p = torch.sigmoid(params[:, 0])
    c = choices.to(params.dtype)
    m = torch.ones_like(c) if mask is None else mask.to(params.dtype)
    ll = (c * F.logsigmoid(params[:, :1]) + (1 - c) * F.logsigmoid(-params[:, :1])) * m
    nll = -ll.sum(1)
    if output == "all":
        return {"nll": nll, "params": p[:, None]}
    return nll


def test_custom_batched_model_and_exact_em_identities():
    rng = np.random.default_rng(5)
    n = 40
    k_true = np.array([2, 5, 9, 14, 17, 20, 24, 27, 31, 33, 36, 38])
    data = [[rng.permutation(np.r_[np.ones(k), np.zeros(n - k)]).astype(np.int64)] for k in k_true]
    model = EMModel(data, bernoulli_bias, param_names=["p"], param_xform=[norm2alpha],
                    input_names=["choices"], device="cpu")
    assert model.param_names == ["p"] and model.model.param_xform == [norm2alpha]
    res = model.fit(verbose=0)
    assert res.convergence and res.hessian_ok.all() and res.estep_success.all()
    # MAP first-order condition of logistic-normal: k - n sigmoid(m) - (m - mu)/var = 0,
    # with the prior of the final E-step
    prior = _prior_of_last_estep(res)
    m = res.m[:, 0]
    p = torch.sigmoid(m)
    k = torch.tensor(k_true, dtype=DT)
    resid = k - n * p - (m - prior.mu[0]) / prior.var[0]
    assert resid.abs().max() < 1e-5
    # exact posterior curvature: n p (1 - p) + 1/var
    torch.testing.assert_close(res.inv_h[:, 0, 0], 1.0 / (n * p * (1 - p) + 1.0 / prior.var[0]), rtol=1e-9, atol=0)
    _check_mstep_identity(res)
    # shrinkage keeps the order of the observed frequencies and pulls towards the group mean
    est = res.params_df()["p"].to_numpy()
    assert (np.diff(est) > 0).all()
    freq = k_true / n
    centre = float(torch.sigmoid(res.posterior_mu[0]))
    assert (np.abs(est - centre) <= np.abs(freq - centre) + 1e-12).all()
    out = model.get_outfit()
    np.testing.assert_allclose(out["params"][:, 0], est, rtol=1e-12)


def test_custom_model_identity_transform_by_default():
    rng = np.random.default_rng(0)
    data = [[rng.integers(0, 2, 30)] for _ in range(6)]
    model = EMModel(data, bernoulli_bias, param_names=["logit_p"], input_names=["choices"], device="cpu")
    assert model.model.param_xform == [identity]
    res = model.fit(verbose=0, mstep_maxit=3)
    torch.testing.assert_close(res.natural_params(), res.m, rtol=0, atol=0)


def test_custom_model_requires_param_names():
    with pytest.raises(ValueError, match="param_names is required"):
        EMModel([[np.array([0, 1])]], bernoulli_bias, device="cpu")
    with pytest.raises(ValueError, match="2 parameter names but 1 transforms"):
        EMModel([[np.array([0, 1])]], bernoulli_bias, param_names=["a", "b"], param_xform=[identity], device="cpu")


# ======================================================= determinism, callbacks, API
def test_same_seed_is_bit_identical_and_other_seed_differs(small_data, small_model):
    _, _, all_data = small_data
    again = EMModel(all_data, rw1a1b_fit, device="cpu").fit(verbose=0, seed=0)
    first = small_model.result
    assert torch.equal(again.m, first.m)
    assert torch.equal(again.NPL, first.NPL)
    assert torch.equal(again.inv_h, first.inv_h)
    pd.testing.assert_frame_equal(again.history, first.history, check_exact=True)
    other = EMModel(all_data, rw1a1b_fit, device="cpu").fit(verbose=0, seed=1)
    assert not torch.equal(other.m, first.m)
    # ... but it is the same optimum
    torch.testing.assert_close(other.m, first.m, rtol=0, atol=1e-3)


def test_run_em_directly_equals_emmodel_fit(small_data, small_model):
    _, _, all_data = small_data
    batch = SubjectBatch.from_lists(all_data, names=["choices", "rewards"])
    res = run_em(Model.resolve(rw1a1b_fit), batch, verbose=0)
    assert torch.equal(res.m, small_model.result.m)
    with pytest.raises(ValueError, match="group must be"):
        run_em(Model.resolve(rw1a1b_fit), batch, verbose=0, group="block")


def test_callback_every_iteration_and_history(small_data, small_model):
    _, _, all_data = small_data
    states = []
    res = EMModel(all_data, rw1a1b_fit, device="cpu").fit(verbose=0, callback=states.append, mstep_maxit=500)
    assert res.convergence and not res.stopped
    assert all(isinstance(s, IterationState) for s in states)
    assert [s.iteration for s in states] == list(range(1, res.n_iter + 1))
    assert len(res.history) == res.n_iter
    assert list(res.history["iteration"]) == list(range(1, res.n_iter + 1))
    assert set(res.history.columns) >= {"iteration", "NPL", "mu[beta]", "mu[alpha]", "sigma[beta]",
                                         "sigma[alpha]", "estep_failed", "hessian_bad"}
    assert all(s.max_iterations == 500 for s in states)
    assert [s.converged for s in states] == [False] * (res.n_iter - 1) + [True]
    np.testing.assert_array_equal([s.npl for s in states], res.history["NPL"].to_numpy())
    np.testing.assert_allclose(states[-1].mu, res.posterior_mu.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(states[-1].sigma, res.posterior_sigma.numpy(), rtol=0, atol=0)
    assert res.history["NPL"].iloc[-1] == pytest.approx(float(res.NPL.sum()), rel=1e-14)
    # the default rule (estimated gap to the fixed point) was met at the last kept E-step, not before
    assert res.stop_reason.startswith("lme rule met") and "gap to the fixed point" in res.history["rule"].iloc[-1]
    kept = res.history.dropna(subset=["gap_lme"])
    met = (kept["gap_lme"] < 1e-3) & (kept["gap_hyper"] < 1e-3)
    twice = met & met.shift(fill_value=False)  # the rule needs two kept E-steps in a row
    assert twice.iloc[-1] and not twice.iloc[:-1].any()
    assert res.fixed_point_gap["lme"] == kept["gap_lme"].iloc[-1]
    # same fit as without a callback
    assert torch.equal(res.m, small_model.result.m)


def test_callback_returning_false_stops_early(small_data):
    _, _, all_data = small_data
    seen = []

    def stop_at_three(state):
        seen.append(state.iteration)
        return state.iteration < 3

    res = EMModel(all_data, rw1a1b_fit, device="cpu").fit(verbose=0, callback=stop_at_three)
    assert res.stopped and not res.convergence
    assert res.n_iter == 3 and seen == [1, 2, 3] and len(res.history) == 3
    assert "stopped after 3 iterations" in repr(res)
    # a callback returning None does not stop
    res2 = EMModel(all_data, rw1a1b_fit, device="cpu").fit(verbose=0, callback=lambda s: None, mstep_maxit=4)
    assert not res2.stopped and res2.n_iter == 4


def test_fitresult_accessors_and_repr(small_model):
    res = small_model.result
    text = repr(res)
    assert text.startswith("FitResult(20 subjects, 2 parameters, converged after")
    assert f"{res.n_iter} iterations" in text and "beta=" in text and "non-PD Hessians 0" in text
    df = res.params_df()
    assert df.shape == (20, 2) and list(df.index) == list(range(20)) and df.index.name == "subject"
    np.testing.assert_allclose(df.to_numpy(), res.natural_params().numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(df["beta"], 20 / (1 + np.exp(-res.m[:, 0].numpy())), rtol=1e-14)
    g = res.group_df()
    assert list(g.index) == ["beta", "alpha"]
    np.testing.assert_allclose(g["sd"] ** 2, res.posterior_sigma.numpy(), rtol=1e-14)
    assert res.n_subjects == 20 and res.n_params == 2 and res.group_name == "gaussian" and res.group.diagonal


def test_full_covariance_group(recovery_fit):
    model = EMModel(recovery_fit.batch, rw1a1b_fit, device="cpu")
    res = model.fit(verbose=0, group="full")
    assert res.group_name == "gaussian" and not res.group.diagonal and res.convergence
    cov = res.posterior_cov
    torch.testing.assert_close(cov, cov.T, rtol=0, atol=0)
    assert torch.linalg.eigvalsh(cov).min() > 1e-3
    assert cov[0, 1].abs() > 1e-6  # really a full covariance
    _check_mstep_identity(res, diagonal=False)
    # the diagonal fit of the same data is close
    torch.testing.assert_close(res.posterior_mu, recovery_fit.result.posterior_mu, rtol=0, atol=0.1)
    huys_full = model.compute_integrated_bic(nsamples=100, convention="huys")
    huys_pyem = model.compute_integrated_bic(nsamples=100, convention="pyem")
    assert huys_full - huys_pyem == pytest.approx(5 * math.log(9600) - 2 * math.log(96), rel=1e-9)


# =========================================================== non-PD Hessians, failures
def test_non_pd_hessian_is_flagged_and_replaced(small_data, monkeypatch):
    _, _, all_data = small_data
    real = torchem.estep.batched_hessian

    def broken(fun, x):
        H = real(fun, x)
        H = H.clone()
        H[3] = -H[3]  # subject 3 gets a negative definite "Hessian"
        return H

    monkeypatch.setattr(torchem.estep, "batched_hessian", broken)
    model = EMModel(all_data, rw1a1b_fit, device="cpu")
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        res = model.fit(verbose=0, mstep_maxit=6)
    assert res.hessian_ok.tolist() == [i != 3 for i in range(20)]
    assert (res.history["hessian_bad"] == 1).all()
    # the group covariance of the final E-step stands in for the inverse Hessian
    prior = _prior_of_last_estep(res)
    torch.testing.assert_close(res.inv_h[3], prior.cov, rtol=1e-12, atol=0)
    assert res.hess_logdet[3].item() == pytest.approx(-float(torch.logdet(prior.cov)), rel=1e-12)
    assert torch.isfinite(res.inv_h).all() and torch.isfinite(res.posterior_cov).all()
    lap, total, good = model.compute_lme()
    assert good.tolist() == res.hessian_ok.tolist() and np.isfinite(total)
    assert "non-PD Hessians 1" in repr(res)


def test_estep_failures_are_reported(small_data):
    _, _, all_data = small_data
    model = EMModel(all_data, rw1a1b_fit, device="cpu")
    with pytest.warns(RuntimeWarning, match="did not converge in the final E-step"):
        res = model.fit(verbose=0, mstep_maxit=2, estep_maxit=1, max_restarts=0)
    assert not res.estep_success.all()
    assert res.history["estep_failed"].iloc[-1] == int((~res.estep_success).sum())
    assert res.n_iter == 2 and not res.convergence and not res.stopped


def test_well_posed_fit_raises_no_warning(small_data):
    _, _, all_data = small_data
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = EMModel(all_data[:8], rw1a1b_fit, device="cpu").fit(verbose=0)
    assert res.convergence and res.warnings == []
    assert res.hessian_ok.all()


def test_non_finite_likelihood_everywhere_raises(small_data):
    def broken(params, choices, rewards, flag, mask=None, output="nll"):
        # NaN for the subjects whose data carry the flag, whatever the parameters
        out = rw1a1b_fit(params, choices, rewards, mask=mask)
        return torch.where(flag.flatten(1)[:, 0] > 0, torch.full_like(out, float("nan")), out)

    _, _, all_data = small_data
    data = [[c, r, np.full(c.shape, float(i == 2))] for i, (c, r) in enumerate(all_data[:5])]
    model = EMModel(data, broken, param_names=["beta", "alpha"], input_names=["choices", "rewards", "flag"],
                    device="cpu")
    with pytest.raises(RuntimeError, match=r"1 subject\(s\) have a non-finite objective at every start \(first: 2\)"):
        model.fit(verbose=0, max_restarts=1)


def test_hessian_chunks_give_the_same_fit(small_data, small_model):
    _, _, all_data = small_data
    batch = SubjectBatch.from_lists(all_data, names=["choices", "rewards"])
    res = run_em(Model.resolve(rw1a1b_fit), batch, verbose=0, hessian_chunk=7)
    torch.testing.assert_close(res.m, small_model.result.m, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.inv_h, small_model.result.inv_h, rtol=0, atol=1e-12)
    assert res.n_iter == small_model.result.n_iter


def test_float32_fit_keeps_its_dtype(small_data, small_model):
    _, _, all_data = small_data
    model = EMModel(all_data, rw1a1b_fit, device="cpu", dtype=torch.float32)
    res = model.fit(verbose=0)
    for t in (res.m, res.inv_h, res.posterior_mu, res.posterior_cov, res.NPL, res.hess_logdet):
        assert t.dtype == torch.float32
    torch.testing.assert_close(res.posterior_mu.double(), small_model.result.posterior_mu, rtol=0, atol=1e-3)
    torch.testing.assert_close(res.m.double(), small_model.result.m, rtol=0, atol=1e-2)
