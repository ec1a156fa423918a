"""Benchmark: torchem's batched EM fit against a per-subject scipy baseline.

Run by hand from the repository root::

    python benchmarks/bench_fit.py                      # sizes 100 and 10,000
    python benchmarks/bench_fit.py --sizes 100,1000 --out benchmarks/results/bench_fit.md

Both fitters run in this process on the same simulated data (the
Rescorla-Wagner model with one learning rate and one inverse temperature,
4 blocks of 24 trials per subject).

* **torchem**: ``EMModel(..., rw1a1b_fit, device="cpu").fit()`` -- every
  subject in one batched L-BFGS per E-step, exact Hessians from autograd.
  A small warm-up fit runs first so that one-time library initialization is
  not counted; its time is reported separately.
* **baseline**: hierarchical EM written the way pyEM fits, one subject at a
  time: a plain numpy likelihood (a loop over blocks and trials), the
  negative log posterior under a diagonal Gaussian prior, each subject
  minimized by ``scipy.optimize.minimize(method="BFGS")`` with
  finite-difference gradients from a fresh random start in every E-step, and
  the M-step taken from BFGS's ``hess_inv``.  It runs sequentially on one
  core.  Its cost is linear in the number of subjects, so for sizes above
  ``--baseline-subjects`` it is timed on that many subjects and scaled up
  linearly (marked in the output).  The speed-up is also quoted against an
  ideal two-core split of the baseline (half its time), which is what a
  perfectly parallel per-subject fit could reach on a two-core machine.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy
import scipy.optimize
import scipy.stats
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchem import EMModel  # noqa: E402
from torchem.models.rl import rw1a1b_fit, rw1a1b_simulate  # noqa: E402

NBLOCKS, NTRIALS = 4, 24
PARAM_NAMES = ["beta", "alpha"]
BETA_MAX = 20.0
LOG_2PI = np.log(2.0 * np.pi)


# --------------------------------------------------------------------------- data
def draw_true_params(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Normalized parameters from N(0, 1) and their natural values ``[beta, alpha]``."""
    x = rng.standard_normal((n, 2))
    natural = np.column_stack([BETA_MAX / (1.0 + np.exp(-x[:, 0])), 1.0 / (1.0 + np.exp(-x[:, 1]))])
    return x, natural


# ---------------------------------------------------------------------- baseline
def rw1a1b_nll_numpy(params: np.ndarray, choices: np.ndarray, rewards: np.ndarray) -> float:
    """One subject's negative log-likelihood, pyEM style: loop over blocks and trials."""
    beta = BETA_MAX / (1.0 + np.exp(-params[0]))
    alpha = 1.0 / (1.0 + np.exp(-params[1]))
    nblocks, ntrials = choices.shape
    nll = 0.0
    for b in range(nblocks):
        ev = np.array([0.5, 0.5])  # values reset every block
        for t in range(ntrials):
            c = choices[b, t]
            e = np.exp(beta * ev)
            p = e / e.sum()  # softmax over the two options
            nll -= np.log(p[c])
            pe = rewards[b, t] - ev[c]
            ev[c] += alpha * pe
    return nll


