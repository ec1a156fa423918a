r"""Bayesian belief updating: the pond/fish task.

Task: three ponds, each dominated by fish of one of three colours (pond
``k`` holds mostly colour ``k``).  In each block fish are drawn from one
unknown pond; on every trial one fish appears and the subject reports the
pond they believe it came from.  There is no feedback.

Model: the observer keeps a posterior over ponds, starting from a uniform
prior at the start of every block, and updates it with a likelihood in which
the displayed colour matches a pond's colour with probability
:math:`\lambda_1` and each other colour with :math:`(1 - \lambda_1)/2`.  The
report is a sample from the posterior *after* seeing the trial's fish:

.. math::

    p_t(k) \propto p_{t-1}(k)\, L(f_t \mid k), \quad
    L(f \mid k) = \lambda_1 [f = k] + \tfrac{1 - \lambda_1}{2} [f \ne k], \quad
    p_0(k) = \tfrac13, \qquad P(c_t = k) = p_t(k).

Equivalently, with :math:`n_k(t)` the number of colour-``k`` fish seen so far
in the block (trial ``t`` included),
:math:`\log p_t(k) = n_k(t) \log\frac{2\lambda_1}{1-\lambda_1} - \mathrm{logsumexp}`,
which is how it is computed (a cumulative sum, no loop over trials).  With
:math:`\lambda_1 < 1/3` the observer believes a colour points *away* from its
pond; at :math:`\lambda_1 = 1/3` fish carry no information.

Parameter (normalized -> natural): ``lambda1`` (norm2alpha, 0-1).

Data (``columns=`` for a DataFrame, in this order): ``choice`` (reported
pond, 0/1/2) and ``observation`` (the fish's colour, 0/1/2); ``block=``
restarts the prior.  Reference: pyEM's fish-task belief model (after the
"beads"/urn tasks, e.g. Huq, Garety & Hemsley 1988; Moutoussis et al. 2011).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..model import check_categorical, model_spec, natural_params
from ..transforms import norm2alpha
from .common import default_mask

__all__ = ["bayes_fit", "bayes_simulate", "N_PONDS"]

#: Number of ponds and of fish colours.
N_PONDS = 3


def _check_fish(batch) -> None:
    check_categorical(batch, 0, N_PONDS)
    check_categorical(batch, 1, N_PONDS)


@model_spec(param_names=["lambda1"], param_xform=[norm2alpha], inputs=["choices", "observations"],
            categorical=[("choices", "observations")], check_data=_check_fish)
def bayes_fit(params: torch.Tensor, choices: torch.Tensor, observations: torch.Tensor,
              mask: torch.Tensor | None = None, output: str = "nll"):
    r"""Pond/fish belief updating with one likelihood parameter ``lambda1`` (see the module docstring).

    Parameters
    ----------
    params : Tensor
        ``(S, 1)`` normalized ``lambda1`` (``norm2alpha``: natural in (0, 1)).
    choices : Tensor
        ``(S, B, T)`` or ``(S, T)`` reported ponds 0-2.
    observations : Tensor
        Same shape, fish colours 0-2.
    mask : Tensor, optional
        Same shape, ``True`` on real trials (padded trials add no evidence).
    output : {"nll", "all"}
        ``"nll"``: ``(S,)`` negative log-likelihood.  ``"all"``: dict with
        ``params`` ``(S, 1)``, ``nll``, ``posterior`` ``(..., T+1, 3)`` (the
        uniform prior first), ``ch_prob`` ``(..., T, 3)`` (the posterior the
        report is drawn from) and the data.

    References
    ----------
    pyEM's ``bayes`` fish-task model; Huq, S. F., Garety, P. A., & Hemsley,
    D. R. (1988). Probabilistic judgements in deluded and non-deluded
    subjects. *Q J Exp Psychol A*, 40(4), 801-812.
    """
    x = params[:, 0]
    lam = norm2alpha(x)
    mask = default_mask(mask, choices)
    dtype = params.dtype
    c = torch.where(mask, choices, 0).long()
    f = torch.where(mask, observations, 0).long()
    mf = mask.to(dtype)
    # evidence counts per colour up to and including each trial; padded trials add nothing
    counts = (torch.nn.functional.one_hot(f, N_PONDS).to(dtype) * mf[..., None]).cumsum(-2)
    # log-likelihood ratio of a matching colour: log(lambda / ((1 - lambda) / 2)) = logit(lambda) + log 2
    llr = x + math.log(2.0)
    shape = (-1,) + (1,) * (counts.dim() - 1)
    logpost = torch.log_softmax(counts * llr.reshape(shape), -1)
    logp = logpost.gather(-1, c[..., None]).squeeze(-1)
    nll = -(logp * mf).flatten(1).sum(1)
    if output != "all":
        return nll
    post = logpost.exp()
    prior = torch.full_like(post[..., :1, :], 1.0 / N_PONDS)
    return {"params": lam[:, None], "nll": nll, "posterior": torch.cat([prior, post], -2), "ch_prob": post,
            "choices": choices, "observations": observations}


def bayes_simulate(params: np.ndarray, nblocks: int = 10, ntrials: int = 15, pond_prob: float = 0.8,
                   seed: int | None = None, n_fish: int = N_PONDS) -> dict:
    """Simulate :func:`bayes_fit` observers.

    Parameters
    ----------
    params : ndarray
        ``(S, 1)`` *natural* ``lambda1``.
    nblocks, ntrials : int
        Blocks (one pond each; ponds balanced across blocks in random order
        per subject) and fish per block (default 10 x 15, as pyEM).
    pond_prob : float
        Share of a pond's own colour (the others ``(1 - pond_prob) / 2`` each);
        the task's true fish distribution, independent of the observer's ``lambda1``.
    seed : int, optional
        Seed of the random stream.
    n_fish : int
        pyEM's number of fish colours (and ponds); the task has 3, and other
        values raise ``ValueError`` (pyEM's own pond compositions are 3 x 3 too).

    Returns
    -------
    dict
        ``params`` ``(S, 1)``, ``choices`` and ``observations`` ``(S, B, T)``
        int, ``ponds`` ``(S, B, T)`` (the true pond), ``posterior``
        ``(S, B, T+1, 3)`` (also under pyEM's name ``probabilities``),
        ``ch_prob`` ``(S, B, T, 3)``.
    """
    if n_fish != N_PONDS:
        raise ValueError(f"n_fish must be {N_PONDS}: the fish task has {N_PONDS} ponds and {N_PONDS} colours, "
                         f"got {n_fish!r}")
    params = natural_params(params, bayes_fit.param_names)
    S = params.shape[0]
    rng = np.random.default_rng(seed)
    lam = params[:, 0]
    base = np.tile(np.arange(N_PONDS), nblocks // N_PONDS + 1)[:nblocks]
    ponds_b = np.stack([rng.permutation(base) for _ in range(S)])  # (S, B)
    ponds = np.repeat(ponds_b[:, :, None], ntrials, 2)
    # colour = pond with pond_prob, else one of the two others at random
    same = rng.random((S, nblocks, ntrials)) < pond_prob
    shift = rng.integers(1, N_PONDS, size=(S, nblocks, ntrials))
    obs = np.where(same, ponds, (ponds + shift) % N_PONDS)
    post = np.zeros((S, nblocks, ntrials + 1, N_PONDS))
    choices = np.zeros((S, nblocks, ntrials), dtype=np.int64)
    like = np.where(np.eye(N_PONDS, dtype=bool)[None], lam[:, None, None],
                    ((1.0 - lam) / 2.0)[:, None, None])  # (S, colour, pond)
    idx = np.arange(S)
    for b in range(nblocks):
        p = np.full((S, N_PONDS), 1.0 / N_PONDS)
        post[:, b, 0] = p
        for t in range(ntrials):
            p = p * like[idx, obs[:, b, t]]
            p = p / p.sum(1, keepdims=True)
            post[:, b, t + 1] = p
            u = rng.random(S)[:, None]
            choices[:, b, t] = np.minimum((u > np.cumsum(p, 1)).sum(1), N_PONDS - 1)
    return {"params": params.copy(), "choices": choices, "observations": obs.astype(np.int64), "ponds": ponds,
            "posterior": post, "probabilities": post, "ch_prob": post[:, :, 1:]}


bayes_fit.simulate = bayes_simulate
