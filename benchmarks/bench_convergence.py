"""E-steps, wall time and distance to plain EM's fixed point of each accelerator, on real and simulated crawl cases.

Real cases (hBayesDM's example data as shipped, ``shared/reference/hbayesdm/``,
or ``--data DIR``):

- ``prl_rw1a1b_pm1`` / ``prl_rw1a1b_01``: the reversal-learning file (20 subjects
  x 100 trials, choices 1/2) with rw1a1b, outcomes as shipped (+-1) and recoded 0/1;
- ``prl_rw2a1b``: the same file with rw2a1b;
- ``ts_hybrid_mbmf`` / ``ts_model_based``: the two-step file (``level2_choice``
  1-4 split into the second-stage state and choice);
- ``task2afc_sdt``: the 2AFC file with ``sdt``.

Every group family on the reference set (``reference_gaussian``, ``_full``,
``_covariate`` (an unrelated covariate), ``_laplace``, ``_student_t``, ``_cauchy``).

Simulated cases:

- ``bandit_pm1``: 20 subjects x 100 trials of a two-armed bandit, outcomes
  +-1, group SD 0.2 for alpha (normalized): a narrow learning-rate group;
- ``rw2a1b_on_rw1a1b``: rw2a1b fitted to 40 rw1a1b subjects (a group variance shrinks to 0);
- ``sd_hyp_wk_w1``: sd_hyp_wk on 40 subjects who all have w = 1.

For each case a long plain-EM run to a group tolerance of 1e-8 (5 steps in a
row, at most ``--reference-maxit`` E-steps) gives the fixed point; each
setting is then compared with it: summed NPL and the largest relative
difference of a group location or SD (``|x - x*| / (1 + |x*|)``).

Run: ``python benchmarks/bench_convergence.py [--threads 1] [--cases ...]``; prints
the table and writes ``benchmarks/results/bench_convergence.md`` after every case.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench_fit import to_markdown
from torchem import EMModel
from torchem.models import MODELS, discounting, rl
from torchem.transforms import norm2alpha, norm2beta


def bandit_pm1(seed: int = 3):
    rng = np.random.default_rng(seed)
    S, T = 20, 100
    params = np.column_stack([norm2beta(rng.normal(0.0, 0.6, S)), norm2alpha(rng.normal(-0.5, 0.2, S))])
    outcomes = np.where(rng.random((1, T, 2)) < np.array([0.7, 0.3]), 1.0, -1.0)
    sim = rl.rw1a1b_simulate(params, nblocks=1, ntrials=T, outcomes=outcomes, seed=seed)
    return [[c, r] for c, r in zip(sim["choices"], sim["rewards"])], rl.rw1a1b_fit


def rw2a1b_on_rw1a1b(seed: int = 4):
    rng = np.random.default_rng(seed)
    S = 40
    params = np.column_stack([norm2beta(rng.normal(0, 1, S)), norm2alpha(rng.normal(0, 1, S))])
    sim = rl.rw1a1b_simulate(params, nblocks=4, ntrials=24, seed=seed)
    return [[c, r] for c, r in zip(sim["choices"], sim["rewards"])], rl.rw2a1b_fit


def sd_hyp_wk_w1(seed: int = 5):
    rng = np.random.default_rng(seed)
    S = 40
    k = np.exp(rng.normal(-2.5, 0.8, S))
    params = np.column_stack([np.ones(S), k])
    fit = discounting.sd_hyp_wk_fit
    sim = fit.simulate(params, seed=seed)
    keys = list(fit.inputs)
    return [[sim[key][i] for key in keys] for i in range(S)], fit


HBAYESDM = Path(__file__).resolve().parents[2] / "shared" / "reference" / "hbayesdm"


def _table(name: str) -> pd.DataFrame:
    return pd.read_csv(HBAYESDM / name, sep="\t")


def _prl(model: str, recode: bool = False):
    df = _table("prl_exampleData.txt")
    if recode:
        df["outcome"] = (df["outcome"] > 0).astype(float)
    return df, MODELS[model], {"subject": "subjID", "columns": ["choice", "outcome"], "first_option": 1,
                               "trial": "trial"}


def _ts(model: str):
    df = _table("ts_exampleData.txt")
    df["choice1"] = df["level1_choice"] - 1
    df["state2"] = (df["level2_choice"] - 1) // 2
    df["choice2"] = (df["level2_choice"] - 1) % 2
    return df, MODELS[model], {"subject": "subjID", "columns": ["choice1", "state2", "choice2", "reward"],
                               "trial": "trial"}


def _sdt():
    df = _table("task2AFC_exampleData.txt")
    return df, MODELS["sdt"], {"subject": "subjID", "columns": ["stimulus", "response"], "row_order": True}


REAL = {"prl_rw1a1b_pm1": lambda: _prl("rw1a1b"), "prl_rw1a1b_01": lambda: _prl("rw1a1b", True),
        "prl_rw2a1b": lambda: _prl("rw2a1b"), "ts_hybrid_mbmf": lambda: _ts("hybrid_mbmf"),
        "ts_model_based": lambda: _ts("model_based"), "task2afc_sdt": _sdt}
SIMULATED = {"bandit_pm1": bandit_pm1, "rw2a1b_on_rw1a1b": rw2a1b_on_rw1a1b, "sd_hyp_wk_w1": sd_hyp_wk_w1}
CASES = {**SIMULATED, **REAL}
SETTINGS = {
    "plain EM, LME rule": {"accelerate": None},
    "SQUAREM": {"accelerate": "squarem"},
    "quasi-Newton": {"accelerate": "quasi_newton"},
}
#: the same settings on the reference set (100 x 96 trials) under every group family
FAMILIES = {"reference_gaussian": {}, "reference_full": {"group": "full"},
            "reference_covariate": {"formula": "~ x"}, "reference_laplace": {"group": "laplace"},
            "reference_student_t": {"group": "student_t"}, "reference_cauchy": {"group": "cauchy"}}
CASES.update(dict.fromkeys(FAMILIES))
REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "rw1a1b_100.csv"


def make_case(case: str) -> tuple[EMModel, dict]:
    """The ``EMModel`` of a case and its fit options (the group family of the reference-set cases)."""
    if case not in FAMILIES:
        return make_model(case), {}
    model = EMModel(pd.read_csv(REFERENCE), rl.rw1a1b_fit, columns=["choice", "reward"], block="block",
                    trial="trial", device="cpu")
    opts = dict(FAMILIES[case])
    if "formula" in opts:  # a covariate unrelated to the parameters: its coefficients' fixed point is near 0
        opts["covariates"] = np.random.default_rng(0).normal(size=model.batch.n_subjects)
    return model, opts


def make_model(case: str) -> EMModel:
    """The ``EMModel`` of a case (real: read from hBayesDM's file; simulated: generated)."""
    if case in SIMULATED:
        data, fit = SIMULATED[case]()
        return EMModel(data, fit, device="cpu")
    df, fit, kw = REAL[case]()
    if kw.pop("row_order", False):
        df = df.assign(trial=df.groupby("subjID").cumcount() + 1)
        kw["trial"] = "trial"
    return EMModel(df, fit, device="cpu", **kw)


def _hyper(res) -> np.ndarray:
    return np.r_[res.posterior_mu.numpy(), np.sqrt(res.posterior_var.numpy())]


def run(threads: int | None, cases: list[str], reference_maxit: int, out: Path | None = None) -> pd.DataFrame:
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for case in cases:
        model, extra = make_case(case)
        t0 = time.perf_counter()
        ref = model.fit(verbose=0, accelerate=None, convergence="group", group_tol=1e-8, group_window=5,
                        mstep_maxit=reference_maxit, **extra)
        ref_wall = time.perf_counter() - t0
        ref_h, ref_npl = _hyper(ref), float(ref.NPL.sum())
        rows.append({"case": case, "setting": "fixed point (plain EM, group tol 1e-8)", "E-steps": ref.n_iter,
                     "converged": ref.convergence, "wall s": round(ref_wall, 2), "NPL - fixed point": 0.0,
                     "max rel. group diff": 0.0, "rejected": 0, "reported gap (hyper)": None})
        print(rows[-1], flush=True)
        for name, opts in SETTINGS.items():
            t0 = time.perf_counter()
            res = model.fit(verbose=0, mstep_maxit=3000, **opts, **extra)
            wall = time.perf_counter() - t0
            rel = np.max(np.abs(_hyper(res) - ref_h) / (1 + np.abs(ref_h)))
            gap = res.fixed_point_gap
            rows.append({"case": case, "setting": name, "E-steps": res.n_iter, "converged": res.convergence,
                         "wall s": round(wall, 2), "NPL - fixed point": float(res.NPL.sum()) - ref_npl,
                         "max rel. group diff": rel, "rejected": int((res.history["step"] == "rejected").sum()),
                         "reported gap (hyper)": None if gap is None else gap["hyper"]})
            print(rows[-1], flush=True)
        if out is not None:
            df = pd.DataFrame(rows)
            out.write_text("# bench_convergence\n\n" + to_markdown(df.set_index(["case", "setting"])) + "\n")
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--reference-maxit", type=int, default=5000)
    args = ap.parse_args()
    out = Path(__file__).parent / "results" / "bench_convergence.md"
    df = run(args.threads, args.cases, args.reference_maxit, out)
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
