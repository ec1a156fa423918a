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
the subjects' posterior uncertainty.  Which group each E-step runs at is the
accelerator's choice (:mod:`torchem.accelerators`: plain EM, SQUAREM, or
multisecant quasi-Newton steps on EM's fixed-point residual; by default the
latter for a Gaussian group and SQUAREM for the heavy-tailed ones); every
E-step counts towards ``mstep_maxit``, and the fixed point is the one plain
EM reaches.  The stopping rule judges each kept E-step with the
accelerator's estimate of the remaining distance to that fixed point
(:func:`torchem.convergence.fixed_point_gap`), so ``converged`` means "at the
fixed point within the tolerances", and a fit that ends otherwise says how
far it probably is (:attr:`FitResult.fixed_point_gap`).

Under a process group (:mod:`torchem.distributed`) each rank runs the E-steps
of its contiguous shard of subjects, and the shards' moments are all-gathered
in subject order before the M-step, so every rank runs the same M-step and
stopping rule on the moments of all subjects.
"""
from __future__ import annotations

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
from .accelerators import Accelerator, Point, Proposal, make_accelerator
from .convergence import EMStep, FixedPointGap, GroupRule, gap_text, hyper_gaps, make_rule
from .covariates import coefficient_table, covariate_group
from .data import SubjectBatch
from .estep import ImportanceEStep, LaplaceEStep, PosteriorMoments, SubjectStatus, auto_chunk_size, run_in_chunks
from .checkpoint import load_checkpoint, save_checkpoint
from .groups import GaussianGroup, GroupFamily, make_group
from .importance import ImportanceResult
from .model import Model
from .options import FitOptions
from .priors import Prior

__all__ = ["FitResult", "IterationState", "EMRun", "run_em"]


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
    fixed_point_gap : dict or None
        The estimated remaining distance to EM's fixed point at the last kept
        E-step (:class:`torchem.convergence.FixedPointGap`): ``lme`` and
        ``npl`` (nats), ``hyper`` (the largest relative change of any group
        hyperparameter) and ``hyper_name``; ``None`` where it could not be estimated.
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
    fixed_point_gap: dict | None = None

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
            "fixed_point_gap": None if self.fixed_point_gap is None else dict(self.fixed_point_gap),
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
        self._previous: Prior | None = None  # the group of the kept E-step before the last one
        self.gap: FixedPointGap | None = None  # estimated gap to the fixed point at the last kept E-step
        self.stopped_short = False  # pyEM's NPL rule stopped the fit before the fixed point (a warning says so)

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
               extra: dict | None = None, keep: bool = True) -> bool:
        """History row, progress bar and callback for one E-step; ``False`` if the callback asked to stop.

        ``keep=False``: a rejected trial; the result stays at the last kept E-step.
        """
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
        if keep or self.last is None:
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
    def evaluate(self, group: Prior, step: str) -> Point:
        """E-step under ``group`` and the M-step after it."""
        post = self.estep(group, step)
        return Point(group, post, self.mstep(post, group))

    def _laplace_phase(self) -> None:
        """EM with Laplace E-steps until the stopping rule is met; the accelerator picks each E-step's group.

        Every evaluated point is recorded; a point the accelerator (or the boundary test) rejects is
        recorded as ``"rejected"`` and the fit goes on from the current point.  The rule judges each kept
        point with the accelerator's estimate of the remaining step to the fixed point.
        """
        rule, acc = make_rule(self.opts), make_accelerator(self.opts, self.family)
        if self.opts.resume is not None:
            current = load_checkpoint(self, self.opts.resume, rule, acc)
            if self.bar is not None:
                self.bar.update(len(self.rows))
        else:
            current = self.evaluate(self.prior, "em")
            if not self.record(current.post, current.group, current.mapped, "em"):
                return
        saved_at = len(self.rows)
        ahead = acc.propose(current)
        while self._budget_left():
            if self.opts.checkpoint is not None and len(self.rows) - saved_at >= self.opts.checkpoint_every:
                if self._checkpoint(current, acc, rule):
                    saved_at = len(self.rows)
            probe = self._boundary_candidate(current, ahead) if acc.name != "none" else None
            proposal = ahead if probe is None else Proposal(current.mapped.collapse(probe), "collapse", None)
            saved = self.laplace.snapshot() if proposal.step != "em" else None
            trial = self.evaluate(proposal.group, proposal.step)
            if probe is None:
                kept = acc.judge(current, trial, proposal)
                note = ""
            else:
                kept = self._boundary_holds(trial, probe)
                note = (f"group variance of {self.model.param_names[probe]} at the floor: "
                        f"{'kept (the data prefer no spread)' if kept else 'rejected (the spread grows back)'}; ")
                if kept:
                    acc.reset()
            text = note
            if kept:
                ahead = acc.propose(trial)
                if isinstance(current.group, GroupFamily):
                    step = EMStep(current.post.npl, trial.post.npl, current.lme, trial.lme, current.group,
                                  trial.group, trial.mapped, ahead.remaining)
                    met, rule_text = rule.update(step)
                    self.gap = step.gap
                    text += rule_text
                    self.converged = met and (self.gap is not None and self.gap.within(self.opts.convergence_crit,
                                                                                       self.opts.group_tol))
                    if met and not self.converged:  # pyEM's NPL rule: stop where pyEM stops, but say how far
                        self.stop_reason = (f"{rule.name} rule met ({rule_text}), but not at the fixed point: "
                                            f"{gap_text(self.gap)}")
                        self.stopped_short = True
                self._previous = current.group
                current = trial
            else:
                self.laplace.restore(saved)
                ahead = acc.propose(current)  # the accelerator has learnt from the rejected point
            extra = None if not kept or self.gap is None else {"gap_lme": self.gap.lme, "gap_hyper": self.gap.hyper}
            if not self.record(trial.post, trial.group, trial.mapped, proposal.step if kept else "rejected", text,
                               extra, keep=kept):
                return
            if self.converged:
                self.stop_reason = f"{rule.name} rule met: {text}"
                return
            if self.stopped_short:
                return
        self.stop_reason = (f"mstep_maxit ({self.opts.mstep_maxit}) E-steps reached before the {rule.name} rule "
                            f"was met ({gap_text(self.gap)})")

    def _checkpoint(self, current: Point, acc: Accelerator, rule: Any) -> bool:
        """Save the loop's state to the checkpoint file; ``False`` (nothing saved) while a group is not a family."""
        _, group, prior = self.last
        if not all(isinstance(g, GroupFamily) for g in (current.group, current.mapped, group, prior)):
            return False
        if self.dist is not None:  # every rank joins the E-step state of all subjects; rank 0 writes it
            lap = self.laplace
            full = self.dist.gather([t[self.all_idx] for t in (lap.x, lap.v, lap.has_lik, *lap.lik)],
                                    self.batch.n_subjects)
            lap.x, lap.v, lap.has_lik, lap.lik = full[0], full[1], full[2], tuple(full[3:])
        if self.writer:
            save_checkpoint(self, current, acc, rule, self.opts.checkpoint)
        return True

    def _boundary_candidate(self, current: Point, ahead: Proposal) -> int | None:
        """A parameter whose group variance EM drives towards 0, to try at the floor; ``None``: none.

        Plain EM creeps towards a variance of 0 sublinearly.  A Gaussian
        group's variance (float64 fits) is tried at the floor (1e-8), once
        per 20 E-steps, when it fell below 0.05 over the last two steps, the
        accelerator's estimate of the fixed point puts it below 0.8 times
        its value, and every other parameter's hyperparameters are within 10 ``group_tol``
        of its fixed point (so an interior fixed point of a variance that is
        still settling is not mistaken for the boundary); see
        :meth:`_boundary_holds` for the test.
        """
        if self.dtype != torch.float64 or self._previous is None:
            return None
        prev = self._previous
        if type(current.mapped) is not GaussianGroup or type(current.group) is not GaussianGroup \
                or type(prev) is not GaussianGroup:
            return None  # heavy-tailed families: a scale at 0 is their MAP degeneracy, not a fit
        va, vb, vc = (g.spread.diagonal() for g in (prev, current.group, current.mapped))
        cand = ((vc < vb) & (vb < va) & (vc < 0.05) & (vc > 1e-6)).nonzero().squeeze(1).tolist()
        n = len(self.rows)
        cand = [j for j in cand if n - self._probed.get(j, -10**9) >= 20]
        if not cand or ahead.remaining is None:
            return None
        target = current.group.from_vector(current.x + ahead.remaining).spread.diagonal()
        gaps = hyper_gaps(current.group, ahead.remaining)

        def others_settled(j: int) -> bool:
            rest = [g[torch.arange(g.numel(), device=g.device) != j] if k in ("mu", "sd") else g
                    for k, g in gaps.items()]
            return all(float(g.max()) < 10 * self.opts.group_tol for g in rest if g.numel())

        cand = [j for j in cand if float(target[j]) < 0.8 * float(vb[j]) and others_settled(j)]
        if not cand or not self._budget_left():
            return None
        self._probed[cand[0]] = n
        return cand[0]

    def _boundary_holds(self, trial: Point, j: int) -> bool:
        """Whether a group variance of 0 for parameter ``j`` is a stable fixed point of EM.

        At a variance ``v`` near 0 the MAPs sit at ``mu - v g_i`` and the
        posterior variances at ``v - v^2 h_i`` (``g_i``, ``h_i``: the NLL's
        gradient and curvature along ``j`` at the MAP), so the M-step maps
        ``v`` to ``v (1 + v c)`` with ``c = mean_i (g_i - mean g)^2 - mean_i
        h_i``; ``c`` is also the sign of the marginal likelihood's slope in
        ``v`` at 0.  With ``c < 0`` EM converges to the floor (slowly) and the
        fit goes on from there; with ``c >= 0`` the variance grows back, the
        fixed point is inside, and the probe is rejected.  The evidence is not
        the test: EM's fixed point is not the Laplace evidence's maximum.
        """
        if not trial.finite or self.laplace.lik is None:
            return False
        g = self._all_subjects(self.laplace.lik[1][:, j])
        h = self._all_subjects(self.laplace.lik[2][:, j, j])
        c = float(((g - g.mean()) ** 2).mean() - h.mean())
        return c < 0

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
        if self.stopped_short:
            self._warn(f"EM stopped short of its fixed point: {self.stop_reason}. Use convergence='lme' for a fit "
                       "at the fixed point")
        elif not self.converged and not self.stopped:
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
            fixed_point_gap=None if self.gap is None else self.gap.as_dict(),
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
