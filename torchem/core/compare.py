"""pyEM's ``pyem.core.compare``: ``ModelComparison``, ``compare_models`` and ``ComparisonRow``.

:class:`~torchem.compare.ModelComparison` is torchem's (its ``compare``
returns a DataFrame with random-effects BMS columns).  ``compare_models`` is
pyEM's function form: one :class:`ComparisonRow` per model, sorted by the
first metric available, with pyEM's conventions (the iBIC penalty ``P log n``
with ``n`` one subject's trials, pseudo-R² from ``ntrials_total``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .. import evidence
from ..api import EMModel
from ..compare import ModelComparison
from ..em import FitResult
from ..utils.stats import calc_BICint, calc_LME, pseudo_r2_from_nll

__all__ = ["ModelComparison", "compare_models", "ComparisonRow"]

_HIGHER_IS_BETTER = {"LME": True, "BICint": False, "R2": True}


@dataclass
class ComparisonRow:
    """One model's scores: summed Laplace evidence, integrated BIC and pseudo-R² (``None`` if not computed)."""

    name: str
    LME: float | None
    BICint: float | None
    R2: float | None


def _np(v: Any) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def _pyem_layout(out: Any) -> dict[str, Any]:
    """``inv_h`` ``(P, P, S)``, ``NPL``, ``NLL`` and the group ``mu``/``sigma`` of a fit, whatever its form.

    Accepts a torchem :class:`FitResult` (or its ``__dict__``: tensors,
    subjects first) or pyEM's dict (numpy, parameters first, as ``EMfit``
    returns it).
    """
    if isinstance(out, FitResult):
        out = {**out.__dict__, "posterior_mu": out.posterior_mu, "posterior_sigma": out.posterior_var}
    out = dict(out)
    if isinstance(out.get("inv_h"), torch.Tensor):  # torchem's layout: subjects first
        out["inv_h"] = _np(out["inv_h"]).transpose(1, 2, 0)
        if out.get("group") is not None:
            out.setdefault("posterior_mu", out["group"].mean)
            out.setdefault("posterior_sigma", out["group"].var)
    post = out.get("posterior") or {}
    mu, sigma = post.get("mu", out.get("posterior_mu")), post.get("sigma", out.get("posterior_sigma"))
    return {"inv_h": out.get("inv_h"), "NPL": out.get("NPL"), "NLL": out.get("NLL"),
            "mu": None if mu is None else _np(mu), "sigma": None if sigma is None else _np(sigma)}


def _r2(nll: Any, r2_kwargs: dict, n_obs: Any = None) -> float:
    kw = dict(r2_kwargs)
    ntrials = kw.pop("ntrials_total", kw.pop("ntrials", None))
    noptions = kw.pop("noptions", kw.pop("nopts", 2))
    ntrials = n_obs if ntrials is None else ntrials
    if ntrials is None:
        raise ValueError("r2_kwargs needs ntrials_total (trials per subject) for a fit given as a tuple")
    return pseudo_r2_from_nll(_np(nll), _np(ntrials), noptions, kw.pop("metric", "median"))


def _row(item: Any, name: str | None, bicint_kwargs: dict | None, r2_kwargs: dict | None) -> ComparisonRow:
    bic = {k: v for k, v in (bicint_kwargs or {}).items() if k in ("nsamples", "seed", "ntrials_total")}
    if isinstance(item, EMModel):
        name = name or getattr(item, "name", getattr(item.fit_func, "__name__", "model"))
        if item.result is None:  # pyEM: an unfitted model has no scores
            return ComparisonRow(name, None, None, None)
        res = item.result
        lme = item.compute_lme()[1]
        bicint = None
        if bicint_kwargs is not None:
            ilog = item.integrated_log_likelihood(bic.get("nsamples", 2000), bic.get("seed", 0))
            bicint = evidence.integrated_bic(ilog, res.n_params, bic.get("ntrials_total", int(res.n_obs[0])))
        r2 = None if r2_kwargs is None else _r2(res.NLL, r2_kwargs, res.n_obs)
        return ComparisonRow(name, float(lme), bicint, r2)
    tname, out, all_data, fit_func = item
    fit = _pyem_layout(out)
    lme = None if fit["inv_h"] is None or fit["NPL"] is None else calc_LME(fit["inv_h"], _np(fit["NPL"]))[1]
    bicint = None
    if bicint_kwargs is not None and fit["mu"] is not None:
        bicint = calc_BICint(all_data, None, fit["mu"], fit["sigma"], fit_func, **bic)
    r2 = None if r2_kwargs is None or fit["NLL"] is None else _r2(fit["NLL"], r2_kwargs)
    return ComparisonRow(name or tname, lme, bicint, r2)


def compare_models(models: Sequence[Any], model_names: Sequence[str] | None = None,
                   metric_order: Sequence[str] = ("LME", "BICint", "R2"), bicint_kwargs: dict | None = None,
                   r2_kwargs: dict | None = None) -> list[ComparisonRow]:
    """Score fitted models (pyEM's function form of :meth:`ModelComparison.compare`).

    Parameters
    ----------
    models : sequence
        Fitted :class:`~torchem.EMModel` instances (an unfitted one scores
        ``None``), or tuples ``(name, fit, all_data, fit_func)`` where ``fit``
        is a :class:`~torchem.em.FitResult`, its ``__dict__``, or pyEM's dict
        from :func:`torchem.core.em.EMfit`.
    model_names : sequence of str, optional
        Names (default: the tuple's name or the fit function's name).
    metric_order : sequence of str
        Rows are sorted by the first of these metrics any model has (LME and
        R2 descending, BICint ascending); models without it come last.
    bicint_kwargs : dict, optional
        Compute the integrated BIC (pyEM's penalty ``P log n``): ``nsamples``
        (default 2000), ``seed``, ``ntrials_total`` (default one subject's
        trials); pyEM's ``func_output``/``nll_key`` are not needed.  ``None``
        skips it.
    r2_kwargs : dict, optional
        Compute the pseudo-R²: ``noptions`` (default 2), ``ntrials_total``
        (default each subject's trials; required for tuples), ``metric``.
        ``None`` skips it.

    Returns
    -------
    list of ComparisonRow
    """
    names = list(model_names) if model_names is not None else [None] * len(models)
    if len(names) != len(models):
        raise ValueError(f"{len(models)} models but {len(names)} names")
    rows = [_row(item, name, bicint_kwargs, r2_kwargs) for item, name in zip(models, names)]
    for metric in metric_order:
        if metric not in _HIGHER_IS_BETTER:
            raise ValueError(f"metric_order entries must be 'LME', 'BICint' or 'R2', got {metric!r}")
        if any(getattr(r, metric) is not None for r in rows):
            sign = -1.0 if _HIGHER_IS_BETTER[metric] else 1.0
            rows.sort(key=lambda r: (getattr(r, metric) is None, sign * (getattr(r, metric) or 0.0)))
            break
    return rows

