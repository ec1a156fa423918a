r"""Cumulative prospect theory for choices between a sure amount and a two-outcome gamble.

On each trial the subject chooses between a sure amount :math:`c` and a
gamble paying :math:`o_1` with probability :math:`p_1` and :math:`o_2` with
:math:`p_2` (usually :math:`p_2 = 1 - p_1`); outcomes may be gains, losses,
zero or mixed (one gain, one loss).

Value function (Tversky & Kahneman, 1992):

.. math::

    v(x) = x^{\alpha} \; (x \ge 0), \qquad v(x) = -\lambda (-x)^{\beta} \; (x < 0).

Probability weighting, one curvature for gains and losses:

.. math::

    w(p) = \frac{p^{\gamma}}{\big(p^{\gamma} + (1 - p)^{\gamma}\big)^{1/\gamma}} .

Decision weights are rank dependent (cumulative): within the gains (or
within the losses) the more extreme outcome gets :math:`w(p_e)` and the
other :math:`w(p_e + p_n) - w(p_e)`; in a mixed gamble each outcome is the
only one of its sign and gets :math:`w(p_i)`.  So
:math:`V_g = \pi_1 v(o_1) + \pi_2 v(o_2)`, :math:`V_c = v(c)`, and

.. math::

    P(\text{gamble}) = \sigma\big(\mu (V_g - V_c)\big).

pyEM's ``pt`` weights each outcome by :math:`w(p_i)` in every gamble (not
rank dependent); the two agree on mixed gambles and on gambles with a zero
outcome, and differ on two non-zero gains (or losses).

Parameters (normalized -> natural): ``alpha``, ``beta`` (``norm2alpha``,
0-1: concave for gains, convex for losses), ``lambda`` (loss aversion,
``norm2beta``, 0-20), ``gamma`` (``norm2alpha``, 0-1; the weighting is
monotone for :math:`\gamma > 0.28`), ``mu`` (inverse temperature,
``norm2beta``, 0-20).

Data (``columns=``): ``gamble`` (the two outcomes, a column group
``[o1, o2]``), ``probs`` (``[p1, p2]``), ``certain``, ``choice`` (1 gamble,
0 sure amount).

Reference: Tversky, A., & Kahneman, D. (1992). Advances in prospect theory:
Cumulative representation of uncertainty. *Journal of Risk and Uncertainty*,
5(4), 297-323.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from ..model import check_categorical, model_spec, natural_params, reject_subject
from ..transforms import norm2alpha, norm2beta
from .common import bernoulli_nll, default_mask, fill_padding, model_output, simulate_bernoulli

__all__ = ["pt_fit", "pt_simulate", "pt_design", "pt_value", "pt_weight"]


def _check_pt(batch) -> None:
    for j, width in ((0, 2), (1, 2)):
        x = batch.data[j]
        if x.dim() != batch.mask.dim() + 1 or x.shape[-1] != width:
            raise ValueError(f"field '{batch.names[j]}' must have {width} values per trial (outcomes o1, o2 / "
                             f"probabilities p1, p2), got shape {tuple(x.shape)}")
    probs = batch.data[1]
    bad = (((probs < 0) | (probs > 1)).any(-1) | (probs.sum(-1) > 1 + 1e-9)) & batch.mask
    reject_subject(batch, bad, 1, "must hold probabilities in [0, 1] summing to at most 1")
    check_categorical(batch, 3, 2, "1 = the gamble was chosen, 0 = the certain amount")


def _on_arrays(fn, x, *args):
    """``fn`` (written for tensors) on floats or numpy arrays: numpy out, a float for a scalar ``x``."""
    out = fn(torch.as_tensor(np.asarray(x, dtype=float)), *(torch.as_tensor(np.asarray(a, dtype=float)) for a in args))
    return float(out) if np.ndim(x) == 0 else out.numpy()


def pt_value(x: ArrayLike | torch.Tensor, alpha: Any, beta: Any, lam: Any) -> np.ndarray | torch.Tensor | float:
    r"""Prospect-theory value: :math:`v(x) = x^\alpha` for :math:`x \ge 0`, :math:`-\lambda (-x)^\beta` below 0.

    Elementwise.  Tensors in: a tensor out, differentiable in every argument;
    floats or arrays in: a numpy array out (a float for a scalar ``x``), as pyEM's ``pt_value``.
    """
    if isinstance(x, torch.Tensor):
        return _value(x, alpha, beta, lam)
    return _on_arrays(_value, x, alpha, beta, lam)


def pt_weight(p: ArrayLike | torch.Tensor, gamma: Any) -> np.ndarray | torch.Tensor | float:
    r"""Probability weighting :math:`w(p) = p^\gamma / (p^\gamma + (1 - p)^\gamma)^{1/\gamma}` (TK 1992).

    Elementwise, with :math:`w(0) = 0` and :math:`w(1) = 1`.  Tensors in: a
    tensor out; floats or arrays in: numpy (a float for a scalar ``p``), as pyEM's ``pt_weight``.
    """
    if isinstance(p, torch.Tensor):
        return _weight(p, gamma)
    return _on_arrays(_weight, p, gamma)


def _value(x: torch.Tensor, alpha, beta, lam) -> torch.Tensor:
    ax = torch.where(x != 0, x.abs(), torch.ones_like(x))  # no 0 ** alpha: its derivative is NaN
    return torch.where(x > 0, ax ** alpha, torch.where(x < 0, -lam * ax ** beta, torch.zeros_like(x)))


def _weight(p: torch.Tensor, gamma) -> torch.Tensor:
    inside = (p > 0) & (p < 1)
    q = torch.where(inside, p, torch.full_like(p, 0.5))
    qg = q ** gamma
    w = qg / (qg + (1.0 - q) ** gamma) ** (1.0 / gamma)
    return torch.where(inside, w, (p >= 1).to(p.dtype))


@model_spec(param_names=["alpha", "beta", "lambda", "gamma", "mu"],
            param_xform=[norm2alpha, norm2alpha, norm2beta, norm2alpha, norm2beta],
            inputs=["gamble", "probs", "certain", "choice"], responses=["choice"], check_data=_check_pt)
def pt_fit(params: torch.Tensor, gamble: torch.Tensor, probs: torch.Tensor, certain: torch.Tensor,
           choice: torch.Tensor, mask: torch.Tensor | None = None, output: str = "nll"):
    r"""Cumulative prospect theory, sure amount vs two-outcome gamble (Tversky & Kahneman, 1992).

    :math:`P(\text{gamble}) = \sigma(\mu (V_g - v(c)))` with the value and
    rank-dependent weighting functions of :mod:`torchem.models.pt`.

    Parameters (normalized -> natural): ``alpha``, ``beta`` (norm2alpha),
    ``lambda`` (norm2beta, 0-20), ``gamma`` (norm2alpha), ``mu`` (norm2beta).
    Data columns: ``[o1, o2]`` (group), ``[p1, p2]`` (group), ``certain``, ``choice``.

    Parameters
    ----------
    params : Tensor
        ``(S, 5)`` normalized ``[alpha, beta, lambda, gamma, mu]``.
    gamble, probs : Tensor
        ``(S, T, 2)`` (or ``(S, B, T, 2)``) outcomes and their probabilities.
    certain : Tensor
        ``(S, T)`` sure amounts.
    choice : Tensor
        ``(S, T)`` 1 = gamble, 0 = sure amount.
    mask : Tensor, optional
        ``True`` on real trials.
    output : {"nll", "all"}
        ``"nll"``: ``(S,)``; ``"all"``: dict with ``params`` (natural),
        ``nll``, ``Vg``, ``Vc``, ``p_gamble`` per trial.

    References
    ----------
    Tversky, A., & Kahneman, D. (1992). *Journal of Risk and Uncertainty*, 5(4), 297-323.
    """
    mask = default_mask(mask, certain)
    alpha, beta, gamma = (norm2alpha(params[:, j]) for j in (0, 1, 3))
    lam, mu = norm2beta(params[:, 2]), norm2beta(params[:, 4])
    view = (-1,) + (1,) * (certain.dim() - 1)
    a, b, lm, g, m = (v.reshape(view) for v in (alpha, beta, lam, gamma, mu))
    o = fill_padding(gamble, mask, dtype=params.dtype)
    p = fill_padding(probs, mask, dtype=params.dtype)
    c = fill_padding(certain, mask, dtype=params.dtype)
    y = fill_padding(choice, mask, dtype=params.dtype)
    o1, o2, p1, p2 = o[..., 0], o[..., 1], p[..., 0], p[..., 1]
    mixed = o1 * o2 < 0
    first_extreme = o1.abs() >= o2.abs()
    w_both = _weight(p1 + p2, g)
    pi1 = torch.where(mixed | first_extreme, _weight(p1, g), w_both - _weight(p2, g))
    pi2 = torch.where(mixed | ~first_extreme, _weight(p2, g), w_both - _weight(p1, g))
    vg = pi1 * _value(o1, a, b, lm) + pi2 * _value(o2, a, b, lm)
    vc = _value(c, a, b, lm)
    logit = m * (vg - vc)
    nll = bernoulli_nll(logit, y, mask)
    if output != "all":
        return nll
    return {"params": torch.stack([alpha, beta, lam, gamma, mu], -1), "nll": nll, "Vg": vg, "Vc": vc,
            "p_gamble": torch.sigmoid(logit), "gamble": gamble, "probs": probs, "certain": certain,
            "choice": choice}


def pt_design(nsubjects: int, ntrials: int = 150, rng: np.random.Generator | None = None) -> dict:
    """Random gamble designs, one per subject: gains, losses and mixed gambles in the ratio 1 : 1 : 3.

    ``p1`` is one of 0.1, 0.3, 0.5, 0.7, 0.9 (``p2 = 1 - p1``); magnitudes are
    uniform in [5, 50]; half of the gain and loss gambles have a zero second
    outcome; the sure amount is the expected value plus up to +-40% of the
    larger magnitude, except on 70% of the mixed trials, where it is near
    zero (uniform in [-3, 3]) against a 50/50 gamble (the loss-aversion
    probes).

    Returns
    -------
    dict
        ``gamble``, ``probs`` ``(S, T, 2)`` and ``certain`` ``(S, T)``.
    """
    rng = np.random.default_rng() if rng is None else rng
    kinds = np.resize(np.array([0, 1, 2, 2, 2]), ntrials)  # 0 gain, 1 loss, 2 mixed
    gamble, probs, certain = (np.empty((nsubjects, ntrials, 2)), np.empty((nsubjects, ntrials, 2)),
                              np.empty((nsubjects, ntrials)))
    for s in range(nsubjects):
        kind = rng.permutation(kinds)
        p1 = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9], ntrials)
        mag = rng.uniform(5.0, 50.0, (ntrials, 2))
        sign = np.where(kind[:, None] == 0, 1.0, -1.0) * np.ones((1, 2))
        sign[kind == 2, 0] = 1.0
        o = sign * mag
        o[(kind < 2) & (rng.random(ntrials) < 0.5), 1] = 0.0
        pr = np.column_stack([p1, 1.0 - p1])
        c = (pr * o).sum(1) + rng.uniform(-1.0, 1.0, ntrials) * 0.4 * np.abs(o).max(1)
        probe = (kind == 2) & (rng.random(ntrials) < 0.7)
        c[probe] = rng.uniform(-3.0, 3.0, probe.sum())
        pr[probe] = 0.5
        gamble[s], probs[s], certain[s] = o, pr, c
    return {"gamble": gamble, "probs": probs, "certain": certain}


def pt_simulate(params: np.ndarray, ntrials: int = 150, seed: int | None = None, design: dict | None = None) -> dict:
    """Simulate :func:`pt_fit` choices.

    Parameters
    ----------
    params : ndarray
        ``(S, 5)`` natural ``[alpha, beta, lambda, gamma, mu]``.
    ntrials : int
        Trials per subject (default 150) of a fresh :func:`pt_design` per subject.
    seed : int, optional
        Seed of the design and the choices.
    design : dict, optional
        ``gamble``, ``probs`` ``(S, T, 2)`` (or ``(T, 2)``, shared) and
        ``certain`` to use instead of a random design.

    Returns
    -------
    dict
        ``params``, ``gamble``, ``probs``, ``certain``, ``choice`` (int 0/1),
        ``p_gamble``, ``Vg``, ``Vc``.
    """
    p = natural_params(params, pt_fit.param_names)
    S = len(p)
    rng = np.random.default_rng(seed)
    if design is None:
        design = pt_design(S, ntrials, rng)
    # a design shared by all subjects ((T, 2) and (T,)) is repeated for each of them
    c = np.broadcast_to(np.asarray(design["certain"], float), (S, np.shape(design["certain"])[-1])).copy()
    g, pr = (np.broadcast_to(np.asarray(design[k], float), c.shape + (2,)).copy() for k in ("gamble", "probs"))
    out = model_output(pt_fit, p, g, pr, c, np.zeros(c.shape))
    choice = simulate_bernoulli(out["p_gamble"], rng)
    return {"params": p.copy(), "gamble": g, "probs": pr, "certain": c, "choice": choice,
            "p_gamble": out["p_gamble"], "Vg": out["Vg"], "Vc": out["Vc"]}


pt_fit.simulate = pt_simulate
