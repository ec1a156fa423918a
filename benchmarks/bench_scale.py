"""Scaling: one hierarchical fit of rw1a1b at 1,000 to 1,000,000 subjects.

Each size is simulated and fitted in a fresh process (so that peak memory
does not carry over from a smaller size) and reports:

* wall time of the fit (building the batch and simulating are timed apart);
* subjects per second (subjects / fit wall time);
* peak resident memory during the fit (``VmHWM`` of ``/proc/self/status``,
  restarted after simulating and building the data through ``clear_refs``;
  else the process's peak) and the resident memory before the fit; on CUDA
  also ``torch.cuda.max_memory_allocated``;
* EM iterations (E-steps), likelihood-and-gradient evaluations of the
  E-steps (calls, and subject-evaluations: the rows of all calls summed);
* the cost per subject-iteration (fit time / (subjects x E-steps)) and per
  subject-evaluation: constant when cost grows linearly with the study.

The model is rw1a1b (two-armed bandit, Rescorla-Wagner with one learning
rate and one inverse temperature), 4 blocks x 24 trials per subject, true
normalized parameters drawn from N(0, 1) as in ``bench_fit.py``.

Run from the repository root::

    python benchmarks/bench_scale.py                                   # 1e3, 1e4, 1e5 on the CPU
    python benchmarks/bench_scale.py --sizes 1000,10000,100000,1000000 --out benchmarks/results/bench_scale.md
    python benchmarks/bench_scale.py --device cuda --dtype float32
    python benchmarks/bench_scale.py --gloo        # adds 2 gloo processes against 1 (benchmarks/bench_distributed.py)

Under ``torchrun`` the sizes run in the launched processes themselves (no
fresh process per size) and rank 0 prints and writes the table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NBLOCKS, NTRIALS = 4, 24
BETA_MAX = 20.0
SIM_BLOCK = 100_000  # subjects simulated at a time (the simulator keeps values and probabilities per trial)


# --------------------------------------------------------------------------- data
def simulate(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``choices`` ``(n, B, T)`` int64, ``rewards`` ``(n, B, T)`` float64 and the true normalized ``(n, 2)``."""
    from torchem.models.rl import rw1a1b_simulate

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2))
    natural = np.column_stack([BETA_MAX / (1.0 + np.exp(-x[:, 0])), 1.0 / (1.0 + np.exp(-x[:, 1]))])
    choices = np.empty((n, NBLOCKS, NTRIALS), dtype=np.int64)
    rewards = np.empty((n, NBLOCKS, NTRIALS))
    for lo in range(0, n, SIM_BLOCK):
        sim = rw1a1b_simulate(natural[lo:lo + SIM_BLOCK], nblocks=NBLOCKS, ntrials=NTRIALS, seed=seed + lo)
        choices[lo:lo + SIM_BLOCK], rewards[lo:lo + SIM_BLOCK] = sim["choices"], sim["rewards"]
    return choices, rewards, x