def neg_log_prior(params: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """``-sum(scipy.stats.norm.logpdf(params, mu, sqrt(sigma)))``, constants included.

    Written out in numpy (same value, checked at start-up) so that the
    baseline does not pay scipy.stats' per-call overhead.
    """
    return float(np.sum(0.5 * (LOG_2PI + np.log(sigma)) + 0.5 * (params - mu) ** 2 / sigma))


def neg_log_posterior(params, choices, rewards, mu, sigma) -> float:
    with np.errstate(over="ignore"):  # finite differences may probe extreme values
        return rw1a1b_nll_numpy(params, choices, rewards) + neg_log_prior(params, mu, sigma)


def baseline_em(choices: np.ndarray, rewards: np.ndarray, rng: np.random.Generator,
                maxit: int = 800, crit: float = 1e-3, objective=neg_log_posterior) -> dict:
    """Hierarchical EM, one subject at a time, the way pyEM fits.

    ``objective(params, choices, rewards, mu, sigma)`` is one subject's
    negative log posterior (default: the numpy rw1a1b likelihood plus the
    Gaussian prior).
    """
    S, P = choices.shape[0], len(PARAM_NAMES)
    mu, sigma = np.zeros(P), np.full(P, 100.0)  # broad initial prior (variances)
    npl_old = -np.inf
    converged = False
    n_fev = 0
    for it in range(1, maxit + 1):
        m = np.empty((S, P))
        inv_h = np.empty((S, P, P))
        npl = np.empty(S)
        for i in range(S):  # E-step: each subject from a fresh random start
            x0 = 0.1 * rng.standard_normal(P)
            res = scipy.optimize.minimize(objective, x0, args=(choices[i], rewards[i], mu, sigma), method="BFGS")
            m[i], inv_h[i], npl[i] = res.x, res.hess_inv, res.fun
            n_fev += res.nfev
        # M-step from the MAPs and the BFGS inverse Hessians
        new_mu = m.mean(0)
        new_sigma = (m ** 2 + np.diagonal(inv_h, axis1=1, axis2=2)).mean(0) - new_mu ** 2
        flag = bool(np.min(new_sigma) >= 0)  # pyEM keeps the old prior on a negative variance
        if flag:
            mu, sigma = new_mu, new_sigma
        total = float(npl.sum())
        converged = flag and abs(total - npl_old) < crit
        npl_old = total
        if converged:
            break
    return {"m": m, "mu": mu, "sigma": sigma, "n_iter": it, "converged": converged, "npl": total,
            "n_fev": n_fev}


# ----------------------------------------------------------------------- checks
def check_same_model(choices: np.ndarray, rewards: np.ndarray, rng: np.random.Generator) -> float:
    """Max |difference| between the numpy and torchem likelihoods at random points."""
    n = min(5, choices.shape[0])
    x = rng.standard_normal((n, 2))
    ref = np.array([rw1a1b_nll_numpy(x[i], choices[i], rewards[i]) for i in range(n)])
    got = rw1a1b_fit(torch.tensor(x), torch.as_tensor(choices[:n]), torch.as_tensor(rewards[:n],
                                                                                      dtype=torch.float64))
    mu, sigma = rng.standard_normal(2), rng.uniform(0.5, 3.0, 2)
    prior_ref = -np.sum(scipy.stats.norm.logpdf(x[0], mu, np.sqrt(sigma)))
    assert abs(prior_ref - neg_log_prior(x[0], mu, sigma)) < 1e-10, "numpy prior differs from scipy.stats"
    return float(np.abs(ref - got.numpy()).max())


# ---------------------------------------------------------------------- one size
def make_model(choices: np.ndarray, rewards: np.ndarray) -> EMModel:
    return EMModel([[c, r] for c, r in zip(choices, rewards)], rw1a1b_fit, device="cpu")


def run_size(size: int, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    x_true, natural = draw_true_params(size, rng)
    sim = rw1a1b_simulate(natural, nblocks=NBLOCKS, ntrials=NTRIALS, seed=args.seed)
    choices, rewards = sim["choices"], sim["rewards"]
    model_diff = check_same_model(choices, rewards, np.random.default_rng(args.seed + 2))
    print(f"\n== {size:,} subjects ({NBLOCKS} blocks x {NTRIALS} trials); "
          f"numpy vs torchem likelihood max |diff| = {model_diff:.1e}", flush=True)

    # warm-up: a few subjects, a few iterations, not counted
    t0 = time.perf_counter()
    make_model(choices[:8], rewards[:8]).fit(verbose=0, mstep_maxit=3)
    warmup = time.perf_counter() - t0
    print(f"torchem warm-up fit (8 subjects, 3 iterations): {warmup:.2f} s (not counted)", flush=True)

    t0 = time.perf_counter()
    model = make_model(choices, rewards)
    setup = time.perf_counter() - t0
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    res = model.fit(verbose=0)
    fit_time, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    tm_total = setup + fit_time
    tm_mu = res.posterior_mu.cpu().numpy()
    tm_m = res.m.cpu().numpy()
    print(f"torchem: setup {setup:.2f} s + fit {fit_time:.2f} s, {res.n_iter} EM iterations, "
          f"converged={res.convergence}", flush=True)

    nb = min(size, args.baseline_subjects)
    scaled = nb < size
    print(f"baseline: full EM on {nb:,} subjects, one core"
          + (f" (to be scaled x{size / nb:g} to {size:,} subjects)" if scaled else "") + " ...", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    base = baseline_em(choices[:nb], rewards[:nb], np.random.default_rng(args.seed + 1))
    base_measured, base_cpu = time.perf_counter() - t0, time.process_time() - c0
    base_time = base_measured * size / nb
    print(f"baseline: {base_measured:.1f} s measured on {nb:,} subjects, {base['n_iter']} EM iterations, "
          f"converged={base['converged']}, {base['n_fev']:,} likelihood calls"
          + (f"; scaled to {size:,} subjects: {base_time:.1f} s" if scaled else ""), flush=True)

    same = not scaled
    tag = f" (first {nb:,})" if scaled else ""
    return {
        "subjects": size,
        "1-min load average before the fits": load,
        "torchem warm-up s (not counted)": warmup,
        "torchem setup s": setup,
        "torchem fit s": fit_time,
        "torchem setup+fit s": tm_total,
        "torchem EM iterations": res.n_iter,
        "torchem converged": bool(res.convergence),
        "torchem subjects/s": size / tm_total,
        "torchem fit CPU s (all threads)": fit_cpu,
        "baseline subjects fitted": nb,
        "baseline measured s": base_measured,
        "baseline measured CPU s": base_cpu,
        "baseline s, 1 core": _scaled(base_time, size / nb) if scaled else base_time,
        "baseline s, ideal 2 cores": _scaled(base_time / 2.0, size / nb) if scaled else base_time / 2.0,
        "baseline EM iterations": f"{base['n_iter']}{tag}",
        "baseline converged": base["converged"],
        "baseline subjects/s, 1 core": nb / base_measured,
        "speed-up vs baseline 1 core": f"{base_time / tm_total:.1f}x",
        "speed-up vs ideal 2-core baseline": f"{base_time / 2.0 / tm_total:.1f}x",
        "torchem s per EM iteration": fit_time / res.n_iter,
        "baseline s per EM iteration, 1 core": base_time / base["n_iter"],
        "speed-up per EM iteration vs 1 core": f"{base_time / base['n_iter'] / (fit_time / res.n_iter):.1f}x",
        "speed-up by CPU time (baseline CPU / torchem fit CPU)": f"{base_cpu * size / nb / fit_cpu:.1f}x",
        "true mean (normalized) beta, alpha": _pair(x_true.mean(0)),
        "torchem group mean beta, alpha": _pair(tm_mu),
        "baseline group mean beta, alpha": _pair(base["mu"]) + tag,
        "torchem group var beta, alpha": _pair(res.posterior_sigma.cpu().numpy()),
        "baseline group var beta, alpha": _pair(base["sigma"]) + tag,
        "max abs MAP difference, same subjects": float(np.abs(tm_m[:nb] - base["m"]).max()) if same else None,
        "_scaled": scaled,
        "_converged": (bool(res.convergence), bool(base["converged"])),
    }


def _scaled(value: float, factor: float) -> str:
    return f"{_fmt(value)} (scaled x{factor:g})"


def _pair(v) -> str:
    return f"{v[0]:+.3f}, {v[1]:+.3f}"


# --------------------------------------------------------------------- output
def _fmt(v) -> str:
    if v is None:
        return "n/a (baseline fitted a subset)"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    if isinstance(v, float):
        if v >= 1000:
            return f"{v:,.0f}"
        if v >= 100:
            return f"{v:.1f}"
        if v >= 0.01:
            return f"{v:.2f}"
        return f"{v:.1e}"
    return str(v)


def build_table(rows: list[dict]) -> pd.DataFrame:
    """Metrics as rows, sizes as columns (rows with a scaled baseline keep their own label)."""
    metrics: list[str] = []
    for r in rows:
        for k in r:
            if not k.startswith("_") and k != "subjects" and k not in metrics:
                metrics.append(k)
    cols = {f"{r['subjects']:,} subjects": [_fmt(r[k]) if k in r else "" for k in metrics] for r in rows}
    return pd.DataFrame(cols, index=pd.Index(metrics, name="metric"))


def to_markdown(df: pd.DataFrame) -> str:
    header = [df.index.name or ""] + list(df.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(df.columns)) + "|"]
    for name, row in df.iterrows():
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in [name, *row]) + " |")
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> list[str]:
    return [
        f"date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_implementation()} "
        f"{platform.python_version()}",
        f"torch {torch.__version__} (CPU, {torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"scipy {scipy.__version__}",
        f"model rw1a1b, {NBLOCKS} blocks x {NTRIALS} trials per subject; true normalized parameters "
        f"~ N(0, 1); seed {args.seed}",
    ]


