r"""Drift-diffusion models (DDM) of choices and response times.

A Wiener process with drift :math:`v` and unit noise starts at :math:`z a`
between an absorbing *lower* boundary at 0 and an *upper* boundary at
:math:`a`; the boundary it reaches first is the choice (1 = upper, 0 = lower)
and the response time is the first-passage time plus a non-decision time
:math:`t_0`.

Likelihood
----------
The lower-boundary density at decision time :math:`t` is (Navarro & Fuss, 2009)

.. math::

    p(t \mid v, a, w) = \frac{1}{a^2}\, e^{-v a w - v^2 t / 2}\, f(t / a^2 \mid w),

with :math:`f(u \mid w)` the density of the standardized, driftless
process, evaluated from one of two infinite series:

- small times, :math:`u < u^* = 1/4`:
  :math:`f = (2\pi u^3)^{-1/2} \sum_k (w + 2k)\, e^{-(w + 2k)^2 / 2u}`;
- large times, :math:`u \ge u^*`:
  :math:`f = \pi \sum_{k \ge 1} k\, e^{-k^2 \pi^2 u / 2} \sin(k \pi w)`.

Both are evaluated in log space in forms without cancellation, which keeps
them exact in relative terms for a start point next to either boundary
(:math:`w \to 0` or :math:`w \to 1`) and for very small or large times.
The small-time series is summed as pairs of terms around a common centre
(with the start's distance :math:`y = \min(w, 1 - w)` to the nearer
boundary, each pair is :math:`g(c - y) - g(c + y)`, :math:`g(r) = r e^{-r^2/2u}`,
computed with ``expm1``); the large-time series is the leading term times
:math:`1 + \sum_{k \ge 2} k e^{-(k^2 - 1)\pi^2 u / 2} U_{k-1}(\cos \pi w)`
(:math:`U` Chebyshev polynomials of the second kind, so
:math:`\sin(k\pi w)/\sin(\pi w)` needs no division).  The number of terms
of each series is fixed for a stated relative error bound of the density
over its whole range (:func:`series_terms`; 2 (or 1) pairs and 5 terms for
the default ``err = 1e-12``), so every trial costs the same few tensor
operations.  The first and second derivatives of both series are written
out and handed to autograd by two small ``torch.autograd.Function`` s: the
density is twice differentiable (autograd and ``torch.func``), and a
gradient or an exact Hessian costs a few products per quadrature node
instead of the derivative of every term.  The library models go one step
further: a subject's negative log-likelihood depends on its parameters
only through a few quantities per trial and quadrature node (drift,
boundary, decision time, start, drift SD and the nodes' weights), so its
exact Hessian follows by the chain rule from the series' derivatives
(:func:`_ddm4_terms`, :func:`_ddm7_hessian`) in one pass, instead of one
Hessian-vector product through the whole computation per parameter;
``ddm4`` and ``ddm4_lotto`` compute their value and gradient the same way.
One ``torch.autograd.Function`` (:class:`_SubjectNLL`) hands them to
autograd and ``torch.func``, so autograd's Hessians
(:func:`torchem.curvature.batched_hessian`) take the model's Hessian; the
fit functions also carry them as ``fit.value_and_grad`` (four-parameter
models) and ``fit.hessian``, which the engine calls without autograd
(:mod:`torchem.model`, "Own derivatives").  Tests compare both with autograd through every
operation (the path ``output="all"`` takes).  Values, gradients and Hessians
are finite for normalized parameters anywhere in [-300, 300] in float64
([-30, 30] in float32): tiny ``t / a^2``, starts next to a boundary, large
drifts and responses faster than ``t0`` included.

Across-trial variability (Ratcliff & Tuerlinckx, 2002):

- drift ``v_trial ~ Normal(v, sv)``, integrated analytically:
  :math:`\log p = \log f(t/a^2 \mid w) - 2 \log a - \tfrac12 \log(1 + s_v^2 t)
  + \frac{a^2 w^2 s_v^2 - 2 a v w - v^2 t}{2 (1 + s_v^2 t)}`;
- non-decision time ``t0_trial ~ U(t0 - st/2, t0 + st/2)`` and relative start
  ``z_trial ~ U(z - sz/2, z + sz/2)`` (full widths, as in pyEM and HDDM),
  integrated by Gauss-Legendre quadrature of orders ``n_st`` and ``n_sz``,
  all nodes of all trials as one batched evaluation.  The quadrature runs over
  the part of each interval where the density is not zero: non-decision times
  below the response time, start points inside ``(0, 1)``.  A start point
  drawn beyond a boundary responds at once (decision time 0, which has no
  density at any later time), so where ``z +- sz/2`` leaves ``(0, 1)`` that
  share of the probability is missing from the density, which the fit avoids
  (pyEM returns a 1e7 penalty there).

The upper boundary is the lower one of the mirrored process (``v -> -v``,
``z -> 1 - z``).

Responses at or before the non-decision time
--------------------------------------------
A response time at or below :math:`t_0` has Wiener density zero.  pyEM
returns a 1e7 penalty, which breaks gradient methods.  Here every trial's
likelihood is a mixture with a small contaminant (lapse) component, as in
HDDM's ``p_outlier``:

.. math::

    p(\text{rt}, c) = (1 - p_o)\, p_\text{DDM}(\text{rt}, c) + p_o \cdot \tfrac12
    \cdot \frac{1}{\text{rt}_\max},

a random choice at a time uniform on ``(0, rt_max)``, ``rt_max`` the
subject's slowest response.  The likelihood is smooth in :math:`t_0` (the
Wiener density vanishes with all its derivatives as the decision time goes
to 0), never NaN or infinite, and a response faster than :math:`t_0` costs a
finite, fixed amount, so one anticipatory response no longer dictates a
subject's :math:`t_0`.  The default ``p_outlier`` is :data:`P_OUTLIER`
(1%); :func:`ddm_options` sets another value, and ``p_outlier=0`` gives the
plain Wiener likelihood (pyEM's values where every response is slower than
:math:`t_0`).  ``output="all"`` reports each trial's posterior probability
of being a contaminant (``p_contaminant``).

Models
------
pyEM's names, parameters, transforms and data columns:

=================  ====================================  ======================================
model              parameters                            data (``columns=``)
=================  ====================================  ======================================
``ddm4``           v_coef, a, t0, z                      rt, choice (1 high), value_high, value_low
``ddm4_lotto``     v_coef, a, t0, z                      rt, choice (1 risky), ev_risky, safe
``ddm7``           v_coef, a, t0, z, sv, st, sz          as ``ddm4``
``ddm7_lotto``     v_coef, a, t0, z, sv, st, sz          as ``ddm4_lotto``
``rlddm``          v_coef, a, t0, z, alpha               rt, choice (0/1), reward; blocks
=================  ====================================  ======================================

Transforms (normalized -> natural): ``v_coef`` identity, ``a = 4 sigmoid(x)``
(:func:`a_xform`), ``t0 = 0.5 sigmoid(x - 2.2)`` (:func:`t0_xform`, so
``x = 0`` is 50 ms), ``z = sigmoid(x)``, ``sv = 2.5 sigmoid(x)``,
``st = 0.4 sigmoid(x)``, ``sz = 0.9 sigmoid(x)`` (pyEM's caps),
``alpha = sigmoid(x)``.  Times are in seconds.

Simulation
----------
:func:`simulate_first_passage` draws exact first passages: the walk moves in
Gaussian steps (exact for a constant drift), a crossing between two steps is
detected with the Brownian-bridge crossing probability and its time is drawn
from its exact conditional (inverse Gaussian) law, so neither the choice nor
the time carries a discretization bias (an Euler scheme overshoots the
boundary by about ``0.58 sqrt(dt)``, which biases ``sv`` and ``sz``).

References
----------
Navarro, D. J., & Fuss, I. G. (2009). Fast and accurate calculations for
first-passage times in Wiener diffusion models. *J. Math. Psychol.*, 53, 222-230.
Gondan, M., Blurton, S. P., & Kesselmeier, M. (2014). Even faster and even more
accurate first-passage time densities and distributions for the Wiener
diffusion model. *J. Math. Psychol.*, 60, 20-22.
Ratcliff, R., & Tuerlinckx, F. (2002). Estimating parameters of the diffusion
model. *Psychon. Bull. Rev.*, 9, 438-481.
Wiecki, T. V., Sofer, I., & Frank, M. J. (2013). HDDM: Hierarchical Bayesian
estimation of the drift-diffusion model in Python. *Front. Neuroinform.*, 7, 14.
Pedersen, M. L., Frank, M. J., & Biele, G. (2017). The drift diffusion model as
the choice rule in reinforcement learning. *Psychon. Bull. Rev.*, 24, 1234-1251.
Fontanesi, L., Gluth, S., Spektor, M. S., & Rieskamp, J. (2019). A reinforcement
learning diffusion decision model for value-based decisions. *Psychon. Bull.
Rev.*, 26, 1099-1121.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..curvature import batched_hessian, hessian_pass
from ..model import check_categorical, model_spec, natural_params, reject_subject
from ..optim import value_and_grad
from ..transforms import beta2norm, identity, norm2alpha, norm2beta
from .common import as_blocks, default_mask, fill_padding, sum_trials
from .recurrence import linear_scan

__all__ = [
    "wfpt_logpdf", "wfpt_marginal_logpdf", "ddm_trial_logpdf", "series_terms", "simulate_first_passage",
    "a_xform", "t0_xform", "sv_xform", "st_xform", "sz_xform", "P_OUTLIER", "ddm_options", "rt_quantiles",
    "ddm4_fit", "ddm4_simulate", "ddm4_lotto_fit", "ddm4_lotto_simulate", "ddm7_fit", "ddm7_simulate",
    "ddm7_lotto_fit", "ddm7_lotto_simulate", "rlddm_fit", "rlddm_simulate", "draw_trials",
]

#: Default contaminant (lapse) probability of every trial.
P_OUTLIER = 0.01
#: Default Gauss-Legendre orders of the ``st`` and ``sz`` integrals of the seven-parameter models.
N_ST, N_SZ = 7, 5

# ----------------------------------------------------------------------------------------------------
# Transforms (pyEM's caps)
# ----------------------------------------------------------------------------------------------------


def _scaled_logistic(max_val: float, shift: float, name: str, what: str) -> Callable:
    def forward(x):
        return norm2beta(x - shift, max_val)

    def inverse(y):
        return beta2norm(y, max_val) + shift

    forward.__name__ = forward.__qualname__ = name
    forward.__doc__ = (f"Normalized -> {what} in (0, {max_val:g}): ``{max_val:g} * sigmoid(x"
                       + (f" - {shift:g}" if shift else "") + ")``.  Inverse: ``.inverse``.")
    forward.inverse = inverse
    return forward


a_xform = _scaled_logistic(4.0, 0.0, "a_xform", "boundary separation a")
t0_xform = _scaled_logistic(0.5, 2.2, "t0_xform", "non-decision time t0 (s)")
sv_xform = _scaled_logistic(2.5, 0.0, "sv_xform", "drift SD sv")
st_xform = _scaled_logistic(0.4, 0.0, "st_xform", "non-decision-time range st (s)")
sz_xform = _scaled_logistic(0.9, 0.0, "sz_xform", "start-point range sz")

# ----------------------------------------------------------------------------------------------------
# The Wiener first-passage density
# ----------------------------------------------------------------------------------------------------
_U_SWITCH = 0.25          # small-time series below, large-time series above (normalized time t / a^2)
_T_MIN = 1e-6             # decision times (s) below this are taken to have density zero
_SPREAD_MIN = 1e-6        # st, sz below this are integrated as points
_NEG = -1e30              # log density standing for zero inside the likelihood (finite, so gradients stay 0)
_PI2_2 = math.pi ** 2 / 2.0
_LOG_PI = math.log(math.pi)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@functools.lru_cache(maxsize=None)
def series_terms(err: float = 1e-12) -> tuple[int, int, int]:
    """Numbers of terms of the two series for a relative error of the density below ``err``.

    The bounds hold uniformly in the start point ``w`` and the normalized
    time ``u = t / a^2`` of each series' range (switch at ``u* = 1/4``):

    - large time (``u >= u*``): the terms after ``K`` add at most
      ``T_K = sum_{k > K} k^2 exp(-(k^2 - 1) pi^2 u* / 2)`` relative to the
      leading term (``|sin(k pi w)| <= k sin(pi w)``), and the sum of all terms
      is at least ``1 - T_1`` times the leading one;
    - small time (``u < u*``), pairs ``g(c - y) - g(c + y)`` around centres
      ``c = 2, 4, ...`` (``w <= 1/2``, after the leading ``g(w)``) or
      ``c = 1, 3, ...`` (``w > 1/2``): by the mean value theorem a pair is at most
      ``2 y ((c - 1/2)^2 / u) exp(-(c - 1/2)^2 / 2u)``, which relative to the
      leading term is at most ``2 ((c-1/2)^2/u*) exp(-((c-1/2)^2 - 1/4) / 2u*)``
      for even ``c`` and ``12.9 ((c-1/2)^2/u*) exp(-((c-1/2)^2 - 1) / 2u*)``
      for odd ``c`` (the leading pair is at least ``0.31 y (1 - y) exp(-(1-y)^2/2u)``
      for ``u <= 1/4``).

    Parameters
    ----------
    err : float
        Relative error bound of the density (default ``1e-12``).

    Returns
    -------
    tuple of int
        ``(J_even, J_odd, K)``: pairs of the small-time series after its leading
        term for ``w <= 1/2`` (centres 2, 4, ..) and for ``w > 1/2`` (centres 3, 5, ..,
        after the leading pair at 1), and terms of the large-time series.
    """
    if not 0.0 < err < 1.0:
        raise ValueError(f"err must be in (0, 1), got {err}")
    u = _U_SWITCH

    def large_tail(K):
        return sum(k * k * math.exp(-(k * k - 1) * _PI2_2 * u) for k in range(K + 1, K + 40))

    def even(c):
        r2 = (c - 0.5) ** 2
        return 2.0 * r2 / u * math.exp(-(r2 - 0.25) / (2 * u))

    def odd(c):
        r2 = (c - 0.5) ** 2
        return 12.9 * r2 / u * math.exp(-(r2 - 1.0) / (2 * u))

    K = next(K for K in range(2, 100) if large_tail(K) / (1.0 - large_tail(1)) < err)
    lead_even = 1.0 - sum(even(2 * j) for j in range(1, 40))  # the w <= 1/2 series over its leading term
    J_even = next(J for J in range(1, 100) if sum(even(2 * j) for j in range(J + 1, J + 40)) / lead_even < err)
    J_odd = next(J for J in range(0, 100) if sum(odd(2 * j + 1) for j in range(J + 1, J + 40)) < err)
    return J_even, J_odd, K


# ``log f`` and its derivatives in (u, y) are computed by hand, without autograd: a value-only evaluation
# for calls that need no gradient, value and first derivatives for a gradient, and the second derivatives
# only when a Hessian asks for them (two small autograd Functions hand them over).  A likelihood keeps a few
# tensors per quadrature node instead of every intermediate of the series, and its gradient and exact
# Hessian (torch.func) cost a few products per node.
def _log_pair(c, y, u, order: int):
    """``log[g(c - y) - g(c + y)]``, ``g(r) = r exp(-r^2 / 2u)``, and its derivatives up to ``order``.

    Returns ``(v,)``, ``(v, v_u, v_y)`` or ``(v, v_u, v_y, v_uu, v_uy, v_yy)``.
    ``g(c - y) - g(c + y) = (c - y) exp(-(c - y)^2 / 2u) (1 - e^h)``,
    ``h = log((c + y)/(c - y)) - 2 c y / u < 0``, with ``log(1 - e^h)`` by
    ``-expm1``: exact for small ``y`` (needs ``c >= 1``, ``y <= 1/2``, ``u <= 1/4``).
    """
    d = c - y
    iu = 1.0 / u
    h = torch.log1p(2.0 * y / d) - 2.0 * c * y * iu
    em = torch.expm1(h)  # in (-1, 0)
    val = torch.log(d) - 0.5 * d * d * iu + torch.log(-em)
    if order == 0:
        return (val,)
    iu2 = iu * iu
    beta = (em + 1.0) / em  # d log(1 - e^h) / dh
    h_u, h_y = 2.0 * c * y * iu2, 1.0 / (c + y) + 1.0 / d - 2.0 * c * iu
    first = (val, 0.5 * d * d * iu2 + beta * h_u, -1.0 / d + d * iu + beta * h_y)
    if order == 1:
        return first
    dbeta = -(em + 1.0) / (em * em)
    h_uu, h_uy = -4.0 * c * y * iu2 * iu, 2.0 * c * iu2
    h_yy = 1.0 / (d * d) - 1.0 / ((c + y) * (c + y))
    return first + (-d * d * iu2 * iu + beta * h_uu + dbeta * h_u * h_u,
                    -d * iu2 + beta * h_uy + dbeta * h_u * h_y,
                    -1.0 / (d * d) - iu + beta * h_yy + dbeta * h_y * h_y)


def _log_f_small(u: torch.Tensor, y: torch.Tensor, near_lower: bool, J: int, order: int):
    """Small-time ``log f`` and its derivatives up to ``order``; ``y = min(w, 1 - w)``.

    ``near_lower`` (``w <= 1/2``): ``g(y) (1 - sum_{c = 2, 4, ..} pair_c / g(y))``; else
    ``pair_1 (1 + sum_{c = 3, 5, ..} pair_c / pair_1)``; ``J`` pairs in the sum.  Every
    ratio is small (their sums stay below 0.33 and 0.009 for ``u <= 1/4``), so
    ``log f = log lead + log1p(-+Q)`` has no cancellation.
    """
    iu = 1.0 / u
    # every pair of the sum in one evaluation along a leading axis (after the leading pair when w > 1/2)
    centres = [2.0 * j for j in range(1, J + 1)] if near_lower else [2.0 * j + 1.0 for j in range(J + 1)]
    pairs = _log_pair(torch.tensor(centres, dtype=u.dtype, device=u.device).reshape((-1,) + (1,) * y.dim()),
                      y, u, order)
    if near_lower:  # log g(y) and its derivatives
        yiu = y * iu
        lead = (torch.log(y) - 0.5 * y * yiu,)
        if order:
            lead += (0.5 * yiu * yiu, 1.0 / y - yiu)
        if order == 2:
            lead += (-yiu * yiu * iu, yiu * iu, -1.0 / (y * y) - iu)
    else:
        lead, pairs = tuple(p[0] for p in pairs), tuple(p[1:] for p in pairs)
    sign = -1.0 if near_lower else 1.0
    r = torch.exp(pairs[0] - lead[0])
    q = [r.sum(0)]  # Q and its derivatives: u, y, uu, uy, yy
    if order:
        a_u, a_y = pairs[1] - lead[1], pairs[2] - lead[2]
        q += [(r * a_u).sum(0), (r * a_y).sum(0)]
    if order == 2:
        q += [(r * (pairs[3] - lead[3] + a_u * a_u)).sum(0), (r * (pairs[4] - lead[4] + a_u * a_y)).sum(0),
              (r * (pairs[5] - lead[5] + a_y * a_y)).sum(0)]
    den = 1.0 + sign * q[0]
    out = (lead[0] + torch.log(den) - _HALF_LOG_2PI - 1.5 * torch.log(u),)
    if order == 0:
        return out
    f_u, f_y = sign * q[1] / den, sign * q[2] / den
    out = out + (lead[1] + f_u - 1.5 * iu, lead[2] + f_y)
    if order == 1:
        return out
    return out + (lead[3] + sign * q[3] / den - f_u * f_u + 1.5 * iu * iu, lead[4] + sign * q[4] / den - f_u * f_y,
                  lead[5] + sign * q[5] / den - f_y * f_y)


def _log_f_large(u: torch.Tensor, y: torch.Tensor, near_lower: torch.Tensor, K: int, order: int):
    """Large-time ``log f`` and its derivatives up to ``order``: the leading term times ``1 + R``,
    ``R = sum_{k=2..K} k e^{-(k^2 - 1) pi^2 u / 2} U_{k-1}(cos pi w)`` (``|R| <= 0.1`` for ``u >= 1/4``;
    Chebyshev polynomials of the second kind, so ``sin(k pi w) / sin(pi w)`` needs no division).
    """
    cos, sin = torch.cos(math.pi * y), torch.sin(math.pi * y)
    sgn = 2.0 * near_lower.to(u.dtype) - 1.0
    x = sgn * cos  # cos(pi w)
    x2 = 2.0 * x
    # U_{k-1}(x) and its first two derivatives by the three-term recurrence (U_0 = 1, U_1 = 2x, U_1' = 2)
    U, dU, ddU = 1.0, 0.0, 0.0
    U1, dU1, ddU1 = x2, 2.0, 0.0
    R = R_u = R_uu = R_x = R_xx = R_ux = 0.0
    for k in range(2, K + 1):
        lam = (k * k - 1) * _PI2_2
        qk = k * torch.exp(-lam * u)
        qU = qk * U1
        R = R + qU
        if order:
            R_u, R_x = R_u - lam * qU, R_x + qk * dU1
        if order == 2:
            R_uu, R_xx, R_ux = R_uu + (lam * lam) * qU, R_xx + qk * ddU1, R_ux - lam * (qk * dU1)
        U, U1 = U1, x2 * U1 - U
        if order:
            dU, dU1 = dU1, 2.0 * U + x2 * dU1 - dU  # U is U_{k-1} now
        if order == 2:
            ddU, ddU1 = ddU1, 4.0 * dU + x2 * ddU1 - ddU
    out = (_LOG_PI - _PI2_2 * u + torch.log(sin) + torch.log1p(R),)
    if order == 0:
        return out
    den = 1.0 + R
    x_y = -sgn * math.pi * sin
    r_u, r_y = R_u / den, R_x * x_y / den
    out = out + (r_u - _PI2_2, math.pi * cos / sin + r_y)
    if order == 1:
        return out
    x_yy = -(math.pi ** 2) * x
    return out + (R_uu / den - r_u * r_u, R_ux * x_y / den - r_u * r_y,
                  -(math.pi ** 2) / (sin * sin) + (R_xx * x_y * x_y + R_x * x_yy) / den - r_y * r_y)


def _log_f_where(u: torch.Tensor, y: torch.Tensor, near_lower: torch.Tensor, terms: tuple[int, int, int],
                 order: int):
    """:func:`_log_f_parts` by running every series on every element (each fed only values of its own
    range, so none produces NaN) and picking with ``torch.where``: no masked selections, no host syncs."""
    J_even, J_odd, K = terms
    small = u < _U_SWITCH
    us = torch.where(small, u, torch.full_like(u, _U_SWITCH))
    ul = torch.where(small, torch.full_like(u, _U_SWITCH), u)
    parts = zip(_log_f_small(us, y, True, J_even, order), _log_f_small(us, y, False, J_odd, order),
                _log_f_large(ul, y, near_lower, K, order))
    return tuple(torch.where(small, torch.where(near_lower, a, b), c) for a, b, c in parts)


def _log_f_parts(u: torch.Tensor, y: torch.Tensor, near_lower: torch.Tensor, terms: tuple[int, int, int],
                 order: int):
    """``log f`` (and derivatives up to ``order``) from the series of each element's range and side.

    On the CPU each series runs only on the elements that need it, the
    small-time one by the form of each side; where times and starts lie on
    different (quadrature) axes the large-time series runs on all of them
    instead (cheap: its exponentials depend on time only, its sines on the
    start only).  On a GPU, where masked selections synchronize with the
    host, by :func:`_log_f_where`.
    """
    if u.device.type != "cpu":
        return _log_f_where(u, y, near_lower, terms, order)
    J_even, J_odd, K = terms
    shape = torch.broadcast_shapes(u.shape, y.shape, near_lower.shape)
    small = u < _U_SWITCH
    shared = u.shape != shape or y.shape != shape  # times and starts on different axes (quadrature nodes)
    uu, yy = u.expand(shape).reshape(-1), y.expand(shape).reshape(-1)
    near = near_lower.expand(shape).reshape(-1)
    if shared:
        large = _log_f_large(torch.where(small, torch.full_like(u, _U_SWITCH), u), y, near_lower, K, order)
        out = [x.expand(shape).contiguous() for x in large]
    else:  # one (time, start) per element: the large-time series only where it is used
        out = [torch.empty(shape, dtype=u.dtype, device=u.device) for _ in range((1, 3, 6)[order])]
        idx = (~small).reshape(-1).nonzero().squeeze(1)
        for o, part in zip(out, _log_f_large(uu[idx], yy[idx], near[idx], K, order)):
            o.view(-1)[idx] = part
    small = small.expand(shape).reshape(-1)
    if not bool(small.any()):
        return tuple(out)
    for side, J in ((True, J_even), (False, J_odd)):
        idx = (small & (near if side else ~near)).nonzero().squeeze(1)
        for o, part in zip(out, _log_f_small(uu[idx], yy[idx], side, J, order)):
            o.view(-1)[idx] = part
    return tuple(out)


def _reduce(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``grad`` over the axes along which an input of ``shape`` was broadcast."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape) if n == 1 and grad.shape[i + lead] != 1)
    return grad.sum(axes, keepdim=True).reshape(shape)


class _LogFDerivatives(torch.autograd.Function):
    """``(dl/du, dl/dy)`` as computed in the forward pass; its backward brings the second derivatives."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u, y, d_u, d_y, near_lower, terms):
        return d_u.clone(), d_y.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, y, _, _, near_lower, terms = inputs
        ctx.save_for_backward(u, y, near_lower)
        ctx.terms = terms

    @staticmethod
    def backward(ctx, g_u, g_y):
        u, y, near_lower = ctx.saved_tensors
        _, _, _, d_uu, d_uy, d_yy = _log_f_parts(u, y, near_lower, ctx.terms, order=2)
        return (_reduce(g_u * d_uu + g_y * d_uy, u.shape), _reduce(g_u * d_uy + g_y * d_yy, y.shape),
                None, None, None, None)


