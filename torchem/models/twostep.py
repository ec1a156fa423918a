r"""Model-free, model-based and hybrid learners of the two-step task (Daw et al., 2011).

Task
----
On each trial the subject chooses one of two first-stage actions
``a1`` (0/1).  Action ``a`` leads to second-stage state ``s = a`` with
probability 0.7 (common transition) and to ``s = 1 - a`` with 0.3 (rare).
In the second-stage state the subject chooses one of two actions ``a2``
(0/1) and is rewarded (``r`` = 1) with a probability that drifts slowly and
independently for each of the four (state, action) pairs: a Gaussian random
walk with standard deviation 0.025 per trial, reflected at 0.25 and 0.75.

Model (Daw et al. 2011, supplemental procedures)
------------------------------------------------
Values start at 0: model-free first-stage values :math:`Q_{MF}(a)` and
second-stage values :math:`Q_2(s, a)`.  On trial ``t``:

.. math::

    Q_{MB}(a) &= 0.7 \max_{a'} Q_2(a, a') + 0.3 \max_{a'} Q_2(1 - a, a')
        \quad \text{(known transition structure, exact max)} \\
    Q_{net}(a) &= \omega\, Q_{MB}(a) + (1 - \omega)\, Q_{MF}(a) \\
    P(a_1 = a) &\propto \exp\big(\beta_1 Q_{net}(a) + \mathit{rep}\,[a = a_1^{prev}]\big) \\
    P(a_2 = a \mid s) &\propto \exp\big(\beta_2 Q_2(s, a)\big)

and after the reward, with both prediction errors computed from the values
*before* this trial's updates,

.. math::

    \delta_1 &= Q_2(s, a_2) - Q_{MF}(a_1), \qquad \delta_2 = r - Q_2(s, a_2) \\
    Q_{MF}(a_1) &\leftarrow Q_{MF}(a_1) + \alpha_1 \delta_1 + \lambda\, \alpha_1 \delta_2 \\
    Q_2(s, a_2) &\leftarrow Q_2(s, a_2) + \alpha_2 \delta_2 .

That is SARSA(:math:`\lambda`) with an eligibility trace that carries the
second-stage reward prediction error back to the first-stage action,
scaled by the first-stage learning rate (Daw et al. 2011, eq. S1-S3).
:math:`a_1^{prev}` is the first-stage choice of the previous real trial of
the same block; on the first trial of a block no action gets the bonus.
The first trial's choice probabilities are 1/2 at both stages.

The three models are one implementation:

* :func:`hybrid_mbmf_fit`: ``beta1, beta2, alpha1, alpha2, lambda, omega, rep``;
* :func:`model_based_fit`: omega fixed at 1, so ``alpha1`` and ``lambda``
  leave the likelihood and the model: ``beta1, beta2, alpha2, rep``;
* :func:`sarsa_lambda_fit`: omega fixed at 0: ``beta1, beta2, alpha1, alpha2, lambda, rep``.

Transforms (normalized -> natural): ``beta1``, ``beta2`` through
``norm2exp`` (0, inf); ``alpha1``, ``alpha2``, ``lambda``, ``omega`` through
``norm2alpha`` (0, 1); ``rep`` unbounded (``identity``).

Data (``columns=`` for a DataFrame, in this order): ``choice1`` (0/1),
``state2`` (0/1; state ``s`` is the one commonly reached by action ``s``),
``choice2`` (0/1), ``reward`` (real, usually 0/1).  Shapes ``(S, T)`` (one
session) or ``(S, B, T)``; with blocks the values and the perseveration
reset at every block.

Reference: Daw, N. D., Gershman, S. J., Seymour, B., Dayan, P., & Dolan,
R. J. (2011). Model-based influences on humans' choices and striatal
prediction errors. *Neuron*, 69(6), 1204-1215.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..model import check_categorical, model_spec, natural_params
from ..transforms import identity, norm2alpha, norm2exp
from .common import as_blocks, default_mask, fill_padding
from .recurrence import linear_scan

__all__ = ["hybrid_mbmf_fit", "hybrid_mbmf_simulate", "model_based_fit", "model_based_simulate",
           "sarsa_lambda_fit", "sarsa_lambda_simulate", "reward_walks", "P_COMMON"]

#: Probability of the common transition (action ``a`` -> state ``a``).
P_COMMON = 0.7
_WALK_LO, _WALK_HI, _WALK_SD = 0.25, 0.75, 0.025
_INPUTS = ["choices1", "states2", "choices2", "rewards"]
# a second-stage state is named by the first-stage action that commonly leads to it, so the two share one coding
_CATEGORICAL = [("choices1", "states2"), "choices2"]
# a missed choice at either stage skips the whole trial (no choice terms, no updates, no perseveration)
_RESPONSES = ["choices1", "choices2"]
# z = [Q_MF(0), Q_MF(1), Q2(0,0), Q2(0,1), Q2(1,0), Q2(1,1)] -> [Q_MF(1) - Q_MF(0),
#   (Q2(1,0) + Q2(1,1) - Q2(0,0) - Q2(0,1)) / 2, Q2(0,0) - Q2(0,1), Q2(1,0) - Q2(1,1)]
_FEATURES = torch.tensor([[-1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, -0.5, 1.0, 0.0],
                          [0.0, -0.5, -1.0, 0.0], [0.0, 0.5, 0.0, 1.0], [0.0, 0.5, 0.0, -1.0]], dtype=torch.float64)


def _check_twostep(batch) -> None:
    for j in range(3):
        check_categorical(batch, j, 2)


def _previous_choice(sign1: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``(N, T)``: the previous real trial's first-stage choice as +1 / -1, 0 where there is none (data only)."""
    N, T = sign1.shape
    pos = torch.where(m, torch.arange(T, device=m.device).expand(N, T), -1)
    last = pos.cummax(1).values  # last real trial at or before t
    before = torch.cat([torch.full((N, 1), -1, dtype=last.dtype, device=m.device), last[:, :-1]], 1)
    return torch.where(before >= 0, sign1.gather(1, before.clamp(min=0)), 0.0)


