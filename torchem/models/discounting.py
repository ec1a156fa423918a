r"""Discounting: choices between an undiscounted baseline option and a discounted one.

Every model here has the same choice rule.  On each trial the subject picks
the *discounted* option (``choices = 1``) or the *baseline* option (0), and

.. math::

    P(\text{discounted}) = \sigma(V_{disc} - V_{base}),

in the units of the payouts, with no inverse temperature (as in pyEM: the
payout ladder sets the scale).  Within a block the discounting variable is
fixed and the baseline amount steps down a ladder, so the trial at which the
subject switches options locates the discounted value.

Social discounting (Jones & Rachlin, 2006), social distance :math:`N`; the
*selfish* option is the baseline, the *prosocial* option (a share at
distance :math:`N`) is discounted; each option's value is its amount for
self plus the discounted amount for the other:

* ``sd_hyp_wk``: :math:`U_{other} = w_{other}\, r_{other} / (1 + k N)`;
* ``sd_hyp_k``: :math:`U_{other} = r_{other} / (1 + k N)`;
* ``sd_par_k``: :math:`U_{other} = r_{other} - k N^2` (0 when :math:`r_{other} = 0`);
* ``sd_lin_k``: :math:`U_{other} = r_{other} - k N` (0 when :math:`r_{other} = 0`).

Temporal (Mazur, 1987): ``td_hyp_k``, :math:`V_{later} = r_{later} / (1 + k D)`
against a sooner amount.  Probability (Rachlin et al., 1991): ``prd_hyp_k``,
:math:`V_{risky} = r_{risky} / (1 + k \theta)`, :math:`\theta = (1 - p) / p`,
against a certain amount.  Effort: ``ed_par_k``,
:math:`V_{high} = r_{high} - k E^2` against a low-effort amount.  Prosocial
effort (Lockwood et al., 2017): ``ped_par_k`` (one ``k``) and ``ped_par_2k``
(``k_self`` in blocks for self, ``k_other`` in blocks for another person),
:math:`V_{high} = r_{high} - k_b E^2`.

Parameters (normalized -> natural): every ``k`` and ``w_other`` through
``norm2beta`` (0-20), as in pyEM.

Data: one row per trial, ``(S, T)`` or ``(S, B, T)``; the columns of each
model are in its docstring and the README (the discounting variable is a
per-trial column, constant within a block in the default designs).
Simulators use pyEM's default designs (7 blocks x 9 trials; prosocial
effort 14 blocks x 9) and return a dict whose keys are the fit's inputs.

References: Jones, B., & Rachlin, H. (2006). Social discounting.
*Psychological Science*, 17(4), 283-286.  Mazur, J. E. (1987). An adjusting
procedure for studying delayed reinforcement.  Rachlin, H., Raineri, A., &
Cross, D. (1991). Subjective probability and delay. *JEAB*, 55(2), 233-244.
Lockwood, P. L., et al. (2017). Prosocial apathy for helping others when
effort is required. *Nature Human Behaviour*, 1, 0131.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..model import check_categorical, model_spec, natural_params, reject_subject
from ..transforms import norm2beta
from .common import bernoulli_nll, default_mask, fill_padding, model_output, simulate_bernoulli

__all__ = ["sd_hyp_wk_fit", "sd_hyp_k_fit", "sd_par_k_fit", "sd_lin_k_fit", "td_hyp_k_fit", "prd_hyp_k_fit",
           "ed_par_k_fit", "ped_par_k_fit", "ped_par_2k_fit", "SOCIAL_DISTS", "SOCIAL_PAYOUTS", "DELAYS", "PROBS",
           "EFFORTS", "LADDER", "PED_EFFORTS", "PED_BENEFICIARY"]

#: Default designs (pyEM's): 7 levels of the discounting variable, one block each.
SOCIAL_DISTS = np.array([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0])
DELAYS = np.array([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0])
PROBS = np.array([0.95, 0.9, 0.75, 0.5, 0.25, 0.1, 0.05])
EFFORTS = np.arange(1.0, 8.0)
#: Social payouts per trial ``[option (selfish, prosocial), recipient (self, other)]``: selfish 155 .. 75 for self.
SOCIAL_PAYOUTS = np.array([[[r, 0.0], [75.0, 75.0]] for r in range(155, 74, -10)])
#: Two-option ladder per trial ``[baseline, discounted]``: baseline 145 .. 25, discounted 155.
LADDER = np.array([[r, 155.0] for r in range(145, 24, -15)])
#: Prosocial effort: effort levels 1-7 for self (beneficiary 0), then for the other person (1).
PED_EFFORTS = np.concatenate([EFFORTS, EFFORTS])
PED_BENEFICIARY = np.repeat([0.0, 1.0], 7)


def _checker(positive: list[int], unit: list[int] = (), binary: list[int] = ()) -> Callable:
    def check(batch) -> None:
        check_categorical(batch, 0, 2, "1 = the discounted option was chosen, 0 = the baseline")
        for j in binary:
            check_categorical(batch, j, 2, "0 = self, 1 = other")
        for j in positive:
            reject_subject(batch, (batch.data[j] <= 0) & batch.mask, j, "must be > 0")
        for j in unit:
            reject_subject(batch, ((batch.data[j] <= 0) | (batch.data[j] > 1)) & batch.mask, j,
                           "must be a probability in (0, 1]")
    return check


def _prepare(params, choices, fields, mask, fill=(0.0,)):
    """Mask, natural ``k``-type parameters ``(S, 1, ...)`` and the padded-safe fields."""
    mask = default_mask(mask, choices)
    view = (-1,) + (1,) * (choices.dim() - 1)
    nat = norm2beta(params)
    ks = [nat[:, j].reshape(view) for j in range(params.shape[1])]
    fills = list(fill) + [fill[-1]] * (len(fields) - len(fill))
    data = [fill_padding(f, mask, v, dtype=params.dtype) for f, v in zip(fields, fills)]
    return mask, nat, ks, fill_padding(choices, mask, dtype=params.dtype), data


def _result(nat, dv, y, mask, output, v_base, v_disc):
    nll = bernoulli_nll(dv, y, mask)
    if output != "all":
        return nll
    return {"params": nat, "nll": nll, "delta_V": dv, "p_discounted": torch.sigmoid(dv), "V_base": v_base,
            "V_disc": v_disc}


_OUT_DOC = """mask : Tensor, optional
        ``True`` on real trials.
    output : {"nll", "all"}
        ``"nll"``: ``(S,)``; ``"all"``: dict with ``params`` (natural), ``nll``,
        ``V_base``, ``V_disc``, ``delta_V`` and ``p_discounted`` per trial."""


# ------------------------------------------------------------------------------------ social discounting
_SD_INPUTS = ["choices", "self_selfish", "other_selfish", "self_prosocial", "other_prosocial", "distance"]
_SD_CHECK = _checker(positive=[5])


def _social(params, choices, fields, mask, output, u_other: Callable):
    mask, nat, ks, y, (s0, o0, s1, o1, n) = _prepare(params, choices, fields, mask, fill=(0.0,) * 5 + (1.0,))
    v_base = s0 + u_other(o0, n, *ks)
    v_disc = s1 + u_other(o1, n, *ks)
    return _result(nat, v_disc - v_base, y, mask, output, v_base, v_disc)


def _gated(r, u):
    """The other's utility only where they receive something (pyEM's convention for the subtractive models)."""
    return torch.where(r > 0, u, torch.zeros_like(u))


_SD_DOC = """Parameters
    ----------
    params : Tensor
        ``(S, {P})`` normalized ``{names}``.
    choices : Tensor
        ``(S, T)`` or ``(S, B, T)``: 1 prosocial (discounted), 0 selfish.
    self_selfish, other_selfish, self_prosocial, other_prosocial : Tensor
        Amounts for self and for the other person of the selfish and the
        prosocial option, per trial.
    distance : Tensor
        Social distance ``N`` (> 0) per trial.
    {out}

    References
    ----------
    Jones, B., & Rachlin, H. (2006). Social discounting. *Psychological Science*, 17(4), 283-286.
    """


@model_spec(param_names=["w_other", "k"], param_xform=[norm2beta, norm2beta], inputs=_SD_INPUTS,
            responses=["choices"], check_data=_SD_CHECK)
def sd_hyp_wk_fit(params, choices, self_selfish, other_selfish, self_prosocial, other_prosocial, distance,
                  mask=None, output="nll"):
    r"""Hyperbolic social discounting with an other-regarding weight: :math:`U_{other} = w r / (1 + k N)`.

    Parameters (normalized -> natural): ``w_other``, ``k`` (norm2beta, 0-20).
    Data columns: ``choice``, ``self_selfish``, ``other_selfish``,
    ``self_prosocial``, ``other_prosocial``, ``distance``.

    {doc}"""
    return _social(params, choices, (self_selfish, other_selfish, self_prosocial, other_prosocial, distance),
                   mask, output, lambda r, n, w, k: w * r / (1.0 + k * n))


@model_spec(param_names=["k"], param_xform=[norm2beta], inputs=_SD_INPUTS, responses=["choices"], check_data=_SD_CHECK)
def sd_hyp_k_fit(params, choices, self_selfish, other_selfish, self_prosocial, other_prosocial, distance,
                 mask=None, output="nll"):
    r"""Hyperbolic social discounting: :math:`U_{other} = r / (1 + k N)`.

    Parameters (normalized -> natural): ``k`` (norm2beta, 0-20).  Data
    columns as :func:`sd_hyp_wk_fit`.

    {doc}"""
    return _social(params, choices, (self_selfish, other_selfish, self_prosocial, other_prosocial, distance),
                   mask, output, lambda r, n, k: r / (1.0 + k * n))


@model_spec(param_names=["k"], param_xform=[norm2beta], inputs=_SD_INPUTS, responses=["choices"], check_data=_SD_CHECK)
def sd_par_k_fit(params, choices, self_selfish, other_selfish, self_prosocial, other_prosocial, distance,
                 mask=None, output="nll"):
    r"""Parabolic social discounting: :math:`U_{other} = r - k N^2` (0 when the other gets nothing).

    Parameters (normalized -> natural): ``k`` (norm2beta, 0-20).  Data
    columns as :func:`sd_hyp_wk_fit`.

    {doc}"""
    return _social(params, choices, (self_selfish, other_selfish, self_prosocial, other_prosocial, distance),
                   mask, output, lambda r, n, k: _gated(r, r - k * n ** 2))


@model_spec(param_names=["k"], param_xform=[norm2beta], inputs=_SD_INPUTS, responses=["choices"], check_data=_SD_CHECK)
def sd_lin_k_fit(params, choices, self_selfish, other_selfish, self_prosocial, other_prosocial, distance,
                 mask=None, output="nll"):
    r"""Linear social discounting: :math:`U_{other} = r - k N` (0 when the other gets nothing).

    Parameters (normalized -> natural): ``k`` (norm2beta, 0-20).  Data
    columns as :func:`sd_hyp_wk_fit`.

    {doc}"""
    return _social(params, choices, (self_selfish, other_selfish, self_prosocial, other_prosocial, distance),
                   mask, output, lambda r, n, k: _gated(r, r - k * n))


# ------------------------------------------------------------------------- temporal, probability, effort
def _two_option(params, choices, base, disc, var, mask, output, value: Callable, var_fill: float = 1.0):
    mask, nat, ks, y, (b, d, v) = _prepare(params, choices, (base, disc, var), mask, fill=(0.0, 0.0, var_fill))
    v_disc = value(d, v, *ks)
    return _result(nat, v_disc - b, y, mask, output, b, v_disc)


_TWO_DOC = """Parameters
    ----------
    params : Tensor
        ``(S, {P})`` normalized ``{names}``.
    choices : Tensor
        ``(S, T)`` or ``(S, B, T)``: 1 {disc}, 0 {base}.
    {fields}
    {out}

    References
    ----------
    {ref}
    """


@model_spec(param_names=["k"], param_xform=[norm2beta], inputs=["choices", "sooner", "later", "delay"],
            responses=["choices"], check_data=_checker(positive=[3]))
def td_hyp_k_fit(params, choices, sooner, later, delay, mask=None, output="nll"):
    r"""Hyperbolic temporal discounting (Mazur, 1987): :math:`V_{later} = r_{later} / (1 + k D)`.

    Parameters (normalized -> natural): ``k`` (norm2beta, 0-20).  Data
    columns: ``choice`` (1 later), ``sooner``, ``later`` (amounts), ``delay``.

    {doc}"""
    return _two_option(params, choices, sooner, later, delay, mask, output, lambda r, d, k: r / (1.0 + k * d))


@model_spec(param_names=["k"], param_xform=[norm2beta], inputs=["choices", "certain", "risky", "prob"],
            responses=["choices"], check_data=_checker(positive=[], unit=[3]))
def prd_hyp_k_fit(params, choices, certain, risky, prob, mask=None, output="nll"):
    r"""Hyperbolic probability discounting (Rachlin et al., 1991): :math:`V = r / (1 + k (1 - p) / p)`.

    Parameters (normalized -> natural): ``k`` (norm2beta, 0-20).  Data
    columns: ``choice`` (1 risky), ``certain``, ``risky`` (amounts), ``prob``
    (of the risky amount, in (0, 1]).

    {doc}"""
    return _two_option(params, choices, certain, risky, prob, mask, output,
                       lambda r, p, k: r / (1.0 + k * (1.0 - p) / p))


@model_spec(param_names=["k"], param_xform=[norm2beta], inputs=["choices", "reward_low", "reward_high", "effort"],
            responses=["choices"], check_data=_checker(positive=[3]))
def ed_par_k_fit(params, choices, reward_low, reward_high, effort, mask=None, output="nll"):
    r"""Parabolic effort discounting: :math:`V_{high} = r_{high} - k E^2`.

    Parameters (normalized -> natural): ``k`` (norm2beta, 0-20).  Data
    columns: ``choice`` (1 high effort), ``reward_low``, ``reward_high``, ``effort``.

    {doc}"""
    return _two_option(params, choices, reward_low, reward_high, effort, mask, output,
                       lambda r, e, k: r - k * e ** 2)


_PED_INPUTS = ["choices", "reward_low", "reward_high", "effort", "beneficiary"]


@model_spec(param_names=["k"], param_xform=[norm2beta], inputs=_PED_INPUTS,
            responses=["choices"], check_data=_checker(positive=[3], binary=[4]))
def ped_par_k_fit(params, choices, reward_low, reward_high, effort, beneficiary, mask=None, output="nll"):
    r"""Prosocial effort discounting, one ``k`` for self and other: :math:`V_{high} = r_{high} - k E^2`.

    Parameters (normalized -> natural): ``k`` (norm2beta, 0-20).  Data
    columns: ``choice`` (1 high effort), ``reward_low``, ``reward_high``,
    ``effort``, ``beneficiary`` (0 self, 1 other; not used by this model).

    {doc}"""
    return _two_option(params, choices, reward_low, reward_high, effort, mask, output,
                       lambda r, e, k: r - k * e ** 2)


@model_spec(param_names=["k_self", "k_other"], param_xform=[norm2beta, norm2beta], inputs=_PED_INPUTS,
            responses=["choices"], check_data=_checker(positive=[3], binary=[4]))
def ped_par_2k_fit(params, choices, reward_low, reward_high, effort, beneficiary, mask=None, output="nll"):
    r"""Prosocial effort discounting with separate ``k`` for self and other (Lockwood et al., 2017).

    :math:`V_{high} = r_{high} - k_b E^2`, :math:`k_b` = ``k_self`` when
    ``beneficiary`` is 0 and ``k_other`` when it is 1.

    Parameters (normalized -> natural): ``k_self``, ``k_other`` (norm2beta,
    0-20).  Data columns as :func:`ped_par_k_fit`.

    {doc}"""
    ben = fill_padding(beneficiary, default_mask(mask, choices), dtype=params.dtype)
    return _two_option(params, choices, reward_low, reward_high, effort, mask, output,
                       lambda r, e, k_self, k_other: r - torch.where(ben > 0.5, k_other, k_self) * e ** 2)


_LOCKWOOD = ("Lockwood, P. L., Hamonet, M., Zhang, S. H., et al. (2017). Prosocial apathy for helping others "
             "when effort is required. *Nature Human Behaviour*, 1, 0131.")
_TWO = {
    td_hyp_k_fit: ("later", "sooner", "sooner, later : Tensor\n        Amounts per trial.\n    delay : Tensor\n"
                   "        Delay ``D`` (> 0) of the later amount.", "Mazur, J. E. (1987). An adjusting procedure "
                   "for studying delayed reinforcement. In *Quantitative analyses of behavior* (Vol. 5)."),
    prd_hyp_k_fit: ("risky", "certain", "certain, risky : Tensor\n        Amounts per trial.\n    prob : Tensor\n"
                    "        Probability ``p`` in (0, 1] of the risky amount.", "Rachlin, H., Raineri, A., & Cross, D. "
                    "(1991). Subjective probability and delay. *JEAB*, 55(2), 233-244."),
    ed_par_k_fit: ("high effort", "low effort", "reward_low, reward_high : Tensor\n        Amounts per trial.\n"
                   "    effort : Tensor\n        Effort level ``E`` (> 0) of the high-effort option.", _LOCKWOOD),
    ped_par_k_fit: ("high effort", "low effort", "reward_low, reward_high : Tensor\n        Amounts per trial.\n"
                    "    effort : Tensor\n        Effort level ``E`` (> 0).\n    beneficiary : Tensor\n"
                    "        0 self, 1 the other person.", _LOCKWOOD),
}
_TWO[ped_par_2k_fit] = _TWO[ped_par_k_fit]
for _f in (sd_hyp_wk_fit, sd_hyp_k_fit, sd_par_k_fit, sd_lin_k_fit):
    _f.__doc__ = _f.__doc__.replace("{doc}", _SD_DOC.format(P=len(_f.param_names), names=_f.param_names,
                                                             out=_OUT_DOC))
for _f, (_d, _b, _fields, _ref) in _TWO.items():
    _f.__doc__ = _f.__doc__.replace("{doc}", _TWO_DOC.format(P=len(_f.param_names), names=_f.param_names, disc=_d,
                                                              base=_b, fields=_fields, out=_OUT_DOC, ref=_ref))


# ------------------------------------------------------------------------------------------- simulation
def _blocks(payouts: np.ndarray, levels: np.ndarray, item_ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B, T, ...)`` payouts and ``(B, T)`` levels of the discounting variable (one per block).

    ``payouts`` is per trial (repeated in every block) or per block (a leading
    axis of ``B`` or 1); one trial's payouts have ``item_ndim`` axes.
    """
    levels = np.asarray(levels, dtype=float)
    if levels.ndim != 1 or levels.size == 0:
        raise ValueError("the discounting variable must be a non-empty 1-D array, one value per block")
    pay = np.asarray(payouts, dtype=float)
    if pay.ndim == item_ndim + 1:
        pay = pay[None]
    if pay.ndim != item_ndim + 2 or pay.shape[0] not in (1, levels.size):
        raise ValueError(f"payouts must be (trials, {', '.join(['2'] * item_ndim)}) or (blocks, trials, ...) with "
                         f"one block per level ({levels.size}), got shape {pay.shape}")
    pay = np.broadcast_to(pay, (levels.size,) + pay.shape[1:])
    return pay, np.broadcast_to(levels[:, None], pay.shape[:2])