def peak_rss_bytes(field: str = "VmHWM") -> int:
    """Peak resident memory of this process (``VmHWM``, or ``field`` of /proc/self/status; ``ru_maxrss``
    where /proc is absent)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Restart ``VmHWM`` from the current resident size (Linux ``clear_refs``); ``False`` where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def fit_one(size: int, args: argparse.Namespace) -> dict:
    """Simulate, build and fit ``size`` subjects in this process; the measured figures."""
    import torch

    import torchem.optim as optim
    from torchem import EMModel, SubjectBatch, run_em
    from torchem.estep import auto_chunk_size
    from torchem.models.rl import rw1a1b_fit

    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    device = torch.device(args.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    choices, rewards, x_true = simulate(size, args.seed)
    t_sim = time.perf_counter() - t0
    # a SubjectBatch from padded tensors (every subject has all 96 trials); EMModel checks the codes
    t0 = time.perf_counter()
    batch = SubjectBatch({"choices": torch.from_numpy(choices), "rewards": torch.from_numpy(rewards)},
                         torch.ones(choices.shape, dtype=torch.bool), list(range(size)), categorical=["choices"])
    del choices, rewards
    # --pinned: the model's batch stays on the CPU (pinned by the fit) and only E-step chunks reach the device
    model = EMModel(batch, rw1a1b_fit, device="cpu" if args.pinned else device, dtype=dtype)
    t_build = time.perf_counter() - t0

    calls = {"n": 0, "rows": 0}
    plain = optim.value_and_grad

    def counted(fun, x, idx):
        calls["n"] += 1
        calls["rows"] += int(x.shape[0])
        return plain(fun, x, idx)

    optim.value_and_grad = counted  # counts every likelihood-and-gradient evaluation of the E-steps
    chunk = None if args.chunk_size in (None, "none") else (
        "auto" if args.chunk_size == "auto" else int(args.chunk_size))
    kwargs = {"chunk_size": chunk, "mstep_maxit": args.maxit}
    if args.pinned:
        kwargs["pin_data"] = True
    rss_data = peak_rss_bytes("VmRSS")  # resident now: the data and the library
    peak_reset = reset_peak_rss()  # the peak then covers the fit, not the simulation
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    load0 = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    seen = []  # the fit's thread count (torchem picks one for small chunks unless told)
    if args.pinned:
        res = run_em(model.model, model.batch, verbose=0, callback=lambda state: seen.append(torch.get_num_threads()),
                     device=device, **kwargs)
    else:
        res = model.fit(verbose=0, callback=lambda state: seen.append(torch.get_num_threads()), **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_fit, c_fit = time.perf_counter() - t0, time.process_time() - c0
    load1 = os.getloadavg()
    optim.value_and_grad = plain
    t0 = time.perf_counter()
    params = res.params_df()
    t_df = time.perf_counter() - t0
    mu = res.posterior_mu.cpu().numpy()
    row = {
        "subjects": size,
        "device": str(device),
        "dtype": args.dtype,
        "threads": seen[0] if device.type == "cpu" and seen else None,
        "chunk_size": (auto_chunk_size(model.batch, 2, dtype, device=device) if chunk == "auto" else chunk),
        "pinned": bool(args.pinned),
        "simulate_s": t_sim,
        "build_s": t_build,
        "fit_s": t_fit,
        "fit_cpu_s": c_fit,
        "subjects_per_s": size / t_fit,
        "em_iterations": int(res.n_iter),
        "converged": bool(res.convergence),
        "estep_calls": calls["n"],
        "subject_evaluations": calls["rows"],
        "us_per_subject_iteration": 1e6 * t_fit / (size * res.n_iter),
        "us_per_subject_evaluation": 1e6 * t_fit / max(calls["rows"], 1),
        "params_df_s": t_df,
        "peak_rss_gib": peak_rss_bytes() / 2**30,
        "rss_before_fit_gib": rss_data / 2**30,
        "peak_is_fit_only": peak_reset,
        "peak_cuda_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None),
        "group_mean_true": [float(v) for v in x_true.mean(0)],
        "group_mean_fit": [float(v) for v in mu],
        "load_before": load0[0],
        "load_after": load1[0],
        "estep_failed": int((~res.estep_success).sum()),
        "rows": int(params.shape[0]),
    }
    return row


# ---------------------------------------------------------------------- output
COLUMNS = [
    ("subjects", "subjects", "{:,}"),
    ("fit_s", "fit wall s", "{:.1f}"),
    ("subjects_per_s", "subjects/s", "{:,.0f}"),
    ("peak_rss_gib", "peak RSS during fit GiB", "{:.2f}"),
    ("rss_before_fit_gib", "RSS before fit GiB", "{:.2f}"),
    ("em_iterations", "EM iterations", "{}"),
    ("estep_calls", "E-step evaluations (calls)", "{:,}"),
    ("subject_evaluations", "subject-evaluations", "{:,}"),
    ("us_per_subject_iteration", "us per subject-iteration", "{:.1f}"),
    ("us_per_subject_evaluation", "us per subject-evaluation", "{:.2f}"),
    ("fit_cpu_s", "fit CPU s", "{:.1f}"),
    ("cpu_us_per_subject_iteration", "CPU us per subject-iteration", "{:.1f}"),
    ("chunk_size", "chunk size", "{}"),
    ("threads", "threads", "{}"),
    ("build_s", "build batch s", "{:.1f}"),
    ("params_df_s", "params_df s", "{:.2f}"),
    ("load_before", "load before", "{:.1f}"),
    ("load_after", "load after", "{:.1f}"),
]


def to_markdown(rows: list[dict]) -> str:
    for r in rows:  # process CPU time is what a busy machine inflates least
        r["cpu_us_per_subject_iteration"] = 1e6 * r["fit_cpu_s"] / (r["subjects"] * r["em_iterations"])
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    if any(r.get("peak_cuda_gib") is not None for r in rows):
        cols.insert(4, ("peak_cuda_gib", "peak CUDA GiB", "{:.2f}"))
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("" if v is None else (fmt.format(v) if not isinstance(v, str) else v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def linearity(rows: list[dict]) -> list[str]:
    """How the cost per subject-iteration changes from the smallest size to the others."""
    ok = [r for r in rows if "fit_s" in r]
    if len(ok) < 2:
        return []
    base = ok[0]
    out = []
    for r in ok[1:]:
        ratio = r["us_per_subject_iteration"] / base["us_per_subject_iteration"]
        cpu = (r["fit_cpu_s"] / (r["subjects"] * r["em_iterations"])) / (
            base["fit_cpu_s"] / (base["subjects"] * base["em_iterations"]))
        out.append(f"cost per subject-iteration at {r['subjects']:,} subjects is {ratio:.2f}x (wall) and "
                   f"{cpu:.2f}x (CPU time) that at {base['subjects']:,} (1.00x: linear growth)")
    return out


def environment(args: argparse.Namespace) -> list[str]:
    import torch

    return [
        f"date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, {_mem_total_gib():.0f} GiB RAM, "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        f"device {args.device}, dtype {args.dtype}, chunk_size {args.chunk_size}, threads "
        f"{args.threads if args.threads is not None else 'torchem default'}, mstep_maxit {args.maxit}"
        + (", pinned host data" if args.pinned else ""),
        f"model rw1a1b, {NBLOCKS} blocks x {NTRIALS} trials per subject; true normalized parameters ~ N(0, 1); "
        f"seed {args.seed}",
    ]


def _mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as fh:
            return int(fh.readline().split()[1]) / 2**20
    except OSError:
        return float("nan")


def _child_args(args: argparse.Namespace, size: int) -> list[str]:
    out = [sys.executable, os.path.abspath(__file__), "--one", str(size), "--device", args.device,
           "--dtype", args.dtype, "--chunk-size", str(args.chunk_size), "--seed", str(args.seed),
           "--maxit", str(args.maxit)]
    if args.threads is not None:
        out += ["--threads", str(args.threads)]
    if args.pinned:
        out.append("--pinned")
    return out


def gloo_rows(args: argparse.Namespace) -> list[str]:
    """2 gloo processes against 1 at ``--gloo-subjects`` (``compare_ranks`` of ``bench_distributed.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from bench_distributed import compare_ranks
    except ImportError as err:
        return [f"--gloo: benchmarks/bench_distributed.py with compare_ranks() is not available here ({err}); "
                "the 2-vs-1-process row needs the distributed fits"]
    out = compare_ranks(args.gloo_subjects, nprocs=(1, 2), device=args.device, dtype=args.dtype)
    return [f"{args.gloo_subjects:,} subjects in {k} process(es): {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s "
            f"CPU of rank 0, {r['subjects_per_s']:,.0f} subjects/s, {r['n_iter']} EM iterations, converged "
            f"{r['converged']}, load {float(r['load']):.1f}, largest difference from 1 process {r['max_abs_diff']:.1e}"
            for k, r in out.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000",
                    help="comma-separated subject counts (default 1000,10000,100000; add 1000000)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--chunk-size", default="auto",
                    help="E-step chunk: 'auto' (default, from free memory), 'none' (all at once) or an integer")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torchem's choice)")
    ap.add_argument("--pinned", action="store_true", help="keep the data in pinned host memory (pin_data=True)")
    ap.add_argument("--maxit", type=int, default=800, help="mstep_maxit (default 800)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gloo", action="store_true", help="also time 2 gloo processes against 1")
    ap.add_argument("--gloo-subjects", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=None, help="write the table as markdown")
    ap.add_argument("--json", type=Path, default=None,
                    help="append each size's figures to this JSON-lines file and tabulate every size in it (the "
                         "latest row per size, device and dtype): sizes can be run one at a time")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.one is not None:  # a child: one size, one JSON line
        print("RESULT " + json.dumps(fit_one(args.one, args)), flush=True)
        return 0
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    rank = int(os.environ.get("RANK", "0"))
    under_torchrun = "WORLD_SIZE" in os.environ
    env = environment(args)
    if rank == 0:
        print("\n".join(env), flush=True)
    rows = []
    for size in sizes:
        if under_torchrun:  # the launched processes fit themselves
            rows.append(fit_one(size, args))
        else:
            proc = subprocess.run(_child_args(args, size), capture_output=True, text=True)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                rows.append({"subjects": size, "error": f"exit {proc.returncode}: " + " / ".join(tail)})
            else:
                rows.append(json.loads(found[-1][len("RESULT "):]))
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
            if args.json is not None and "error" not in rows[-1]:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(rows[-1]) + "\n")
    if rank != 0:
        return 0
    if args.json is not None:
        latest = {}
        for line in args.json.read_text().splitlines():
            r = json.loads(line)
            latest[(r["subjects"], r["device"], r["dtype"])] = r
        rows = sorted(latest.values(), key=lambda r: (r["device"], r["dtype"], r["subjects"])) + [
            r for r in rows if "error" in r]
    ok = [r for r in rows if "error" not in r]
    notes = linearity(ok)
    notes += [f"{r['subjects']:,} subjects failed: {r['error']}" for r in rows if "error" in r]
    if args.json is not None:
        notes.append(f"rows from {args.json} (sizes may come from separate runs: see each row's load columns)")
    whole = [f"{r['subjects']:,}" for r in ok if not r.get("peak_is_fit_only", True)]
    if whole:
        notes.append(f"peak RSS at {', '.join(whole)} subjects is the whole process's (simulation included), "
                     "(that run did not restart the peak for the fit)")
    notes += [f"{r['subjects']:,} subjects: group mean (normalized beta, alpha) fitted "
              f"{r['group_mean_fit'][0]:+.3f}, {r['group_mean_fit'][1]:+.3f}; simulated "
              f"{r['group_mean_true'][0]:+.3f}, {r['group_mean_true'][1]:+.3f}; converged: {r['converged']}; "
              f"E-step failures {r['estep_failed']}; simulate {r['simulate_s']:.1f} s (not counted)" for r in ok]
    if all(r["device"] == "cpu" for r in ok):
        notes.append("No GPU figures are estimated from these: on a GPU the cost per subject is set by kernel "
                     "launches per trial (small chunks) and memory bandwidth (large ones), neither of which the CPU "
                     "costs measure; run this script with --device cuda (--dtype float32|float64) to measure them.")
    if args.gloo:
        notes += gloo_rows(args)
    table = to_markdown(ok)
    print("\n" + table + "\n\n" + "\n".join("* " + n for n in notes))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = " ".join(argv if argv is not None else sys.argv[1:])
        text = ["# Scaling of one hierarchical fit (rw1a1b, 96 trials)", "",
                f"Generated by `python benchmarks/bench_scale.py {cmd}`.", ""]
        text += ["- " + e for e in env] + ["", table, ""] + ["- " + n for n in notes] + [""]
        args.out.write_text("\n".join(text))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
