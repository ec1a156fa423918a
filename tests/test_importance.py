"""Importance-sampled E-step and evidence against grid-quadrature EM computed here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torchem import EMModel
from torchem.importance import importance_sample
from torchem.priors import chi2_draws
from torchem.models.rl import rw1a1b_fit, rw1a1b_simulate
from torchem.transforms import norm2alpha, norm2beta

GRID = np.linspace(-7.0, 7.0, 141)


def _grid_loglik(model: EMModel) -> np.ndarray:
    """``(S, G)`` log-likelihood of every subject at every node of a 2-D grid (normalized space)."""
    g1, g2 = np.meshgrid(GRID, GRID, indexing="ij")
    nodes = torch.as_tensor(np.column_stack([g1.ravel(), g2.ravel()]))
    data, mask = model.batch.data, model.batch.mask
    out = []
    with torch.no_grad():
        for s in range(model.batch.n_subjects):
            d = tuple(t[s:s + 1].expand(nodes.shape[0], *t.shape[1:]) for t in data)
            m = mask[s:s + 1].expand(nodes.shape[0], *mask.shape[1:])
            out.append(-rw1a1b_fit(nodes, *d, mask=m).numpy())
    return np.stack(out), nodes.numpy()


def _log_prior(nodes: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    return (-0.5 * ((nodes - mu) ** 2 / var + np.log(2 * math.pi * var))).sum(1)


def _quadrature_em(loglik: np.ndarray, nodes: np.ndarray, iters: int = 5000, tol: float = 1e-10):
    """Exact EM for a diagonal Gaussian group model, posterior moments by quadrature on the grid."""
    mu, var = np.zeros(2), np.ones(2)
    for _ in range(iters):
        lp = loglik + _log_prior(nodes, mu, var)
        w = np.exp(lp - lp.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        mean = w @ nodes
        second = w @ nodes ** 2
        new_mu = mean.mean(0)
        new_var = second.mean(0) - new_mu ** 2
        done = max(np.abs(new_mu - mu).max(), np.abs(new_var - var).max()) < tol
        mu, var = new_mu, new_var
        if done:
            break
    return mu, var


@pytest.fixture(scope="module")
def small_study():
    rng = np.random.default_rng(21)
    n = 40
    norm = rng.standard_normal((n, 2))
    sim = rw1a1b_simulate(np.column_stack([norm2beta(norm[:, 0]), norm2alpha(norm[:, 1])]),
                          nblocks=2, ntrials=24, seed=22)
    data = [[c, r] for c, r in zip(sim["choices"], sim["rewards"])]
    model = EMModel(data, rw1a1b_fit, device="cpu")
    loglik, nodes = _grid_loglik(model)
    return model, loglik, nodes, _quadrature_em(loglik, nodes)


def test_chi2_draws_have_the_right_moments():
    gen = torch.Generator().manual_seed(0)
    for df in (0.8, 5.0, 12.5):
        x = chi2_draws(300_000, df, gen, torch.float64)
        assert float(x.mean()) == pytest.approx(df, rel=0.01)
        assert float(x.var()) == pytest.approx(2 * df, rel=0.03)


def test_importance_moments_of_a_gaussian_posterior_are_exact():
    """For a Gaussian target the weights recover its mean, covariance and normalizing constant."""
    mean = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    cov = torch.tensor([[[1.0, 0.3], [0.3, 0.5]], [[0.2, 0.0], [0.0, 2.0]], [[1.5, -0.4], [-0.4, 0.6]]],
                       dtype=torch.float64)
    prec = torch.linalg.inv(cov)
    log_z = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)  # log normalizing constants

    def log_post(theta, idx):
        d = theta - mean[idx]
        quad = torch.einsum("np,npq,nq->n", d, prec[idx], d)
        return log_z[idx] - 0.5 * quad - 0.5 * torch.logdet(2 * math.pi * cov[idx])

    gen = torch.Generator().manual_seed(3)
    res = importance_sample(log_post, mean + 0.1, 1.3 * cov, 40_000, gen)
    torch.testing.assert_close(res.mean, mean, atol=0.02, rtol=0)
    torch.testing.assert_close(res.cov, cov, atol=0.04, rtol=0)
    torch.testing.assert_close(res.log_evidence, log_z, atol=0.01, rtol=0)
    assert (res.log_evidence_se < 0.01).all()
    assert (res.ess > 10_000).all()


def test_importance_em_matches_quadrature_em(small_study):
    model, loglik, nodes, (q_mu, q_var) = small_study
    res = model.fit(verbose=0, estep="importance", nsamples=1000, seed=0)
    assert res.estep == "importance" and res.convergence
    assert set(res.history["estep"]) == {"laplace", "importance"}
    assert res.history["nsamples"].iloc[-1] == 4000
    mu, var = res.posterior_mu.numpy(), res.posterior_sigma.numpy()
    np.testing.assert_allclose(mu, q_mu, atol=0.05)
    np.testing.assert_allclose(var, q_var, rtol=0.10)
    assert res.importance.ess.min() > 50
    # the Laplace path on the same data is visibly biased: its variances fall well short of quadrature
    lap = model.fit(verbose=0, seed=0)
    assert lap.estep == "laplace" and "nsamples" not in lap.history
    assert (lap.posterior_sigma.numpy() < 0.9 * q_var).any()


def test_importance_evidence_matches_quadrature(small_study):
    model, loglik, nodes, _ = small_study
    res = model.fit(verbose=0, estep="importance", nsamples=1000, seed=0)
    lme, total, good, se = model.compute_lme(method="importance", nsamples=4000, return_se=True)
    lp = loglik + _log_prior(nodes, res.posterior_mu.numpy(), res.posterior_sigma.numpy())
    h = GRID[1] - GRID[0]
    top = lp.max(1, keepdims=True)
    exact = (top[:, 0] + np.log(np.exp(lp - top).sum(1)) + 2 * math.log(h))
    assert np.abs(lme - exact).mean() < 0.05
    assert good.all() and (se > 0).all() and (se < 0.05).all()
    assert total == pytest.approx(lme.sum() - 2 * math.log(len(lme)))


def test_laplace_path_is_unchanged_by_the_option(small_study):
    model, *_ = small_study
    a = model.fit(verbose=0, seed=3)
    b = model.fit(verbose=0, seed=3, estep="laplace")
    assert torch.equal(a.m, b.m) and torch.equal(a.posterior_sigma, b.posterior_sigma)
    with pytest.raises(ValueError, match="estep"):
        model.fit(verbose=0, estep="gibbs")
    with pytest.raises(ValueError, match="method"):
        model.compute_lme(method="harmonic")
