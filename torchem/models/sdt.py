r"""Equal-variance signal detection for yes/no (old/new) recognition.

On each trial an item is old (studied) or new; its familiarity is
:math:`N(+d'/2, 1)` for old and :math:`N(-d'/2, 1)` for new items, and the
subject says "old" when it exceeds the criterion :math:`c`:

.. math::

    P(\text{old} \mid \text{old}) = \Phi(d'/2 - c), \qquad
    P(\text{old} \mid \text{new}) = \Phi(-d'/2 - c).

Parameters (normalized -> natural): ``dprime`` (``norm2exp``, > 0) and
``criterion`` (``identity``; 0 is unbiased, positive is conservative).
pyEM bounds d' in (0, 20) with ``norm2beta``; ``norm2exp`` keeps the same
ordering without an upper bound.

Data (``columns=``): ``is_old`` (1 old item, 0 new) and ``resp_old``
(1 answered "old", 0 "new"), ``(S, T)`` or ``(S, B, T)``.

Reference: Green, D. M., & Swets, J. A. (1966). *Signal detection theory and
psychophysics*. Wiley.  Macmillan, N. A., & Creelman, C. D. (2005).
*Detection theory: A user's guide* (2nd ed.).
"""
from __future__ import annotations

import numpy as np
import torch

from ..model import check_categorical, model_spec, natural_params
from ..transforms import identity, norm2exp
from .common import default_mask, fill_padding, sum_trials

__all__ = ["sdt_fit", "sdt_simulate"]


def _check_sdt(batch) -> None:
    check_categorical(batch, 0, 2, "1 = an old item, 0 = a new one")
    check_categorical(batch, 1, 2, "1 = responded old, 0 = responded new")


@model_spec(param_names=["dprime", "criterion"], param_xform=[norm2exp, identity], inputs=["is_old", "resp_old"],
            responses=["resp_old"], check_data=_check_sdt)
def sdt_fit(params: torch.Tensor, is_old: torch.Tensor, resp_old: torch.Tensor, mask: torch.Tensor | None = None,
            output: str = "nll"):
    r"""Equal-variance yes/no signal detection: :math:`P(\text{old}) = \Phi(\pm d'/2 - c)`.

    Parameters (normalized -> natural): ``dprime`` (norm2exp), ``criterion``
    (identity).  Data columns: ``is_old``, ``resp_old`` (0/1 each).

    Parameters
    ----------
    params : Tensor
        ``(S, 2)`` normalized ``[dprime, criterion]``.
    is_old, resp_old : Tensor
        ``(S, T)`` or ``(S, B, T)`` 0/1 codes.
    mask : Tensor, optional
        ``True`` on real trials.
    output : {"nll", "all"}
        ``"nll"``: ``(S,)``; ``"all"``: dict with ``params`` (natural),
        ``nll``, ``p_old`` (``P(resp_old = 1)`` per trial), ``hit_rate`` and
        ``fa_rate`` ``(S,)`` (model).

    References
    ----------
    Macmillan, N. A., & Creelman, C. D. (2005). *Detection theory: A user's guide*.
    """
    mask = default_mask(mask, is_old)
    d, c = norm2exp(params[:, 0]), params[:, 1]
    old = fill_padding(is_old, mask, dtype=params.dtype)
    resp = fill_padding(resp_old, mask, dtype=params.dtype)
    view = (-1,) + (1,) * (old.dim() - 1)
    z = (old - 0.5) * d.reshape(view) - c.reshape(view)  # +d'/2 - c for old items, -d'/2 - c for new
    nll = -sum_trials(torch.special.log_ndtr((2.0 * resp - 1.0) * z), mask)  # log Phi(z) or log Phi(-z)
    if output != "all":
        return nll
    return {"params": torch.stack([d, c], -1), "nll": nll, "p_old": torch.special.ndtr(z),
            "hit_rate": torch.special.ndtr(0.5 * d - c), "fa_rate": torch.special.ndtr(-0.5 * d - c),
            "is_old": is_old, "resp_old": resp_old}


def sdt_simulate(params: np.ndarray, ntrials: int = 200, seed: int | None = None) -> dict:
    """Simulate old/new recognition with half old items in random order.

    Parameters
    ----------
    params : ndarray
        ``(S, 2)`` natural ``[dprime, criterion]``.
    ntrials : int
        Trials per subject (default 200; ``ntrials // 2`` old items, one more
        drawn at random when odd).
    seed : int, optional
        Seed of the random stream.

    Returns
    -------
    dict
        ``params``, ``is_old``, ``resp_old`` ``(S, T)`` int, ``evidence``
        ``(S, T)`` (the familiarity draws).
    """
    p = natural_params(params, sdt_fit.param_names)
    if (p[:, 0] <= 0).any():
        raise ValueError("dprime must be > 0")
    S = len(p)
    rng = np.random.default_rng(seed)
    base = np.zeros(ntrials, dtype=np.int64)
    base[: ntrials // 2] = 1
    is_old = np.stack([rng.permutation(base) for _ in range(S)])
    if ntrials % 2:
        is_old[:, -1] = rng.integers(0, 2, S)
    evidence = (is_old - 0.5) * p[:, :1] + rng.standard_normal((S, ntrials))
    resp = (evidence > p[:, 1:2]).astype(np.int64)
    return {"params": p.copy(), "is_old": is_old, "resp_old": resp, "evidence": evidence}


sdt_fit.simulate = sdt_simulate