def _twostep(beta1, beta2, alpha1, alpha2, lam, omega, rep, choices1, states2, choices2, rewards, mask, output):
    """The shared likelihood.  Natural parameters are ``(S,)`` tensors; ``omega`` is a tensor or the
    float 1.0 (model-based: ``alpha1``/``lam`` are ``None``) or 0.0 (model-free).

    Given the data, every value follows a linear recurrence over the trials that visit it, so the
    values ``z = [Q_MF(0), Q_MF(1), Q2(0,0), Q2(0,1), Q2(1,0), Q2(1,1)]`` before every trial come from
    two scans (:func:`~torchem.models.recurrence.linear_scan`: second stage first, then the first
    stage, whose target involves the second-stage values); the choice rule (with its ``max``) is
    evaluated for all trials at once afterwards.
    """
    mask = default_mask(mask, choices1)
    (c1, s2, c2, r, m), lead = as_blocks(choices1, states2, choices2, rewards, mask)
    S = beta1.shape[0]
    nb = c1.shape[0] // S
    dtype = beta1.dtype
    dev = c1.device
    # padded trials hold anything (even NaN): replace them once, and keep them out of every update
    c1, s2, c2 = (torch.where(m, x, 0).long() for x in (c1, s2, c2))
    r = fill_padding(r, m, dtype=dtype)
    mf = m.to(dtype)
    N, T = c1.shape
    c1f, s2f, c2f = c1.to(dtype), s2.to(dtype), c2.to(dtype)
    sign1, sign2 = 2.0 * c1f - 1.0, 2.0 * c2f - 1.0
    h = F.one_hot(c1, 6).to(dtype)  # selects Q_MF(a1) in z
    g = F.one_hot(2 + 2 * s2 + c2, 6).to(dtype)  # selects Q2(s, a2) in z

    def per_block(x):
        return x.repeat_interleave(nb) if isinstance(x, torch.Tensor) else x

    b1, b2, a2, om, rp = (per_block(x) for x in (beta1, beta2, alpha2, omega, rep))
    a1 = None if alpha1 is None else per_block(alpha1)
    lm = None if lam is None else per_block(lam)
    # Q2(s, a) moves only on the trials that visit (s, a): Q2 <- (1 - alpha2) Q2 + alpha2 r.  Given those
    # values, Q_MF(a1) <- (1 - alpha1) Q_MF(a1) + alpha1 ((1 - lambda) Q2(s, a2) + lambda r).  Both are
    # linear recurrences y_t = a_t y_{t-1} + b_t per value, solved for all trials at once by a scan.
    v2 = (g[..., 2:] * mf[..., None]).transpose(1, 2)  # (N, 4, T): trial t visits (s, a)
    q2 = linear_scan(1.0 - a2[:, None, None] * v2, (a2[:, None] * r)[:, None, :] * v2)  # (N, 4, T)
    if alpha1 is None:  # model-based: the model-free values never enter
        q_mf = torch.zeros_like(q2[:, :2])
    else:
        q2c = (q2 * g[..., 2:].transpose(1, 2)).sum(1)  # Q2(s_t, a2_t) before trial t
        target = (1.0 - lm)[:, None] * q2c + lm[:, None] * r
        v1 = (h[..., :2] * mf[..., None]).transpose(1, 2)  # (N, 2, T)
        q_mf = linear_scan(1.0 - a1[:, None, None] * v1, (a1[:, None] * target)[:, None, :] * v1)
    Z = torch.cat([q_mf, q2], 1).transpose(1, 2)  # (N, T, 6): values before each trial's choice
    # choice rule for all trials at once, from four linear features of the values:
    # Q_MF(1) - Q_MF(0); max(a, b) = (a + b) / 2 + |a - b| / 2 gives the best value of each state
    feats = (Z @ _FEATURES.to(dtype=dtype, device=dev)).unbind(-1)
    d_mf, half_sum, diff0, diff1 = feats  # diff_s = Q2(s, 0) - Q2(s, 1)
    logit1 = rp[:, None] * _previous_choice(sign1, m)
    if not (isinstance(om, float) and om == 0.0):  # model-based part: max Q2(1, .) - max Q2(0, .)
        d_mb = half_sum + 0.5 * (diff1.abs() - diff0.abs())
        w_mb = b1 if isinstance(om, float) else b1 * om
        logit1 = logit1 + (w_mb * (2.0 * P_COMMON - 1.0))[:, None] * d_mb
    if not (isinstance(om, float) and om == 1.0):  # model-free part
        w_mf = b1 if isinstance(om, float) else b1 * (1.0 - om)
        logit1 = logit1 + w_mf[:, None] * d_mf
    logit2 = b2[:, None] * (s2f * (diff0 - diff1) - diff0)  # beta2 (Q2(s, 1) - Q2(s, 0))
    lp1 = F.logsigmoid(sign1 * logit1)
    lp2 = F.logsigmoid(sign2 * logit2)
    nll = -((lp1 + lp2) * mf).sum(1).reshape(S, nb).sum(1)
    if output != "all":
        return nll
    shape = lead if choices1.dim() == 3 else (S,)
    p1 = torch.sigmoid(logit1)  # P(a1 = 1)
    p2 = torch.sigmoid(logit2)
    v = torch.maximum(Z[..., 2::2], Z[..., 3::2])
    q_mb = torch.stack([P_COMMON * v[..., 0] + (1 - P_COMMON) * v[..., 1],
                        (1 - P_COMMON) * v[..., 0] + P_COMMON * v[..., 1]], -1)
    q2c = (Z * g).sum(-1)
    return {
        "nll": nll,
        "ch_prob1": torch.stack([1.0 - p1, p1], -1).reshape(*shape, T, 2),
        "ch_prob2": torch.stack([1.0 - p2, p2], -1).reshape(*shape, T, 2),
        "Q_MF": Z[..., :2].reshape(*shape, T, 2),
        "Q_MB": q_mb.reshape(*shape, T, 2),
        "Q2": Z[..., 2:].reshape(*shape, T, 2, 2),
        "PE1": ((q2c - (Z * h).sum(-1)) * mf).reshape(*shape, T),
        "PE2": ((r - q2c) * mf).reshape(*shape, T),
        "choices1": choices1, "states2": states2, "choices2": choices2, "rewards": rewards,
    }


