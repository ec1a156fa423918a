"""Cross-validated held-out predictive likelihood: folds, exact scores by quadrature, model choice, compare/BMS."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import simulate_bandit

from torchem import EMModel, ModelComparison
from torchem.crossval import compare_cv, fold_masks
from torchem.evidence import bms
from torchem.models.bayes import bayes_fit, bayes_simulate
from torchem.models.discounting import td_hyp_k_fit, td_hyp_k_simulate
from torchem.models.glm import glm_fit, glm_simulate
from torchem.models.rl import rw1a1b_fit, rw2a1b_fit


def _data(sim, fit, S):
    return [[sim[k][i] for k in fit.inputs] for i in range(S)]


# ------------------------------------------------------------------------------------------- folds
def test_block_folds_hold_out_every_real_block_once():
    from conftest import ragged_bandit_data
    model = EMModel(ragged_bandit_data(seed=0), rw1a1b_fit, device="cpu")
    mask = model.batch.mask  # subjects with 2-4 blocks
    folds = fold_masks(model.batch, "blocks", exchangeable=False)
    assert len(folds) == mask.shape[1]
    assert torch.equal(torch.stack(folds).sum(0), mask.long())
    for b, f in enumerate(folds):
        assert torch.equal(f, torch.zeros_like(mask).index_fill_(1, torch.tensor([b]), True) & mask)
    k2 = fold_masks(model.batch, 2, exchangeable=False, seed=1)
    assert torch.equal(torch.stack(k2).sum(0), mask.long())
    for f in k2:  # whole blocks only: a block is held out entirely or not at all
        held = f.any(-1)
        assert torch.equal(f, held[..., None] & mask)


def test_trial_folds_for_exchangeable_trials_are_balanced():
    rng = np.random.default_rng(0)
    sim = td_hyp_k_simulate(rng.uniform(0.01, 0.2, (5, 1)), seed=1)
    model = EMModel(_data(sim, td_hyp_k_fit, 5), td_hyp_k_fit, device="cpu")
    folds = fold_masks(model.batch, 5, exchangeable=True, seed=0)
    counts = torch.stack([f.reshape(5, -1).sum(1) for f in folds])  # (folds, S)
    n = model.batch.n_obs
    assert torch.equal(counts.sum(0), n) and int((counts.max(0).values - counts.min(0).values).max()) <= 1
    assert not torch.equal(folds[0], fold_masks(model.batch, 5, exchangeable=True, seed=1)[0])


def test_fold_errors_name_the_problem():
    _, sim, _ = simulate_bandit(4, nblocks=1)
    one_block = EMModel([[sim["choices"][i, 0], sim["rewards"][i, 0]] for i in range(4)], rw1a1b_fit, device="cpu")
    with pytest.raises(ValueError, match="folds='blocks' needs data in blocks"):
        fold_masks(one_block.batch, "blocks", exchangeable=False)
    with pytest.raises(ValueError, match="holds out whole blocks"):
        fold_masks(one_block.batch, 4, exchangeable=False)
    with pytest.raises(ValueError, match="folds must be"):
        fold_masks(one_block.batch, 1, exchangeable=True)


# ------------------------------------------------------------------------------------------- exact scores
def _quadrature_elpd(fit, batch, train_result, test_mask) -> np.ndarray:
    """``(S,)`` log of the held-out likelihood averaged over the training posterior, by quadrature (1 parameter)."""
    grid = torch.linspace(-9, 9, 3601, dtype=torch.float64)
    S = batch.n_subjects
    mu, var = float(train_result.posterior_mu[0]), float(train_result.posterior_sigma[0])
    log_prior = -0.5 * (grid - mu) ** 2 / var
    train_mask = batch.mask & ~test_mask
    out = []
    for s in range(S):
        d = tuple(t[s:s + 1].expand(grid.numel(), *t.shape[1:]) for t in batch.data)
        m_tr = train_mask[s:s + 1].expand(grid.numel(), *train_mask.shape[1:])
        m_te = test_mask[s:s + 1].expand(grid.numel(), *test_mask.shape[1:])
        with torch.no_grad():
            lp = -fit(grid[:, None], *d, mask=m_tr) + log_prior
            ll = -fit(grid[:, None], *d, mask=m_te)
        post = torch.log_softmax(lp, 0)
        out.append(float(torch.logsumexp(post + ll, 0)))
    return np.array(out)


@pytest.mark.parametrize("case", ["blocks", "trials"])
def test_held_out_scores_equal_quadrature(case):
    rng = np.random.default_rng(1)
    S = 12
    if case == "blocks":
        fit, sim = bayes_fit, bayes_simulate(rng.uniform(0.55, 0.9, (S, 1)), nblocks=6, seed=2)
        folds = "blocks"
    else:
        fit, sim = td_hyp_k_fit, td_hyp_k_simulate(rng.uniform(0.01, 0.3, (S, 1)), seed=2)
        folds = 4
    model = EMModel(_data(sim, fit, S), fit, device="cpu")
    model.fit(verbose=0)
    cv = model.cross_validate(folds=folds, nsamples=4000, seed=0)
    assert cv.scheme == case and cv.n_folds == (6 if case == "blocks" else 4)
    tests = fold_masks(model.batch, folds, exchangeable=(case == "trials"), seed=0)
    for f, (test, res) in enumerate(zip(tests, cv.fits)):
        exact = _quadrature_elpd(fit, model.batch, res, test)
        rows = cv.folds[cv.folds["fold"] == f]
        err = np.abs(rows["elpd"].to_numpy() - exact)
        assert (err < 4 * rows["mc_se"].to_numpy() + 2e-3).all(), (f, err.max())
        # at the training MAP: the held-out log-likelihood itself
        with torch.no_grad():
            at_map = -fit(res.m, *model.batch.data, mask=test).numpy()
        np.testing.assert_allclose(rows["map"], at_map, rtol=1e-10)
    # per-subject and total scores and their standard errors
    np.testing.assert_allclose(cv.subjects["elpd"], cv.folds.groupby("subject", sort=False)["elpd"].sum())
    assert cv.total == pytest.approx(cv.subjects["elpd"].sum())
    assert cv.total_se == pytest.approx(math.sqrt(S * cv.subjects["elpd"].var(ddof=1)))
    assert cv.subjects["n_heldout"].sum() == int(model.batch.mask.sum())
    assert (cv.folds["ess"] > 500).all()


# ------------------------------------------------------------------------------------------- model choice
def test_cross_validation_prefers_the_generating_model():
    rng = np.random.default_rng(0)
    S = 30
    params = np.column_stack([rng.uniform(3, 10, S), rng.uniform(0.6, 0.9, S), rng.uniform(0.05, 0.2, S)])
    _, _, all_data = simulate_bandit(S, model="rw2a1b", params=params, seed=2)
    mc = ModelComparison([EMModel(all_data, rw1a1b_fit, device="cpu"), EMModel(all_data, rw2a1b_fit, device="cpu")],
                         ["RW1", "RW2"])
    table = mc.compare(bicint_kwargs={"nsamples": 200}, fit_kwargs={"mstep_maxit": 50},
                       cv={"folds": "blocks", "fit_kwargs": {"mstep_maxit": 50}, "nsamples": 1000},
                       bms_evidence="cv")
    assert table["CV elpd (largest is best)"].idxmax() == "RW2"
    assert table.loc["RW1", "dCV"] < -4 * table.loc["RW1", "dCV SE"] < 0
    assert table.loc["RW2", "dCV"] == 0 and table.loc["RW2", "dCV SE"] == 0
    # the held-out scores are the BMS evidence: the same result as bms on subject_cv()
    per_subject = mc.subject_cv()
    assert list(per_subject.columns) == ["RW1", "RW2"] and len(per_subject) == S
    np.testing.assert_allclose(mc.bms_result.alpha, bms(per_subject).alpha)
    assert mc.bms_result.exp_r[1] > 0.7
    with pytest.raises(ValueError, match="needs cv"):
        mc.compare(bms_evidence="cv")


def test_trial_folds_prefer_the_regression_with_the_predictor_that_matters():
    rng = np.random.default_rng(3)
    S = 20
    nat = np.column_stack([rng.normal(0, 0.5, S), rng.normal(1.0, 0.3, S), rng.normal(0.6, 0.2, S), rng.uniform(0.7, 1.3, S)])
    sim = glm_simulate(nat, ntrials=60, seed=4)
    full = EMModel([[sim["X"][i], sim["Y"][i]] for i in range(S)], glm_fit, device="cpu")
    short = EMModel([[sim["X"][i][:, :2], sim["Y"][i]] for i in range(S)], glm_fit, device="cpu")
    res = {}
    for name, m in (("full", full), ("short", short)):
        m.fit(verbose=0)
        res[name] = m.cross_validate(folds=5, seed=1, nsamples=1000)
        assert res[name].scheme == "trials"
    table = compare_cv(res)
    assert table["elpd"].idxmax() == "full" and table.loc["short", "d_elpd"] < -4 * table.loc["short", "d_se"]
    by_map = compare_cv(res, "map")
    assert by_map["map"].idxmax() == "full"


def test_cross_validate_uses_the_fit_options_and_reports():
    _, _, all_data = simulate_bandit(10, seed=5)
    m = EMModel(all_data, rw1a1b_fit, device="cpu")
    with pytest.raises(RuntimeError, match="cross-validate the models first"):
        ModelComparison([m, EMModel(all_data, rw1a1b_fit)], ["a", "b"]).subject_cv()
    m.fit(verbose=0, group="full", mstep_maxit=20)
    cv = m.cross_validate(folds=2, nsamples=500, fit_kwargs={"mstep_maxit": 5})
    assert all(r.options.group == "full" and not r.group.diagonal and r.n_iter <= 5 for r in cv.fits)
    assert "2 folds over blocks" in repr(cv)
    assert np.isfinite(cv.subjects[["elpd", "se", "mc_se", "map"]].to_numpy()).all()
    # a subject's held-out score is a log probability of its held-out choices
    assert (cv.subjects["elpd"] < 0).all() and (cv.subjects["elpd_per_trial"] > -math.log(2) * 3).all()
