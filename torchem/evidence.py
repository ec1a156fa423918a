r"""Model evidence: Laplace log evidence, integrated BIC and pseudo-R².

Pure functions on tensors; :class:`torchem.EMModel` wires them to a fit.

Laplace evidence of subject ``i`` (``H_i`` the exact Hessian of the negative
log posterior at the MAP, ``P`` parameters):

.. math::  \log p(D_i) \approx -\mathrm{NPL}_i + \tfrac{P}{2}\log 2\pi - \tfrac12 \log\det H_i

Integrated BIC (Huys et al. 2011), with ``theta_k`` drawn from the fitted
group distribution, ``K`` group-level parameters and ``N`` observations:

.. math::  \mathrm{BIC}_{int} = -2 \sum_i \log \frac{1}{n}\sum_k p(D_i\mid\theta_k) + K \log N
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["laplace_lme", "total_lme", "integrated_log_likelihood", "integrated_bic", "pseudo_r2"]


def laplace_lme(npl: torch.Tensor, hess_logdet: torch.Tensor, n_params: int) -> torch.Tensor:
    """Per-subject Laplace log evidence ``(S,)`` from ``NPL`` ``(S,)`` and ``log det H`` ``(S,)``."""
    return -npl + 0.5 * n_params * math.log(2 * math.pi) - 0.5 * hess_logdet


def total_lme(lap: torch.Tensor, n_params: int) -> float:
    """Summed log evidence with pyEM's group penalty: ``sum_i lap_i - P log S``."""
    return float(lap.sum() - n_params * math.log(lap.shape[0]))


def integrated_log_likelihood(
    nll_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sample: Callable[[int], torch.Tensor],
    n_subjects: int,
    nsamples: int,
    chunk: int,
) -> torch.Tensor:
    """``log (1/n) sum_k p(D_i | theta_k)`` per subject, ``theta_k`` drawn from the group.

    Parameters
    ----------
    nll_fn : callable
        ``nll_fn(theta, idx) -> (n,)`` negative log-likelihood of subjects
        ``idx`` ``(n,)`` at ``theta`` ``(n, P)``.
    sample : callable
        ``sample(n) -> (n, P)`` draws from the group distribution.
    n_subjects, nsamples : int
        ``S`` and the number of draws per subject.
    chunk : int
        Subject-draw pairs evaluated per batched call (bounds memory).

    Returns
    -------
    Tensor
        ``(S,)``.  All ``S * nsamples`` pairs are evaluated in batched calls of
        up to ``chunk`` rows; the log-mean-exp is exact in floating point.
    """
    theta = sample(n_subjects * nsamples)
    device = theta.device
    idx = torch.arange(n_subjects, device=device).repeat(nsamples)  # row r: subject r % S, draw r // S
    with torch.no_grad():
        nll = torch.cat([nll_fn(theta[lo:lo + chunk], idx[lo:lo + chunk])
                         for lo in range(0, theta.shape[0], chunk)])
    loglik = -nll.reshape(nsamples, n_subjects)
    return torch.logsumexp(loglik, 0) - math.log(nsamples)


def integrated_bic(ilog: torch.Tensor, n_group_params: int, n_obs: int) -> float:
    """``-2 sum_i ilog_i + K log N`` (Huys et al. 2011); lower is better."""
    return float(-2.0 * ilog.sum() + n_group_params * math.log(n_obs))


def pseudo_r2(nll: torch.Tensor, n_obs: torch.Tensor, noptions: int, metric: str = "median") -> float:
    """Pseudo-R² against chance: ``1 - NLL / (N log noptions)``.

    Parameters
    ----------
    nll, n_obs : Tensor
        ``(S,)`` negative log-likelihoods and observation counts.
    noptions : int
        Options per choice (chance is ``1/noptions``).
    metric : {"median", "mean"}
        How subjects are pooled (pyEM's default is the median).
    """
    chance = n_obs.to(nll.dtype) * math.log(noptions)
    if metric == "median":
        return float(1.0 - torch.quantile(nll, 0.5) / torch.quantile(chance, 0.5))
    if metric == "mean":
        return float(1.0 - nll.mean() / chance.mean())
    raise ValueError(f"metric must be 'median' or 'mean', got {metric!r}")