_OUTPUT_DOC = """output : {"nll", "all"}
        ``"nll"``: ``(S,)`` negative log-likelihood.  ``"all"``: dict with
        ``params`` (natural), ``nll``, ``ch_prob1``, ``ch_prob2`` ``(..., T, 2)``,
        ``Q_MF``, ``Q_MB`` ``(..., T, 2)`` and ``Q2`` ``(..., T, 2, 2)``
        (``[state, action]``) before each trial's choice, ``PE1``, ``PE2``
        ``(..., T)`` (zero on padded trials) and the data."""


@model_spec(param_names=["beta1", "beta2", "alpha1", "alpha2", "lambda", "omega", "rep"],
            param_xform=[norm2exp, norm2exp, norm2alpha, norm2alpha, norm2alpha, norm2alpha, identity],
            inputs=_INPUTS, categorical=_CATEGORICAL, responses=_RESPONSES,
            check_data=_check_twostep)
def hybrid_mbmf_fit(params: torch.Tensor, choices1: torch.Tensor, states2: torch.Tensor, choices2: torch.Tensor,
                    rewards: torch.Tensor, mask: torch.Tensor | None = None, output: str = "nll"):
    r"""Hybrid model-based / model-free learner of the two-step task (Daw et al. 2011).

    First-stage net value :math:`\omega Q_{MB} + (1 - \omega) Q_{MF}` with
    SARSA(:math:`\lambda`) model-free values, perseveration ``rep``, separate
    inverse temperatures per stage; equations in :mod:`torchem.models.twostep`.

    Parameters (normalized -> natural): ``beta1``, ``beta2`` (norm2exp, 0-inf),
    ``alpha1``, ``alpha2``, ``lambda``, ``omega`` (norm2alpha, 0-1), ``rep``
    (identity, unbounded).

    Data columns: ``choice1``, ``state2``, ``choice2``, ``reward``.

    Parameters
    ----------
    params : Tensor
        ``(S, 7)`` normalized ``[beta1, beta2, alpha1, alpha2, lambda, omega, rep]``.
    choices1, states2, choices2, rewards : Tensor
        ``(S, T)`` or ``(S, B, T)``; codes 0/1 and real rewards.
    mask : Tensor, optional
        Same shape, ``True`` on real trials.
    {output}

    References
    ----------
    Daw, N. D., Gershman, S. J., Seymour, B., Dayan, P., & Dolan, R. J. (2011).
    Model-based influences on humans' choices and striatal prediction errors.
    *Neuron*, 69(6), 1204-1215.
    """
    b1, b2 = norm2exp(params[:, 0]), norm2exp(params[:, 1])
    a1, a2, lam, om = (norm2alpha(params[:, j]) for j in (2, 3, 4, 5))
    rep = params[:, 6]
    out = _twostep(b1, b2, a1, a2, lam, om, rep, choices1, states2, choices2, rewards, mask, output)
    if output == "all":
        out["params"] = torch.stack([b1, b2, a1, a2, lam, om, rep], -1)
    return out


