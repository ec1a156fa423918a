"""``EMModel``: pyEM's user-facing vocabulary over torchem's batched engine."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from . import crossval, evidence, plotting, ppc
from .data import SubjectBatch
from .em import EMRun, FitResult, IterationState
from .estep import importance_draws, neg_log_posterior
from .importance import pairs_per_call
from .individual import fit_individual
from .model import Model
from .options import FitOptions
from .priors import Prior

__all__ = ["EMModel", "resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


class EMModel:
    """A model to fit to many subjects by hierarchical EM with MAP estimation.

    Parameters
    ----------
    all_data : list, DataFrame or SubjectBatch
        pyEM-style per-subject lists (``all_data[i] = [choices, rewards]``),
        a long DataFrame (then give ``columns`` and optionally ``subject``,
        ``block``, ``trial``), or a ready :class:`SubjectBatch`.
    fit_func : callable
        Batched likelihood ``fit_func(params (S, P), *data, mask=None,
        output="nll") -> (S,)``, or a one-subject function with
        ``per_subject=True``.  Library models (``torchem.models``) bring their
        own names, transforms and simulator.
    param_names : list of str, optional
        Parameter names (required for custom models).
    param_xform : list of callables, optional
        Normalized -> natural transform per parameter (identity if omitted).
    simulate_func : callable, optional
        ``simulate_func(natural_params (S, P), **kwargs) -> dict``; used by
        :meth:`simulate` and :meth:`recover`.
    per_subject : bool
        ``fit_func`` is written for one subject; torchem batches it with
        ``torch.func.vmap``.
    subject, columns, block, trial : str, list of str
        DataFrame input: see :meth:`SubjectBatch.from_dataframe`.
    input_names : list of str, optional
        Field names for list input (default: the model's declared inputs).
    device : str, optional
        ``"cpu"``, ``"cuda"`` or ``"auto"`` (default: CUDA when available).
    dtype : torch.dtype
        Floating dtype of the fit (default ``torch.float64``).

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
        all_data: Sequence[Sequence[Any]] | pd.DataFrame | SubjectBatch,
        fit_func: Callable,
        param_names: Sequence[str] | None = None,
        param_xform: Sequence[Callable] | None = None,
        simulate_func: Callable | None = None,
        *,
        per_subject: bool = False,
        subject: str = "subject",
        columns: Sequence[str] | None = None,
        block: str | None = None,
        trial: str | None = None,
        input_names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = dtype
        self._frame_kwargs = {"subject": subject, "columns": columns, "block": block, "trial": trial,
                              "input_names": input_names}
        if isinstance(all_data, SubjectBatch):
            batch = all_data
        elif isinstance(all_data, pd.DataFrame):
            batch = SubjectBatch.from_dataframe(all_data, subject=subject, columns=columns, block=block, trial=trial)
        else:
            batch = SubjectBatch.from_lists(all_data, names=input_names or getattr(fit_func, "inputs", None))
        self.batch = batch.to(self.device, dtype)
        self.model = Model.resolve(fit_func, param_names, param_xform, simulate_func, per_subject, self.batch)
        self.model.check_data(self.batch)
        self.result: FitResult | None = None

    # ---------------------------------------------------------------- basics
    @property
    def param_names(self) -> list[str]:
        return self.model.param_names

    @property
    def fit_func(self) -> Callable:
        return self.model.fit_func

    @property
    def simulate_func(self) -> Callable | None:
        return self.model.simulate_func

    def __repr__(self) -> str:
        name = getattr(self.fit_func, "__name__", "fit_func")
        state = "fitted" if self.result is not None else "not fitted"
        return (f"EMModel({name}, params={self.param_names}, {self.batch.n_subjects} subjects, "
                f"device={self.device}, dtype={self.dtype}, {state})")

    def _fitted(self) -> FitResult:
        if self.result is None:
            raise RuntimeError("the model is not fitted yet: call fit() first")
        return self.result

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
        list options default to this model's (override them by keyword).
        """
        kwargs = {**self._frame_kwargs, **frame_kwargs}
        return EMModel(data, self.model.fit_func, self.param_names, self.model.param_xform, self.simulate_func,
                       per_subject=self.model.per_subject, device=self.device, dtype=self.dtype, **kwargs)

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
        opts = FitOptions(**kwargs) if options is None else options
        if options is not None and kwargs:
            raise ValueError("give options either as a FitOptions or as keywords, not both")
        self.result = None  # a failed refit never leaves the previous result looking current
        run = EMRun(self.model, self.batch, opts, verbose=verbose, callback=callback)
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
            lap = evidence.laplace_lme(res.NPL, res.hess_logdet, res.n_params)
            se = torch.zeros_like(lap)
            good = res.hessian_ok
        elif method == "importance":
            fun = neg_log_posterior(self.model, self.batch, self._prior_of(res))
            isr = importance_draws(fun, res.m, res.inv_h, nsamples, 0 if seed is None else int(seed), 5.0, 0.0,
                                   pairs_per_call(self.batch.mask[0].numel(), self.device))
            lap, se, good = isr.log_evidence, isr.log_evidence_se, res.hessian_ok & (isr.ess >= min_ess)
        else:
            raise ValueError(f"method must be 'laplace' or 'importance', got {method!r}")
        out = (_numpy(lap), evidence.total_lme(lap, res.n_params), _numpy(good))
        return out + (_numpy(se),) if return_se else out

    def integrated_log_likelihood(self, nsamples: int = 2000, seed: int | None = 0,
                                  max_elements: int | None = None) -> torch.Tensor:
        """``(S,)`` Monte Carlo ``log E_group[p(D_i | theta)]`` with ``nsamples`` draws per subject.

        All draws of all subjects are evaluated as batched likelihood calls,
        chunked to about ``max_elements`` trial cells each (default: a size
        that stays in cache on a CPU and fills a GPU).
        """
        res = self._fitted()
        grp = self._prior_of(res)
        gen = torch.Generator()
        gen.manual_seed(0 if seed is None else int(seed))
        data, mask = self.batch.data, self.batch.mask
        cells = max(1, int(mask[0].numel()))
        chunk = pairs_per_call(cells, self.device) if max_elements is None else max(1, max_elements // cells)

        def nll_fn(theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return self.model.nll(theta, tuple(d[idx] for d in data), mask[idx])

        S = res.n_subjects
        subjects = torch.arange(S, device=self.device)

        def sample(n: int) -> torch.Tensor:  # row r is subject r % S (a group with covariates has its own means)
            return grp.sample(n, gen, subjects.repeat(n // S))

        return evidence.integrated_log_likelihood(nll_fn, sample, S, nsamples, chunk)

    def compute_integrated_bic(self, nsamples: int = 2000, seed: int | None = 0, convention: str = "huys",
                               max_elements: int | None = None) -> float:
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
                fit_kwargs: dict | None = None, nrounds: int = 1, **sim_kwargs) -> dict:
        """Parameter recovery: simulate from ``true_params``, fit, compare.

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
        **sim_kwargs
            Passed to the simulator (``nblocks``, ``ntrials``, ``seed``, ...).

        Returns
        -------
        dict
            ``true_params``, ``estimated_params`` (natural ``(S, P)``; rounds
            stacked to ``(nrounds * S, P)``), ``correlation`` and ``rmse``
            (per parameter; means over rounds), ``correlation_rounds`` and
            ``rmse_rounds`` ``(nrounds, P)``, ``correlation_sd``,
            ``param_names``, ``fit_result`` and ``sim`` (of the last round).
        """
        true_params = np.asarray(true_params, dtype=float)
        keys = list(pr_inputs or self.model.inputs or [])
        if not keys:
            raise ValueError("pr_inputs must name the simulator outputs the fit function takes")
        estimates, corrs, rmses = [], [], []
        for rnd in range(nrounds):
            kwargs = dict(sim_kwargs)
            if kwargs.get("seed") is not None:
                kwargs["seed"] = int(kwargs["seed"]) + rnd
            sim = self.simulate(true_params, **kwargs)
            missing = [k for k in keys if k not in sim]
            if missing:
                raise ValueError(f"simulator output has no {missing}; it has {sorted(sim)}")
            all_data = [[sim[k][i] for k in keys] for i in range(true_params.shape[0])]
            twin = self.with_data(all_data, input_names=keys)
            result = twin.fit(**{"verbose": 0, **(fit_kwargs or {})})
            est = result.natural_params().detach().cpu().numpy()
            estimates.append(est)
            corrs.append([np.corrcoef(true_params[:, j], est[:, j])[0, 1] for j in range(est.shape[1])])
            rmses.append(np.sqrt(((true_params - est) ** 2).mean(0)))
        corrs, rmses = np.asarray(corrs), np.asarray(rmses)
        return {"true_params": np.tile(true_params, (nrounds, 1)), "estimated_params": np.concatenate(estimates),
                "correlation": corrs.mean(0), "rmse": rmses.mean(0), "correlation_rounds": corrs,
                "rmse_rounds": rmses, "correlation_sd": corrs.std(0, ddof=1) if nrounds > 1 else np.zeros(corrs.shape[1]),
                "param_names": list(self.param_names), "fit_result": result, "sim": sim}

    def plot_recovery(self, recovery_dict: dict, figsize: tuple[float, float] | None = None):
        """Simulated against estimated scatter per parameter, with r; returns the figure."""
        return plotting.plot_recovery(recovery_dict["true_params"], recovery_dict["estimated_params"],
                                      recovery_dict.get("param_names", self.param_names), figsize=figsize)

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
