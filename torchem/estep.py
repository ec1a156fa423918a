"""E-steps: every subject's posterior moments under the current group distribution.

An E-step is called with the subjects to update (an index) and the group
prior, and returns their :class:`PosteriorMoments`: posterior means ``(s, P)``
and covariances ``(s, P, P)`` for the M-step, the negative log posterior and
prior at the MAP, an approximate log evidence and one :class:`SubjectStatus`
per subject.  It never sees the whole study at once, so a chunk of one device
and a shard of one process run the same code.

- :class:`LaplaceEStep`: MAP by one batched L-BFGS (warm-started with an
  exact Newton step from the previous MAP), exact Hessian (:func:`~torchem.curvature.batched_hessian`),
  moments ``(MAP, H^-1)``, evidence ``-NPL + P/2 log 2 pi - 1/2 log det H``.
- :class:`ImportanceEStep`: the Laplace E-step, then importance-sampled
  moments and evidence around each MAP (:mod:`torchem.importance`).
"""
from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, fields
from typing import Callable

import torch

from .curvature import batched_hessian, cap_posterior_width, invert_pd
from .data import SubjectBatch
from .importance import ImportanceResult, block_draws, importance_sample, pairs_per_call
from .model import Model
from .optim import minimize
from .priors import Prior

__all__ = ["SubjectStatus", "PosteriorMoments", "LaplaceEStep", "ImportanceEStep", "neg_log_posterior",
           "run_in_chunks", "auto_chunk_size", "free_memory", "restart_draws"]


class SubjectStatus(enum.IntEnum):
    """How a subject's last MAP search ended (one value per subject, stored as ``int8``)."""

    CONVERGED = 0  #: the gradient fell below tolerance
    RECOVERED = 1  #: the first search failed; a restart from a group draw converged
    STALLED = 2  #: steps along the gradient no longer lower the objective (a kink); point kept
    FAILED = 3  #: no start converged; the best point was kept


@dataclass
class PosteriorMoments:
    """One E-step's output for the subjects ``index``; every tensor has those subjects first.

    Attributes
    ----------
    index : Tensor
        ``(s,)`` subject indices.
    m, V : Tensor
        ``(s, P)`` posterior means and ``(s, P, P)`` covariances (what the M-step uses).
    x, inv_h : Tensor
        ``(s, P)`` MAPs and ``(s, P, P)`` inverse Hessians of the NPL there (capped where ``capped``).
    npl, nlprior : Tensor
        ``(s,)`` negative log posterior and negative log prior at the MAP.
    logdet : Tensor
        ``(s,)`` log-determinant of the (capped) Hessian.
    log_evidence : Tensor
        ``(s,)`` approximate ``log p(D_i)``: Laplace, or importance-sampled.
    laplace_lme : Tensor
        ``(s,)`` the Laplace log evidence (the variational bound under a
        heavy-tailed group's local prior), also after an importance E-step.
    status : Tensor
        ``(s,)`` ``int8`` :class:`SubjectStatus`.
    hessian_ok, capped : Tensor
        ``(s,)`` bool: Hessian finite and positive definite; Laplace posterior width capped.
    importance : ImportanceResult or None
        The importance summaries (importance E-step only).
    """

    index: torch.Tensor
    m: torch.Tensor
    V: torch.Tensor
    x: torch.Tensor
    inv_h: torch.Tensor
    npl: torch.Tensor
    nlprior: torch.Tensor
    logdet: torch.Tensor
    log_evidence: torch.Tensor
    laplace_lme: torch.Tensor
    status: torch.Tensor
    hessian_ok: torch.Tensor
    capped: torch.Tensor
    importance: ImportanceResult | None = None

    @property
    def estep_success(self) -> torch.Tensor:
        """``(s,)`` bool: the MAP search converged (directly or after a restart)."""
        return self.status <= SubjectStatus.RECOVERED