@model_spec(param_names=["beta1", "beta2", "alpha2", "rep"],
            param_xform=[norm2exp, norm2exp, norm2alpha, identity], inputs=_INPUTS, categorical=_CATEGORICAL, responses=_RESPONSES,
            check_data=_check_twostep)
def model_based_fit(params: torch.Tensor, choices1: torch.Tensor, states2: torch.Tensor, choices2: torch.Tensor,
                    rewards: torch.Tensor, mask: torch.Tensor | None = None, output: str = "nll"):
    r"""Purely model-based learner of the two-step task: :func:`hybrid_mbmf_fit` with omega = 1.

    First-stage values are :math:`Q_{MB}` only, so the model-free learning
    rate ``alpha1`` and trace ``lambda`` do not enter and are not parameters.

    Parameters (normalized -> natural): ``beta1``, ``beta2`` (norm2exp),
    ``alpha2`` (norm2alpha), ``rep`` (identity).  Data columns: ``choice1``,
    ``state2``, ``choice2``, ``reward``.

    Parameters
    ----------
    params : Tensor
        ``(S, 4)`` normalized ``[beta1, beta2, alpha2, rep]``.
    choices1, states2, choices2, rewards, mask
        As in :func:`hybrid_mbmf_fit`.
    {output}

    References
    ----------
    Daw et al. (2011), *Neuron*, 69(6), 1204-1215.
    """
    b1, b2, a2, rep = norm2exp(params[:, 0]), norm2exp(params[:, 1]), norm2alpha(params[:, 2]), params[:, 3]
    out = _twostep(b1, b2, None, a2, None, 1.0, rep, choices1, states2, choices2, rewards, mask, output)
    if output == "all":
        out["params"] = torch.stack([b1, b2, a2, rep], -1)
    return out


