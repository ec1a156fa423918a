"""Parameter transforms between the unbounded (normalized) space and natural ranges.

The optimizer and the Gaussian group prior work in the unbounded *normalized*
space; models read *natural* parameters (a learning rate in (0, 1), an inverse
temperature in (0, 20), ...).  Every function here accepts a Python float, a
numpy array or a torch tensor and returns the same kind, so the same transform
serves the batched likelihood (tensors, differentiable) and the user
(floats and arrays).

Names follow pyEM: ``norm2alpha``/``alpha2norm`` (logistic to (0, 1)),
``norm2beta``/``beta2norm`` (scaled logistic to (0, max_val)).
"""
from __future__ import annotations

from typing import Callable, TypeVar, Union

import numpy as np
import torch

__all__ = [
    "norm2alpha",
    "alpha2norm",
    "norm2beta",
    "beta2norm",
    "norm2exp",
    "exp2norm",
    "norm2corr",
    "corr2norm",
    "identity",
    "TRANSFORMS",
    "INVERSES",
    "inverse_of",
]

ArrayLike = TypeVar("ArrayLike", float, np.ndarray, torch.Tensor)
Number = Union[float, int]


def _apply(x, torch_fn: Callable, numpy_fn: Callable):
    """Apply ``torch_fn`` to tensors and ``numpy_fn`` to anything else, keeping the kind."""
    if isinstance(x, torch.Tensor):
        return torch_fn(x)
    with np.errstate(divide="ignore", over="ignore"):
        out = numpy_fn(np.asarray(x, dtype=float))
    return out if isinstance(x, np.ndarray) or np.ndim(out) > 0 else float(out)


def _np_sigmoid(a: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(a))  # stable on both tails
    return np.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _sigmoid(x):
    return _apply(x, torch.sigmoid, _np_sigmoid)


def _logit(p):
    return _apply(p, torch.logit, lambda a: np.log(a) - np.log1p(-a))


def _exp(x):
    return _apply(x, torch.exp, np.exp)


def _log(x):
    return _apply(x, torch.log, np.log)


def norm2alpha(x: ArrayLike) -> ArrayLike:
    """Map an unbounded value to (0, 1) with the logistic function.

    Parameters
    ----------
    x : float, ndarray or Tensor
        Normalized value(s), any shape.

    Returns
    -------
    float, ndarray or Tensor
        ``1 / (1 + exp(-x))``, same kind and shape as ``x``.
    """
    return _sigmoid(x)


def alpha2norm(alpha: ArrayLike) -> ArrayLike:
    """Inverse of :func:`norm2alpha`: ``log(alpha / (1 - alpha))``."""
    return _logit(alpha)


def norm2beta(x: ArrayLike, max_val: Number = 20) -> ArrayLike:
    """Map an unbounded value to (0, ``max_val``) with a scaled logistic.

    Parameters
    ----------
    x : float, ndarray or Tensor
        Normalized value(s), any shape.
    max_val : float, default 20
        Upper bound of the natural range (pyEM's default).

    Returns
    -------
    float, ndarray or Tensor
        ``max_val / (1 + exp(-x))``, same kind and shape as ``x``.
    """
    return max_val * _sigmoid(x)


def beta2norm(beta: ArrayLike, max_val: Number = 20) -> ArrayLike:
    """Inverse of :func:`norm2beta`: ``log(beta / (max_val - beta))``."""
    return _logit(beta / max_val)


def norm2exp(x: ArrayLike) -> ArrayLike:
    """Map an unbounded value to (0, inf) with ``exp``."""
    return _exp(x)


def exp2norm(y: ArrayLike) -> ArrayLike:
    """Inverse of :func:`norm2exp`: ``log(y)``."""
    return _log(y)


def norm2corr(x: ArrayLike) -> ArrayLike:
    """Map an unbounded value to (-1, 1): ``2 / (1 + exp(-x)) - 1`` (= ``tanh(x / 2)``).

    For coefficients that must stay inside the unit interval, such as the
    autoregressive weight of :func:`torchem.models.glm.glm_ar_fit`.
    """
    return 2.0 * _sigmoid(x) - 1.0


def corr2norm(r: ArrayLike) -> ArrayLike:
    """Inverse of :func:`norm2corr`: ``logit((r + 1) / 2)``."""
    return _logit((r + 1.0) / 2.0)


def identity(x: ArrayLike) -> ArrayLike:
    """Leave an unbounded parameter as it is."""
    return x


#: Transforms by name, for configuration files and the command line.
TRANSFORMS: dict[str, Callable] = {
    "alpha": norm2alpha,
    "beta": norm2beta,
    "exp": norm2exp,
    "corr": norm2corr,
    "identity": identity,
}

#: The inverse (natural -> normalized) of each forward transform.
INVERSES: dict[Callable, Callable] = {
    norm2alpha: alpha2norm,
    norm2beta: beta2norm,
    norm2exp: exp2norm,
    norm2corr: corr2norm,
    identity: identity,
}


def inverse_of(transform: Callable) -> Callable:
    """Return the natural -> normalized inverse of a built-in transform.

    A transform defined elsewhere (e.g. the drift-diffusion models' scaled
    logistics) can carry its inverse as an ``inverse`` attribute.

    Raises
    ------
    ValueError
        If ``transform`` is not one of the built-in forward transforms and has no ``inverse``.
    """
    if callable(getattr(transform, "inverse", None)):
        return transform.inverse
    try:
        return INVERSES[transform]
    except (KeyError, TypeError):
        raise ValueError(
            f"no known inverse for transform {getattr(transform, '__name__', transform)!r}; "
            "pass normalized parameters or one of norm2alpha, norm2beta, norm2exp, norm2corr, identity"
        ) from None