def neg_log_posterior(model: Model, batch: SubjectBatch, prior: Prior,
                      subjects: torch.Tensor | None = None, first: int = 0, host: bool = False) -> Callable:
    """``fun(x, idx)``: negative log posterior of problems ``idx`` at ``x`` ``(n, P)``.

    Problem ``k`` is subject ``subjects[k]`` (all subjects in order when ``subjects`` is ``None``);
    row ``r`` of ``batch`` holds subject ``first + r`` (a rank's shard starts at ``first``).
    ``host``: ``batch`` is held in (pinned) host memory and the subjects' rows are copied once to the
    device of ``subjects`` (:meth:`~torchem.data.SubjectBatch.rows_to`).
    """
    data, mask, S = batch.data, batch.mask, batch.n_subjects
    if subjects is None:
        subjects = torch.arange(first, first + S, device=mask.device)
    n, rows = subjects.numel(), subjects - first if first else subjects
    if host:
        data, mask = batch.rows_to(rows, subjects.device)
    elif not (n == S and bool((rows == torch.arange(S, device=mask.device)).all())):
        data, mask = tuple(d[rows] for d in data), mask[rows]  # a chunk's data, gathered once

    def rows(idx: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        if idx.numel() == n:  # all problems in order: no copy of the data
            return data, mask
        return tuple(d[idx] for d in data), mask[idx]

    def fun(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return model.nll(x, *rows(idx)) + prior.neg_log_prior(x, subjects[idx])

    # a model's own derivatives, without autograd ("Own derivatives" in torchem.model)
    if model.has_own("value_and_grad"):
        def value_and_grad(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f, g = model.nll_and_grad(x, *rows(idx))
            subj = subjects[idx]
            return f + prior.neg_log_prior(x, subj), g + prior.grad(x, subj)

        fun.value_and_grad = value_and_grad
    if model.has_own("hessian"):
        fun.hessian = lambda x, idx: model.nll_hessian(x, *rows(idx)) + prior.hessian(x, subjects[idx])
    return fun


def objective_hessian(fun: Callable, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``(n, P, P)`` exact Hessians of ``fun(., idx)`` at ``x``: ``fun.hessian`` where the objective carries one
    (:func:`neg_log_posterior` of a model with its own Hessian), else :func:`~torchem.curvature.batched_hessian`."""
    own = getattr(fun, "hessian", None)
    if own is not None:
        return own(x, idx)
    return batched_hessian(lambda z: fun(z, idx), x)


def restart_draws(prior: Prior, subjects: torch.Tensor, seed: int, step: int, round: int) -> torch.Tensor:
    """``(n, P)`` restart points drawn from ``prior``, one per subject, each from its own generator.

    The generator of subject ``s`` is seeded by ``(seed, step, s, round)``, so a subject's draws do not
    depend on which other subjects failed or on how the subjects are chunked.
    """
    starts = []
    for s in subjects.tolist():
        gen = torch.Generator()
        gen.manual_seed(hash((seed, step, s, round)) & (2**63 - 1))
        starts.append(prior.sample(1, gen))
    return torch.cat(starts)


def _map_search(fun: Callable, x0: torch.Tensor, warm: dict, draw: Callable[[torch.Tensor, int], torch.Tensor],
                max_restarts: int, optim_kwargs: dict):
    """Batched MAP search; failed subjects restart from ``draw(problems, round)``, keeping the best point.

    Returns ``x``, ``f``, ``g`` and the ``int8`` status, problems first.
    """
    res = minimize(fun, x0, **warm, **optim_kwargs)
    x, f, g = res.x, res.fun, res.grad
    status = torch.where(res.success, SubjectStatus.CONVERGED,
                         torch.where(res.stalled, SubjectStatus.STALLED, SubjectStatus.FAILED)).to(torch.int8)
    # a subject stalled on a kink sits at a local minimum already: a restart ends on the same kink
    retry = status == SubjectStatus.FAILED
    for round in range(max_restarts):
        failed = retry.nonzero().squeeze(1)
        if failed.numel() == 0:
            break
        starts = draw(failed, round)
        sub = minimize(lambda z, i: fun(z, failed[i]), starts, **optim_kwargs)
        f_old = torch.where(torch.isfinite(f[failed]), f[failed], torch.full_like(sub.fun, math.inf))
        better = sub.success | (sub.fun < f_old)
        take = failed[better]
        x[take], f[take], g[take] = sub.x[better], sub.fun[better], sub.grad[better]
        status[take] = torch.where(sub.success[better], SubjectStatus.RECOVERED, SubjectStatus.FAILED).to(torch.int8)
        retry[failed] = ~sub.success & ~sub.stalled
    return x, f, g, status


class LaplaceEStep:
    """MAP, exact Hessian and Laplace moments of each subject, warm-started from the previous call.

    Parameters
    ----------
    model, batch : Model, SubjectBatch
        The likelihood and the data (on the fit's device and dtype).
    x0 : Tensor
        ``(S, P)`` starting points of the first call.
    max_restarts, estep_maxit, gtol, hessian_chunk, laplace_cap, variational
        See :class:`torchem.options.FitOptions`.
    host : bool
        ``batch`` stays in (pinned) host memory; each call copies its subjects' data to the device of ``x0``.
    generator : torch.Generator
        CPU generator of the base seed of the restarts' draws (see :func:`restart_draws`; ``step``, the
        E-step number, is set by the caller).
    first : int
        Subject number of the batch's first row (a rank's shard; ``x0`` and the indices are of all subjects).

    The likelihood's value, gradient and Hessian at a subject's last MAP do
    not depend on the prior, so the next call starts that subject with an
    exact Newton step under the new prior at no extra evaluation.
    """

    def __init__(self, model: Model, batch: SubjectBatch, x0: torch.Tensor, *, generator: torch.Generator,
                 max_restarts: int = 2, estep_maxit: int = 200, gtol: float = 1e-5, hessian_chunk: int = 20000,
                 laplace_cap: float = 4.0, variational: bool = True, first: int = 0,
                 host: bool = False) -> None:
        self.model, self.batch, self.first, self.host = model, batch, first, host
        self.restart_seed, self.step = int(torch.randint(0, 2**62, (1,), generator=generator)), 0
        self.x = x0.clone()
        S, P = x0.shape
        self.lik = None  # (nll (S,), grad (S, P), hess (S, P, P)) of the likelihood at self.x
        self.max_restarts, self.hessian_chunk, self.laplace_cap = max_restarts, hessian_chunk, laplace_cap
        # below sqrt(eps) a gradient is rounding noise: float32 E-steps stop there
        gtol = max(gtol, math.sqrt(torch.finfo(x0.dtype).eps))
        self.optim_kwargs = {"max_iter": estep_maxit, "gtol": gtol}
        self.has_lik = torch.zeros(S, dtype=torch.bool, device=x0.device)
        self.variational = variational  # False: every E-step is the MAP under the prior itself
        self.v: torch.Tensor | None = None  # (S, P) posterior variances of the last call (for Prior.local)
        self._local: tuple | None = None  # (prior, step, local prior) of the current E-step

    def snapshot(self) -> tuple:
        """The warm-start state (MAPs, variances, likelihood derivatives), for :meth:`restore`."""
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        return (self.x.clone(), clone(self.v), self.has_lik.clone(),
                None if self.lik is None else tuple(t.clone() for t in self.lik))

    def restore(self, state: tuple) -> None:
        """Go back to a :meth:`snapshot`: after a rejected trial the next E-step starts (and, for a
        heavy-tailed group, builds its local prior) from the kept point, so EM's map does not depend on
        which trials were rejected."""
        self.x, self.v, self.has_lik, self.lik = state
        self._local = None

    def local_prior(self, prior: Prior) -> Prior:
        """``prior.local`` at every subject's last moments, built once per E-step (chunks share it)."""
        if not self.variational:
            return prior
        if self._local is None or self._local[0] is not prior or self._local[1] != self.step:
            # the subjects of this batch (a rank's shard: the rows of other ranks' subjects are not used)
            mine = self.has_lik[self.first:self.first + self.batch.n_subjects]
            have = self.v is not None and bool(mine.all())
            self._local = (prior, self.step, prior.local(self.x if have else None, self.v if have else None))
        return self._local[2]

    def _warm(self, idx: torch.Tensor, prior: Prior) -> dict:
        if self.lik is None or not bool(self.has_lik[idx].all()):
            return {}
        x = self.x[idx]
        nll, g, h = (t[idx] for t in self.lik)
        H, _ = cap_posterior_width(h + prior.hessian(x, idx), prior.spread, self.laplace_cap)
        h0 = invert_pd(H, prior.spread)[0]
        return {"f0": nll + prior.neg_log_prior(x, idx), "g0": g + prior.grad(x, idx), "h0": h0}

    def run(self, idx: torch.Tensor, prior: Prior) -> PosteriorMoments:
        """Posterior moments of the subjects ``idx`` ``(s,)`` under ``prior``.

        The MAP search and the Hessian use ``prior.local(...)`` (the prior
        itself, or a heavy-tailed group's variational form); ``npl`` and
        ``nlprior`` are reported under ``prior`` itself, and the log evidence
        is the Laplace one, or the variational bound where the local prior
        differs.
        """
        target, prior = prior, self.local_prior(prior)
        fun = neg_log_posterior(self.model, self.batch, prior, idx, self.first, self.host)

        def draw(problems: torch.Tensor, round: int) -> torch.Tensor:
            return restart_draws(prior, idx[problems], self.restart_seed, self.step, round)

        x, npl, grad, status = _map_search(fun, self.x[idx], self._warm(idx, prior), draw, self.max_restarts,
                                           self.optim_kwargs)
        usable = torch.isfinite(npl) & torch.isfinite(x).all(1)
        if not bool(usable.all()):
            first = int(idx[(~usable).nonzero()[0]])
            raise RuntimeError(
                f"{int((~usable).sum())} subject(s) have a non-finite objective at every start "
                f"(first: {self.batch.subject_ids[first - self.first]!r}); check the model and data")
        n, c = idx.numel(), self.hessian_chunk
        local = torch.arange(n, device=idx.device)
        H = torch.cat([objective_hessian(fun, x[lo:lo + c], local[lo:lo + c]) for lo in range(0, n, c)])
        nlprior = prior.neg_log_prior(x, idx)
        lik = (npl - nlprior, grad - prior.grad(x, idx), H - prior.hessian(x, idx))
        H = lik[2] + prior.curvature(x, idx)
        if self.lik is None:
            S, P = self.x.shape
            self.lik = (torch.zeros(S, dtype=x.dtype, device=x.device), torch.zeros_like(self.x),
                        torch.zeros(S, P, P, dtype=x.dtype, device=x.device))
        for store, new in zip(self.lik, lik):
            store[idx] = new
        self.x[idx] = x
        self.has_lik[idx] = True
        H, capped = cap_posterior_width(H, prior.spread, self.laplace_cap)
        inv_h, logdet, ok_h = invert_pd(H, prior.spread)
        P = x.shape[1]
        v = inv_h.diagonal(dim1=-2, dim2=-1)
        if self.v is None:
            self.v = torch.zeros_like(self.x)
        self.v[idx] = v
        if prior is target:
            lme = -npl + 0.5 * P * math.log(2 * math.pi) - 0.5 * logdet
        else:  # variational bound: E_q[log lik] (quadratic) + E_q[log group] + entropy of q = N(x, inv_h)
            nlprior = target.neg_log_prior(x, idx)
            npl = lik[0] + nlprior
            lme = (-lik[0] - 0.5 * (lik[2] * inv_h).sum((-2, -1)) - target.expected_neg_log_prior(x, v, idx)
                   + 0.5 * P * math.log(2 * math.pi * math.e) - 0.5 * logdet)
        return PosteriorMoments(idx, x, inv_h, x, inv_h, npl, nlprior, logdet, lme, lme, status, ok_h, capped)


class ImportanceEStep:
    """Importance-sampled posterior moments around each subject's MAP.

    Runs the Laplace E-step for the MAPs and inverse Hessians, then draws
    ``nsamples`` Student-t proposals per subject with the same seed every
    call (common random numbers); subjects whose effective sample size falls
    below ``min_ess`` are redrawn with four times the samples.
    """

    def __init__(self, laplace: LaplaceEStep, *, seed: int, nsamples: int, proposal_df: float = 5.0,
                 min_ess: float = 50.0) -> None:
        self.laplace, self.seed, self.nsamples = laplace, seed, nsamples
        self.proposal_df, self.min_ess = proposal_df, min_ess
        batch = laplace.batch
        self.chunk = pairs_per_call(batch.mask[0].numel(), laplace.x.device)

    def run(self, idx: torch.Tensor, prior: Prior, nsamples: int | None = None) -> PosteriorMoments:
        """Importance moments of the subjects ``idx`` under ``prior`` (``nsamples`` overrides the default)."""
        post = self.laplace.run(idx, prior)
        fun = neg_log_posterior(self.laplace.model, self.laplace.batch, prior, idx, self.laplace.first,
                                self.laplace.host)
        n = self.nsamples if nsamples is None else nsamples
        # a subject's draws depend on the seed and the subject only (not on its chunk or rank)
        seed = self.seed + (n != self.nsamples)
        isr = importance_draws(fun, post.x, post.inv_h, n, seed, self.proposal_df, self.min_ess, self.chunk, idx)
        post.m, post.V, post.log_evidence, post.importance = isr.mean, isr.cov, isr.log_evidence, isr
        return post


def importance_draws(fun: Callable, x: torch.Tensor, inv_h: torch.Tensor, nsamples: int, seed: int,
                     df: float, min_ess: float, chunk: int, subjects: torch.Tensor | None = None) -> ImportanceResult:
    """Importance moments of every problem's posterior ``exp(-fun)``; low-ESS problems are redrawn with 4x the samples.

    Problem ``k`` is subject ``subjects[k]`` (default ``k``); its draws depend only on ``seed`` and the subject
    (:func:`~torchem.importance.block_draws`; the redraws from a second stream).
    """
    if subjects is None:
        subjects = torch.arange(x.shape[0])
    res = importance_sample(lambda th, i: -fun(th, i), x, inv_h, nsamples, block_draws(seed, subjects),
                            df=df, chunk=chunk)
    low = (res.ess < min_ess).nonzero().squeeze(1)
    if low.numel():
        more = importance_sample(lambda th, i: -fun(th, low[i]), x[low], inv_h[low], 4 * nsamples,
                                 block_draws(seed, subjects[low.to(subjects.device)], stream=1), df=df, chunk=chunk)
        for name in ("mean", "cov", "log_evidence", "log_evidence_se", "ess", "nsamples"):
            getattr(res, name)[low] = getattr(more, name)
    return res


def run_in_chunks(run: Callable[[torch.Tensor], PosteriorMoments], idx: torch.Tensor,
                  chunk_size: int | None) -> PosteriorMoments:
    """``run(idx)`` over consecutive chunks of ``chunk_size`` subjects, joined in subject order.

    Every subject's moments depend only on that subject (restarts included:
    :func:`restart_draws`), so the joined result is the one of a single call,
    bit for bit in float64 on the CPU.
    """
    n = idx.numel()
    if chunk_size is None or chunk_size >= n:
        return run(idx)
    parts = [run(idx[lo:lo + chunk_size]) for lo in range(0, n, chunk_size)]
    joined = {f.name: torch.cat([getattr(p, f.name) for p in parts])
              for f in fields(PosteriorMoments) if f.name != "importance"}
    imp = None
    if parts[0].importance is not None:
        imp = ImportanceResult(**{f.name: torch.cat([getattr(p.importance, f.name) for p in parts])
                                  for f in fields(ImportanceResult)})
    return PosteriorMoments(**joined, importance=imp)


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors: free GPU memory, or the CPU's available RAM (``/proc/meminfo``)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


#: Trial cells per E-step chunk that ``chunk_size="auto"`` does not exceed on the CPU: larger chunks leave the
#: processor's caches (rw1a1b, 96 trials, one thread, CPU time: 6-7 us per subject for a likelihood and gradient
#: at 1,000-10,000 subjects, 10-12 us at 30,000-100,000).
CPU_CHUNK_CELLS = 10**6


def auto_chunk_size(batch: SubjectBatch, n_params: int, dtype: torch.dtype, fraction: float = 0.25,
                    device: torch.device | None = None) -> int:
    """Subjects per E-step chunk that fit in ``fraction`` of the device's free memory.

    A subject's E-step holds its data and, during the exact Hessian, about
    ``4 (P + 1)`` working copies of each trial cell (forward values and the
    reverse-over-reverse intermediates), plus ``O(P^2)`` per subject; the
    estimate is deliberately generous.  On the CPU a chunk holds at most
    :data:`CPU_CHUNK_CELLS` trial cells, where the per-subject cost is lowest.
    """
    cells = max(1, int(batch.mask[0].numel()))
    item = torch.finfo(dtype).bits // 8
    per_subject = item * (cells * (len(batch.data) + 1 + 4 * (n_params + 1) * 8) + 64 * n_params * n_params)
    device = batch.device if device is None else torch.device(device)
    size = int(fraction * free_memory(device)) // per_subject
    if device.type == "cpu":
        size = min(size, CPU_CHUNK_CELLS // cells)
    return max(1, min(batch.n_subjects, size))
