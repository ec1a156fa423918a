"""The hierarchical EM loop (empirical Bayes with MAP E-steps) and its result.

Each iteration:

1. **E-step** -- every subject's MAP of the negative log posterior
   ``NPL_i(x) = NLL_i(x) - log N(x; mu, Sigma)`` in one batched L-BFGS
   (:func:`torchem.optim.minimize`), warm-started from the previous MAP;
   subjects whose optimization fails are restarted from draws of the current
   group distribution and the best point is kept.
2. **Curvature** -- exact Hessians of the NPL at the MAPs from ``torch.func``
   (:func:`torchem.curvature.batched_hessian`), inverted by Cholesky; a
   Hessian that is not positive definite is flagged and replaced by the
   group covariance.
3. **M-step** -- the group Gaussian is re-estimated from the MAPs and inverse
   Hessians (:meth:`torchem.groups.GaussianGroup.mstep`).

EM stops when the summed NPL changes by less than ``convergence_crit``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .curvature import batched_hessian, cap_posterior_width, invert_pd
from .data import SubjectBatch
from .groups import GaussianGroup, make_group
from .importance import ImportanceResult, importance_sample, pairs_per_call
from .model import Model
from .optim import minimize

__all__ = ["FitResult", "IterationState", "run_em", "neg_log_posterior"]


@dataclass
class IterationState:
    """What the ``callback`` of :func:`run_em` receives after every EM iteration.

    Attributes
    ----------
    iteration : int
        1-based iteration number.
    max_iterations : int
        ``mstep_maxit``.
    npl : float
        Summed negative log posterior of this E-step.
    mu, sigma : ndarray
        ``(P,)`` group mean and variance after this M-step (normalized space).
    n_estep_failed, n_hessian_bad : int
        Subjects whose optimization failed / whose Hessian was not positive definite.
    converged : bool
        Whether this iteration met the convergence criterion.
    """

    iteration: int
    max_iterations: int
    npl: float
    mu: np.ndarray
    sigma: np.ndarray
    n_estep_failed: int
    n_hessian_bad: int
    converged: bool


@dataclass
class FitResult:
    """A fitted hierarchical model.  Tensors keep the fit's device and dtype.

    Attributes
    ----------
    m : Tensor
        ``(S, P)`` per-subject MAP in normalized space.
    inv_h : Tensor
        ``(S, P, P)`` inverse Hessians of the negative log posterior at ``m``
        (exact, except where ``laplace_capped``).
    posterior_mu : Tensor
        ``(P,)`` group mean (normalized space).
    posterior_sigma : Tensor
        ``(P,)`` group variances (normalized space).
    posterior_cov : Tensor
        ``(P, P)`` group covariance (diagonal unless ``group="full"``).
    NPL, NLPrior, NLL : Tensor
        ``(S,)`` negative log posterior, negative log prior, negative log-likelihood at ``m``.
    hess_logdet : Tensor
        ``(S,)`` log-determinant of each Hessian (used for the Laplace evidence).
    hessian_ok : Tensor
        ``(S,)`` bool, Hessian finite and positive definite.
    laplace_capped : Tensor
        ``(S,)`` bool, the exact Hessian implied a Laplace posterior more
        than ``laplace_cap`` times wider (in variance) than the group prior
        along some direction; that direction's curvature was raised to the
        cap (:func:`torchem.curvature.cap_posterior_width`).
    estep_success : Tensor
        ``(S,)`` bool, the last E-step converged for the subject.
    n_obs : Tensor
        ``(S,)`` observations (unmasked trials) per subject.
    convergence : bool
        EM met ``convergence_crit`` before ``mstep_maxit``.
    n_iter : int
        EM iterations run.
    history : DataFrame
        One row per iteration: ``iteration``, ``NPL``, ``mu[name]``, ``sigma[name]``,
        ``estep_failed``, ``hessian_bad``.
    param_names : list of str
    subject_ids : list
    stopped : bool
        The callback asked to stop before convergence.
    estep : str
        ``"laplace"`` or ``"importance"``: which E-step fed the M-step.
    importance : ImportanceResult or None
        With ``estep="importance"``: the final iteration's per-subject
        posterior means, covariances, effective sample sizes and evidence.
    """

    m: torch.Tensor
    inv_h: torch.Tensor
    posterior_mu: torch.Tensor
    posterior_sigma: torch.Tensor
    posterior_cov: torch.Tensor
    NPL: torch.Tensor
    NLPrior: torch.Tensor
    NLL: torch.Tensor
    hess_logdet: torch.Tensor
    hessian_ok: torch.Tensor
    laplace_capped: torch.Tensor
    estep_success: torch.Tensor
    n_obs: torch.Tensor
    convergence: bool
    n_iter: int
    history: pd.DataFrame
    param_names: list
    subject_ids: list
    param_xform: list = field(default_factory=list, repr=False)
    group: str = "diag"
    estep: str = "laplace"
    stopped: bool = False
    importance: ImportanceResult | None = field(default=None, repr=False)

    @property
    def n_subjects(self) -> int:
        return int(self.m.shape[0])

    @property
    def n_params(self) -> int:
        return int(self.m.shape[1])

    def natural_params(self) -> torch.Tensor:
        """``(S, P)`` MAP parameters in natural space."""
        return torch.stack([t(self.m[:, j]) for j, t in enumerate(self.param_xform)], -1)

    def params_df(self) -> pd.DataFrame:
        """Natural-space MAP parameters, one row per subject, indexed by subject id."""
        values = self.natural_params().detach().cpu().numpy()
        return pd.DataFrame(values, columns=self.param_names,
                            index=pd.Index(self.subject_ids, name="subject"))

    def group_df(self) -> pd.DataFrame:
        """Group mean and standard deviation per parameter (normalized space)."""
        return pd.DataFrame(
            {"mu": self.posterior_mu.cpu().numpy(), "sd": self.posterior_sigma.sqrt().cpu().numpy()},
            index=pd.Index(self.param_names, name="parameter"),
        )

    def __repr__(self) -> str:
        mu = ", ".join(f"{n}={v:.3f}" for n, v in zip(self.param_names, self.posterior_mu.tolist()))
        sd = ", ".join(f"{n}={v:.3f}" for n, v in zip(self.param_names, self.posterior_sigma.sqrt().tolist()))
        state = "converged" if self.convergence else ("stopped" if self.stopped else "not converged")
        return (
            f"FitResult({self.n_subjects} subjects, {self.n_params} parameters, {state} after "
            f"{self.n_iter} iterations, NPL={float(self.NPL.sum()):.4f}; group mean [{mu}], "
            f"group sd [{sd}] (normalized); E-step failures {int((~self.estep_success).sum())}, "
            f"non-PD Hessians {int((~self.hessian_ok).sum())})"
        )


def neg_log_posterior(model: Model, batch: SubjectBatch, group: GaussianGroup) -> Callable:
    """``fun(x, idx)``: negative log posterior of the subjects ``idx`` at ``x``."""
    data, mask, S = batch.data, batch.mask, batch.n_subjects
    everyone = torch.arange(S, device=mask.device)

    def fun(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if idx.numel() == S and bool((idx == everyone).all()):  # all subjects in order: no copy
            return model.nll(x, data, mask) + group.neg_log_prior(x)
        return model.nll(x, tuple(d[idx] for d in data), mask[idx]) + group.neg_log_prior(x)

    return fun


def _estep(fun: Callable, x0: torch.Tensor, warm: dict, group: GaussianGroup,
           generator: torch.Generator, max_restarts: int, optim_kwargs: dict):
    """Batched MAP search; failed subjects restart from group draws, keeping the best point.

    ``warm`` holds what is known at ``x0`` (``f0``, ``g0``, ``h0``: value,
    gradient and inverse Hessian under the current prior), so the warm start
    begins with an exact Newton step and no extra evaluation.
    Returns ``x``, ``f``, ``g`` and the success flags, subjects first.
    """
    res = minimize(fun, x0, **warm, **optim_kwargs)
    x, f, g, ok = res.x, res.fun, res.grad, res.success
    # a subject stalled on a kink of a non-smooth likelihood sits at a local minimum already:
    # restarts from elsewhere end on the same kink, so only the other failures are retried
    retry = ~ok & ~res.stalled
    for _ in range(max_restarts):
        failed = retry.nonzero().squeeze(1)
        if failed.numel() == 0:
            break
        starts = group.sample(failed.numel(), generator)
        sub = minimize(lambda z, i: fun(z, failed[i]), starts, **optim_kwargs)
        f_old = torch.where(torch.isfinite(f[failed]), f[failed], torch.full_like(sub.fun, math.inf))
        better = (sub.success & ~ok[failed]) | (sub.fun < f_old)
        take = failed[better]
        x[take], f[take], g[take] = sub.x[better], sub.fun[better], sub.grad[better]
        ok[take] = sub.success[better]
        retry[failed] = ~sub.success & ~sub.stalled & ~ok[failed]
    return x, f, g, ok


def _warm_start(x: torch.Tensor, nll: torch.Tensor, g_lik: torch.Tensor, h_lik: torch.Tensor,
                group: GaussianGroup, laplace_cap: float) -> dict:
    """Value, gradient and inverse Hessian at ``x`` under a new prior, from the likelihood parts.

    The likelihood's value, gradient and Hessian at the previous MAP do not
    change when the prior does, so the next E-step starts with an exact
    Newton step at no cost.
    """
    H, _ = cap_posterior_width(h_lik + group.precision, group.cov, laplace_cap)
    h0, _, _ = invert_pd(H, group.cov)
    return {"f0": nll + group.neg_log_prior(x), "g0": g_lik + group.grad_neg_log_prior(x), "h0": h0}


def _group_change(old: GaussianGroup, new: GaussianGroup) -> float:
    """Largest relative change of a group mean or SD."""
    d_mu = ((new.mu - old.mu).abs() / (1.0 + old.mu.abs())).max()
    sd_old, sd_new = old.var.sqrt(), new.var.sqrt()
    d_sd = ((sd_new - sd_old).abs() / (1.0 + sd_old)).max()
    return float(torch.maximum(d_mu, d_sd))


def _importance_step(fun: Callable, x: torch.Tensor, inv_h: torch.Tensor, nsamples: int, seed: int,
                     df: float, min_ess: float, chunk: int) -> ImportanceResult:
    """Importance moments of every subject's posterior; low-ESS subjects are redrawn with 4x the samples."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    res = importance_sample(lambda th, i: -fun(th, i), x, inv_h, nsamples, gen, df=df, chunk=chunk)
    low = (res.ess < min_ess).nonzero().squeeze(1)
    if low.numel():
        more = importance_sample(lambda th, i: -fun(th, low[i]), x[low], inv_h[low], 4 * nsamples, gen,
                                 df=df, chunk=chunk)
        for name in ("mean", "cov", "log_evidence", "log_evidence_se", "ess", "nsamples"):
            getattr(res, name)[low] = getattr(more, name)
    return res


