"""The hierarchical EM loop (empirical Bayes with MAP E-steps) and its result.

One EM step is four named parts:

1. **E-step** (:mod:`torchem.estep`): every subject's posterior moments
   under the current group distribution (MAP by batched L-BFGS, exact
   Hessian (:mod:`torchem.curvature`); or importance-sampled moments).
2. **M-step** (:mod:`torchem.groups`): the group family re-estimated from
   those moments.
3. **Convergence** (:mod:`torchem.convergence`): the stopping rule judges the
   step.
4. **Record**: one history row, the callback, the progress bar.

Plain EM converges linearly, slowly when a group variance is small next to
the subjects' posterior uncertainty.  By default the group hyperparameters
are extrapolated with SQUAREM (Varadhan & Roland 2008): from group ``a``, two
EM steps give ``b`` and ``c``; with ``r = b - a`` and ``v = c - b - r`` (in
the family's unconstrained coordinates, :meth:`~torchem.groups.GroupFamily.to_vector`)
and ``alpha = -|r| / |v|`` (at most -1), the next group is
``a - 2 alpha r + alpha^2 v``, with ``|alpha|`` bounded by a step limit that
grows 4x after each extrapolation that reached it and shrinks 4x after a
rejection.  The E-step there is kept only if the summed Laplace log evidence
is not below its value at ``a`` (the monotonicity safeguard); otherwise EM
goes on from ``c``.  Every E-step counts towards
``mstep_maxit``.  The fixed point is the one plain EM reaches.

Under a process group (:mod:`torchem.distributed`) each rank runs the E-steps
of its contiguous shard of subjects, and the shards' moments are all-gathered
in subject order before the M-step, so every rank runs the same M-step and
stopping rule on the moments of all subjects.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import distributed
from .allocator import cpu_heap
from .convergence import EMStep, GroupRule, group_change, make_rule
from .covariates import coefficient_table, covariate_group
from .data import SubjectBatch
from .estep import ImportanceEStep, LaplaceEStep, PosteriorMoments, SubjectStatus, auto_chunk_size, run_in_chunks
from .checkpoint import load_checkpoint, save_checkpoint
from .groups import GaussianGroup, GroupFamily, make_group
from .importance import ImportanceResult
from .model import Model
from .options import FitOptions
from .priors import Prior

__all__ = ["FitResult", "IterationState", "EMRun", "EMState", "run_em"]


#: torch's intra-op thread count when torchem was imported (a different count later was set by the user).
_TORCH_THREADS = torch.get_num_threads()
#: Trial cells per E-step below which a CPU fit runs on one thread (``num_threads=None``).
SMALL_BATCH_CELLS = 10**6


@dataclass
class IterationState:
    """What the ``callback`` of :func:`run_em` receives after every E-step.

    Attributes
    ----------
    iteration : int
        1-based E-step count.
    max_iterations : int
        ``mstep_maxit``.
    npl : float
        Summed negative log posterior of this E-step.
    mu, sigma : ndarray
        ``(P,)`` group mean and variance after this step's M-step (normalized space).
    n_estep_failed, n_hessian_bad : int
        Subjects whose MAP search did not converge / whose Hessian was not positive definite.
    converged : bool
        Whether the stopping rule was met here.
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
    """A fitted hierarchical (or individual) model.  Tensors keep the fit's device and dtype.

    Attributes
    ----------
    m : Tensor
        ``(S, P)`` per-subject MAP in normalized space.
    inv_h : Tensor
        ``(S, P, P)`` inverse Hessians of the negative log posterior at ``m``
        (exact, except where ``laplace_capped`` or not ``hessian_ok``).
    group : GroupFamily or None
        The fitted group distribution (``None`` for individual fits without a prior).
    NPL, NLPrior, NLL : Tensor
        ``(S,)`` negative log posterior, negative log prior, negative log-likelihood at ``m``.
    hess_logdet : Tensor
        ``(S,)`` log-determinant of each Hessian (the Laplace evidence).
    hessian_ok : Tensor
        ``(S,)`` bool, Hessian finite and positive definite (else the group
        spread stood in for its inverse).
    laplace_capped : Tensor
        ``(S,)`` bool, the Laplace posterior was capped at ``laplace_cap``
        times the group's width along some direction.
    status : Tensor
        ``(S,)`` ``int8`` :class:`~torchem.estep.SubjectStatus` of the last MAP search.
    n_obs : Tensor
        ``(S,)`` observations (unmasked trials) per subject.
    convergence : bool
        The stopping rule was met before ``mstep_maxit``.
    n_iter : int
        E-steps run.
    history : DataFrame
        One row per E-step: ``iteration``, ``step`` (``"em"``, ``"extrapolated"``,
        ``"importance"``), ``NPL``, ``LME``, ``mu[name]``, ``sigma[name]``
        (group variances), failures, ``rule`` (the stopping rule's reading).
    param_names, subject_ids : list
    stop_reason : str
        Which rule stopped the fit, or why it ended without converging.
    warnings : list of str
        Every warning raised by the fit (also issued as ``RuntimeWarning``).
    options : FitOptions
        The options of the fit.
    estep : str
        ``"laplace"``, ``"importance"`` or ``"individual"``.
    importance : ImportanceResult or None
        With ``estep="importance"``: the final iteration's importance summaries.
    estep_prior : Prior or None
        The group distribution the final E-step used (``NPL`` and ``inv_h`` are
        under it; ``group`` is the M-step after it).
    lme : Tensor or None
        ``(S,)`` Laplace log evidence of each subject as the fit computed it:
        for the heavy-tailed groups the variational bound of their E-steps
        (see :class:`torchem.groups.LocalPrior`); ``None``: from ``NPL`` and
        ``hess_logdet`` (:meth:`laplace_evidence`).
    """

    m: torch.Tensor
    inv_h: torch.Tensor
    group: GroupFamily | Prior | None
    NPL: torch.Tensor
    NLPrior: torch.Tensor
    NLL: torch.Tensor
    hess_logdet: torch.Tensor
    hessian_ok: torch.Tensor
    laplace_capped: torch.Tensor
    status: torch.Tensor
    n_obs: torch.Tensor
    convergence: bool
    n_iter: int
    history: pd.DataFrame
    param_names: list
    subject_ids: list
    param_xform: list = field(default_factory=list, repr=False)
    stop_reason: str = ""
    warnings: list = field(default_factory=list)
    options: FitOptions | None = field(default=None, repr=False)
    estep: str = "laplace"
    stopped: bool = False
    importance: ImportanceResult | None = field(default=None, repr=False)
    estep_prior: Prior | None = field(default=None, repr=False)
    lme: torch.Tensor | None = field(default=None, repr=False)

    def laplace_evidence(self) -> torch.Tensor:
        """``(S,)`` per-subject Laplace log evidence (:attr:`lme`, or from ``NPL`` and ``hess_logdet``)."""
        from .evidence import laplace_lme

        return laplace_lme(self.NPL, self.hess_logdet, self.n_params) if self.lme is None else self.lme

    # -------------------------------------------------------------- views
    @property
    def n_subjects(self) -> int:
        return int(self.m.shape[0])

    @property
    def n_params(self) -> int:
        return int(self.m.shape[1])

    @property
    def estep_success(self) -> torch.Tensor:
        """``(S,)`` bool: the last MAP search converged (directly or after a restart)."""
        return self.status <= SubjectStatus.RECOVERED

    @property
    def posterior_mu(self) -> torch.Tensor:
        """``(P,)`` group location (mean where it exists), normalized space."""
        return self.group.mean

    @property
    def posterior_var(self) -> torch.Tensor:
        """``(P,)`` group variances, normalized space (Cauchy: pyEM's stand-in ``100 scale^2``)."""
        return self.group.var

    @property
    def posterior_sigma(self) -> torch.Tensor:
        """pyEM's name for :attr:`posterior_var` (it holds variances)."""
        return self.posterior_var

    @property
    def posterior_cov(self) -> torch.Tensor:
        """``(P, P)`` group covariance (diagonal unless the group is a full Gaussian)."""
        return self.group.cov

    @property
    def group_name(self) -> str:
        """The group family's name (``"gaussian"``, ``"laplace"``, ...; ``"none"`` for individual fits)."""
        return getattr(self.group, "name", "none" if self.group is None else type(self.group).__name__)

    def natural_params(self) -> torch.Tensor:
        """``(S, P)`` MAP parameters in natural space."""
        return torch.stack([t(self.m[:, j]) for j, t in enumerate(self.param_xform)], -1)

    def params_df(self) -> pd.DataFrame:
        """Natural-space MAP parameters, one row per subject, indexed by subject id."""
        values = self.natural_params().detach().cpu().numpy()
        return pd.DataFrame(values, columns=self.param_names,
                            index=pd.Index(self.subject_ids, name="subject"))

    def standard_errors(self) -> pd.DataFrame:
        """Per-subject posterior standard deviations ``sqrt(diag H^-1)`` (normalized) and their
        delta-method natural-space counterparts (columns ``se[name]`` and ``se_natural[name]``)."""
        se = self.inv_h.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
        x = self.m.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            nat = torch.stack([t(x[:, j]) for j, t in enumerate(self.param_xform)], -1)
            (slope,) = torch.autograd.grad(nat.sum(), x)
        cols = {f"se[{n}]": se[:, j].cpu().numpy() for j, n in enumerate(self.param_names)}
        cols.update({f"se_natural[{n}]": (se[:, j] * slope[:, j].abs()).detach().cpu().numpy()
                     for j, n in enumerate(self.param_names)})
        return pd.DataFrame(cols, index=pd.Index(self.subject_ids, name="subject"))

    def group_coefficients(self, level: float = 0.95) -> pd.DataFrame:
        """Coefficients of the covariates in the group prior, with inference (a fit with ``covariates=``).

        One row per parameter x covariate (normalized space): ``estimate``,
        ``se`` (from the observed information of the marginal likelihood,
        Louis' method with the E-step moments: the uncertainty of every
        subject's parameters is included), ``z``, two-sided ``p`` and the
        ``level`` confidence interval (:func:`torchem.covariates.coefficient_table`).
        """
        return coefficient_table(self, level)

    def group_df(self) -> pd.DataFrame:
        """Group location, standard deviation (normalized) and the location mapped to natural space."""
        if self.group is None:
            raise ValueError("an individual fit without a prior has no group distribution")
        mu = self.posterior_mu.detach()
        natural = [float(t(v)) for t, v in zip(self.param_xform, mu.cpu())]
        df = pd.DataFrame({"mu": mu.cpu().numpy(), "sd": self.posterior_var.sqrt().cpu().numpy(),
                           "mu (natural)": natural}, index=pd.Index(self.param_names, name="parameter"))
        for k, v in self.group.hyper().items():
            if k not in ("mu", "sd") and v.numel() == self.n_params:
                df[k] = v.detach().cpu().numpy()
        return df

    def subject_table(self) -> pd.DataFrame:
        """Per-subject results: natural MAPs, NLL, NPL, Laplace log evidence and flags (CLI, dashboard)."""
        df = self.params_df()
        df["NLL"] = self.NLL.detach().cpu().numpy()
        df["NPL"] = self.NPL.detach().cpu().numpy()
        df["LME (Laplace)"] = self.laplace_evidence().detach().cpu().numpy()
        df["status"] = [SubjectStatus(int(s)).name.lower() for s in self.status.cpu()]
        df["hessian_ok"] = self.hessian_ok.cpu().numpy()
        df["laplace_capped"] = self.laplace_capped.cpu().numpy()
        return df

    def summary(self) -> dict[str, Any]:
        """The fit in a few numbers (plain Python values): sizes, convergence, group, NPL, LME, flags, warnings."""
        from .evidence import total_lme

        lap = self.laplace_evidence()
        out = {
            "subjects": self.n_subjects,
            "parameters": list(self.param_names),
            "group": self.group_name,
            "converged": bool(self.convergence),
            "stopped": bool(self.stopped),
            "stop_reason": self.stop_reason,
            "em_iterations": self.n_iter,
            "NPL": float(self.NPL.sum()),
            "LME": total_lme(lap, self.n_params),
            "estep_failed": int((~self.estep_success).sum()),
            "hessian_not_pd": int((~self.hessian_ok).sum()),
            "laplace_capped": int(self.laplace_capped.sum()),
            "warnings": list(self.warnings),
        }
        if self.group is not None:
            g = self.group_df()
            out["group_mu_normalized"] = g["mu"].tolist()
            out["group_var_normalized"] = self.posterior_var.cpu().tolist()
            out["group_mu_natural"] = g["mu (natural)"].tolist()
        return out

    def save(self, path: "str | os.PathLike") -> None:
        """Write the result to ``path``: tensors in a torch file, names, options and history as JSON text.

        Group families are stored by :meth:`~torchem.groups.GroupFamily.state_dict`, transforms by the name
        of the built-in transform (a custom one must be given again to :meth:`load`).
        """
        from .saving import save_result

        save_result(self, path)

    @classmethod
    def load(cls, path: "str | os.PathLike", *, map_location: Any = "cpu",
             param_xform: list | None = None) -> "FitResult":
        """Read a result written by :meth:`save` (on the CPU by default, whatever device wrote it).

        ``torch.load(..., weights_only=True)`` reads it: no pickled code runs, and a foreign or damaged
        file raises ``ValueError``.  ``param_xform`` replaces the saved transforms (needed for custom ones).
        """
        from .saving import load_result

        return load_result(path, map_location=map_location, param_xform=param_xform)

    def __repr__(self) -> str:
        state = "converged" if self.convergence else ("stopped" if self.stopped else "not converged")
        text = (f"FitResult({self.n_subjects} subjects, {self.n_params} parameters, {state} after {self.n_iter} "
                f"iterations, {self.group_name} group, NPL={float(self.NPL.sum()):.4f}")
        if self.group is not None:
            mu = ", ".join(f"{n}={v:.3f}" for n, v in zip(self.param_names, self.posterior_mu.tolist()))
            sd = ", ".join(f"{n}={v:.3f}" for n, v in zip(self.param_names, self.posterior_var.sqrt().tolist()))
            text += f"; group mean [{mu}], group sd [{sd}] (normalized)"
        return (text + f"; E-step failures {int((~self.estep_success).sum())}, "
                f"non-PD Hessians {int((~self.hessian_ok).sum())}, warnings {len(self.warnings)})")


