"""The worked example of ``docs/migrating_from_pyem.md``: one Rescorla-Wagner model in three forms.

1. :func:`rw_fit_numpy` -- written for pyEM: numpy, one subject, a loop over
   blocks and trials, bounds checks that return a penalty, ``calc_fval``.
   Only its imports changed (``pyem`` -> ``torchem``).  It still works as a
   numpy function (e.g. with scipy), but ``EMModel`` refuses it: autograd
   cannot differentiate numpy.
2. :func:`rw_fit_torch` -- the same model with torch operations and pyEM's
   signature: ``EMModel`` detects the signature, batches it over subjects
   with ``torch.func.vmap`` and gets exact gradients and Hessians.
3. :func:`rw_fit_batched` -- torchem's own contract: all subjects at once
   (``params`` ``(S, P)``), a ``mask`` for subjects of different lengths,
   the prior left to torchem.

Choices are option codes 0/1 (``EMModel`` codes ``'A'``/``'B'`` as 0/1).
``benchmarks/bench_pyem_style.py`` times the three forms on the reference
data; ``tests/test_pyem_compat.py`` checks that they agree.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from torchem.utils.math import calc_fval, norm2alpha, norm2beta


# 1. pyEM style: numpy, one subject -------------------------------------------------------------
def rw_fit_numpy(params, choices, rewards, prior=None, output="npl"):
    beta = float(norm2beta(params[0]))
    alpha = float(norm2alpha(params[1]))
    if not (1e-5 <= beta <= 20.0) or not (0.0 <= alpha <= 1.0):
        return 1e7
    nblocks, ntrials = rewards.shape
    ev = np.zeros((nblocks, ntrials + 1, 2))
    nll = 0.0
    for b in range(nblocks):
        ev[b, 0, :] = 0.5
        for t in range(ntrials):
            c = int(choices[b, t])
            q = beta * ev[b, t, :]
            p = np.exp(q - q.max()) / np.exp(q - q.max()).sum()
            nll -= np.log(p[c] + 1e-12)
            ev[b, t + 1, :] = ev[b, t, :]
            ev[b, t + 1, c] = ev[b, t, c] + alpha * (rewards[b, t] - ev[b, t, c])
    if output == "all":
        return {"params": [beta, alpha], "EV": ev, "nll": nll}
    return calc_fval(nll, params, prior=prior, output=output)


# 2. torch, still one subject and pyEM's signature ------------------------------------------------
def rw_fit_torch(params, choices, rewards, prior=None, output="npl"):
    beta = norm2beta(params[0])                      # a tensor: no float(), no bounds check
    alpha = norm2alpha(params[1])
    nblocks, ntrials = rewards.shape
    ev = torch.full((nblocks, 2), 0.5, dtype=params.dtype, device=params.device)  # all blocks at once
    evs = [ev]
    nll = 0.0
    for t in range(ntrials):                         # loop over trials only
        chosen = F.one_hot(choices[:, t], 2).to(params.dtype)  # (blocks, 2): no Python index
        nll = nll - (chosen * torch.log_softmax(beta * ev, -1)).sum()
        pe = rewards[:, t] - (chosen * ev).sum(-1)
        ev = ev + alpha * pe[:, None] * chosen       # a new tensor, no in-place write
        evs.append(ev)
    if output == "all":
        return {"params": [beta, alpha], "EV": torch.stack(evs, 1), "nll": nll}
    return calc_fval(nll, params, prior=prior, output=output)


# 3. torchem's contract: all subjects at once, with a mask ----------------------------------------
def rw_fit_batched(params, choices, rewards, mask=None, output="nll"):
    beta = norm2beta(params[:, 0])[:, None]          # (S, 1): broadcasts over blocks
    alpha = norm2alpha(params[:, 1])[:, None, None]
    S, nblocks, ntrials = rewards.shape
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask
    m = mask.to(params.dtype)
    c = torch.where(mask, choices, 0)                # padded trials: any valid code, weight 0
    r = torch.where(mask, rewards, 0.0)
    ev = torch.full((S, nblocks, 2), 0.5, dtype=params.dtype, device=params.device)
    nll = torch.zeros(S, dtype=params.dtype, device=params.device)
    for t in range(ntrials):
        chosen = F.one_hot(c[:, :, t], 2).to(params.dtype)      # (S, blocks, 2)
        logp = torch.log_softmax(beta[:, :, None] * ev, -1)
        nll = nll - (m[:, :, t] * (chosen * logp).sum(-1)).sum(-1)
        pe = r[:, :, t] - (chosen * ev).sum(-1)
        ev = ev + alpha * (m[:, :, t] * pe)[:, :, None] * chosen  # padded trials leave ev unchanged
    if output == "all":
        return {"params": torch.stack([beta[:, 0], alpha[:, 0, 0]], -1), "nll": nll}
    return nll
