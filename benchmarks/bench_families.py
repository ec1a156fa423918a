"""Whole fits of the reference set (100 subjects x 96 trials of rw1a1b) with every group family.

Run: ``python benchmarks/bench_families.py``; prints a table and writes
``benchmarks/results/bench_families.md``.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import pandas as pd
import torch

from bench_fit import to_markdown
from torchem import EMModel
from torchem.models.rl import rw1a1b_fit

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "rw1a1b_100.csv"


def main() -> None:
    torch.set_num_threads(1)
    model = EMModel(pd.read_csv(DATA), rw1a1b_fit, columns=["choice", "reward"], block="block", trial="trial",
                    device="cpu")
    rows = {}
    for family in ("gaussian", "full", "laplace", "student_t", "cauchy"):
        for estep in ("laplace", "importance"):
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = model.fit(verbose=0, group=family, estep=estep)
            wall = time.perf_counter() - t0
            mu, var = res.posterior_mu.tolist(), res.posterior_var.tolist()
            spread = res.group.hyper().get("sd", res.group.hyper().get("scale")).tolist()
            rows[f"{family} ({estep})"] = {
                "loc beta": round(mu[0], 4), "loc alpha": round(mu[1], 4),
                "sd/scale beta": round(spread[0], 4), "sd/scale alpha": round(spread[1], 4),
                "var beta": round(var[0], 4), "var alpha": round(var[1], 4),
                "E-steps": res.n_iter, "converged": res.convergence, "NPL": round(float(res.NPL.sum()), 3),
                "LME": round(model.compute_lme()[1], 3),
                "warnings": len(caught), "wall s": round(wall, 2)}
            print(rows[f"{family} ({estep})"], flush=True)
    df = pd.DataFrame(rows).T
    df.index.name = "group (E-step)"
    print(df.to_string())
    out = Path(__file__).parent / "results" / "bench_families.md"
    out.write_text("# bench_families: the reference set with every group family\n\n" + to_markdown(df) + "\n")


if __name__ == "__main__":
    main()