@dataclass
class EMState:
    """What the EM loop carries from one cycle to the next (what a checkpoint saves besides the E-step's state).

    ``a``: the group of the last kept E-step ``post_a``; ``b``: the M-step after it (the next E-step's
    group); ``alpha_max``: SQUAREM's step bound; ``rule``: the stopping rule and its memory.
    """

    a: Prior
    post_a: PosteriorMoments
    b: Prior
    alpha_max: float
    rule: Any


def _lme_sum(post: PosteriorMoments) -> float:
    return float(post.log_evidence.sum())


class EMRun:
    """One EM fit, step by step; :meth:`run` returns the :class:`FitResult`.

    If the fit raises partway (an error in the model, ``KeyboardInterrupt``),
    :meth:`partial_result` gives the last completed E-step's result, marked
    ``stopped``.
    """

    def __init__(self, model: Model, batch: SubjectBatch, options: FitOptions, *, verbose: int = 1,
                 callback: Callable[[IterationState], Any] | None = None,
                 device: str | torch.device | None = None) -> None:
        self.device = batch.device if device is None else torch.device(device)
        if options.pin_data:  # the E-steps' data stay in (pinned) host memory; chunks are copied to the device
            batch = batch.to("cpu")
        elif batch.device != self.device:
            batch = batch.to(self.device)
        self.model, self.batch, self.opts = model, batch, options
        self.callback, self.verbose = callback, verbose
        S, P = batch.n_subjects, model.n_params
        self.dtype = next((t.dtype for t in batch.data if t.is_floating_point()), torch.float64)
        self.generator = torch.Generator()
        if options.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(options.seed))
        self.family = make_group(options.group, P, dtype=self.dtype, device=self.device, var=options.init_var,
                                 df=options.df)
        if options.covariates is not None:  # the group mean follows the subjects' covariates
            self.family = covariate_group(self.family, options.covariates, options.formula, batch.subject_ids,
                                          model.param_names, dtype=self.dtype, device=self.device,
                                          var=options.init_var)
        start = options.starting_prior(P)
        self.prior: Prior = self.family if start is None else start.to(self.device, self.dtype)
        x0 = 0.1 * torch.randn(S, P, generator=self.generator, dtype=self.dtype).to(self.device)
        if start is not None:
            x0 = self.prior.start(S, self.generator)
        # under a process group this rank runs the E-steps of its contiguous shard of subjects only
        self.dist = distributed.context(self.device)
        if self.dist is not None and S < self.dist.world_size:
            raise ValueError(f"{S} subject(s) cannot be shared by {self.dist.world_size} ranks: use at most {S} "
                             "processes, or fit inside torchem.distributed.local()")
        lo, hi = (0, S) if self.dist is None else self.dist.shard(S)
        shard = batch if self.dist is None else batch.index(torch.arange(lo, hi))
        if options.pin_data:
            shard = shard.pin_memory()
            if self.dist is None:
                self.batch = shard
        self.laplace = LaplaceEStep(model, shard, x0, generator=self.generator, max_restarts=options.max_restarts,
                                    estep_maxit=options.estep_maxit, gtol=options.gtol,
                                    hessian_chunk=options.hessian_chunk, laplace_cap=options.laplace_cap,
                                    variational=options.variational, first=lo, host=options.pin_data)
        self.all_idx = torch.arange(lo, hi, device=self.device)
        self.writer = self.dist is None or self.dist.rank == 0  # prints, warns, shows progress, writes files
        if not self.writer:
            self.verbose = 0
        self.chunk_size = (auto_chunk_size(shard, P, self.dtype, device=self.device) if options.chunk_size == "auto"
                           else options.chunk_size)
        self.rows: list[dict] = []
        self.warnings: list[str] = []
        self.last: tuple[PosteriorMoments, Prior] | None = None  # last E-step and the group after its M-step
        self.converged = self.stopped = False
        self.stop_reason = ""
        self.estep_kind = "laplace"
        self.bar = None
        self._probed: dict[int, int] = {}
        self._mstep_ok = True

    # ---------------------------------------------------------- named steps
    def estep(self, prior: Prior, step: str, nsamples: int | None = None,
              importance: ImportanceEStep | None = None) -> PosteriorMoments:
        """E-step of every subject under ``prior`` (counted towards ``mstep_maxit``)."""
        self.laplace.step = len(self.rows)  # seeds the restarts' draws of this E-step
        if importance is not None:
            run = lambda idx: importance.run(idx, prior, nsamples)  # noqa: E731
        else:
            run = lambda idx: self.laplace.run(idx, prior)  # noqa: E731
        if self.dist is None:
            return run_in_chunks(run, self.all_idx, self.chunk_size)
        return self._gather_moments(self._guarded(lambda: run_in_chunks(run, self.all_idx, self.chunk_size)))

    def _guarded(self, work: Callable[[], Any]) -> Any:
        """``work()`` on every rank; if it raises on any rank, every rank raises (none waits for a collective)."""
        error = None
        try:
            out = work()
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = err
        if self.dist.all_reduce_max(int(error is not None)):
            if error is not None:
                raise error
            raise RuntimeError("the E-step failed on another rank of the process group (see its error)")
        return out

    def _gather_moments(self, post: PosteriorMoments) -> PosteriorMoments:
        """Every rank's shard of ``post`` joined in subject order (identical on every rank)."""
        names = [f.name for f in fields(PosteriorMoments) if f.name not in ("importance", "index")]
        alias, send = {}, []
        for n in names:  # a field that is another field's tensor (Laplace: m is x, V is inv_h) travels once
            same = next((k for k in send if getattr(post, k) is getattr(post, n)), None)
            if same is None:
                send.append(n)
            else:
                alias[n] = same
        tensors = [getattr(post, n) for n in send]
        imp_names = [f.name for f in fields(ImportanceResult)] if post.importance is not None else []
        tensors += [getattr(post.importance, n) for n in imp_names]
        S = self.batch.n_subjects
        full = dict(zip(send + [f"imp.{n}" for n in imp_names], self.dist.gather(tensors, S)))
        for n, src in alias.items():
            full[n] = full[src]
        imp = (ImportanceResult(**{n: full.pop(f"imp.{n}") for n in imp_names}) if imp_names else None)
        return PosteriorMoments(index=torch.arange(S, device=self.device), importance=imp, **full)

    def _all_subjects(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of every subject of a per-subject tensor whose shard rows this rank filled."""
        if self.dist is None:
            return t
        return self.dist.gather([t[self.all_idx]], self.batch.n_subjects)[0]

    def mstep(self, post: PosteriorMoments, current: Prior) -> Prior:
        """The family re-estimated from ``post``; an invalid M-step keeps ``current`` (with a warning)."""
        new, info = self.family.mstep(post.m, post.V)
        self._mstep_ok = info.converged
        if not info.converged:
            self._warn(info.message)
        new = self._newton_locations(new)
        if not new.valid():
            self._warn(f"the {self.family.name} M-step gave non-finite or non-positive hyperparameters at "
                       f"E-step {len(self.rows)}; the previous group was kept")
            return current
        return new

    def _newton_locations(self, group: GroupFamily) -> GroupFamily:
        """Move the location of every parameter whose group variance sits at the floor by a Newton step.

        With a variance of ~0 every subject's posterior mean equals the group
        location, so the EM update of the location (the mean of the posterior
        means) no longer moves it.  The marginal likelihood still has a
        gradient there, ``-sum_i g_ij`` (``g`` the likelihood gradients at the
        MAPs), with curvature ``sum_i h_ijj``: one Newton step per M-step
        moves the shared value to the likelihood's optimum.
        """
        lik = self.laplace.lik
        if lik is None or type(group) is not GaussianGroup:
            return group
        flat = (group.spread.diagonal() <= 1e-6).nonzero().squeeze(1)
        if flat.numel() == 0:
            return group
        g = self._all_subjects(lik[1][:, flat]).sum(0)
        h = self._all_subjects(lik[2][:, flat, flat]).sum(0)
        step = torch.where(h > 0, g / h.clamp_min(1e-300), torch.zeros_like(g)).clamp(-1.0, 1.0)
        v = group.to_vector().clone()
        v[flat] = v[flat] - step
        return group.from_vector(v)

    def record(self, post: PosteriorMoments, prior: Prior, group: Prior, step: str, rule_text: str = "",
               extra: dict | None = None) -> bool:
        """History row, progress bar and callback for one E-step; ``False`` if the callback asked to stop."""
        names = self.model.param_names
        row = {"iteration": len(self.rows) + 1, "step": step,
               "estep": "importance" if post.importance is not None else "laplace", "NPL": float(post.npl.sum()),
               "LME": _lme_sum(post)}
        row.update({f"mu[{n}]": v for n, v in zip(names, group.mean.tolist())})
        row.update({f"sigma[{n}]": v for n, v in zip(names, group.var.tolist())})
        row.update({"estep_failed": int((~post.estep_success).sum()), "hessian_bad": int((~post.hessian_ok).sum()),
                    "laplace_capped": int(post.capped.sum()), "mstep_converged": self._mstep_ok, "rule": rule_text})
        if extra:
            row.update(extra)
        self.rows.append(row)
        self.last = (post, group, prior)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(NPL=f"{row['NPL']:.4f}")
        if self.callback is not None:
            state = IterationState(row["iteration"], self.opts.mstep_maxit, row["NPL"], group.mean.cpu().numpy(),
                                   group.var.cpu().numpy(), row["estep_failed"], row["hessian_bad"], self.converged)
            stop, error = None, None
            if self.writer:
                try:
                    stop = self.callback(state) is False
                except BaseException as err:  # re-raised below, after telling the other ranks
                    stop, error = "raised", err
            if self.dist is not None:  # rank 0's callback decides for every rank
                stop = self.dist.broadcast_object(stop)
            if error is not None:
                raise error
            if stop == "raised":
                raise RuntimeError("the callback raised on rank 0 of the process group")
            if stop and not self.converged:
                self.stopped = True
                self.stop_reason = f"stopped by the callback after E-step {row['iteration']}"
                return False
        return True

    def _budget_left(self) -> bool:
        return len(self.rows) < self.opts.mstep_maxit

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        if self.writer:
            warnings.warn(text, RuntimeWarning, stacklevel=5)

    # ------------------------------------------------------------ phases
    def _laplace_phase(self) -> None:
        """EM with Laplace E-steps until the stopping rule is met (plain or SQUAREM-accelerated)."""
        rule = make_rule(self.opts)
        accelerate = self.opts.accelerate == "squarem"
        if self.opts.resume is not None:
            state = load_checkpoint(self, self.opts.resume, rule)
            a, post_a, b, alpha_max = state.a, state.post_a, state.b, state.alpha_max
            if self.bar is not None:
                self.bar.update(len(self.rows))
        else:
            a = self.prior
            post_a = self.estep(a, "em")
            b = self.mstep(post_a, a)
            if not self.record(post_a, a, b, "em"):
                return
            alpha_max = 1.0
        saved_at = len(self.rows)
        while self._budget_left():
            if self.opts.checkpoint is not None and len(self.rows) - saved_at >= self.opts.checkpoint_every:
                if self._checkpoint(EMState(a, post_a, b, alpha_max, rule)):
                    saved_at = len(self.rows)
            post_b = self.estep(b, "em")
            c = self.mstep(post_b, b)
            text = ""
            if isinstance(a, GroupFamily):
                self.converged, text = rule.update(EMStep(post_a.npl, post_b.npl, _lme_sum(post_a), _lme_sum(post_b),
                                                          a, b, c))
            if not self.record(post_b, b, c, "em", text) or self.converged:
                if self.converged:
                    self.stop_reason = f"{rule.name} rule met: {text}"
                return
            if not (accelerate and isinstance(a, GroupFamily) and self._budget_left()):
                a, post_a, b = b, post_b, c
                continue
            probe = self._collapse_probe(a, b, c, post_b)
            if probe is not None:
                if probe is False:
                    return
                a, post_a, b = probe
                continue
            # SQUAREM: extrapolate along the two EM steps a -> b -> c (only where EM is slow: with a fast
            # linear rate the gain is small and the extrapolation mostly amplifies optimizer noise)
            va, vb, vc = a.to_vector(), b.to_vector(), c.to_vector()
            r, v = vb - va, vc - 2 * vb + va
            if float((vc - vb).norm()) < 0.8 * float(r.norm()):
                a, post_a, b = b, post_b, c
                continue
            nv = float(v.norm())
            alpha = -float(r.norm()) / nv if nv > 0 else -1.0
            alpha = max(min(alpha, -1.0), -alpha_max)
            hit = alpha == -alpha_max  # the step bound was reached: allow 4x longer steps after a success
            theta = self.family.from_vector(va - 2 * alpha * r + alpha * alpha * v)
            if alpha == -1.0 or not theta.valid():  # the extrapolation is c itself: a plain EM step
                alpha_max = alpha_max * 4.0 if hit else alpha_max
                a, post_a, b = b, post_b, c
                continue
            post_t = self.estep(theta, "extrapolated")
            # Varadhan & Roland's safeguard: the extrapolated point must not be worse than the cycle's start
            ok = (bool(torch.isfinite(post_t.npl).all())
                  and _lme_sum(post_t) >= _lme_sum(post_a) - self.opts.convergence_crit)
            t_next = self.mstep(post_t, theta)
            if not self.record(post_t, theta, t_next, "extrapolated" if ok else "rejected",
                               extra={"alpha": alpha}):
                return
            if ok:
                alpha_max = alpha_max * 4.0 if hit else alpha_max
                a, post_a, b = theta, post_t, t_next
            else:  # safeguard: go on from the plain EM point c
                alpha_max = max(1.0, alpha_max / 4.0)
                a, b = c, None
                if not self._budget_left():
                    return
                post_a = self.estep(a, "em")
                b = self.mstep(post_a, a)
                if not self.record(post_a, a, b, "em"):
                    return
        self.stop_reason = (f"mstep_maxit ({self.opts.mstep_maxit}) E-steps reached before the {rule.name} rule "
                            f"was met (last reading: {self.rows[-1]['rule'] or 'none'})")

    def _checkpoint(self, state: "EMState") -> bool:
        """Save ``state`` to the checkpoint file; ``False`` (nothing saved) while a group is not a family yet."""
        _, group, prior = self.last
        if not all(isinstance(g, GroupFamily) for g in (state.a, state.b, group, prior)):
            return False
        if self.dist is not None:  # every rank joins the E-step state of all subjects; rank 0 writes it
            lap = self.laplace
            full = self.dist.gather([t[self.all_idx] for t in (lap.x, lap.v, lap.has_lik, *lap.lik)],
                                    self.batch.n_subjects)
            lap.x, lap.v, lap.has_lik, lap.lik = full[0], full[1], full[2], tuple(full[3:])
        if self.writer:
            save_checkpoint(self, state, self.opts.checkpoint)
        return True

    def _collapse_probe(self, a: GroupFamily, b: GroupFamily, c: GroupFamily, post_b: PosteriorMoments):
        """Try a shrinking group variance at its floor: EM creeps towards a variance of 0 sublinearly.

        When a variance has fallen over the last two EM steps to below 0.05
        (normalized space), the E-step is run once with that variance at the
        floor (1e-8; float64 fits with a Gaussian group only).  If the summed Laplace log evidence
        there is not lower than at ``b`` and no subject's MAP search failed,
        the data prefer the boundary and EM goes on from it;
        otherwise the probe is recorded as rejected and not repeated for
        that parameter for 20 E-steps.  Returns the new ``(a, post_a, b)``,
        ``None`` when nothing was tried or the probe failed, ``False`` when
        the callback asked to stop.
        """
        if self.dtype != torch.float64:  # a variance of 1e-8 is below what float32 E-steps can resolve
            return None
        if type(c) is not GaussianGroup:  # heavy-tailed families: a scale at 0 is their MAP degeneracy, not a fit
            return None
        va, vb, vc = (g.spread.diagonal() for g in (a, b, c))
        cand = ((vc < vb) & (vb < va) & (vc < 0.05) & (vc > 1e-6)).nonzero().squeeze(1).tolist()
        n = len(self.rows)
        cand = [j for j in cand if n - self._probed.get(j, -10**9) >= 20]
        if not cand or not self._budget_left():
            return None
        j = cand[0]
        self._probed[j] = n
        trial = c.collapse(j)
        post_t = self.estep(trial, "collapse probe")
        ok = (bool(torch.isfinite(post_t.npl).all()) and _lme_sum(post_t) >= _lme_sum(post_b)
              and not bool((post_t.status == SubjectStatus.FAILED).any()))
        t_next = self.mstep(post_t, trial)
        name = self.model.param_names[j]
        if not self.record(post_t, trial, t_next, "collapse" if ok else "rejected",
                           f"group variance of {name} at the floor: {'kept' if ok else 'rejected'}"):
            return False
        return (trial, post_t, t_next) if ok else None

    def _importance_phase(self) -> None:
        """Importance E-steps from the converged Laplace solution, then one final, larger sample."""
        o = self.opts
        crn = (0 if o.seed is None else int(o.seed)) + 7919  # common random numbers for every iteration
        imp = ImportanceEStep(self.laplace, seed=crn, nsamples=o.nsamples, proposal_df=o.proposal_df,
                              min_ess=o.min_ess)
        rule = GroupRule(o.group_tol, 3)
        laplace_converged = self.converged
        self.converged = False
        group = self.last[1]
        final = 4 * o.nsamples if o.final_nsamples is None else o.final_nsamples
        run_more = laplace_converged
        while run_more and self._budget_left():
            post = self.estep(group, "importance", importance=imp)
            new = self.mstep(post, group)
            self.converged, text = rule.update(EMStep(post.npl, post.npl, 0.0, 0.0, group, new, new))
            extra = {"nsamples": o.nsamples, "ess_min": float(post.importance.ess.min())}
            if not self.record(post, group, new, "importance", text, extra):
                return
            group = new
            if self.converged:
                break
        post = self.estep(group, "importance", nsamples=final, importance=imp)
        new = self.mstep(post, group)
        self.record(post, group, new, "importance", "final, larger sample", {"nsamples": final,
                                                                      "ess_min": float(post.importance.ess.min())})
        if self.converged:
            self.stop_reason = f"group rule met by the importance E-step ({rule.changes[-1]:.3g} < {o.group_tol:g})"
        elif laplace_converged:
            self.stop_reason = "mstep_maxit reached during the importance E-steps"
        low = post.importance.ess < o.min_ess
        if bool(low.any()):
            self._warn(f"{int(low.sum())} subject(s) kept an effective sample size below {o.min_ess:g} after "
                       "redrawing (see result.importance.ess); raise nsamples")

    # ----------------------------------------------------------------- run
    def threads(self) -> int:
        """Intra-op threads for this fit (see the ``num_threads`` option); the current count where it is kept."""
        current = torch.get_num_threads()
        if self.opts.num_threads is not None:
            return self.opts.num_threads
        user_set = (current != _TORCH_THREADS or any(os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")))
        if self.device.type != "cpu" or user_set:
            return current
        n = self.laplace.batch.n_subjects  # this rank's subjects
        chunk = n if self.chunk_size is None else min(self.chunk_size, n)
        cells = chunk * int(self.batch.mask[0].numel())
        # measured on 2 shared cores: a 100- or 1,000-subject fit (96 trials) ran 3-14x faster on one thread than on
        # two while other processes used the cores (benchmarks/bench_threads.py)
        return 1 if cells < SMALL_BATCH_CELLS else current

    def run(self) -> FitResult:
        """Fit; the result is also :meth:`partial_result` afterwards."""
        before, threads = torch.get_num_threads(), self.threads()
        if threads != before:
            torch.set_num_threads(threads)
        try:
            with cpu_heap(self.device.type == "cpu"):
                return self._run()
        finally:
            if threads != before:
                torch.set_num_threads(before)

    def _run(self) -> FitResult:
        self.bar = tqdm(total=self.opts.mstep_maxit, desc=f"EM ({self.opts.estep})", disable=not self.verbose,
                        leave=True)
        try:
            self._laplace_phase()
            if self.opts.estep == "importance" and not self.stopped:
                self.estep_kind = "importance"
                self._importance_phase()
        finally:
            self.bar.close()
        self._final_warnings()
        return self.partial_result()

    def _final_warnings(self) -> None:
        post, group, _ = self.last
        o = self.opts
        if not self.converged and not self.stopped:
            self._warn(f"EM did not converge: {self.stop_reason}. Try a larger mstep_maxit, "
                       "convergence='group', or check the group variances in result.history")
        n_bad = int((~post.hessian_ok).sum())
        if n_bad:
            self._warn(f"{n_bad} subject(s) had a Hessian that is not positive definite at the final MAP; their "
                       "inverse Hessian was replaced by the group spread (see hessian_ok)")
        failed = int((post.status == SubjectStatus.FAILED).sum())
        stalled = int((post.status == SubjectStatus.STALLED).sum())
        if failed or stalled:
            self._warn(f"{failed + stalled} subject(s) did not converge in the final E-step ({failed} failed after "
                       f"restarts, {stalled} stalled on a kink); their best point was kept (see status)")
        S = self.batch.n_subjects
        if S < 5:
            self._warn(f"only {S} subject(s): the group distribution is poorly determined; consider "
                       "fit_individual() or a fixed prior")
        if isinstance(group, GroupFamily):
            small = (group.var < 1e-3).nonzero().squeeze(1).tolist()
            if small:
                names = ", ".join(self.model.param_names[j] for j in small)
                self._warn(f"the group variance of {names} collapsed towards 0 (< 1e-3): every subject is "
                           "shrunk to the group mean; the parameter may be unidentified in these data")
        nll = post.npl - post.nlprior
        if self._discrete_responses() and float((nll < 0).double().mean()) > 0.5:
            self._warn("the negative log-likelihood is negative for most subjects although the model's choices "
                       "are discrete (a probability cannot exceed 1): check the sign of the model's output")
        del o

    def _discrete_responses(self) -> bool:
        """Whether the model's responses are discrete choices, whose likelihood cannot exceed 1.

        Library models declare it (a response field that is categorical);
        for a custom model without declarations, any integer-valued data field
        with at most 10 distinct values is taken as a choice.
        """
        fit_func = self.model.fit_func
        responses = getattr(fit_func, "responses", None)
        if responses:
            categorical = {c for group in getattr(fit_func, "categorical", ()) for c in group}
            return bool(set(responses) & categorical)
        if getattr(fit_func, "param_names", None):  # a library model without choices
            return False
        mask = self.batch.mask
        for field in self.batch.data:
            vals = field[mask] if field.shape[:mask.dim()] == mask.shape else field.reshape(-1)
            vals = vals[torch.isfinite(vals)] if vals.is_floating_point() else vals
            if vals.numel() and bool((vals == vals.round()).all()) and vals.unique().numel() <= 10:
                return True
        return False

    def partial_result(self) -> FitResult | None:
        """The result of the last completed E-step (``None`` before the first)."""
        if self.last is None:
            return None
        post, group, prior = self.last
        return FitResult(
            m=post.x, inv_h=post.inv_h, group=group, NPL=post.npl, NLPrior=post.nlprior,
            NLL=post.npl - post.nlprior, hess_logdet=post.logdet, hessian_ok=post.hessian_ok,
            laplace_capped=post.capped, status=post.status, n_obs=self.batch.n_obs.to(self.device),
            convergence=self.converged,
            n_iter=len(self.rows), history=pd.DataFrame(self.rows), param_names=list(self.model.param_names),
            subject_ids=list(self.batch.subject_ids), param_xform=list(self.model.param_xform),
            stop_reason=self.stop_reason, warnings=list(self.warnings), options=self.opts, estep=self.estep_kind,
            stopped=self.stopped, importance=post.importance, estep_prior=prior,
            # the variational bound where the E-steps used a local prior; else it is laplace_lme(NPL, hess_logdet)
            lme=None if self.laplace.local_prior(prior) is prior else post.laplace_lme,
        )


def run_em(model: Model, batch: SubjectBatch, options: FitOptions | None = None, *, verbose: int = 1,
           callback: Callable[[IterationState], Any] | None = None, device: str | torch.device | None = None,
           **kwargs: Any) -> FitResult:
    """Fit the hierarchical model by EM with batched MAP E-steps.

    Parameters
    ----------
    model : Model
        Likelihood, parameter names and transforms.
    batch : SubjectBatch
        Data on the device and dtype of the fit.
    options : FitOptions, optional
        Every fit option (:class:`torchem.options.FitOptions`); keyword
        arguments build one when it is not given.
    verbose : int
        0: silent; 1: a tqdm bar with the E-step and NPL.
    callback : callable, optional
        Called with an :class:`IterationState` after every E-step; returning
        ``False`` stops EM there (the result so far is kept, marked ``stopped``).
    device : str or torch.device, optional
        Device of the fit (default: the batch's).  With ``pin_data=True`` a
        batch on the CPU stays there, pinned, and each E-step chunk is copied
        to this device.

    Returns
    -------
    FitResult
    """
    if options is None:
        options = FitOptions(**kwargs)
    elif kwargs:
        raise ValueError("give options either as a FitOptions or as keywords, not both")
    return EMRun(model, batch, options, verbose=verbose, callback=callback, device=device).run()