NOTES = [
    "torchem times are setup (building the EMModel from per-subject lists) plus fit; "
    "subjects/s and speed-ups use that total.",
    "The baseline runs sequentially on one core: scipy BFGS with finite-difference gradients, "
    "a fresh 0.1*N(0, 1) start per subject and E-step, numpy likelihood looping over trials, "
    "M-step from BFGS hess_inv (as pyEM).",
    "Times are wall-clock (time.perf_counter); CPU s is process CPU time (time.process_time), for the "
    "single-threaded baseline about what it would take on an otherwise idle core.",
    "'ideal 2 cores' halves the baseline time: a perfect per-subject split over two cores, with no "
    "parallel overhead (pyEM's joblib would pay some).",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,10000", help="comma-separated subject counts (default 100,10000)")
    ap.add_argument("--baseline-subjects", type=int, default=100,
                    help="largest number of subjects the baseline fits; larger sizes are scaled linearly "
                         "(default 100)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the simulation and the baseline starts")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as a markdown file")
    args = ap.parse_args(argv)
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or args.baseline_subjects < 1:
        ap.error("sizes and --baseline-subjects must be positive")
    torch.set_num_threads(args.threads)

    env = environment(args)
    print("\n".join(env))
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    rows = [run_size(s, args) for s in sizes]
    wall = time.perf_counter() - t_all
    load1 = os.getloadavg()

    table = build_table(rows)
    scaled = [r for r in rows if r["_scaled"]]
    notes = list(NOTES)
    if scaled:
        notes.insert(1, "SCALED: for " + ", ".join(f"{r['subjects']:,}" for r in scaled)
                     + f" subjects the baseline was timed on {args.baseline_subjects:,} subjects and its time "
                       "multiplied linearly; its group mean is from those subjects only.")
    for r in rows:
        tm_ok, base_ok = r["_converged"]
        if not tm_ok:
            notes.append(f"WARNING: torchem did not converge at {r['subjects']:,} subjects "
                         f"({r['torchem EM iterations']} EM iterations, the cap): its time is that of the cap, "
                         "not of a converged fit; compare the per-iteration rows.")
        if not base_ok:
            notes.append(f"WARNING: the baseline did not converge at {r['subjects']:,} subjects.")
    if load0[0] > 0.5:
        busy = (f"WARNING: other processes were running (load average {load0[0]:.2f} on {os.cpu_count()} cores), "
                "which inflates wall times; the CPU-time rows are less affected.")
        if args.threads > 1:
            busy += (f" Under CPU contention torch's OpenMP threads (--threads {args.threads}) can slow "
                     "small-tensor work many-fold; --threads 1 is more robust on a busy machine.")
        notes.append(busy)
    notes.append(f"benchmark wall time {wall:.0f} s; 1-min load average {load0[0]:.2f} at start, "
                 f"{load1[0]:.2f} at end (other processes on the machine inflate both fitters' times).")

    print("\n" + table.to_string())
    print("\n" + "\n".join("* " + n for n in notes))

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        text = ["# torchem fit vs per-subject scipy baseline", "",
                "Generated by `python benchmarks/bench_fit.py"
                + (" " + " ".join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else "")
                + "`.", ""]
        text += ["- " + line for line in env] + ["", to_markdown(table), ""]
        text += ["- " + n for n in notes] + [""]
        args.out.write_text("\n".join(text))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
