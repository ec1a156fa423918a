"""Group families and priors: pyEM's M-step numbers, the interface every family implements, bad priors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from torchem.groups import (CauchyGroup, GaussianGroup, LaplaceGroup, StudentTGroup, group_from_state,
                            make_group)
from torchem.priors import (CauchyPrior, GaussianPrior, IndependentPrior, LaplacePrior, StudentTPrior,
                            UniformPrior)

DT = torch.float64
DATA = Path(__file__).parent / "data"
FAMILY_NAMES = ["gaussian", "full", "laplace", "student_t", "cauchy"]


def _reference():
    ref = json.loads((DATA / "pyem_group_mstep.json").read_text())
    V = torch.tensor(np.array(ref["inv_h"]), dtype=DT).permute(2, 0, 1)  # pyEM (P, P, S) -> (S, P, P)
    for case, c in ref["cases"].items():
        m = torch.tensor(np.array(c["m"]), dtype=DT).T  # pyEM (P, S) -> (S, P)
        for fam, out in c["families"].items():
            yield case, fam, m, V, out


@pytest.mark.parametrize("case,fam,m,V,out", list(_reference()), ids=lambda v: v if isinstance(v, str) else "")
def test_mstep_reproduces_pyem(case, fam, m, V, out):
    """pyEM 1.0.1's M-step on the reference MAPs (with and without 5 outliers): 1e-6 (gaussian, t), 1e-4 (laplace)."""
    tol = 1e-4 if fam == "laplace" else 1e-6
    new, info = make_group(fam, 2, dtype=DT, device="cpu").mstep(m, V)
    assert info.converged and out["warnings"] == []
    np.testing.assert_allclose(new.mean.numpy(), out["mean"], atol=tol, rtol=0)
    np.testing.assert_allclose(new.var.numpy(), out["variance"], atol=tol, rtol=tol)
    hyper = {k: v for k, v in out["hyper"].items() if k != "df"}
    ours = new.raw_hyper() if fam != "gaussian" else {"mu": new.mu, "sigma": new.var}
    for k, v in hyper.items():
        np.testing.assert_allclose(ours[k].numpy(), v, atol=tol, rtol=0)


def test_cauchy_variance_is_pyems_stand_in():
    g = CauchyGroup(torch.zeros(2, dtype=DT), torch.tensor([0.5, 2.0], dtype=DT))
    np.testing.assert_allclose(g.var.numpy(), 100 * np.array([0.25, 4.0]))
    np.testing.assert_allclose(g.spread.diagonal().numpy(), [0.25, 4.0])  # the cap uses scale^2


def _members():
    loc = torch.tensor([0.3, -0.7], dtype=DT)
    return {
        "gaussian": GaussianGroup(loc, torch.tensor([0.8, 1.7], dtype=DT)),
        "full": GaussianGroup(loc, torch.tensor([[0.8, 0.3], [0.3, 1.7]], dtype=DT), diagonal=False),
        "laplace": LaplaceGroup(loc, torch.tensor([0.6, 1.1], dtype=DT)),
        "student_t": StudentTGroup(loc, torch.tensor([0.6, 1.1], dtype=DT), df=5.0),
        "cauchy": CauchyGroup(loc, torch.tensor([0.6, 1.1], dtype=DT)),
        "uniform": UniformPrior([-1.0, -2.0], [2.0, 0.5]),
        "independent": IndependentPrior([GaussianPrior([0.3], [0.8]), LaplacePrior([-0.7], [1.1])]),
    }