class _LogF(torch.autograd.Function):
    """``log f(u | y)`` with exact first and second derivatives (third ones are not available)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u, y, near_lower, terms):
        return _log_f_parts(u, y, near_lower, terms, order=1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, y, near_lower, terms = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(u, y, near_lower, *output[1:])
        ctx.terms = terms

    @staticmethod
    def backward(ctx, g, *unused):
        u, y, near_lower, d_u, d_y = ctx.saved_tensors
        l_u, l_y = _LogFDerivatives.apply(u, y, d_u, d_y, near_lower, ctx.terms)
        return _reduce(g * l_u, u.shape), _reduce(g * l_y, y.shape), None, None


def _log_f(u: torch.Tensor, w: torch.Tensor, wbar: torch.Tensor, err: float) -> torch.Tensor:
    """``log f(u | w)`` of the standardized driftless process; ``wbar = 1 - w`` given separately (exactly)."""
    terms = series_terms(err)
    near_lower = (w <= 0.5).detach()
    # distance to the nearer boundary; a start on a boundary moves to the nearest float inside
    y = torch.where(near_lower, w, wbar).clamp_min(torch.finfo(u.dtype).tiny)
    if torch.is_grad_enabled() and (u.requires_grad or y.requires_grad):
        return _LogF.apply(u, y, near_lower, terms)[0]
    return _log_f_parts(u, y, near_lower, terms, order=0)[0]


def _wfpt_lower(t: torch.Tensor, v: torch.Tensor, a: torch.Tensor, w: torch.Tensor, wbar: torch.Tensor,
                sv: torch.Tensor | None, err: float, add_t=0.0, add_w=0.0,
                keep=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower-boundary log density at decision times ``t`` and where it is positive (``(log p, valid)``).

    ``add_t`` / ``add_w`` are added to the log density (e.g. log quadrature
    weights) and ``keep`` (bool) masks times out; each is folded into the terms
    that depend on the time alone or on the start alone, so that with times
    and starts on different axes few operations touch every (time, start) pair.
    Below a decision time of 1 microsecond (including ``t <= 0``), and where
    ``keep`` is false, the density is taken as zero: the log density holds
    ``_NEG`` there (and its gradients are 0).
    """
    a = a.clamp_min(1e-6)
    a2 = a * a
    valid = (t > _T_MIN).detach()
    if keep is not None:
        valid = valid & keep
    t = torch.where(valid, t, a2)  # a harmless time where the density is zero
    log_f = _log_f(t / a2, w, wbar, err)
    if sv is None:
        by_t = add_t - torch.log(a2) - 0.5 * v * v * t
        log_p = log_f + torch.where(valid, by_t, _NEG) + (add_w - v * a * w)
    else:
        s2 = sv * sv
        half_inv = 0.5 / (1.0 + s2 * t)
        by_t = add_t - torch.log(a2) + 0.5 * torch.log(2.0 * half_inv) - v * v * t * half_inv
        log_p = log_f + torch.where(valid, by_t, _NEG) + (a2 * s2 * w - 2.0 * a * v) * w * half_inv + add_w
    return log_p, valid


