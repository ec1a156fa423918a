"""pyEM's ``pyem.utils.math``: parameter transforms, ``softmax`` and ``calc_fval``.

The transforms are those of :mod:`torchem.transforms` (floats, numpy arrays
or tensors in, the same kind out).  ``softmax`` and ``calc_fval`` work on
tensors, so a pyEM-style likelihood written with torch operations can use
them unchanged; given numpy values they behave as pyEM's.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..priors import Prior
from ..transforms import alpha2norm, beta2norm, corr2norm, exp2norm, identity, norm2alpha, norm2beta, norm2corr, \
    norm2exp

__all__ = ["norm2alpha", "alpha2norm", "norm2beta", "beta2norm", "norm2exp", "exp2norm", "norm2corr", "corr2norm",
           "identity", "softmax", "calc_fval"]

#: What pyEM returns instead of a non-finite objective, so that optimizers keep going.
PENALTY = 1e7


def softmax(evs: Any, beta: Any) -> Any:
    """Choice probabilities ``exp(beta * ev) / sum exp(beta * ev)`` over the last axis.

    Parameters
    ----------
    evs : Tensor or array-like
        ``(..., K)`` values of ``K`` options.
    beta : float or Tensor
        Inverse temperature (broadcast against ``evs[..., :1]``).

    Returns
    -------
    Tensor or ndarray
        ``(..., K)``; a tensor for tensor input (differentiable), numpy otherwise.
    """
    if isinstance(evs, torch.Tensor) or isinstance(beta, torch.Tensor):
        x = torch.as_tensor(evs)
        return torch.softmax(torch.as_tensor(beta, dtype=x.dtype) * x, -1)
    x = beta * np.asarray(evs, dtype=float)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_prior(prior: Any, params: Any) -> Any:
    """``log p(params)`` of one parameter vector under a pyEM prior (``logpdf``) or a torchem prior."""
    if not isinstance(prior, Prior):  # a pyEM prior object
        return prior.logpdf(params)
    x = torch.as_tensor(params)
    x = x.to(prior.mean.dtype) if not x.is_floating_point() else x
    return -prior.neg_log_prior(x.reshape(1, -1))[0]


def calc_fval(negll: Any, params: Any, prior: Any = None, output: str = "npl") -> Any:
    """pyEM's objective: the negative log posterior (``"npl"``) or the negative log-likelihood (``"nll"``).

    Parameters
    ----------
    negll : float or Tensor
        Negative log-likelihood of one subject's data.
    params : array-like or Tensor
        ``(P,)`` normalized parameters (used by ``prior``).
    prior : object, optional
        A pyEM prior (``logpdf``) or a :mod:`torchem.priors` prior.  With
        ``None`` the result is ``negll``: torchem calls pyEM-style functions
        with ``prior=None`` and adds the group prior itself.
    output : {"npl", "nll"}
        ``"npl"`` subtracts the log prior (when one is given).

    Returns
    -------
    float or Tensor
        A non-finite value is replaced by ``1e7`` (pyEM's cap).  For a tensor
        this keeps the graph (``torch.where``), so the result stays
        differentiable where it is finite.
    """
    fval = negll
    if output == "npl" and prior is not None:
        fval = negll - _log_prior(prior, params)
    if isinstance(negll, torch.Tensor) or isinstance(params, torch.Tensor):
        fval = torch.as_tensor(fval)
        return torch.where(torch.isfinite(fval), fval, torch.full_like(fval, PENALTY))
    fval = float(fval)
    return fval if np.isfinite(fval) else PENALTY
