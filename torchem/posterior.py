"""Draws from every subject's posterior after a fit.

Posterior predictive checks (:mod:`torchem.ppc`) and cross-validation
(:mod:`torchem.crossval`) need parameter draws from each subject's posterior
under the fitted group prior.  Three kinds:

- ``"map"``: the MAP ``m_i`` repeated;
- ``"laplace"``: ``m_i + L_i z``, ``z ~ N(0, I)``, ``L_i L_i^T`` the inverse of
  the exact Hessian at the MAP (the Laplace posterior);
- ``"importance"`` (also ``"posterior"``): Student-t draws around the MAP
  weighted by the true unnormalized posterior (likelihood times group prior)
  over the proposal density (:func:`torchem.importance.weighted_draws`);
  equal-weight draws are obtained from them by resampling in proportion to
  the weights.  Exact up to Monte Carlo error, where the Laplace posterior
  can be skewed away from the true one (bounded parameters, few trials).

The random stream comes from a seeded CPU generator, so a seed gives the same
draws on every device.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .data import SubjectBatch
from .em import FitResult
from .estep import neg_log_posterior
from .importance import pairs_per_call, weighted_draws
from .model import Model

__all__ = ["log_posterior", "laplace_draws", "importance_draws", "resample", "posterior_draws", "KINDS"]

#: Kinds of posterior draws.
KINDS = ("map", "laplace", "importance", "posterior")


def log_posterior(model: Model, batch: SubjectBatch, result: FitResult) -> Callable[[torch.Tensor, torch.Tensor],
                                                                                     torch.Tensor]:
    """``fun(theta (n, P), idx (n,)) -> (n,)``: unnormalized log posterior ``-NPL`` under the fitted group prior.

    ``idx`` names the subjects, so a group with subject-specific means (covariates) scores each against its own.
    """
    if result.group is None:
        raise ValueError("this result has no group distribution or prior (an individual maximum-likelihood fit): "
                         "fit hierarchically, or fit_individual(prior=...)")
    fun = neg_log_posterior(model, batch, result.group)
    return lambda theta, idx: -fun(theta, idx)


def laplace_draws(result: FitResult, n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, S, P)`` draws from every subject's Laplace posterior ``N(m_i, H_i^-1)``."""
    S, P = result.m.shape
    z = torch.randn(n, S, P, generator=generator, dtype=result.m.dtype).to(result.m.device)
    chol = torch.linalg.cholesky(result.inv_h)
    return result.m + torch.einsum("spq,nsq->nsp", chol, z)


def importance_draws(model: Model, batch: SubjectBatch, result: FitResult, nsamples: int,
                     generator: torch.Generator, df: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted posterior draws of every subject: ``theta`` ``(n, S, P)`` and log weights ``(n, S)``.

    The proposal is a Student-t with ``df`` degrees of freedom at the MAP
    with the inverse Hessian as scale; the weights are the posterior under
    the fitted group prior over the proposal density (unnormalized).
    """
    chunk = pairs_per_call(batch.mask[0].numel(), batch.device)
    return weighted_draws(log_posterior(model, batch, result), result.m, result.inv_h, nsamples, generator,
                          df=df, chunk=chunk)


def resample(theta: torch.Tensor, log_w: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, S, P)`` equal-weight draws picked from ``theta`` ``(N, S, P)`` in proportion to ``exp(log_w)`` ``(N, S)``.

    Multinomial resampling with replacement, independently per subject.
    """
    w = torch.softmax(log_w, 0).T.cpu()  # (S, N)
    pick = torch.multinomial(w, n, replacement=True, generator=generator).to(theta.device)  # (S, n)
    S = theta.shape[1]
    return theta[pick.T, torch.arange(S, device=theta.device)]


def posterior_draws(model: Model, batch: SubjectBatch, result: FitResult, n: int, kind: str,
                    generator: torch.Generator, nsamples: int = 4000, min_ess: float = 50.0) -> torch.Tensor:
    """``(n, S, P)`` normalized parameter draws of every subject.

    Parameters
    ----------
    model, batch, result
        The fitted model, its data and its :class:`~torchem.em.FitResult`.
    n : int
        Draws per subject.
    kind : {"map", "laplace", "importance", "posterior"}
        See the module docstring; ``"posterior"`` is ``"importance"``.
    generator : torch.Generator
        CPU generator of the draws.
    nsamples : int
        Weighted draws per subject that ``"importance"`` resamples from.
    min_ess : float
        Warn when a subject's importance effective sample size is below this.
    """
    if kind not in KINDS:
        raise ValueError(f"draws must be one of {KINDS}, got {kind!r}")
    if kind == "map":
        return result.m.unsqueeze(0).expand(n, *result.m.shape).clone()
    if kind == "laplace":
        return laplace_draws(result, n, generator)
    theta, log_w = importance_draws(model, batch, result, max(nsamples, n), generator)
    ess = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))
    low = ess < min_ess
    if bool(low.any()):
        warnings.warn(f"{int(low.sum())} subject(s) have an importance effective sample size below {min_ess:g} "
                      f"(smallest {float(ess.min()):.1f}); their posterior draws repeat few points: raise nsamples",
                      RuntimeWarning, stacklevel=3)
    return resample(theta, log_w, n, generator)
