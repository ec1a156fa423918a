"""Laplace vs importance-sampled E-step on the 100-subject rw1a1b reference data.

Usage: python benchmarks/bench_estep.py [--reference DIR] [--nsamples 1000] [--threads 2] [--out FILE]

Prints wall time and group estimates (normalized space) of both E-steps and of
the exact EM fixed point computed by grid quadrature over the two parameters,
and the summed log evidence by the Laplace approximation, by importance
sampling and by quadrature.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from torchem import EMModel
from torchem.models.rl import rw1a1b_fit

DEFAULT_REF = Path(__file__).resolve().parents[2] / "shared" / "reference"


def grid_loglik(model: EMModel, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(S, G)`` log-likelihood on a 2-D grid of normalized parameters, and the ``(G, 2)`` nodes."""
    g1, g2 = np.meshgrid(grid, grid, indexing="ij")
    nodes = torch.as_tensor(np.column_stack([g1.ravel(), g2.ravel()]))
    out = []
    with torch.no_grad():
        for s in range(model.batch.n_subjects):
            d = tuple(t[s:s + 1].expand(nodes.shape[0], *t.shape[1:]) for t in model.batch.data)
            m = model.batch.mask[s:s + 1].expand(nodes.shape[0], *model.batch.mask.shape[1:])
            out.append(-rw1a1b_fit(nodes, *d, mask=m).numpy())
    return np.stack(out), nodes.numpy()


def quadrature_em(loglik: np.ndarray, nodes: np.ndarray, h: float, tol: float = 1e-10):
    """Exact EM for the diagonal Gaussian group model; returns mu, var and per-subject log evidence."""
    mu, var = np.zeros(2), np.ones(2)
    for _ in range(10_000):
        lp = loglik + (-0.5 * ((nodes - mu) ** 2 / var + np.log(2 * math.pi * var))).sum(1)
        top = lp.max(1, keepdims=True)
        w = np.exp(lp - top)
        z = w.sum(1, keepdims=True)
        w /= z
        new_mu = (w @ nodes).mean(0)
        new_var = (w @ nodes ** 2).mean(0) - new_mu ** 2
        done = max(np.abs(new_mu - mu).max(), np.abs(new_var - var).max()) < tol
        mu, var = new_mu, new_var
        if done:
            break
    log_ev = top[:, 0] + np.log(z[:, 0]) + 2 * math.log(h)
    return mu, var, log_ev


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, default=DEFAULT_REF)
    p.add_argument("--nsamples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the markdown table to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    df = pd.read_csv(args.reference / "rw1a1b_100.csv")
    model = EMModel(df, rw1a1b_fit, columns=["choice", "reward"], block="block", trial="trial", device="cpu")
    model.fit(verbose=0, mstep_maxit=3)  # one-time library initialization, not timed
    rows = []
    for estep in ("laplace", "importance"):
        start = time.perf_counter()
        res = model.fit(verbose=0, estep=estep, nsamples=args.nsamples)
        seconds = time.perf_counter() - start
        lme = model.compute_lme(method=estep if estep == "importance" else "laplace")[0].sum()
        rows.append({"E-step": estep, "wall s": seconds, "EM iterations": res.n_iter,
                     "mu beta": float(res.posterior_mu[0]), "mu alpha": float(res.posterior_mu[1]),
                     "var beta": float(res.posterior_sigma[0]), "var alpha": float(res.posterior_sigma[1]),
                     "sum log evidence": float(lme)})
    grid = np.linspace(-8.0, 8.0, 201)
    start = time.perf_counter()
    loglik, nodes = grid_loglik(model, grid)
    mu, var, log_ev = quadrature_em(loglik, nodes, grid[1] - grid[0])
    rows.append({"E-step": "grid quadrature (exact)", "wall s": time.perf_counter() - start, "EM iterations": np.nan,
                 "mu beta": mu[0], "mu alpha": mu[1], "var beta": var[0], "var alpha": var[1],
                 "sum log evidence": float(log_ev.sum())})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        cols = list(table.columns)
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, r in table.iterrows():
            lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
