"""Stopping rules of the EM loop: small objects with their own history.

A rule sees one *plain EM step* at a time: the E-steps at group ``a`` and at
``b = M(E(a))``, and the next M-step's group ``c = M(E(b))``.  Plain EM makes
one such step per iteration; an accelerated cycle makes one per cycle (its
extrapolated points are not EM steps and are not judged).  ``update``
returns whether the fit has converged and a short description for the
history and the result.

- :class:`LMERule` (``"lme"``, the default): the summed Laplace log evidence
  ``L`` changes by ``d = L(b) - L(a)`` over the step; with the linear rate
  ``r = |c - b| / |b - a|`` of the group hyperparameters (the largest of the
  last three steps' rates, at most 0.99), the remaining change to the fixed
  point is about ``|d| / (1 - r)`` (Aitken); converged when that projection
  stays below ``crit`` for two steps in a row.  Converged when that
  projection is below ``crit``.  Unlike a bare ``|d| < crit`` it does not stop
  a slowly crawling EM far from its fixed point, and unlike the NPL it has a
  finite limit when a group variance shrinks towards 0.
- :class:`NPLRule` (``"npl"``, pyEM's): the subjects' NPL, each rounded to
  ``precision`` decimals, aggregated by ``method`` (sum, mean, median),
  changes by less than ``crit`` (``custom="relative_npl"``: relatively;
  ``"running_average"``: from the mean of the last five values).
- :class:`GroupRule` (``"group"``): every group location and scale changes by
  less than ``tol`` relative (``|new - old| / (1 + |old|)``) for ``window``
  steps in a row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .groups import GroupFamily

__all__ = ["EMStep", "LMERule", "NPLRule", "GroupRule", "make_rule", "group_change"]


@dataclass
class EMStep:
    """One plain EM step ``a -> b = M(E(a))``, ``c = M(E(b))``, as the rules see it."""

    npl_a: torch.Tensor
    npl_b: torch.Tensor
    lme_a: float
    lme_b: float
    group_a: GroupFamily
    group_b: GroupFamily
    group_c: GroupFamily


def group_change(old: GroupFamily, new: GroupFamily) -> float:
    """Largest relative change ``|new - old| / (1 + |old|)`` over the group's locations and scales."""
    h_old, h_new = old.hyper(), new.hyper()
    return max(float(((h_new[k] - h_old[k]).abs() / (1.0 + h_old[k].abs())).max()) for k in h_old)


def _rate(step: EMStep) -> float:
    """Linear convergence rate of the group hyperparameters over the step, clipped to [0, 0.99]."""
    va, vb, vc = step.group_a.to_vector(), step.group_b.to_vector(), step.group_c.to_vector()
    d1, d2 = float((vb - va).norm()), float((vc - vb).norm())
    if d1 == 0.0:
        return 0.0
    return min(max(d2 / d1, 0.0), 0.99)


@dataclass
class LMERule:
    """Projected remaining change of the summed Laplace log evidence below ``crit``.

    The rate is the largest of the last three steps' estimates, so one step
    that happens to move little (optimizer noise) cannot end a slow EM early.
    """

    crit: float = 1e-3
    name: str = "lme"
    window: int = 2
    rates: list = field(default_factory=list)
    projections: list = field(default_factory=list)

    def update(self, step: EMStep) -> tuple[bool, str]:
        d = step.lme_b - step.lme_a
        self.rates.append(_rate(step))
        rate = max(self.rates[-3:])
        projected = abs(d) / (1.0 - rate)
        self.projections.append(projected)
        met = len(self.projections) >= self.window and max(self.projections[-self.window:]) < self.crit
        return met, f"LME change {d:+.3g}, rate {rate:.3f}, projected remaining {projected:.3g}"


@dataclass
class NPLRule:
    """pyEM's rule on the aggregated, rounded NPL."""

    crit: float = 1e-3
    method: str = "sum"
    custom: str | None = None
    precision: int = 6
    name: str = "npl"
    values: list = field(default_factory=list)

    def _aggregate(self, npl: torch.Tensor) -> float:
        v = torch.round(npl.detach().double().cpu() * 10 ** self.precision) / 10 ** self.precision
        if self.method == "sum":
            return float(v.sum())
        if self.method == "mean":
            return float(v.mean())
        return float(v.median()) if v.numel() % 2 else float(v.sort().values[v.numel() // 2 - 1:v.numel() // 2 + 1].mean())

    def update(self, step: EMStep) -> tuple[bool, str]:
        old, new = self._aggregate(step.npl_a), self._aggregate(step.npl_b)
        if not self.values:
            self.values.append(old)
        self.values.append(new)
        if self.custom == "running_average":
            if len(self.values) <= 6:
                return False, f"NPL {new:.6g} (running average needs 6 values)"
            ref = sum(self.values[-6:-1]) / 5.0
            change = abs(new - ref)
        elif self.custom == "relative_npl":
            change = abs((new - old) / (old if old != 0 else 1.0))
        else:
            change = abs(new - old)
        return change < self.crit, f"NPL ({self.method}) change {change:.3g}"


@dataclass
class GroupRule:
    """Every group location and scale within ``tol`` (relative) for ``window`` steps in a row."""

    tol: float = 1e-3
    window: int = 3
    name: str = "group"
    changes: list = field(default_factory=list)

    def update(self, step: EMStep) -> tuple[bool, str]:
        self.changes.append(group_change(step.group_a, step.group_b))
        ok = len(self.changes) >= self.window and max(self.changes[-self.window:]) < self.tol
        return ok, f"group change {self.changes[-1]:.3g}"


def make_rule(options) -> LMERule | NPLRule | GroupRule:
    """The stopping rule that :class:`torchem.options.FitOptions` asks for."""
    if options.convergence == "npl":
        return NPLRule(options.convergence_crit, options.convergence_method, options.convergence_custom,
                       options.convergence_precision)
    if options.convergence == "group":
        return GroupRule(options.group_tol, options.group_window)
    return LMERule(options.convergence_crit)
