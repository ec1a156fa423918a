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
    # each accelerator takes its own steps here (SQUAREM's step bound must grow past 1 to extrapolate at all)
    assert (res.history["step"] == {"squarem": "extrapolated", "quasi_newton": "quasi-newton"}[accelerate]).sum() >= 5


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


FAMILIES = {"gaussian": {}, "full": {"group": "full"}, "covariates": {"formula": "~ x"},
            "laplace": {"group": "laplace"}, "student_t": {"group": "student_t"}, "cauchy": {"group": "cauchy"}}


_PLAIN: dict = {}


def _family_options(model: EMModel, family: str) -> dict:
    opts = dict(FAMILIES[family])
    if "formula" in opts:  # a covariate unrelated to the parameters
        opts["covariates"] = np.random.default_rng(0).normal(size=model.batch.n_subjects)
    return opts


def _plain_fixed_point(model: EMModel, family: str):
    """Plain EM run to a group tolerance of 1e-8 (once per family)."""
    if family not in _PLAIN:
        _PLAIN[family] = model.fit(verbose=0, accelerate=None, convergence="group", group_tol=1e-8,
                                   group_window=5, mstep_maxit=3000, **_family_options(model, family))
    return _PLAIN[family]


@pytest.fixture(scope="module")
def reference_twin(reference_model) -> EMModel:
    """An unfitted twin of the session's reference model (its fits leave the shared one's result alone)."""
    return reference_model.with_data(reference_model.batch)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("accelerate", ["auto", "squarem", "quasi_newton"])
def test_every_family_reaches_the_plain_em_fixed_point(reference_twin, family, accelerate):
    """Simulated data (the reference set) under every group family: the stated tolerances hold against a
    plain-EM run to 1e-8, and the reported gap is what is left."""
    plain = _plain_fixed_point(reference_twin, family)
    res = reference_twin.fit(verbose=0, accelerate=accelerate, **_family_options(reference_twin, family))
    assert plain.convergence and res.convergence
    h = lambda r: np.r_[r.posterior_mu.numpy(), np.sqrt(r.posterior_var.numpy())]  # noqa: E731
    rel = np.max(np.abs(h(res) - h(plain)) / (1 + np.abs(h(plain))))
    assert rel < 1e-3 and res.fixed_point_gap["hyper"] < 1e-3
    assert float(res.NPL.sum()) == pytest.approx(float(plain.NPL.sum()), abs=0.05)
    heavy = family in ("laplace", "student_t", "cauchy")
    if not (heavy and accelerate == "quasi_newton"):  # the secant steps lose to plain EM there: why "auto"
        assert res.n_iter <= plain.n_iter                # takes SQUAREM for the heavy-tailed groups


def test_quasi_newton_steps_are_not_judged_by_the_evidence(reference_twin):
    """Regression: quasi-Newton steps were rejected where they lowered the Laplace evidence, which EM itself
    lowers here (by 0.3 nats per E-step at first): 23 E-steps, 12 of them rejected; now 9, none rejected."""
    x = np.random.default_rng(0).normal(size=reference_twin.batch.n_subjects)
    res = reference_twin.fit(verbose=0, accelerate="quasi_newton", covariates=x, formula="~ x")
    assert res.convergence and res.n_iter <= 12
    assert (res.history["step"] == "rejected").sum() == 0


def test_quasi_newton_does_not_converge_to_a_fixed_point_that_em_leaves():
    """Regression (hBayesDM's 2AFC file, sdt): the residual also vanishes as dprime's group variance goes to 0,
    a fixed point EM moves away from (its variance grows back on plain steps); the secant steps went there
    (variance 1e-6, not converged in 800 E-steps).  EM's fixed point has the variance at 0.004."""
    df = pd.read_csv(Path(__file__).parent / "data" / "task2AFC_exampleData.txt", sep="\t")
    df["trial"] = df.groupby("subjID").cumcount() + 1
    model = EMModel(df, MODELS["sdt"], subject="subjID", columns=["stimulus", "response"], trial="trial",
                    device="cpu")
    res = model.fit(verbose=0, accelerate="quasi_newton")
    assert res.convergence and res.n_iter <= 60
    assert 3e-3 < float(res.posterior_var[0]) < 6e-3
