r"""Importance sampling of every subject's posterior at once.

The Laplace approximation feeds the M-step with each subject's MAP and inverse
Hessian.  With bounded parameters and ~100 trials the posterior is skewed and
that Gaussian is poor, which biases the group estimates (the group variance
comes out too small).  Here each subject's posterior moments are computed by
self-normalized importance sampling instead:

- proposal: multivariate Student-t with ``df`` degrees of freedom, centred at
  the MAP ``m_i`` with the inverse Hessian ``V_i = L_i L_i^T`` as scale,
  ``theta = m_i + L_i z sqrt(df / u)``, ``z ~ N(0, I)``, ``u ~ chi2(df)``;
- weights: ``log w = -NPL_i(theta) - log q_i(theta)``, the unnormalized
  posterior (likelihood times group prior) over the proposal density;
- moments: ``E[theta] = sum w theta / sum w``, ``E[theta theta^T]`` likewise;
- evidence: ``log p(D_i) = log mean w`` with the delta-method standard error
  ``sd(w) / (mean(w) sqrt(n))``;
- effective sample size ``(sum w)^2 / sum w^2``.

All draws of all subjects go through the batched likelihood together, in
chunks that bound memory.  The draws are a function of the seed only, so
re-seeding gives common random numbers across EM iterations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .priors import chi2_draws

__all__ = ["ImportanceResult", "importance_sample", "weighted_draws", "block_draws", "evaluate_pairs",
           "pairs_per_call"]


def pairs_per_call(trial_cells: int, device: torch.device) -> int:
    """Subject-draw pairs per likelihood call: small enough to stay in cache on a CPU, large on a GPU."""
    budget = 50_000_000 if device.type == "cuda" else 500_000
    return max(256, budget // max(1, trial_cells))


@dataclass
class ImportanceResult:
    """Per-subject importance-sampling summaries; every field has the subjects first.

    Attributes
    ----------
    mean : Tensor
        ``(S, P)`` posterior means.
    cov : Tensor
        ``(S, P, P)`` posterior covariances.
    log_evidence : Tensor
        ``(S,)`` ``log p(D_i)`` under the group prior (log mean weight).
    log_evidence_se : Tensor
        ``(S,)`` Monte Carlo standard error of ``log_evidence``.
    ess : Tensor
        ``(S,)`` effective sample size.
    nsamples : Tensor
        ``(S,)`` draws used per subject.
    """

    mean: torch.Tensor
    cov: torch.Tensor
    log_evidence: torch.Tensor
    log_evidence_se: torch.Tensor
    ess: torch.Tensor
    nsamples: torch.Tensor


def _draw(n: int, S: int, P: int, df: float, generator: torch.Generator, dtype: torch.dtype,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard normal ``z`` ``(n, S, P)`` and the t-scaling ``sqrt(df / u)`` ``(n, S)``, ``u ~ chi2(df)``."""
    z = torch.randn(n, S, P, generator=generator, dtype=dtype)
    u = chi2_draws(n * S, df, generator, dtype).reshape(n, S)
    return z.to(device), (df / u).sqrt().to(device)


#: Subjects per block of :func:`block_draws` (one generator per block).
DRAW_BLOCK = 64


