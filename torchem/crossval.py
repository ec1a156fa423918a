r"""Cross-validated predictive likelihood of a hierarchical model.

For each fold the hierarchical model is refitted on the training trials (the
held-out trials masked out of the data), and every subject's held-out trials
are scored by their predictive likelihood under the subject's posterior from
the training fit:

.. math::

    \log p(D_i^{test} \mid D^{train}) = \log \int p(D_i^{test} \mid \theta)\,
        p(\theta \mid D_i^{train}, \hat\mu, \hat\Sigma)\, d\theta
    \approx \log \sum_k \tilde w_{ik}\, p(D_i^{test} \mid \theta_{ik}),

with importance-weighted draws ``theta_ik`` of the training posterior
(Student-t proposal at the training MAP, :func:`torchem.importance.weighted_draws`)
and normalized weights ``w~``, and also at the training MAP,
``log p(D_i^test | m_i)``.  Neither rests on the Laplace approximation or a
BIC penalty: a model that overfits the training trials predicts the held-out
ones worse.

Which trials to hold out
------------------------
Learning models (and any model whose likelihood on a trial depends on the
trials before it) hold out **whole blocks**: their values reset at the start
of every block, so a held-out block is scored exactly, from its own first
trial on, and the training blocks form an intact history.  Masking single
trials out of a learning sequence would change what the model learned from
(a masked trial also drops out of the value updates) and score held-out
trials against a history that never happened.  Models whose trials are
exchangeable given the parameters (regressions without decay or
autoregression, signal detection, prospect theory, discounting) may hold
out random trials in ``k`` folds.

Standard errors
---------------
Subjects are the independent units: the total ``sum_i elpd_i`` has standard
error ``sqrt(S var_i(elpd_i))``, and a difference between two models the
same with ``elpd_i^A - elpd_i^B`` (Vehtari, Gelman & Gabry 2017).  A
subject's own score ``elpd_i = sum_f elpd_if`` has standard error
``sqrt(F var_f(elpd_if))`` over its ``F`` folds, and a Monte Carlo standard
error from the importance weights (delta method).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .data import SubjectBatch
from .em import FitResult
from .importance import evaluate_pairs, pairs_per_call
from .model import Model
from .posterior import importance_draws
from .ppc import family_of

__all__ = ["CVResult", "cross_validate", "fold_masks", "trials_exchangeable", "compare_cv"]


def trials_exchangeable(fit_func: Callable) -> bool:
    """Whether a model's trials are exchangeable given its parameters (its registered family says; else ``False``)."""
    family = family_of(fit_func)
    return bool(family is not None and family.exchangeable)


def fold_masks(batch: SubjectBatch, folds: str | int, exchangeable: bool, seed: int | None = 0) -> list[torch.Tensor]:
    """Held-out masks ``(S, *trial_shape)`` of every fold.

    Parameters
    ----------
    batch : SubjectBatch
    folds : "blocks" or int
        ``"blocks"``: one fold per block position (leave one block out).
        ``k``: ``k`` folds; whole blocks of each subject, assigned to folds at
        random, unless the trials are ``exchangeable``, in which case each
        subject's trials are assigned at random.
    exchangeable : bool
        Trials may be held out one by one.
    seed : int
        Seed of the random assignment.

    Returns
    -------
    list of Tensor
        One bool mask per fold, ``True`` on the held-out real trials; every
        real trial is held out exactly once.
    """
    mask = batch.mask
    S = batch.n_subjects
    has_blocks = mask.dim() == 3 and mask.shape[1] > 1
    if folds == "blocks":
        if not has_blocks:
            raise ValueError("folds='blocks' needs data in blocks (S, B, T) with at least 2 blocks; give the "
                             "DataFrame a block column, or use k folds for a model with exchangeable trials")
        return [torch.zeros_like(mask).index_fill_(1, torch.tensor([b], device=mask.device), True) & mask
                for b in range(mask.shape[1])]
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be 'blocks' or an integer >= 2, got {folds!r}")
    k = int(folds)
    rng = np.random.default_rng(seed)
    m = mask.cpu().numpy()
    assign = np.full(m.shape, -1, dtype=np.int64)
    if exchangeable:
        for s in range(S):
            real = np.flatnonzero(m[s].ravel())
            fold = np.empty(real.size, dtype=np.int64)
            fold[rng.permutation(real.size)] = np.arange(real.size) % k
            assign[s].ravel()[real] = fold  # ravel of a C-contiguous row is a view
    else:
        if not has_blocks:
            raise ValueError(f"{k} folds of a model whose likelihood depends on trial order need data in blocks "
                             "(S, B, T): it holds out whole blocks (see torchem.crossval); give the data a block "
                             "column, or declare exchangeable trials for a model without learning")
        for s in range(S):
            real = np.flatnonzero(m[s].any(-1))
            fold = np.empty(real.size, dtype=np.int64)
            fold[rng.permutation(real.size)] = np.arange(real.size) % k
            assign[s, real] = fold[:, None]
        assign[~m] = -1
    a = torch.as_tensor(assign, device=mask.device)
    return [(a == f) & mask for f in range(k)]


