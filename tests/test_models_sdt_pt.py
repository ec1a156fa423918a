"""Signal detection (sdt) and cumulative prospect theory (pt) against plain per-subject references."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import assert_padding_ignored_and_hessian_exact
from torchem import EMModel, SubjectBatch
from torchem.models import MODELS
from torchem.models.pt import pt_design, pt_fit, pt_simulate
from torchem.models.sdt import sdt_fit, sdt_simulate

torch.set_num_threads(1)


def _phi(z):
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def ref_sdt(x, is_old, resp_old):
    """P(say old | old) = Phi(d'/2 - c), P(say old | new) = Phi(-d'/2 - c); d' = exp(x0), c = x1."""
    d, c = math.exp(x[0]), x[1]
    nll = 0.0
    for o, r in zip(np.ravel(is_old), np.ravel(resp_old)):
        p = _phi(d / 2 - c) if o == 1 else _phi(-d / 2 - c)
        nll -= math.log(p if r == 1 else 1 - p)
    return nll


def ref_pt(x, gamble, probs, certain, choice):
    """CPT (Tversky & Kahneman 1992): v(x) = x^a (gains), -lam (-x)^b (losses); w(p) = p^g/(p^g+(1-p)^g)^(1/g);
    same-sign outcomes: the more extreme gets w(p_e), the other w(p_e + p_n) - w(p_e); mixed: w(p_i) each;
    P(gamble) = 1 / (1 + exp(-mu (V_g - v(certain))))."""
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    a, b, g = sig(x[0]), sig(x[1]), sig(x[3])
    lam, mu = 20 * sig(x[2]), 20 * sig(x[4])

    def v(o):
        return o ** a if o > 0 else (-lam * (-o) ** b if o < 0 else 0.0)

    def w(p):
        if p <= 0:
            return 0.0
        if p >= 1:
            return 1.0
        return p ** g / (p ** g + (1 - p) ** g) ** (1 / g)

    nll = 0.0
    for (o1, o2), (p1, p2), c, y in zip(gamble, probs, certain, choice):
        if o1 * o2 < 0:
            vg = w(p1) * v(o1) + w(p2) * v(o2)
        elif abs(o1) >= abs(o2):
            vg = w(p1) * v(o1) + (w(p1 + p2) - w(p1)) * v(o2)
        else:
            vg = w(p2) * v(o2) + (w(p1 + p2) - w(p2)) * v(o1)
        z = mu * (vg - v(c)) * (1 if y == 1 else -1)  # -log sigmoid(z), stable in both tails
        nll += max(-z, 0.0) + math.log1p(math.exp(-abs(z)))
    return nll


def _pt_data(seed):
    rng = np.random.default_rng(seed)
    design = pt_design(4, 40, rng)
    data = []
    for i, T in enumerate((40, 13, 31, 22)):
        g, p, c = design["gamble"][i, :T], design["probs"][i, :T], design["certain"][i, :T]
        if i == 1:  # same-sign gambles with both outcomes non-zero and the other one larger, exact zeros
            g = g.copy()
            g[:4] = [[10.0, 30.0], [-5.0, -20.0], [0.0, 12.0], [7.0, 7.0]]
        data.append([g, p, c, rng.integers(0, 2, T)])
    return data


@pytest.mark.parametrize("seed", [0, 1])
def test_pt_matches_reference(seed):
    data = _pt_data(seed)
    batch = SubjectBatch.from_lists(data, names=pt_fit.inputs)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 4] -= 3.0  # mu around 1
    np.testing.assert_allclose(pt_fit(x, *batch.data, mask=batch.mask).numpy(),
                               [ref_pt(x[i].tolist(), *d) for i, d in enumerate(data)], rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1])
def test_sdt_matches_reference(seed):
    rng = np.random.default_rng(seed)
    data = [[rng.integers(0, 2, T), rng.integers(0, 2, T)] for T in (50, 9, 33)]
    batch = SubjectBatch.from_lists(data, names=sdt_fit.inputs)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    np.testing.assert_allclose(sdt_fit(x, *batch.data, mask=batch.mask).numpy(),
                               [ref_sdt(x[i].tolist(), *d) for i, d in enumerate(data)], rtol=1e-10, atol=1e-8)
    # blocks: (B, T) data give the same as the flattened session
    blocks = [[d[0][:8].reshape(2, 4), d[1][:8].reshape(2, 4)] for d in data]
    b2 = SubjectBatch.from_lists(blocks, names=sdt_fit.inputs)
    np.testing.assert_allclose(sdt_fit(x, *b2.data, mask=b2.mask).numpy(),
                               [ref_sdt(x[i].tolist(), d[0][:8], d[1][:8]) for i, d in enumerate(data)], rtol=1e-10)