@model_spec(param_names=["beta1", "beta2", "alpha1", "alpha2", "lambda", "rep"],
            param_xform=[norm2exp, norm2exp, norm2alpha, norm2alpha, norm2alpha, identity], inputs=_INPUTS,
            categorical=_CATEGORICAL, responses=_RESPONSES, check_data=_check_twostep)
def sarsa_lambda_fit(params: torch.Tensor, choices1: torch.Tensor, states2: torch.Tensor, choices2: torch.Tensor,
                     rewards: torch.Tensor, mask: torch.Tensor | None = None, output: str = "nll"):
    r"""Purely model-free SARSA(lambda) learner of the two-step task: :func:`hybrid_mbmf_fit` with omega = 0.

    Parameters (normalized -> natural): ``beta1``, ``beta2`` (norm2exp),
    ``alpha1``, ``alpha2``, ``lambda`` (norm2alpha), ``rep`` (identity).
    Data columns: ``choice1``, ``state2``, ``choice2``, ``reward``.

    Parameters
    ----------
    params : Tensor
        ``(S, 6)`` normalized ``[beta1, beta2, alpha1, alpha2, lambda, rep]``.
    choices1, states2, choices2, rewards, mask
        As in :func:`hybrid_mbmf_fit`.
    {output}

    References
    ----------
    Daw et al. (2011), *Neuron*, 69(6), 1204-1215.
    """
    b1, b2 = norm2exp(params[:, 0]), norm2exp(params[:, 1])
    a1, a2, lam = (norm2alpha(params[:, j]) for j in (2, 3, 4))
    rep = params[:, 5]
    out = _twostep(b1, b2, a1, a2, lam, 0.0, rep, choices1, states2, choices2, rewards, mask, output)
    if output == "all":
        out["params"] = torch.stack([b1, b2, a1, a2, lam, rep], -1)
    return out


for _f in (hybrid_mbmf_fit, model_based_fit, sarsa_lambda_fit):
    _f.__doc__ = _f.__doc__.replace("{output}", _OUTPUT_DOC)


# ------------------------------------------------------------------------------------------- simulation
def reward_walks(nsubjects: int, ntrials: int, rng: np.random.Generator) -> np.ndarray:
    """Reward probabilities ``(S, T, 2 states, 2 actions)``: independent Gaussian random walks.

    Each walk starts uniformly in [0.25, 0.75] and moves by N(0, 0.025^2) per
    trial, reflected at 0.25 and 0.75 (and clipped there for safety).
    """
    p = rng.uniform(_WALK_LO, _WALK_HI, size=(nsubjects, 2, 2))
    out = np.empty((nsubjects, ntrials, 2, 2))
    for t in range(ntrials):
        out[:, t] = p
        p = p + _WALK_SD * rng.standard_normal(p.shape)
        p = np.where(p > _WALK_HI, 2 * _WALK_HI - p, p)
        p = np.where(p < _WALK_LO, 2 * _WALK_LO - p, p)
        p = np.clip(p, _WALK_LO, _WALK_HI)
    return out


def _simulate(b1, b2, a1, a2, lam, om, rep, ntrials, reward_probs, seed) -> dict:
    S = b1.shape[0]
    rng = np.random.default_rng(seed)
    if reward_probs is None:
        probs = reward_walks(S, ntrials, rng)
    else:
        probs = np.broadcast_to(np.asarray(reward_probs, dtype=float), (S, ntrials, 2, 2))
    idx = np.arange(S)
    q1 = np.zeros((S, 2))
    q2 = np.zeros((S, 2, 2))
    prev = np.zeros(S)  # +1 / -1 / 0 as in the likelihood
    out = {k: np.zeros((S, ntrials), dtype=np.int64) for k in ("choices1", "states2", "choices2")}
    rewards = np.zeros((S, ntrials))
    ch1 = np.zeros((S, ntrials, 2))
    ch2 = np.zeros((S, ntrials, 2))
    for t in range(ntrials):
        v = q2.max(-1)
        dnet = om * (2 * P_COMMON - 1) * (v[:, 1] - v[:, 0]) + (1 - om) * (q1[:, 1] - q1[:, 0])
        p1 = 1.0 / (1.0 + np.exp(-(b1 * dnet + rep * prev)))
        c1 = (rng.random(S) < p1).astype(np.int64)
        s2 = np.where(rng.random(S) < P_COMMON, c1, 1 - c1)
        d2 = q2[idx, s2, 1] - q2[idx, s2, 0]
        p2 = 1.0 / (1.0 + np.exp(-b2 * d2))
        c2 = (rng.random(S) < p2).astype(np.int64)
        r = (rng.random(S) < probs[idx, t, s2, c2]).astype(float)
        q2c = q2[idx, s2, c2]
        de1, de2 = q2c - q1[idx, c1], r - q2c
        q1[idx, c1] += a1 * (de1 + lam * de2)
        q2[idx, s2, c2] += a2 * de2
        prev = 2.0 * c1 - 1.0
        out["choices1"][:, t], out["states2"][:, t], out["choices2"][:, t], rewards[:, t] = c1, s2, c2, r
        ch1[:, t] = np.stack([1 - p1, p1], -1)
        ch2[:, t] = np.stack([1 - p2, p2], -1)
    return {**out, "rewards": rewards, "ch_prob1": ch1, "ch_prob2": ch2, "reward_probs": np.array(probs)}


