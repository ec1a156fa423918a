"""One process against several: a hierarchical fit sharded over a torch.distributed process group.

Fits rw1a1b (4 blocks x 24 trials) to ``--subjects`` simulated subjects
(default 100,000) in one process and in K gloo processes on the CPU (one
intra-op thread each), and prints the wall time of the fit (from a barrier
after the data are built to the end of the fit, without process start-up),
rank 0's CPU time, subjects per second, EM iterations (after a small warm-up fit in every
process) and the largest difference of the
estimates (MAPs, group means and variances, summed Laplace log evidence)
from the one-process fit.  The machine's load average is printed next to
every figure: on a shared machine the speed-up depends on what else runs.

Run: ``python benchmarks/bench_distributed.py [--subjects 100000] [--nproc 1 2]``.
On K GPUs: ``torchrun --nproc_per_node K benchmarks/bench_distributed.py --device cuda``
(each rank fits its shard on ``cuda:LOCAL_RANK``; rank 0 prints).

``compare_ranks(n_subjects, nprocs=(1, 2))`` returns the figures as a dict
(imported by the scale benchmark).
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from torchem import EMModel, distributed
from torchem.models.rl import rw1a1b_fit, rw1a1b_simulate

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def bandit(n: int, seed: int = 1) -> list:
    """pyEM-style data of ``n`` simulated rw1a1b subjects (4 blocks x 24 trials)."""
    rng = np.random.default_rng(seed)
    params = np.column_stack([rng.uniform(2, 12, n), rng.uniform(0.1, 0.9, n)])
    sim = rw1a1b_simulate(params, nblocks=4, ntrials=24, seed=seed)
    return [[c, r] for c, r in zip(sim["choices"], sim["rewards"])]


def fit_once(n_subjects: int, device: str = "cpu", dtype: str = "float64", seed: int = 1,
             fit_kwargs: dict | None = None) -> dict:
    """Build the data and fit (in this process, or as one rank of a process group); the fit's figures."""
    model = EMModel(bandit(n_subjects, seed), rw1a1b_fit, device=device, dtype=_DTYPES[dtype])
    with distributed.local(), warnings.catch_warnings():  # a process's one-time torch.func tracing is not timed
        warnings.simplefilter("ignore")
        model.with_data(bandit(50, seed + 1)).fit(verbose=0, mstep_maxit=2)
    if distributed.context(model.device) is not None:  # joins (or starts, under torchrun) the process group
        dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    res = model.fit(**{"verbose": 0, **(fit_kwargs or {})})
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu, "n_iter": res.n_iter,
            "converged": res.convergence,
            "m": res.m.detach().cpu().numpy(), "mu": res.posterior_mu.detach().cpu().numpy(),
            "var": res.posterior_var.detach().cpu().numpy(), "lme": model.compute_lme()[1],
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "load": os.getloadavg()[0]}


def compare_ranks(n_subjects: int, nprocs: Sequence[int] = (1, 2), *, device: str = "cpu", dtype: str = "float64",
                  seed: int = 1, threads: int = 1, fit_kwargs: dict | None = None) -> dict:
    """Fit the same data in 1 and in K local processes (gloo on the CPU, NCCL on ``cuda:rank``).

    Returns
    -------
    dict
        ``{K: {"seconds", "cpu_seconds", "subjects_per_s", "n_iter", "converged", "load", "max_abs_diff"}}``:
        fit wall time, CPU time of rank 0's process (its share of the work, which other processes on the
        machine do not inflate), and ``max_abs_diff`` the largest difference of MAPs, group means and
        variances and the summed LME from the first entry of ``nprocs``.
    """
    out, ref = {}, None
    for k in nprocs:
        args = (n_subjects, device, dtype, seed, fit_kwargs)
        if k == 1:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                r = fit_once(*args)
            finally:
                torch.set_num_threads(before)
        else:
            r = distributed.launch(fit_once, k, args, threads=threads)
        ref = r if ref is None else ref
        diff = max(float(np.abs(r[key] - ref[key]).max()) for key in ("m", "mu", "var"))
        out[k] = {"seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"],
                  "subjects_per_s": n_subjects / r["seconds"], "n_iter": r["n_iter"],
                  "converged": r["converged"], "load": r["load"],
                  "max_abs_diff": max(diff, abs(r["lme"] - ref["lme"]))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=100_000)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=sorted(_DTYPES))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--chunk-size", type=int, default=None)
    args = parser.parse_args()
    kwargs = {"chunk_size": args.chunk_size}
    if distributed.in_group():  # started by torchrun: this run is one of the K ranks
        r = fit_once(args.subjects, args.device, args.dtype, fit_kwargs=kwargs)
        if distributed.is_writer():
            print(f"{r['world_size']} ranks ({args.device}, {args.dtype}), {args.subjects} subjects: "
                  f"{r['seconds']:.1f} s, {args.subjects / r['seconds']:.0f} subjects/s, {r['n_iter']} EM iterations")
        return
    print(f"rw1a1b, {args.subjects} subjects x 96 trials, {args.device} {args.dtype}, {args.threads} thread(s) per "
          f"process; load average before: {os.getloadavg()[0]:.1f}", flush=True)
    res = compare_ranks(args.subjects, args.nproc, device=args.device, dtype=args.dtype, threads=args.threads,
                        fit_kwargs=kwargs)
    print("| processes | fit wall time | CPU time of rank 0 | subjects / s | EM iterations | load average "
          "| max difference from 1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k, r in res.items():
        print(f"| {k} | {r['seconds']:.1f} s | {r['cpu_seconds']:.1f} s | {r['subjects_per_s']:.0f} | {r['n_iter']}"
              f"{'' if r['converged'] else ' (not converged)'} | {r['load']:.1f} | {r['max_abs_diff']:.1e} |")


if __name__ == "__main__":
    main()