@dataclass
class CVResult:
    """Held-out log predictive likelihood of a cross-validated hierarchical model.

    Attributes
    ----------
    subjects : DataFrame
        One row per subject: ``elpd`` (summed held-out log predictive
        likelihood), ``se`` (over folds), ``mc_se`` (Monte Carlo),
        ``map`` (held-out log-likelihood at the training MAPs), ``n_heldout``
        (held-out trials) and ``elpd_per_trial``.
    folds : DataFrame
        One row per fold and subject: ``elpd``, ``mc_se``, ``map``, ``n_heldout``, ``ess``.
    total, total_se : float
        ``sum_i elpd_i`` and its standard error ``sqrt(S var_i elpd_i)``.
    total_map, total_map_se : float
        The same at the training MAPs.
    scheme : str
        ``"blocks"`` or ``"trials"``: what was held out.
    n_folds : int
    fits : list of FitResult
        The training fits, one per fold.
    """

    subjects: pd.DataFrame
    folds: pd.DataFrame
    total: float
    total_se: float
    total_map: float
    total_map_se: float
    scheme: str
    n_folds: int
    fits: list

    def __repr__(self) -> str:
        return (f"CVResult({len(self.subjects)} subjects, {self.n_folds} folds over {self.scheme}: held-out log "
                f"predictive likelihood {self.total:.2f} (SE {self.total_se:.2f}); at the training MAPs "
                f"{self.total_map:.2f} (SE {self.total_map_se:.2f}))")


def _total(values: np.ndarray) -> tuple[float, float]:
    S = values.shape[0]
    return float(values.sum()), float(math.sqrt(S * values.var(ddof=1))) if S > 1 else float("nan")