@pytest.mark.parametrize("name", list(_members()))
def test_density_normalized_hessian_exact_and_draws_match(name):
    prior = _members()[name]
    # the density integrates to 1 (2-D grid in x = loc + tan(u), which covers heavy tails too)
    u = torch.linspace(-math.pi / 2, math.pi / 2, 1203, dtype=DT)[1:-1]
    U, W = torch.meshgrid(u, u, indexing="ij")
    pts = torch.stack([torch.tan(U).reshape(-1), torch.tan(W).reshape(-1)], 1) + prior.mean
    jac = (1 / torch.cos(U) ** 2) * (1 / torch.cos(W) ** 2)
    dens = torch.exp(-prior.neg_log_prior(pts)).reshape(U.shape) * jac
    total = torch.trapezoid(torch.trapezoid(dens, u, dim=1), u)
    assert float(total) == pytest.approx(1.0, abs={"uniform": 1e-2, "cauchy": 5e-3}.get(name, 2e-3))
    # Hessian and gradient against autograd, away from kinks
    x = torch.tensor([[0.9, -0.1], [-0.5, 0.2], [0.1, -1.5]], dtype=DT)
    H = torch.func.vmap(torch.func.hessian(lambda z: prior.neg_log_prior(z[None])[0]))(x)
    torch.testing.assert_close(prior.hessian(x), H, atol=1e-10, rtol=1e-10)
    xg = x.clone().requires_grad_(True)
    (g_auto,) = torch.autograd.grad(prior.neg_log_prior(xg).sum(), xg)
    torch.testing.assert_close(prior.grad(x), g_auto, atol=1e-10, rtol=1e-10)
    # draws follow the distribution: location (median) and spread
    gen = torch.Generator().manual_seed(1)
    draws = prior.sample(100_000, gen)
    assert draws.shape == (100_000, 2) and draws.dtype == DT
    np.testing.assert_allclose(draws.median(0).values.numpy(), prior.mean.numpy(), atol=0.02)
    if name not in ("cauchy",):
        np.testing.assert_allclose(draws.var(0).numpy(), prior.var.numpy(), rtol=0.03)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_state_roundtrip_vector_and_dtype(name):
    fam = make_group(name, 3, dtype=DT, device="cpu", var=0.7)
    np.testing.assert_allclose(fam.var.numpy(), 0.7 if name != "cauchy" else 70.0)
    again = group_from_state(fam.state_dict())
    assert type(again) is type(fam) and again.config() == fam.config()
    torch.testing.assert_close(again.to_vector(), fam.to_vector())
    back = fam.from_vector(fam.to_vector())
    torch.testing.assert_close(back.mean, fam.mean)
    torch.testing.assert_close(back.var, fam.var)
    f32 = make_group(name, 3, dtype=torch.float32, device="cpu")
    m = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    new, _ = f32.mstep(m, 0.1 * torch.eye(3).expand(50, 3, 3))
    assert new.mean.dtype == torch.float32 and new.var.dtype == torch.float32
    assert fam.n_hyper == {"gaussian": 6, "full": 9}.get(name, 6)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_integer_weights_equal_repeated_subjects(name):
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(30, 2, generator=gen, dtype=DT)
    V = torch.diag_embed(0.05 + torch.rand(30, 2, generator=gen, dtype=DT))
    w = torch.randint(1, 4, (30,), generator=gen).to(DT)
    fam = make_group(name, 2, dtype=DT, device="cpu")
    weighted, _ = fam.mstep(m, V, w)
    reps = w.long()
    repeated, _ = fam.mstep(m.repeat_interleave(reps, 0), V.repeat_interleave(reps, 0))
    if name in ("student_t", "cauchy"):  # starts differ (weighted vs plain median); same fixed point
        torch.testing.assert_close(weighted.mean, repeated.mean, atol=1e-6, rtol=0)
    else:
        torch.testing.assert_close(weighted.mean, repeated.mean, atol=1e-9, rtol=0)
        torch.testing.assert_close(weighted.var, repeated.var, atol=1e-9, rtol=0)


def test_student_t_reports_an_unconverged_mstep():
    m = torch.tensor([[0.0], [0.1], [50.0], [-40.0], [0.05]], dtype=DT)
    fam = StudentTGroup(torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT), df=1.0, max_iter=2)
    _, info = fam.mstep(m, torch.zeros(5, 1, 1, dtype=DT))
    assert not info.converged and "did not converge within 2 rounds for 1 of 1" in info.message


@pytest.mark.parametrize("make,msg", [
    (lambda: GaussianPrior([0, 0], [1.0, 0.0]), "sigma \\(variances\\) must be positive"),
    (lambda: GaussianPrior([0, 0], [1.0, 2.0, 3.0]), "3 values for 2 parameters"),
    (lambda: LaplacePrior([0], [-1.0]), "scale must be positive"),
    (lambda: StudentTPrior([0], [1.0], df=0), "df must be positive"),
    (lambda: CauchyPrior([0, 1], [1.0, 0.0]), "scale must be positive"),
    (lambda: UniformPrior([0.0, 1.0], [1.0, 1.0]), "hi > lo"),
    (lambda: GaussianPrior([0, float("nan")], [1.0, 1.0]), "must be finite"),
    (lambda: IndependentPrior([GaussianPrior([0, 0], [1, 1])]), "one-dimensional"),
])
def test_bad_priors_raise(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()