def _simulate(fit, params, fields: list[np.ndarray], design: dict[str, np.ndarray], seed) -> dict:
    """Draw choices from ``fit``'s own probabilities on the design ``fields`` ``(B, T)`` (shared by subjects).

    ``design`` holds the design under pyEM's names (``payouts`` ``(B, T, ...)``
    and the per-block discounting variable ``(B,)``); each is returned with a
    leading subject axis, as pyEM's simulators return them.
    """
    p = natural_params(params, fit.param_names)
    S = len(p)
    data = [np.broadcast_to(f, (S,) + f.shape).copy() for f in fields]
    out = model_output(fit, p, np.zeros(data[0].shape), *data)
    choices = simulate_bernoulli(out["p_discounted"], np.random.default_rng(seed))
    pyem = {k: np.broadcast_to(v, (S,) + v.shape).copy() for k, v in design.items()}
    return {"params": p.copy(), **dict(zip(fit.inputs, [choices] + data)), "p_discounted": out["p_discounted"],
            "delta_V": out["delta_V"], **pyem}


def _social_simulate(fit, params, payouts, social_dists, seed):
    pay, n = _blocks(SOCIAL_PAYOUTS if payouts is None else payouts,
                     SOCIAL_DISTS if social_dists is None else social_dists, 2)
    return _simulate(fit, params, [pay[..., 0, 0], pay[..., 0, 1], pay[..., 1, 0], pay[..., 1, 1], n],
                     {"payouts": pay, "social_dists": n[:, 0]}, seed)


