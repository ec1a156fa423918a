"""Individual (non-hierarchical) fits: every subject's maximum likelihood estimate, or its MAP under a fixed prior.

All subjects and all random starts run as one batched L-BFGS: start ``k`` of
subject ``i`` is row ``k * S + i``.  The best row per subject is kept, and
the exact Hessian of its objective gives the inverse Hessian and standard
errors.  pyEM's ``EMModel.scipy_minimize`` is the per-subject version of this.
"""
from __future__ import annotations

import math
import warnings

import pandas as pd
import torch

from .curvature import batched_hessian, invert_pd
from .data import SubjectBatch
from .estep import SubjectStatus, neg_log_posterior
from .model import Model
from .optim import minimize
from .priors import Prior

__all__ = ["fit_individual"]


class _Flat(Prior):
    """The improper flat prior (maximum likelihood): zero negative log density."""

    def __init__(self, n_params: int, dtype: torch.dtype, device) -> None:
        self._zero = torch.zeros(n_params, dtype=dtype, device=device)

    @property
    def mean(self):
        return self._zero

    @property
    def var(self):
        return torch.ones_like(self._zero)

    def neg_log_prior(self, x, idx=None):
        return 0.0 * x.sum(-1)

    def hessian(self, x, idx=None):
        return torch.zeros(x.shape[0], x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)

    def sample(self, n, generator=None, idx=None):
        return self._randn(n, generator)


def fit_individual(model: Model, batch: SubjectBatch, prior: Prior | None = None, *, nstarts: int = 10,
                   seed: int | None = 0, maxit: int = 500, gtol: float = 1e-7):
    """Fit every subject on its own, from ``nstarts`` random starts each.

    Parameters
    ----------
    model, batch : Model, SubjectBatch
        Likelihood and data (the fit's device and dtype).
    prior : Prior, optional
        Fixed prior (MAP fits); ``None`` gives maximum likelihood.
    nstarts : int
        Starts per subject: the prior's location (0 without a prior), then
        draws from the prior (standard normal without one).
    seed : int or None
        Seed of the starts.
    maxit, gtol : int, float
        L-BFGS iterations and gradient tolerance.

    Returns
    -------
    FitResult
        ``group`` is the prior (``None`` for maximum likelihood),
        ``estep="individual"``; ``standard_errors()`` gives per-parameter SEs.
    """
    from .em import FitResult

    if not isinstance(nstarts, int) or nstarts < 1:
        raise ValueError(f"nstarts must be an integer >= 1, got {nstarts!r}")
    S, P = batch.n_subjects, model.n_params
    dtype = next((t.dtype for t in batch.data if t.is_floating_point()), torch.float64)
    dev = batch.device
    gen = torch.Generator()
    gen.manual_seed(0 if seed is None else int(seed))
    used = _Flat(P, dtype, dev) if prior is None else prior.to(dev, dtype)
    if used.n_params != P:
        raise ValueError(f"the prior has {used.n_params} parameters, the model {P}")
    starts = torch.cat([used.mean.expand(S, P)] + [used.sample(S, gen) for _ in range(nstarts - 1)])
    if prior is not None and isinstance(prior, Prior):
        inside = torch.isfinite(used.neg_log_prior(starts))
        starts = torch.where(inside[:, None], starts, used.mean.expand_as(starts))
    subjects = torch.arange(S, device=dev).repeat(nstarts)
    fun = neg_log_posterior(model, batch, used, subjects)
    res = minimize(fun, starts, max_iter=maxit, gtol=gtol)
    f = torch.where(torch.isfinite(res.fun), res.fun, torch.full_like(res.fun, math.inf)).reshape(nstarts, S)
    best = f.argmin(0)
    rows = best * S + torch.arange(S, device=dev)
    x, npl = res.x[rows], res.fun[rows]
    status = torch.where(res.success[rows], SubjectStatus.CONVERGED,
                         torch.where(res.stalled[rows], SubjectStatus.STALLED, SubjectStatus.FAILED)).to(torch.int8)
    own = neg_log_posterior(model, batch, used)
    H = batched_hessian(lambda z: own(z, torch.arange(S, device=dev)), x)
    inv_h, logdet, ok = invert_pd(H, torch.eye(P, dtype=dtype, device=dev))
    inv_h = torch.where(ok[:, None, None], inv_h, torch.full_like(inv_h, math.nan))
    nlprior = used.neg_log_prior(x)
    warn = []
    if not bool(ok.all()):
        warn.append(f"{int((~ok).sum())} subject(s) have a Hessian that is not positive definite at their best "
                    "point (a parameter runs to the edge of its range): their standard errors are NaN")
    if bool((status > SubjectStatus.RECOVERED).any()):
        warn.append(f"{int((status > SubjectStatus.RECOVERED).sum())} subject(s) did not converge from any start")
    for w in warn:
        warnings.warn(w, RuntimeWarning, stacklevel=3)
    hist = pd.DataFrame({"start": range(nstarts), "best_for": [int((best == k).sum()) for k in range(nstarts)]})
    return FitResult(
        m=x, inv_h=inv_h, group=prior if prior is None else used, NPL=npl, NLPrior=nlprior, NLL=npl - nlprior,
        hess_logdet=logdet, hessian_ok=ok, laplace_capped=torch.zeros_like(ok), status=status, n_obs=batch.n_obs,
        convergence=bool((status == SubjectStatus.CONVERGED).all()), n_iter=1, history=hist,
        param_names=list(model.param_names), subject_ids=list(batch.subject_ids),
        param_xform=list(model.param_xform), stop_reason="individual fits", warnings=warn, estep="individual")
