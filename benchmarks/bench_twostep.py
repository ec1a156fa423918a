"""Benchmark: the two-step hybrid model (hybrid_mbmf) fitted by torchem vs a per-subject scipy baseline.

Run from the repository root::

    python benchmarks/bench_twostep.py                          # 200 subjects x 200 trials
    python benchmarks/bench_twostep.py --baseline-subjects 10 --out benchmarks/results/bench_twostep.md

Both fitters run in this process on the same simulated data (200 subjects x
200 trials of Daw et al.'s two-step task, generating parameters as in
``benchmarks/recovery_table.py``).

* **torchem**: ``EMModel(..., hybrid_mbmf_fit).fit()`` -- all subjects in one
  batched L-BFGS per E-step, exact Hessians from autograd.
* **baseline**: hierarchical EM the way pyEM fits: a plain numpy likelihood
  (loop over trials), the negative log posterior under a diagonal Gaussian
  prior, one ``scipy.optimize.minimize(method="BFGS")`` per subject per EM
  iteration with finite-difference gradients, M-step from BFGS's
  ``hess_inv``.  It is sequential on one core; it runs on the first
  ``--baseline-subjects`` subjects and its time is scaled linearly to all
  subjects (its cost is linear in the number of subjects).  By default it
  runs as many EM iterations as torchem needed (``--baseline-maxit`` to
  change), so both do the same number of E-steps.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import scipy.optimize
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchem import EMModel  # noqa: E402
from torchem.models.twostep import hybrid_mbmf_fit, hybrid_mbmf_simulate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery_table import draw_params  # noqa: E402

LOG_2PI = math.log(2.0 * math.pi)


def nll_numpy(x: np.ndarray, c1: np.ndarray, s2: np.ndarray, c2: np.ndarray, r: np.ndarray) -> float:
    """One subject's negative log-likelihood of the hybrid model (normalized ``x``), loop over trials."""
    b1, b2 = math.exp(min(x[0], 50.0)), math.exp(min(x[1], 50.0))
    a1, a2, lam, w = (1.0 / (1.0 + math.exp(-v)) for v in x[2:6])
    rep = x[6]
    qmf = np.zeros(2)
    q2 = np.zeros((2, 2))
    prev = -1
    nll = 0.0
    for t in range(len(c1)):
        a, s, b = c1[t], s2[t], c2[t]
        v = q2.max(1)
        qmb = np.array([0.7 * v[0] + 0.3 * v[1], 0.3 * v[0] + 0.7 * v[1]])
        z = b1 * (w * qmb + (1.0 - w) * qmf)
        if prev >= 0:
            z[prev] += rep
        z = z - z.max()
        nll -= z[a] - math.log(np.exp(z).sum())
        z2 = b2 * q2[s]
        z2 = z2 - z2.max()
        nll -= z2[b] - math.log(np.exp(z2).sum())
        d1 = q2[s, b] - qmf[a]
        d2 = r[t] - q2[s, b]
        qmf[a] += a1 * d1 + lam * a1 * d2
        q2[s, b] += a2 * d2
        prev = a
    return nll


