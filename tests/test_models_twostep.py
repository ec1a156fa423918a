"""Two-step task models (hybrid_mbmf, model_based, sarsa_lambda) against a plain per-subject reference."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import assert_hessian_matches_fd
from torchem import EMModel, ModelComparison, SubjectBatch
from torchem.curvature import batched_hessian
from torchem.models import MODELS
from torchem.models.twostep import (hybrid_mbmf_fit, hybrid_mbmf_simulate, model_based_fit, model_based_simulate,
                                    reward_walks, sarsa_lambda_fit, sarsa_lambda_simulate)

torch.set_num_threads(1)

FITS = {"hybrid_mbmf": hybrid_mbmf_fit, "model_based": model_based_fit, "sarsa_lambda": sarsa_lambda_fit}


# ------------------------------------------------------------------ reference
def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _log_softmax2(z, k):
    mx = max(z)
    return z[k] - (mx + math.log(math.exp(z[0] - mx) + math.exp(z[1] - mx)))


def ref_twostep(name, x, c1, s2, c2, r):
    """One subject's negative log-likelihood; ``x`` normalized; data: list of blocks of 1-D trials.

    Daw et al. (2011): values start at 0 each block; Q_MB(a) = 0.7 max Q2(a, .) + 0.3 max Q2(1-a, .);
    P(a1) ~ exp(beta1 (w Q_MB + (1-w) Q_MF)(a1) + rep [a1 == previous a1]);
    P(a2 | s) ~ exp(beta2 Q2(s, a2));
    Q_MF(a1) += alpha1 (Q2(s, a2) - Q_MF(a1)) + lambda alpha1 (r - Q2(s, a2)); Q2(s, a2) += alpha2 (r - Q2(s, a2)).
    """
    if name == "hybrid_mbmf":
        b1, b2, a1, a2, lam, w, rep = math.exp(x[0]), math.exp(x[1]), _sig(x[2]), _sig(x[3]), _sig(x[4]), \
            _sig(x[5]), x[6]
    elif name == "model_based":
        b1, b2, a2, rep = math.exp(x[0]), math.exp(x[1]), _sig(x[2]), x[3]
        a1, lam, w = 0.0, 0.0, 1.0
    else:
        b1, b2, a1, a2, lam, rep = math.exp(x[0]), math.exp(x[1]), _sig(x[2]), _sig(x[3]), _sig(x[4]), x[5]
        w = 0.0
    nll = 0.0
    for bc1, bs2, bc2, br in zip(c1, s2, c2, r):
        qmf = [0.0, 0.0]
        q2 = [[0.0, 0.0], [0.0, 0.0]]
        prev = None
        for a, s, b, rew in zip(bc1, bs2, bc2, br):
            a, s, b = int(a), int(s), int(b)
            v = [max(q2[0]), max(q2[1])]
            qmb = [0.7 * v[0] + 0.3 * v[1], 0.3 * v[0] + 0.7 * v[1]]
            z = [b1 * (w * qmb[k] + (1 - w) * qmf[k]) + (rep if prev == k else 0.0) for k in (0, 1)]
            nll -= _log_softmax2(z, a)
            nll -= _log_softmax2([b2 * q2[s][0], b2 * q2[s][1]], b)
            d1 = q2[s][b] - qmf[a]
            d2 = rew - q2[s][b]
            qmf[a] = qmf[a] + a1 * d1 + lam * a1 * d2
            q2[s][b] = q2[s][b] + a2 * d2
            prev = a
    return nll


def _ragged(seed, blocks):
    """Random two-step data of subjects with different lengths; ``blocks`` gives (nblocks, ntrials) per subject."""
    rng = np.random.default_rng(seed)
    data = []
    for nb, nt in blocks:
        shape = (nb, nt) if nb else (nt,)
        data.append([rng.integers(0, 2, shape), rng.integers(0, 2, shape), rng.integers(0, 2, shape),
                     rng.integers(0, 2, shape).astype(float) if seed % 2 else rng.normal(0.5, 1.0, shape)])
    return data


def _blocks(d):
    return [d] if d.ndim == 1 else list(d)


@pytest.mark.parametrize("name", list(FITS))
@pytest.mark.parametrize("seed,layout", [(0, "flat"), (1, "flat"), (2, "blocks"), (3, "blocks")])
def test_matches_reference(name, seed, layout):
    blocks = [(0, 40), (0, 17), (0, 33)] if layout == "flat" else [(2, 25), (1, 25), (3, 25), (2, 9)]
    data = _ragged(seed, blocks)
    fit = FITS[name]
    batch = SubjectBatch.from_lists(data, names=fit.inputs)
    P = len(fit.param_names)
    x = torch.randn(batch.n_subjects, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    nll = fit(x, *batch.data, mask=batch.mask)
    ref = [ref_twostep(name, x[i].tolist(), *[_blocks(np.asarray(d)) for d in subj]) for i, subj in enumerate(data)]
    np.testing.assert_allclose(nll.numpy(), ref, rtol=1e-10, atol=1e-8)


def test_nested_models_are_the_hybrid_at_omega_0_and_1():
    data = _ragged(5, [(0, 50), (0, 30)])
    batch = SubjectBatch.from_lists(data, names=hybrid_mbmf_fit.inputs)
    x = torch.randn(2, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    big = 40.0  # omega = sigmoid(+-40): 1 or 0 up to 4e-18
    mb = hybrid_mbmf_fit(torch.cat([x[:, :6].index_fill(1, torch.tensor([5]), big), x[:, 6:]], 1), *batch.data,
                         mask=batch.mask)
    torch.testing.assert_close(mb, model_based_fit(x[:, [0, 1, 3, 6]], *batch.data, mask=batch.mask))
    mf = hybrid_mbmf_fit(torch.cat([x[:, :6].index_fill(1, torch.tensor([5]), -big), x[:, 6:]], 1), *batch.data,
                         mask=batch.mask)
    torch.testing.assert_close(mf, sarsa_lambda_fit(x[:, [0, 1, 2, 3, 4, 6]], *batch.data, mask=batch.mask))


@pytest.mark.parametrize("name", list(FITS))
def test_padding_is_ignored_and_hessians_are_exact(name):
    fit = FITS[name]
    batch = SubjectBatch.from_lists(_ragged(7, [(2, 20), (1, 20), (2, 11)]), names=fit.inputs)
    P = len(fit.param_names)
    x = torch.randn(3, P, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.5
    clean = fit(x, *batch.data, mask=batch.mask)
    pad = ~batch.mask
    dirty = [d.clone() for d in batch.data]
    for d in dirty[:3]:
        d[pad] = 1
    dirty[3][pad] = float("nan")
    torch.testing.assert_close(fit(x, *dirty, mask=batch.mask), clean, rtol=0, atol=1e-12)
    H = batched_hessian(lambda z: fit(z, *dirty, mask=batch.mask), x)
    assert torch.isfinite(H).all()
    assert_hessian_matches_fd(fit, batch, x, H)


@pytest.mark.parametrize("name", list(FITS))
def test_simulator_matches_the_likelihood(name):
    fit = FITS[name]
    P = len(fit.param_names)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, P)) * 0.7
    nat = torch.stack([t(torch.from_numpy(x[:, j])) for j, t in enumerate(fit.param_xform)], -1).numpy()
    sim = fit.simulate(nat, ntrials=60, seed=4)
    again = fit.simulate(nat, ntrials=60, seed=4)
    assert all(np.array_equal(sim[k], again[k]) for k in sim)
    assert set(sim) >= {"params", *fit.inputs, "ch_prob1", "ch_prob2", "reward_probs"}
    assert sim["choices1"].shape == (6, 60)
    out = fit(torch.from_numpy(x), *[torch.as_tensor(sim[k]) for k in fit.inputs], output="all")
    np.testing.assert_allclose(out["params"].numpy(), nat, rtol=1e-12)
    np.testing.assert_allclose(out["ch_prob1"].numpy(), sim["ch_prob1"], atol=1e-10)
    np.testing.assert_allclose(out["ch_prob2"].numpy(), sim["ch_prob2"], atol=1e-10)
    for k in ("Q_MF", "Q_MB", "Q2", "PE1", "PE2"):
        assert out[k].shape[:2] == (6, 60)
    # common transitions about 70% of the time
    common = (sim["states2"] == sim["choices1"]).mean()
    assert 0.6 < common < 0.8


def test_reward_walks_stay_in_bounds_and_drift_slowly():
    p = reward_walks(50, 300, np.random.default_rng(0))
    assert p.shape == (50, 300, 2, 2)
    assert p.min() >= 0.25 and p.max() <= 0.75
    step = np.abs(np.diff(p, axis=1))
    assert step.max() < 0.15 and 0.015 < step.mean() < 0.025  # E|N(0, 0.025^2)| = 0.02


def test_check_data_and_registry():
    data = _ragged(0, [(0, 10), (0, 8)])
    data[1][1] = data[1][1].copy()
    data[1][1][3] = 2
    with pytest.raises(ValueError, match="subject 1.*states2"):
        EMModel(data, hybrid_mbmf_fit)
    for name, f in FITS.items():
        assert MODELS[name] is f
    assert hybrid_mbmf_fit.param_names == ["beta1", "beta2", "alpha1", "alpha2", "lambda", "omega", "rep"]
    assert model_based_fit.param_names == ["beta1", "beta2", "alpha2", "rep"]
    assert sarsa_lambda_fit.param_names == ["beta1", "beta2", "alpha1", "alpha2", "lambda", "rep"]
    assert hybrid_mbmf_fit.simulate is hybrid_mbmf_simulate
    assert model_based_fit.simulate is model_based_simulate and sarsa_lambda_fit.simulate is sarsa_lambda_simulate


def test_dataframe_path():
    nat = np.column_stack([np.full(8, 4.0), np.full(8, 3.0), np.full(8, 0.5), np.full(8, 0.5), np.full(8, 0.5),
                           np.linspace(0.1, 0.9, 8), np.full(8, 0.2)])
    sim = hybrid_mbmf_simulate(nat, ntrials=50, seed=0)
    rows = []
    for i in range(8):
        n = 50 - i  # ragged
        rows.append(pd.DataFrame({"subject": f"s{i}", "trial": np.arange(n), "choice1": sim["choices1"][i, :n],
                                  "state2": sim["states2"][i, :n], "choice2": sim["choices2"][i, :n],
                                  "reward": sim["rewards"][i, :n]}))
    df = pd.concat(rows).sample(frac=1.0, random_state=1)
    model = EMModel(df, hybrid_mbmf_fit, subject="subject", columns=["choice1", "state2", "choice2", "reward"],
                    trial="trial", device="cpu")
    x = torch.randn(8, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = [ref_twostep("hybrid_mbmf", x[i].tolist(), *[[sim[k][i, :50 - i]] for k in hybrid_mbmf_fit.inputs])
           for i in range(8)]
    np.testing.assert_allclose(hybrid_mbmf_fit(x, *model.batch.data, mask=model.batch.mask).numpy(), ref,
                               rtol=1e-10, atol=1e-8)
    res = model.fit(verbose=0, mstep_maxit=2)
    assert np.isfinite(res.NPL.numpy()).all()


# ------------------------------------------------------------------------ fitting studies
# About 90 s (recovery, 200 x 200, uncapped EM) and 60 s (identify, 2 rounds x 9 fits) on one core.
def _draw(name, n, rng):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from recovery_table import draw_params
    return draw_params(name, n, rng)


@pytest.mark.slow
def test_hybrid_recovery_200_subjects_200_trials():
    # measured (converged, 35 EM iterations): beta1 0.86, beta2 0.94, alpha1 0.70, alpha2 0.93, lambda 0.69,
    # omega 0.72, rep 0.85
    true = _draw("hybrid_mbmf", 200, np.random.default_rng(0))
    model = EMModel(_ragged(0, [(0, 4)]), hybrid_mbmf_fit, device="cpu")
    rec = model.recover(true, ntrials=200, seed=1)
    r = dict(zip(rec["param_names"], rec["correlation"]))
    for name in ("omega", "beta2", "alpha2"):
        assert r[name] >= 0.7, r
    for name in ("beta1", "rep"):
        assert r[name] >= 0.75, r
    for name in ("alpha1", "lambda"):
        assert r[name] >= 0.55, r


@pytest.mark.slow
def test_identify_separates_the_three_two_step_models():
    names = ["model_based", "sarsa_lambda", "hybrid_mbmf"]
    template = _ragged(0, [(0, 4)])
    models = [EMModel(template, FITS[n], device="cpu") for n in names]
    mc = ModelComparison(models, names)

    def sampler(name):
        def draw(rng, n):
            p = _draw(name, n, rng)
            if name == "hybrid_mbmf":  # a clear mixture: omega in (0.35, 0.65)
                p[:, 5] = rng.uniform(0.35, 0.65, n)
            return p
        return draw

    df = mc.identify(nrounds=2, nsubjects=40, sim_kwargs={"ntrials": 150}, fit_kwargs={"mstep_maxit": 4},
                     verbose=0, bicint_kwargs={"nsamples": 200}, param_samplers={n: sampler(n) for n in names})
    table = df.pivot(index="Simulated", columns="Estimated", values="bestlme").loc[names, names]
    for n in names:
        assert table.loc[n, n] == table.loc[n].max() and table.loc[n, n] >= 1, table


@pytest.mark.parametrize("name,thresholds", [
    # measured: beta1 0.93, beta2 0.93, alpha2 0.95, rep 0.87
    ("model_based", {"beta1": 0.8, "beta2": 0.8, "alpha2": 0.85, "rep": 0.75}),
    # measured: beta1 0.90, beta2 0.92, alpha1 0.89, alpha2 0.92, lambda 0.85, rep 0.82
    ("sarsa_lambda", {"beta1": 0.8, "beta2": 0.8, "alpha1": 0.75, "alpha2": 0.8, "lambda": 0.7, "rep": 0.7}),
])
@pytest.mark.slow
def test_nested_model_recovery_200_subjects_200_trials(name, thresholds):
    true = _draw(name, 200, np.random.default_rng(2))
    model = EMModel(_ragged(0, [(0, 4)]), FITS[name], device="cpu")
    rec = model.recover(true, ntrials=200, seed=3)
    r = dict(zip(rec["param_names"], rec["correlation"]))
    for p, thr in thresholds.items():
        assert r[p] >= thr, (p, r)
