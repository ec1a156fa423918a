"""The Laplace posterior-width cap and its effect on EM stability."""
from __future__ import annotations

import numpy as np
import torch

from torchem.curvature import cap_posterior_width

DT = torch.float64


def test_cap_leaves_well_curved_hessians_alone_and_caps_flat_ones():
    prior = torch.tensor([[0.7, 0.1], [0.1, 0.5]], dtype=DT)
    prec = torch.linalg.inv(prior)
    good = prec + torch.tensor([[3.0, 0.5], [0.5, 2.0]], dtype=DT)  # likelihood adds curvature
    # likelihood curvature of -0.95 x prior precision along one direction: posterior 20x wider than prior
    v = torch.tensor([1.0, 0.0], dtype=DT)
    flat = prec - 0.95 * (prec @ torch.outer(v, v) @ prec) / (v @ prec @ v)
    H = torch.stack([good, flat])
    assert torch.linalg.eigvalsh(flat).min() > 0  # positive definite, just nearly singular
    out, capped = cap_posterior_width(H, prior, factor=4.0)
    assert capped.tolist() == [False, True]
    assert torch.equal(out[0], good)
    V = torch.linalg.inv(out[1])
    # V <= 4 * prior in the Loewner order, with equality along the capped direction
    gap = torch.linalg.eigvalsh(4.0 * prior - V)
    assert gap.min() > -1e-10 and gap.min() < 1e-8
    # the exact inverse was far wider than allowed
    assert torch.linalg.eigvalsh(4.0 * prior - torch.linalg.inv(flat)).min() < -1.0


def test_cap_ignores_non_pd_and_non_finite_hessians():
    prior = torch.eye(2, dtype=DT)
    H = torch.stack([torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=DT),
                     torch.tensor([[float("nan"), 0.0], [0.0, 1.0]], dtype=DT)])
    out, capped = cap_posterior_width(H, prior)
    assert not capped.any()
    assert torch.equal(out[0], H[0]) and torch.isnan(out[1, 0, 0])


def test_cap_is_off_with_infinite_factor():
    prior = torch.eye(2, dtype=DT)
    H = torch.diag(torch.tensor([0.01, 1.0], dtype=DT)).unsqueeze(0)
    out, capped = cap_posterior_width(H, prior, factor=float("inf"))
    assert not capped.any() and torch.equal(out, H)
    out, capped = cap_posterior_width(H, prior, factor=4.0)
    assert capped.all()
    np.testing.assert_allclose(out[0].diagonal().numpy(), [0.25, 1.0])
