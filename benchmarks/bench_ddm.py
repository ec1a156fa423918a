"""Benchmark: drift-diffusion models (ddm4, ddm7) fitted by torchem vs a pyEM-style per-subject baseline.

Run from the repository root::

    python benchmarks/bench_ddm.py                                   # ddm4 and ddm7, 100 subjects
    python benchmarks/bench_ddm.py --models ddm4 --out benchmarks/results/bench_ddm.md

Both fitters run in this process on the same simulated data (100 subjects x
150 trials for ``ddm4``, x 500 trials for ``ddm7``; generating distributions
as in ``benchmarks/recovery_table.py``).

* **torchem**: ``EMModel(..., ddm4_fit).fit()`` -- all subjects in one
  batched L-BFGS per E-step, exact gradients and Hessians from autograd,
  every trial and quadrature node in one tensor evaluation.
* **baseline**: hierarchical EM the way pyEM fits its DDMs: a numpy WFPT
  likelihood (Navarro & Fuss 2009 series with per-call term counts for an
  error of 1e-10, both series in log space; ``sv`` analytic; ``st`` and ``sz``
  by 11 x 11 Gauss-Legendre over the full intervals, nodes at non-positive
  decision times dropped; a response at or before ``t0`` is a 1e7 penalty),
  the negative log posterior under a diagonal Gaussian prior, one
  ``scipy.optimize.minimize(method="BFGS")`` per subject per EM iteration from
  a random start with finite-difference gradients (by default with pyEM 1.0's
  settings, ``gtol`` and step ``1e-4``, and up to two restarts while BFGS
  reports no success; ``--baseline-optimizer scipy``: scipy's defaults, no
  restarts), M-step from BFGS's ``hess_inv``.  It is
  sequential on one core, runs on the first ``--baseline-subjects`` subjects
  for ``--baseline-maxit`` EM iterations, and its time per subject and
  iteration is scaled to all subjects and as many iterations as torchem needed.

The script also prints where torchem's time goes: one likelihood, one
likelihood + gradient, and one exact Hessian of all subjects, and the
counts of each in the fit.
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
from scipy.special import expit, logsumexp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchem import EMModel  # noqa: E402
from torchem.allocator import cpu_heap  # noqa: E402
from torchem.curvature import batched_hessian  # noqa: E402
from torchem.models import MODELS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery_table import DESIGNS, draw_params  # noqa: E402

LOG_2PI = math.log(2.0 * math.pi)
GL_X, GL_W = np.polynomial.legendre.leggauss(11)


# ------------------------------------------------------------------------------------- numpy baseline
def np_log_f(u: np.ndarray, w: np.ndarray, err: float = 1e-10) -> np.ndarray:
    """Log standardized first-passage density, Navarro & Fuss (2009) term counts per call, signed log-sum-exp."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a_l = np.pi * u * err
        k_l = np.where(a_l < 1, np.maximum(np.sqrt(-2 * np.log(np.where(a_l < 1, a_l, 0.5)) / (np.pi ** 2 * u)),
                                           1 / (np.pi * np.sqrt(u))), 1 / (np.pi * np.sqrt(u)))
        a_s = 2 * np.sqrt(2 * np.pi * u) * err
        k_s = np.where(a_s < 1, np.maximum(2 + np.sqrt(-2 * u * np.log(np.where(a_s < 1, a_s, 0.5))),
                                           np.sqrt(u) + 1), 2)
    small = k_s < k_l
    out = np.empty_like(u)
    if (~small).any():
        ul, wl = u[~small, None], w[~small, None]
        k = np.arange(1, int(np.ceil(k_l[~small].max())) + 1)[None, :]
        s = np.sin(np.pi * k * wl)
        with np.errstate(divide="ignore"):
            val = np.log(k) + np.log(np.abs(s)) - k ** 2 * np.pi ** 2 * ul / 2
        out[~small] = logsumexp(val, b=np.sign(s), axis=1) + np.log(np.pi)
    if small.any():
        us, ws = u[small, None], w[small, None]
        half = int(np.ceil(k_s[small].max())) // 2 + 1
        r = ws + 2 * np.arange(-half, half + 1)[None, :]
        with np.errstate(divide="ignore"):
            val = np.log(np.abs(r)) - r ** 2 / (2 * us)
        out[small] = logsumexp(val, b=np.sign(r), axis=1) - 0.5 * np.log(2 * np.pi * us[:, 0] ** 3)
    return out


