"""Intra-op threads on small fits, and the one-time start-up of the first fit.

Fits rw1a1b (96 trials) to 100 and 1,000 simulated subjects with 10 plain EM
iterations, on one thread and on ``--threads`` threads (each twice, after a
warm-up fit), and times the first fit in a fresh process against the second
(the one-time start-up cost), after timing ``import torch`` and ``import
torchem`` there.  Prints subjects per second and the machine's load average
next to every figure: on a shared machine the difference between thread
counts depends on what else runs.  ``--burn K`` runs K CPU-burning processes
alongside (a competing load); ``--startup-only`` times only the start-up,
``--repeats`` times.

Run: ``python benchmarks/bench_threads.py [--threads 2] [--burn 2] [--startup-only --repeats 3]``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np


def bandit(n: int, seed: int = 1) -> list:
    from torchem.models.rl import rw1a1b_simulate

    rng = np.random.default_rng(seed)
    params = np.column_stack([rng.uniform(2, 12, n), rng.uniform(0.1, 0.9, n)])
    sim = rw1a1b_simulate(params, nblocks=4, ntrials=24, seed=seed)
    return [[c, r] for c, r in zip(sim["choices"], sim["rewards"])]


def startup() -> None:
    """In a fresh process: import times, then the first and the second 3-iteration fit of 100 subjects."""
    import warnings

    warnings.simplefilter("ignore", RuntimeWarning)  # 3 iterations do not converge
    t = time.perf_counter()
    import torch  # noqa: F401

    t_torch = time.perf_counter() - t
    t = time.perf_counter()
    from torchem import EMModel
    from torchem.models.rl import rw1a1b_fit

    t_torchem = time.perf_counter() - t
    model = EMModel(bandit(100), rw1a1b_fit, device="cpu")
    fits = []
    for _ in range(2):
        t = time.perf_counter()
        model.fit(verbose=0, mstep_maxit=3, accelerate=None)
        fits.append(time.perf_counter() - t)
    print(f"  import torch {t_torch:.2f} s, import torchem {t_torchem:.2f} s; first fit {fits[0]:.2f} s, second "
          f"fit {fits[1]:.2f} s (3 EM iterations, 100 subjects; load {os.getloadavg()[0]:.1f})", flush=True)


def burn() -> None:
    """A competing load: one core kept busy until killed."""
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2**31


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--burn", type=int, default=0, help="CPU-burning processes run alongside (default 0)")
    parser.add_argument("--startup-only", action="store_true", help="time only the start-up")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes timed for the start-up")
    parser.add_argument("--startup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--burner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup:
        startup()
        return
    if args.burner:
        burn()
        return
    burners = [subprocess.Popen([sys.executable, __file__, "--burner"]) for _ in range(args.burn)]
    try:
        if burners:
            time.sleep(5)  # let the load settle
        run(args)
    finally:
        for p in burners:
            p.kill()


def run(args: argparse.Namespace) -> None:
    import torch  # noqa: F401

    from torchem import EMModel
    from torchem.models.rl import rw1a1b_fit

    print(f"load average before: {os.getloadavg()[0]:.1f}; {args.burn} CPU-burning process(es) alongside")
    print("start-up in a fresh process:", flush=True)
    for _ in range(args.repeats):
        subprocess.run([sys.executable, __file__, "--startup"], check=True)
    if args.startup_only:
        return
    for n in (100, 1000):
        model = EMModel(bandit(n), rw1a1b_fit, device="cpu")
        model.fit(verbose=0, mstep_maxit=2, num_threads=1)
        for threads in (1, args.threads, 1, args.threads):
            t = time.perf_counter()
            model.fit(verbose=0, mstep_maxit=10, accelerate=None, num_threads=threads)
            dt = time.perf_counter() - t
            print(f"{n:5d} subjects, {threads} thread(s): {dt:6.2f} s, {10 * n / dt:8.0f} subject-iterations/s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