def run_em(
    model: Model,
    batch: SubjectBatch,
    *,
    group: str = "diag",
    mstep_maxit: int = 800,
    convergence_crit: float = 1e-3,
    seed: int | None = 0,
    max_restarts: int = 2,
    estep_maxit: int = 200,
    gtol: float = 1e-5,
    hessian_chunk: int = 20000,
    verbose: int = 1,
    callback: Callable[[IterationState], Any] | None = None,
    estep: str = "laplace",
    nsamples: int = 1000,
    final_nsamples: int | None = None,
    proposal_df: float = 5.0,
    min_ess: float = 50.0,
    group_tol: float = 1e-3,
    laplace_cap: float = 4.0,
    init_var: float = 1.0,
) -> FitResult:
    """Fit the hierarchical model by EM with batched MAP E-steps.

    Parameters
    ----------
    model : Model
        Likelihood, parameter names and transforms.
    batch : SubjectBatch
        Data on the device and dtype of the fit.
    group : {"diag", "full"}
        Group covariance: diagonal (pyEM's default) or full.
    mstep_maxit : int
        Maximum EM iterations.
    convergence_crit : float
        Stop when the summed NPL changes by less than this between iterations.
    seed : int or None
        Seed of the starting points and restarts; the same seed on the same
        device gives identical results.
    max_restarts : int
        Restarts from random starts for subjects whose E-step fails.
    estep_maxit, gtol : int, float
        L-BFGS iteration cap and gradient tolerance (largest absolute
        gradient entry, as scipy's BFGS) per E-step.
    hessian_chunk : int
        Subjects per Hessian evaluation (bounds memory).
    init_var : float
        Variance of the starting group prior (mean 0).  The standard normal
        matches the scale of the normalized space and makes the first E-step
        well posed; pyEM starts from 100 (almost flat), which reaches the
        same fixed point in more iterations.
    laplace_cap : float
        Largest ratio of a subject's Laplace posterior variance to the group
        variance along any direction; Hessians that imply more (a MAP on a
        near-flat shoulder of the likelihood) are capped and flagged in
        ``laplace_capped``.  ``math.inf`` disables the cap.
    verbose : int
        0: silent; 1: a tqdm bar with the iteration and NPL.
    callback : callable, optional
        Called with an :class:`IterationState` after every iteration;
        returning ``False`` stops EM there (the result so far is kept).
    estep : {"laplace", "importance"}
        ``"laplace"``: the M-step uses each MAP and inverse Hessian (pyEM,
        emfit, cbm).  ``"importance"``: it uses posterior means and
        covariances from importance sampling around the MAP
        (:mod:`torchem.importance`), which removes the Laplace bias of the
        group estimates.
    nsamples : int
        Importance draws per subject and iteration (the same draws every
        iteration: common random numbers).
    final_nsamples : int, optional
        Draws of the final iteration run after convergence (default ``4 * nsamples``).
    proposal_df : float
        Degrees of freedom of the Student-t proposal.
    min_ess : float
        Subjects whose effective sample size falls below this are redrawn
        with four times the samples; a warning reports any still below.
    group_tol : float
        Importance E-step convergence: the relative change of every group
        mean and SD stays below this for three iterations in a row.  The
        importance iterations start from the converged Laplace EM solution
        (the ``estep`` column of ``history`` tells which iterations sampled).

    Returns
    -------
    FitResult
    """
    if estep not in ("laplace", "importance"):
        raise ValueError(f"estep must be 'laplace' or 'importance', got {estep!r}")
    final_nsamples = 4 * nsamples if final_nsamples is None else final_nsamples
    S, P = batch.n_subjects, model.n_params
    dtype = next((t.dtype for t in batch.data if t.is_floating_point()), torch.float64)
    device = batch.device
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(int(seed))
    else:
        generator.seed()
    grp = make_group(group, P, dtype=dtype, device=device, var=init_var)
    x = 0.1 * torch.randn(S, P, generator=generator, dtype=dtype).to(device)
    optim_kwargs = {"max_iter": estep_maxit, "gtol": gtol}
    all_idx = torch.arange(S, device=device)
    crn_seed = (0 if seed is None else int(seed)) + 7919  # common random numbers for every iteration
    inv_h = isr = None
    warm: dict = {}
    sampling = False  # importance E-steps start once Laplace EM has converged
    chunk = pairs_per_call(batch.mask[0].numel(), device)
    rows: list[dict] = []
    npl_old = math.inf
    deltas: list[float] = []
    converged = stopped = final_pass = False
    it = 0
    bar = tqdm(total=mstep_maxit, desc=f"EM ({estep})", disable=not verbose, leave=True)
    try:
        while it < mstep_maxit or final_pass:
            it += 1
            fun = neg_log_posterior(model, batch, grp)
            x, npl, grad, ok_opt = _estep(fun, x, warm, grp, generator, max_restarts, optim_kwargs)
            usable = torch.isfinite(npl) & torch.isfinite(x).all(1)
            if not usable.all():
                raise RuntimeError(
                    f"{int((~usable).sum())} subject(s) have a non-finite objective at every start "
                    f"(first: {batch.subject_ids[int((~usable).nonzero()[0])]!r}); check the model and data"
                )
            H = torch.cat([
                batched_hessian(lambda z, lo=lo: fun(z, all_idx[lo:lo + hessian_chunk]), x[lo:lo + hessian_chunk])
                for lo in range(0, S, hessian_chunk)
            ])
            nlprior = grp.neg_log_prior(x)
            lik_parts = (npl - nlprior, grad - grp.grad_neg_log_prior(x), H - grp.precision)  # prior-free: reused next time
            H, capped = cap_posterior_width(H, grp.cov, laplace_cap)
            inv_h, logdet, ok_h = invert_pd(H, grp.cov)
            total = float(npl.sum())
            row = {"iteration": it, "NPL": total}
            if sampling:
                n = final_nsamples if final_pass else nsamples
                isr = _importance_step(fun, x, inv_h, n, crn_seed + int(final_pass), proposal_df, min_ess,
                                       chunk)
                new_grp = grp.mstep(isr.mean, isr.cov)
                deltas.append(_group_change(grp, new_grp))
                if not final_pass:  # the final, larger sample only refines a converged (or capped) run
                    converged = len(deltas) >= 3 and max(deltas[-3:]) < group_tol
                row.update({"estep": "importance", "nsamples": n, "ess_min": float(isr.ess.min()),
                            "group_change": deltas[-1]})
            else:
                new_grp = grp.mstep(x, inv_h)
                converged = abs(total - npl_old) < convergence_crit
                row["estep"] = "laplace"
            row.update({f"mu[{n}]": v for n, v in zip(model.param_names, new_grp.mu.tolist())})
            row.update({f"sigma[{n}]": v for n, v in zip(model.param_names, new_grp.var.tolist())})
            row.update({"estep_failed": int((~ok_opt).sum()), "hessian_bad": int((~ok_h).sum()),
                        "laplace_capped": int(capped.sum())})
            rows.append(row)
            bar.update(1)
            bar.set_postfix(NPL=f"{total:.4f}")
            grp, npl_old = new_grp, total
            warm = _warm_start(x, *lik_parts, grp, laplace_cap)
            if callback is not None:
                state = IterationState(it, mstep_maxit, total, new_grp.mu.cpu().numpy(), new_grp.var.cpu().numpy(),
                                       row["estep_failed"], row["hessian_bad"], converged)
                if callback(state) is False and not converged:
                    stopped = True
                    break
            if final_pass:
                break
            if estep == "importance" and not sampling and (converged or it == mstep_maxit):
                sampling, converged = True, False  # Laplace EM brought us close: now remove its bias
                if it == mstep_maxit:
                    final_pass = True
            elif sampling and (converged or it == mstep_maxit):
                final_pass = True  # one more iteration with the larger sample
            elif converged:
                break
    finally:
        bar.close()
    if rows and rows[-1]["hessian_bad"]:
        warnings.warn(f"{rows[-1]['hessian_bad']} subject(s) had a Hessian that is not positive definite at the "
                      "final MAP; their inverse Hessian was replaced by the group covariance (see hessian_ok)",
                      RuntimeWarning, stacklevel=3)
    if isr is not None and bool((isr.ess < min_ess).any()):
        warnings.warn(f"{int((isr.ess < min_ess).sum())} subject(s) kept an effective sample size below "
                      f"{min_ess:g} after redrawing (see result.importance.ess); raise nsamples",
                      RuntimeWarning, stacklevel=3)
    if rows and rows[-1]["estep_failed"]:
        warnings.warn(f"{rows[-1]['estep_failed']} subject(s) did not converge in the final E-step "
                      "(see estep_success); their best point was kept", RuntimeWarning, stacklevel=3)
    return FitResult(
        m=x, inv_h=inv_h, posterior_mu=grp.mu, posterior_sigma=grp.var, posterior_cov=grp.cov,
        NPL=npl, NLPrior=nlprior, NLL=npl - nlprior, hess_logdet=logdet, hessian_ok=ok_h, laplace_capped=capped,
        estep_success=ok_opt, n_obs=batch.n_obs, convergence=converged, n_iter=len(rows),
        history=pd.DataFrame(rows), param_names=list(model.param_names), subject_ids=list(batch.subject_ids),
        param_xform=list(model.param_xform), group=group, estep=estep, stopped=stopped, importance=isr,
    )
