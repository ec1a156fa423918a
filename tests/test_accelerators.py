"""The accelerators reach plain EM's fixed point, and "converged" means "at the fixed point" (real data)."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from torchem import EMModel
from torchem.models import MODELS

DATA = Path(__file__).parent / "data" / "prl_exampleData.txt"
# plain EM on this file run to a group tolerance of 1e-8 (501 E-steps, benchmarks/bench_convergence.py)
FIXED_POINT = {"NPL": 1117.4619278804985, "mu": [-2.7862702717326955, 0.2803601758034839],
               "var": [0.024219942739392764, 0.07104117883194863]}


@pytest.fixture(scope="module")
def prl_model() -> EMModel:
    df = pd.read_csv(DATA, sep="\t")
    return EMModel(df, MODELS["rw1a1b"], subject="subjID", columns=["choice", "outcome"], first_option=1,
                   trial="trial", device="cpu")


def _rel(res) -> float:
    h = np.r_[res.posterior_mu.numpy(), np.sqrt(res.posterior_var.numpy())]
    ref = np.r_[FIXED_POINT["mu"], np.sqrt(FIXED_POINT["var"])]
    return float(np.max(np.abs(h - ref) / (1 + np.abs(ref))))


@pytest.mark.parametrize("accelerate", ["squarem", "quasi_newton"])
def test_real_bandit_reaches_the_plain_em_fixed_point_not_the_variance_floor(prl_model, accelerate):
    """Regression: the variance probe put beta's group variance at its floor because the Laplace evidence there
    was higher than at the step before; EM's fixed point is inside (variance 0.024, NPL 1117.46), and the old
    default ended at another point (variance 1e-8, NPL 978)."""
    res = prl_model.fit(verbose=0, accelerate=accelerate)
    assert res.convergence
    assert float(res.posterior_var[0]) > 0.02
    assert _rel(res) < 2e-3
    assert float(res.NPL.sum()) == pytest.approx(FIXED_POINT["NPL"], abs=0.1)
    gap = res.fixed_point_gap
    assert gap["lme"] < 1e-3 and gap["hyper"] < 1e-3
    assert res.n_iter <= 60


def test_a_capped_fit_says_how_far_it_is_from_the_fixed_point(prl_model):
    res = prl_model.fit(verbose=0, accelerate=None, mstep_maxit=8)
    assert not res.convergence
    assert "estimated gap to the fixed point" in res.stop_reason
    gap = res.fixed_point_gap
    assert gap is not None and gap["hyper"] > 1e-3  # plain EM crawls here: far from the fixed point
    # the estimate is of the right size: the true remaining distance is within a factor 10 of it
    assert _rel(res) < 10 * gap["hyper"] and _rel(res) > gap["hyper"] / 10
    assert res.summary()["fixed_point_gap"] == gap


def test_quasi_newton_checkpoint_resumes_bit_identically(prl_model, tmp_path):
    path = tmp_path / "c.pt"
    whole = prl_model.fit(verbose=0, accelerate="quasi_newton", mstep_maxit=12, seed=3, checkpoint=str(path),
                          checkpoint_every=4)
    resumed = prl_model.fit(verbose=0, accelerate="quasi_newton", mstep_maxit=12, seed=3, resume=str(path))
    torch.testing.assert_close(resumed.m, whole.m, rtol=0, atol=0)
    torch.testing.assert_close(resumed.posterior_var, whole.posterior_var, rtol=0, atol=0)
    assert list(resumed.history["step"]) == list(whole.history["step"])