def _two_simulate(fit, params, payouts, levels, level_name: str, seed, extra_levels=()):
    """``extra_levels``: further per-block fields (e.g. the beneficiary), spread over each block's trials."""
    pay, v = _blocks(LADDER if payouts is None else payouts, levels, 1)
    extra = [np.broadcast_to(np.asarray(x, dtype=float)[:, None], v.shape) for x in extra_levels]
    return _simulate(fit, params, [pay[..., 0], pay[..., 1], v, *extra], {"payouts": pay, level_name: v[:, 0]},
                     seed)


_SIM_DOC = """Parameters
    ----------
    params : ndarray
        ``(S, P)`` natural parameters in the order of the fit function.
    payouts : ndarray, optional
        {pay}
    {var} : ndarray, optional
        One value per block (default {default}).
    seed : int, optional
        Seed of the choices.

    Returns
    -------
    dict
        ``params``, the fit function's inputs ``(S, B, T)`` (``choices`` int
        0/1, 1 = discounted option), ``p_discounted`` and ``delta_V``, and
        the design under pyEM's names: ``payouts`` ``(S, B, T, ...)`` and
        ``{var}`` ``(S, B)`` (one value per block).
    """
_SOC_PAY = ("``(T, 2, 2)`` per trial (every block) or ``(B, T, 2, 2)``, indexed ``[option (selfish, "
            "prosocial), recipient (self, other)]``; default :data:`SOCIAL_PAYOUTS`.")
