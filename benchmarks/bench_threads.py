"""Intra-op threads on small fits, and the one-time start-up of the first fit.

Fits rw1a1b (96 trials) to 100 and 1,000 simulated subjects with 10 plain EM
iterations, on one thread and on ``--threads`` threads (each twice, after a
warm-up fit), and times the first fit in a fresh process against the second
(the one-time ``torch.func`` tracing cost).  Prints subjects per second and
the machine's load average next to every figure: on a shared machine the
difference between thread counts depends on what else runs.

Run: ``python benchmarks/bench_threads.py [--threads 2]``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch

from torchem import EMModel
from torchem.models.rl import rw1a1b_fit, rw1a1b_simulate


def bandit(n: int, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    params = np.column_stack([rng.uniform(2, 12, n), rng.uniform(0.1, 0.9, n)])
    sim = rw1a1b_simulate(params, nblocks=4, ntrials=24, seed=seed)
    return [[c, r] for c, r in zip(sim["choices"], sim["rewards"])]


def startup() -> None:
    model = EMModel(bandit(100), rw1a1b_fit, device="cpu")
    for label in ("first fit", "second fit"):
        t = time.perf_counter()
        model.fit(verbose=0, mstep_maxit=3, accelerate=None)
        print(f"  {label}: {time.perf_counter() - t:.2f} s (3 EM iterations, 100 subjects)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--startup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup:
        startup()
        return
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print("start-up in a fresh process:", flush=True)
    subprocess.run([sys.executable, __file__, "--startup"], check=True)
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
