"""Pond/fish belief-updating model against a plain per-subject reference."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from torchem import EMModel, SubjectBatch
from torchem.curvature import batched_hessian
from torchem.models import MODELS
from torchem.models.bayes import bayes_fit, bayes_simulate

torch.set_num_threads(1)


def ref_bayes(x, choices, observations):
    """One subject: posterior over 3 ponds from a uniform prior per block, updated by each fish with
    P(colour | pond) = lambda1 if they match else (1 - lambda1) / 2; the report is drawn from the posterior."""
    lam = 1.0 / (1.0 + math.exp(-x))
    nll = 0.0
    for bc, bo in zip(choices, observations):
        post = [1 / 3, 1 / 3, 1 / 3]
        for c, f in zip(bc, bo):
            like = [lam if int(f) == k else (1 - lam) / 2 for k in range(3)]
            post = [p * l for p, l in zip(post, like)]
            tot = sum(post)
            post = [p / tot for p in post]
            nll -= math.log(post[int(c)])
    return nll


def _ragged(seed):
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, 3, (nb, nt)), rng.integers(0, 3, (nb, nt))]
            for nb, nt in ((3, 15), (1, 15), (4, 15), (2, 8))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(seed):
    data = _ragged(seed)
    batch = SubjectBatch.from_lists(data, names=bayes_fit.inputs)
    x = torch.randn(4, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    nll = bayes_fit(x, *batch.data, mask=batch.mask)
    ref = [ref_bayes(x[i, 0].item(), *d) for i, d in enumerate(data)]
    np.testing.assert_allclose(nll.numpy(), ref, rtol=1e-10, atol=1e-8)
    # flat (S, T) data: one block
    flat = [[d[0][0], d[1][0]] for d in data]
    b2 = SubjectBatch.from_lists(flat, names=bayes_fit.inputs)
    np.testing.assert_allclose(bayes_fit(x, *b2.data, mask=b2.mask).numpy(),
                               [ref_bayes(x[i, 0].item(), [d[0]], [d[1]]) for i, d in enumerate(flat)], rtol=1e-10)


def test_padding_hessian_and_simulator():
    batch = SubjectBatch.from_lists(_ragged(3), names=bayes_fit.inputs)
    x = torch.randn(4, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    clean = bayes_fit(x, *batch.data, mask=batch.mask)
    dirty = [d.clone() for d in batch.data]
    for d in dirty:
        d[~batch.mask] = 2
    torch.testing.assert_close(bayes_fit(x, *dirty, mask=batch.mask), clean, rtol=0, atol=1e-12)
    H = batched_hessian(lambda z: bayes_fit(z, *dirty, mask=batch.mask), x)
    assert torch.isfinite(H).all() and H.shape == (4, 1, 1)
    # simulator: trajectories match the likelihood
    lam = np.array([[0.2], [0.5], [0.8], [0.95]])
    sim = bayes_simulate(lam, nblocks=4, ntrials=12, seed=1)
    assert sim["choices"].shape == (4, 4, 12) and sim["posterior"].shape == (4, 4, 13, 3)
    xs = torch.from_numpy(np.log(lam / (1 - lam)))
    out = bayes_fit(xs, torch.as_tensor(sim["choices"]), torch.as_tensor(sim["observations"]), output="all")
    np.testing.assert_allclose(out["posterior"].numpy(), sim["posterior"], atol=1e-12)
    np.testing.assert_allclose(out["params"].numpy(), lam, rtol=1e-12)
    chosen = np.take_along_axis(sim["ch_prob"], sim["choices"][..., None], -1)[..., 0]
    np.testing.assert_allclose(out["nll"].numpy(), -np.log(chosen).sum((1, 2)), rtol=1e-10)
    # ponds are balanced and colours mostly match the pond
    assert (sim["observations"] == sim["ponds"]).mean() > 0.7
    with pytest.raises(ValueError, match=r"\(subjects, 1\)"):
        bayes_simulate(np.ones((3, 2)))


def test_check_data_registry_and_dataframe():
    data = _ragged(0)
    data[2][1] = data[2][1].copy()
    data[2][1][1, 1] = 3
    with pytest.raises(ValueError, match="subject 2.*observations"):
        EMModel(data, bayes_fit)
    assert MODELS["bayes"] is bayes_fit and bayes_fit.param_names == ["lambda1"]
    sim = bayes_simulate(np.full((6, 1), 0.7), seed=0)
    S, B, T = sim["choices"].shape
    s, b, t = np.meshgrid(np.arange(S), np.arange(B), np.arange(T), indexing="ij")
    df = pd.DataFrame({"subject": s.ravel(), "block": b.ravel(), "trial": t.ravel(),
                       "choice": sim["choices"].ravel(), "observation": sim["observations"].ravel()})
    model = EMModel(df.sample(frac=1, random_state=0), bayes_fit, columns=["choice", "observation"], block="block",
                    trial="trial", device="cpu")
    ref = SubjectBatch.from_lists([[sim["choices"][i], sim["observations"][i]] for i in range(S)])
    x = torch.randn(S, 1, dtype=torch.float64)
    torch.testing.assert_close(bayes_fit(x, *model.batch.data, mask=model.batch.mask), bayes_fit(x, *ref.data))


def test_parameter_recovery():
    # 200 subjects x 10 blocks x 15 fish (pyEM's design); lambda1 = norm2alpha(N(0.5, 1))
    rng = np.random.default_rng(3)
    lam = 1 / (1 + np.exp(-(0.5 + rng.standard_normal((200, 1)))))
    model = EMModel([[np.zeros((1, 2), np.int64), np.zeros((1, 2), np.int64)]], bayes_fit, device="cpu")
    rec = model.recover(lam, seed=4)
    assert rec["correlation"][0] >= 0.9, rec["correlation"]
