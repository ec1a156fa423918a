"""Discounting models (social, temporal, probability, effort, prosocial effort) against plain references."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import assert_padding_ignored_and_hessian_exact
from torchem import EMModel, ModelComparison, SubjectBatch
from torchem.models import MODELS
from torchem.models import discounting as D

torch.set_num_threads(1)

SOCIAL = ["sd_hyp_wk", "sd_hyp_k", "sd_par_k", "sd_lin_k"]
NAMES = SOCIAL + ["td_hyp_k", "prd_hyp_k", "ed_par_k", "ped_par_k", "ped_par_2k"]


def _k(x):
    return 20.0 / (1.0 + math.exp(-x))  # norm2beta


def ref_value_difference(name, ks, row):
    """V_discounted - V_baseline of one trial (``row``: the model's data fields after ``choices``)."""
    if name in SOCIAL:
        s0, o0, s1, o1, n = row
        if name == "sd_hyp_wk":
            w, k = ks
            u = lambda r: w * r / (1 + k * n)  # noqa: E731
        elif name == "sd_hyp_k":
            u = lambda r: r / (1 + ks[0] * n)  # noqa: E731
        elif name == "sd_par_k":
            u = lambda r: r - ks[0] * n ** 2 if r > 0 else 0.0  # noqa: E731
        else:
            u = lambda r: r - ks[0] * n if r > 0 else 0.0  # noqa: E731
        return (s1 + u(o1)) - (s0 + u(o0))
    base, disc, var = row[:3]
    if name == "td_hyp_k":
        return disc / (1 + ks[0] * var) - base
    if name == "prd_hyp_k":
        return disc / (1 + ks[0] * (1 - var) / var) - base
    k = ks[0] if name != "ped_par_2k" else (ks[1] if row[3] == 1 else ks[0])
    return disc - k * var ** 2 - base


def ref_nll(name, x, choices, fields):
    """One subject: sum over trials of -log sigmoid(+-(V_disc - V_base)), choices 1 = discounted option."""
    ks = [_k(v) for v in x]
    nll = 0.0
    for t, c in enumerate(np.ravel(choices)):
        dv = ref_value_difference(name, ks, [np.ravel(f)[t] for f in fields])
        z = dv if c == 1 else -dv
        nll += max(-z, 0.0) + math.log1p(math.exp(-abs(z)))
    return nll


def _ragged(name, seed):
    """Four subjects from the default design, keeping 7, 3, 5 and 2 blocks and dropping trials of the last."""
    fit = MODELS[name]
    rng = np.random.default_rng(seed)
    p = np.exp(rng.normal(-2.5, 1.0, (4, len(fit.param_names))))
    sim = fit.simulate(p, seed=seed)
    data = []
    for i, nb in enumerate((7, 3, 5, 2)):
        fields = [np.asarray(sim[k][i][:nb], dtype=float) for k in fit.inputs]
        fields[0] = rng.integers(0, 2, fields[0].shape)  # random choices: every trial counts
        data.append(fields)
    return data


@pytest.mark.parametrize("name", NAMES)
def test_matches_reference(name):
    fit = MODELS[name]
    data = _ragged(name, 0)
    batch = SubjectBatch.from_lists(data, names=fit.inputs)
    x = torch.randn(4, len(fit.param_names), generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 3
    nll = fit(x, *batch.data, mask=batch.mask)
    ref = [ref_nll(name, x[i].tolist(), d[0], d[1:]) for i, d in enumerate(data)]
    np.testing.assert_allclose(nll.numpy(), ref, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_padding_ignored_and_hessian_exact(name):
    fit = MODELS[name]
    data = _ragged(name, 2)
    data[3] = [f[:, :5] for f in data[3]]  # a subject with short blocks too
    batch = SubjectBatch.from_lists(data, names=fit.inputs)
    x = 0.5 * torch.randn(4, len(fit.param_names), generator=torch.Generator().manual_seed(3),
                          dtype=torch.float64) - 3
    assert_padding_ignored_and_hessian_exact(fit, batch, x)


def test_simulators_designs_and_check_data():
    sim = D.sd_hyp_wk_fit.simulate(np.array([[1.0, 0.05]] * 3), seed=0)
    assert sim["choices"].shape == (3, 7, 9) and sim["distance"][0, :, 0].tolist() == list(D.SOCIAL_DISTS)
    assert sim["self_selfish"][0, 0].tolist() == list(range(155, 74, -10))
    # the switch point moves down the ladder as distance grows: fewer prosocial choices at N = 100
    many = D.sd_hyp_k_fit.simulate(np.full((300, 1), 0.05), seed=1)
    assert many["choices"][:, 0].mean() > many["choices"][:, -1].mean() + 0.2
    ped = D.ped_par_2k_fit.simulate(np.array([[1.0, 4.0]] * 200), seed=2)
    assert ped["beneficiary"][0, :, 0].tolist() == [0.0] * 7 + [1.0] * 7
    assert ped["choices"][:, :7].mean() > ped["choices"][:, 7:].mean() + 0.1  # costlier effort for the other
    td = D.td_hyp_k_fit.simulate(np.array([[0.1]]), delays=[3.0, 30.0], payouts=D.LADDER[:4], seed=3)
    assert td["choices"].shape == (1, 2, 4) and td["delay"][0, :, 0].tolist() == [3.0, 30.0]
    with pytest.raises(ValueError, match="payouts"):
        D.td_hyp_k_fit.simulate(np.array([[0.1]]), payouts=np.ones((9, 3, 2)), seed=0)
    with pytest.raises(ValueError, match=r"\(subjects, 2\)"):
        D.sd_hyp_wk_fit.simulate(np.ones((2, 1)))
    data = _ragged("prd_hyp_k", 0)
    data[2][3] = data[2][3].copy()
    data[2][3][0, 0] = 1.5
    with pytest.raises(ValueError, match="subject 2.*prob"):
        EMModel(data, D.prd_hyp_k_fit)
    data = _ragged("sd_lin_k", 0)
    data[1][0] = data[1][0] + 1
    with pytest.raises(ValueError, match="subject 0.*choices|subject 1.*choices"):
        EMModel(data, D.sd_lin_k_fit)


def test_dataframe_path():
    fit = D.ped_par_2k_fit
    sim = fit.simulate(np.array([[1.0, 3.0]] * 4), seed=4)
    S, B, T = sim["choices"].shape
    s, b, t = np.meshgrid(np.arange(S), np.arange(B), np.arange(T), indexing="ij")
    cols = ["choice", "reward_low", "reward_high", "effort", "beneficiary"]
    df = pd.DataFrame({"subject": s.ravel(), "block": b.ravel(), "trial": t.ravel(),
                       **{c: sim[k].ravel() for c, k in zip(cols, fit.inputs)}})
    model = EMModel(df.sample(frac=1, random_state=0), fit, columns=cols, block="block", trial="trial", device="cpu")
    ref = SubjectBatch.from_lists([[sim[k][i] for k in fit.inputs] for i in range(S)])
    x = torch.randn(S, 2, dtype=torch.float64) - 2
    torch.testing.assert_close(fit(x, *model.batch.data, mask=model.batch.mask), fit(x, *ref.data))


def _draw(name, n, seed):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from recovery_table import draw_params
    return draw_params(name, n, np.random.default_rng(seed))


# benchmarks/recovery_table.py (200 subjects, default designs): w_other 0.95 and k 0.97 (sd_hyp_wk), every
# single-k model 0.99-1.00, ped_par_2k 1.00 / 1.00.  The design is nearly deterministic (no temperature), so
# the switch point on the ladder pins k down; thresholds sit below the measured values.
@pytest.mark.parametrize("name,thresholds", [
    ("sd_hyp_wk", {"w_other": 0.8, "k": 0.8}), ("sd_hyp_k", {"k": 0.95}), ("sd_par_k", {"k": 0.95}),
    ("sd_lin_k", {"k": 0.95}), ("td_hyp_k", {"k": 0.95}), ("prd_hyp_k", {"k": 0.95}), ("ed_par_k", {"k": 0.95}),
    ("ped_par_k", {"k": 0.95}), ("ped_par_2k", {"k_self": 0.95, "k_other": 0.95})])
def test_recovery_200_subjects(name, thresholds):
    fit = MODELS[name]
    true = _draw(name, 200, 5)
    sim0 = fit.simulate(true[:1], seed=0)
    model = EMModel([[sim0[k][0] for k in fit.inputs]], fit, device="cpu")
    rec = model.recover(true, seed=6)
    r = dict(zip(rec["param_names"], rec["correlation"]))
    for p, thr in thresholds.items():
        assert r[p] >= thr, (p, r)


@pytest.mark.slow
def test_identify_separates_the_four_social_discounting_models():
    sim0 = D.sd_hyp_k_fit.simulate(np.array([[0.05]]), seed=0)
    template = [[sim0[k][0] for k in D.sd_hyp_k_fit.inputs]]
    models = [EMModel(template, MODELS[n], device="cpu") for n in SOCIAL]
    samplers = {n: (lambda rng, size, n=n: _draw(n, size, int(rng.integers(2**31)))) for n in SOCIAL}
    df = ModelComparison(models, SOCIAL).identify(nrounds=2, nsubjects=40, verbose=0, param_samplers=samplers,
                                                  bicint_kwargs={"nsamples": 200})
    table = df.pivot(index="Simulated", columns="Estimated", values="bestlme").loc[SOCIAL, SOCIAL]
    for n in SOCIAL:
        assert table.loc[n, n] == table.loc[n].max() and table.loc[n, n] >= 1, table
