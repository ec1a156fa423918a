"""The ``torchem`` command: ``torchem demo`` and ``torchem fit``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .api import EMModel
from .models import MODELS, get_model

__all__ = ["main"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def parse_columns(text: str) -> list:
    """``"a,[b,c],d"`` -> ``["a", ["b", "c"], "d"]``: bracketed columns form one field."""
    out, group = [], None
    for part in (p.strip() for p in text.split(",")):
        if part.startswith("["):
            group, part = [], part[1:].strip()
        end = part.endswith("]")
        name = part[:-1].strip() if end else part
        if group is None:
            out.append(name)
        else:
            group.append(name)
            if end:
                out.append(group)
                group = None
    if group is not None:
        raise ValueError(f"unclosed '[' in --columns {text!r}")
    return out


def _summary(model: EMModel, nsamples: int, seed: int) -> dict:
    res = model.result
    lap, lme, good = model.compute_lme()
    natural_mu = [float(t(v)) for t, v in zip(model.model.param_xform, res.posterior_mu.cpu())]
    return {
        "subjects": res.n_subjects,
        "parameters": res.param_names,
        "converged": bool(res.convergence),
        "em_iterations": res.n_iter,
        "group_mu_normalized": res.posterior_mu.cpu().tolist(),
        "group_var_normalized": res.posterior_sigma.cpu().tolist(),
        "group_mu_natural": natural_mu,
        "NPL": float(res.NPL.sum()),
        "LME": lme,
        "BICint": model.compute_integrated_bic(nsamples=nsamples, seed=seed),
        "BICint_nsamples": nsamples,
        "estep_failed": int((~res.estep_success).sum()),
        "hessian_not_pd": int((~res.hessian_ok).sum()),
    }


def _print_summary(s: dict, seconds: float | None = None) -> None:
    print(f"subjects: {s['subjects']}   EM iterations: {s['em_iterations']}   converged: {s['converged']}")
    table = pd.DataFrame(
        {"mu (normalized)": s["group_mu_normalized"], "sd (normalized)": np.sqrt(s["group_var_normalized"]),
         "mu (natural)": s["group_mu_natural"]},
        index=pd.Index(s["parameters"], name="parameter"),
    )
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"summed NPL: {s['NPL']:.3f}   LME (Laplace): {s['LME']:.3f}   "
          f"BICint ({s['BICint_nsamples']} samples): {s['BICint']:.3f}")
    if s["estep_failed"] or s["hessian_not_pd"]:
        print(f"warning: {s['estep_failed']} E-step failure(s), {s['hessian_not_pd']} non-PD Hessian(s)")
    if seconds is not None:
        print(f"wall time: {seconds:.2f} s")


def _demo(args: argparse.Namespace) -> int:
    from .models.rl import rw1a1b_fit, rw1a1b_simulate
    rng = np.random.default_rng(args.seed)
    norm = rng.standard_normal((args.subjects, 2))
    true = np.column_stack([20 / (1 + np.exp(-norm[:, 0])), 1 / (1 + np.exp(-norm[:, 1]))])
    sim = rw1a1b_simulate(true, nblocks=4, ntrials=24, seed=args.seed)
    print(f"torchem demo: rw1a1b, {args.subjects} simulated subjects x 4 blocks x 24 trials")
    start = time.perf_counter()
    model = EMModel([[c, r] for c, r in zip(sim["choices"], sim["rewards"])], rw1a1b_fit,
                    device=args.device, dtype=_DTYPES[args.dtype])
    model.fit(verbose=0 if args.quiet else 1, seed=args.seed)
    s = _summary(model, args.nsamples, args.seed)
    seconds = time.perf_counter() - start
    print(f"device: {model.device}, dtype: {args.dtype}")
    _print_summary(s)
    est = model.subject_params().to_numpy()
    r = [np.corrcoef(true[:, j], est[:, j])[0, 1] for j in range(2)]
    print("recovery (Pearson r, natural space): " + ", ".join(f"{n} {v:.3f}" for n, v in zip(model.param_names, r)))
    print(f"wall time (fit + LME + BICint): {seconds:.2f} s")
    return 0


def _fit(args: argparse.Namespace) -> int:
    df = pd.read_csv(args.data)
    fit_func = get_model(args.model)
    columns = parse_columns(args.columns) if args.columns else list(fit_func.inputs)
    start = time.perf_counter()
    model = EMModel(df, fit_func, subject=args.subject, columns=columns, block=args.block, trial=args.trial,
                    device=args.device, dtype=_DTYPES[args.dtype])
    res = model.fit(verbose=0 if args.quiet else 1, seed=args.seed, mstep_maxit=args.maxit, group=args.group)
    s = _summary(model, args.nsamples, args.seed)
    seconds = time.perf_counter() - start
    lap, _, _ = model.compute_lme()
    table = res.params_df()
    for j, name in enumerate(res.param_names):
        table[f"{name}_normalized"] = res.m[:, j].cpu().numpy()
    table["NLL"] = res.NLL.cpu().numpy()
    table["NPL"] = res.NPL.cpu().numpy()
    table["LME_laplace"] = lap
    table["n_trials"] = res.n_obs.cpu().numpy()
    table["hessian_ok"] = res.hessian_ok.cpu().numpy()
    table["estep_success"] = res.estep_success.cpu().numpy()
    _print_summary(s, seconds)
    if args.out:
        table.to_csv(args.out)
        print(f"per-subject parameters written to {args.out}")
    if args.summary:
        with open(args.summary, "w") as fh:
            json.dump(s, fh, indent=1)
        print(f"summary written to {args.summary}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchem", description="Hierarchical EM-MAP fits of behavioural models.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    common.add_argument("--dtype", default="float64", choices=sorted(_DTYPES))
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--nsamples", type=int, default=2000, help="draws per subject for the integrated BIC")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", parents=[common], help="simulate, fit and evaluate rw1a1b")
    d.add_argument("--subjects", type=int, default=100)
    f = sub.add_parser("fit", parents=[common], help="fit a long CSV (one row per trial)")
    f.add_argument("data", help="CSV file")
    f.add_argument("--model", required=True, choices=sorted(MODELS))
    f.add_argument("--subject", default="subject", help="subject column")
    f.add_argument("--columns", help="data columns in model order, comma-separated (e.g. choice,reward); "
                                     "brackets group columns into one field (e.g. '[x0,x1,x2],y')")
    f.add_argument("--block", help="block column (values reset per block)")
    f.add_argument("--trial", help="trial-order column")
    f.add_argument("--group", default="diag", choices=["diag", "full"], help="group covariance")
    f.add_argument("--maxit", type=int, default=800, help="maximum EM iterations")
    f.add_argument("--out", help="write per-subject parameters to this CSV")
    f.add_argument("--summary", help="write the group summary to this JSON file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchem`` command."""
    args = _parser().parse_args(argv)
    try:
        return _demo(args) if args.command == "demo" else _fit(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"torchem: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