_SIM_DOC = """ntrials : int
        Trials per subject (default 200), one session ``(S, T)``.
    reward_probs : ndarray, optional
        ``(T, 2, 2)`` or ``(S, T, 2, 2)`` reward probabilities per
        ``[trial, state, action]``; default a fresh set of drifting random
        walks per subject (:func:`reward_walks`).
    seed : int, optional
        Seed of the random stream.

    Returns
    -------
    dict
        ``params``, ``choices1``, ``states2``, ``choices2`` ``(S, T)`` int,
        ``rewards`` ``(S, T)`` 0/1, ``ch_prob1``, ``ch_prob2`` ``(S, T, 2)``,
        ``reward_probs`` ``(S, T, 2, 2)``."""


def hybrid_mbmf_simulate(params: np.ndarray, ntrials: int = 200, reward_probs: np.ndarray | None = None,
                         seed: int | None = None) -> dict:
    """Simulate :func:`hybrid_mbmf_fit` agents on the two-step task.

    Parameters
    ----------
    params : ndarray
        ``(S, 7)`` *natural* ``[beta1, beta2, alpha1, alpha2, lambda, omega, rep]``.
    {sim}
    """
    p = natural_params(params, hybrid_mbmf_fit.param_names)
    return {"params": p.copy(), **_simulate(*p.T, ntrials, reward_probs, seed)}


def model_based_simulate(params: np.ndarray, ntrials: int = 200, reward_probs: np.ndarray | None = None,
                         seed: int | None = None) -> dict:
    """Simulate :func:`model_based_fit` agents (omega = 1).

    Parameters
    ----------
    params : ndarray
        ``(S, 4)`` *natural* ``[beta1, beta2, alpha2, rep]``.
    {sim}
    """
    p = natural_params(params, model_based_fit.param_names)
    z = np.zeros(len(p))
    return {"params": p.copy(), **_simulate(p[:, 0], p[:, 1], z, p[:, 2], z, 1.0, p[:, 3], ntrials,
                                            reward_probs, seed)}


def sarsa_lambda_simulate(params: np.ndarray, ntrials: int = 200, reward_probs: np.ndarray | None = None,
                          seed: int | None = None) -> dict:
    """Simulate :func:`sarsa_lambda_fit` agents (omega = 0).

    Parameters
    ----------
    params : ndarray
        ``(S, 6)`` *natural* ``[beta1, beta2, alpha1, alpha2, lambda, rep]``.
    {sim}
    """
    p = natural_params(params, sarsa_lambda_fit.param_names)
    return {"params": p.copy(), **_simulate(p[:, 0], p[:, 1], p[:, 2], p[:, 3], p[:, 4], 0.0, p[:, 5], ntrials,
                                            reward_probs, seed)}


for _f in (hybrid_mbmf_simulate, model_based_simulate, sarsa_lambda_simulate):
    _f.__doc__ = _f.__doc__.replace("{sim}", _SIM_DOC)

hybrid_mbmf_fit.simulate = hybrid_mbmf_simulate
model_based_fit.simulate = model_based_simulate
sarsa_lambda_fit.simulate = sarsa_lambda_simulate
