"""Wall time of a model-identifiability study: rw1a1b vs rw2a1b.

Usage: python benchmarks/bench_identify.py [--rounds 5] [--subjects 100] [--threads 2] [--out FILE]

Each round simulates 100 subjects x 4 blocks x 24 trials from each model and
fits both models to both data sets (4 hierarchical fits per round), scoring
each fit by LME, integrated BIC (1000 draws per subject) and pseudo-R2.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from torchem import EMModel, ModelComparison
from torchem.models.rl import rw1a1b_fit, rw2a1b_fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--subjects", type=int, default=100)
    p.add_argument("--nsamples", type=int, default=1000, help="iBIC draws per subject")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--maxit", type=int, default=100,
                   help="EM iteration cap per fit (pyEM's identify example uses 50): a model with a "
                        "parameter the data do not need (rw2a1b on rw1a1b data) has a group variance "
                        "that shrinks towards 0 for hundreds of iterations")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="append a markdown summary to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    template = [[np.zeros((1, 4), dtype=np.int64), np.zeros((1, 4))]]  # identify simulates its own data
    models = [EMModel(template, rw1a1b_fit, device=args.device), EMModel(template, rw2a1b_fit, device=args.device)]
    mc = ModelComparison(models, ["rw1a1b", "rw2a1b"])
    start = time.perf_counter()
    df = mc.identify(mi_inputs=["choices", "rewards"], nrounds=args.rounds, nsubjects=args.subjects,
                     sim_kwargs={"nblocks": 4, "ntrials": 24}, fit_kwargs={"mstep_maxit": args.maxit},
                     seed=args.seed, verbose=1,
                     bicint_kwargs={"nsamples": args.nsamples})
    seconds = time.perf_counter() - start
    fits = args.rounds * len(models) ** 2
    print(df.to_string(index=False))
    print(f"\nidentify: {args.rounds} rounds x {args.subjects} subjects x 96 trials, {fits} hierarchical fits "
          f"with LME, iBIC ({args.nsamples} draws) and pseudo-R2: {seconds:.1f} s on {args.device} "
          f"({args.threads} threads), {seconds / fits:.2f} s per fit, EM cap {args.maxit} iterations")
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(f"| identify rw1a1b vs rw2a1b | {args.rounds} rounds x {args.subjects} subjects x 96 trials "
                     f"| {fits} fits, EM cap {args.maxit} | {seconds:.1f} s | {args.device}, {args.threads} threads |\n")


if __name__ == "__main__":
    main()
