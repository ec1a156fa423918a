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


@pytest.mark.parametrize("family", ["laplace", "student_t", "cauchy"])
def test_local_prior_derivatives_and_expectations_are_exact(family):
    """The variational E-step's prior: closed-form gradient and Hessian equal autograd's, and the
    expected negative log density under N(m, v) equals numerical integration."""
    from torchem.groups import make_group

    torch.manual_seed(0)
    group = make_group(family, 3, dtype=torch.float64, device="cpu").from_vector(
        torch.tensor([0.3, -0.2, 0.1, -0.5, 0.2, 0.0], dtype=torch.float64))
    m = torch.randn(5, 3, dtype=torch.float64)
    v = torch.rand(5, 3, dtype=torch.float64) + 0.05
    local = group.local(m, v)
    assert local is not group
    idx = torch.tensor([4, 0, 2])
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    f = local.neg_log_prior(x, idx)
    g = torch.autograd.grad(f.sum(), x, create_graph=True)[0]
    torch.testing.assert_close(g, local.grad(x, idx), rtol=1e-10, atol=1e-12)
    h = torch.stack([torch.autograd.grad(g[:, j].sum(), x, retain_graph=True)[0] for j in range(3)], -1)
    torch.testing.assert_close(torch.diag_embed(h.diagonal(dim1=-2, dim2=-1)), local.hessian(x, idx),
                               rtol=1e-10, atol=1e-12)
    # E_{N(m, v)}[-log group(theta)] by a fine grid, per parameter
    grid = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    sd = v.sqrt()
    pts = m[..., None] + sd[..., None] * grid  # (5, 3, G)
    dens = torch.exp(-0.5 * grid ** 2) / math.sqrt(2 * math.pi)
    # the density is separable: integrate each parameter's term on the grid (the exact Laplace density: the
    # fitted one rounds its kink within 1e-3 b)
    exact = LaplaceGroup(group.loc, group.scale, smooth=1e-12) if family == "laplace" else group
    terms = []
    for p in range(3):
        full = m[:, None, :].expand(5, grid.numel(), 3).clone()
        full[:, :, p] = pts[:, p, :]
        nlp = exact.neg_log_prior(full.reshape(-1, 3)).reshape(5, -1) - exact.neg_log_prior(m).unsqueeze(1)
        terms.append(torch.trapezoid(nlp * dens, grid, dim=1))
    want = exact.neg_log_prior(m) + sum(terms)
    torch.testing.assert_close(group.expected_neg_log_prior(m, v), want, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("family", ["laplace", "student_t", "cauchy"])
def test_an_uninformed_subjects_local_posterior_is_a_fixed_point_of_the_mstep(family):
    """A subject with a flat likelihood: its variational posterior leaves the M-step's scale unchanged."""
    from torchem.groups import make_group

    group = make_group(family, 2, dtype=torch.float64, device="cpu").from_vector(
        torch.tensor([0.2, -0.1, -0.3, 0.4], dtype=torch.float64))
    m = group.loc.expand(40, 2).clone()
    v = None
    for _ in range(200):  # E-steps of flat subjects: V = the inverse Hessian of the local prior at its mode
        local = group.local(m if v is not None else None, v)
        v = 1.0 / local.hessian(m).diagonal(dim1=-2, dim2=-1)
    new, _ = group.mstep(m, torch.diag_embed(v))
    torch.testing.assert_close(new.scale, group.scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(new.loc, group.loc, rtol=0, atol=1e-9)