_TWO_PAY = "``(T, 2)`` per trial or ``(B, T, 2)``: ``[baseline, discounted]`` amounts; default :data:`LADDER`."


def _make_social_sim(fit):
    def simulate(params: np.ndarray, payouts: np.ndarray | None = None, social_dists: np.ndarray | None = None,
                 seed: int | None = None) -> dict:
        return _social_simulate(fit, params, payouts, social_dists, seed)
    simulate.__name__ = fit.__name__.replace("_fit", "_simulate")
    simulate.__doc__ = (f"Simulate :func:`{fit.__name__}` on the social discounting task.\n\n    "
                        + _SIM_DOC.format(pay=_SOC_PAY, var="social_dists", default=":data:`SOCIAL_DISTS`"))
    return simulate


sd_hyp_wk_simulate = _make_social_sim(sd_hyp_wk_fit)
sd_hyp_k_simulate = _make_social_sim(sd_hyp_k_fit)
sd_par_k_simulate = _make_social_sim(sd_par_k_fit)
sd_lin_k_simulate = _make_social_sim(sd_lin_k_fit)


def td_hyp_k_simulate(params: np.ndarray, payouts: np.ndarray | None = None, delays: np.ndarray | None = None,
                      seed: int | None = None) -> dict:
    return _two_simulate(td_hyp_k_fit, params, payouts, DELAYS if delays is None else delays, "delays", seed)


