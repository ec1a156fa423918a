"""Shared fixtures and helpers for the torchem test suite.

Everything runs on the CPU in float64 (set explicitly where tensors are made,
never as torch's default dtype, so a float32 leak in the library shows up).
The models evaluate many small tensor operations, for which intra-op
threading only adds overhead (and contention on a shared machine), so torch
is limited to one thread.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
try:  # plotting code must never try to open a window during tests
    import matplotlib

    matplotlib.use("Agg", force=True)
except ImportError:  # pragma: no cover - matplotlib is a declared dependency
    pass

torch.set_num_threads(1)

from torchem import EMModel, SubjectBatch  # noqa: E402
from torchem.models.rl import rw1a1b_fit, rw1a1b_simulate, rw2a1b_simulate  # noqa: E402

#: Reference data shipped with the tests (see tests/data/README.md).
REFERENCE_DIR = Path(__file__).resolve().parent / "data"


# --------------------------------------------------------------------- helpers
def simulate_bandit(n_subjects: int, nblocks: int = 4, ntrials: int = 24, seed: int = 0,
                    model: str = "rw1a1b", params: np.ndarray | None = None) -> tuple[np.ndarray, dict, list]:
    """Simulate Rescorla-Wagner agents on the default two-armed bandit.

    Returns the natural generating parameters ``(S, P)``, the simulator's
    dict and pyEM-style ``all_data`` (``[[choices (B, T), rewards (B, T)], ...]``).
    Default parameters: ``beta ~ U(2, 12)``, learning rate(s) ``~ U(0.1, 0.9)``.
    """
    rng = np.random.default_rng(seed)
    n_lr = 1 if model == "rw1a1b" else 2
    if params is None:
        params = np.column_stack([rng.uniform(2.0, 12.0, n_subjects)]
                                 + [rng.uniform(0.1, 0.9, n_subjects) for _ in range(n_lr)])
    simulate = rw1a1b_simulate if model == "rw1a1b" else rw2a1b_simulate
    sim = simulate(params, nblocks=nblocks, ntrials=ntrials, seed=seed + 1000)
    all_data = [[sim["choices"][i], sim["rewards"][i]] for i in range(n_subjects)]
    return params, sim, all_data


def ragged_bandit_data(seed: int = 0, blocks=(2, 3, 4, 4, 3, 2), ntrials: int = 24, model: str = "rw1a1b"):
    """pyEM-style data of subjects with different numbers of blocks (48, 72, 96 trials ...)."""
    n = len(blocks)
    _, sim, _ = simulate_bandit(n, nblocks=max(blocks), ntrials=ntrials, seed=seed, model=model)
    return [[sim["choices"][i, :nb], sim["rewards"][i, :nb]] for i, nb in enumerate(blocks)]


def assert_hessian_matches_fd(fit, batch: SubjectBatch, x: torch.Tensor, H: torch.Tensor,
                               eps: float = 1e-5) -> None:
    """``H`` ``(S, P, P)`` equals central finite differences of the autograd gradient of ``fit`` at ``x``."""
    def grad(z):
        z = z.clone().requires_grad_(True)
        return torch.autograd.grad(fit(z, *batch.data, mask=batch.mask).sum(), z)[0]

    for j in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, j] = eps
        torch.testing.assert_close(H[:, :, j], (grad(x + e) - grad(x - e)) / (2 * eps), rtol=1e-4, atol=1e-5)


def assert_padding_ignored_and_hessian_exact(fit, batch: SubjectBatch, x: torch.Tensor, int_fill: int = 1) -> None:
    """Padded trials holding anything (NaN, or ``int_fill`` in integer fields) leave ``fit`` unchanged, and its
    ``torch.func`` Hessian at ``x`` on such data is finite and equals finite differences."""
    from torchem.curvature import batched_hessian

    dirty = [d.clone() for d in batch.data]
    for d in dirty:
        d[~batch.mask] = float("nan") if d.is_floating_point() else int_fill
    torch.testing.assert_close(fit(x, *dirty, mask=batch.mask), fit(x, *batch.data, mask=batch.mask),
                               rtol=0, atol=1e-12)
    H = batched_hessian(lambda z: fit(z, *dirty, mask=batch.mask), x)
    assert torch.isfinite(H).all()
    assert_hessian_matches_fd(fit, batch, x, H)


def lists_to_dataframe(all_data, subject_ids=None) -> pd.DataFrame:
    """Long DataFrame (subject, block, trial, choice, reward) from ``[[choices (B, T), rewards (B, T)], ...]``."""
    rows = []
    ids = range(len(all_data)) if subject_ids is None else subject_ids
    for sid, (choices, rewards) in zip(ids, all_data):
        choices, rewards = np.asarray(choices), np.asarray(rewards)
        for b in range(choices.shape[0]):
            for t in range(choices.shape[1]):
                rows.append((sid, b + 1, t + 1, choices[b, t], rewards[b, t]))
    return pd.DataFrame(rows, columns=["subject", "block", "trial", "choice", "reward"])


# -------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def reference_df(reference_dir) -> pd.DataFrame:
    return pd.read_csv(reference_dir / "rw1a1b_100.csv")


@pytest.fixture(scope="session")
def pyem_reference(reference_dir) -> dict:
    with open(reference_dir / "rw1a1b_100_pyem.json") as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def reference_true(reference_dir) -> pd.DataFrame:
    return pd.read_csv(reference_dir / "rw1a1b_100_true.csv")


@pytest.fixture(scope="session")
def reference_model(reference_df) -> EMModel:
    """``EMModel`` of rw1a1b on the 100-subject reference data, fitted once per session."""
    model = EMModel(reference_df, rw1a1b_fit, columns=["choice", "reward"], block="block", trial="trial",
                    device="cpu")
    model.fit(verbose=0)
    return model


@pytest.fixture(scope="session")
def small_data():
    """20 simulated rw1a1b subjects, 4 blocks of 24 trials: ``(true_params, sim, all_data)``."""
    return simulate_bandit(20, nblocks=4, ntrials=24, seed=7)


@pytest.fixture(scope="session")
def small_model(small_data) -> EMModel:
    """A fitted ``EMModel`` on :func:`small_data` (list input)."""
    _, _, all_data = small_data
    model = EMModel(all_data, rw1a1b_fit, device="cpu")
    model.fit(verbose=0)
    return model


@pytest.fixture
def ragged_batch() -> SubjectBatch:
    """Three subjects with 2, 3 and 4 blocks of 24 trials (48, 72, 96 trials), padded."""
    return SubjectBatch.from_lists(ragged_bandit_data(seed=3, blocks=(2, 3, 4)), names=["choices", "rewards"])
