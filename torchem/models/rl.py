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
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..model import check_categorical, model_spec
from ..transforms import norm2alpha, norm2beta

__all__ = ["rw1a1b_fit", "rw1a1b_simulate", "rw2a1b_fit", "rw2a1b_simulate"]


def _check_bandit(batch) -> None:
    check_categorical(batch, 0, 2)


def _as_blocks(*tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    """Reshape ``(S, T)`` or ``(S, B, T)`` tensors to ``(S*B, T)``; return the original leading shape."""
    lead = tuple(tensors[0].shape[:-1]) if tensors[0].dim() == 3 else (tensors[0].shape[0], 1)
    T = tensors[0].shape[-1]
    return tuple(t.reshape(-1, T) for t in tensors), lead


def _rw_bandit(beta: torch.Tensor, alpha_pos: torch.Tensor, alpha_neg: torch.Tensor | None,
               choices: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None, output: str):
    """Shared Rescorla-Wagner recursion; ``alpha_neg=None`` means one learning rate.

    ``beta``, ``alpha_*``: ``(S,)``.  Data ``(S, T)`` or ``(S, B, T)``.
    """
    if mask is None:
        mask = torch.ones(choices.shape, dtype=torch.bool, device=choices.device)
    (c, r, m), lead = _as_blocks(choices, rewards, mask)
    S = beta.shape[0]
    n_blocks = c.shape[0] // S
    dtype = beta.dtype
    c = torch.where(m, c, 0).to(dtype)  # padded trials hold anything (even NaN): zero them once
    r = torch.where(m, r, 0).to(dtype)
    m = m.to(dtype)
    b = beta.repeat_interleave(n_blocks)
    ap = alpha_pos.repeat_interleave(n_blocks)
    an = None if alpha_neg is None else alpha_neg.repeat_interleave(n_blocks)
    # per-trial constants, computed once over all trials: fewer, larger operations
    sign_beta = (b[:, None] * (2.0 * c - 1.0)).unbind(1)  # beta times +1 (chose B) / -1 (chose A)
    to0, to1 = ((1.0 - c) * m).unbind(1), (c * m).unbind(1)  # where an update lands
    cs, rs = c.unbind(1), r.unbind(1)
    v0 = torch.full_like(b, 0.5)
    v1 = torch.full_like(b, 0.5)
    want_all = output == "all"
    logp, ev, pe_all = [], [], []
    for t in range(c.shape[1]):
        dv = v1 - v0
        logp.append(F.logsigmoid(sign_beta[t] * dv))  # log P(chosen) = logsigmoid(beta (V_chosen - V_other))
        pe = rs[t] - (v0 + cs[t] * dv)
        step = (ap if an is None else torch.where(pe > 0, ap, an)) * pe
        if want_all:
            ev.append(torch.stack([v0, v1], -1))
            pe_all.append(pe)
        v0 = v0 + step * to0[t]
        v1 = v1 + step * to1[t]
    nll = -(torch.stack(logp, 1) * m).sum(1).reshape(S, n_blocks).sum(1)
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
            inputs=["choices", "rewards"], check_data=_check_bandit)
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
            inputs=["choices", "rewards"], check_data=_check_bandit)
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
    params = np.asarray(params, dtype=float)
    if params.ndim != 2 or params.shape[1] != 1 + n_lr:
        raise ValueError(f"params must be (subjects, {1 + n_lr}) natural values, got shape {params.shape}")
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
