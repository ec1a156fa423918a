"""pyEM's ``pyem.core.em``: ``EMfit`` and ``EMConfig`` on torchem's batched engine.

``EMfit(all_data, objfunc, param_names, config=EMConfig(...))`` runs
``EMModel(all_data, objfunc, param_names).fit(...)`` with the config mapped
onto :class:`~torchem.options.FitOptions` and returns pyEM's dict, in pyEM's
parameters-first layout (``m`` ``(P, S)``, ``inv_h`` ``(P, P, S)``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..api import EMModel
from ..priors import Prior
from .optim import OptimConfig

__all__ = ["EMfit", "EMConfig"]


@dataclass
class EMConfig:
    """pyEM's EM settings (pyEM's defaults).

    Attributes
    ----------
    mstep_maxit : int
        Maximum EM iterations (E-steps).
    estep_maxit : int, optional
        L-BFGS iterations per subject and E-step (torchem's default when ``None``).
    convergence_type : {"NPL", "LME"}
        ``"NPL"``: pyEM's rule on the summed (``convergence_method``) negative
        log posterior; ``"LME"``: torchem's rule on the Laplace log evidence.
    convergence_method, convergence_custom, convergence_crit, convergence_precision
        pyEM's NPL rule: aggregate by ``"sum"``/``"mean"``/``"median"``; change
        between iterations (``None``), ``"relative_npl"`` or
        ``"running_average"``; tolerance; decimals each NPL is rounded to.
    njobs : int
        Accepted and ignored: all subjects run as one batch.
    optim : OptimConfig
        E-step settings (restart budget, ``gtol``, ``maxiter``).
    seed : int, optional
        Seed of starting points and restarts (``None``: a fresh one).
    max_subject_retries : int
        Added to ``optim.max_restarts``.
    compute_lme : bool
        Also return the Laplace evidence (``Lap``, ``lme``, ``good``).
    mstep : {"gaussian", "laplace", "student_t", "cauchy"}
        Group family of the M-step.
    df : float
        Degrees of freedom of the ``"student_t"`` family (pyEM's ``make_group(..., df=8.0)``).
    """

    mstep_maxit: int = 200
    estep_maxit: int | None = None
    convergence_method: str = "sum"
    convergence_type: str = "NPL"
    convergence_custom: str | None = None
    convergence_crit: float = 1e-3
    convergence_precision: int = 6
    njobs: int = -1
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int | None = None
    max_subject_retries: int = 0
    compute_lme: bool = False
    mstep: str = "gaussian"
    df: float = 8.0

    def fit_options(self) -> dict[str, Any]:
        """The keywords of :meth:`EMModel.fit` (:class:`~torchem.options.FitOptions`) this config stands for."""
        out = {name: getattr(self, name) for name in (
            "mstep_maxit", "convergence_type", "convergence_method", "convergence_custom", "convergence_crit",
            "convergence_precision", "seed", "mstep", "df")}
        if self.estep_maxit is not None:
            out["estep_maxit"] = int(self.estep_maxit)
        out.update(self.optim.fit_options())
        out["max_restarts"] += int(self.max_subject_retries)
        return out


_OPTIM_KEYS = {"optim_method": "method", "optim_options": "options", "max_restarts": "max_restarts"}


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def EMfit(all_data: Any, objfunc: Callable, param_names: Sequence[str] | None = None, *,  # noqa: N802 - pyEM
          verbose: int = 1, config: EMConfig | None = None, prior: Prior | None = None,
          **kwargs: Any) -> dict[str, Any]:
    """Hierarchical EM with MAP estimation, pyEM's low-level entry point.

    Parameters
    ----------
    all_data : list, DataFrame or SubjectBatch
        As ``EMModel``'s ``all_data`` (pyEM: one list of arguments per subject).
    objfunc : callable
        A torchem likelihood, or a pyEM-style ``f(params, *data, prior=None,
        output="npl")`` written with torch operations.
    param_names : sequence of str, optional
        Parameter names (optional for library models).
    verbose : int
        1: a progress bar.
    config : EMConfig, optional
        pyEM's settings (default ``EMConfig()``).
    prior : Prior, optional
        Starting prior (a :mod:`torchem.priors` object, e.g. ``GaussianPrior(mu, sigma)``).
    **kwargs
        Any :class:`EMConfig` field (overrides ``config``), pyEM's
        ``optim_method``/``optim_options``/``max_restarts``, any further
        :class:`~torchem.options.FitOptions` field (e.g. ``accelerate``), and
        ``device``/``dtype`` of the fit.

    Returns
    -------
    dict
        pyEM's keys: ``m`` ``(P, S)``, ``inv_h`` ``(P, P, S)``, ``posterior``
        (``{"mu": (P,), "sigma": (P,)}``, variances), ``NPL``, ``NLPrior``,
        ``NLL`` ``(S,)``, ``convergence``; with ``compute_lme`` also ``Lap``,
        ``lme``, ``good``; and torchem's ``param_names``, ``fit_result``
        (the :class:`~torchem.em.FitResult`) and ``model`` (the fitted
        :class:`~torchem.EMModel`).
    """
    config = EMConfig() if config is None else config
    model_kwargs = {k: kwargs.pop(k) for k in ("device", "dtype") if k in kwargs}
    names = {f.name for f in fields(EMConfig)}
    config = replace(config, **{k: kwargs.pop(k) for k in list(kwargs) if k in names})
    optim = {_OPTIM_KEYS[k]: kwargs.pop(k) for k in list(kwargs) if k in _OPTIM_KEYS}
    if optim:
        config = replace(config, optim=replace(config.optim, **optim))
    model = EMModel(all_data, objfunc, list(param_names) if param_names else None, **model_kwargs)
    res = model.fit(verbose=verbose, prior=prior, **{**config.fit_options(), **kwargs})
    out = {"m": _numpy(res.m).T, "inv_h": _numpy(res.inv_h).transpose(1, 2, 0),
           "posterior": {"mu": _numpy(res.posterior_mu), "sigma": _numpy(res.posterior_var)},
           "NPL": _numpy(res.NPL), "NLPrior": _numpy(res.NLPrior), "NLL": _numpy(res.NLL),
           "convergence": bool(res.convergence), "param_names": list(model.param_names), "fit_result": res,
           "model": model}
    if config.compute_lme:
        out["Lap"], out["lme"], out["good"] = model.compute_lme()
    return out