def prd_hyp_k_simulate(params: np.ndarray, payouts: np.ndarray | None = None, probs: np.ndarray | None = None,
                       seed: int | None = None) -> dict:
    return _two_simulate(prd_hyp_k_fit, params, payouts, PROBS if probs is None else probs, "probs", seed)


def ed_par_k_simulate(params: np.ndarray, payouts: np.ndarray | None = None, effort_levels: np.ndarray | None = None,
                      seed: int | None = None) -> dict:
    return _two_simulate(ed_par_k_fit, params, payouts, EFFORTS if effort_levels is None else effort_levels,
                         "effort_levels", seed)


def _ped_simulate(fit, params, payouts, effort_levels, beneficiary, seed):
    e = PED_EFFORTS if effort_levels is None else np.asarray(effort_levels, dtype=float)
    ben = PED_BENEFICIARY if beneficiary is None else np.asarray(beneficiary, dtype=float)
    if ben.shape != e.shape:
        raise ValueError(f"beneficiary needs one value per block like effort_levels ({e.size}), got {ben.size}")
    return _two_simulate(fit, params, payouts, e, "effort_levels", seed, extra_levels=(ben,))


def ped_par_k_simulate(params: np.ndarray, payouts: np.ndarray | None = None, effort_levels: np.ndarray | None = None,
                       beneficiary: np.ndarray | None = None, seed: int | None = None) -> dict:
    return _ped_simulate(ped_par_k_fit, params, payouts, effort_levels, beneficiary, seed)


