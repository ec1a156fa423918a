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
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

__all__ = [
    "laplace_lme", "total_lme", "integrated_log_likelihood", "integrated_bic", "pseudo_r2",
    "BMSResult", "bms", "exceedance_probabilities",
]


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
    subjects: tuple[int, int] | None = None,
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
    subjects : (int, int), optional
        Only the subjects ``lo <= i < hi`` (a rank's shard): all draws are made, so each subject's
        draws are those of the whole computation, and only the shard's are evaluated.

    Returns
    -------
    Tensor
        ``(S,)``, or ``(hi - lo,)`` with ``subjects``.  All ``S * nsamples`` pairs are evaluated in
        batched calls of up to ``chunk`` rows; the log-mean-exp is exact in floating point.
    """
    theta = sample(n_subjects * nsamples)
    device = theta.device
    lo, hi = (0, n_subjects) if subjects is None else subjects
    if (lo, hi) != (0, n_subjects):
        theta = theta.reshape(nsamples, n_subjects, -1)[:, lo:hi].reshape(nsamples * (hi - lo), -1)
    idx = torch.arange(lo, hi, device=device).repeat(nsamples)  # row r: subject lo + r % s, draw r // s
    n_subjects = hi - lo
    with torch.no_grad():
        nll = torch.cat([nll_fn(theta[start:start + chunk], idx[start:start + chunk])
                         for start in range(0, theta.shape[0], chunk)])
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

    Raises
    ------
    ValueError
        ``noptions`` below 2 (one option has no chance level to beat).
    """
    if isinstance(noptions, bool) or not isinstance(noptions, (int, np.integer)) or noptions < 2:
        raise ValueError(f"noptions must be an integer >= 2 (the options per choice; chance is 1/noptions), "
                         f"got {noptions!r}")
    chance = n_obs.to(nll.dtype) * math.log(noptions)
    if metric == "median":
        return float(1.0 - torch.quantile(nll, 0.5) / torch.quantile(chance, 0.5))
    if metric == "mean":
        return float(1.0 - nll.mean() / chance.mean())
    raise ValueError(f"metric must be 'median' or 'mean', got {metric!r}")


# --------------------------------------------------------------------------- random-effects BMS
@dataclass
class BMSResult:
    """Random-effects Bayesian model selection (Stephan et al. 2009; Rigoux et al. 2014).

    Attributes
    ----------
    alpha : ndarray
        ``(K,)`` Dirichlet parameters of the posterior over model frequencies.
    exp_r : ndarray
        ``(K,)`` expected model frequencies ``alpha / sum(alpha)``.
    xp : ndarray
        ``(K,)`` exceedance probabilities ``P(r_k > r_j for all j != k)``.
    bor : float
        Bayesian omnibus risk: posterior probability that all models are
        equally frequent in the population.
    pxp : ndarray
        ``(K,)`` protected exceedance probabilities ``xp (1 - bor) + bor / K``.
    g : ndarray
        ``(S, K)`` posterior probability of each model for each subject.
    F1, F0 : float
        Free energy (log evidence bound) of the random-effects model and log
        evidence of the null (equal frequencies).
    xp_method : str
        ``"exact"`` (two models) or ``"monte carlo"``.
    """

    alpha: np.ndarray
    exp_r: np.ndarray
    xp: np.ndarray
    bor: float
    pxp: np.ndarray
    g: np.ndarray
    F1: float
    F0: float
    xp_method: str


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f


def exceedance_probabilities(alpha: np.ndarray, n_samples: int = 1_000_000, seed: int | None = 0) -> tuple[np.ndarray, str]:
    """``P(r_k is the largest)`` under ``Dirichlet(alpha)``: exact for two models, Monte Carlo otherwise."""
    alpha = np.asarray(alpha, dtype=float)
    if alpha.shape[0] == 2:
        p1 = 1.0 - _betainc(alpha[0], alpha[1], 0.5)  # r_1 ~ Beta(a1, a2); P(r_1 > 1/2)
        return np.array([p1, 1.0 - p1]), "exact"
    rng = np.random.default_rng(seed)
    wins = np.zeros(alpha.shape[0])
    done = 0
    while done < n_samples:  # chunks bound memory
        n = min(200_000, n_samples - done)
        r = rng.dirichlet(alpha, size=n)
        wins += np.bincount(r.argmax(1), minlength=alpha.shape[0])
        done += n
    return wins / n_samples, "monte carlo"


def bms(lme, alpha0: float | np.ndarray = 1.0, max_iter: int = 10_000, tol: float = 1e-10,
        n_samples: int = 1_000_000, seed: int | None = 0) -> BMSResult:
    """Random-effects Bayesian model selection on per-subject log evidences.

    Variational Bayes for the Dirichlet-multinomial model of Stephan et al.
    (2009), the Bayesian omnibus risk and protected exceedance probabilities
    of Rigoux et al. (2014).

    Parameters
    ----------
    lme : array-like or DataFrame
        ``(S, K)`` log evidence of each of ``K`` models for each subject:
        Laplace evidences (:meth:`EMModel.compute_lme`,
        :meth:`ModelComparison.subject_lme`) or held-out log predictive
        likelihoods from cross-validation (:meth:`ModelComparison.subject_cv`,
        ``CVResult.subjects["elpd"]``), which do not rest on the Laplace
        approximation.
    alpha0 : float or ``(K,)``
        Dirichlet prior (1: uniform over frequencies).
    max_iter, tol : int, float
        Variational iterations and tolerance on ``alpha``.
    n_samples, seed : int
        Monte Carlo draws (and their seed) for exceedance probabilities of
        more than two models.

    Returns
    -------
    BMSResult
    """
    L = np.array(lme.detach().cpu().numpy() if isinstance(lme, torch.Tensor) else np.asarray(lme), dtype=float)
    if L.ndim != 2 or L.shape[1] < 2:
        raise ValueError(f"lme must be (subjects, models) with at least 2 models, got shape {L.shape}")
    if not np.isfinite(L).all():
        s, k = np.argwhere(~np.isfinite(L))[0]
        raise ValueError(f"lme is not finite for subject {s}, model {k}")
    S, K = L.shape
    a0 = np.broadcast_to(np.asarray(alpha0, dtype=float), (K,)).copy()
    Lt = torch.as_tensor(L, dtype=torch.float64)
    alpha = torch.as_tensor(a0, dtype=torch.float64).clone()
    for _ in range(max_iter):
        elog_r = torch.special.digamma(alpha) - torch.special.digamma(alpha.sum())
        g = torch.softmax(Lt + elog_r, 1)
        new = torch.as_tensor(a0) + g.sum(0)
        delta = float((new - alpha).abs().max())
        alpha = new
        if delta < tol:
            break
    elog_r = torch.special.digamma(alpha) - torch.special.digamma(alpha.sum())
    g = torch.softmax(Lt + elog_r, 1)
    a0t = torch.as_tensor(a0)
    # free energy of the random-effects model: E[log joint] + entropies of q(m) and q(r)
    e_log_joint = (torch.lgamma(a0t.sum()) - torch.lgamma(a0t).sum() + ((a0t - 1) * elog_r).sum()
                   + (g * (elog_r + Lt)).sum())
    ent_r = torch.lgamma(alpha).sum() - torch.lgamma(alpha.sum()) - ((alpha - 1) * elog_r).sum()
    ent_m = -(g * torch.log(g.clamp_min(1e-300))).sum()
    F1 = float(e_log_joint + ent_r + ent_m)
    F0 = float(torch.logsumexp(Lt - math.log(K), 1).sum())  # every model equally frequent
    bor = 1.0 / (1.0 + math.exp(F1 - F0)) if F1 - F0 < 700 else 0.0
    xp, method = exceedance_probabilities(alpha.numpy(), n_samples, seed)
    alpha_np = alpha.numpy()
    return BMSResult(alpha=alpha_np, exp_r=alpha_np / alpha_np.sum(), xp=xp, bor=bor,
                     pxp=xp * (1 - bor) + bor / K, g=g.numpy(), F1=F1, F0=F0, xp_method=method)