def cross_validate(model: Model, batch: SubjectBatch, fit: Callable[[SubjectBatch], FitResult], *,
                   folds: str | int = "blocks", seed: int | None = 0, nsamples: int = 2000,
                   exchangeable: bool | None = None, min_ess: float = 50.0, verbose: int = 0) -> CVResult:
    """Cross-validated held-out predictive likelihood (the work behind :meth:`EMModel.cross_validate`).

    Parameters
    ----------
    model : Model
    batch : SubjectBatch
        All the data.
    fit : callable
        ``fit(train_batch) -> FitResult``: fits the hierarchical model to a
        batch whose held-out trials are masked out.
    folds : "blocks" or int
        See :func:`fold_masks`.
    seed : int
        Seed of the fold assignment and the posterior draws.
    nsamples : int
        Importance draws per subject and fold.
    exchangeable : bool, optional
        Trials are exchangeable given the parameters (default: what the
        model's registered family says, else ``False``).
    min_ess : float
        Warn when a subject's importance effective sample size in a fold is below this.
    verbose : int
        1: a tqdm bar over folds.

    Returns
    -------
    CVResult
    """
    exchangeable = trials_exchangeable(model.fit_func) if exchangeable is None else exchangeable
    tests = fold_masks(batch, folds, exchangeable, seed)
    S = batch.n_subjects
    chunk = pairs_per_call(batch.mask[0].numel(), batch.device)
    gen = torch.Generator()
    gen.manual_seed(0 if seed is None else int(seed))
    rows, fits, low = [], [], 0
    for f, test in enumerate(tqdm(tests, desc="cross-validation", disable=not verbose)):
        train = SubjectBatch(dict(batch.fields), batch.mask & ~test, list(batch.subject_ids), dict(batch.categories))
        res = fit(train)
        fits.append(res)
        theta, log_w = importance_draws(model, train, res, nsamples, gen)

        def held_out(th: torch.Tensor, idx: torch.Tensor, test=test) -> torch.Tensor:
            return -model.nll(th, tuple(d[idx] for d in batch.data), test[idx])

        with torch.no_grad():
            ll = evaluate_pairs(held_out, theta, chunk)  # (n, S)
            lw = torch.log_softmax(log_w, 0)
            elpd = torch.logsumexp(lw + ll, 0)
            wn = lw.exp()
            rel = torch.exp(ll - elpd)  # p(test | theta_k) / p_hat
            mc_se = ((wn * (rel - 1.0)) ** 2).sum(0).sqrt()  # delta method: se(log p_hat) = se(p_hat) / p_hat
            ess = 1.0 / (wn * wn).sum(0)
            at_map = -model.nll(res.m, batch.data, test)
        low += int((ess < min_ess).sum())
        n_test = test.reshape(S, -1).sum(1)
        for i, sid in enumerate(batch.subject_ids):
            rows.append((f, sid, float(elpd[i]), float(mc_se[i]), float(at_map[i]), int(n_test[i]), float(ess[i])))
    if low:
        warnings.warn(f"{low} subject-fold(s) had an importance effective sample size below {min_ess:g}; "
                      "raise nsamples", RuntimeWarning, stacklevel=3)
    per_fold = pd.DataFrame(rows, columns=["fold", "subject", "elpd", "mc_se", "map", "n_heldout", "ess"])
    g = per_fold.groupby("subject", sort=False)
    F = len(tests)
    subjects = pd.DataFrame({
        "elpd": g["elpd"].sum(),
        "se": g["elpd"].std(ddof=1) * math.sqrt(F),
        "mc_se": np.sqrt(g["mc_se"].apply(lambda v: float((v ** 2).sum()))),
        "map": g["map"].sum(),
        "n_heldout": g["n_heldout"].sum(),
    })
    subjects.index.name = "subject"
    subjects["elpd_per_trial"] = subjects["elpd"] / subjects["n_heldout"].clip(lower=1)
    total, total_se = _total(subjects["elpd"].to_numpy())
    total_map, total_map_se = _total(subjects["map"].to_numpy())
    scheme = "blocks" if (folds == "blocks" or not exchangeable) else "trials"
    return CVResult(subjects, per_fold, total, total_se, total_map, total_map_se, scheme, F, fits)


def compare_cv(results: dict[str, CVResult], column: str = "elpd") -> pd.DataFrame:
    """Held-out scores of several models on the same subjects, with paired standard errors of the differences.

    Returns
    -------
    DataFrame
        Indexed by model: ``elpd`` (or ``map``) total, ``se``, ``d_elpd``
        (difference to the best model) and ``d_se`` (``sqrt(S var_i(d_i))``
        of the per-subject differences).
    """
    table = pd.DataFrame({name: r.subjects[column] for name, r in results.items()})
    if table.isna().any().any():
        raise ValueError("the models were cross-validated on different subjects")
    totals = table.sum(axis=0)
    best = totals.idxmax()
    S = len(table)
    diff = table.sub(table[best], axis=0)
    return pd.DataFrame({
        column: totals,
        "se": [r.total_se if column == "elpd" else r.total_map_se for r in results.values()],
        f"d_{column}": diff.sum(axis=0),
        "d_se": np.sqrt(S * diff.var(axis=0, ddof=1)),
    })