def np_log_density(t, v, a, w, sv):
    """Lower-boundary log density at decision times ``t`` (``-inf`` where ``t <= 0``)."""
    out = np.full(t.shape, -np.inf)
    ok = t > 0
    t, v, w = t[ok], v[ok], w[ok]
    den = sv * sv * t + 1
    out[ok] = (np_log_f(t / a ** 2, w) - 2 * np.log(a) - 0.5 * np.log(den)
               + (a * a * w * w * sv * sv - 2 * a * v * w - v * v * t) / (2 * den))
    return out


def np_nll(x: np.ndarray, rt, choice, dv, variability: bool) -> float:
    """One subject's negative log-likelihood at normalized ``x`` (pyEM's transforms and feasibility rules)."""
    v_coef, a, t0, z = x[0], 4 * expit(x[1]), 0.5 * expit(x[2] - 2.2), expit(x[3])
    sv, st, sz = (2.5 * expit(x[4]), 0.4 * expit(x[5]), 0.9 * expit(x[6])) if variability else (0.0, 0.0, 0.0)
    if a < 1e-5 or z - sz / 2 <= 0 or z + sz / 2 >= 1 or (not variability and np.any(rt <= t0)):
        return 1e7
    upper = choice == 1
    v = np.where(upper, -v_coef * dv, v_coef * dv)
    zc = np.where(upper, 1 - z, z)
    if not variability:
        ld = np_log_density(rt - t0, v, a, zc, 0.0)
    else:
        tau = t0 + st / 2 * GL_X
        zn = zc[:, None, None] + sz / 2 * GL_X[None, None, :]
        shape = (len(rt), 11, 11)
        dens = np_log_density(np.broadcast_to((rt[:, None] - tau[None, :])[..., None], shape).ravel(),
                              np.broadcast_to(v[:, None, None], shape).ravel(), a,
                              np.broadcast_to(zn, shape).ravel(), sv).reshape(len(rt), -1)
        ld = logsumexp(dens + np.log(np.outer(GL_W / 2, GL_W / 2)).ravel()[None, :], axis=1)
    ld = np.where(np.isfinite(ld), ld, -1e3)
    return float(-ld.sum())


#: scipy options and restarts of the baseline's per-subject BFGS: pyEM 1.0's (``pyem.core.optim``: gtol and
#: finite-difference step 1e-4, up to 2 restarts from new random points while BFGS reports no success), or
#: scipy's defaults (gtol 1e-5, step ~1.5e-8, no restarts)
BASELINE_OPTIMIZERS = {"pyem1": ({"gtol": 1e-4, "eps": 1e-4}, 2), "scipy": ({}, 0)}


def baseline_em(data: list, P: int, variability: bool, maxit: int, rng: np.random.Generator,
                optimizer: str = "pyem1") -> dict:
    S = len(data)
    mu, var = np.zeros(P), np.full(P, 100.0)
    n_fev = n_restarts = 0
    options, max_restarts = BASELINE_OPTIMIZERS[optimizer]
    for it in range(1, maxit + 1):
        m, inv_h = np.empty((S, P)), np.empty((S, P, P))
        for i in range(S):
            def f(x, d=data[i]):
                prior = np.sum(0.5 * (LOG_2PI + np.log(var)) + 0.5 * (x - mu) ** 2 / var)
                return np_nll(x, *d, variability) + float(prior)
            best = None
            for attempt in range(1 + max_restarts):
                res = scipy.optimize.minimize(f, 0.1 * rng.standard_normal(P), method="BFGS", options=options)
                n_fev += res.nfev
                n_restarts += attempt > 0
                if best is None or res.fun < best.fun:
                    best = res
                if res.success:
                    break
            m[i], inv_h[i] = best.x, best.hess_inv
        new_mu = m.mean(0)
        new_var = (m ** 2 + np.diagonal(inv_h, axis1=1, axis2=2)).mean(0) - new_mu ** 2
        if new_var.min() >= 0:
            mu, var = new_mu, new_var
    return {"m": m, "n_iter": maxit, "n_fev": n_fev, "n_restarts": n_restarts}


