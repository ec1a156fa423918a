"""Linear recurrences over trials, solved for all trials at once.

Delta-rule learning with a fixed learning rate is a linear recurrence in the
values once the data are given: the value of an option moves only on the
trials that visit it, ``y_t = a_t y_{t-1} + b_t`` with ``a_t = 1 - alpha``
and ``b_t = alpha * target_t`` on those trials (``a_t = 1``, ``b_t = 0``
elsewhere).  :func:`linear_scan` evaluates every trial's value with a
parallel prefix scan (Hillis & Steele, 1986) in ``ceil(log2 T)`` steps of
elementwise operations instead of a Python loop over ``T`` trials, so a
likelihood (and its gradient and Hessian under autograd / ``torch.func``)
costs a few dozen tensor operations whatever the number of trials.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear_scan"]


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Values *before* each step of ``y_t = a_t y_{t-1} + b_t`` with ``y_{-1} = 0``, along the last dim.

    Parameters
    ----------
    a, b : Tensor
        ``(..., T)`` multipliers and offsets (same shape).  With ``|a_t| <= 1``
        (delta rules with rates in [0, 1]) every product is bounded and the
        scan is as accurate as the sequential loop.

    Returns
    -------
    Tensor
        ``(..., T)``: entry ``t`` is ``y_{t-1}`` (0 for ``t = 0``), the value
        the model holds when it makes choice ``t``.

    Notes
    -----
    Step ``d = 1, 2, 4, ...`` composes each affine map with the one ``d``
    steps earlier: ``(a, b) <- (a_prev a, b_prev a + b)``.  After the last
    step ``b_t`` is the inclusive prefix, i.e. ``y_t`` from ``y_{-1} = 0``.
    """
    T = a.shape[-1]
    d = 1
    while d < T:
        b = torch.cat([b[..., :d], b[..., :-d] * a[..., d:] + b[..., d:]], -1)
        a = torch.cat([a[..., :d], a[..., :-d] * a[..., d:]], -1)
        d *= 2
    return F.pad(b[..., :-1], (1, 0))
