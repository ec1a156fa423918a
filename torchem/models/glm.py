r"""Regression models fitted hierarchically: linear and logistic, with decaying predictors or an AR term.

Every model regresses a per-trial outcome ``Y`` on a row of predictors
``X`` (``K`` columns, the number following the data; the simulators put an
intercept column of ones first).  Weights ``b0 .. b{K-1}`` are unbounded
(``identity``); the Gaussian models have a noise standard deviation
``sigma`` through ``norm2exp``.

* ``glm``: :math:`Y_t \sim N(X_t b, \sigma^2)`.
* ``glm_decay``: :math:`Y_t \sim N(\tilde X_t b, \sigma^2)` with the
  exponentially discounted predictors
  :math:`\tilde X_t = \sum_{j \ge 0} \gamma^j X_{t-j} = \gamma \tilde X_{t-1} + X_t`
  (every column, the intercept included, as in pyEM; the sum starts at the
  first trial of each block), discount ``gamma`` in (0, 1) (``norm2alpha``).
* ``logit``: :math:`P(Y_t = 1) = \sigma(X_t b)` (logistic link).
* ``logit_decay``: :math:`P(Y_t = 1) = \sigma(\tilde X_t b)`.
* ``glm_ar``: :math:`Y_t \sim N(X_t b + \phi Y_{t-1}, \sigma^2)`, the
  likelihood conditional on the first trial (no AR term there), the
  *observed* previous outcome, ``phi`` in (-1, 1) (``norm2corr``).

Parameters, in order: the ``K`` weights, then ``gamma`` (decay models),
``phi`` (``glm_ar``), then ``sigma`` (Gaussian models).  pyEM's Gaussian
models plug in the residual standard deviation instead of a ``sigma``
parameter; here it is a parameter with its own group distribution.

Data: ``X`` ``(S, T, K)`` (or ``(S, B, T, K)`` with blocks) and ``Y``
``(S, T)``; ``Y`` is 0/1 for the logistic models.  From a DataFrame, give the
predictor columns as one group: ``columns=[["x0", "x1", "x2"], "y"]``.

The decay is a linear recurrence solved by
:func:`~torchem.models.recurrence.linear_scan`, so no model loops over trials.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..model import check_categorical, model_spec
from ..transforms import identity, norm2alpha, norm2corr, norm2exp
from .common import bernoulli_nll, default_mask, fill_padding, sum_trials
from .recurrence import linear_scan

__all__ = ["glm_fit", "glm_simulate", "glm_decay_fit", "glm_decay_simulate", "logit_fit", "logit_simulate",
           "logit_decay_fit", "logit_decay_simulate", "glm_ar_fit", "glm_ar_simulate", "decay_predictors"]

_INPUTS = ["X", "Y"]
_LOG_2PI = math.log(2.0 * math.pi)
_DEFAULT_K = 3  # simulators' default design: intercept + 2 standard-normal predictors


def _n_weights(batch) -> int:
    X, Y = batch.data[0], batch.data[1]
    if X.dim() != Y.dim() + 1:
        raise ValueError(f"field '{batch.names[0]}' must have one more axis than '{batch.names[1]}' "
                         f"(trials x predictors), got shapes {tuple(X.shape)} and {tuple(Y.shape)}")
    return X.shape[-1]


def _family(extra: list[tuple[str, object]], binary: bool, skips: bool = True):
    """``model_spec`` keywords for a model with ``K`` weights followed by ``extra``.

    ``skips``: a masked trial may sit inside the sequence (the trials are
    independent), so ``Y`` is declared a response that can be missing.
    """
    def params_for_data(batch):
        K = _n_weights(batch)
        return [f"b{j}" for j in range(K)] + [n for n, _ in extra], [identity] * K + [t for _, t in extra]

    def check(batch):
        _n_weights(batch)
        if binary:
            check_categorical(batch, 1, 2, "1 = the outcome happened, 0 = it did not")

    names = [f"b{j}" for j in range(_DEFAULT_K)] + [n for n, _ in extra]
    xforms = [identity] * _DEFAULT_K + [t for _, t in extra]
    return {"param_names": names, "param_xform": xforms, "inputs": _INPUTS, "check_data": check,
            "params_for_data": params_for_data, "responses": ["Y"] if skips else []}


def _per_subject(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(S,)`` -> broadcastable against ``like`` ``(S, ...)``."""
    return v.reshape(v.shape + (1,) * (like.dim() - 1))


