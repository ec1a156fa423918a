"""The ``torchem`` command: ``torchem demo``, ``torchem fit`` and ``torchem dashboard``."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from . import distributed
from .api import EMModel, convergence_text, resolve_device
from .data import parse_columns, read_table
from .models import MODELS, get_model
from .options import add_arguments, options_from_args

__all__ = ["main", "parse_columns"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _summary(model: EMModel) -> dict:
    """The group summary of a fitted model (everything but the integrated BIC, which may still fail)."""
    s = model.result.summary()
    s.update(BICint=None, BICint_nsamples=None, warnings=model.warnings, convergence=convergence_text(model.result))
    return s


def _print_summary(s: dict, seconds: float | None = None) -> None:
    print(f"subjects: {s['subjects']}   {s['convergence']}")
    table = pd.DataFrame(
        {"mu (normalized)": s["group_mu_normalized"], "sd (normalized)": np.sqrt(s["group_var_normalized"]),
         "mu (natural)": s["group_mu_natural"]},
        index=pd.Index(s["parameters"], name="parameter"),
    )
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    ibic = "failed" if s["BICint"] is None else f"{s['BICint']:.3f}"
    print(f"summed NPL: {s['NPL']:.3f}   LME (Laplace): {s['LME']:.3f}   "
          f"BICint ({s['BICint_nsamples']} samples): {ibic}")
    if s["estep_failed"] or s["hessian_not_pd"]:
        print(f"warning: {s['estep_failed']} E-step failure(s), {s['hessian_not_pd']} non-PD Hessian(s)")
    for w in s["warnings"]:
        print(f"warning: {w}")
    if seconds is not None:
        print(f"wall time: {seconds:.2f} s")


def _add_bicint(model: EMModel, s: dict, nsamples: int, seed: int) -> None:
    s["BICint"] = model.compute_integrated_bic(nsamples=nsamples, seed=seed)
    s["BICint_nsamples"] = nsamples


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
    s = _summary(model)
    _add_bicint(model, s, args.nsamples, args.seed)
    seconds = time.perf_counter() - start
    print(f"device: {model.device}, dtype: {args.dtype}")
    _print_summary(s)
    est = model.subject_params().to_numpy()
    r = [np.corrcoef(true[:, j], est[:, j])[0, 1] for j in range(2)]
    print("recovery (Pearson r, natural space): " + ", ".join(f"{n} {v:.3f}" for n, v in zip(model.param_names, r)))
    print(f"wall time (fit + LME + BICint): {seconds:.2f} s")
    return 0


def _subject_table(model: EMModel) -> pd.DataFrame:
    """The fit's per-subject table, with the normalized parameters and each subject's number of trials."""
    res = model.result
    table = res.subject_table()
    for j, name in enumerate(res.param_names):
        table[f"{name}_normalized"] = res.m[:, j].cpu().numpy()
    table["n_trials"] = res.n_obs.cpu().numpy()
    return table


def _output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """Where ``torchem fit`` writes, checked (and parent folders made) before any fitting.

    Defaults: ``<data>_<model>_params.csv`` and ``<data>_<model>_summary.json``
    in the current folder.  Refused: a path that is the input file, a folder,
    both outputs on one path, or a folder that cannot be created or written.
    """
    stem = f"{Path(args.data).stem}_{args.model}"
    out = Path(args.out) if args.out else Path(f"{stem}_params.csv")
    summary = Path(args.summary) if args.summary else Path(f"{stem}_summary.json")
    data = Path(args.data).resolve()
    if out.resolve() == summary.resolve():
        raise ValueError(f"--out and --summary are the same file ({out}); give two paths")
    for flag, path in (("--out", out), ("--summary", summary)):
        if path.resolve() == data:
            raise ValueError(f"{flag} {path} is the input file; refusing to overwrite the data")
        if path.is_dir():
            raise ValueError(f"{flag} {path} is a folder; give a file name")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"{flag} {path}: cannot create the folder {path.parent} ({err})") from None
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ValueError(f"{flag} {path}: not writable")
    return out, summary


def _write_outputs(model: EMModel, out: Path, summary_path: Path) -> dict:
    """Write the per-subject table and the summary (without the integrated BIC); return the summary."""
    s = _summary(model)
    _subject_table(model).to_csv(out)
    _write_summary(s, summary_path)
    return s


def _write_summary(s: dict, path: Path) -> None:
    with open(path, "w") as fh:
        json.dump(s, fh, indent=1)


def _fit(args: argparse.Namespace) -> int:
    options = options_from_args(args, seed=args.seed)  # bad option values are refused before any work
    out, summary_path = _output_paths(args)
    if args.nproc > 1 and not distributed.in_group():
        # K local processes form a process group; each runs this same command on its shard, rank 0 writes
        if resolve_device(args.device).type == "cuda" and args.nproc > torch.cuda.device_count():
            raise ValueError(f"--nproc {args.nproc} with CUDA needs one GPU per process; this machine has "
                             f"{torch.cuda.device_count()}")
        threads = max(1, torch.get_num_threads() // args.nproc)
        return distributed.launch(_fit, args.nproc, (args,), threads=threads)
    writer = distributed.is_writer()
    fit_func = get_model(args.model)
    if args.first_option and not fit_func.categorical:
        raise ValueError(f"--first-option shifts option codes, and {args.model} has no option-code fields "
                         f"(its inputs are {', '.join(fit_func.inputs)}); recode the data to 0/1 as the README's "
                         "data section says")
    df = read_table(args.data, sep=args.sep, na_values=args.na or ())
    columns = parse_columns(args.columns) if args.columns else list(fit_func.inputs)
    start = time.perf_counter()
    model = EMModel(df, fit_func, subject=args.subject, columns=columns, block=args.block,
                    trial=False if args.row_order else args.trial, missing=args.missing, mask=args.mask,
                    first_option=args.first_option, device=args.device, dtype=_DTYPES[args.dtype])
    try:
        model.fit(verbose=0 if args.quiet else 1, options=options)
    except BaseException:  # an error in the model, Ctrl-C: keep the last completed iteration, then stop
        if model.result is not None and writer:
            _write_outputs(model, out, summary_path)
            print(f"torchem: the fit did not finish; its last completed iteration is written to {out} and "
                  f"{summary_path} (marked stopped)", file=sys.stderr)
        raise
    # the fit is done: write what it found before anything else can fail
    s = _write_outputs(model, out, summary_path) if writer else _summary(model)
    status = 0
    try:
        _add_bicint(model, s, args.nsamples, args.seed)
    except Exception as err:  # noqa: BLE001 - the fit's outputs are kept whatever went wrong here
        s["BICint_error"] = f"{type(err).__name__}: {err}"
        print(f"torchem: error: the integrated BIC failed ({s['BICint_error']}); the fit's outputs are written",
              file=sys.stderr)
        status = 1
    if not writer:
        return status
    _write_summary(s, summary_path)
    _print_summary(s, time.perf_counter() - start)
    print(f"per-subject parameters written to {out}")
    print(f"summary written to {summary_path}")
    return status


def dashboard_notebook(data: str | None = None, sep: str | None = None) -> dict:
    """A notebook (nbformat 4, as a dict) that shows the ``FitDashboard`` on the data file ``data``.

    Without ``data`` the dashboard's Data tab takes an upload.
    """
    source = ("from torchem.data import read_table\n"
              "from torchem.widgets import FitDashboard\n"
              f"data = read_table({data!r}, sep={sep!r}) if {data!r} else None\n"
              "FitDashboard(None, data)")
    cell = {"cell_type": "code", "execution_count": None, "id": "dashboard", "metadata": {}, "outputs": [],
            "source": source}
    return {"cells": [cell], "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                         "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def _dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboard as a web app with Voila (this process becomes the Voila server)."""
    if importlib.util.find_spec("voila") is None:
        raise ValueError("torchem dashboard needs Voila: pip install voila (it comes with the dev extra)")
    data = None
    if args.data is not None:
        data = str(Path(args.data).resolve())
        if not Path(data).is_file():
            raise FileNotFoundError(f"no such data file: {args.data}")
        read_table(data, sep=args.sep)  # a file that does not read is reported here, not in the browser
    folder = Path(tempfile.mkdtemp(prefix="torchem-dashboard-"))
    notebook = folder / "torchem_dashboard.ipynb"
    notebook.write_text(json.dumps(dashboard_notebook(data, args.sep), indent=1))
    # Jupyter data (Voila's templates) of the interpreter's own installation, also from a virtual environment
    shares = [os.environ.get("JUPYTER_PATH"), *(str(Path(p) / "share" / "jupyter")
                                                for p in dict.fromkeys((sys.prefix, sys.base_prefix)))]
    env = {**os.environ, "JUPYTER_PATH": os.pathsep.join(p for p in shares if p)}
    cmd = [sys.executable, "-m", "voila", str(notebook), f"--port={args.port}", f"--Voila.ip={args.ip}",
           "--VoilaConfiguration.show_tracebacks=True"] + (["--no-browser"] if args.no_browser else [])
    print(f"torchem dashboard: serving {data or 'an upload form'} at http://{args.ip}:{args.port}/ (Ctrl-C stops)",
          flush=True)
    os.chdir(folder)
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchem", description="Hierarchical EM-MAP fits of behavioural models.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda where available)")
    common.add_argument("--dtype", default="float64", choices=sorted(_DTYPES))
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--nsamples", type=_positive, default=2000, help="draws per subject for the integrated BIC")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", parents=[common], help="simulate, fit and evaluate rw1a1b")
    d.add_argument("--subjects", type=_positive, default=100)
    f = sub.add_parser("fit", parents=[common], help="fit a long data file (one row per trial)")
    f.add_argument("data", help="data file: CSV, TSV or another delimited text file with a header line")
    f.add_argument("--model", required=True, choices=sorted(MODELS))
    f.add_argument("--sep", help="column separator (default: sniffed from the header line; 'tab' for tabs)")
    f.add_argument("--na", action="append", metavar="TEXT",
                   help="extra text that marks a missing value, e.g. --na . (repeatable)")
    f.add_argument("--subject", default="subject", help="subject column")
    f.add_argument("--columns", help="data columns in model order, comma-separated (e.g. choice,reward); "
                                     "brackets group columns into one field (e.g. '[x0,x1,x2],y')")
    f.add_argument("--block", help="block column (values reset per block)")
    f.add_argument("--trial", help="trial-order column (default: a column named like trial, trial_num, t, ... "
                                   "if the rows follow it)")
    f.add_argument("--row-order", action="store_true", help="the row order is the trial order (no trial column)")
    f.add_argument("--first-option", type=int, choices=[0, 1], default=0,
                   help="code of the first option in the choice/option columns: 1 for data coded 1/2 "
                        "(hBayesDM, MATLAB), shifted to 0/1")
    f.add_argument("--missing", choices=["error", "skip"], default="error",
                   help="skip: a missing (empty/NaN) choice marks a missed trial, skipped in the likelihood in its "
                        "place (models that define skipped trials)")
    f.add_argument("--mask", help="column that is 1 on trials to use and 0 on missed trials to skip")
    f.add_argument("--nproc", type=_positive, default=1,
                   help="local processes the fit is spread over (torch.distributed: gloo on the CPU, NCCL with "
                        "--device cuda, one GPU each); rank 0 writes the outputs")
    add_arguments(f)
    f.add_argument("--out", help="per-subject table (CSV; default <data>_<model>_params.csv); parent folders "
                                 "are created")
    f.add_argument("--summary", help="group summary (JSON; default <data>_<model>_summary.json)")
    b = sub.add_parser("dashboard", help="serve the fit dashboard as a web app (Voila) on a data file")
    b.add_argument("data", nargs="?", help="data file (CSV, TSV, ...); without it the Data tab takes an upload")
    b.add_argument("--sep", help="column separator (default: sniffed)")
    b.add_argument("--port", type=_positive, default=8866)
    b.add_argument("--ip", default="127.0.0.1", help="address to listen on (default: this machine only)")
    b.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchem`` command."""
    args = _parser().parse_args(argv)
    try:
        return {"demo": _demo, "fit": _fit, "dashboard": _dashboard}[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"torchem: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
