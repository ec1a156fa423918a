"""Exact per-subject Hessians and their safe inversion.

For ``f: (S, P) -> (S,)`` with independent rows, the Hessian of ``f(x).sum()``
is block diagonal; its ``P`` Hessian-vector products with the basis vectors
``e_j`` (the same ``j`` for every subject) give every subject's ``(P, P)``
Hessian at once.  The products are reverse-over-reverse: one gradient with
its graph kept, then one backward pass through it, vectorized over the
``P`` directions (``is_grads_batched``).

Plain autograd is used rather than ``torch.func.vjp`` of ``torch.func.grad``
(same numbers): every ``torch.func`` gradient transform imports
``torch._dynamo`` on first use, which cost 1-3 s of the first fit in a process.
"""
from __future__ import annotations

import contextvars
from typing import Callable

import torch

__all__ = ["batched_hessian", "hessian_pass", "invert_pd", "cap_posterior_width"]

_HESSIAN_PASS = contextvars.ContextVar("torchem_hessian_pass", default=False)


def hessian_pass() -> bool:
    """Whether the model is being evaluated for :func:`batched_hessian` (its forward pass).

    A model that computes its exact Hessian by hand (through an autograd
    Function, as the DDMs do) can compute it together with the value and the
    gradient here and hand it to the backward pass, instead of evaluating
    the value and gradient first and the Hessian in a second pass.
    """
    return _HESSIAN_PASS.get()


def batched_hessian(fun: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Exact Hessians of independent problems.

    Parameters
    ----------
    fun : callable
        ``fun(x) -> (S,)`` for ``x`` ``(S, P)``; row ``i`` depends on ``x[i]`` only.
        It must be twice differentiable by autograd (no in-place updates of
        inputs, no ``.item()`` on values that depend on ``x``).
    x : Tensor
        ``(S, P)`` points.

    Returns
    -------
    Tensor
        ``(S, P, P)`` symmetric Hessians.
    """
    S, P = x.shape
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        token = _HESSIAN_PASS.set(True)
        try:
            f = fun(xg)
        finally:
            _HESSIAN_PASS.reset(token)
        (g,) = torch.autograd.grad(f.sum(), xg, create_graph=True)
        if not g.requires_grad:  # a gradient that does not depend on x: the Hessian is 0
            return torch.zeros(S, P, P, dtype=x.dtype, device=x.device)
        basis = torch.eye(P, dtype=x.dtype, device=x.device).unsqueeze(1).expand(P, S, P)
        # one backward pass vectorized over the P directions: a model that supplies its Hessian through an
        # autograd Function (the DDMs) computes it once, not once per direction
        (cols,) = torch.autograd.grad(g, xg, basis, is_grads_batched=True, allow_unused=True)
    if cols is None:
        return torch.zeros(S, P, P, dtype=x.dtype, device=x.device)
    H = cols.detach().permute(1, 2, 0)  # cols[j] = H e_j, column j of every subject's Hessian
    return 0.5 * (H + H.transpose(-1, -2))


def invert_pd(H: torch.Tensor, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Invert positive definite matrices through Cholesky, replacing the ones that are not.

    Parameters
    ----------
    H : Tensor
        ``(S, P, P)`` symmetric matrices (Hessians of negative log posteriors).
    fallback : Tensor
        ``(P, P)`` covariance used as the inverse where ``H`` is not positive
        definite or not finite (the current group covariance).

    Returns
    -------
    inv : Tensor
        ``(S, P, P)`` inverses (``fallback`` where flagged).
    logdet : Tensor
        ``(S,)`` ``log det H`` (``-log det fallback`` where flagged).
    ok : Tensor
        ``(S,)`` bool, ``True`` where ``H`` was finite and positive definite.
    """
    finite = torch.isfinite(H).flatten(1).all(1)
    safe = torch.where(finite[:, None, None], H, torch.eye(H.shape[-1], dtype=H.dtype, device=H.device))
    chol, info = torch.linalg.cholesky_ex(safe)
    ok = finite & (info == 0)
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device).expand_as(H)
    chol = torch.where(ok[:, None, None], chol, eye)
    inv = torch.cholesky_inverse(chol)
    logdet = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    inv = torch.where(ok[:, None, None], inv, fallback.expand_as(H))
    logdet = torch.where(ok, logdet, -torch.linalg.slogdet(fallback)[1])
    return inv, logdet, ok


def cap_posterior_width(H: torch.Tensor, prior_cov: torch.Tensor,
                        factor: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep every Laplace posterior at most ``factor`` times wider (in variance) than the group prior.

    A MAP on a shoulder of the likelihood (next to a second mode, or where a
    bounded parameter saturates) can have a Hessian that is positive definite
    but nearly singular.  Its inverse, the Laplace posterior covariance, is
    then many times wider than the prior and jumps with tiny moves of the
    MAP, which makes the M-step oscillate; the Gaussian approximation has
    broken down there.  In the prior's whitened coordinates
    ``A = L^T H L`` (``prior_cov = L L^T``), eigenvalues below ``1 / factor``
    are raised to ``1 / factor``, so ``V = H^-1 <= factor * prior_cov``.
    Hessians within the bound are returned unchanged.

    Parameters
    ----------
    H : Tensor
        ``(S, P, P)`` exact Hessians of the negative log posterior.
    prior_cov : Tensor
        ``(P, P)`` group covariance.
    factor : float
        Largest allowed ratio of posterior to prior variance along any direction.

    Returns
    -------
    H_capped : Tensor
        ``(S, P, P)``.
    capped : Tensor
        ``(S,)`` bool, where the cap changed ``H``.
    """
    finite = torch.isfinite(H).flatten(1).all(1)
    L = torch.linalg.cholesky(prior_cov)
    A = L.T @ torch.where(finite[:, None, None], H, torch.zeros_like(H)) @ L
    evals, evecs = torch.linalg.eigh(0.5 * (A + A.transpose(-1, -2)))
    floor = 1.0 / factor
    # only PD Hessians are capped: a non-PD one is flagged and replaced elsewhere
    capped = finite & (evals.min(-1).values > 0) & (evals < floor).any(-1)
    A_capped = (evecs * evals.clamp_min(floor).unsqueeze(-2)) @ evecs.transpose(-1, -2)
    L_inv = torch.linalg.inv(L)
    H_capped = L_inv.T @ A_capped @ L_inv
    return torch.where(capped[:, None, None], 0.5 * (H_capped + H_capped.transpose(-1, -2)), H), capped
