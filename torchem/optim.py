"""Batched L-BFGS: many independent minimizations in one set of tensor operations.

:func:`minimize` minimizes ``f: (S, P) -> (S,)`` where row ``i`` of the output
depends only on row ``i`` of the input (one subject each).  Every problem has
its own curvature history, its own backtracking (Armijo) line search with
quadratic interpolation and its own convergence flag; converged problems stop
moving and drop out of later function evaluations, so the cost tracks the
problems still running.  Gradients come from autograd on ``f(x).sum()``,
which for independent problems is each problem's exact gradient.

The objective is called as ``fun(x, idx)``: ``x`` is ``(n, P)`` and ``idx`` a
``(n,)`` long tensor naming which problems the rows belong to, so the caller
can select those subjects' data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["MinimizeResult", "minimize", "value_and_grad"]

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class MinimizeResult:
    """Outcome of a batched minimization; every field has the problems first.

    Attributes
    ----------
    x : Tensor
        ``(S, P)`` final points.
    fun : Tensor
        ``(S,)`` objective values at ``x``.
    grad : Tensor
        ``(S, P)`` gradients at ``x``.
    nit : Tensor
        ``(S,)`` iterations taken by each problem.
    success : Tensor
        ``(S,)`` bool: the gradient (or the relative decrease) fell below tolerance, or no step
        along a gradient below ``100 gtol`` lowers ``f`` any more (the floating-point floor).
    stalled : Tensor
        ``(S,)`` bool: unconverged because steps along the gradient no longer
        lower ``f`` (none down to the step floor, or only by rounding) -- a
        local minimum on a kink of a non-smooth objective, or a gradient
        that disagrees with ``f``.
    nfev : int
        Batched objective evaluations (each over the problems still running).
    """

    x: torch.Tensor
    fun: torch.Tensor
    grad: torch.Tensor
    nit: torch.Tensor
    success: torch.Tensor
    stalled: torch.Tensor
    nfev: int = 0


def value_and_grad(fun: Objective, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-problem values ``(n,)`` and exact gradients ``(n, P)`` of ``fun`` at ``x``.

    From ``fun.value_and_grad(x, idx)`` when the objective carries one (a model with its own gradient,
    :func:`torchem.estep.neg_log_posterior`), else by autograd.
    """
    own = getattr(fun, "value_and_grad", None)
    if own is not None:
        f, g = own(x.detach(), idx)
        return f.detach(), g.detach()
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        f = fun(xg, idx)
        (g,) = torch.autograd.grad(f.sum(), xg)
    return f.detach(), g.detach()


def _two_loop(g: torch.Tensor, s_hist: torch.Tensor, y_hist: torch.Tensor, rho: torch.Tensor,
              valid: torch.Tensor, h0: torch.Tensor | None, use_h0: torch.Tensor) -> torch.Tensor:
    """L-BFGS direction ``-H g`` for each problem; histories are ``(n, m, P)``, oldest first.

    The initial matrix is ``h0`` ``(n, P, P)`` for problems with ``use_h0``,
    else the usual scaled identity ``(s'y / y'y) I`` from the newest pair.
    """
    used = valid.any(0).nonzero().squeeze(1).tolist()  # slots that hold a pair for some problem
    q = g.clone()
    alphas = {}
    for j in reversed(used):
        a = torch.where(valid[:, j], rho[:, j] * (s_hist[:, j] * q).sum(-1), torch.zeros_like(rho[:, j]))
        q = q - a[:, None] * y_hist[:, j]
        alphas[j] = a
    sy = (s_hist[:, -1] * y_hist[:, -1]).sum(-1)
    yy = (y_hist[:, -1] * y_hist[:, -1]).sum(-1)
    gamma = torch.where(valid[:, -1], sy / yy.clamp_min(torch.finfo(g.dtype).tiny), torch.ones_like(sy))
    r = gamma[:, None] * q
    if h0 is not None:
        r = torch.where(use_h0[:, None], (h0 @ q.unsqueeze(-1)).squeeze(-1), r)
    for j in used:
        b = torch.where(valid[:, j], rho[:, j] * (y_hist[:, j] * r).sum(-1), torch.zeros_like(rho[:, j]))
        r = r + (alphas[j] - b)[:, None] * s_hist[:, j]
    return -r


