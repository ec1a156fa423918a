"""EM iterations, E-step evaluations and wall time of plain and accelerated EM on slowly converging fits.

Cases (each fitted with plain EM under pyEM's NPL rule, plain EM under the
LME rule, and the default: SQUAREM under the LME rule; a long plain-EM run
to a tight group tolerance gives the fixed point the others are compared to):

- ``bandit_pm1``: 20 subjects x 100 trials of a two-armed bandit, outcomes
  +-1, group SD 0.2 for alpha (normalized): a narrow learning-rate group;
- ``rw2a1b_on_rw1a1b``: rw2a1b fitted to 40 rw1a1b subjects (a group variance shrinks to 0);
- ``sd_hyp_wk_w1``: sd_hyp_wk on 40 subjects who all have w = 1.

Run: ``python benchmarks/bench_convergence.py [--threads 1]``; prints a table
and writes ``benchmarks/results/bench_convergence.md``.
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
from torchem.models import discounting, rl
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


CASES = {"bandit_pm1": bandit_pm1, "rw2a1b_on_rw1a1b": rw2a1b_on_rw1a1b, "sd_hyp_wk_w1": sd_hyp_wk_w1}
SETTINGS = {
    "plain EM, NPL rule (pyEM)": {"accelerate": None, "convergence": "npl"},
    "plain EM, LME rule": {"accelerate": None, "convergence": "lme"},
    "SQUAREM, LME rule (default)": {},
}


def run(threads: int | None, cases: list[str]) -> pd.DataFrame:
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for case in cases:
        data, fit = CASES[case]()
        model = EMModel(data, fit, device="cpu")
        ref = model.fit(verbose=0, accelerate="squarem", convergence="group", group_tol=1e-7, group_window=5,
                        mstep_maxit=5000)
        ref_mu, ref_var, ref_npl = ref.posterior_mu.numpy(), ref.posterior_var.numpy(), float(ref.NPL.sum())
        ref_lme = float(ref.history["LME"].iloc[-1])
        for name, opts in SETTINGS.items():
            t0 = time.perf_counter()
            res = model.fit(verbose=0, mstep_maxit=3000, **opts)
            wall = time.perf_counter() - t0
            rel = np.max(np.abs(np.r_[res.posterior_mu.numpy() - ref_mu, np.sqrt(res.posterior_var.numpy())
                                      - np.sqrt(ref_var)]) / (1 + np.abs(np.r_[ref_mu, np.sqrt(ref_var)])))
            rows.append({"case": case, "setting": name, "E-steps": res.n_iter, "converged": res.convergence,
                         "wall s": round(wall, 2), "NPL - fixed point": float(res.NPL.sum()) - ref_npl,
                         "LME - fixed point": float(res.history["LME"].iloc[-1]) - ref_lme,
                         "max rel. group diff": rel})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = ap.parse_args()
    df = run(args.threads, args.cases)
    print(df.to_string(index=False))
    out = Path(__file__).parent / "results" / "bench_convergence.md"
    out.write_text("# bench_convergence\n\n" + to_markdown(df.set_index(["case", "setting"])) + "\n")


if __name__ == "__main__":
    main()
