"""Benchmark: what each step of moving a pyEM model to torchem buys, on the 100-subject reference set.

Run by hand from the repository root::

    python benchmarks/bench_pyem_style.py [--baseline-subjects 100] [--threads 2] [--out FILE]

The reference data (``tests/data/rw1a1b_100.csv``: 100 subjects x 4 blocks x
24 trials of rw1a1b) are fitted by hierarchical EM in this process with the
three forms of the worked example in ``docs/pyem_style_rw.py``:

* **baseline**: the pyEM-style numpy function ``rw_fit_numpy`` as pyEM uses
  it: ``scipy.optimize.minimize(method="BFGS")`` per subject with
  finite-difference gradients, a fresh start per subject and E-step, the
  M-step from BFGS's ``hess_inv``, one core (above ``--baseline-subjects``
  subjects it is scaled linearly);
* **step 1** ``rw_fit_torch``: torch operations, pyEM's signature, one
  subject -- torchem batches it with ``torch.func.vmap``;
* **step 2** ``rw_fit_batched``: torchem's batched contract with a mask;
* **library** ``torchem.models.rl.rw1a1b_fit`` (trial loop over blocks side
  by side, the same model).

Accuracy is reported against pyEM 1.0.1's own fit of the same data
(``tests/data/rw1a1b_100_pyem.json``, which also records pyEM's wall time).
Every torchem fit uses the same options (defaults), after a warm-up fit that
is not counted.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs"))

import pyem_style_rw as example  # noqa: E402
from bench_fit import baseline_em, neg_log_prior, to_markdown  # noqa: E402

from torchem import EMModel  # noqa: E402
from torchem.models.rl import rw1a1b_fit  # noqa: E402

DATA = ROOT / "tests" / "data"


def load_reference() -> tuple[list, np.ndarray, np.ndarray, dict]:
    """pyEM-style ``all_data`` (choices coded 0 = 'A', 1 = 'B'), choices and rewards ``(S, B, T)``, pyEM's fit."""
    df = pd.read_csv(DATA / "rw1a1b_100.csv").sort_values(["subject", "block", "trial"])
    S, B = df.subject.nunique(), df.block.nunique()
    choices = (df.choice.to_numpy() == "B").astype(np.int64).reshape(S, B, -1)
    rewards = df.reward.to_numpy().reshape(S, B, -1)
    with open(DATA / "rw1a1b_100_pyem.json") as fh:
        ref = json.load(fh)
    return [[c, r] for c, r in zip(choices, rewards)], choices, rewards, ref


def pyem_style_npl(params, choices, rewards, mu, sigma) -> float:
    """One subject's negative log posterior with the pyEM-style numpy likelihood (what pyEM minimizes)."""
    with np.errstate(over="ignore"):  # finite differences may probe extreme values
        return example.rw_fit_numpy(params, choices, rewards, output="nll") + neg_log_prior(params, mu, sigma)


def torchem_fit(all_data: list, fit_func) -> tuple[float, object]:
    t0 = time.perf_counter()
    model = EMModel(all_data, fit_func, ["beta", "alpha"], device="cpu")
    res = model.fit(verbose=0)
    return time.perf_counter() - t0, res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-subjects", type=int, default=100, help="subjects the baseline fits (scaled up)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write a markdown table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    all_data, choices, rewards, ref = load_reference()
    S = len(all_data)
    pyem_m = np.asarray(ref["subject_map_normalized"])
    load0 = os.getloadavg()[0]

    t0 = time.perf_counter()
    EMModel(all_data[:8], example.rw_fit_torch, ["beta", "alpha"]).fit(verbose=0, mstep_maxit=3)
    EMModel(all_data[:8], example.rw_fit_batched, ["beta", "alpha"]).fit(verbose=0, mstep_maxit=3)
    print(f"warm-up {time.perf_counter() - t0:.2f} s (not counted)", flush=True)

    rows = [{"form": "pyEM 1.0.1 itself (2 cores, joblib; recorded with the reference)",
             "wall s": ref["fit_wall_s"], "EM iterations": "", "mu": ref["group_mu_normalized"],
             "var": ref["group_var_normalized"], "summed NPL": ref["NPL_sum"], "max abs(MAP - pyEM MAP)": 0.0}]
    nb = min(S, args.baseline_subjects)
    t0 = time.perf_counter()
    base = baseline_em(choices[:nb], rewards[:nb], np.random.default_rng(args.seed), objective=pyem_style_npl)
    tb = (time.perf_counter() - t0) * S / nb
    rows.append({"form": "baseline: rw_fit_numpy + scipy BFGS per subject (1 core)"
                 + (f", scaled x{S / nb:g}" if nb < S else "")
                 + ("" if base["converged"] else ", NOT converged"), "wall s": tb, "EM iterations": base["n_iter"],
                 "mu": base["mu"], "var": base["sigma"], "summed NPL": base["npl"] if nb == S else np.nan,
                 "max abs(MAP - pyEM MAP)": float(np.abs(base["m"] - pyem_m[:nb]).max())})
    print(f"baseline {tb:.1f} s", flush=True)
    for label, f in (("step 1: rw_fit_torch (pyEM signature, vmap)", example.rw_fit_torch),
                     ("step 2: rw_fit_batched (batched, mask)", example.rw_fit_batched),
                     ("library: torchem.models.rl.rw1a1b_fit", rw1a1b_fit)):
        t, res = torchem_fit(all_data, f)
        rows.append({"form": label, "wall s": t, "EM iterations": res.n_iter, "mu": res.posterior_mu.numpy(),
                     "var": res.posterior_var.numpy(), "summed NPL": float(res.NPL.sum()),
                     "max abs(MAP - pyEM MAP)": float(np.abs(res.m.numpy() - pyem_m).max())})
        print(f"{label}: {t:.2f} s", flush=True)
    load1 = os.getloadavg()[0]
    for r in rows:
        r["s per EM iteration"] = f"{r['wall s'] / r['EM iterations']:.3f}" if r["EM iterations"] else ""
        r["speed-up vs baseline"] = f"{tb / r['wall s']:.1f}x"
        r["wall s"] = f"{r['wall s']:.2f}"
        r["mu"] = ", ".join(f"{v:+.4f}" for v in r["mu"])
        r["var"] = ", ".join(f"{v:.4f}" for v in r["var"])
        r["summed NPL"] = f"{r['summed NPL']:.3f}"
        r["max abs(MAP - pyEM MAP)"] = f"{r['max abs(MAP - pyEM MAP)']:.1e}"
    table = pd.DataFrame(rows).set_index("form")
    env = [f"date: {_dt.datetime.now().isoformat(timespec='seconds')}",
           f"machine: {platform.machine()}, {os.cpu_count()} CPU cores; torch {torch.__version__} "
           f"({args.threads} threads), numpy {np.__version__}, scipy {scipy.__version__}",
           f"1-min load average {load0:.2f} at start, {load1:.2f} at end"]
    print("\n".join(env))
    print(table.to_string())
    if args.out is not None:
        cmd = " ".join(["python benchmarks/bench_pyem_style.py", *(sys.argv[1:] if argv is None else argv)])
        lines = ["# Moving a pyEM model to torchem: speed and accuracy of each step", "",
                 f"Generated by `{cmd}`.", ""] + ["- " + e for e in env] + [""]
        lines.append(to_markdown(table))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
