"""Parameter recovery of every library model: simulate 200 subjects, fit, Pearson r per parameter.

Run from the repository root::

    python benchmarks/recovery_table.py                       # all models, writes benchmarks/results/recovery_table.md
    python benchmarks/recovery_table.py --models hybrid_mbmf,model_based

For each model in ``torchem.models.MODELS`` the generating parameters are
drawn in normalized space from a group distribution (below), mapped through
the model's transforms, simulated with the model's default task design,
and fitted with ``EMModel.recover``.  r is Pearson's correlation between the
generating and the estimated natural-space parameters.

Group distributions (normalized space, independent normals): ``GROUPS``
below, N(0, 1) for every parameter it does not list.  Highlights: bandit
and social-learning models N(0, 1) throughout (beta = norm2beta: median 10);
two-step log beta1 ~ N(log 5, 0.5), log beta2 ~ N(log 4, 0.5), rep ~ N(0.2,
0.3), close to Daw et al. (2011); regression weights N(0, 1) with noise SD
about 1; discounting rates centred where the default payout ladders put the
switch points (e.g. hyperbolic k around 0.05 per unit of social distance or
delay); drift-diffusion models around pyEM's simulated set (medians v_coef
1.5, a 1.8, t0 0.3 s, z 0.5, sv 0.8, st 0.15 s, sz 0.25), 100 subjects each
(``NSUBJECTS``).

Every fit runs EM to convergence (``--maxit`` caps it; the table marks a
fit that hit the cap).
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchem import EMModel  # noqa: E402
from torchem.models import MODELS  # noqa: E402

TWOSTEP = ("hybrid_mbmf", "model_based", "sarsa_lambda")
#: name -> (simulator design kwargs, description)
DESIGNS = {
    "rw1a1b": ({"nblocks": 4, "ntrials": 24}, "4 blocks x 24 trials, reward p 0.8 / 0.2"),
    "rw2a1b": ({"nblocks": 4, "ntrials": 24}, "4 blocks x 24 trials, reward p 0.8 / 0.2"),
    "rw3a1b": ({"nblocks": 9, "ntrials": 16}, "9 blocks x 16 trials (3 per recipient), p 0.75 / 0.25"),
    "rw4a1b": ({"nblocks": 12, "ntrials": 20}, "12 blocks x 20 trials, one option pair per block"),
    **{n: ({"ntrials": 200}, "200 trials, drifting reward probabilities") for n in TWOSTEP},
    "bayes": ({"nblocks": 10, "ntrials": 15}, "10 blocks x 15 fish"),
    **{n: ({"ntrials": 100}, "100 trials, intercept + 2 N(0, 1) predictors")
       for n in ("glm", "glm_decay", "logit", "logit_decay", "glm_ar")},
    "sdt": ({"ntrials": 200}, "200 trials, half old"),
    "pt": ({"ntrials": 150}, "150 gambles (1:1:3 gain, loss, mixed)"),
    **{n: ({}, "7 distances x 9 payouts") for n in ("sd_hyp_wk", "sd_hyp_k", "sd_par_k", "sd_lin_k")},
    "td_hyp_k": ({}, "7 delays x 9 payouts"),
    "prd_hyp_k": ({}, "7 probabilities x 9 payouts"),
    "ed_par_k": ({}, "7 effort levels x 9 payouts"),
    "ped_par_k": ({}, "14 blocks (7 efforts x self/other) x 9 payouts"),
    "ped_par_2k": ({}, "14 blocks (7 efforts x self/other) x 9 payouts"),
    "ddm4": ({"ntrials": 150}, "150 trials, high vs low value (pyEM's design)"),
    "ddm4_lotto": ({"ntrials": 150}, "150 trials, risky vs safe (pyEM's design)"),
    "ddm7": ({"ntrials": 500}, "500 trials, high vs low value"),
    "ddm7_lotto": ({"ntrials": 500}, "500 trials, risky vs safe"),
    "rlddm": ({"nblocks": 4, "ntrials": 30}, "4 blocks x 30 trials, reward p 0.8 / 0.2 (better option alternates)"),
}
#: Subjects per model where not ``--subjects`` (the drift-diffusion studies: 100 subjects each).
NSUBJECTS = {"ddm4": 100, "ddm4_lotto": 100, "ddm7": 100, "ddm7_lotto": 100, "rlddm": 100}

_K = {"k": (float(np.log(0.05 / 19.95)), 1.0)}  # norm2beta: k around 0.05 (0.02-0.14)
# drift-diffusion: medians v_coef 1.5, a 1.8, t0 0.3 s, z 0.5, sv 0.8, st 0.15 s, sz 0.25 (pyEM's simulated set:
# v_coef 1.76 +- 0.49, a 1.79 +- 0.43, t0 0.28 +- 0.08, z 0.51 +- 0.08)
_DDM = {"v_coef": (1.5, 0.5), "a": (-0.2, 0.4), "t0": (2.6, 0.4), "z": (0.0, 0.3), "sv": (-0.75, 0.5),
        "st": (-0.5, 0.5), "sz": (-0.95, 0.5)}
#: Normalized group mean and SD of the generating parameters, where not N(0, 1).
GROUPS = {
    **{n: {"beta1": (np.log(5.0), 0.5), "beta2": (np.log(4.0), 0.5), "rep": (0.2, 0.3)} for n in TWOSTEP},
    "bayes": {"lambda1": (0.5, 1.0)},
    "glm": {"sigma": (0.0, 0.3)},
    "logit": {"b0": (0.0, 1.5), "b1": (0.0, 1.5), "b2": (0.0, 1.5)},
    "glm_decay": {"sigma": (0.0, 0.3)},
    "glm_ar": {"phi": (0.0, 0.8), "sigma": (0.0, 0.3)},
    "sdt": {"dprime": (np.log(1.5), 0.4), "criterion": (0.0, 0.5)},
    "pt": {"alpha": (1.4, 0.5), "beta": (1.4, 0.5), "lambda": (float(np.log(2.0 / 18.0)), 0.4),
           "gamma": (0.85, 0.5), "mu": (float(np.log(0.3 / 19.7)), 0.5)},
    "sd_hyp_wk": {"w_other": (float(np.log(1.0 / 19.0)), 0.5), **_K},
    "sd_hyp_k": _K,
    "sd_par_k": {"k": (float(np.log(0.002 / 19.998)), 1.0)},  # k N^2, N up to 100
    "sd_lin_k": {"k": (float(np.log(0.5 / 19.5)), 1.0)},  # k N
    "td_hyp_k": _K,
    "prd_hyp_k": {"k": (float(np.log(1.0 / 19.0)), 1.0)},  # odds against, 0.05-19
    "ed_par_k": {"k": (float(np.log(2.0 / 18.0)), 0.8)},  # k E^2, E 1-7
    "ped_par_k": {"k": (float(np.log(2.0 / 18.0)), 0.8)},
    "ped_par_2k": {"k_self": (float(np.log(2.0 / 18.0)), 0.8), "k_other": (float(np.log(3.0 / 17.0)), 0.8)},
    **{n: _DDM for n in ("ddm4", "ddm4_lotto", "ddm7", "ddm7_lotto")},
    "rlddm": {**_DDM, "v_coef": (4.0, 1.0), "alpha": (-0.5, 0.8)},
}


def group_distribution(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Normalized mean and SD of the generating parameters of model ``name``."""
    names = MODELS[name].param_names
    spec = GROUPS.get(name, {})
    mu = np.array([spec.get(p, (0.0, 1.0))[0] for p in names], dtype=float)
    sd = np.array([spec.get(p, (0.0, 1.0))[1] for p in names], dtype=float)
    return mu, sd