def baseline_em(data: list, maxit: int, rng: np.random.Generator, crit: float = 1e-3) -> dict:
    S, P = len(data), 7
    mu, var = np.zeros(P), np.full(P, 100.0)
    npl_old, n_fev, it = math.inf, 0, 0
    for it in range(1, maxit + 1):
        m, inv_h, npl = np.empty((S, P)), np.empty((S, P, P)), np.empty(S)
        for i in range(S):
            def f(x, d=data[i]):
                return nll_numpy(x, *d) + float(np.sum(0.5 * (LOG_2PI + np.log(var)) + 0.5 * (x - mu) ** 2 / var))
            res = scipy.optimize.minimize(f, 0.1 * rng.standard_normal(P), method="BFGS")
            m[i], inv_h[i], npl[i] = res.x, res.hess_inv, res.fun
            n_fev += res.nfev
        new_mu = m.mean(0)
        new_var = (m ** 2 + np.diagonal(inv_h, axis1=1, axis2=2)).mean(0) - new_mu ** 2
        if new_var.min() >= 0:
            mu, var = new_mu, new_var
        total = float(npl.sum())
        if abs(total - npl_old) < crit:
            break
        npl_old = total
    return {"m": m, "mu": mu, "n_iter": it, "n_fev": n_fev}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, default=200)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--baseline-subjects", type=int, default=10, help="subjects the baseline fits (scaled up)")
    ap.add_argument("--baseline-maxit", type=int, default=None,
                    help="EM iterations of the baseline (default: as many as torchem needed)")
    ap.add_argument("--maxit", type=int, default=800, help="torchem EM iteration cap")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    true = draw_params("hybrid_mbmf", args.subjects, rng)
    sim = hybrid_mbmf_simulate(true, ntrials=args.trials, seed=args.seed + 1)
    keys = hybrid_mbmf_fit.inputs
    all_data = [[sim[k][i] for k in keys] for i in range(args.subjects)]

    # the two likelihoods agree
    x = rng.standard_normal((3, 7))
    ref = [nll_numpy(x[i], *all_data[i]) for i in range(3)]
    got = hybrid_mbmf_fit(torch.from_numpy(x), *[torch.as_tensor(sim[k][:3]) for k in keys]).numpy()
    diff = float(np.abs(np.asarray(ref) - got).max())
    print(f"numpy vs torchem likelihood: max |diff| = {diff:.1e}", flush=True)

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    model = EMModel(all_data, hybrid_mbmf_fit, device="cpu")
    res = model.fit(verbose=0, mstep_maxit=args.maxit)
    t_torch = time.perf_counter() - t0
    est = res.natural_params().numpy()
    r = {n: float(np.corrcoef(true[:, j], est[:, j])[0, 1]) for j, n in enumerate(hybrid_mbmf_fit.param_names)}
    print(f"torchem: {t_torch:.1f} s, {res.n_iter} EM iterations, converged={res.convergence}", flush=True)
    print("  recovery r: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)

    nb = min(args.baseline_subjects, args.subjects)
    maxit = args.baseline_maxit or res.n_iter
    t0 = time.perf_counter()
    base = baseline_em(all_data[:nb], maxit, np.random.default_rng(args.seed + 2))
    t_base = time.perf_counter() - t0
    per_iter = t_base / base["n_iter"]
    scaled = per_iter * res.n_iter * args.subjects / nb
    print(f"baseline: {t_base:.1f} s on {nb} subjects, {base['n_iter']} EM iterations, {base['n_fev']:,} "
          f"likelihood calls; {per_iter / nb:.2f} s per subject per EM iteration", flush=True)
    print(f"baseline scaled to {args.subjects} subjects x {res.n_iter} EM iterations: {scaled:.0f} s "
          f"(ideal 2-core split: {scaled / 2:.0f} s)")
    print(f"speed-up: {scaled / t_torch:.1f}x vs one core, {scaled / 2 / t_torch:.1f}x vs an ideal 2-core baseline")
    load1 = os.getloadavg()[0]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            "# Two-step hybrid model: torchem vs per-subject scipy baseline", "",
            f"- {_dt.date.today().isoformat()}, {platform.machine()} with {os.cpu_count()} CPU cores (shared; "
            f"1-min load average {load0:.1f} at start, {load1:.1f} at end), torch {torch.__version__} "
            f"({args.threads} threads), scipy {scipy.__version__}",
            f"- {args.subjects} subjects x {args.trials} trials, hybrid_mbmf (7 parameters); numpy vs torchem "
            f"likelihood max |diff| {diff:.1e}", "",
            "| | value |", "| --- | ---: |",
            f"| torchem fit (all subjects) | {t_torch:.1f} s, {res.n_iter} EM iterations, "
            f"converged={res.convergence} |",
            f"| baseline measured | {t_base:.1f} s on {nb} subjects x {base['n_iter']} EM iterations |",
            f"| baseline per subject per EM iteration | {per_iter / nb:.2f} s |",
            f"| baseline scaled to {args.subjects} subjects x {res.n_iter} iterations, one core | {scaled:.0f} s |",
            f"| speed-up vs one core | {scaled / t_torch:.1f}x |",
            f"| speed-up vs ideal two-core baseline | {scaled / 2 / t_torch:.1f}x |", "",
            "- recovery r (torchem): " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), ""]
        args.out.write_text("\n".join(lines))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
