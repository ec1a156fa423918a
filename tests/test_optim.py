"""Batched L-BFGS: independent problems converge to their own optima and stop on their own."""
from __future__ import annotations

import math

import torch

from torchem.optim import minimize, value_and_grad

DT = torch.float64


def _quadratics(S=8, P=4, seed=0):
    """f_i(x) = 0.5 (x - a_i)' A_i (x - a_i) + c_i with condition numbers from 1 to 1e4."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(S, P, P, generator=gen, dtype=DT))
    conds = torch.logspace(0, 4, S, dtype=DT)
    eig = torch.stack([torch.logspace(0, math.log10(float(k)), P, dtype=DT) for k in conds])
    A = Q @ torch.diag_embed(eig) @ Q.transpose(-1, -2)
    A = 0.5 * (A + A.transpose(-1, -2))
    a = torch.randn(S, P, generator=gen, dtype=DT) * 3
    c = torch.randn(S, generator=gen, dtype=DT)
    return A, a, c


def test_value_and_grad_is_exact_per_problem():
    A, a, c = _quadratics(S=3, P=3)
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=DT)

    def fun(z, idx):
        d = z - a[idx]
        return 0.5 * (d.unsqueeze(-2) @ A[idx] @ d.unsqueeze(-1)).reshape(-1) + c[idx]

    f, g = value_and_grad(fun, x, torch.arange(3))
    torch.testing.assert_close(g, (A @ (x - a).unsqueeze(-1)).squeeze(-1), rtol=1e-13, atol=1e-13)
    assert not f.requires_grad and not g.requires_grad


def test_quadratics_with_different_curvatures():
    A, a, c = _quadratics()
    calls = []

    def fun(x, idx):
        calls.append(idx.clone())
        d = x - a[idx]
        return 0.5 * (d.unsqueeze(-2) @ A[idx] @ d.unsqueeze(-1)).reshape(-1) + c[idx]

    x0 = torch.zeros_like(a)
    res = minimize(fun, x0, gtol=1e-9, max_iter=500)
    assert res.success.all()
    torch.testing.assert_close(res.x, a, rtol=0, atol=1e-7)
    torch.testing.assert_close(res.fun, c, rtol=0, atol=1e-10)
    assert res.grad.abs().amax() <= 1e-6
    assert res.x.shape == a.shape and res.fun.shape == (8,) and res.nit.shape == (8,)
    # well-conditioned problems stop earlier than ill-conditioned ones
    nit = res.nit.tolist()
    assert len(set(nit)) > 1
    assert nit[0] < nit[-1]
    # converged problems drop out: later evaluations see fewer problems, always a sorted subset
    sizes = [len(i) for i in calls]
    assert sizes[0] == 8 and min(sizes) < 8
    for idx in calls:
        assert bool((idx[1:] > idx[:-1]).all())
    assert res.nfev == len(calls)


def test_shifted_rosenbrock_problems():
    S = 6
    gen = torch.Generator().manual_seed(3)
    shift = torch.randn(S, 2, generator=gen, dtype=DT) * 2
    scale = torch.tensor([1.0, 10.0, 100.0, 1.0, 10.0, 100.0], dtype=DT)

    def fun(x, idx):
        z = x - shift[idx]
        return (1 - z[:, 0]) ** 2 + scale[idx] * (z[:, 1] - z[:, 0] ** 2) ** 2

    x0 = shift + torch.tensor([-1.2, 1.0], dtype=DT)
    res = minimize(fun, x0, gtol=1e-10, max_iter=1000)
    assert res.success.all()
    torch.testing.assert_close(res.x, shift + 1.0, rtol=0, atol=1e-6)
    assert (res.fun < 1e-12).all()
    assert len(set(res.nit.tolist())) > 1


def test_nan_start_fails_alone():
    A, a, c = _quadratics(S=5, P=3, seed=2)

    def fun(x, idx):
        d = x - a[idx]
        return 0.5 * (d.unsqueeze(-2) @ A[idx] @ d.unsqueeze(-1)).reshape(-1) + c[idx]

    x0 = torch.zeros_like(a)
    x0[2, 1] = float("nan")
    res = minimize(fun, x0, gtol=1e-9, max_iter=500)
    assert res.success.tolist() == [True, True, False, True, True]
    assert res.nit[2].item() == 0
    assert torch.isnan(res.x[2, 1])
    ok = torch.tensor([0, 1, 3, 4])
    torch.testing.assert_close(res.x[ok], a[ok], rtol=0, atol=1e-7)
    # the same problems alone give the same answer (the NaN one did not disturb them)
    alone = minimize(lambda x, idx: fun(x, ok[idx]), torch.zeros(4, 3, dtype=DT), gtol=1e-9, max_iter=500)
    torch.testing.assert_close(res.x[ok], alone.x, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.nit[ok], alone.nit)


def test_objective_that_becomes_nan_away_from_start():
    # problem 1 is NaN for x > 0.5 on its path; the line search must back off, not accept NaN
    target = torch.tensor([[2.0], [0.4], [-1.0]], dtype=DT)

    def fun(x, idx):
        f = (x[:, 0] - target[idx, 0]) ** 2
        return torch.where((idx == 1) & (x[:, 0] > 0.5), torch.full_like(f, float("nan")), f)

    res = minimize(fun, torch.zeros(3, 1, dtype=DT), gtol=1e-10)
    assert res.success.all()
    torch.testing.assert_close(res.x, target, rtol=0, atol=1e-8)
    assert torch.isfinite(res.fun).all()


def test_h0_preconditioning_gives_a_newton_step():
    A, a, c = _quadratics(S=6, P=4, seed=5)

    def fun(x, idx):
        d = x - a[idx]
        return 0.5 * (d.unsqueeze(-2) @ A[idx] @ d.unsqueeze(-1)).reshape(-1) + c[idx]

    x0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(9), dtype=DT)
    plain = minimize(fun, x0, gtol=1e-8, max_iter=500)
    pre = minimize(fun, x0, gtol=1e-8, max_iter=500, h0=torch.linalg.inv(A))
    assert plain.success.all() and pre.success.all()
    torch.testing.assert_close(pre.x, a, rtol=0, atol=1e-9)
    # with the exact inverse Hessian the first (unit) step lands on the optimum
    assert pre.nit.tolist() == [1] * 6
    assert (plain.nit > 1).all()
    assert pre.nfev < plain.nfev


def test_max_iter_limits_and_reports_failure():
    A, a, c = _quadratics(S=4, P=4, seed=1)

    def fun(x, idx):
        d = x - a[idx]
        return 0.5 * (d.unsqueeze(-2) @ A[idx] @ d.unsqueeze(-1)).reshape(-1) + c[idx]

    res = minimize(fun, torch.zeros(4, 4, dtype=DT), max_iter=2, gtol=1e-12, ftol=0.0)
    assert (res.nit <= 2).all()
    assert not res.success[-1]  # the ill-conditioned one cannot converge in 2 steps


def test_start_at_the_optimum_takes_no_step():
    def fun(x, idx):
        return ((x - 1.0) ** 2).sum(1)

    res = minimize(fun, torch.ones(3, 2, dtype=DT))
    assert res.success.all() and res.nit.tolist() == [0, 0, 0] and res.nfev == 1