# ------------------------------------------------------------------------------------------- torchem
def count_calls(model: EMModel):
    """Wrap the model's likelihood to count calls with and without gradient, and Hessian evaluations."""
    counts = {"nll": 0, "grad": 0, "hessian": 0}
    inner = model.model.fit_func

    def counted(params, *data, mask=None, output="nll"):
        counts["grad" if torch.is_grad_enabled() else "nll"] += 1
        return inner(params, *data, mask=mask, output=output)

    for k in ("param_names", "param_xform", "inputs", "check_data", "simulate", "params_for_data"):
        setattr(counted, k, getattr(inner, k, None))
    # the model's own derivatives, which the E-step calls without autograd
    for name, key in (("value_and_grad", "grad"), ("hessian", "hessian")):
        own = getattr(inner, name, None)
        if own is not None:
            def counted_own(params, *data, mask=None, own=own, key=key):
                counts[key] += 1
                return own(params, *data, mask=mask)

            setattr(counted, name, counted_own)
    model.model.fit_func = counted
    return counts


def time_it(fn, n: int = 3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def run(name: str, nsubjects: int, ntrials: int, nb: int, base_maxit: int, seed: int, convergence: str,
        parallel: int, optimizer: str) -> dict:
    fit = MODELS[name]
    variability = "sv" in fit.param_names
    rng = np.random.default_rng(seed)
    true = draw_params(name, nsubjects, rng)
    sim = fit.simulate(true, ntrials=ntrials, seed=seed + 1)
    keys = fit.inputs
    all_data = [[sim[k][i] for k in keys] for i in range(nsubjects)]
    P = len(fit.param_names)

    # the two likelihoods agree (away from the contaminant: p_outlier=0, a point with every rt > t0)
    x = np.array([1.0, 0.3, 0.0, 0.1, 0.0, -1.0, -1.0][:P])
    dv = sim[keys[2]] - sim[keys[3]]
    ref = [np_nll(x, sim["rt"][i], sim["choice"][i], dv[i], variability) for i in range(3)]
    exact = fit(torch.as_tensor(np.tile(x, (3, 1))), *[torch.as_tensor(sim[k][:3]) for k in keys], p_outlier=0.0)
    diff = float(np.abs(np.asarray(ref) - exact.numpy()).max())
    print(f"{name}: numpy (pyEM rule) vs torchem likelihood, 3 subjects: max |diff| = {diff:.1e}", flush=True)

    load0 = os.getloadavg()[0]
    timings = []  # a fit under 10 s is repeated three times and its median taken
    while len(timings) < 3 and (not timings or timings[0][0] < 10.0):
        model = EMModel(all_data, fit, device="cpu")
        counts = count_calls(model)
        t0, c0 = time.perf_counter(), time.process_time()
        res = model.fit(verbose=0, convergence=convergence)
        timings.append((time.perf_counter() - t0, time.process_time() - c0))
    t_torch, c_torch = sorted(timings)[len(timings) // 2]
    est = res.natural_params().numpy()
    r = {n: float(np.corrcoef(true[:, j], est[:, j])[0, 1]) for j, n in enumerate(fit.param_names)}
    print(f"torchem: {_secs(t_torch)} ({_secs(c_torch)} CPU), {res.n_iter} EM iterations, converged={res.convergence}",
          flush=True)
    print("  recovery r: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)

    # where the time goes: one evaluation of each kind on all subjects at the fitted MAPs
    batch = model.batch
    xm = res.m.detach()

    def value():
        with torch.no_grad():
            fit(xm, *batch.data, mask=batch.mask)

    def value_grad():  # as the E-step's L-BFGS calls it: the model's own, else autograd
        if hasattr(fit, "value_and_grad"):
            return fit.value_and_grad(xm, *batch.data, mask=batch.mask)
        z = xm.clone().requires_grad_(True)
        torch.autograd.grad(fit(z, *batch.data, mask=batch.mask).sum(), z)

    def hessians():  # as the E-step computes them: the model's own, else autograd
        if hasattr(fit, "hessian"):
            return fit.hessian(xm, *batch.data, mask=batch.mask)
        return batched_hessian(lambda z: fit(z, *batch.data, mask=batch.mask), xm)

    with cpu_heap():  # as inside a fit
        parts = {"likelihood": time_it(value), "likelihood + gradient": time_it(value_grad),
                 "exact Hessians": time_it(hessians, 1)}
    n_hess = counts["hessian"] or res.n_iter + 1  # counted where the model computes its own
    print("  per call: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in parts.items())
          + f"; calls in the fit: {counts['grad']} with gradient (E-steps), {counts['nll']} without, "
          f"{n_hess} Hessian rounds", flush=True)

    t_par = None
    if parallel > 1:  # the same fit on `parallel` intra-op threads, against the baseline split over as many cores
        before = torch.get_num_threads()
        torch.set_num_threads(parallel)
        t0 = time.perf_counter()
        res_par = EMModel(all_data, fit, device="cpu").fit(verbose=0, convergence=convergence, num_threads=parallel)
        t_par = time.perf_counter() - t0
        torch.set_num_threads(before)
        same = float((res_par.m - res.m).abs().max())
        print(f"torchem on {parallel} threads: {_secs(t_par)}, {res_par.n_iter} EM iterations (MAP means within "
              f"{same:.1e} of the one-thread fit)", flush=True)

    nb = min(nb, nsubjects)
    t0, c0 = time.perf_counter(), time.process_time()
    base = baseline_em([[sim["rt"][i], sim["choice"][i], dv[i]] for i in range(nb)], P, variability, base_maxit,
                       np.random.default_rng(seed + 2), optimizer)
    t_base, c_base = time.perf_counter() - t0, time.process_time() - c0
    per = t_base / base["n_iter"] / nb
    scaled = per * res.n_iter * nsubjects
    print(f"baseline: {t_base:.1f} s on {nb} subjects x {base['n_iter']} EM iterations, {base['n_fev']:,} likelihood "
          f"calls, {base['n_restarts']} restarts; {per:.2f} s per subject per EM iteration", flush=True)
    print(f"baseline scaled to {nsubjects} subjects x {res.n_iter} EM iterations: {scaled:.0f} s; "
          f"speed-up {scaled / t_torch:.0f}x vs one core, {scaled / 2 / t_torch:.0f}x vs an ideal 2-core split; "
          f"in CPU time {c_base / t_base * scaled / c_torch:.0f}x", flush=True)
    return {"name": name, "S": nsubjects, "T": ntrials, "P": P, "diff": diff, "t_torch": t_torch, "res": res,
            "c_torch": c_torch, "c_base": c_base,
            "r": r, "parts": parts, "counts": counts, "n_hess": n_hess, "t_base": t_base, "nb": nb,
            "base_it": base["n_iter"], "base_fev": base["n_fev"], "per": per, "scaled": scaled,
            "n_restarts": base["n_restarts"], "n_timings": len(timings), "optimizer": optimizer, "load0": load0, "load1": os.getloadavg()[0], "t_par": t_par, "parallel": parallel}


def _secs(t: float) -> str:
    return f"{t:.2f} s" if t < 10 else f"{t:.1f} s"


def markdown(rows: list[dict], threads: int, startup: float, sims: dict, convergence: str) -> str:
    lines = ["# Drift-diffusion models: torchem vs a pyEM-style per-subject baseline", "",
             f"- {_dt.date.today().isoformat()}, {platform.machine()} with {os.cpu_count()} CPU cores (shared), "
             f"torch {torch.__version__} ({threads} threads), scipy {scipy.__version__}",
             f"- OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; one-time start-up of the first Hessian of the "
             f"process {startup:.1f} s, paid before the timed fits; torchem's EM stopping rule "
             f"convergence={convergence!r}",
             "- the baseline (pyEM's way: every E-step a scipy BFGS per subject from a random start, finite-difference "
             "gradients) is timed on a few subjects x 3 EM iterations; its time per subject and EM iteration is "
             "scaled to all subjects and to torchem's iteration count, so the speed-up is per EM iteration and does "
             "not depend on the stopping rule. One core: torchem on one thread against the baseline on one core; "
             "two cores: against a perfect split of the baseline over two cores, torchem on one thread and (`--parallel`) "
             "on as many threads as the baseline's cores",
             "- exact simulation of 1,000 subjects x 200 trials: "
             + ", ".join(f"{k} {v:.2f} s" for k, v in sims.items()), ""]
    for w in rows:
        res = w["res"]
        lines += [f"## {w['name']}: {w['S']} subjects x {w['T']} trials ({w['P']} parameters)", "",
                  f"- 1-min load average {w['load0']:.1f} at start, {w['load1']:.1f} at end; numpy vs torchem "
                  f"likelihood (pyEM's rule, no contaminant) max |diff| {w['diff']:.1e}", "",
                  "| | value |", "| --- | ---: |",
                  f"| torchem fit (all subjects{', median of ' + str(w['n_timings']) + ' fits' if w['n_timings'] > 1 else ''}) | {_secs(w['t_torch'])} ({_secs(w['c_torch'])} CPU), {res.n_iter} "
                  f"EM iterations, converged={res.convergence} |",
                  f"| baseline measured | {w['t_base']:.1f} s on {w['nb']} subjects x {w['base_it']} EM iterations "
                  f"({w['base_fev']:,} likelihood calls, {w['n_restarts']} restarts; BFGS settings {w['optimizer']!r}) |",
                  f"| baseline per subject per EM iteration | {w['per']:.2f} s |",
                  f"| baseline scaled to {w['S']} subjects x {res.n_iter} iterations, one core | {w['scaled']:.0f} s |",
                  f"| speed-up vs one core | {w['scaled'] / w['t_torch']:.0f}x |",
                  f"| speed-up vs ideal two-core baseline | {w['scaled'] / 2 / w['t_torch']:.0f}x |",
                  *([f"| torchem fit on {w['parallel']} threads | {_secs(w['t_par'])} |",
                     f"| speed-up, {w['parallel']} threads vs the baseline split perfectly over {w['parallel']} cores | "
                     f"{w['scaled'] / w['parallel'] / w['t_par']:.0f}x |"] if w["t_par"] else []),
                  f"| speed-up in CPU time (both measured as process time) | "
                  f"{w['c_base'] / w['t_base'] * w['scaled'] / w['c_torch']:.0f}x |", "",
                  "Where torchem's time goes (one call on all subjects at the MAPs; counts in the fit):", "",
                  "| call | ms | calls in the fit |", "| --- | ---: | ---: |",
                  f"| likelihood + gradient (E-step L-BFGS) | {w['parts']['likelihood + gradient'] * 1e3:.0f} "
                  f"| {w['counts']['grad']} |",
                  f"| likelihood only | {w['parts']['likelihood'] * 1e3:.0f} | {w['counts']['nll']} |",
                  f"| exact Hessians (the model's chain rule) | "
                  f"{w['parts']['exact Hessians'] * 1e3:.0f} | {w['n_hess']} |", "",
                  "- recovery r (torchem): " + ", ".join(f"{k} {v:.2f}" for k, v in w["r"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="ddm4,ddm7")
    ap.add_argument("--subjects", type=int, default=100)
    ap.add_argument("--baseline-subjects", type=int, default=3, help="subjects the baseline fits (scaled up)")
    ap.add_argument("--baseline-maxit", type=int, default=3, help="EM iterations of the baseline (scaled up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--convergence", default="npl",
                    help="torchem's EM stopping rule (default 'npl', pyEM's rule on the summed NPL, as the baseline's "
                         "pyEM uses; 'lme' keeps ddm7 creeping for hundreds of iterations while sz's variance shrinks)")
    ap.add_argument("--baseline-optimizer", choices=sorted(BASELINE_OPTIMIZERS), default="pyem1",
                    help="the baseline's BFGS settings: pyEM 1.0's (gtol and finite-difference step 1e-4, up to 2 "
                         "restarts while BFGS reports no success) or scipy's defaults")
    ap.add_argument("--parallel", type=int, default=2,
                    help="also fit on this many threads and compare with the baseline split over as many cores "
                         "(0 or 1: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()  # one-time start-up of the first Hessian in a process (autograd's batched backward)
    batched_hessian(lambda z: (z * z).sum(1), torch.zeros(2, 2, dtype=torch.float64))
    startup = time.perf_counter() - t0
    print(f"one-time start-up of the first Hessian: {startup:.1f} s (not in the fit times)", flush=True)
    sims = {}
    for name in ("ddm4", "ddm7"):  # exact first passages, 1,000 subjects x 200 trials
        params = draw_params(name, 1000, np.random.default_rng(args.seed))
        t0 = time.perf_counter()
        MODELS[name].simulate(params, ntrials=200, seed=args.seed)
        sims[name] = time.perf_counter() - t0
        print(f"simulate {name}, 1,000 subjects x 200 trials: {sims[name]:.2f} s", flush=True)
    rows = []
    for i, name in enumerate(n.strip() for n in args.models.split(",")):
        rows.append(run(name, args.subjects, DESIGNS[name][0]["ntrials"], args.baseline_subjects,
                        args.baseline_maxit, args.seed + 10 * i, args.convergence, args.parallel,
                        args.baseline_optimizer))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(rows, args.threads, startup, sims, args.convergence))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