def decay_predictors(X: torch.Tensor, gamma: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""Exponentially discounted predictors :math:`\tilde X_t = \gamma \tilde X_{t-1} + X_t` per block.

    Parameters
    ----------
    X : Tensor
        ``(S, ..., T, K)`` predictors (padded trials already zero).
    gamma : Tensor
        ``(S,)`` discounts.
    mask : Tensor
        ``(S, ..., T)``; padded trials carry the sum unchanged and add nothing.

    Returns
    -------
    Tensor
        ``(S, ..., T, K)``.
    """
    Xk = X.movedim(-1, -2)  # (S, ..., K, T)
    m = mask.unsqueeze(-2).expand_as(Xk)
    a = torch.where(m, _per_subject(gamma, Xk).expand_as(Xk), torch.ones_like(Xk))
    before = linear_scan(a, Xk)
    return (a * before + Xk).movedim(-2, -1)


def _gaussian(params, X, Y, mask, output, extra: str | None):
    K = X.shape[-1]
    mask = default_mask(mask, Y)
    X = fill_padding(X, mask)
    Y = fill_padding(Y, mask)
    w = params[:, :K]
    sigma = norm2exp(params[:, -1])
    natural = {}
    Xd = X
    if extra == "gamma":
        natural["gamma"] = norm2alpha(params[:, K])
        Xd = decay_predictors(X, natural["gamma"], mask)
    pred = (Xd * w.reshape(w.shape[:1] + (1,) * (Xd.dim() - 2) + w.shape[1:])).sum(-1)
    if extra == "phi":
        natural["phi"] = norm2corr(params[:, K])
        y_prev = torch.cat([torch.zeros_like(Y[..., :1]), Y[..., :-1]], -1)  # 0 before the first trial
        pred = pred + _per_subject(natural["phi"], Y) * y_prev
    s = _per_subject(sigma, Y)
    resid = Y - pred
    nll = sum_trials(0.5 * _LOG_2PI + torch.log(s) + 0.5 * (resid / s) ** 2, mask)
    if output != "all":
        return nll
    out_params = torch.cat([w] + [natural[k][:, None] for k in natural] + [sigma[:, None]], 1)
    out = {"params": out_params, "nll": nll, "pred": pred, "resid": resid * mask, "X": X, "Y": Y}
    if extra == "gamma":
        out["X_decayed"] = Xd
    return out


def _logistic(params, X, Y, mask, output, decay: bool):
    K = X.shape[-1]
    mask = default_mask(mask, Y)
    X = fill_padding(X, mask)
    Y = fill_padding(Y, mask)
    w = params[:, :K]
    Xd = X
    natural = []
    if decay:
        gamma = norm2alpha(params[:, K])
        natural.append(gamma[:, None])
        Xd = decay_predictors(X, gamma, mask)
    logit = (Xd * w.reshape(w.shape[:1] + (1,) * (Xd.dim() - 2) + w.shape[1:])).sum(-1)
    nll = bernoulli_nll(logit, Y, mask)
    if output != "all":
        return nll
    out = {"params": torch.cat([w] + natural, 1), "nll": nll, "p": torch.sigmoid(logit), "X": X, "Y": Y}
    if decay:
        out["X_decayed"] = Xd
    return out


_DATA_DOC = """X : Tensor
        ``(S, T, K)`` or ``(S, B, T, K)`` predictors (``K`` from the data).
    Y : Tensor
        ``(S, T)`` or ``(S, B, T)`` outcomes.
    mask : Tensor, optional
        ``True`` on real trials (shape of ``Y``).
    output : {"nll", "all"}
        ``"nll"``: ``(S,)``; ``"all"``: dict with ``params`` (natural),
        ``nll`` and the per-trial prediction."""


@model_spec(**_family([("sigma", norm2exp)], binary=False))
def glm_fit(params: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor | None = None,
            output: str = "nll"):
    r"""Gaussian linear regression :math:`Y_t \sim N(X_t b, \sigma^2)`.

    Parameters (normalized -> natural): ``b0 .. b{K-1}`` (identity), ``sigma``
    (norm2exp, > 0).  Data columns: the ``K`` predictors (one group), ``y``.

    Parameters
    ----------
    params : Tensor
        ``(S, K + 1)`` normalized ``[b0, ..., b{K-1}, sigma]``.
    {data}
        ``pred`` is :math:`X_t b`, ``resid`` the residuals (0 on padding).
    """
    return _gaussian(params, X, Y, mask, output, None)


@model_spec(**_family([("gamma", norm2alpha), ("sigma", norm2exp)], binary=False, skips=False))
def glm_decay_fit(params: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor | None = None,
                  output: str = "nll"):
    r"""Gaussian regression on exponentially discounted predictors.

    :math:`Y_t \sim N(\tilde X_t b, \sigma^2)`,
    :math:`\tilde X_t = \gamma \tilde X_{t-1} + X_t` (from the first trial of each block).

    Parameters (normalized -> natural): ``b0 .. b{K-1}`` (identity), ``gamma``
    (norm2alpha, 0-1), ``sigma`` (norm2exp).  Data columns: predictors, ``y``.

    Parameters
    ----------
    params : Tensor
        ``(S, K + 2)`` normalized ``[b0, ..., b{K-1}, gamma, sigma]``.
    {data}
        Also ``X_decayed``.
    """
    return _gaussian(params, X, Y, mask, output, "gamma")


@model_spec(**_family([("phi", norm2corr), ("sigma", norm2exp)], binary=False, skips=False))
def glm_ar_fit(params: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor | None = None,
               output: str = "nll"):
    r"""Linear regression with a first-order autoregressive term on the observed outcome.

    :math:`Y_t \sim N(X_t b + \phi Y_{t-1}, \sigma^2)` for ``t > 0`` and
    :math:`N(X_0 b, \sigma^2)` on the first trial of each block (the
    likelihood conditional on it).

    Parameters (normalized -> natural): ``b0 .. b{K-1}`` (identity), ``phi``
    (norm2corr, -1 to 1), ``sigma`` (norm2exp).  Data columns: predictors, ``y``.

    Parameters
    ----------
    params : Tensor
        ``(S, K + 2)`` normalized ``[b0, ..., b{K-1}, phi, sigma]``.
    {data}
    """
    return _gaussian(params, X, Y, mask, output, "phi")


@model_spec(**_family([], binary=True))
def logit_fit(params: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor | None = None,
              output: str = "nll"):
    r"""Logistic regression :math:`P(Y_t = 1) = 1 / (1 + e^{-X_t b})`.

    Parameters: ``b0 .. b{K-1}`` (identity).  Data columns: predictors, ``y`` (0/1).

    Parameters
    ----------
    params : Tensor
        ``(S, K)`` weights.
    {data}
        ``p`` is :math:`P(Y_t = 1)`.
    """
    return _logistic(params, X, Y, mask, output, False)


@model_spec(**_family([("gamma", norm2alpha)], binary=True, skips=False))
def logit_decay_fit(params: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor | None = None,
                    output: str = "nll"):
    r"""Logistic regression on exponentially discounted predictors (see :func:`glm_decay_fit`).

    Parameters (normalized -> natural): ``b0 .. b{K-1}`` (identity), ``gamma``
    (norm2alpha).  Data columns: predictors, ``y`` (0/1).

    Parameters
    ----------
    params : Tensor
        ``(S, K + 1)`` normalized ``[b0, ..., b{K-1}, gamma]``.
    {data}
        ``p`` and ``X_decayed``.
    """
    return _logistic(params, X, Y, mask, output, True)


for _f in (glm_fit, glm_decay_fit, glm_ar_fit, logit_fit, logit_decay_fit):
    _f.__doc__ = _f.__doc__.replace("{data}", _DATA_DOC)


# ------------------------------------------------------------------------------------------- simulation
def _design(S: int, T: int, K: int, rng: np.random.Generator) -> np.ndarray:
    X = np.ones((S, T, K))
    X[..., 1:] = rng.standard_normal((S, T, K - 1))
    return X


def _decay_np(X: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    out = np.empty_like(X)
    acc = np.zeros_like(X[:, 0])
    for t in range(X.shape[1]):
        acc = gamma[:, None] * acc + X[:, t]
        out[:, t] = acc
    return out


def _simulate(params: np.ndarray, extra: list[str], ntrials: int, seed, kind: str) -> dict:
    p = np.asarray(params, dtype=float)
    if p.ndim != 2 or p.shape[1] <= len(extra):
        raise ValueError(f"params must be (subjects, K + {len(extra)}) natural values "
                         f"[b0, ..., b(K-1){''.join(', ' + e for e in extra)}], got shape {p.shape}")
    S, K = p.shape[0], p.shape[1] - len(extra)
    rng = np.random.default_rng(seed)
    X = _design(S, ntrials, K, rng)
    w = p[:, :K]
    nat = dict(zip(extra, p[:, K:].T))
    Xd = _decay_np(X, nat["gamma"]) if "gamma" in nat else X
    lin = np.einsum("stk,sk->st", Xd, w)
    out = {"params": p.copy(), "X": X}
    if "gamma" in nat:
        out["X_decayed"] = Xd
    if kind == "logit":
        prob = 1.0 / (1.0 + np.exp(-lin))
        out["Y"] = (rng.random(prob.shape) < prob).astype(np.int64)
        out["p"] = prob
        return out
    noise = nat["sigma"][:, None] * rng.standard_normal((S, ntrials))
    if "phi" in nat:
        Y = np.empty((S, ntrials))
        prev = np.zeros(S)
        for t in range(ntrials):
            Y[:, t] = lin[:, t] + nat["phi"] * prev + noise[:, t]
            prev = Y[:, t]
    else:
        Y = lin + noise
    out["Y"] = Y
    return out


_SIM_DOC = """ntrials : int
        Trials per subject (default 100).
    seed : int, optional
        Seed of the random stream.

    Returns
    -------
    dict
        ``params``, ``X`` ``(S, T, K)`` (column 0 ones, the others standard
        normal), ``Y`` ``(S, T)``{more}."""


def glm_simulate(params: np.ndarray, ntrials: int = 100, seed: int | None = None) -> dict:
    """Simulate :func:`glm_fit`: ``Y = X b + sigma * noise``.

    Parameters
    ----------
    params : ndarray
        ``(S, K + 1)`` natural ``[b0, ..., b{K-1}, sigma]``; ``K`` sets the design.
    {sim}
    """
    return _simulate(params, ["sigma"], ntrials, seed, "gauss")


def glm_decay_simulate(params: np.ndarray, ntrials: int = 100, seed: int | None = None) -> dict:
    """Simulate :func:`glm_decay_fit` (exponential decay over all past trials).

    Parameters
    ----------
    params : ndarray
        ``(S, K + 2)`` natural ``[b0, ..., b{K-1}, gamma, sigma]``.
    {sim}
    """
    return _simulate(params, ["gamma", "sigma"], ntrials, seed, "gauss")


def glm_ar_simulate(params: np.ndarray, ntrials: int = 100, seed: int | None = None) -> dict:
    """Simulate :func:`glm_ar_fit`: ``Y_t = X_t b + phi Y_{t-1} + sigma * noise`` (``Y_{-1} = 0``).

    Parameters
    ----------
    params : ndarray
        ``(S, K + 2)`` natural ``[b0, ..., b{K-1}, phi, sigma]``.
    {sim}
    """
    return _simulate(params, ["phi", "sigma"], ntrials, seed, "gauss")


def logit_simulate(params: np.ndarray, ntrials: int = 100, seed: int | None = None) -> dict:
    """Simulate :func:`logit_fit`: ``Y ~ Bernoulli(sigmoid(X b))``.

    Parameters
    ----------
    params : ndarray
        ``(S, K)`` natural weights.
    {sim}
    """
    return _simulate(params, [], ntrials, seed, "logit")


def logit_decay_simulate(params: np.ndarray, ntrials: int = 100, seed: int | None = None) -> dict:
    """Simulate :func:`logit_decay_fit`.

    Parameters
    ----------
    params : ndarray
        ``(S, K + 1)`` natural ``[b0, ..., b{K-1}, gamma]``.
    {sim}
    """
    return _simulate(params, ["gamma"], ntrials, seed, "logit")


_MORE = {glm_simulate: "", glm_ar_simulate: "", glm_decay_simulate: ", ``X_decayed``",
         logit_simulate: ", ``p`` (``P(Y = 1)``)", logit_decay_simulate: ", ``p``, ``X_decayed``"}
for _f, _m in _MORE.items():
    _f.__doc__ = _f.__doc__.replace("{sim}", _SIM_DOC.replace("{more}", _m))

glm_fit.simulate = glm_simulate
glm_decay_fit.simulate = glm_decay_simulate
glm_ar_fit.simulate = glm_ar_simulate
logit_fit.simulate = logit_simulate
logit_decay_fit.simulate = logit_decay_simulate