def block_draws(seed: int, subjects: torch.Tensor, block: int = DRAW_BLOCK, stream: int = 0) -> Callable:
    """A draw function (see :func:`weighted_draws`) whose draws of subject ``i`` depend only on ``seed`` and ``i``.

    Subjects are taken in blocks of ``block`` consecutive subject numbers; each block has its own generator,
    seeded by ``(seed, stream, block number)``, and its draws are made for the whole block and then taken for the
    ``subjects`` ``(S,)`` present.  So a subject's draws are the same whichever chunk or rank computes it.
    """
    subj = subjects.detach().cpu().long()

    def draw(n: int, S: int, P: int, df: float, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        z, scale = torch.empty(n, S, P, dtype=dtype), torch.empty(n, S, dtype=dtype)
        blocks = subj // block
        for b in torch.unique(blocks).tolist():
            cols = (blocks == b).nonzero().squeeze(1)
            gen = torch.Generator()
            gen.manual_seed(hash((int(seed), int(stream), b)) & (2**63 - 1))
            zb, sb = _draw(n, block, P, df, gen, dtype, torch.device("cpu"))
            z[:, cols], scale[:, cols] = zb[:, subj[cols] - b * block], sb[:, subj[cols] - b * block]
        return z.to(device), scale.to(device)

    return draw


def weighted_draws(
    log_post: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    m: torch.Tensor,
    cov: torch.Tensor,
    nsamples: int,
    generator: torch.Generator | Callable,
    *,
    df: float = 5.0,
    chunk: int = 200_000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student-t draws around every subject's MAP and their log importance weights.

    Parameters
    ----------
    log_post : callable
        ``log_post(theta, idx) -> (n,)`` unnormalized log posterior
        (``-NPL``) of subjects ``idx`` ``(n,)`` at ``theta`` ``(n, P)``.
    m : Tensor
        ``(S, P)`` proposal centres (the MAPs).
    cov : Tensor
        ``(S, P, P)`` positive definite proposal scales (inverse Hessians).
    nsamples : int
        Draws per subject.
    generator : torch.Generator or callable
        CPU generator for the draws (reseed it to repeat them exactly), or a draw function
        ``(n, S, P, df, dtype, device) -> (z (n, S, P), sqrt(df / u) (n, S))`` such as :func:`block_draws`.
    df : float
        Degrees of freedom of the proposal (heavier tails for smaller values).
    chunk : int
        Subject-draw pairs per likelihood call.

    Returns
    -------
    theta : Tensor
        ``(n, S, P)`` draws.
    log_w : Tensor
        ``(n, S)`` unnormalized log weights ``log_post - log q`` (``-inf``
        where the posterior is not finite).
    """
    S, P = m.shape
    dtype, device = m.dtype, m.device
    if isinstance(generator, torch.Generator):
        z, scale = _draw(nsamples, S, P, df, generator, dtype, device)
    else:
        z, scale = generator(nsamples, S, P, df, dtype, device)
    chol = torch.linalg.cholesky(cov)  # (S, P, P)
    step = torch.einsum("spq,nsq->nsp", chol, z) * scale[..., None]
    theta = m + step  # (n, S, P)
    # log proposal density: the Mahalanobis distance is |z|^2 df / u
    maha = (z * z).sum(-1) * scale * scale
    log_q = (math.lgamma((df + P) / 2) - math.lgamma(df / 2) - 0.5 * P * math.log(df * math.pi)
             - chol.diagonal(dim1=-2, dim2=-1).log().sum(-1) - 0.5 * (df + P) * torch.log1p(maha / df))
    lp = evaluate_pairs(log_post, theta, chunk)
    log_w = lp - log_q
    return theta, torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))


def evaluate_pairs(fun: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], theta: torch.Tensor,
                   chunk: int) -> torch.Tensor:
    """``fun`` at every draw of every subject, ``(n, S)``, in batched calls of at most ``chunk`` pairs.

    ``fun(theta, idx) -> (k,)`` takes ``k`` parameter rows ``(k, P)`` of the
    subjects ``idx`` ``(k,)``; ``theta`` is ``(n, S, P)`` and is evaluated
    draw-major without gradients.
    """
    n, S, P = theta.shape
    flat = theta.reshape(-1, P)
    idx = torch.arange(S, device=theta.device).repeat(n)
    with torch.no_grad():
        out = torch.cat([fun(flat[lo:lo + chunk], idx[lo:lo + chunk]) for lo in range(0, flat.shape[0], chunk)])
    return out.reshape(n, S)


def importance_sample(
    log_post: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    m: torch.Tensor,
    cov: torch.Tensor,
    nsamples: int,
    generator: torch.Generator | Callable,
    *,
    df: float = 5.0,
    chunk: int = 200_000,
) -> ImportanceResult:
    """Importance-sample every subject's posterior with a Student-t proposal.

    Parameters and draws as in :func:`weighted_draws`.

    Returns
    -------
    ImportanceResult
    """
    S = m.shape[0]
    theta, log_w = weighted_draws(log_post, m, cov, nsamples, generator, df=df, chunk=chunk)
    top = log_w.max(0).values
    w = torch.exp(log_w - top)  # (n, S), max 1
    w_sum = w.sum(0)
    wn = w / w_sum
    mean = torch.einsum("ns,nsp->sp", wn, theta)
    centred = theta - mean
    cov_post = torch.einsum("ns,nsp,nsq->spq", wn, centred, centred)
    mean_w = w_sum / nsamples
    log_ev = top + torch.log(mean_w)
    se = w.std(0, unbiased=True) / (mean_w * math.sqrt(nsamples))
    ess = w_sum ** 2 / (w * w).sum(0)
    return ImportanceResult(mean, 0.5 * (cov_post + cov_post.transpose(-1, -2)), log_ev, se, ess,
                            torch.full((S,), nsamples, device=m.device))
