"""Stopping rules of the EM loop: small objects with their own history.

A rule sees one *kept step* at a time: the E-steps at the previous kept group
``a`` and at the new one ``b``, the M-step's group ``c = M(E(b))``, and the
accelerator's estimate of the remaining step ``theta* - b`` to the fixed point
(:mod:`torchem.accelerators`: the quasi-Newton model's step, or ``F / (1 -
rate)`` for a linearly converging EM).  ``update`` returns whether the fit has
converged and a short description for the history and the result.

The **fixed-point gap** (:func:`fixed_point_gap`) turns that estimate into
what a user reads: the largest relative change ``|h(theta*) - h(b)| / (1 +
|h(b)|)`` of any group hyperparameter ``h`` (locations, standard deviations,
correlations, coefficients), and the remaining change of the summed Laplace
log evidence and of the summed NPL (their change over the last step, scaled
by the ratio of the remaining step to the last one).

- :class:`LMERule` (``"lme"``, the default): converged when the remaining
  change of the summed Laplace log evidence is below ``crit`` and every
  hyperparameter's relative gap below ``tol`` (``group_tol``), at ``window``
  kept steps in a row.  "Converged" so means "at the fixed point", not "the
  last step was small": a slowly crawling EM has a small step and a large gap.
- :class:`NPLRule` (``"npl"``, pyEM's): the subjects' NPL, each rounded to
  ``precision`` decimals, aggregated by ``method`` (sum, mean, median),
  changes by less than ``crit`` (``custom="relative_npl"``: relatively;
  ``"running_average"``: from the mean of the last five values).  The fit
  stops there as pyEM's would, but is reported converged only where the
  fixed-point gap is also within tolerance (see :class:`torchem.em.EMRun`).
- :class:`GroupRule` (``"group"``): every group location and scale changes by
  less than ``tol`` relative (``|new - old| / (1 + |old|)``) for ``window``
  steps in a row, and the fixed-point gap is below ``tol``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .groups import GroupFamily

__all__ = ["EMStep", "FixedPointGap", "fixed_point_gap", "gap_text", "hyper_gaps", "LMERule", "NPLRule", "GroupRule", "make_rule",
           "group_change"]


@dataclass
class EMStep:
    """One kept step ``a -> b`` (``c = M(E(b))``) and the estimated remaining step from ``b``, as the rules see it."""

    npl_a: torch.Tensor
    npl_b: torch.Tensor
    lme_a: float
    lme_b: float
    group_a: GroupFamily
    group_b: GroupFamily
    group_c: GroupFamily
    remaining: torch.Tensor | None = None

    @cached_property
    def gap(self) -> "FixedPointGap | None":
        """The estimated gap to the fixed point at ``group_b`` (:func:`fixed_point_gap`), computed once."""
        return fixed_point_gap(self)


@dataclass
class FixedPointGap:
    """How far the fit probably is from EM's fixed point.

    Attributes
    ----------
    lme : float
        Remaining change of the summed Laplace log evidence (nats).
    npl : float
        Remaining change of the summed NPL.
    hyper : float
        Largest relative remaining change ``|h* - h| / (1 + |h|)`` of any group hyperparameter.
    hyper_name : str
        Which one (``"sd[2]"``: the standard deviation of the third parameter).
    """

    lme: float
    npl: float
    hyper: float
    hyper_name: str

    def within(self, crit: float, tol: float) -> bool:
        return self.lme < crit and self.hyper < tol

    def describe(self) -> str:
        return (f"estimated gap to the fixed point: LME {self.lme:.2g}, NPL {self.npl:.2g}, "
                f"hyperparameters {self.hyper:.2g} relative ({self.hyper_name})")

    def as_dict(self) -> dict:
        return {"lme": self.lme, "npl": self.npl, "hyper": self.hyper, "hyper_name": self.hyper_name}


def gap_text(gap: FixedPointGap | None) -> str:
    """:meth:`FixedPointGap.describe`, or what to say before the gap can be estimated."""
    return "gap to the fixed point not yet estimable" if gap is None else gap.describe()


def hyper_gaps(group: GroupFamily, remaining: torch.Tensor) -> dict[str, torch.Tensor]:
    """Relative remaining change ``|h* - h| / (1 + |h|)`` of each hyperparameter (:meth:`GroupFamily.hyper`'s
    keys, flattened) when ``group``'s vector moves by ``remaining``."""
    h_b = group.hyper()
    try:
        h_t = group.from_vector(group.to_vector() + remaining).hyper()
    except ValueError:  # the estimate leaves the family's range (an infinite scale): far from the fixed point
        return {k: torch.full_like(v.reshape(-1), math.inf) for k, v in h_b.items()}
    return {k: ((h_t[k] - h_b[k]).abs() / (1.0 + h_b[k].abs())).reshape(-1) for k in h_b}


def fixed_point_gap(step: EMStep) -> FixedPointGap | None:
    """The estimated gap at ``step.group_b`` (``None`` before the accelerator can estimate it)."""
    if step.remaining is None or not isinstance(step.group_a, GroupFamily):
        return None
    vb = step.group_b.to_vector()
    worst, name = 0.0, ""
    for k, rel in hyper_gaps(step.group_b, step.remaining).items():
        if rel.numel() and not bool(torch.isfinite(rel).all()):
            return FixedPointGap(math.inf, math.inf, math.inf, k)
        if rel.numel() and float(rel.max()) >= worst:
            worst, name = float(rel.max()), f"{k}[{int(rel.argmax())}]"
    moved = float((vb - step.group_a.to_vector()).norm())
    left = float(step.remaining.norm())
    frac = 0.0 if left == 0.0 else (left / moved if moved > 0 else math.inf)
    d_npl = abs(float(step.npl_b.sum()) - float(step.npl_a.sum()))
    return FixedPointGap(abs(step.lme_b - step.lme_a) * frac, d_npl * frac, worst, name)


def group_change(old: GroupFamily, new: GroupFamily) -> float:
    """Largest relative change ``|new - old| / (1 + |old|)`` over the group's locations and scales."""
    h_old, h_new = old.hyper(), new.hyper()
    return max(float(((h_new[k] - h_old[k]).abs() / (1.0 + h_old[k].abs())).max()) for k in h_old)


@dataclass
class LMERule:
    """Estimated remaining change of the summed Laplace log evidence below ``crit``, every hyperparameter's
    relative gap below ``tol``, at ``window`` kept steps in a row."""

    crit: float = 1e-3
    tol: float = 1e-3
    name: str = "lme"
    window: int = 2
    met: list = field(default_factory=list)

    def update(self, step: EMStep) -> tuple[bool, str]:
        gap = step.gap
        self.met.append(gap is not None and gap.within(self.crit, self.tol))
        done = len(self.met) >= self.window and all(self.met[-self.window:])
        return done, f"LME change {step.lme_b - step.lme_a:+.3g}; {gap_text(gap)}"


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
        gap = step.gap
        ok = (len(self.changes) >= self.window and max(self.changes[-self.window:]) < self.tol
              and (step.remaining is None or gap is not None and gap.hyper < self.tol))
        return ok, f"group change {self.changes[-1]:.3g}" + ("" if gap is None else f"; {gap.describe()}")


def make_rule(options) -> LMERule | NPLRule | GroupRule:
    """The stopping rule that :class:`torchem.options.FitOptions` asks for."""
    if options.convergence == "npl":
        return NPLRule(options.convergence_crit, options.convergence_method, options.convergence_custom,
                       options.convergence_precision)
    if options.convergence == "group":
        return GroupRule(options.group_tol, options.group_window)
    return LMERule(options.convergence_crit, options.group_tol)
