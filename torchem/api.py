"""``EMModel``: pyEM's user-facing vocabulary over torchem's batched engine."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from . import crossval, distributed, evidence, plotting, ppc
from .data import SubjectBatch
from .em import EMRun, FitResult, IterationState
from .estep import importance_draws, neg_log_posterior
from .importance import pairs_per_call
from .individual import fit_individual
from .model import Model, data_roles
from .options import FitOptions
from .priors import Prior
from .recovery import parameter_recovery

__all__ = ["EMModel", "resolve_device", "check_dtype", "convergence_text"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else as given, if this machine has it.

    Under ``torchrun`` (``LOCAL_RANK`` set) a CUDA device without an index is the rank's ``cuda:LOCAL_RANK``.

    Raises
    ------
    ValueError
        A CUDA device on a machine without CUDA (or without that device index).
    """
    if device is None or device == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r} ({err}); use 'cpu', 'cuda' or 'auto'") from None
    dev = distributed.local_device(dev)  # under torchrun: cuda -> cuda:LOCAL_RANK
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}, torch.cuda.is_available() is False); use device='cpu', or "
                             "device='auto' to take a GPU only where there is one")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    return dev


#: Floating dtypes a fit can run in (Cholesky and the float64 reference values need at least float32).
DTYPES = (torch.float64, torch.float32)


def check_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if a fit can run in it (float64 or float32), else a ``ValueError`` that says so."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} is not supported: use torch.float64 (the default) or torch.float32; "
                         "half precision (float16, bfloat16) has no batched Cholesky and too few digits for "
                         "exact Hessians")
    return dtype


def convergence_text(result: FitResult) -> str:
    """How a fit ended, in words: ``"converged after 20 EM iterations"`` or ``"not converged: <why>"``."""
    if result.convergence:
        return f"converged after {result.n_iter} EM iterations"
    why = getattr(result, "stop_reason", "") or (f"stopped after {result.n_iter} EM iterations" if result.stopped
                                                 else f"EM reached the cap of {result.n_iter} iterations")
    return f"not converged: {why}"


def _numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def _pyem_optimizer_options(kwargs: dict) -> dict:
    """Map pyEM's ``optim_method``/``optim_options`` onto torchem's E-step options.

    torchem's E-step is always one batched L-BFGS; pyEM's quasi-Newton
    methods (``"BFGS"``, ``"L-BFGS-B"``) are accepted, ``optim_options``'
    ``maxiter`` and ``gtol`` become ``estep_maxit`` and ``gtol``; anything
    else is refused with a ``ValueError``.
    """
    kwargs = dict(kwargs)
    method = kwargs.pop("optim_method", None)
    if method is not None and str(method).upper() not in ("BFGS", "L-BFGS-B", "L-BFGS"):
        raise ValueError(f"optim_method={method!r}: torchem's E-step is a batched L-BFGS with exact gradients; "
                         "pyEM's 'BFGS' and 'L-BFGS-B' are accepted, other scipy methods are not")
    extra = dict(kwargs.pop("optim_options", None) or {})
    for theirs, ours in (("maxiter", "estep_maxit"), ("gtol", "gtol")):
        if theirs in extra:
            kwargs.setdefault(ours, extra.pop(theirs))
    extra.pop("disp", None)
    if extra:
        raise ValueError(f"optim_options {sorted(extra)} have no torchem counterpart; torchem takes maxiter and "
                         "gtol (as estep_maxit and gtol)")
    return kwargs