def ped_par_2k_simulate(params: np.ndarray, payouts: np.ndarray | None = None,
                        effort_levels: np.ndarray | None = None, beneficiary: np.ndarray | None = None,
                        seed: int | None = None) -> dict:
    return _ped_simulate(ped_par_2k_fit, params, payouts, effort_levels, beneficiary, seed)


_PED_EXTRA = ("\n    beneficiary : ndarray, optional\n        0 (self) or 1 (other) per block, like "
              "``effort_levels`` (default :data:`PED_BENEFICIARY`: 7 self blocks, then 7 other).")
for _sim, _fit, _var, _default, _extra in (
        (td_hyp_k_simulate, td_hyp_k_fit, "delays", ":data:`DELAYS`", ""),
        (prd_hyp_k_simulate, prd_hyp_k_fit, "probs", ":data:`PROBS`", ""),
        (ed_par_k_simulate, ed_par_k_fit, "effort_levels", ":data:`EFFORTS`", ""),
        (ped_par_k_simulate, ped_par_k_fit, "effort_levels", ":data:`PED_EFFORTS`", _PED_EXTRA),
        (ped_par_2k_simulate, ped_par_2k_fit, "effort_levels", ":data:`PED_EFFORTS`", _PED_EXTRA)):
    _doc = _SIM_DOC.format(pay=_TWO_PAY, var=_var, default=_default)
    _sim.__doc__ = (f"Simulate :func:`{_fit.__name__}` (pyEM's default design).\n\n    "
                    + _doc.replace("\n    seed :", _extra + "\n    seed :"))
    _fit.simulate = _sim
for _fit, _sim in ((sd_hyp_wk_fit, sd_hyp_wk_simulate), (sd_hyp_k_fit, sd_hyp_k_simulate),
                   (sd_par_k_fit, sd_par_k_simulate), (sd_lin_k_fit, sd_lin_k_simulate)):
    _fit.simulate = _sim
