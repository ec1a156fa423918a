"""pyEM's ``pyem.utils.stats``: ``calc_LME``, ``calc_BICint`` and ``pseudo_r2_from_nll``.

pyEM's array layouts are kept here: parameters first (``inv_h`` ``(P, P, S)``),
as pyEM's ``EMfit`` returns them (:func:`torchem.core.em.EMfit` too).  A
torchem :class:`~torchem.em.FitResult` is subjects first; its own methods
(``EMModel.compute_lme``, ``compute_integrated_bic``, ``compute_pseudo_r2``)
are the direct way there.  The formulas are those of :mod:`torchem.evidence`.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike

from .. import evidence
from ..priors import GaussianPrior

__all__ = ["calc_LME", "calc_BICint", "pseudo_r2_from_nll"]


def calc_LME(inv_h: ArrayLike, NPL: ArrayLike) -> tuple[np.ndarray, float, np.ndarray]:  # noqa: N802, N803
    """Laplace log model evidence per subject and in total, from inverse Hessians (pyEM's layout).

    Parameters
    ----------
    inv_h : array-like
        ``(P, P, S)`` inverse Hessians of each subject's negative log posterior at its MAP.
    NPL : array-like
        ``(S,)`` negative log posterior at the MAP.

    Returns
    -------
    Lap : ndarray
        ``(S,)`` ``-NPL_i + P/2 log 2pi + 1/2 log det inv_h_i``.  Subjects whose
        ``inv_h`` is not positive definite get the mean of the others (all 0
        if none is), as in pyEM.
    lme : float
        ``sum(Lap) - P log S``.
    good : ndarray
        ``(S,)`` 1.0 where ``inv_h`` was positive definite, else 0.0.
    """
    inv_h = torch.as_tensor(np.asarray(inv_h, dtype=float))
    npl = torch.as_tensor(np.asarray(NPL, dtype=float)).reshape(-1)
    if inv_h.dim() != 3 or inv_h.shape[0] != inv_h.shape[1]:
        hint = (" (this looks like torchem's subjects-first (S, P, P): pass inv_h.permute(1, 2, 0), or use "
                "EMModel.compute_lme())" if inv_h.dim() == 3 and inv_h.shape[1] == inv_h.shape[2] else "")
        raise ValueError(f"inv_h must be (P, P, S) as in pyEM, got shape {tuple(inv_h.shape)}{hint}")
    if inv_h.shape[2] != npl.shape[0]:
        raise ValueError(f"inv_h has {inv_h.shape[2]} subjects but NPL has {npl.shape[0]}")
    P = inv_h.shape[0]
    sign, logdet = torch.linalg.slogdet(inv_h.permute(2, 0, 1))
    good = sign > 0
    lap = evidence.laplace_lme(npl, torch.where(good, -logdet, torch.nan), P)
    fill = lap[good].mean() if bool(good.any()) else torch.zeros((), dtype=lap.dtype)
    lap = torch.where(good, lap, fill)
    return lap.numpy(), evidence.total_lme(lap, P), good.double().numpy()


def calc_BICint(all_data: Any, param_names: Sequence[str] | None, mu: ArrayLike, sigma: ArrayLike,  # noqa: N802
                fit_func: Callable,
                nsamples: int = 2000, func_output: str = "all", nll_key: str = "nll",
                ntrials_total: int | None = None, njobs: int | None = None, seed: int | None = 0,
                device: str | torch.device | None = "cpu", dtype: torch.dtype = torch.float64) -> float:
    """Integrated BIC with pyEM's penalty: ``-2 sum_i log mean_k p(D_i | theta_k) + P log n``.

    ``theta_k ~ N(mu, diag(sigma))`` (``sigma`` holds variances, as in
    pyEM), ``nsamples`` draws per subject, all evaluated as batched
    likelihood calls.

    Parameters
    ----------
    all_data : list, DataFrame or SubjectBatch
        As ``EMModel``'s ``all_data``.
    param_names : sequence of str, optional
        Parameter names (optional for library models).
    mu, sigma : array-like
        ``(P,)`` group mean and variances, normalized space.
    fit_func : callable
        A torchem likelihood or a pyEM-style one written with torch operations.
    nsamples : int
        Draws per subject.
    func_output, nll_key, njobs
        pyEM's options, not needed: torchem evaluates the NLL directly, in one batch.
    ntrials_total : int, optional
        ``n`` of the penalty; default the first subject's number of trials.
        (pyEM counts the first data field's elements instead, which differs
        for a regression's ``X`` ``(T, K)``.)
    seed : int, optional
        Seed of the draws.
    device, dtype
        Where and in which precision to evaluate.

    Returns
    -------
    float
        Subjects whose integrated log-likelihood is not finite are dropped with a warning (as pyEM).
    """
    from ..api import EMModel  # noqa: PLC0415 - utils sits on top of the API

    mu = np.asarray(mu, dtype=float).reshape(-1)
    names = list(param_names) if param_names else None
    model = EMModel(all_data, fit_func, names, device=device, dtype=dtype)
    if len(mu) != model.model.n_params:
        raise ValueError(f"mu has {len(mu)} values but the model has {model.model.n_params} parameters")
    ilog = model.integrated_log_likelihood(nsamples, seed, group=GaussianPrior(mu, sigma))
    finite = torch.isfinite(ilog)
    if not bool(finite.all()):
        warnings.warn(f"calc_BICint: dropping {int((~finite).sum())} of {len(ilog)} subject(s) with a non-finite "
                      "integrated log-likelihood", RuntimeWarning, stacklevel=2)
    n = int(model.batch.n_obs[0]) if ntrials_total is None else int(ntrials_total)
    return evidence.integrated_bic(ilog[finite], len(mu), n)


def pseudo_r2_from_nll(nll: ArrayLike, ntrials_total: ArrayLike, noptions: int, metric: str = "median") -> float:
    """pyEM's pseudo-R²: ``1 - NLL / (n log noptions)``, pooled over subjects by the median (or mean).

    Parameters
    ----------
    nll : array-like
        ``(S,)`` negative log-likelihoods.
    ntrials_total : int or array-like
        Trials per subject (one number for all, or ``(S,)``).
    noptions : int
        Options per choice (chance is ``1 / noptions``).
    metric : {"median", "mean"}
    """
    nll = torch.as_tensor(np.asarray(nll, dtype=float)).reshape(-1)
    n = torch.as_tensor(np.broadcast_to(np.asarray(ntrials_total, dtype=float), nll.shape).copy())
    return evidence.pseudo_r2(nll, n, noptions, metric)