def _as_tensors(*values):
    """Tensors of a common floating dtype and device (float64 unless a tensor says otherwise)."""
    ref = next((x for x in values if isinstance(x, torch.Tensor) and x.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.float64
    device = next((x.device for x in values if isinstance(x, torch.Tensor)), None)
    return tuple(torch.as_tensor(x, dtype=dtype, device=device) for x in values)


def wfpt_logpdf(rt, v, a, z, sv=0.0, *, err: float = 1e-12) -> torch.Tensor:
    r"""Log density of reaching the *lower* boundary at decision time ``rt``.

    The density of the upper boundary is ``wfpt_logpdf(rt, -v, a, 1 - z, sv)``.

    Parameters
    ----------
    rt : Tensor or array_like
        Decision times (response time minus non-decision time), seconds.
    v, a, z, sv : Tensor, array_like or float
        Drift, boundary separation (> 0), relative start point in (0, 1) and
        across-trial drift SD (>= 0, integrated analytically).  All arguments
        broadcast against each other.
    err : float
        Relative error bound of the series (:func:`series_terms`).

    Returns
    -------
    Tensor
        Log densities, broadcast shape; ``-inf`` where ``rt <= 0`` (below
        1 microsecond the density is taken as zero).  Differentiable twice.
    """
    rt, v, a, z, sv = _as_tensors(rt, v, a, z, sv)
    log_p, valid = _wfpt_lower(rt, v, a, z, 1.0 - z, sv, err)
    return torch.where(valid, log_p, -math.inf)


@functools.lru_cache(maxsize=None)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    if n < 1:
        raise ValueError(f"quadrature orders must be >= 1, got {n}")
    return np.polynomial.legendre.leggauss(n)


def _nodes(n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = _legendre(n)
    return (torch.as_tensor(x, dtype=like.dtype, device=like.device),
            torch.as_tensor(np.log(w / 2.0), dtype=like.dtype, device=like.device))


def _quadrature(rt, a, t0, w, wbar, st, sz, n_st: int, n_sz: int) -> dict:
    """The quadrature nodes of :func:`_marginal_lower`: decision times along a leading axis, start points
    along a second one (``(n_st or 1, n_sz or 1, ...)``), their log weights, and the pieces the exact Hessian
    (:func:`_ddm7_hessian`) differentiates.

    Returns a dict with ``wn``, ``wbn`` (start nodes and ``1 -`` them), ``add_w`` (log weights of the start
    nodes), ``dt``, ``add_t`` (decision-time nodes and their log weights) and ``keep`` (bool, ``None`` without
    an ``st`` axis: nodes inside the window); with ``sz``: ``below``, ``above``, ``half``, ``span_w``,
    ``spread_z``, ``xz``; with ``st``: ``s_hi``, ``s_lo``, ``st_lo`` (``s_hi - st``), ``onset``, ``span``,
    ``xs``, ``spread_t``.
    """
    nd = max(x.dim() for x in (rt, a, t0, w, wbar))

    def node_axis(x, axis):  # quadrature nodes lead, so trial tensors broadcast along contiguous memory
        shape = [1, 1] + [1] * nd
        shape[axis] = -1
        return x.reshape(shape)

    q = {"add_w": 0.0, "add_t": 0.0, "keep": None}
    if sz is None:
        q["wn"], q["wbn"] = w[None, None], wbar[None, None]
    else:
        xz, logw_z = (node_axis(n, 1) for n in _nodes(n_sz, rt))
        spread = sz > _SPREAD_MIN  # narrower spreads are points (their share of the density is below 1e-12)
        sz_q = torch.where(spread, sz, torch.ones_like(sz))  # safe inputs for the quadrature
        half = torch.where(spread, sz / 2.0, torch.zeros_like(sz))
        below, above = torch.minimum(half, w), torch.minimum(half, wbar)  # cut at the boundaries
        frac = torch.where(spread, (below + above) / sz_q, torch.ones_like(sz))
        span = below + above
        q.update(wn=(w - below) + span * (1.0 + xz) / 2.0,  # (1, n_sz, ...)
                 wbn=(wbar - above) + span * (1.0 - xz) / 2.0,
                 add_w=torch.log(frac.clamp_min(torch.finfo(rt.dtype).tiny)) + logw_z,
                 below=below, above=above, half=half, span_w=span, spread_z=spread, xz=xz)
    if st is None:
        q["dt"] = (rt - t0)[None, None]
    else:
        xs, logw_s = (node_axis(n, 0) for n in _nodes(n_st, rt))
        spread = st > _SPREAD_MIN
        st_q = torch.where(spread, st, torch.ones_like(st))
        s_hi = rt - t0 + st_q / 2.0
        onset = (q["wn"][:, :1] * a) ** 2 / 60.0  # of the start node nearest to the boundary
        s_lo = torch.maximum(s_hi - st_q, onset).clamp_min(_T_MIN)
        window = s_lo < s_hi
        span = torch.log1p(torch.where(window, s_hi - s_lo, s_lo) / s_lo)  # log(s_hi / s_lo) where not empty
        lam = torch.log(s_lo) + span * (1.0 + xs) / 2.0  # (n_st, 1, ...): the times are shared by all start nodes
        q.update(dt=torch.where(spread, torch.exp(lam), rt - t0),
                 add_t=logw_s + torch.where(spread, torch.log(span / st_q) + lam, torch.zeros_like(lam)),
                 keep=window | ~spread, s_hi=s_hi, s_lo=s_lo, st_lo=s_hi - st_q, onset=onset, span=span, xs=xs,
                 spread_t=spread)
    return q


def _marginal_lower(rt, v, a, t0, w, wbar, sv, st, sz, n_st: int, n_sz: int, err: float) -> torch.Tensor:
    """Lower-boundary log density of response times ``rt`` with ``st`` and ``sz`` integrated out.

    ``st``/``sz`` ``None`` means no spread (no quadrature axis).  The start
    point is integrated over ``[z - sz/2, z + sz/2]`` cut to ``(0, 1)``; the
    non-decision time as the decision time ``s = rt - t0_trial`` over
    ``[max(rt - t0 - st/2, s_min), rt - t0 + st/2]`` in log time
    (``s = e^lambda``), where the density is a smooth bump that Gauss-Legendre
    resolves even when the window starts at 0; ``s_min = (w a)^2 / 60`` (``w``
    the start node nearest to the boundary) cuts the onset, where the density is
    below ``1e-10`` of its peak.  Decision-time nodes vary along a leading
    axis and start-point nodes along a second one (:func:`_quadrature`), so what
    depends on only one of them is computed once per node, not per pair.
    Returns ``(...)`` log densities holding ``_NEG`` where the density is zero.
    """
    q = _quadrature(rt, a, t0, w, wbar, st, sz, n_st, n_sz)
    log_p, valid = _wfpt_lower(q["dt"], v, a, q["wn"], q["wbn"], sv, err, q["add_t"], q["add_w"], q["keep"])
    out = torch.logsumexp(log_p, (0, 1))
    return torch.where(valid.flatten(0, 1).any(0), out, torch.full_like(out, _NEG))


def wfpt_marginal_logpdf(rt, v, a, z, t0, sv=0.0, st=0.0, sz=0.0, *, n_st: int = N_ST, n_sz: int = N_SZ,
                         err: float = 1e-12) -> torch.Tensor:
    """Log density of a *lower*-boundary response at time ``rt`` with across-trial variability.

    Non-decision time ``U(t0 - st/2, t0 + st/2)`` and relative start point
    ``U(z - sz/2, z + sz/2)`` are integrated by Gauss-Legendre quadrature of
    orders ``n_st`` and ``n_sz`` over the part of each interval where the
    density is positive (see the module notes); the drift SD ``sv`` analytically.

    Parameters
    ----------
    rt : Tensor or array_like
        Response times (seconds, including the non-decision time).
    v, a, z, t0, sv, st, sz : Tensor, array_like or float
        Drift, boundary separation, centre of the relative start, centre of the
        non-decision time, drift SD and the full widths of the two uniforms.
        All broadcast against each other.
    n_st, n_sz : int
        Quadrature orders (used where ``st`` / ``sz`` is positive).
    err : float
        Relative error bound of the series.

    Returns
    -------
    Tensor
        Log densities, broadcast shape; ``-inf`` where the density is zero.
    """
    rt, v, a, z, t0, sv, st, sz = _as_tensors(rt, v, a, z, t0, sv, st, sz)
    out = _marginal_lower(rt, v, a, t0, z, 1.0 - z, sv, st, sz, n_st, n_sz, err)
    return torch.where(out > _NEG / 2, out, torch.full_like(out, -math.inf))


# ----------------------------------------------------------------------------------------------------
# Exact simulation of first passages
# ----------------------------------------------------------------------------------------------------
def simulate_first_passage(v, a, z, rng: np.random.Generator, step: float = 0.02,
                           max_time: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    r"""Exact draws of the first passage of a Wiener process with drift ``v`` through 0 or ``a``.

    In normalized units (position ``/ a``, time ``/ a^2``, drift ``v a``) the
    walk takes Gaussian steps of ``step`` (exact for a constant drift).  A
    crossing between two positions ``x0, x1`` inside ``(0, 1)`` happens with
    the Brownian-bridge probability ``exp(-2 d0 d1 / step)`` (``d0, d1`` their
    distances to the boundary); a step that ends beyond a boundary has crossed
    it.  The crossing time within the step is drawn from its exact law given
    both ends: ``step * r / (1 + r)`` with ``r`` inverse Gaussian of mean
    ``d0 / d1`` and shape ``d0^2 / step``.  The only approximation is that a
    step cannot touch both boundaries (probability about ``exp(-1 / (2 step))``
    = ``1e-11`` per step at the default).

    Parameters
    ----------
    v, a, z : ndarray
        Drift, boundary separation (> 0) and relative start point per trial,
        same shape.  A start at or beyond a boundary (``z <= 0`` or ``z >= 1``)
        responds there at once (decision time 0).
    rng : numpy.random.Generator
        Random stream.
    step : float
        Step in normalized time (``t / a^2``).
    max_time : float
        Normalized time after which a walk that has not finished (probability
        below ``exp(-pi^2 max_time / 2)``) is assigned to the nearer boundary.

    Returns
    -------
    t : ndarray
        Decision times (seconds), shape of ``v``.
    upper : ndarray
        ``int64``, 1 where the upper boundary was reached.
    """
    v, a, z = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (v, a, z)))
    shape = v.shape
    mu, x, scale = (v * a).ravel(), z.ravel().copy(), (a * a).ravel()
    s = np.zeros_like(x)
    upper = (x >= 1.0).astype(np.int64)
    active = np.flatnonzero((x > 0.0) & (x < 1.0))
    sd = math.sqrt(step)
    for _ in range(int(math.ceil(max_time / step))):
        if active.size == 0:
            break
        x0 = x[active]
        x1 = x0 + mu[active] * step + sd * rng.standard_normal(active.size)
        u = rng.random(active.size)
        p_up = np.exp(-2.0 * np.clip(1.0 - x0, 0, None) * np.clip(1.0 - x1, 0, None) / step)
        p_lo = np.exp(-2.0 * np.clip(x0, 0, None) * np.clip(x1, 0, None) / step)
        hit_up = (x1 >= 1.0) | (u < p_up)
        hit_lo = ~hit_up & ((x1 <= 0.0) | (u < p_up + p_lo))
        done = hit_up | hit_lo
        d0 = np.where(hit_up, 1.0 - x0, x0)[done]
        d1 = np.abs(np.where(hit_up, 1.0 - x1, x1)[done])
        r = np.full(d0.shape, np.inf)
        pos = d1 > 0
        r[pos] = rng.wald(d0[pos] / d1[pos], d0[pos] ** 2 / step)
        frac = np.where(np.isinf(r), 1.0, r / (1.0 + r))
        idx = active[done]
        s[idx] += step * frac
        upper[idx] = hit_up[done]
        keep = active[~done]
        s[keep] += step
        x[keep] = x1[~done]
        active = keep
    upper[active] = (x[active] >= 0.5).astype(np.int64)
    return (s * scale).reshape(shape), upper.reshape(shape)


# ----------------------------------------------------------------------------------------------------
# Trial likelihood with the contaminant component
# ----------------------------------------------------------------------------------------------------
def ddm_trial_logpdf(rt: torch.Tensor, choice: torch.Tensor, v, a, t0, z, sv=None, st=None, sz=None, *,
                     zbar=None, rt_max=None, p_outlier: float = P_OUTLIER, n_st: int = N_ST, n_sz: int = N_SZ,
                     err: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Log-likelihood of each trial's response time and choice, with the contaminant mixture.

    Parameters
    ----------
    rt, choice : Tensor or array_like
        Response times (seconds) and choices (1 upper, 0 lower), same shape ``(...)``.
    v, a, t0, z : Tensor, array_like or float
        Drift, boundary separation, non-decision time and relative start,
        broadcasting against ``rt``.
    sv, st, sz : Tensor, optional
        Across-trial variability (``None``: none, no quadrature axis).
    zbar : Tensor, optional
        ``1 - z`` computed exactly (e.g. ``sigmoid(-x)``); default ``1 - z``.
    rt_max : Tensor, optional
        Upper end of the contaminant's uniform response time, broadcasting
        against ``rt`` (default: the largest ``rt``).
    p_outlier : float
        Contaminant probability in ``[0, 1)``; 0 gives the plain Wiener
        likelihood (a response at or before ``t0`` then has log density ``-1e30``).
    n_st, n_sz : int
        Gauss-Legendre orders of the ``st`` and ``sz`` integrals.
    err : float
        Relative error bound of the series.

    Returns
    -------
    log_p : Tensor
        ``(...)`` log-likelihood of each trial (finite).
    log_contaminant : Tensor
        ``(...)`` log of the contaminant's share ``p_outlier / (2 rt_max)``
        (``-inf`` when ``p_outlier = 0``); ``exp(log_contaminant - log_p)`` is
        each trial's posterior probability of being a contaminant.
    """
    if not 0.0 <= p_outlier < 1.0:
        raise ValueError(f"p_outlier must be in [0, 1), got {p_outlier}")
    given = [x for x in (rt, choice, v, a, t0, z, sv, st, sz, zbar, rt_max) if x is not None]
    if not all(isinstance(x, torch.Tensor) for x in given):
        conv = iter(_as_tensors(*given))
        rt, choice, v, a, t0, z, sv, st, sz, zbar, rt_max = (
            None if x is None else next(conv) for x in (rt, choice, v, a, t0, z, sv, st, sz, zbar, rt_max))
    zbar = 1.0 - z if zbar is None else zbar
    upper = choice > 0.5
    v_low = torch.where(upper, -v, v)  # the upper boundary is the lower one of the mirrored process
    w, wbar = torch.where(upper, zbar, z), torch.where(upper, z, zbar)
    log_ddm = _marginal_lower(rt, v_low, a, t0, w, wbar, sv, st, sz, n_st, n_sz, err)
    if p_outlier == 0.0:
        return log_ddm, torch.full_like(log_ddm, -math.inf)
    rt_max = rt.amax() if rt_max is None else rt_max
    log_c = (math.log(p_outlier / 2.0) - torch.log(rt_max)).expand_as(log_ddm)
    # log(c + (1 - p) p_ddm) as log c + softplus(...); torch.logaddexp's second derivative is NaN when the
    # terms are far apart.  Above 40 softplus(x) = x to within exp(-40).
    return log_c + F.softplus(log_ddm + (math.log1p(-p_outlier) - log_c), threshold=40.0), log_c


# ----------------------------------------------------------------------------------------------------
# Exact Hessians by the chain rule
# ----------------------------------------------------------------------------------------------------
class _SubjectGrad(torch.autograd.Function):
    """The gradient of :class:`_SubjectNLL`, computed in its forward pass; its backward brings the Hessian
    (``hessian``: the ``(S, P, P)`` tensor computed with it, or a function of ``x`` that computes it)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, grad, hessian):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.hessian = inputs[2]

    @staticmethod
    def backward(ctx, gg):
        (x,) = ctx.saved_tensors
        H = ctx.hessian if isinstance(ctx.hessian, torch.Tensor) else ctx.hessian(x)
        return (H @ gg.unsqueeze(-1)).squeeze(-1), None, None


class _SubjectNLL(torch.autograd.Function):
    """Per-subject negative log-likelihood ``(S,)`` of ``x`` ``(S, P)`` whose derivatives the model supplies:
    ``derivs(x, 1) -> (nll (S,), grad (S, P))`` and ``derivs(x, 2) -> (nll, grad, hessian (S, P, P))``
    (exact).  Autograd and ``torch.func`` then take the gradient from the first and every Hessian-vector
    product from one Hessian (third derivatives are not available).  In the forward pass of the engine's
    exact Hessians (:func:`torchem.curvature.hessian_pass`) the Hessian is computed with the value and the
    gradient, in one pass; elsewhere only when a second derivative is asked for."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, derivs):
        if hessian_pass():
            return derivs(x, 2)
        f, g = derivs(x, 1)
        return f, g, g.new_empty(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, derivs = inputs
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(x, output[1])
        ctx.hessian = output[2] if output[2].numel() else (lambda z: derivs(z, 2)[2])

    @staticmethod
    def backward(ctx, g, unused_grad, unused_hessian):
        x, grad = ctx.saved_tensors
        if not torch.is_grad_enabled():  # a plain gradient (no graph for second derivatives)
            return g.unsqueeze(-1) * grad, None
        return g.unsqueeze(-1) * _SubjectGrad.apply(x, grad, ctx.hessian), None


def _autograd_value_grad(nll: Callable) -> Callable:
    """``x -> (nll, grad)`` of :class:`_SubjectNLL` by autograd through ``nll(x) -> (S,)``."""
    return lambda x: value_and_grad(lambda z, _: nll(z), x, None)


# Sparse first and second derivatives in the natural parameters nu = (v_coef, a, t0, z, sv, st, sz) of the
# seven-parameter models: a vector is {index: tensor}, a symmetric matrix {(i, j), i <= j: tensor}.
_V, _A, _T0, _Z, _SV, _ST, _SZ = range(7)


def _lin(*terms) -> dict:
    """``sum_k c_k g_k`` of sparse vectors or matrices given as ``(c_k, g_k)``."""
    out = {}
    for c, g in terms:
        for k, val in g.items():
            out[k] = out[k] + c * val if k in out else c * val
    return out


def _outer(g: dict, c=1.0) -> dict:
    """``c g g^T`` of a sparse vector."""
    return {(i, j): c * g[i] * g[j] for i in g for j in g if i <= j}


def _where(cond, a: dict, b: dict) -> dict:
    return {k: torch.where(cond, a.get(k, 0.0), b.get(k, 0.0)) for k in set(a) | set(b)}


def _varies(vec: dict, axis: int) -> bool:
    """Whether a sparse vector of node tangents varies along node axis ``axis`` (0 time nodes, 1 start nodes)."""
    return any(torch.is_tensor(t) and t.dim() == 4 and t.shape[axis] > 1 for t in vec.values())


def _node_sum(x: torch.Tensor, keep_t: bool, keep_z: bool) -> torch.Tensor:
    """Sum over the decision-time (axis 0) and start (axis 1) node axes not kept."""
    axes = tuple(i for i, keep in ((0, keep_t), (1, keep_z)) if not keep and x.shape[i] > 1)
    return x.sum(axes, keepdim=True) if axes else x


def _ddm7_hessian(x, rt, c_v, upper, m, log_c, shift, n_st: int, n_sz: int,
                  terms) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(S,)`` negative log-likelihood of the seven-parameter models, its ``(S, 7)`` gradient and its exact
    ``(S, 7, 7)`` Hessian by the chain rule.

    Per quadrature node the log density ``l`` depends on ``r = (dt, v, a, wn, sv)`` (decision time, drift,
    boundary, start, drift SD) and on the nodes' log weights; ``dt`` and the weights on ``(t0, st)`` (and on
    ``(a, z, sz)`` through the onset cut), the start nodes on ``(z, sz)``.  With ``Pi`` the posterior weight of
    each node (its share of the trial's density times the Wiener component's share of the mixture) and ``g``
    the node's gradient in the natural parameters, the log-likelihood's Hessian is
    ``sum_nodes Pi (grad^2 l + g g^T) - sum_trials gbar gbar^T`` (``gbar = sum_nodes Pi g`` of the trial),
    and the transforms' derivatives take it to the normalized parameters.  What depends on the time nodes or
    on the start nodes only is summed over the other axis first.  Arguments as :func:`_ddm4_terms`.
    """
    dtype = x.dtype
    col = lambda j: x[:, j:j + 1]  # noqa: E731
    a, t0, z, zbar = a_xform(col(1)), t0_xform(col(2)), norm2alpha(col(3)), torch.sigmoid(-col(3))
    sv, st, sz = sv_xform(col(4)), st_xform(col(5)), sz_xform(col(6))
    v = col(0) * c_v
    w, wbar = torch.where(upper, zbar, z), torch.where(upper, z, zbar)
    cw = 1.0 - 2.0 * upper.to(dtype)  # dw/dz
    q = _quadrature(rt, a, t0, w, wbar, st, sz, n_st, n_sz)
    wn, wbn, dt = q["wn"], q["wbn"], q["dt"]
    # start nodes: piecewise linear in (w, sz); their log weight log(span_w / sz)
    sp_z = q["spread_z"]
    xiz = (1.0 + q["xz"]) / 2.0
    b_w = (w < q["half"]).to(dtype)  # below = w (else sz / 2)
    o_w = (wbar < q["half"]).to(dtype)  # above = 1 - w (else sz / 2)
    b_s, o_s = torch.where(sp_z, 0.5 * (1.0 - b_w), 0.0), torch.where(sp_z, 0.5 * (1.0 - o_w), 0.0)
    S_w, S_s = b_w - o_w, b_s + o_s  # d span_w / dw, d span_w / dsz
    T_wn = {_Z: cw * (1.0 - b_w + S_w * xiz), _SZ: -b_s + S_s * xiz}
    span_w = torch.where(sp_z, q["span_w"], 1.0)
    g_span_w = _where(sp_z, {_Z: cw * S_w / span_w, _SZ: S_s / span_w}, {})
    g_addw = _lin((1.0, g_span_w), (-1.0, {_SZ: torch.where(sp_z, 1.0 / sz, 0.0)}))
    # decision-time nodes dt = exp(lam), lam = (1 - xi) log s_lo + xi log s_hi, and their log weights
    sp_t = q["spread_t"]
    xis = (1.0 + q["xs"]) / 2.0
    s_lo, onset = q["s_lo"], q["onset"]
    window = s_lo < q["s_hi"]  # elsewhere the nodes hold no density: harmless values keep the products finite
    s_hi = torch.where(window, q["s_hi"], 1.0)
    case_a = window & (q["st_lo"] > onset) & (q["st_lo"] > _T_MIN)  # s_lo = s_hi - st
    case_b = window & ~case_a & (onset > _T_MIN)  # s_lo = onset = (wn_0 a)^2 / 60
    st_lo = torch.where(case_a, q["st_lo"], 1.0)
    g_hi = {_T0: -1.0 / s_hi, _ST: 0.5 / s_hi}
    wn0 = wn[:, :1]
    t_wn0 = {k: t[:, :1] / wn0 for k, t in T_wn.items()}
    g_a = {_T0: -1.0 / st_lo, _ST: -0.5 / st_lo}
    g_b = _lin((2.0, t_wn0), (1.0, {_A: 2.0 / a}))
    g_lo = _where(case_a, g_a, _where(case_b, g_b, {}))
    g_lam = _lin((1.0 - xis, g_lo), (xis, g_hi))
    span = q["span"]
    g_span = _lin((1.0, g_hi), (-1.0, g_lo))
    g_dt = _where(sp_t, {k: dt * t for k, t in g_lam.items()}, {_T0: -1.0})
    g_addt = _where(sp_t, _lin((1.0 / span, g_span), (1.0, {_ST: -1.0 / st}), (1.0, g_lam)), {})
    # the node's log density (as _wfpt_lower) and its derivatives in r = (dt, v, a, wn, sv)
    ac = a.clamp_min(1e-6)
    a2 = ac * ac
    valid = (dt > _T_MIN) & q["keep"]
    t = torch.where(valid, dt, a2)
    u = t / a2
    near = wn <= 0.5
    lf = _log_f_parts(u, torch.where(near, wn, wbn).clamp_min(torch.finfo(dtype).tiny), near, terms, 2)
    s2 = sv * sv
    half_inv = 0.5 / (1.0 + s2 * t)
    by_t = q["add_t"] - torch.log(a2) + 0.5 * torch.log(2.0 * half_inv) - v * v * t * half_inv
    ell = lf[0] + torch.where(valid, by_t, _NEG) + (a2 * s2 * wn - 2.0 * ac * v) * wn * half_inv + q["add_w"]
    M = torch.logsumexp(ell, (0, 1))
    M = torch.where(valid.flatten(0, 1).any(0), M, _NEG)
    Pi = torch.exp(ell - M) * (torch.sigmoid(M + shift) * m)  # (n_st, n_sz, S, T)
    iD = 2.0 * half_inv  # 1 / (1 + sv^2 t)
    N = a2 * s2 * wn * wn - 2.0 * ac * v * wn - v * v * t
    sn = 2.0 * near.to(dtype) - 1.0
    l_u, l_y = lf[1], lf[2]
    du = {"dt": 1.0 / a2, "a": -2.0 * u / ac}
    dN = {"dt": -v * v, "v": -2.0 * ac * wn - 2.0 * v * t, "a": 2.0 * ac * s2 * wn * wn - 2.0 * v * wn,
          "wn": 2.0 * a2 * s2 * wn - 2.0 * ac * v, "sv": 2.0 * a2 * sv * wn * wn}
    dD = {"dt": s2, "sv": 2.0 * sv * t}
    R = ["dt", "v", "a", "wn", "sv"]
    F1 = {r: 0.5 * iD * dN[r] for r in R}
    F1["dt"] = F1["dt"] + l_u * du["dt"]
    F1["a"] = F1["a"] + l_u * du["a"] - 2.0 / ac
    F1["wn"] = F1["wn"] + sn * l_y
    for r in dD:  # -0.5 log D and the D in Q = N / 2D
        F1[r] = F1[r] - 0.5 * iD * dD[r] * (1.0 + N * iD)
    T = {"dt": g_dt, "v": {_V: c_v}, "a": {_A: torch.ones_like(a)}, "wn": T_wn, "sv": {_SV: torch.ones_like(sv)}}
    P_t, P_z = _node_sum(Pi, True, False), _node_sum(Pi, False, True)
    # the transforms' first and second derivatives
    s = {j: torch.sigmoid(-col(j)) for j in (1, 4, 5, 6)}
    s[2] = torch.sigmoid(2.2 - col(2))
    nat = {1: a, 2: t0, 4: sv, 5: st, 6: sz}
    K1 = {j: nat[j] * s[j] for j in nat}
    K1[1] = torch.where(a > 1e-6, K1[1], 0.0)
    K1[3] = z * zbar
    K = torch.cat([torch.ones_like(a)] + [K1[j] for j in range(1, 7)], 1)
    g = _lin(*((F1[r], T[r]) for r in R), (1.0, g_addt), (1.0, g_addw))
    G = torch.stack([g[i].expand(Pi.shape) for i in range(7)])
    GP = G * Pi
    Gt = GP.sum((1, 2))  # (7, S, T): m sig gbar of each trial
    H = torch.einsum("iabst,jabst->sij", GP, G) - torch.einsum("ist,jst->sij", Gt, Gt)
    # second derivatives of the nodes and their weights
    h_addw = _lin((-1.0, _outer(g_span_w)), (1.0, {(_SZ, _SZ): torch.where(sp_z, 1.0 / (sz * sz), 0.0)}))
    h_hi = _outer(g_hi, -1.0)
    h_lo = _where(case_a, _outer(g_a, -1.0),
                  _where(case_b, _lin((-2.0, _outer(t_wn0)), (1.0, {(_A, _A): -2.0 / (a * a)})), {}))
    h_lam = _lin((1.0 - xis, h_lo), (xis, h_hi))
    h_dt = _where(sp_t, _lin((dt, _outer(g_lam)), (dt, h_lam)), {})
    h_addt = _where(sp_t, _lin((1.0 / span, _lin((1.0, h_hi), (-1.0, h_lo))), (-1.0 / (span * span), _outer(g_span)),
                               (1.0, {(_ST, _ST): 1.0 / (st * st)}), (1.0, h_lam)), {})
    l_uu, l_uy, l_yy = lf[3:]
    ddu = {("dt", "a"): -2.0 / (a2 * ac), ("a", "a"): 6.0 * u / a2}
    ddN = {("dt", "v"): -2.0 * v, ("v", "v"): -2.0 * t, ("v", "a"): -2.0 * wn, ("v", "wn"): -2.0 * ac,
           ("a", "a"): 2.0 * s2 * wn * wn, ("a", "wn"): 4.0 * ac * s2 * wn - 2.0 * v,
           ("a", "sv"): 4.0 * ac * sv * wn * wn, ("wn", "wn"): 2.0 * a2 * s2, ("wn", "sv"): 4.0 * a2 * sv * wn,
           ("sv", "sv"): 2.0 * a2 * wn * wn}
    ddD = {("dt", "sv"): 2.0 * sv, ("sv", "sv"): 2.0 * t}
    Hs = {}

    def add(i, j, val):
        k = (min(i, j), max(i, j))
        Hs[k] = Hs[k] + val if k in Hs else val

    for i, r in enumerate(R):
        for r2 in R[i:]:
            k = (r, r2)
            f2 = 0.5 * iD * ddN[k] if k in ddN else 0.0
            if r in du and r2 in du:
                f2 = f2 + l_uu * du[r] * du[r2] + (l_u * ddu[k] if k in ddu else 0.0)
            if r2 == "wn" and r in du:
                f2 = f2 + sn * l_uy * du[r]
            if k == ("wn", "wn"):
                f2 = f2 + l_yy
            if k == ("a", "a"):
                f2 = f2 + 2.0 / a2
            if k in ddD:
                f2 = f2 - (0.5 + 0.5 * N * iD) * iD * ddD[k]
            if r in dD and r2 in dD:
                f2 = f2 + (0.5 + N * iD) * iD * iD * dD[r] * dD[r2]
            if r2 in dD:
                f2 = f2 - 0.5 * iD * iD * dN[r] * dD[r2]
            if r in dD:
                f2 = f2 - 0.5 * iD * iD * dN[r2] * dD[r]
            if isinstance(f2, float):
                continue
            # sum_nodes Pi f2 (T_r T_r2^T + T_r2 T_r^T): the time-node tangents of dt meet the start-node ones of wn
            Tr, Tr2 = T[r], T[r2]
            if _varies(Tr, 0) and _varies(Tr2, 1) and not _varies(Tr, 1):
                P = Pi * f2
                Tr2 = {j: _node_sum(P * tj, True, False) for j, tj in Tr2.items()}
                pairs = [(i1, j1, ti * Tr2[j1]) for i1, ti in Tr.items() for j1 in Tr2]
            else:
                P = _node_sum(Pi * f2, _varies(Tr, 0) or _varies(Tr2, 0), _varies(Tr, 1) or _varies(Tr2, 1))
                pairs = [(i1, j1, P * ti * tj) for i1, ti in Tr.items() for j1, tj in Tr2.items()
                         if r != r2 or i1 <= j1]
            for i1, j1, val in pairs:
                val = val.sum((0, 1, 3))
                add(i1, j1, 2.0 * val if (r != r2 and i1 == j1) else val)
    P_dt = _node_sum(Pi * F1["dt"], True, False)
    for h, P in ((h_addt, P_t), (h_dt, P_dt), (h_addw, P_z)):
        for (i, j), val in h.items():
            add(i, j, (P * val).sum((0, 1, 3)))
    zero = torch.zeros(H.shape[0], dtype=dtype, device=x.device)
    H = H + torch.stack([torch.stack([Hs.get((min(i, j), max(i, j)), zero) for j in range(7)], -1)
                         for i in range(7)], -2)
    K2 = {j: K1[j] * (2.0 * s[j] - 1.0) for j in nat}
    K2[3] = K1[3] * (zbar - z)
    K2 = torch.cat([torch.zeros_like(a)] + [K2[j] for j in range(1, 7)], 1)
    B = Gt.sum(-1).T  # (S, 7): the log-likelihood's gradient in the natural parameters
    nll = -((log_c + F.softplus(M + shift, threshold=40.0)) * m).sum(1)
    return nll, -K * B, -(K.unsqueeze(-1) * K.unsqueeze(-2) * H + torch.diag_embed(K2 * B))


# ----------------------------------------------------------------------------------------------------
# Four-parameter models: value, gradient and exact Hessian per subject by the chain rule
# ----------------------------------------------------------------------------------------------------
# In ddm4 and ddm4_lotto every normalized parameter reaches a trial through one per-trial quantity of its own:
# the mirrored drift v = v_coef c_v (c_v = +-dv), the boundary a, the decision time t = rt - t0 and the
# mirrored start w (z or 1 - z).  With l the trial's Wiener log density, l_i its derivatives in q = (v, a, t, w),
# pi the share of the Wiener component in the trial's mixture with the contaminant, h_i = c_i l_i (c = (c_v, 1,
# -1, +-1) the trial's signs and design) and K_i, K''_i the derivatives of the transforms, a subject's gradient
# and Hessian of the negative log-likelihood are
#     G_i = -K_i sum_t pi h_i,
#     H_ij = -K_i K_j sum_t [pi c_i c_j l_ij + pi (1 - pi) h_i h_j] - delta_ij K''_i sum_t pi h_i,
# a few dozen tensor operations per call instead of autograd through every operation, and the exact Hessian
# without torch.func's P Hessian-vector products.  The autograd path (_ddm_nll) is the reference (tests).
_PAIRS = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]
_PAIR_INDEX = [[_PAIRS.index((min(i, j), max(i, j))) for j in range(4)] for i in range(4)]


def _ddm4_terms(x, rt, c_v, upper, m, log_c, shift, terms, order: int):
    """Negative log-likelihood ``(S,)`` of the four-parameter models; with ``order=1`` also its gradient
    ``(S, 4)``; with ``order=2`` also its Hessian ``(S, 4, 4)``.

    ``x`` ``(S, 4)`` normalized parameters; per trial ``(S, T)``: ``rt``, ``c_v`` (the design's drift
    difference, negated on upper-boundary trials), ``upper`` (bool), ``m`` (mask as 0/1); per subject
    ``(S, 1)``: ``log_c`` (log of the contaminant's density) and ``shift`` (``log(1 - p_outlier) - log_c``).
    """
    v = x[:, :1] * c_v
    a, t0 = a_xform(x[:, 1:2]), t0_xform(x[:, 2:3])
    z, zbar = norm2alpha(x[:, 3:4]), torch.sigmoid(-x[:, 3:4])
    w, wbar = torch.where(upper, zbar, z), torch.where(upper, z, zbar)
    ac = a.clamp_min(1e-6)
    a2 = ac * ac
    t = rt - t0
    valid = t > _T_MIN
    t = torch.where(valid, t, a2)  # a harmless time where the density is zero
    u = t / a2
    near = w <= 0.5
    lf = _log_f_parts(u, torch.where(near, w, wbar).clamp_min(torch.finfo(x.dtype).tiny), near, terms, order)
    ell = lf[0] + torch.where(valid, -torch.log(a2) - 0.5 * v * v * t, _NEG) + (0.0 - v * ac * w)
    mix = ell + shift
    if order == 0:
        return -((log_c + F.softplus(mix, threshold=40.0)) * m).sum(1)
    pi = torch.sigmoid(mix) * m
    sn = 2.0 * near.to(x.dtype) - 1.0  # dy/dw, y = min(w, 1 - w)
    cw = 1.0 - 2.0 * upper.to(x.dtype)  # dw/dz
    l_u, l_y = lf[1], lf[2]
    u_a = -2.0 * u / ac  # du/da
    h = torch.stack([c_v * (0.0 - v * t - ac * w), l_u * u_a - 2.0 / ac - v * w, 0.5 * v * v - l_u / a2,
                     cw * (sn * l_y - v * ac)], -1)  # (S, T, 4)
    B = (pi.unsqueeze(-1) * h).sum(1)  # (S, 4)
    s_a, s_t = torch.sigmoid(-x[:, 1:2]), torch.sigmoid(2.2 - x[:, 2:3])
    K = torch.cat([torch.ones_like(a), torch.where(a > 1e-6, a * s_a, 0.0), t0 * s_t, z * zbar], 1)  # (S, 4)
    nll = -((log_c + F.softplus(mix, threshold=40.0)) * m).sum(1)
    if order == 1:
        return nll, -K * B
    l_uu, l_uy, l_yy = lf[3], lf[4], lf[5]
    ia2 = 1.0 / a2
    second = torch.stack([  # c_i c_j l_ij in the order of _PAIRS
        -c_v * c_v * t, -c_v * w, c_v * v, -c_v * cw * ac,
        l_uu * u_a * u_a + 6.0 * l_u * u * ia2 + 2.0 * ia2, 2.0 * ia2 / ac * (l_uu * u + l_u),
        cw * (sn * l_uy * u_a - v),
        l_uu * ia2 * ia2, -cw * sn * l_uy * ia2, l_yy], -1)
    A = (pi.unsqueeze(-1) * second).sum(1)[:, _PAIR_INDEX]  # (S, 4, 4)
    rho = pi * torch.sigmoid(-mix)  # pi (1 - pi) on real trials
    Hq = A + (h * rho.unsqueeze(-1)).transpose(1, 2) @ h
    K2 = torch.cat([torch.zeros_like(a), K[:, 1:2] * (s_a - torch.sigmoid(x[:, 1:2])),
                    K[:, 2:3] * (s_t - torch.sigmoid(x[:, 2:3] - 2.2)), K[:, 3:4] * (zbar - z)], 1)
    return nll, -K * B, -(K.unsqueeze(-1) * K.unsqueeze(-2) * Hq + torch.diag_embed(K2 * B))


def _prepare(rt, choice, dv, mask, p_outlier: float, dtype) -> tuple:
    """Per-trial ``(S, T)`` ``rt``, ``c_v`` (drift difference, negated on upper-boundary trials), ``upper``,
    mask as 0/1, and per-subject ``(S, 1)`` ``log_c`` and ``shift`` of :func:`_ddm4_terms` and
    :func:`_ddm7_hessian`."""
    S = rt.shape[0]
    rt_f = fill_padding(rt, mask, 1.0, dtype).reshape(S, -1)
    upper = (fill_padding(choice, mask, 0, dtype) > 0.5).reshape(S, -1)
    dv = fill_padding(dv, mask, 0.0, dtype).reshape(S, -1)
    mask = mask.reshape(S, -1)
    rt_max = torch.where(mask, rt_f, torch.zeros_like(rt_f)).amax(1, keepdim=True)
    log_c = math.log(p_outlier / 2.0) - torch.log(rt_max)
    return rt_f, torch.where(upper, -dv, dv), upper, mask.to(dtype), log_c, math.log1p(-p_outlier) - log_c


def _ddm4_nll(params, rt, choice, dv, mask, p_outlier: float, err: float) -> torch.Tensor:
    """``(S,)`` negative log-likelihood of ``ddm4``/``ddm4_lotto`` by :func:`_ddm4_terms` (``0 < p_outlier < 1``)."""
    data, terms = _prepare(rt, choice, dv, mask, p_outlier, params.dtype), series_terms(err)
    if torch.is_grad_enabled() and params.requires_grad:
        return _SubjectNLL.apply(params, lambda x, order: _ddm4_terms(x, *data, terms, order))[0]
    return _ddm4_terms(params, *data, terms, order=0)


# ----------------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------------
_CORE = ["v_coef", "a", "t0", "z"]
_CORE_XFORM = [identity, a_xform, t0_xform, norm2alpha]
_VAR = ["sv", "st", "sz"]
_VAR_XFORM = [sv_xform, st_xform, sz_xform]
# what the subject produced (a missing one marks a skipped trial with missing="skip"); the choice is not
# categorical: its code says which boundary (1 upper, 0 lower), so text labels are not accepted
_RESPONSES = ["rt", "choice"]


def _check_rt_choice(batch) -> None:
    """``rt`` (field 0) positive, finite and in seconds; ``choice`` (field 1) 0/1."""
    rt, mask = batch.data[0], batch.mask
    reject_subject(batch, ~(torch.isfinite(rt) & (rt > 0)) & mask, 0,
                   "must hold positive, finite response times (seconds)")
    filled = torch.where(mask, rt, torch.full_like(rt, float("nan"))).reshape(len(batch), -1)
    reject_subject(batch, filled.nanmedian(1).values > 20.0, 0,
                   "has a median response time above 20; response times must be in seconds, not milliseconds")
    check_categorical(batch, 1, 2)


def _ddm_nll(nat: dict, zbar: torch.Tensor, rt: torch.Tensor, choice: torch.Tensor, dv: torch.Tensor,
             mask: torch.Tensor, output: str, p_outlier: float, n_st: int, n_sz: int, err: float, extra=None):
    """Shared DDM likelihood: drift ``v_coef * dv`` per trial; per-subject parameters in ``nat`` ``(S,)``."""
    view = (-1,) + (1,) * (rt.dim() - 1)
    dtype = nat["a"].dtype
    per = {k: p.reshape(view) for k, p in nat.items()}
    rt_f = fill_padding(rt, mask, 1.0, dtype)
    choice_f = fill_padding(choice, mask, 0, dtype)
    dv = fill_padding(dv, mask, 0.0, dtype)
    v = per["v_coef"] * dv
    rt_max = torch.where(mask, rt_f, torch.zeros_like(rt_f)).reshape(rt.shape[0], -1).amax(1).reshape(view)
    log_p, log_c = ddm_trial_logpdf(rt_f, choice_f, v, per["a"], per["t0"], per["z"], per.get("sv"), per.get("st"),
                                    per.get("sz"), zbar=zbar.reshape(view), rt_max=rt_max, p_outlier=p_outlier,
                                    n_st=n_st, n_sz=n_sz, err=err)
    nll = -sum_trials(log_p, mask)
    if output != "all":
        return nll
    out = {"params": torch.stack(list(nat.values()), -1), "nll": nll, "v": v * mask,
           "logp": log_p * mask, "p_contaminant": torch.exp(log_c - log_p) * mask, "rt": rt, "choice": choice}
    out.update(extra or {})
    return out


def _natural(params: torch.Tensor, variability: bool) -> tuple[dict, torch.Tensor]:
    names, xforms = (_CORE + _VAR, _CORE_XFORM + _VAR_XFORM) if variability else (_CORE, _CORE_XFORM)
    nat = {n: t(params[:, j]) for j, (n, t) in enumerate(zip(names, xforms))}
    return nat, torch.sigmoid(-params[:, 3])  # 1 - z without rounding


_FIT_DOC = """

    Parameters
    ----------
    params : Tensor
        ``(S, {P})`` normalized ``[{names}]``.
    rt : Tensor
        ``(S, T)`` (or ``(S, B, T)``) response times in seconds.
    choice : Tensor
        Same shape, 1 = {upper} (upper boundary), 0 = {lower} (lower boundary).
    {a}, {b} : Tensor
        Same shape; drift ``v = v_coef * ({a} - {b})``.
    mask : Tensor, optional
        ``True`` on real trials.
    output : {{"nll", "all"}}
        ``"nll"``: ``(S,)`` negative log-likelihood.  ``"all"``: dict with
        ``params`` (natural ``(S, {P})``), ``nll``, per trial ``v`` (drift),
        ``logp`` (log-likelihood), ``p_contaminant`` (posterior probability of
        the contaminant), ``rt``, ``choice``.
    p_outlier : float
        Contaminant probability (module notes; default :data:`P_OUTLIER`).
    err : float
        Relative error bound of the series."""

_QUAD_DOC = """
    n_st, n_sz : int
        Gauss-Legendre orders of the ``st`` and ``sz`` integrals (default 7 and 5)."""


def _value_model(name: str, inputs: Sequence[str], upper: str, lower: str, variability: bool):
    """A DDM whose drift is ``v_coef`` times the difference of two value columns."""
    names = _CORE + (_VAR if variability else [])
    xforms = _CORE_XFORM + (_VAR_XFORM if variability else [])

    @model_spec(param_names=names, param_xform=xforms, inputs=["rt", "choice", *inputs], responses=_RESPONSES,
                check_data=_check_rt_choice)
    def fit(params: torch.Tensor, rt: torch.Tensor, choice: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
            mask: torch.Tensor | None = None, output: str = "nll", *, p_outlier: float = P_OUTLIER,
            n_st: int = N_ST, n_sz: int = N_SZ, err: float = 1e-12):
        mask = default_mask(mask, rt)
        dv = first - second

        def by_autograd(x, output="nll"):
            nat, zbar = _natural(x, variability)
            return _ddm_nll(nat, zbar, rt, choice, dv, mask, output, p_outlier, n_st, n_sz, err,
                            {inputs[0]: first, inputs[1]: second})

        if output == "nll" and 0.0 < p_outlier < 1.0:  # derivatives by the chain rule (tested against autograd)
            if not variability:
                return _ddm4_nll(params, rt, choice, dv, mask, p_outlier, err)
            if torch.is_grad_enabled() and params.requires_grad:
                data = _prepare(rt, choice, dv, mask, p_outlier, params.dtype)
                value_grad = _autograd_value_grad(by_autograd)

                def derivs(x, order):
                    return value_grad(x) if order == 1 else _ddm7_hessian(x, *data, n_st, n_sz, series_terms(err))

                return _SubjectNLL.apply(params, derivs)[0]
        return by_autograd(params, output)

    def own(order: int, params: torch.Tensor, rt: torch.Tensor, choice: torch.Tensor, first: torch.Tensor,
            second: torch.Tensor, mask: torch.Tensor | None = None, *, p_outlier: float = P_OUTLIER,
            n_st: int = N_ST, n_sz: int = N_SZ, err: float = 1e-12):
        """The model's own derivatives for the engine (:mod:`torchem.model`, "Own derivatives"), by the chain
        rule without autograd: ``order=1`` ``(nll (S,), grad (S, 4))`` (four-parameter models), ``order=2``
        ``(S, P, P)`` Hessians.  Without a contaminant (``p_outlier=0``) by autograd through ``fit``."""
        mask = default_mask(mask, rt)
        if not 0.0 < p_outlier < 1.0:
            def nll(x):
                return fit(x, rt, choice, first, second, mask=mask, p_outlier=p_outlier, n_st=n_st, n_sz=n_sz,
                           err=err)

            return _autograd_value_grad(nll)(params) if order == 1 else batched_hessian(nll, params)
        data, terms = _prepare(rt, choice, first - second, mask, p_outlier, params.dtype), series_terms(err)
        if variability:  # order 2 only: the value and gradient are autograd's anyway
            return _ddm7_hessian(params.detach(), *data, n_st, n_sz, terms)[2]
        out = _ddm4_terms(params.detach(), *data, terms, order)
        return out if order == 1 else out[2]

    if not variability:
        fit.value_and_grad = functools.partial(own, 1)
    fit.hessian = functools.partial(own, 2)

    fit.__name__ = fit.__qualname__ = f"{name}_fit"
    task = ("high vs low value: two certain amounts, the higher one is the correct (upper) response"
            if upper == "high" else "safe vs risky: a gamble against a certain amount, drift can point either way")
    extra = (" plus across-trial drift SD ``sv`` (sv_xform, 0-2.5), non-decision-time range ``st`` "
             "(st_xform, 0-0.4 s) and start-point range ``sz`` (sz_xform, 0-0.9); ``sv = st = sz = 0`` is "
             f"``{name.replace('7', '4')}``" if variability else "")
    fit.__doc__ = (f"pyEM's ``{name}``: drift-diffusion model of {task}.\n\n"
                   f"    Drift ``v = v_coef * ({inputs[0]} - {inputs[1]})``; parameters ``v_coef`` (identity), "
                   "``a`` (a_xform, 0-4), ``t0`` (t0_xform, 0-0.5 s), ``z`` (norm2alpha)" + extra + ".  "
                   "The likelihood is the exact Wiener first-passage density mixed with a contaminant "
                   "(:mod:`torchem.models.ddm`)."
                   + _FIT_DOC.format(P=len(names), names=", ".join(names), upper=upper, lower=lower,
                                     a=inputs[0], b=inputs[1])
                   + (_QUAD_DOC if variability else "") + "\n    ")
    return fit


ddm4_fit = _value_model("ddm4", ["value_high", "value_low"], "high", "low", False)
ddm4_lotto_fit = _value_model("ddm4_lotto", ["ev_risky", "safe"], "risky", "safe", False)
ddm7_fit = _value_model("ddm7", ["value_high", "value_low"], "high", "low", True)
ddm7_lotto_fit = _value_model("ddm7_lotto", ["ev_risky", "safe"], "risky", "safe", True)


@model_spec(param_names=_CORE + ["alpha"], param_xform=_CORE_XFORM + [norm2alpha], inputs=["rt", "choice", "reward"],
            responses=_RESPONSES, check_data=_check_rt_choice)
def rlddm_fit(params: torch.Tensor, rt: torch.Tensor, choice: torch.Tensor, reward: torch.Tensor,
              mask: torch.Tensor | None = None, output: str = "nll", *, p_outlier: float = P_OUTLIER,
              err: float = 1e-12):
    r"""Reinforcement-learning DDM: a Rescorla-Wagner bandit learner whose choices and RTs follow a DDM.

    Two options (0 = lower boundary, 1 = upper boundary) with values starting
    at 0.5 in every block; after each choice the chosen value moves toward the
    reward, ``Q(c) += alpha (r - Q(c))``.  The drift of trial ``t`` is
    ``v_coef * (Q_t(1) - Q_t(0))`` (Pedersen, Frank & Biele, 2017; Fontanesi
    et al., 2019).  The values are a linear recurrence solved for all trials at
    once (:func:`~torchem.models.recurrence.linear_scan`).

    Parameters
    ----------
    params : Tensor
        ``(S, 5)`` normalized ``[v_coef, a, t0, z, alpha]`` (identity, a_xform,
        t0_xform, norm2alpha, norm2alpha).
    rt, choice, reward : Tensor
        ``(S, B, T)`` blocks of trials or ``(S, T)``: response times (seconds),
        choices (0/1) and rewards.
    mask : Tensor, optional
        ``True`` on real trials.
    output : {"nll", "all"}
        ``"nll"``: ``(S,)``.  ``"all"``: dict as :func:`ddm4_fit` plus ``Q``
        (``(..., T, 2)`` values before each trial) and ``PE`` (prediction errors).
    p_outlier, err : float
        As in :func:`ddm4_fit`.

    References
    ----------
    Pedersen, M. L., Frank, M. J., & Biele, G. (2017). *Psychon. Bull. Rev.*, 24, 1234-1251.
    """
    mask = default_mask(mask, rt)
    nat, zbar = _natural(params[:, :4], False)
    alpha = norm2alpha(params[:, 4])
    (c, r, m), lead = as_blocks(choice, reward, mask)
    dtype = params.dtype
    c = fill_padding(c, m, 0, dtype)
    r = fill_padding(r, m, 0.0, dtype)
    al = alpha.repeat_interleave(c.shape[0] // params.shape[0])[:, None]
    # deviation of each value from its start 0.5: y_t = (1 - alpha) y_{t-1} + alpha (r - 0.5) on the option's trials
    visits = torch.stack([(1.0 - c) * m, c * m], 0)  # (2, rows, T)
    q = 0.5 + linear_scan(1.0 - al * visits, al * (r - 0.5) * visits)
    dv = (q[1] - q[0]).reshape(rt.shape)
    extra = None
    if output == "all":
        qq = q.permute(1, 2, 0).reshape(*rt.shape, 2)
        pe = (r - torch.where(c > 0.5, q[1], q[0])) * m
        extra = {"Q": qq, "PE": pe.reshape(rt.shape), "reward": reward}
        nat = {**nat, "alpha": alpha}
    return _ddm_nll(nat, zbar, rt, choice, dv, mask, output, p_outlier, 1, 1, err, extra)


# ----------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------
def ddm_options(fit_func: Callable, **options) -> Callable:
    """A library DDM with other likelihood options, keeping its names, transforms, inputs and simulator.

    Parameters
    ----------
    fit_func : callable
        :func:`ddm4_fit`, :func:`ddm7_fit`, ... (or a function returned by this one).
    **options
        ``p_outlier`` (contaminant probability, 0 for the plain Wiener
        likelihood), ``n_st``, ``n_sz`` (quadrature orders of the
        seven-parameter models) and ``err`` (series error bound).

    Returns
    -------
    callable
        ``fit(params, *data, mask=None, output="nll")`` for :class:`~torchem.EMModel`.

    Examples
    --------
    >>> fit = ddm_options(ddm7_fit, n_st=11, n_sz=11, p_outlier=0.05)   # doctest: +SKIP
    >>> EMModel(df, fit, columns=fit.inputs)                              # doctest: +SKIP
    """
    base = getattr(fit_func, "base_fit", fit_func)
    opts = {**getattr(fit_func, "options", {}), **options}
    allowed = {"p_outlier", "err"} | ({"n_st", "n_sz"} if "sv" in base.param_names else set())
    unknown = set(opts) - allowed
    if unknown:
        raise ValueError(f"{base.__name__} takes the options {sorted(allowed)}, not {sorted(unknown)}")

    @functools.wraps(base)
    def fit(params, *data, mask=None, output="nll"):
        return base(params, *data, mask=mask, output=output, **opts)

    fit.base_fit, fit.options = base, opts
    for name in ("value_and_grad", "hessian"):  # the model's own derivatives, with the same options
        if hasattr(base, name):
            setattr(fit, name, functools.partial(_with_options, getattr(base, name), opts))
    return fit


def _with_options(derivative: Callable, opts: dict, params, *data, mask=None):
    return derivative(params, *data, mask=mask, **opts)


# ----------------------------------------------------------------------------------------------------
# Simulators
# ----------------------------------------------------------------------------------------------------
def _check_natural(p: np.ndarray, names: Sequence[str]) -> None:
    bounds = {"a": (0.0, 4.0), "t0": (0.0, 0.5), "z": (0.0, 1.0), "sv": (0.0, 2.5), "st": (0.0, 0.4),
              "sz": (0.0, 0.9), "alpha": (0.0, 1.0)}
    for j, n in enumerate(names):
        if n in bounds:
            lo, hi = bounds[n]
            inside = (p[:, j] > lo) & (p[:, j] < hi) if n in ("a", "z", "alpha") else (p[:, j] >= lo) & (p[:, j] < hi)
            if not inside.all():
                raise ValueError(f"{n} must be in the range of its transform ({lo:g}, {hi:g}); "
                                 f"subject {int(np.flatnonzero(~inside)[0])} has {p[~inside, j][0]:g}")


def draw_trials(p: np.ndarray, names: Sequence[str], dv: np.ndarray, rng: np.random.Generator):
    """Choices and RTs of ``(S, ...)`` trials with drift ``v_coef * dv`` and per-subject natural parameters
    ``p`` ``(S, P)`` named ``names`` (across-trial variability drawn where ``sv``, ``st``, ``sz`` are named);
    returns ``rt``, ``choice`` and the drift ``v``.  Used by the simulators and the posterior predictive checks."""
    col = {n: p[:, j].reshape((-1,) + (1,) * (dv.ndim - 1)) for j, n in enumerate(names)}
    shape = dv.shape
    col["v"] = col["v_coef"] * dv
    v = col["v"]
    rt = np.zeros(shape)
    choice = np.zeros(shape, dtype=np.int64)
    todo = np.ones(shape, dtype=bool)
    pick = lambda name: np.broadcast_to(col[name], shape)[todo]  # noqa: E731
    while todo.any():  # responses at or before 0 (a negative t0 draw) are drawn again
        vt, zt, t0 = pick("v"), pick("z"), pick("t0")
        if "sv" in col:
            vt = vt + pick("sv") * rng.standard_normal(vt.shape)
        if "sz" in col:
            zt = zt + pick("sz") * (rng.random(zt.shape) - 0.5)
        if "st" in col:
            t0 = t0 + pick("st") * (rng.random(t0.shape) - 0.5)
        t, up = simulate_first_passage(vt, pick("a"), zt, rng)
        rt[todo], choice[todo] = t0 + t, up
        todo = rt <= 0
    return rt, choice, v


def _highlow_design(S: int, T: int, rng: np.random.Generator) -> dict:
    low = rng.uniform(1.0, 3.0, (S, T))
    return {"value_high": low + rng.uniform(0.1, 1.5, (S, T)), "value_low": low}


def _lotto_design(S: int, T: int, rng: np.random.Generator) -> dict:
    ev = rng.uniform(0.1, 0.9, (S, T)) * rng.uniform(1.0, 4.0, (S, T))
    return {"ev_risky": ev, "safe": ev - rng.uniform(-1.2, 1.2, (S, T))}


def _value_simulator(fit: Callable, design: Callable, doc: str) -> Callable:
    keys = fit.inputs[2:]

    def simulate(params: np.ndarray, ntrials: int = 150, seed: int | None = None, **values) -> dict:
        p = natural_params(params, fit.param_names)
        _check_natural(p, fit.param_names)
        rng = np.random.default_rng(seed)
        unknown = set(values) - set(keys)
        if unknown:
            raise ValueError(f"unknown design arrays {sorted(unknown)}; {fit.__name__} takes {keys}")
        if values:
            if set(values) != set(keys):
                raise ValueError(f"give both design arrays {keys} or neither")
            vals = {k: np.broadcast_to(np.asarray(values[k], dtype=float), (len(p), np.shape(values[k])[-1]))
                    for k in keys}
        else:
            vals = design(len(p), ntrials, rng)
        rt, choice, v = draw_trials(p, fit.param_names, vals[keys[0]] - vals[keys[1]], rng)
        return {"params": p.copy(), "rt": rt, "choice": choice, **{k: np.array(vals[k]) for k in keys}, "v": v}

    simulate.__name__ = simulate.__qualname__ = fit.__name__.replace("_fit", "_simulate")
    simulate.__doc__ = doc
    fit.simulate = simulate
    return simulate


_SIM_DOC = """Simulate :func:`{fit}` subjects with exact first passages (:func:`simulate_first_passage`).

    Parameters
    ----------
    params : ndarray
        ``(S, {P})`` natural ``[{names}]``.
    ntrials : int
        Trials per subject (default 150) when the design is drawn.
    seed : int, optional
        Seed of the random stream.
    {a}, {b} : ndarray, optional
        ``(S, T)`` or ``(T,)`` design to simulate on (e.g. a fitted data set, for
        posterior predictive checks); default: pyEM's design, {design}.

    Returns
    -------
    dict
        ``params``, ``rt`` ``(S, T)`` seconds, ``choice`` ``(S, T)`` int
        (1 = {upper}), ``{a}``, ``{b}``, ``v`` (mean drift per trial).
    """
_HIGHLOW = "value_low ~ U(1, 3), value_high = value_low + U(0.1, 1.5)"
_LOTTO = "ev_risky = U(0.1, 0.9) * U(1, 4), safe = ev_risky - U(-1.2, 1.2)"
for _fit, _design, _text, _upper in ((ddm4_fit, _highlow_design, _HIGHLOW, "high"),
                                     (ddm7_fit, _highlow_design, _HIGHLOW, "high"),
                                     (ddm4_lotto_fit, _lotto_design, _LOTTO, "risky"),
                                     (ddm7_lotto_fit, _lotto_design, _LOTTO, "risky")):
    _value_simulator(_fit, _design, _SIM_DOC.format(fit=_fit.__name__, P=len(_fit.param_names),
                                                    names=", ".join(_fit.param_names), a=_fit.inputs[2],
                                                    b=_fit.inputs[3], design=_text, upper=_upper))
ddm4_simulate, ddm7_simulate = ddm4_fit.simulate, ddm7_fit.simulate
ddm4_lotto_simulate, ddm7_lotto_simulate = ddm4_lotto_fit.simulate, ddm7_lotto_fit.simulate


def rlddm_simulate(params: np.ndarray, nblocks: int = 4, ntrials: int = 30, reward_probs=None,
                   seed: int | None = None) -> dict:
    """Simulate :func:`rlddm_fit` learners on a two-armed bandit, trial by trial.

    Parameters
    ----------
    params : ndarray
        ``(S, 5)`` natural ``[v_coef, a, t0, z, alpha]``.
    nblocks, ntrials : int
        Blocks and trials per block; values restart at 0.5 in every block.
    reward_probs : array_like, optional
        ``(2,)`` or ``(nblocks, 2)`` reward probability of options 0 and 1;
        default: 0.2 / 0.8 in even blocks and 0.8 / 0.2 in odd ones (the better
        option alternates, so a start-point bias is not confounded with learning).
    seed : int, optional
        Seed of the random stream.

    Returns
    -------
    dict
        ``params``, ``rt``, ``choice`` (int), ``reward``, ``v`` (mean drift),
        each ``(S, B, T)``, and ``Q`` ``(S, B, T, 2)`` (values before each trial).
    """
    p = natural_params(params, rlddm_fit.param_names)
    _check_natural(p, rlddm_fit.param_names)
    rng = np.random.default_rng(seed)
    S = len(p)
    if reward_probs is None:
        reward_probs = [[0.2, 0.8] if b % 2 == 0 else [0.8, 0.2] for b in range(nblocks)]
    probs = np.broadcast_to(np.asarray(reward_probs, dtype=float), (nblocks, 2))
    out = {k: np.zeros((S, nblocks, ntrials)) for k in ("rt", "reward", "v")}
    out["choice"] = np.zeros((S, nblocks, ntrials), dtype=np.int64)
    Q = np.zeros((S, nblocks, ntrials, 2))
    q = np.full((S, nblocks, 2), 0.5)
    alpha = p[:, 4][:, None]
    for t in range(ntrials):
        Q[:, :, t] = q
        rt, c, v = draw_trials(p[:, :4], _CORE, q[..., 1] - q[..., 0], rng)
        r = (rng.random((S, nblocks)) < probs[np.arange(nblocks)[None, :], c]).astype(float)
        chosen = np.take_along_axis(q, c[..., None], -1)[..., 0]
        np.put_along_axis(q, c[..., None], (chosen + alpha * (r - chosen))[..., None], -1)
        out["rt"][:, :, t], out["choice"][:, :, t], out["reward"][:, :, t], out["v"][:, :, t] = rt, c, r, v
    return {"params": p.copy(), **out, "Q": Q}


rlddm_fit.simulate = rlddm_simulate


# ----------------------------------------------------------------------------------------------------
# Summaries of response-time distributions
# ----------------------------------------------------------------------------------------------------
def rt_quantiles(rt, choice, mask=None, quantiles: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
                 subject_ids: Sequence | None = None) -> pd.DataFrame:
    """Response-time quantiles per subject and choice (data or simulations), for predictive checks.

    Parameters
    ----------
    rt, choice : array_like or Tensor
        ``(S, ...)`` response times and 0/1 choices (trial axes flattened).
    mask : array_like or Tensor, optional
        ``(S, ...)`` ``True`` on real trials (default: every finite ``rt``).
    quantiles : sequence of float
        Probabilities of the quantiles (default the 10/30/50/70/90% of
        quantile-probability plots).
    subject_ids : sequence, optional
        Labels of the ``S`` subjects (default ``0..S-1``).

    Returns
    -------
    DataFrame
        Index ``(subject, choice)``; columns ``n`` (trials), ``p`` (share of the
        subject's trials with that choice) and one column per quantile
        (``q0.1``, ...; NaN where the choice never occurs).
    """
    as_np = lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)  # noqa: E731
    rt = as_np(rt).astype(float)
    S = rt.shape[0]
    rt = rt.reshape(S, -1)
    choice = as_np(choice).reshape(S, -1)
    mask = np.isfinite(rt) if mask is None else as_np(mask).reshape(S, -1).astype(bool)
    ids = list(range(S)) if subject_ids is None else list(subject_ids)
    rows = []
    for i in range(S):
        n_all = int(mask[i].sum())
        for c in (0, 1):
            sel = mask[i] & (choice[i] == c)
            qs = np.quantile(rt[i, sel], quantiles) if sel.any() else np.full(len(quantiles), np.nan)
            rows.append({"subject": ids[i], "choice": c, "n": int(sel.sum()), "p": sel.sum() / max(n_all, 1),
                         **{f"q{q:g}": v for q, v in zip(quantiles, qs)}})
    return pd.DataFrame(rows).set_index(["subject", "choice"])
