"""Autograd gradients and exact Hessians of the RL likelihoods against finite differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torchem import SubjectBatch
from torchem.curvature import batched_hessian, invert_pd
from torchem.models.rl import rw1a1b_fit, rw2a1b_fit

from conftest import ragged_bandit_data

MODELS = [(rw1a1b_fit, 2, "rw1a1b"), (rw2a1b_fit, 3, "rw2a1b")]
MODEL_IDS = ["rw1a1b", "rw2a1b"]


def _batch(model_name: str, seed: int, continuous_rewards: bool) -> SubjectBatch:
    # ragged: 1, 2, 4, 3 and 4 blocks of 12 trials, plus one subject with a short block
    data = ragged_bandit_data(seed=seed, blocks=(1, 2, 4, 3, 4), ntrials=12, model=model_name)
    rng = np.random.default_rng(seed)
    if continuous_rewards:
        data = [[c, rng.uniform(-1.0, 2.0, size=r.shape)] for c, r in data]
    data.append([data[0][0][:, :7], data[0][1][:, :7]])
    return SubjectBatch.from_lists(data, names=["choices", "rewards"])


def _setup(fit, P, name, seed):
    # rw2a1b switches learning rate at PE == 0; binary rewards keep PE away from 0 so the
    # likelihood is smooth around every evaluation point.  rw1a1b gets continuous rewards.
    batch = _batch(name, seed, continuous_rewards=(name == "rw1a1b"))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch.n_subjects, P, generator=gen, dtype=torch.float64) * 1.2

    def nll(z):
        return fit(z, *batch.data, mask=batch.mask)

    return batch, x, nll


def _autograd_grad(nll, x):
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nll(xg).sum(), xg)
    return g


def _fd_grad(nll, x, h=1e-5):
    S, P = x.shape
    g = torch.zeros_like(x)
    with torch.no_grad():
        for j in range(P):
            e = torch.zeros_like(x)
            e[:, j] = h
            g[:, j] = (nll(x + e) - nll(x - e)) / (2 * h)
    return g


def _rel_err(a, b):
    """Per-subject ||a - b|| / ||b||."""
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


@pytest.mark.parametrize("fit,P,name", MODELS, ids=MODEL_IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_matches_central_differences(fit, P, name, seed):
    batch, x, nll = _setup(fit, P, name, seed)
    assert not bool(batch.mask.all())  # really padded
    g = _autograd_grad(nll, x)
    g_fd = _fd_grad(nll, x)
    assert torch.isfinite(g).all()
    assert g.abs().min() > 1e-6  # non-trivial gradients in every coordinate
    assert _rel_err(g, g_fd) < 1e-6


@pytest.mark.parametrize("fit,P,name", MODELS, ids=MODEL_IDS)
def test_batched_hessian_matches_finite_differences_of_gradient(fit, P, name):
    batch, x, nll = _setup(fit, P, name, seed=2)
    H = batched_hessian(nll, x)
    assert H.shape == (batch.n_subjects, P, P)
    torch.testing.assert_close(H, H.transpose(-1, -2), rtol=0, atol=0)
    h = 1e-5
    H_fd = torch.zeros_like(H)
    for j in range(P):
        e = torch.zeros_like(x)
        e[:, j] = h
        H_fd[:, :, j] = (_autograd_grad(nll, x + e) - _autograd_grad(nll, x - e)) / (2 * h)
    H_fd = 0.5 * (H_fd + H_fd.transpose(-1, -2))
    assert _rel_err(H, H_fd) < 1e-5


@pytest.mark.parametrize("fit,P,name", MODELS, ids=MODEL_IDS)
def test_batched_hessian_matches_single_subject_autograd_hessian(fit, P, name):
    batch, x, nll = _setup(fit, P, name, seed=3)
    H = batched_hessian(nll, x)
    for i in range(batch.n_subjects):
        # the subject on its own, unpadded: its data trimmed to its real trials
        nb = int(batch.mask[i].any(-1).sum())
        nt = int(batch.mask[i, 0].sum())
        c = batch.fields["choices"][i : i + 1, :nb, :nt]
        r = batch.fields["rewards"][i : i + 1, :nb, :nt]

        def one(z, c=c, r=r):
            return fit(z.unsqueeze(0), c, r)[0]

        H1 = torch.autograd.functional.hessian(one, x[i])
        torch.testing.assert_close(H[i], 0.5 * (H1 + H1.T), rtol=1e-10, atol=1e-10)


def test_batched_hessian_of_a_known_function():
    # f_i(x) = sum_j a_ij x_j^2 + b_i x_0 x_1^3 ; exact Hessian by hand
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(6, 2, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    x = torch.randn(6, 2, generator=gen, dtype=torch.float64)

    def f(z):
        return (a * z ** 2).sum(1) + b * z[:, 0] * z[:, 1] ** 3

    H = batched_hessian(f, x)
    expected = torch.zeros(6, 2, 2, dtype=torch.float64)
    expected[:, 0, 0] = 2 * a[:, 0]
    expected[:, 1, 1] = 2 * a[:, 1] + 6 * b * x[:, 0] * x[:, 1]
    expected[:, 0, 1] = expected[:, 1, 0] = 3 * b * x[:, 1] ** 2
    torch.testing.assert_close(H, expected, rtol=1e-13, atol=1e-13)


# -------------------------------------------------------------------- invert_pd
def _random_pd(n, P, seed):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, P, P, generator=gen, dtype=torch.float64)
    return A @ A.transpose(-1, -2) + 0.5 * torch.eye(P, dtype=torch.float64)


def test_invert_pd_inverts_positive_definite_matrices():
    H = _random_pd(5, 3, seed=0)
    fallback = torch.diag(torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64))
    inv, logdet, ok = invert_pd(H, fallback)
    assert ok.all()
    torch.testing.assert_close(inv, torch.linalg.inv(H), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inv @ H, torch.eye(3, dtype=torch.float64).expand(5, 3, 3), rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(H)[1], rtol=1e-12, atol=1e-12)


def test_invert_pd_flags_and_replaces_bad_matrices():
    H = _random_pd(5, 3, seed=1)
    H[1] = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))  # indefinite
    H[3] = torch.zeros(3, 3, dtype=torch.float64)  # singular (PSD, not PD)
    H[4, 0, 2] = H[4, 2, 0] = float("nan")  # not finite
    fallback = torch.diag(torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64))
    inv, logdet, ok = invert_pd(H, fallback)
    assert ok.tolist() == [True, False, True, False, False]
    for i in (1, 3, 4):
        torch.testing.assert_close(inv[i], fallback, rtol=0, atol=0)
        assert logdet[i].item() == pytest.approx(-np.log(24.0), rel=1e-14)
    for i in (0, 2):
        torch.testing.assert_close(inv[i], torch.linalg.inv(H[i]), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(inv).all() and torch.isfinite(logdet).all()
