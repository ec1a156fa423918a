"""Pieces shared by the trial-by-trial choice and regression models.

Every library likelihood takes padded data with a ``mask`` (``True`` on real
trials).  Padded trials may hold anything, NaN included, so a model first
replaces them with a harmless value (:func:`fill_padding`) and then sums its
per-trial terms over real trials only (:func:`sum_trials`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..transforms import inverse_of

__all__ = ["default_mask", "as_blocks", "fill_padding", "sum_trials", "bernoulli_nll", "simulate_bernoulli", "model_output"]


def default_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``mask``, or all-``True`` over ``like``'s subject and trial axes when it is ``None``."""
    return torch.ones(like.shape, dtype=torch.bool, device=like.device) if mask is None else mask


def as_blocks(*tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    """Reshape ``(S, T)`` or ``(S, B, T)`` tensors to ``(S*B, T)`` (blocks side by side); return the leading shape.

    Learning models reset their values at every block, so each row is one
    block; the leading shape (``(S, B)``, or ``(S, 1)`` for one session) puts
    per-trial outputs back.
    """
    lead = tuple(tensors[0].shape[:-1]) if tensors[0].dim() == 3 else (tensors[0].shape[0], 1)
    T = tensors[0].shape[-1]
    return tuple(t.reshape(-1, T) for t in tensors), lead


def fill_padding(x: torch.Tensor, mask: torch.Tensor, value: float = 0.0, dtype: torch.dtype | None = None):
    """``x`` with padded trials set to ``value`` (``mask`` broadcast over ``x``'s trailing feature axes)."""
    m = mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    out = torch.where(m, x, torch.as_tensor(value, dtype=x.dtype, device=x.device))
    return out if dtype is None else out.to(dtype)


def sum_trials(terms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(S,)`` sum of per-trial ``terms`` ``(S, ...)`` over real trials."""
    return (terms * mask.to(terms.dtype)).reshape(terms.shape[0], -1).sum(1)


def bernoulli_nll(logit: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(S,)`` negative log-likelihood of 0/1 outcomes ``y`` with ``P(y = 1) = sigmoid(logit)``.

    Computed as ``-log sigmoid(+-logit)``, exact in both tails (no clipping).
    """
    return -sum_trials(F.logsigmoid((2.0 * y - 1.0) * logit), mask)


def simulate_bernoulli(p, rng):
    """0/1 draws with probabilities ``p`` (numpy), as ``int64``."""
    return (rng.random(p.shape) < p).astype("int64")


def model_output(fit, natural: np.ndarray, *data) -> dict:
    """``fit(..., output="all")`` at *natural* parameters ``(S, P)`` on numpy data, for simulators.

    The natural values are mapped to the normalized space with the inverses of
    the model's transforms, so a simulator draws choices from exactly the
    probabilities its likelihood assigns.
    """
    nat = torch.as_tensor(np.asarray(natural, dtype=float))
    x = torch.stack([inverse_of(t)(nat[:, j]) for j, t in enumerate(fit.param_xform)], -1)
    with torch.no_grad():
        out = fit(x, *(torch.as_tensor(np.asarray(d)) for d in data), output="all")
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
