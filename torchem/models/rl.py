r"""Rescorla-Wagner models of two-armed bandit learning.

Task: on each trial the subject picks option A (code 0) or B (code 1) and
receives a reward.  Values start at 0.5 for both options at the start of every
block.  The choice rule is a softmax with inverse temperature
:math:`\beta`, which for two options is the logistic of the value difference:

.. math::

    P(c_t = 1) = \sigma\big(\beta (V_t(1) - V_t(0))\big), \qquad
    \delta_t = r_t - V_t(c_t), \qquad
    V_{t+1}(c_t) = V_t(c_t) + \alpha\,\delta_t .

Data: ``choices`` and ``rewards`` of shape ``(S, B, T)`` (blocks of trials)
or ``(S, T)`` (one block), with a mask of the same shape.  Blocks are
independent, so they are run side by side: the loop is over trials within a
block, never over subjects or blocks.

Parameters (normalized -> natural): ``beta = norm2beta(x)`` in (0, 20),
``alpha = norm2alpha(x)`` in (0, 1).  References: Rescorla & Wagner (1972);
Daw (2011).

The module also holds two social-learning variants with several outcome
channels: :func:`rw3a1b_fit` (self / other / no-one outcomes, Lockwood et al.
2016) and :func:`rw4a1b_fit` (four options offered in pairs, self and other
outcomes with valence-specific learning rates, Rhoads et al. 2025).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..model import check_categorical, model_spec, natural_params, reject_subject
from ..transforms import norm2alpha, norm2beta
from .common import as_blocks, default_mask, fill_padding

__all__ = ["rw1a1b_fit", "rw1a1b_simulate", "rw2a1b_fit", "rw2a1b_simulate", "rw3a1b_fit", "rw3a1b_simulate",
           "rw4a1b_fit", "rw4a1b_simulate"]


def _check_bandit(batch) -> None:
    check_categorical(batch, 0, 2)


def _rw_bandit(beta: torch.Tensor, alpha_pos: torch.Tensor, alpha_neg: torch.Tensor | None,
               choices: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None, output: str):
    """Shared Rescorla-Wagner recursion; ``alpha_neg=None`` means one learning rate.

    ``beta``, ``alpha_*``: ``(S,)``.  Data ``(S, T)`` or ``(S, B, T)``.
    """
    mask = default_mask(mask, choices)
    (c, r, m), lead = as_blocks(choices, rewards, mask)
    S = beta.shape[0]
    n_blocks = c.shape[0] // S
    dtype = beta.dtype
    c = fill_padding(c, m, dtype=dtype)  # padded trials hold anything (even NaN): zero them once
    r = torch.where(m, r, 0).to(dtype)
    m = m.to(dtype)
    b = beta.repeat_interleave(n_blocks)
    ap = alpha_pos.repeat_interleave(n_blocks)
    an = None if alpha_neg is None else alpha_neg.repeat_interleave(n_blocks)
    # per-trial constants, computed once over all trials: fewer, larger operations
    to0, to1 = ((1.0 - c) * m).unbind(1), (c * m).unbind(1)  # where an update lands
    cs, rs = c.unbind(1), r.unbind(1)
    v0 = torch.full_like(b, 0.5)
    v1 = torch.full_like(b, 0.5)
    want_all = output == "all"
    dvs, ev, pe_all = [], [], []
    for t in range(c.shape[1]):
        dv = v1 - v0
        dvs.append(dv)
        pe = rs[t] - torch.addcmul(v0, cs[t], dv)  # r - V(chosen)
        step = (ap if an is None else torch.where(pe > 0, ap, an)) * pe
        if want_all:
            ev.append(torch.stack([v0, v1], -1))
            pe_all.append(pe)
        v0 = torch.addcmul(v0, step, to0[t])
        v1 = torch.addcmul(v1, step, to1[t])
    # log P(chosen) = logsigmoid(beta (V_chosen - V_other)) for all trials at once
    logp = F.logsigmoid(b[:, None] * (2.0 * c - 1.0) * torch.stack(dvs, 1))
    nll = -(logp * m).sum(1).reshape(S, n_blocks).sum(1)
    if not want_all:
        return nll
    ev.append(torch.stack([v0, v1], -1))
    shape = lead if choices.dim() == 3 else (S,)
    ev = torch.stack(ev, 1)
    p1 = torch.sigmoid(b[:, None] * (ev[:, :-1, 1] - ev[:, :-1, 0]))
    return {
        "nll": nll,
        "EV": ev.reshape(*shape, c.shape[1] + 1, 2),
        "PE": (torch.stack(pe_all, 1) * m).reshape(*shape, c.shape[1]),
        "ch_prob": torch.stack([1.0 - p1, p1], -1).reshape(*shape, c.shape[1], 2),
        "choices": choices,
        "rewards": rewards,
    }


@model_spec(param_names=["beta", "alpha"], param_xform=[norm2beta, norm2alpha],
            inputs=["choices", "rewards"], categorical=["choices"],
            responses=["choices"], check_data=_check_bandit)
def rw1a1b_fit(params: torch.Tensor, choices: torch.Tensor, rewards: torch.Tensor,
               mask: torch.Tensor | None = None, output: str = "nll"):
    """Rescorla-Wagner, one learning rate, one inverse temperature.

    Parameters
    ----------
    params : Tensor
        ``(S, 2)`` normalized ``[beta, alpha]``.
    choices : Tensor
        ``(S, B, T)`` or ``(S, T)`` option codes, 0 (A) or 1 (B).
    rewards : Tensor
        Same shape, real rewards.
    mask : Tensor, optional
        Same shape, ``True`` on real trials.
    output : {"nll", "all"}
        ``"nll"``: ``(S,)`` negative log-likelihood.  ``"all"``: dict with
        ``params`` (natural ``(S, 2)``), ``nll``, ``EV`` ``(..., T+1, 2)``,
        ``PE`` ``(..., T)``, ``ch_prob`` ``(..., T, 2)``, ``choices``, ``rewards``.
    """
    beta, alpha = norm2beta(params[:, 0]), norm2alpha(params[:, 1])
    out = _rw_bandit(beta, alpha, None, choices, rewards, mask, output)
    if output == "all":
        out["params"] = torch.stack([beta, alpha], -1)
    return out


@model_spec(param_names=["beta", "alpha_pos", "alpha_neg"], param_xform=[norm2beta, norm2alpha, norm2alpha],
            inputs=["choices", "rewards"], categorical=["choices"],
            responses=["choices"], check_data=_check_bandit)
def rw2a1b_fit(params: torch.Tensor, choices: torch.Tensor, rewards: torch.Tensor,
               mask: torch.Tensor | None = None, output: str = "nll"):
    """Rescorla-Wagner with separate learning rates for positive and negative prediction errors.

    ``V(c) += alpha_pos * PE`` if ``PE > 0`` else ``alpha_neg * PE``.

    Parameters
    ----------
    params : Tensor
        ``(S, 3)`` normalized ``[beta, alpha_pos, alpha_neg]``.
    choices, rewards, mask, output
        As in :func:`rw1a1b_fit`.
    """
    beta = norm2beta(params[:, 0])
    a_pos, a_neg = norm2alpha(params[:, 1]), norm2alpha(params[:, 2])
    out = _rw_bandit(beta, a_pos, a_neg, choices, rewards, mask, output)
    if output == "all":
        out["params"] = torch.stack([beta, a_pos, a_neg], -1)
    return out


def _simulate_bandit(params: np.ndarray, n_lr: int, nblocks: int, ntrials: int,
                     reward_probs: Sequence[float] | np.ndarray, outcomes: np.ndarray | None,
                     seed: int | None) -> dict:
    params = natural_params(params, (rw1a1b_fit if n_lr == 1 else rw2a1b_fit).param_names)
    S = params.shape[0]
    rng = np.random.default_rng(seed)
    beta = params[:, 0]
    a_pos = params[:, 1]
    a_neg = params[:, 2] if n_lr == 2 else a_pos
    probs = np.broadcast_to(np.asarray(reward_probs, dtype=float), (nblocks, 2))
    choices = np.zeros((S, nblocks, ntrials), dtype=np.int64)
    rewards = np.zeros((S, nblocks, ntrials))
    EV = np.zeros((S, nblocks, ntrials + 1, 2))
    PE = np.zeros((S, nblocks, ntrials))
    ch_prob = np.zeros((S, nblocks, ntrials, 2))
    for b in range(nblocks):
        v = np.full((S, 2), 0.5)
        for t in range(ntrials):
            EV[:, b, t] = v
            p1 = 1.0 / (1.0 + np.exp(-beta * (v[:, 1] - v[:, 0])))
            ch_prob[:, b, t] = np.stack([1.0 - p1, p1], -1)
            c = (rng.random(S) < p1).astype(np.int64)
            if outcomes is None:
                r = (rng.random(S) < probs[b, c]).astype(float)
            else:
                r = np.asarray(outcomes, dtype=float)[b, t, c]
            pe = r - v[np.arange(S), c]
            lr = np.where(pe > 0, a_pos, a_neg)
            v[np.arange(S), c] += lr * pe
            choices[:, b, t], rewards[:, b, t], PE[:, b, t] = c, r, pe
        EV[:, b, ntrials] = v
    return {"params": params.copy(), "choices": choices, "rewards": rewards,
            "EV": EV, "PE": PE, "ch_prob": ch_prob}


def rw1a1b_simulate(params: np.ndarray, nblocks: int = 3, ntrials: int = 24,
                    reward_probs: Sequence[float] | np.ndarray = (0.8, 0.2),
                    outcomes: np.ndarray | None = None, seed: int | None = None) -> dict:
    """Simulate :func:`rw1a1b_fit` agents on a two-armed bandit.

    Parameters
    ----------
    params : ndarray
        ``(S, 2)`` *natural* ``[beta, alpha]``.
    nblocks, ntrials : int
        Blocks and trials per block; values reset to 0.5 each block.
    reward_probs : sequence of 2 floats, or ``(nblocks, 2)``
        Probability that option A / B pays 1 (default: A pays with 0.8, B with 0.2).
    outcomes : ndarray, optional
        ``(nblocks, ntrials, 2)`` fixed outcomes per option, instead of ``reward_probs``.
    seed : int, optional
        Seed of the random stream.

    Returns
    -------
    dict
        ``params`` ``(S, 2)``, ``choices`` ``(S, B, T)`` int 0/1, ``rewards``
        ``(S, B, T)``, ``EV`` ``(S, B, T+1, 2)``, ``PE`` ``(S, B, T)``,
        ``ch_prob`` ``(S, B, T, 2)``.
    """
    return _simulate_bandit(params, 1, nblocks, ntrials, reward_probs, outcomes, seed)


def rw2a1b_simulate(params: np.ndarray, nblocks: int = 3, ntrials: int = 24,
                    reward_probs: Sequence[float] | np.ndarray = (0.8, 0.2),
                    outcomes: np.ndarray | None = None, seed: int | None = None) -> dict:
    """Simulate :func:`rw2a1b_fit` agents; ``params`` is ``(S, 3)`` natural ``[beta, alpha_pos, alpha_neg]``.

    Other arguments and the returned dict as in :func:`rw1a1b_simulate`.
    """
    return _simulate_bandit(params, 2, nblocks, ntrials, reward_probs, outcomes, seed)


rw1a1b_fit.simulate = rw1a1b_simulate
rw2a1b_fit.simulate = rw2a1b_simulate


# ---------------------------------------------------------------------------------------------------
# Social learning with several outcome channels
# ---------------------------------------------------------------------------------------------------
_RW3_CHANNELS = ("self", "other", "noone")


@model_spec(param_names=["beta", "alpha_self", "alpha_other", "alpha_noone"],
            param_xform=[norm2beta, norm2alpha, norm2alpha, norm2alpha],
            inputs=["choices", "rewards_self", "rewards_other", "rewards_noone"], categorical=["choices"],
            responses=["choices"], check_data=_check_bandit)
def rw3a1b_fit(params: torch.Tensor, choices: torch.Tensor, rewards_self: torch.Tensor,
               rewards_other: torch.Tensor, rewards_noone: torch.Tensor,
               mask: torch.Tensor | None = None, output: str = "nll"):
    r"""Rescorla-Wagner with three outcome channels (self, other, no-one) and one inverse temperature.

    Lockwood et al. (2016)'s prosocial learning task as parameterized in
    pyEM: two options (codes 0 and 1) whose values start at 0 in every
    block.  After a choice ``c`` the chosen option delivers three outcomes,
    one per recipient channel ``k`` in (self, other, no-one); each channel has
    its own prediction error against the same value and its own learning rate:

    .. math::

        P(c_t = 1) = \sigma\big(\beta\,(V_t(1) - V_t(0))\big), \qquad
        \delta^k_t = r^k_t - V_t(c_t), \qquad
        V_{t+1}(c_t) = V_t(c_t) + \sum_{k} \alpha_k\,\delta^k_t .

    A channel that pays nothing on a trial (``r^k = 0``) still pulls the value
    towards 0 with its rate, so ``alpha_self + alpha_other + alpha_noone`` sets
    how fast values move and the single rates how much each recipient's
    outcomes count.  (With a summed rate above 2 the update overshoots and
    values oscillate with growing amplitude; the likelihood stays finite.)

    Parameters (normalized -> natural): ``beta`` (norm2beta, 0-20),
    ``alpha_self``, ``alpha_other``, ``alpha_noone`` (norm2alpha, 0-1).

    Data (``columns=`` for a DataFrame, in this order): ``choice`` (0/1 or two
    labels), ``reward_self``, ``reward_other``, ``reward_noone`` (the three
    outcomes of the *chosen* option on that trial, real numbers, usually 0/1).
    With ``block=`` the values reset at every block.

    Parameters
    ----------
    params : Tensor
        ``(S, 4)`` normalized ``[beta, alpha_self, alpha_other, alpha_noone]``.
    choices : Tensor
        ``(S, B, T)`` or ``(S, T)`` option codes 0/1.
    rewards_self, rewards_other, rewards_noone : Tensor
        Same shape: the chosen option's outcome in each channel.
    mask : Tensor, optional
        Same shape, ``True`` on real trials.
    output : {"nll", "all"}
        ``"nll"``: ``(S,)`` negative log-likelihood.  ``"all"``: dict with
        ``params`` (natural ``(S, 4)``), ``nll``, ``EV`` ``(..., T+1, 2)``,
        ``PE_self``, ``PE_other``, ``PE_noone`` ``(..., T)`` (zero on padded
        trials), ``ch_prob`` ``(..., T, 2)`` and the data.

    References
    ----------
    Lockwood, P. L., Apps, M. A. J., Valton, V., Viding, E., & Roiser, J. P.
    (2016). Neurocomputational mechanisms of prosocial learning and links to
    empathy. *PNAS*, 113(35), 9763-9768.
    """
    beta = norm2beta(params[:, 0])
    alphas = norm2alpha(params[:, 1:4])
    mask = default_mask(mask, choices)
    (c, rs, ro, rn, m), lead = as_blocks(choices, rewards_self, rewards_other, rewards_noone, mask)
    S = beta.shape[0]
    n_blocks = c.shape[0] // S
    dtype = beta.dtype
    c, rs, ro, rn = (fill_padding(x, m, dtype=dtype) for x in (c, rs, ro, rn))
    mf = m.to(dtype)
    b = beta.repeat_interleave(n_blocks)
    a = alphas.repeat_interleave(n_blocks, 0)  # (S*B, 3)
    a_sum = a.sum(1)
    # sum_k alpha_k r^k for every trial at once; the update is drive - (sum_k alpha_k) V(c)
    drive = (a[:, 0:1] * rs + a[:, 1:2] * ro + a[:, 2:3] * rn).unbind(1)
    sign_beta = (b[:, None] * (2.0 * c - 1.0)).unbind(1)
    to0, to1 = ((1.0 - c) * mf).unbind(1), (c * mf).unbind(1)
    cs = c.unbind(1)
    v0 = torch.zeros_like(b)
    v1 = torch.zeros_like(b)
    want_all = output == "all"
    logp, ev, vch = [], [], []
    for t in range(c.shape[1]):
        dv = v1 - v0
        logp.append(F.logsigmoid(sign_beta[t] * dv))
        vc = v0 + cs[t] * dv
        step = drive[t] - a_sum * vc
        if want_all:
            ev.append(torch.stack([v0, v1], -1))
            vch.append(vc)
        v0 = v0 + step * to0[t]
        v1 = v1 + step * to1[t]
    nll = -(torch.stack(logp, 1) * mf).sum(1).reshape(S, n_blocks).sum(1)
    if not want_all:
        return nll
    ev.append(torch.stack([v0, v1], -1))
    shape = lead if choices.dim() == 3 else (S,)
    T = c.shape[1]
    ev = torch.stack(ev, 1)
    vch = torch.stack(vch, 1)
    p1 = torch.sigmoid(b[:, None] * (ev[:, :-1, 1] - ev[:, :-1, 0]))
    return {
        "params": torch.stack([beta, alphas[:, 0], alphas[:, 1], alphas[:, 2]], -1),
        "nll": nll,
        "EV": ev.reshape(*shape, T + 1, 2),
        "PE_self": ((rs - vch) * mf).reshape(*shape, T),
        "PE_other": ((ro - vch) * mf).reshape(*shape, T),
        "PE_noone": ((rn - vch) * mf).reshape(*shape, T),
        "ch_prob": torch.stack([1.0 - p1, p1], -1).reshape(*shape, T, 2),
        "choices": choices,
        "rewards_self": rewards_self,
        "rewards_other": rewards_other,
        "rewards_noone": rewards_noone,
    }


def rw3a1b_design(nblocks: int = 9, p_good: float = 0.75, p_bad: float = 0.25) -> np.ndarray:
    """Default reward probabilities of :func:`rw3a1b_simulate`: ``(nblocks, 2 options, 3 channels)``.

    Block ``b`` is a *recipient* block for channel ``b % 3`` (self, other,
    no-one, as in Lockwood et al. 2016): the block's good option (``b % 2``)
    pays that channel 1 with ``p_good``, the other option with ``p_bad``; the
    two other channels pay nothing in that block.
    """
    probs = np.zeros((nblocks, 2, 3))
    for b in range(nblocks):
        good = b % 2
        probs[b, good, b % 3] = p_good
        probs[b, 1 - good, b % 3] = p_bad
    return probs


def rw3a1b_simulate(params: np.ndarray, nblocks: int = 9, ntrials: int = 16,
                    reward_probs: np.ndarray | None = None, outcomes: np.ndarray | None = None,
                    seed: int | None = None) -> dict:
    """Simulate :func:`rw3a1b_fit` agents.

    Parameters
    ----------
    params : ndarray
        ``(S, 4)`` *natural* ``[beta, alpha_self, alpha_other, alpha_noone]``.
    nblocks, ntrials : int
        Blocks (values reset to 0 in each) and trials per block (default 9 x 16).
    reward_probs : ndarray, optional
        ``(nblocks, 2, 3)`` probability that option ``o`` pays 1 in channel
        ``k`` (self, other, no-one) in block ``b``; default :func:`rw3a1b_design`.
    outcomes : ndarray, optional
        ``(nblocks, ntrials, 2, 3)`` fixed outcomes per option and channel
        instead of ``reward_probs``.
    seed : int, optional
        Seed of the random stream.

    Returns
    -------
    dict
        ``params`` ``(S, 4)``, ``choices`` ``(S, B, T)`` int 0/1,
        ``rewards_self``, ``rewards_other``, ``rewards_noone`` ``(S, B, T)``
        (the chosen option's outcomes), ``EV`` ``(S, B, T+1, 2)``,
        ``PE_self``, ``PE_other``, ``PE_noone`` ``(S, B, T)``, ``ch_prob``
        ``(S, B, T, 2)``.
    """
    params = natural_params(params, rw3a1b_fit.param_names)
    S = params.shape[0]
    rng = np.random.default_rng(seed)
    beta, a = params[:, 0], params[:, 1:4]
    probs = rw3a1b_design(nblocks) if reward_probs is None else np.asarray(reward_probs, dtype=float)
    if outcomes is None and probs.shape != (nblocks, 2, 3):
        raise ValueError(f"reward_probs must be (nblocks, 2, 3) = ({nblocks}, 2, 3), got {probs.shape}")
    if outcomes is not None:
        outcomes = np.asarray(outcomes, dtype=float)
        if outcomes.shape != (nblocks, ntrials, 2, 3):
            raise ValueError(f"outcomes must be (nblocks, ntrials, 2, 3), got {outcomes.shape}")
    choices = np.zeros((S, nblocks, ntrials), dtype=np.int64)
    rewards = np.zeros((3, S, nblocks, ntrials))
    PE = np.zeros((3, S, nblocks, ntrials))
    EV = np.zeros((S, nblocks, ntrials + 1, 2))
    ch_prob = np.zeros((S, nblocks, ntrials, 2))
    idx = np.arange(S)
    for b in range(nblocks):
        v = np.zeros((S, 2))
        for t in range(ntrials):
            EV[:, b, t] = v
            p1 = 1.0 / (1.0 + np.exp(-beta * (v[:, 1] - v[:, 0])))
            ch_prob[:, b, t] = np.stack([1.0 - p1, p1], -1)
            c = (rng.random(S) < p1).astype(np.int64)
            if outcomes is None:
                r = (rng.random((S, 3)) < probs[b][c]).astype(float)  # (S, 3)
            else:
                r = outcomes[b, t][c]
            vc = v[idx, c]
            pe = r - vc[:, None]
            v[idx, c] = vc + (a * pe).sum(1)
            choices[:, b, t] = c
            rewards[:, :, b, t] = r.T
            PE[:, :, b, t] = pe.T
        EV[:, b, ntrials] = v
    return {"params": params.copy(), "choices": choices, "rewards_self": rewards[0], "rewards_other": rewards[1],
            "rewards_noone": rewards[2], "EV": EV, "PE_self": PE[0], "PE_other": PE[1], "PE_noone": PE[2],
            "ch_prob": ch_prob}


def _check_rw4(batch) -> None:
    names = batch.names
    cats = [batch.categories.get(names[j]) for j in (0, 3, 4)]
    if any(c is not None for c in cats) and not cats[0] == cats[1] == cats[2]:
        raise ValueError(
            f"fields {names[0]!r}, {names[3]!r}, {names[4]!r} must share one coding of the four options; got labels "
            f"{dict(zip((names[0], names[3], names[4]), cats))}; give numeric option codes 0-3, or labels coded "
            "together (the model's categorical declaration does this)")
    for j in (0, 3, 4):
        check_categorical(batch, j, 4)
    c, left, right, m = batch.data[0], batch.data[3], batch.data[4], batch.mask
    reject_subject(batch, (left == right) & m, 3, f"offers the same option twice ('{names[4]}' is the same)")
    reject_subject(batch, (c != left) & (c != right) & m, 0,
                   f"is an option that was not offered (not in '{names[3]}' or '{names[4]}')")


@model_spec(param_names=["beta", "alpha_self_pos", "alpha_self_neg", "alpha_other_pos", "alpha_other_neg"],
            param_xform=[norm2beta, norm2alpha, norm2alpha, norm2alpha, norm2alpha],
            inputs=["choices", "outcomes_self", "outcomes_other", "option_left", "option_right"],
            categorical=[("choices", "option_left", "option_right")], responses=["choices"], check_data=_check_rw4)
def rw4a1b_fit(params: torch.Tensor, choices: torch.Tensor, outcomes_self: torch.Tensor,
               outcomes_other: torch.Tensor, option_left: torch.Tensor, option_right: torch.Tensor,
               mask: torch.Tensor | None = None, output: str = "nll"):
    r"""Four options offered in pairs; self and other outcomes with valence-specific learning rates.

    Rhoads et al. (2025)'s task as parameterized in pyEM: four options
    (codes 0-3), one value each, starting at 0 in every block.  Each trial
    offers two of them (``option_left``, ``option_right``) and the subject
    picks one, ``c``; the chosen option delivers an outcome for the self and
    one for another person.  Each outcome has its prediction error against
    the chosen value, weighted by a learning rate that depends on the
    recipient and on the sign of the error:

    .. math::

        P(c_t) = \frac{\exp(\beta V_t(c_t))}{\exp(\beta V_t(\ell_t)) + \exp(\beta V_t(r_t))}, \qquad
        \delta^{k}_t = o^{k}_t - V_t(c_t), \quad k \in \{\mathrm{self}, \mathrm{other}\},

        V_{t+1}(c_t) = V_t(c_t) + \sum_k \big(\alpha_k^{+}[\delta^k_t > 0] + \alpha_k^{-}[\delta^k_t \le 0]\big)\,\delta^k_t .

    Parameters (normalized -> natural): ``beta`` (norm2beta, 0-20),
    ``alpha_self_pos``, ``alpha_self_neg``, ``alpha_other_pos``,
    ``alpha_other_neg`` (norm2alpha, 0-1).

    Data (``columns=`` for a DataFrame, in this order): ``choice`` (the chosen
    option's code 0-3), ``outcome_self``, ``outcome_other`` (real, e.g.
    -1/0/+1), ``option_left``, ``option_right`` (codes 0-3 of the two offered
    options; their order does not matter).  Text labels for the options are
    coded together over the three columns (one coding of the four options).
    With ``block=`` values reset every block.

    Parameters
    ----------
    params : Tensor
        ``(S, 5)`` normalized parameters in the order above.
    choices, outcomes_self, outcomes_other, option_left, option_right : Tensor
        ``(S, B, T)`` or ``(S, T)``.
    mask : Tensor, optional
        Same shape, ``True`` on real trials.
    output : {"nll", "all"}
        ``"nll"``: ``(S,)`` negative log-likelihood.  ``"all"``: dict with
        ``params`` (natural ``(S, 5)``), ``nll``, ``EV`` ``(..., T+1, 4)``,
        ``PE_self``, ``PE_other`` ``(..., T)``, ``ch_prob`` ``(..., T, 4)``
        (zero for the options not offered) and the data.

    References
    ----------
    Rhoads, S. A., et al. (2025); the model as defined by pyEM's ``rw4a1b``
    (one value per option, four learning rates by recipient and valence).
    """
    beta = norm2beta(params[:, 0])
    alphas = norm2alpha(params[:, 1:5])
    mask = default_mask(mask, choices)
    (c, os_, oo, left, right, m), lead = as_blocks(choices, outcomes_self, outcomes_other, option_left,
                                                      option_right, mask)
    S = beta.shape[0]
    n_blocks = c.shape[0] // S
    dtype = beta.dtype
    # padded trials: offer (0, 1) and choose 0, outcomes 0
    c, left, right = (torch.where(m, x, f).long() for x, f in ((c, 0), (left, 0), (right, 1)))
    os_, oo = (fill_padding(x, m, dtype=dtype) for x in (os_, oo))
    mf = m.to(dtype)
    other = left + right - c
    oh_c = F.one_hot(c, 4).to(dtype)  # (N, T, 4)
    oh_o = F.one_hot(other, 4).to(dtype)
    upd = (oh_c * mf[..., None]).unbind(1)
    oh_c_t = oh_c.unbind(1)
    os_t, oo_t = os_.unbind(1), oo.unbind(1)
    b = beta.repeat_interleave(n_blocks)
    sp, sn, op, on = alphas.repeat_interleave(n_blocks, 0).unbind(1)
    v = torch.zeros(c.shape[0], 4, dtype=dtype, device=c.device)
    want_all = output == "all"
    vs = []
    for t in range(c.shape[1]):
        vs.append(v)
        vc = (v * oh_c_t[t]).sum(-1)
        pe_s = os_t[t] - vc
        pe_o = oo_t[t] - vc
        step = torch.where(pe_s > 0, sp, sn) * pe_s + torch.where(pe_o > 0, op, on) * pe_o
        v = v + upd[t] * step[:, None]
    V = torch.stack(vs, 1)  # (N, T, 4): values before each choice
    vch = (V * oh_c).sum(-1)
    logp = F.logsigmoid(b[:, None] * (vch - (V * oh_o).sum(-1)))  # softmax over the offered pair
    nll = -(logp * mf).sum(1).reshape(S, n_blocks).sum(1)
    if not want_all:
        return nll
    shape = lead if choices.dim() == 3 else (S,)
    T = c.shape[1]
    ev = torch.cat([V, v[:, None]], 1)
    p_c = logp.exp()
    ch_prob = (oh_c * p_c[..., None] + oh_o * (1.0 - p_c)[..., None]) * mf[..., None]
    return {
        "params": torch.cat([beta[:, None], alphas], -1),
        "nll": nll,
        "EV": ev.reshape(*shape, T + 1, 4),
        "PE_self": ((os_ - vch) * mf).reshape(*shape, T),
        "PE_other": ((oo - vch) * mf).reshape(*shape, T),
        "ch_prob": ch_prob.reshape(*shape, T, 4),
        "choices": choices, "outcomes_self": outcomes_self, "outcomes_other": outcomes_other,
        "option_left": option_left, "option_right": option_right,
    }


#: Option types of the default rw4a1b design: (self, other) outcome valence of options 0-3.
RW4_OPTION_TYPES = ((+1, +1), (+1, -1), (-1, +1), (-1, -1))
_RW4_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def rw4a1b_simulate(params: np.ndarray, nblocks: int = 12, ntrials: int = 20,
                    outcome_probs: Sequence[float] = (0.75, 0.15, 0.10), seed: int | None = None) -> dict:
    """Simulate :func:`rw4a1b_fit` agents.

    Design: option ``j`` has outcome valences ``RW4_OPTION_TYPES[j]`` for
    (self, other): (+, +), (+, -), (-, +), (-, -).  A channel of valence
    ``+`` pays +1, 0, -1 with ``outcome_probs``; one of valence ``-`` pays
    -1, 0, +1 with the same probabilities.  Each block offers one of the six
    pairs on every trial (each subject runs the six pairs in a fresh random
    order, repeated as needed), left/right order drawn per trial; values reset
    at every block.

    Parameters
    ----------
    params : ndarray
        ``(S, 5)`` *natural* ``[beta, alpha_self_pos, alpha_self_neg, alpha_other_pos, alpha_other_neg]``.
    nblocks, ntrials : int
        Blocks and trials per block (default 12 x 20).
    outcome_probs : 3 floats
        Probabilities of the favoured, neutral (0) and opposite outcome.
    seed : int, optional
        Seed of the random stream.

    Returns
    -------
    dict
        ``params``, ``choices`` (option codes 0-3), ``outcomes_self``,
        ``outcomes_other``, ``option_left``, ``option_right`` (all ``(S, B, T)``),
        ``option_pairs`` ``(S, B, T, 2)`` (left and right together, pyEM's
        name), ``EV`` ``(S, B, T+1, 4)``, ``PE_self``, ``PE_other`` ``(S, B, T)``,
        ``ch_prob`` ``(S, B, T, 4)``.
    """
    params = natural_params(params, rw4a1b_fit.param_names)
    S = params.shape[0]
    rng = np.random.default_rng(seed)
    beta = params[:, 0]
    sp, sn, op, on = params[:, 1], params[:, 2], params[:, 3], params[:, 4]
    probs = np.asarray(outcome_probs, dtype=float)
    valence = np.asarray(RW4_OPTION_TYPES, dtype=float)  # (4, 2)
    pairs = np.asarray(_RW4_PAIRS)
    order = np.concatenate([np.stack([rng.permutation(6) for _ in range(S)]) for _ in range(-(-nblocks // 6))],
                           1)[:, :nblocks]  # (S, B) pair index per block
    out = {k: np.zeros((S, nblocks, ntrials), dtype=np.int64)
           for k in ("choices", "option_left", "option_right")}
    o_self = np.zeros((S, nblocks, ntrials))
    o_other = np.zeros((S, nblocks, ntrials))
    PE_s = np.zeros((S, nblocks, ntrials))
    PE_o = np.zeros((S, nblocks, ntrials))
    EV = np.zeros((S, nblocks, ntrials + 1, 4))
    ch_prob = np.zeros((S, nblocks, ntrials, 4))
    idx = np.arange(S)
    for b in range(nblocks):
        v = np.zeros((S, 4))
        pair = pairs[order[:, b]]  # (S, 2)
        for t in range(ntrials):
            EV[:, b, t] = v
            flip = rng.random(S) < 0.5
            left = np.where(flip, pair[:, 1], pair[:, 0])
            right = np.where(flip, pair[:, 0], pair[:, 1])
            p_left = 1.0 / (1.0 + np.exp(-beta * (v[idx, left] - v[idx, right])))
            ch_prob[idx, b, t, left] = p_left
            ch_prob[idx, b, t, right] = 1.0 - p_left
            c = np.where(rng.random(S) < p_left, left, right)
            # outcome: +valence with probs[0], 0 with probs[1], -valence with probs[2]
            u = rng.random((S, 2))
            sign = np.where(u < probs[0], 1.0, np.where(u < probs[0] + probs[1], 0.0, -1.0))
            outc = sign * valence[c]
            vc = v[idx, c]
            pe_s, pe_o = outc[:, 0] - vc, outc[:, 1] - vc
            v[idx, c] = vc + np.where(pe_s > 0, sp, sn) * pe_s + np.where(pe_o > 0, op, on) * pe_o
            out["choices"][:, b, t], out["option_left"][:, b, t], out["option_right"][:, b, t] = c, left, right
            o_self[:, b, t], o_other[:, b, t] = outc[:, 0], outc[:, 1]
            PE_s[:, b, t], PE_o[:, b, t] = pe_s, pe_o
        EV[:, b, ntrials] = v
    return {"params": params.copy(), "choices": out["choices"], "outcomes_self": o_self, "outcomes_other": o_other,
            "option_left": out["option_left"], "option_right": out["option_right"],
            "option_pairs": np.stack([out["option_left"], out["option_right"]], -1), "EV": EV,
            "PE_self": PE_s, "PE_other": PE_o, "ch_prob": ch_prob}


rw3a1b_fit.simulate = rw3a1b_simulate
rw4a1b_fit.simulate = rw4a1b_simulate