def draw_params(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, P)`` natural generating parameters of model ``name``."""
    fit = MODELS[name]
    mu, sd = group_distribution(name)
    x = torch.as_tensor(mu + sd * rng.standard_normal((n, len(mu))))
    return torch.stack([t(x[:, j]) for j, t in enumerate(fit.param_xform)], -1).numpy()


def template(name: str) -> list:
    """A one-subject data set of model ``name`` (its default design), to build the ``EMModel`` from."""
    fit = MODELS[name]
    mu, _ = group_distribution(name)
    x = torch.as_tensor(mu)
    natural = torch.stack([t(x[j]) for j, t in enumerate(fit.param_xform)]).numpy()[None]
    sim = fit.simulate(natural, seed=0, **DESIGNS[name][0])
    return [[sim[k][0] for k in fit.inputs]]


def run(name: str, nsubjects: int, seed: int, maxit: int, convergence: str | None = None) -> dict:
    fit = MODELS[name]
    nsubjects = NSUBJECTS.get(name, nsubjects)
    rng = np.random.default_rng(seed)
    true = draw_params(name, nsubjects, rng)
    design, text = DESIGNS[name]
    fit_kwargs = {"mstep_maxit": maxit, "convergence": convergence}
    model = EMModel(template(name), fit, device="cpu")
    t0 = time.perf_counter()
    rec = model.recover(true, seed=seed + 1, fit_kwargs=fit_kwargs, **design)
    seconds = time.perf_counter() - t0
    res = rec["fit_result"]
    return {"model": name, "design": text, "nsubjects": nsubjects,
            "r": dict(zip(rec["param_names"], rec["correlation"])),
            "seconds": seconds, "iterations": res.n_iter, "converged": bool(res.convergence)}


def markdown(rows: list[dict], nsubjects: int) -> str:
    lines = [f"| model | design ({nsubjects} subjects) | Pearson r per parameter | EM iterations | fit s |",
             "| --- | --- | --- | ---: | ---: |"]
    for r in rows:
        rs = ", ".join(f"{k} {v:.2f}" for k, v in r["r"].items())
        it = f"{r['iterations']}" + ("" if r["converged"] else " (cap)")
        design = r["design"] if r["nsubjects"] == nsubjects else f"{r['nsubjects']} subjects, {r['design']}"
        lines.append(f"| `{r['model']}` | {design} | {rs} | {it} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated model names (default: all)")
    ap.add_argument("--subjects", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--maxit", type=int, default=800, help="EM iteration cap of every fit")
    ap.add_argument("--convergence", default=None, help="EM stopping rule of every fit (default: the engine's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "recovery_table.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; available: {', '.join(MODELS)}")
    t_all = time.perf_counter()
    rows = []
    for i, name in enumerate(names):
        row = run(name, args.subjects, args.seed + 10 * i, args.maxit, args.convergence)
        rows.append(row)
        print(f"{name:13s} {row['seconds']:6.1f} s  {row['iterations']:3d} it  "
              + "  ".join(f"{k} {v:.3f}" for k, v in row["r"].items()), flush=True)
    wall = time.perf_counter() - t_all
    table = markdown(rows, args.subjects)
    env = (f"{_dt.date.today().isoformat()}, {platform.machine()} with {os.cpu_count()} CPU cores "
           f"(shared), torch {torch.__version__}, {args.threads} threads; total {wall:.0f} s; "
           f"1-min load average at the end {os.getloadavg()[0]:.1f}")
    print("\n" + table + "\n\n" + env)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        text = ["# Parameter recovery of the library models", "",
                "Generated by `python benchmarks/recovery_table.py"
                + (" " + " ".join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else "")
                + "`; generating distributions in the script's docstring.", "", table, "", "- " + env,
                f"- EM capped at {args.maxit} iterations ('(cap)': not converged by then).",
                ""]
        args.out.write_text("\n".join(text))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