class EMModel:
    """A model to fit to many subjects by hierarchical EM with MAP estimation.

    Parameters
    ----------
    all_data : list, DataFrame, SubjectBatch or None
        pyEM-style per-subject lists (``all_data[i] = [choices, rewards]``),
        a long DataFrame (then give ``columns`` and optionally ``subject``,
        ``block``, ``trial``), or a ready :class:`SubjectBatch`.  ``None``
        makes a simulation-only model (pyEM's ``EMModel(all_data=None, ...)``):
        :meth:`fit` needs data, while :meth:`recover` and
        :meth:`ModelComparison.identify` simulate it and fill ``all_data``.
    fit_func : callable
        Batched likelihood ``fit_func(params (S, P), *data, mask=None,
        output="nll") -> (S,)``, or a one-subject function with
        ``per_subject=True``, or a pyEM-style one-subject function
        ``f(params, *data, prior=None, output="npl")`` written with torch
        operations (recognised by its ``prior`` argument; see
        :mod:`torchem.model`).  Library models (``torchem.models``) bring
        their own names, transforms and simulator.
    param_names : list of str, optional
        Parameter names (required for custom models).
    param_xform : list of callables, optional
        Normalized -> natural transform per parameter (identity if omitted).
    simulate_func : callable, optional
        ``simulate_func(natural_params (S, P), **kwargs) -> dict``; used by
        :meth:`simulate` and :meth:`recover`.
    per_subject : bool, optional
        ``fit_func`` is written for one subject; torchem batches it with
        ``torch.func.vmap``.  Default: ``True`` exactly for pyEM-style functions.
    subject, columns, block, trial : str, list of str
        DataFrame input: see :meth:`SubjectBatch.from_dataframe`
        (``trial=False``: the row order is the trial order).
    input_names : list of str, optional
        Field names for list input (default: the model's declared inputs).
    categorical : list, optional
        Fields (names or positions) that hold option codes and may be given
        as text labels (default: what the model declares, see
        :func:`torchem.model.model_spec`); text in any other field is an error.
    missing : {"error", "skip"}
        ``"skip"``: a missing (NaN) response marks a missed trial, masked in
        its place; only for models that define skipped trials (that declare
        ``responses``).
    mask : str, optional
        DataFrame input: a column that is 1 on trials to use and 0 on trials
        to skip (same condition as ``missing="skip"``).
    first_option : int
        ``1`` for option codes ``1, 2, ...`` (MATLAB, hBayesDM): the model's
        categorical fields are shifted to ``0, 1, ...``.
    device : str, optional
        ``"cpu"``, ``"cuda"`` or ``"auto"`` (default: CUDA when available).
    dtype : torch.dtype
        Floating dtype of the fit: ``torch.float64`` (default) or ``torch.float32``.

    Examples
    --------
    >>> from torchem import EMModel
    >>> from torchem.models.rl import rw1a1b_fit, rw1a1b_simulate
    >>> sim = rw1a1b_simulate(true_params, nblocks=4, ntrials=24, seed=1)   # doctest: +SKIP
    >>> model = EMModel([[c, r] for c, r in zip(sim["choices"], sim["rewards"])], rw1a1b_fit)  # doctest: +SKIP
    >>> result = model.fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        all_data: Sequence[Sequence[Any]] | pd.DataFrame | SubjectBatch | None,
        fit_func: Callable,
        param_names: Sequence[str] | None = None,
        param_xform: Sequence[Callable] | None = None,
        simulate_func: Callable | None = None,
        *,
        per_subject: bool | None = None,
        subject: str = "subject",
        columns: Sequence[str] | None = None,
        block: str | None = None,
        trial: str | None = None,
        input_names: Sequence[str] | None = None,
        categorical: Sequence[str | int | Sequence[str | int]] | None = None,
        missing: str = "error",
        mask: str | None = None,
        first_option: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = check_dtype(dtype)
        # how the data are laid out carries over to with_data; how one file codes its values (first_option,
        # missed trials) does not: simulated data (recover, identify) are in the model's own coding
        self._frame_kwargs = {"subject": subject, "columns": columns, "block": block, "trial": trial,
                              "input_names": input_names, "categorical": categorical}
        groups, responses = data_roles(fit_func)
        if categorical is not None:
            groups = [g if isinstance(g, (str, int)) else tuple(g) for g in categorical]
        if (missing == "skip" or mask is not None) and not responses:
            raise ValueError(
                f"{getattr(fit_func, '__name__', 'this model')} does not define what happens on a skipped trial "
                "(it declares no responses), so missed trials cannot be masked (missing='skip' / mask=); remove "
                "those trials from the data instead")
        roles = {"categorical": groups, "responses": responses, "missing": missing, "first_option": first_option}
        self.all_data = all_data
        self.result: FitResult | None = None
        self._outfit: tuple[FitResult, dict] | None = None
        if all_data is None:  # simulation only: recover() and identify() bring the data
            batch = None
        elif isinstance(all_data, SubjectBatch):
            batch = all_data
        elif isinstance(all_data, pd.DataFrame):
            batch = SubjectBatch.from_dataframe(all_data, subject=subject, columns=columns, block=block, trial=trial,
                                                mask=mask, **roles)
        else:
            if mask is not None:
                raise ValueError("mask= names a DataFrame column; for list input give NaN responses and "
                                 "missing='skip'")
            batch = SubjectBatch.from_lists(all_data, names=input_names or getattr(fit_func, "inputs", None),
                                            **roles)
        self.batch = None if batch is None else batch.to(self.device, dtype)
        self.model = Model.resolve(fit_func, param_names, param_xform, simulate_func, per_subject, self.batch)
        if self.batch is not None:
            self._check_labels(groups)
            self.model.check_data(self.batch, self.dtype)
            self._check_param_count()

    def _check_labels(self, groups: Sequence) -> None:
        """A ready batch may carry text labels only in fields the model declares categorical."""
        allowed = set()
        for g in groups:
            for f in ([g] if isinstance(g, (str, int)) else g):
                allowed.add(self.batch.names[f] if isinstance(f, int) and f < len(self.batch.names) else f)
        coded = [n for n in self.batch.categories if n not in allowed]
        if coded:
            raise ValueError(f"field(s) {coded} were coded from text labels, but the model takes them as numbers; "
                             f"only its categorical fields {sorted(allowed) or '(none)'} may be label-coded")

    def _check_param_count(self) -> None:
        """A custom model is evaluated once on one subject, so that too few parameter names fail here, plainly."""
        if getattr(self.model.fit_func, "param_names", None) is not None:
            return  # a library model: the count was checked against its declaration
        one = self.batch.index([0])
        x = torch.zeros(1, self.model.n_params, dtype=self.dtype, device=self.device)
        try:
            with torch.no_grad():
                self.model.nll(x, one.data, one.mask)
        except IndexError as err:
            raise ValueError(f"fit_func fails with the {self.model.n_params} parameters named {self.param_names} "
                             f"(IndexError: {err}); give one name per parameter the function uses") from err

    # ---------------------------------------------------------------- basics
    @property
    def param_names(self) -> list[str]:
        return self.model.param_names

    @property
    def warnings(self) -> list[str]:
        """What was doubtful about the data (``batch.warnings``) and the last fit (``result.warnings``), each once."""
        fit = list(getattr(self.result, "warnings", []) or []) if self.result is not None else []
        return list(dict.fromkeys(list(self.batch.warnings) + fit))

    @property
    def fit_func(self) -> Callable:
        return self.model.fit_func

    @property
    def simulate_func(self) -> Callable | None:
        return self.model.simulate_func

    def __repr__(self) -> str:
        name = getattr(self.fit_func, "__name__", "fit_func")
        state = "fitted" if self.result is not None else "not fitted"
        data = "no data" if self.batch is None else f"{self.batch.n_subjects} subjects"
        return (f"EMModel({name}, params={self.param_names}, {data}, "
                f"device={self.device}, dtype={self.dtype}, {state})")

    def _fitted(self) -> FitResult:
        if self.result is None:
            raise RuntimeError("the model is not fitted yet: call fit() first")
        return self.result

    def _require_data(self) -> None:
        if self.batch is None:
            raise ValueError("this EMModel has no data (all_data=None): give all_data to fit it, or call "
                             "recover() or ModelComparison.identify(), which simulate data and fill all_data")

    def _adopt(self, other: "EMModel") -> None:
        """Take ``other``'s data and fit (a simulation-only model after recover/identify)."""
        self.all_data, self.batch, self.result = other.all_data, other.batch, other.result

    @staticmethod
    def _prior_of(res: FitResult) -> Prior:
        if res.group is None:
            raise ValueError("this result has no group distribution or prior (an individual maximum-likelihood "
                             "fit): fit hierarchically, or fit_individual(prior=...)")
        return res.group

    def with_data(self, data: Sequence[Sequence[Any]] | pd.DataFrame | SubjectBatch,
                  **frame_kwargs: Any) -> "EMModel":
        """An unfitted copy of this model (likelihood, names, transforms, simulator, device, dtype) on ``data``.

        ``data`` is taken like ``all_data`` in the constructor; DataFrame and
        list options, ``device`` and ``dtype`` default to this model's
        (override them by keyword).
        """
        kwargs = {"device": self.device, "dtype": self.dtype, **self._frame_kwargs, **frame_kwargs}
        return EMModel(data, self.model.fit_func, self.param_names, self.model.param_xform, self.simulate_func,
                       per_subject=self.model.per_subject, **kwargs)

    # ------------------------------------------------------------------- fit
    def fit(self, *, verbose: int = 1, callback: Callable[[IterationState], Any] | None = None,
            njobs: int | None = None, options: FitOptions | None = None, **kwargs: Any) -> FitResult:
        """Fit by hierarchical EM with batched MAP E-steps.

        Parameters
        ----------
        verbose : int
            1 shows a tqdm bar with the E-step and NPL; 0 is silent.
        callback : callable, optional
            ``callback(IterationState)`` after every E-step; returning
            ``False`` stops and keeps the partial result.
        njobs : int, optional
            Accepted for pyEM compatibility and ignored: all subjects run as one batch.
        options : FitOptions, optional
            Every option at once; or give them as keywords.
        **kwargs
            Any field of :class:`torchem.options.FitOptions` (``group`` /
            pyEM's ``mstep``, ``prior``, ``prior_mu``/``prior_sigma``,
            ``convergence``, ``convergence_method``, ``convergence_custom``,
            ``convergence_precision``, ``accelerate``, ``mstep_maxit``,
            ``seed``, ``estep``, ...).  Bad values raise ``ValueError`` before
            any work.

        Returns
        -------
        FitResult
            Also kept as ``self.result``.  If the fit raises partway (an
            error in the model, ``KeyboardInterrupt``), ``self.result`` holds
            the last completed E-step's result marked ``stopped`` (or
            ``None``), and the exception propagates.
        """
        kwargs = _pyem_optimizer_options(kwargs)
        opts = FitOptions(**kwargs) if options is None else options
        if options is not None and kwargs:
            raise ValueError("give options either as a FitOptions or as keywords, not both")
        self._require_data()
        self.result = None  # a failed refit never leaves the previous result looking current
        run = EMRun(self.model, self.batch, opts, verbose=verbose, callback=callback, device=self.device)
        try:
            self.result = run.run()
        except BaseException as exc:
            partial = run.partial_result()
            if partial is not None:
                partial.stopped = True
                partial.stop_reason = f"interrupted by {type(exc).__name__} after E-step {partial.n_iter}"
                partial.warnings.append(f"the fit did not finish ({type(exc).__name__}: {exc}); this is the "
                                        "result of the last completed E-step")
            self.result = partial
            raise
        return self.result

    def save(self, path: "str | os.PathLike") -> None:
        """Write the fitted result to ``path`` (see :meth:`FitResult.save`); the likelihood and data are code
        and input files, which stay with the user."""
        self._fitted().save(path)

    def load(self, path: "str | os.PathLike", map_location: Any = None) -> "EMModel":
        """Make the result saved at ``path`` this model's result (moved to its device and dtype); returns ``self``.

        The saved parameter names (and, with data, the subject ids) must match this model's, so that
        evidence, iBIC and plots use the data the result was fitted to.
        """
        res = FitResult.load(path, map_location=self.device if map_location is None else map_location,
                             param_xform=self.model.param_xform)
        if list(res.param_names) != list(self.param_names):
            raise ValueError(f"{path}: the saved result has parameters {res.param_names}, this model "
                             f"{self.param_names}")
        if self.batch is not None and list(res.subject_ids) != list(self.batch.subject_ids):
            raise ValueError(f"{path}: the saved result's {res.n_subjects} subject ids differ from this model's "
                             f"{self.batch.n_subjects} subjects")
        for k in ("m", "inv_h", "NPL", "NLPrior", "NLL", "hess_logdet", "lme"):
            if getattr(res, k) is not None:
                setattr(res, k, getattr(res, k).to(self.dtype))
        for k in ("group", "estep_prior"):
            if getattr(res, k) is not None:
                setattr(res, k, getattr(res, k).to(self.device, self.dtype))
        self.result = res
        return self

    def fit_individual(self, prior: Prior | None = None, nstarts: int = 10, seed: int | None = 0,
                       maxit: int = 500, gtol: float = 1e-7) -> FitResult:
        """Fit every subject on its own: maximum likelihood, or MAP under a fixed ``prior``.

        One batched L-BFGS runs all subjects and ``nstarts`` random starts per
        subject as extra rows and keeps each subject's best; exact Hessians
        give the standard errors (``result.standard_errors()``).  Subjects
        whose Hessian is not positive definite (a parameter running to the
        edge of its range) are flagged with NaN standard errors.

        Returns
        -------
        FitResult
            Also kept as ``self.result``.
        """
        self._require_data()
        self.result = None
        self.result = fit_individual(self.model, self.batch, prior, nstarts=nstarts, seed=seed, maxit=maxit,
                                     gtol=gtol)
        return self.result

    def scipy_minimize(self, seed: int | None = 0, prior: Prior | None = None, nstarts: int = 10) -> FitResult:
        """pyEM's name for :meth:`fit_individual` (no scipy involved: one batched L-BFGS)."""
        return self.fit_individual(prior=prior, nstarts=nstarts, seed=seed)

    # ------------------------------------------------------------ accessors
    def get_outfit(self) -> dict[str, np.ndarray]:
        """The model's ``output="all"`` at the fitted MAPs, as numpy arrays.

        Always holds ``params`` (natural, ``(S, P)``) and ``nll`` ``(S,)``,
        plus whatever trial-wise quantities the model returns (``EV``, ``PE``,
        ``ch_prob`` for the RL models), subjects first and padded like the data.
        """
        res = self._fitted()
        with torch.no_grad():
            out = self.model(res.m, self.batch.data, self.batch.mask, output="all")
        if not isinstance(out, dict):
            out = {"nll": out}
        out = dict(out)
        out.setdefault("params", res.natural_params())
        out["mask"] = self.batch.mask
        return {k: _numpy(v) for k, v in out.items()}

    @property
    def outfit(self) -> dict[str, np.ndarray]:
        """pyEM's ``model.outfit``: :meth:`get_outfit` of the current fit, computed once per fit."""
        res = self._fitted()
        if self._outfit is None or self._outfit[0] is not res:
            self._outfit = (res, self.get_outfit())
        return self._outfit[1]

    def posterior(self) -> dict[str, np.ndarray]:
        """pyEM's posterior: ``{"mu", "sigma"}`` (normalized space).

        After a hierarchical fit: the group location and variances ``(P,)``.
        After an individual fit without a prior (:meth:`fit_individual`), as
        pyEM's ``scipy_minimize``: each subject's estimate and the diagonal of
        its inverse Hessian, ``(S, P)`` (subjects first).
        """
        res = self._fitted()
        if res.group is None:
            return {"mu": _numpy(res.m), "sigma": _numpy(res.inv_h.diagonal(dim1=-2, dim2=-1))}
        return {"mu": _numpy(res.posterior_mu), "sigma": _numpy(res.posterior_var)}

    def subject_params(self) -> pd.DataFrame:
        """Natural-space MAP parameters per subject (same as ``result.params_df()``)."""
        return self._fitted().params_df()

    def get_param_transform(self, name_or_index: str | int) -> Callable:
        """The normalized -> natural transform of one parameter, by name or position."""
        if isinstance(name_or_index, str):
            if name_or_index not in self.param_names:
                raise ValueError(f"unknown parameter {name_or_index!r}; parameters are {self.param_names}")
            name_or_index = self.param_names.index(name_or_index)
        return self.model.param_xform[name_or_index]

    # ------------------------------------------------------------- evidence
    def compute_lme(self, method: str = "laplace", nsamples: int = 4000, seed: int | None = 0,
                    return_se: bool = False, min_ess: float = 50.0):
        """Log model evidence per subject and in total.

        Parameters
        ----------
        method : {"laplace", "importance"}
            ``"laplace"``: ``-NPL_i + P/2 log 2pi - 1/2 log det H_i`` with the
            exact Hessian.  ``"importance"``: ``log mean w`` of ``nsamples``
            importance weights per subject (Student-t proposal at the MAP
            with the inverse Hessian as scale, the fitted group as prior),
            which does not assume a Gaussian posterior.
        nsamples, seed : int
            Draws per subject and their seed (``"importance"`` only).
        return_se : bool
            Also return the per-subject Monte Carlo standard errors
            (zeros for ``"laplace"``).
        min_ess : float
            ``"importance"``: subjects with a smaller effective sample size
            are flagged not ``good``.

        Returns
        -------
        lap : ndarray
            ``(S,)`` per-subject log evidence.
        lme : float
            ``sum(lap) - P log S`` (pyEM's total, penalizing the group parameters).
        good : ndarray
            ``(S,)`` bool: the Hessian was positive definite (else the group
            covariance stood in for its inverse); for ``"importance"`` also
            an effective sample size of at least ``min_ess``.
        se : ndarray
            ``(S,)`` standard errors, only with ``return_se=True``.
        """
        res = self._fitted()
        if method == "laplace":
            lap = res.laplace_evidence()
            se = torch.zeros_like(lap)
            good = res.hessian_ok
        elif method == "importance":
            S = res.n_subjects
            ctx = distributed.context(self.device)  # under a process group each rank draws for its shard
            lo, hi = (0, S) if ctx is None else ctx.shard(S)
            idx = torch.arange(lo, hi, device=self.device)
            fun = neg_log_posterior(self.model, self.batch, self._prior_of(res), idx)
            isr = importance_draws(fun, res.m[lo:hi], res.inv_h[lo:hi], nsamples, 0 if seed is None else int(seed),
                                   5.0, 0.0, pairs_per_call(self.batch.mask[0].numel(), self.device), idx)
            lap, se, ess = isr.log_evidence, isr.log_evidence_se, isr.ess
            if ctx is not None:
                lap, se, ess = ctx.gather([lap, se, ess], S)
            good = res.hessian_ok & (ess >= min_ess)
        else:
            raise ValueError(f"method must be 'laplace' or 'importance', got {method!r}")
        out = (_numpy(lap), evidence.total_lme(lap, res.n_params), _numpy(good))
        return out + (_numpy(se),) if return_se else out

    def integrated_log_likelihood(self, nsamples: int = 2000, seed: int | None = 0,
                                  max_elements: int | None = None, group: Prior | None = None) -> torch.Tensor:
        """``(S,)`` Monte Carlo ``log E_group[p(D_i | theta)]`` with ``nsamples`` draws per subject.

        All draws of all subjects are evaluated as batched likelihood calls,
        chunked to about ``max_elements`` trial cells each (default: a size
        that stays in cache on a CPU and fills a GPU).  ``group``: draw from
        this distribution instead of the fitted group (no fit needed then).
        """
        self._require_data()
        grp = self._prior_of(self._fitted()) if group is None else group.to(self.device, self.dtype)
        gen = torch.Generator()
        gen.manual_seed(0 if seed is None else int(seed))
        data, mask = self.batch.data, self.batch.mask
        cells = max(1, int(mask[0].numel()))
        chunk = pairs_per_call(cells, self.device) if max_elements is None else max(1, max_elements // cells)

        def nll_fn(theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return self.model.nll(theta, tuple(d[idx] for d in data), mask[idx])

        S = self.batch.n_subjects
        subjects = torch.arange(S, device=self.device)

        def sample(n: int) -> torch.Tensor:  # row r is subject r % S (a group with covariates has its own means)
            return grp.sample(n, gen, subjects.repeat(n // S))

        ctx = distributed.context(self.device)  # under a process group each rank evaluates its shard
        shard = None if ctx is None else ctx.shard(S)
        ilog = evidence.integrated_log_likelihood(nll_fn, sample, S, nsamples, chunk, shard)
        return ilog if ctx is None else ctx.gather([ilog], S)[0]

    def compute_integrated_bic(self, nsamples: int = 2000, seed: int | None = 0, convention: str = "huys",
                               max_elements: int | None = None, func_output: str = "all",
                               nll_key: str = "nll") -> float:
        """Integrated BIC (lower is better).

        Parameters
        ----------
        nsamples : int
            Draws from the fitted group distribution per subject.
        seed : int
            Seed of the draws (the same seed gives the same value).
        convention : {"huys", "pyem"}
            ``"huys"`` (Huys et al. 2011): penalty ``K log N`` with ``K`` the
            group-level parameters (``2P`` for a diagonal Gaussian) and ``N``
            all observations.  ``"pyem"``: pyEM's penalty ``P log n`` with
            ``n`` the trials of one subject, for comparing with pyEM numbers.
        func_output, nll_key : str
            pyEM's arguments, accepted and not needed (the likelihood is evaluated directly).
        """
        res = self._fitted()
        ilog = self.integrated_log_likelihood(nsamples, seed, max_elements)
        P = res.n_params
        if convention == "huys":
            k = getattr(res.group, "n_hyper", 2 * P)
            return evidence.integrated_bic(ilog, k, int(res.n_obs.sum()))
        if convention == "pyem":
            return evidence.integrated_bic(ilog, P, int(res.n_obs[0]))
        raise ValueError(f"convention must be 'huys' or 'pyem', got {convention!r}")

    def compute_pseudo_r2(self, noptions: int = 2, metric: str = "median") -> float:
        """Pseudo-R² of the fitted likelihood against chance (``1/noptions`` per trial)."""
        res = self._fitted()
        return evidence.pseudo_r2(res.NLL, res.n_obs, noptions, metric)

    # ------------------------------------------------- simulation, recovery
    def simulate(self, *args, **kwargs) -> dict:
        """Call the model's simulator: ``simulate_func(natural_params, **kwargs)``."""
        if self.simulate_func is None:
            raise RuntimeError("this model has no simulate_func")
        return self.simulate_func(*args, **kwargs)

    def recover(self, true_params: np.ndarray, pr_inputs: Sequence[str] | None = None,
                fit_kwargs: dict | None = None, nrounds: int = 1, simulate_func: Callable | None = None,
                **sim_kwargs) -> dict:
        """Parameter recovery: simulate from ``true_params``, fit, compare.

        A model without data (``all_data=None``) takes the last round's
        simulated data and fit, so ``all_data``, :meth:`get_outfit` and the
        evidence methods refer to them afterwards; a model with data is left
        unchanged (the recovery fit is ``recovery_model`` in the result).

        Parameters
        ----------
        true_params : ndarray
            ``(S, P)`` natural-space generating parameters.
        pr_inputs : list of str, optional
            Keys of the simulator's output that the fit function takes, in
            order (default: the model's declared inputs).
        fit_kwargs : dict, optional
            Options for :meth:`fit` (default: ``verbose=0``).
        nrounds : int
            Repeat over fresh simulations of the same parameters (seed
            ``seed + round`` when ``seed`` is given) and report the spread.
        simulate_func : callable, optional
            Simulator to use instead of the model's own (pyEM's argument).
        **sim_kwargs
            Passed to the simulator (``nblocks``, ``ntrials``, ``seed``, ...).

        Returns
        -------
        dict
            ``true_params``, ``estimated_params`` (natural ``(S, P)``; rounds
            stacked to ``(nrounds * S, P)``), ``correlation`` and ``rmse``
            (per parameter; means over rounds), ``correlation_rounds`` and
            ``rmse_rounds`` ``(nrounds, P)``, ``correlation_sd``,
            ``param_names``, ``fit_result``, ``recovery_model`` (the fitted
            :class:`EMModel`) and ``sim`` (of the last round).

        Under a process group (``torchrun``) with ``nrounds > 1`` the rounds
        are spread over the ranks, each fitted in one process, and every rank
        returns all rounds' numbers; ``fit_result``, ``recovery_model`` and
        ``sim`` of the last round are rank 0's (``None`` on other ranks).
        """
        true_params = np.asarray(true_params, dtype=float)
        keys = list(pr_inputs or self.model.inputs or [])
        if not keys:
            raise ValueError("pr_inputs must name the simulator outputs the fit function takes")
        simulate = self.simulate if simulate_func is None else simulate_func
        # under a process group the rounds are spread over the ranks (the last one on rank 0), each fitted in one
        # process; one round is a single fit, sharded over the ranks like any fit
        ctx = distributed.context(self.device) if nrounds > 1 else None
        mine = [r for r in range(nrounds) if ctx is None or (nrounds - 1 - r) % ctx.world_size == ctx.rank]
        rounds, result, twin, sim = [], None, None, None
        for rnd in mine:
            kwargs = dict(sim_kwargs)
            if kwargs.get("seed") is not None:
                kwargs["seed"] = int(kwargs["seed"]) + rnd
            sim = simulate(true_params, **kwargs)
            missing = [k for k in keys if k not in sim]
            if missing:
                raise ValueError(f"simulator output has no {missing}; it has {sorted(sim)}")
            all_data = [[sim[k][i] for k in keys] for i in range(true_params.shape[0])]
            twin = self.with_data(all_data, input_names=keys)
            with distributed.local() if ctx is not None else contextlib.nullcontext():
                result = twin.fit(**{"verbose": 0, **(fit_kwargs or {})})
            rec = parameter_recovery(true_params, result.natural_params().detach().cpu().numpy())
            rounds.append((rnd, rec.est_params, rec.corr, rec.rmse))
        if ctx is not None:
            rounds = sorted(r for part in ctx.all_gather_object(rounds) for r in part)
        estimates = [r[1] for r in rounds]
        corrs, rmses = np.asarray([r[2] for r in rounds]), np.asarray([r[3] for r in rounds])
        if self.batch is None and twin is not None and (ctx is None or ctx.rank == 0):
            self._adopt(twin)
        return {"true_params": np.tile(true_params, (nrounds, 1)), "estimated_params": np.concatenate(estimates),
                "correlation": corrs.mean(0), "rmse": rmses.mean(0), "correlation_rounds": corrs,
                "rmse_rounds": rmses, "correlation_sd": corrs.std(0, ddof=1) if nrounds > 1 else np.zeros(corrs.shape[1]),
                "param_names": list(self.param_names), "fit_result": result, "recovery_model": twin, "sim": sim}

    def plot_recovery(self, recovery_dict: dict, show_line: bool = True, figsize: tuple[float, float] | None = None,
                      show: bool = False):
        """Simulated against estimated scatter per parameter, with r; returns the figure.

        Parameters
        ----------
        recovery_dict : dict
            The result of :meth:`recover` (``true_params``, ``estimated_params``).
        show_line : bool
            Draw the identity line.
        figsize : tuple, optional
            Figure size in inches.
        show : bool
            Call :func:`matplotlib.pyplot.show` (pyEM does so by default;
            torchem returns the figure without showing it unless asked).
        """
        fig = plotting.plot_recovery(recovery_dict["true_params"], recovery_dict["estimated_params"],
                                     recovery_dict.get("param_names", self.param_names), figsize=figsize,
                                     show_line=show_line)
        if show:
            import matplotlib.pyplot as plt

            plt.show()
        return fig

    # ------------------------------------------------- predictive checks
    def ppc(self, nsims: int = 100, draws: str = "posterior", seed: int | None = 0, statistics: Any = None, *,
            builtin: bool = True, family: "ppc.Family | None" = None, chunk: int | None = None,
            nsamples: int = 2000, verbose: int = 0) -> "ppc.PPCResult":
        """Posterior predictive check: simulate every subject ``nsims`` times and compare summary statistics.

        Parameters
        ----------
        nsims : int
            Replicates per subject.
        draws : {"posterior", "importance", "laplace", "map"}
            Parameters of each replicate: drawn from the subject's posterior
            under the fitted group prior (``"posterior"`` = ``"importance"``:
            importance-weighted draws; ``"laplace"``: the Gaussian at the
            MAP with the inverse Hessian) or fixed at the MAP.
        seed : int
            Seed of the draws and the simulation.
        statistics : dict, callable or list, optional
            Extra statistics: functions of a :class:`torchem.ppc.Replicate`
            returning ``(n,)``, ``(n, K)`` or ``{label: (n,)}``.
        builtin : bool
            Include the model family's built-in statistics (bandits: choice
            rate of the better option per trial and block, win-stay /
            lose-shift; two-step: stay probability by reward x transition;
            regressions: fitted vs observed; ...).
        family : torchem.ppc.Family, optional
            How the data arise, for a model without a registered family.
        chunk : int, optional
            Replicates per batched simulation (default: bounded memory on the device).
        nsamples : int
            Weighted draws per subject behind ``draws="importance"``.
        verbose : int
            1: a progress bar.

        Returns
        -------
        torchem.ppc.PPCResult
            ``observed`` and ``simulated`` tidy DataFrames, ``summary()``,
            ``coverage()`` and ``plot()`` (:func:`torchem.plotting.plot_ppc`).
        """
        return ppc.posterior_predictive(self.model, self.batch, self._fitted(), nsims=nsims, draws=draws, seed=seed,
                                        statistics=statistics, builtin=builtin, family=family, chunk=chunk,
                                        nsamples=nsamples, verbose=verbose)

    def cross_validate(self, folds: str | int = "blocks", seed: int | None = 0, *, nsamples: int = 2000,
                       fit_kwargs: dict | None = None, exchangeable: bool | None = None,
                       verbose: int = 0) -> "crossval.CVResult":
        """Cross-validated held-out predictive likelihood (:mod:`torchem.crossval`).

        For each fold a copy of this model is fitted (hierarchically) to the
        training trials, and each subject's held-out trials are scored by
        their log predictive likelihood, averaged over importance-weighted
        draws of the subject's training posterior, and at the training MAP.

        Parameters
        ----------
        folds : "blocks" or int
            ``"blocks"``: leave one block out.  ``k``: ``k`` folds of whole
            blocks for models whose likelihood depends on trial order
            (learning), of single trials for models with exchangeable trials.
        seed : int
            Seed of the fold assignment, the fits and the draws.
        nsamples : int
            Importance draws per subject and fold.
        fit_kwargs : dict, optional
            Options of the training fits that differ from this model's last
            fit (default: the same options, or the defaults if unfitted).
        exchangeable : bool, optional
            Override whether single trials may be held out.
        verbose : int
            1: a progress bar over folds.

        Returns
        -------
        torchem.crossval.CVResult
            Per-subject and total held-out log-likelihood with standard errors.
        """
        base = self.result.options if (self.result is not None and self.result.options is not None) else FitOptions()
        opts = {f.name: getattr(base, f.name) for f in dataclasses.fields(FitOptions)}
        opts.update(seed=seed, **(fit_kwargs or {}))

        def fit(train: SubjectBatch) -> FitResult:
            return self.with_data(train).fit(verbose=0, options=FitOptions(**opts))

        return crossval.cross_validate(self.model, self.batch, fit, folds=folds, seed=seed, nsamples=nsamples,
                                       exchangeable=exchangeable, verbose=verbose)