def minimize(
    fun: Objective,
    x0: torch.Tensor,
    *,
    max_iter: int = 200,
    gtol: float = 1e-6,
    ftol: float = 1e-12,
    history_size: int = 10,
    max_ls: int = 30,
    c1: float = 1e-4,
    step_floor: float = 1e-10,
    h0: torch.Tensor | None = None,
    f0: torch.Tensor | None = None,
    g0: torch.Tensor | None = None,
) -> MinimizeResult:
    """Minimize ``S`` independent problems at once with L-BFGS.

    Parameters
    ----------
    fun : callable
        ``fun(x, idx) -> (n,)`` for ``x`` of shape ``(n, P)`` and ``idx`` the
        ``(n,)`` problem indices of those rows.  Must be differentiable with
        autograd; row ``i`` of the output may depend on row ``i`` of ``x`` only.
    x0 : Tensor
        ``(S, P)`` starting points.
    max_iter : int
        Iterations per problem.
    gtol : float
        Converged when ``max |grad| <= gtol``.
    ftol : float
        A step that lowers ``f`` by no more than ``ftol * max(|f|, 1)``
        counts as converged when ``max |grad| <= 1000 gtol`` (the
        floating-point floor); with a larger gradient the curvature history
        and ``h0`` are dropped and the search goes on along the gradient,
        and a second such step ends the problem unconverged.
    history_size : int
        Curvature pairs kept per problem.
    max_ls : int
        Backtracking steps before a line search gives up.  A failure with a
        curvature history resets it and retries along the gradient; a failure
        along the gradient ends that problem, unconverged.
    c1 : float
        Armijo sufficient-decrease constant.
    step_floor : float
        A line search also gives up once the trial move ``max |t d|`` is at
        most ``step_floor * (1 + max |x|)``: no smaller step can lower ``f``
        by more than rounding (typically the minimum sits on a kink of a
        non-smooth objective, such as a ``max`` in the model).
    h0 : Tensor, optional
        ``(S, P, P)`` positive definite initial inverse-Hessian estimates (for
        example the exact inverse Hessians at a nearby earlier solution); the
        first step is then a full quasi-Newton step.  Default: scaled identity.
    f0, g0 : Tensor, optional
        ``(S,)`` values and ``(S, P)`` gradients at ``x0`` when the caller
        already knows them; the initial evaluation is skipped.

    Returns
    -------
    MinimizeResult
        Per-problem ``x``, ``fun``, ``grad``, ``nit``, ``success`` and ``stalled``.
    """
    S, P = x0.shape
    dev, dt = x0.device, x0.dtype
    all_idx = torch.arange(S, device=dev)
    x = x0.detach().clone()
    if f0 is not None and g0 is not None:
        f, g, nfev = f0.detach().clone(), g0.detach().clone(), 0
    else:
        f, g = value_and_grad(fun, x, all_idx)
        nfev = 1
    m = history_size
    s_hist = torch.zeros(S, m, P, device=dev, dtype=dt)
    y_hist = torch.zeros(S, m, P, device=dev, dtype=dt)
    rho = torch.zeros(S, m, device=dev, dtype=dt)
    valid = torch.zeros(S, m, dtype=torch.bool, device=dev)
    nit = torch.zeros(S, dtype=torch.long, device=dev)
    use_h0 = torch.full((S,), h0 is not None, dtype=torch.bool, device=dev)
    finite = torch.isfinite(f) & torch.isfinite(g).all(-1)
    success = finite & (g.abs().amax(-1) <= gtol)
    done = success | ~finite  # a non-finite start cannot be improved upon here
    stalled = torch.zeros_like(done)

    for _ in range(max_iter):
        active = (~done).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        xa, fa, ga = x[active], f[active], g[active]
        d = _two_loop(ga, s_hist[active], y_hist[active], rho[active], valid[active],
                      None if h0 is None else h0[active], use_h0[active])
        gd = (ga * d).sum(-1)
        first = ~valid[active].any(-1) & ~use_h0[active]
        bad_dir = ~(gd < 0) | ~torch.isfinite(gd)
        if bad_dir.any():  # fall back to steepest descent and forget the history and h0
            d = torch.where(bad_dir[:, None], -ga, d)
            gd = torch.where(bad_dir, -(ga * ga).sum(-1), gd)
            valid[active[bad_dir]] = False
            use_h0[active[bad_dir]] = False
            first = first | bad_dir
        # first step along the raw gradient: at most a unit move in the largest coordinate
        t = torch.where(first, (1.0 / ga.abs().amax(-1).clamp_min(1e-12)).clamp(max=1.0), torch.ones_like(fa))

        # ----- batched backtracking line search
        pending = torch.ones_like(fa, dtype=torch.bool)
        gave_up = torch.zeros_like(pending)
        f_new, g_new = fa.clone(), ga.clone()
        for _ls in range(max_ls):
            pi = pending.nonzero().squeeze(1)
            if pi.numel() == 0:
                break
            x_try = xa[pi] + t[pi, None] * d[pi]
            f_try, g_try = value_and_grad(fun, x_try, active[pi])
            nfev += 1
            ok = torch.isfinite(f_try) & torch.isfinite(g_try).all(-1) & (f_try <= fa[pi] + c1 * t[pi] * gd[pi])
            acc = pi[ok]
            f_new[acc], g_new[acc] = f_try[ok], g_try[ok]
            pending[acc] = False
            # quadratic interpolation of the step, kept in [0.1 t, 0.5 t]
            rej = pi[~ok]
            tr, fr = t[rej], f_try[~ok]
            denom = 2.0 * (fr - fa[rej] - gd[rej] * tr)
            t_q = -gd[rej] * tr * tr / denom
            t_q = torch.where(torch.isfinite(t_q) & (denom > 0), t_q, 0.1 * tr)
            t[rej] = torch.minimum(torch.maximum(t_q, 0.1 * tr), 0.5 * tr)
            # a step below the floating-point resolution of x cannot lower f: give up on it now
            tiny = t[rej] * d[rej].abs().amax(-1) <= step_floor * (1.0 + xa[rej].abs().amax(-1))
            pending[rej[tiny]] = False
            gave_up[rej[tiny]] = True
        moved = ~pending & ~gave_up
        # line-search failures: retry along the gradient once, else stop unconverged
        failed = pending | gave_up
        fresh = ~valid[active].any(-1) & ~use_h0[active]  # the direction was already the raw gradient
        retry = failed & ~fresh
        valid[active[retry]] = False
        use_h0[active[retry]] = False
        done[active[failed & fresh]] = True
        # no step along the gradient lowers f: at the floating-point floor when the gradient is small
        at_floor = failed & fresh & (ga.abs().amax(-1) <= 100 * gtol)
        success[active[at_floor]] = True
        stalled[active[failed & fresh & ~at_floor]] = True

        mv = moved.nonzero().squeeze(1)
        if mv.numel():
            ia = active[mv]
            x_new = xa[mv] + t[mv, None] * d[mv]
            s = x_new - xa[mv]
            y = g_new[mv] - ga[mv]
            sy = (s * y).sum(-1)
            keep = sy > 1e-10 * (y * y).sum(-1).clamp_min(1e-300).sqrt() * (s * s).sum(-1).sqrt()
            upd = ia[keep]
            if upd.numel():
                s_hist[upd] = torch.cat([s_hist[upd, 1:], s[keep, None]], 1)
                y_hist[upd] = torch.cat([y_hist[upd, 1:], y[keep, None]], 1)
                rho[upd] = torch.cat([rho[upd, 1:], (1.0 / sy[keep])[:, None]], 1)
                valid[upd] = torch.cat([valid[upd, 1:], torch.ones_like(valid[upd, :1])], 1)
            decrease = fa[mv] - f_new[mv]
            x[ia], f[ia], g[ia] = x_new, f_new[mv], g_new[mv]
            nit[ia] += 1
            gmax = g_new[mv].abs().amax(-1)
            # a step that barely lowers f: at the floating-point floor if the gradient is small,
            # otherwise a poor direction -- forget history and h0 and go on (stop if already fresh)
            stall = decrease <= ftol * torch.maximum(f_new[mv].abs(), torch.ones_like(decrease))
            conv = (gmax <= gtol) | (stall & (gmax <= 1e3 * gtol))
            success[ia[conv]] = True
            done[ia[conv]] = True
            stuck = stall & ~conv
            if stuck.any():
                done[ia[stuck & fresh[mv]]] = True
                stalled[ia[stuck & fresh[mv]]] = True
                valid[ia[stuck]] = False
                use_h0[ia[stuck]] = False
    return MinimizeResult(x=x, fun=f, grad=g, nit=nit, success=success, stalled=stalled, nfev=nfev)
