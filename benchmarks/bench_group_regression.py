"""Validation of covariates in the group prior by simulation: coverage, false positives, power.

Each simulated study has 60 subjects in two groups of 30 doing the rw1a1b
two-armed bandit (4 blocks x 24 trials, reward probabilities 0.8 / 0.2).
Normalized parameters: ``beta ~ N(0.5, 0.7^2)`` in both groups,
``alpha ~ N(-0.3 + delta * patient, 0.7^2)``; ``delta`` is the group
difference in the normalized learning rate (default 0.5), or 0 in the null
studies.  Every study is analysed twice:

- the covariate fit: ``fit(covariates=group, estep=...)``, the coefficient of
  ``group`` on ``alpha`` with its Louis standard error, Wald z-test and 95% CI;
- the usual analysis: one pooled fit without covariates (Laplace E-step, as
  pyEM) and a two-sample t-test on the MAP learning rates (normalized).

Reported: the share of 95% intervals that contain the true difference (in
the effect studies, the null studies, and both), the false-positive rate of
both tests in the null studies, their power in the effect studies, and the
mean estimate and standard error against the spread of the estimates.
``--studies 200`` gives 200 effect and 200 null studies.  Results go to
``benchmarks/results/group_regression.csv`` (one row per study, written as it
runs) and ``benchmarks/results/group_regression.md``.

    python benchmarks/bench_group_regression.py --studies 200 --estep importance
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from torchem import EMModel
from torchem.models.rl import rw1a1b_fit, rw1a1b_simulate
from torchem.transforms import norm2alpha, norm2beta

RESULTS = Path(__file__).resolve().parent / "results"


def simulate(seed: int, delta: float, n_subjects: int = 60):
    rng = np.random.default_rng(seed)
    g = np.arange(n_subjects) % 2
    nat = np.column_stack([norm2beta(rng.normal(0.5, 0.7, n_subjects)),
                           norm2alpha(rng.normal(-0.3 + delta * g, 0.7, n_subjects))])
    sim = rw1a1b_simulate(nat, nblocks=4, ntrials=24, seed=seed + 10_000)
    return g, [[sim["choices"][i], sim["rewards"][i]] for i in range(n_subjects)]


def one_study(seed: int, delta: float, estep: str, nsamples: int, n_subjects: int, group_tol: float) -> dict:
    g, data = simulate(seed, delta, n_subjects)
    model = EMModel(data, rw1a1b_fit, device="cpu")
    t0 = time.perf_counter()
    res = model.fit(verbose=0, covariates=pd.DataFrame({"patient": g}), estep=estep, nsamples=nsamples,
                    group_tol=group_tol)
    row = res.group_coefficients().loc[("alpha", "patient")]
    t_cov = time.perf_counter() - t0
    pooled = model.fit(verbose=0)
    a = pooled.m[:, 1].numpy()
    t = stats.ttest_ind(a[g == 1], a[g == 0])
    return {"seed": seed, "delta": delta, "estimate": row["estimate"], "se": row["se"], "p": row["p"],
            "lower": row["2.5%"], "upper": row["97.5%"], "covered": bool(row["2.5%"] <= delta <= row["97.5%"]),
            "t_diff": float(a[g == 1].mean() - a[g == 0].mean()), "t_p": float(t.pvalue), "fit_s": t_cov,
            "converged": bool(res.convergence)}


def summarize(df: pd.DataFrame) -> str:
    eff, null = df[df["delta"] > 0], df[df["delta"] == 0]
    lines = ["| | covariate fit (Louis SE, Wald) | t-test on MAPs (pooled fit) |", "| --- | ---: | ---: |"]
    lines.append(f"| 95% CI coverage, effect studies ({len(eff)}) | {eff['covered'].mean():.3f} | |")
    lines.append(f"| 95% CI coverage, null studies ({len(null)}) | {null['covered'].mean():.3f} | |")
    lines.append(f"| 95% CI coverage, all ({len(df)}) | {df['covered'].mean():.3f} | |")
    lines.append(f"| false-positive rate (null, p < 0.05) | {(null['p'] < 0.05).mean():.3f} | "
                 f"{(null['t_p'] < 0.05).mean():.3f} |")
    lines.append(f"| power (delta = {eff['delta'].iloc[0] if len(eff) else float('nan'):g}, p < 0.05) | "
                 f"{(eff['p'] < 0.05).mean():.3f} | {(eff['t_p'] < 0.05).mean():.3f} |")
    lines.append(f"| mean estimate of the difference (effect) | {eff['estimate'].mean():.3f} | "
                 f"{eff['t_diff'].mean():.3f} |")
    lines.append(f"| SD of the estimates / mean SE (effect) | {eff['estimate'].std():.3f} / {eff['se'].mean():.3f} | |")
    lines.append(f"| SD of the estimates / mean SE (null) | {null['estimate'].std():.3f} / {null['se'].mean():.3f} | |")
    lines.append(f"| mean covariate fit time, s | {df['fit_s'].mean():.1f} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=200, help="effect studies (and as many null studies)")
    ap.add_argument("--subjects", type=int, default=60)
    ap.add_argument("--delta", type=float, default=0.5, help="group difference of the normalized learning rate")
    ap.add_argument("--estep", default="importance", choices=["laplace", "importance"])
    ap.add_argument("--nsamples", type=int, default=300, help="importance draws per subject and iteration")
    ap.add_argument("--group-tol", type=float, default=3e-3, help="importance E-step convergence (group_tol)")
    ap.add_argument("--out", default=str(RESULTS / "group_regression"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    warnings.simplefilter("ignore", RuntimeWarning)
    csv = Path(args.out + ".csv")
    csv.parent.mkdir(parents=True, exist_ok=True)
    done = pd.read_csv(csv) if csv.exists() else pd.DataFrame()
    rows = done.to_dict("records")
    have = {(int(r["seed"]), float(r["delta"])) for r in rows}
    t0 = time.perf_counter()
    for k in range(args.studies):
        for delta in (args.delta, 0.0):
            seed = 2 * k + (delta == 0.0)
            if (seed, delta) in have:
                continue
            rows.append(one_study(seed, delta, args.estep, args.nsamples, args.subjects, args.group_tol))
            pd.DataFrame(rows).to_csv(csv, index=False)
        if (k + 1) % 10 == 0:
            print(f"{k + 1} studies, {time.perf_counter() - t0:.0f} s", flush=True)
    df = pd.DataFrame(rows)
    text = (f"# Covariates in the group prior: {args.studies} effect + {args.studies} null studies of "
            f"{args.subjects} subjects (rw1a1b, 4 x 24 trials; estep={args.estep}, nsamples={args.nsamples}, "
            f"group_tol={args.group_tol:g})\n\n"
            + summarize(df) + f"\n\nwall time {time.perf_counter() - t0:.0f} s (this run)\n")
    Path(args.out + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