@pytest.mark.parametrize("fit,data", [(pt_fit, _pt_data(3)), (sdt_fit, None)], ids=["pt", "sdt"])
def test_padding_ignored_and_hessian_exact(fit, data):
    if data is None:
        rng = np.random.default_rng(4)
        data = [[rng.integers(0, 2, T), rng.integers(0, 2, T)] for T in (30, 11, 20)]
    batch = SubjectBatch.from_lists(data, names=fit.inputs)
    S, P = len(data), len(fit.param_names)
    x = 0.5 * torch.randn(S, P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    if fit is pt_fit:
        x[:, 4] -= 3.0
    assert_padding_ignored_and_hessian_exact(fit, batch, x)


def test_simulators_match_likelihoods_and_check_data():
    p = np.array([[0.8, 0.9, 2.0, 0.7, 0.4], [0.6, 0.7, 1.2, 0.9, 1.0]])
    sim = pt_simulate(p, ntrials=100, seed=0)
    assert sim["gamble"].shape == (2, 100, 2) and set(np.unique(sim["choice"])) <= {0, 1}
    kinds = np.sign(sim["gamble"]).astype(int)
    assert ((kinds[..., 0] > 0) & (kinds[..., 1] < 0)).mean() == pytest.approx(0.6, abs=0.01)  # 3 in 5 mixed
    logit = lambda q: np.log(q / (1 - q))  # noqa: E731
    x = torch.as_tensor(np.column_stack([logit(p[:, 0]), logit(p[:, 1]), logit(p[:, 2] / 20), logit(p[:, 3]),
                                         logit(p[:, 4] / 20)]))
    out = pt_fit(x, *[torch.as_tensor(sim[k]) for k in pt_fit.inputs], output="all")
    np.testing.assert_allclose(out["p_gamble"].numpy(), sim["p_gamble"], rtol=1e-12)
    np.testing.assert_allclose(out["params"].numpy(), p, rtol=1e-12)
    ss = sdt_simulate(np.array([[1.5, 0.3]] * 400), ntrials=100, seed=1)
    assert ss["is_old"].sum(1).tolist() == [50] * 400
    hits = ss["resp_old"][ss["is_old"] == 1].mean()
    assert hits == pytest.approx(0.5 * math.erfc(-(0.75 - 0.3) / math.sqrt(2)), abs=0.01)
    bad = [[sim[k][i] for k in pt_fit.inputs] for i in range(2)]
    bad[1][1] = bad[1][1].copy()
    bad[1][1][3] = [0.7, 0.7]
    with pytest.raises(ValueError, match="subject 1.*probs"):
        EMModel(bad, pt_fit)
    with pytest.raises(ValueError, match="subject 0.*resp_old"):
        EMModel([[np.array([0, 1]), np.array([0, 2])]], sdt_fit)
    assert MODELS["pt"] is pt_fit and MODELS["sdt"] is sdt_fit


def test_pt_dataframe_with_column_groups():
    sim = pt_simulate(np.array([[0.8, 0.9, 2.0, 0.7, 0.4]] * 4), ntrials=30, seed=2)
    S, T = sim["certain"].shape
    s, t = np.meshgrid(np.arange(S), np.arange(T), indexing="ij")
    df = pd.DataFrame({"subject": s.ravel(), "trial": t.ravel(), "o1": sim["gamble"][..., 0].ravel(),
                       "o2": sim["gamble"][..., 1].ravel(), "p1": sim["probs"][..., 0].ravel(),
                       "p2": sim["probs"][..., 1].ravel(), "certain": sim["certain"].ravel(),
                       "choice": sim["choice"].ravel()})
    model = EMModel(df.sample(frac=1, random_state=1), pt_fit, columns=[["o1", "o2"], ["p1", "p2"], "certain",
                                                                          "choice"], trial="trial", device="cpu")
    ref = SubjectBatch.from_lists([[sim[k][i] for k in pt_fit.inputs] for i in range(S)])
    x = torch.randn(S, 5, dtype=torch.float64) - torch.tensor([0, 0, 0, 0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(pt_fit(x, *model.batch.data, mask=model.batch.mask), pt_fit(x, *ref.data))


def _draw(name, n, seed):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from recovery_table import draw_params
    return draw_params(name, n, np.random.default_rng(seed))


def test_sdt_recovery_200_subjects():
    # benchmarks/recovery_table.py: dprime 0.93, criterion 0.97 (log d' ~ N(log 1.5, 0.4), c ~ N(0, 0.5))
    true = _draw("sdt", 200, 0)
    sim = sdt_simulate(true, ntrials=200, seed=1)
    res = EMModel([[sim["is_old"][i], sim["resp_old"][i]] for i in range(200)], sdt_fit, device="cpu").fit(verbose=0)
    est = res.natural_params().numpy()
    r = [np.corrcoef(true[:, j], est[:, j])[0, 1] for j in range(2)]
    assert r[0] >= 0.88 and r[1] >= 0.93, r


@pytest.mark.slow
def test_pt_recovery_200_subjects_150_gambles():
    # benchmarks/recovery_table.py (converged, 35 EM iterations): alpha 0.66, beta 0.69, lambda 0.69,
    # gamma 0.69, mu 0.81 (another seed: 131 iterations, 0.60, 0.72, 0.68, 0.77, 0.87).  Curvature, loss aversion and temperature trade off against each other in
    # 150 choices; here EM stops at 40 iterations.
    true = _draw("pt", 200, 2)
    model = EMModel([[np.zeros((1, 2)), np.full((1, 2), 0.5), np.zeros(1), np.zeros(1, np.int64)]], pt_fit,
                    device="cpu")
    rec = model.recover(true, ntrials=150, seed=3, fit_kwargs={"mstep_maxit": 40})
    r = dict(zip(rec["param_names"], rec["correlation"]))
    for name, thr in {"alpha": 0.45, "beta": 0.55, "lambda": 0.5, "gamma": 0.6, "mu": 0.75}.items():
        assert r[name] >= thr, (name, r)
