"""Accelerators of EM's fixed-point iteration: which group the next E-step runs at.

An E-step at the group ``theta`` followed by the M-step defines EM's map
``theta -> M(theta)`` on the family's unconstrained hyperparameter vector
(:meth:`~torchem.groups.GroupFamily.to_vector`: locations, log scales or the
Cholesky factor, covariate coefficients).  Its fixed point ``theta* = M(theta*)``
is what every accelerator here reaches; they differ only in which points they
evaluate on the way.  Each is one small object with the same two calls:

- :meth:`Accelerator.propose` ``(current) -> Proposal``: the group of the next
  E-step, a label for the history, and the accelerator's estimate of the
  remaining step ``theta* - theta`` (the stopping rules read it);
- :meth:`Accelerator.judge` ``(current, trial, proposal) -> bool``: whether the
  evaluated trial becomes the current point.  A plain EM step is always kept.

``propose`` has no side effects (the state changes only in ``judge``), so a
checkpoint taken between the two calls resumes exactly.  Only hyperparameter
vectors and summed evidence cross chunk and rank boundaries: every rank holds
the same moments after the all-gather and computes the same proposal.

The methods:

- :class:`PlainEM` (``accelerate=None``): ``theta <- M(theta)``; it converges
  linearly, at the rate of the slowest direction (near 1 when a group variance
  is small next to the subjects' posterior uncertainty).
- :class:`Squarem` (``"squarem"``, Varadhan & Roland 2008): a steplength
  extrapolation along two EM steps, kept when the summed Laplace evidence is
  not lower than at the cycle's start.
- :class:`QuasiNewton` (``"quasi_newton"``): a multisecant
  quasi-Newton step on the fixed-point residual ``F(theta) = M(theta) - theta``
  (type-II Anderson acceleration, Walker & Ni 2011; the secant form of
  Jamshidian & Jennrich's 1997 quasi-Newton EM), from the secant pairs of the
  last ``memory`` evaluated points.  A step is kept when the residual norm
  falls and EM's map contracts along it; a rejected point still adds its
  secant pair, the trust radius halves, and after two rejections in a row a
  plain EM step is taken.
- ``"auto"`` (the default, :func:`make_accelerator`): quasi-Newton steps for
  a Gaussian group, SQUAREM for the heavy-tailed groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .estep import PosteriorMoments, SubjectStatus
from .groups import GroupFamily
from .priors import Prior

__all__ = ["Point", "Proposal", "Accelerator", "PlainEM", "Squarem", "QuasiNewton", "make_accelerator",
           "ACCELERATORS"]

#: Largest linear rate the plain-EM distance estimate ``|F| / (1 - rate)`` assumes.
MAX_RATE = 0.9999


@dataclass
class Point:
    """One evaluated group: the E-step under ``group`` and the M-step ``mapped = M(group)`` after it.

    ``x`` and ``f`` are the group's vector and the residual ``M(x) - x``
    (``None`` while ``group`` is a fixed starting prior rather than a family).
    """

    group: Prior
    post: PosteriorMoments
    mapped: Prior

    def __post_init__(self) -> None:
        family = isinstance(self.group, GroupFamily) and isinstance(self.mapped, GroupFamily)
        self.x = self.group.to_vector() if family else None
        self.f = self.mapped.to_vector() - self.x if family else None

    @property
    def lme(self) -> float:
        """Summed log evidence of the E-step (Laplace, or the variational bound)."""
        return float(self.post.log_evidence.sum())

    @property
    def finite(self) -> bool:
        """Every subject's NPL finite and no MAP search failed after its restarts."""
        return (bool(torch.isfinite(self.post.npl).all())
                and not bool((self.post.status == SubjectStatus.FAILED).any()))


@dataclass
class Proposal:
    """The next group to evaluate, its history label, and the estimated remaining step to the fixed point.

    ``remaining`` is ``theta* - theta_current`` in vector coordinates, or ``None`` when not yet estimable.
    """

    group: Prior
    step: str
    remaining: torch.Tensor | None


def _norm(t: torch.Tensor) -> float:
    return float(t.norm())


class Accelerator:
    """Plain EM; the base of the others (it owns the linear-rate estimate of the remaining distance)."""

    name = "none"

    def __init__(self) -> None:
        self.rates: list[float] = []

    # -- the plain EM step, shared by every method
    def plain(self, current: Point) -> Proposal:
        """``M(current)``, with the remaining distance ``F / (1 - rate)`` of a linearly converging iteration."""
        return Proposal(current.mapped, "em", self.linear_remaining(current))

    def linear_remaining(self, current: Point) -> torch.Tensor | None:
        """``F(theta) / (1 - rate)``: the remaining step if EM converges linearly at the observed rate.

        The rate is the largest of the last three plain steps' residual ratios ``|F(M(theta))| / |F(theta)|``
        (at most :data:`MAX_RATE`), so one step that happens to move little cannot end a slow EM early.
        """
        if current.f is None or not self.rates:
            return None
        return current.f / (1.0 - min(max(self.rates[-3:]), MAX_RATE))

    def observe_plain(self, current: Point, trial: Point) -> None:
        if current.f is not None and trial.f is not None and _norm(current.f) > 0:
            self.rates.append(_norm(trial.f) / _norm(current.f))

    # -- the interface
    def propose(self, current: Point) -> Proposal:
        return self.plain(current)

    def judge(self, current: Point, trial: Point, proposal: Proposal) -> bool:
        self.observe_plain(current, trial)
        return True

    def reset(self) -> None:
        """Forget the secant / extrapolation memory (after a jump such as a variance put at its floor)."""

    def state_dict(self) -> dict:
        return {"rates": list(self.rates)}

    def load_state_dict(self, state: dict, device=None) -> None:
        self.rates = list(state["rates"])


class PlainEM(Accelerator):
    """``theta <- M(theta)``: plain EM."""


class Squarem(Accelerator):
    """SQUAREM (Varadhan & Roland 2008) with a monotonicity safeguard on the summed Laplace evidence.

    From the cycle's start ``a`` and two EM steps ``b = M(a)``, ``c = M(b)``:
    with ``r = b - a`` and ``v = c - 2 b + a``, ``alpha = -|r| / |v|`` (at
    most -1, at least ``-alpha_max``), the next group is
    ``a - 2 alpha r + alpha^2 v``.  ``alpha_max`` grows 4x after an
    extrapolation that reached it and shrinks 4x after a rejection.  Only
    where EM is slow (``|c - b| >= 0.8 |b - a|``) is an extrapolation tried.
    """

    name = "squarem"

    def __init__(self, crit: float = 1e-3) -> None:
        super().__init__()
        self.crit = crit
        self.anchor: tuple[torch.Tensor, float] | None = None  # (vector, summed evidence) of the cycle's start
        self.alpha_max = 1.0

    def _alpha(self, current: Point) -> float | None:
        """The steplength of the cycle from the anchor to ``current``, within ``[-alpha_max, -1]``.

        ``None`` where there is no cycle (no anchor) or EM is fast (``|c - b| < 0.8 |b - a|``).
        """
        if self.anchor is None or current.f is None:
            return None
        r = current.x - self.anchor[0]
        if _norm(current.f) < 0.8 * _norm(r):
            return None
        nv = _norm(current.f - r)
        alpha = -_norm(r) / nv if nv > 0 else -1.0
        return max(min(alpha, -1.0), -self.alpha_max)

    def _extrapolation(self, current: Point) -> GroupFamily | None:
        """``a - 2 alpha r + alpha^2 v``; ``None`` where it is the plain EM point ``c`` or not a valid group."""
        alpha = self._alpha(current)
        if alpha is None or alpha == -1.0:
            return None
        va = self.anchor[0]
        r = current.x - va
        theta = current.group.from_vector(va - 2 * alpha * r + alpha * alpha * (current.f - r))
        return theta if theta.valid() else None

    def propose(self, current: Point) -> Proposal:
        theta = self._extrapolation(current)
        if theta is None:
            return self.plain(current)
        return Proposal(theta, "extrapolated", self.linear_remaining(current))

    def judge(self, current: Point, trial: Point, proposal: Proposal) -> bool:
        hit = self._alpha(current) == -self.alpha_max  # the step bound was reached
        if proposal.step == "em":  # a cycle that did not extrapolate (or none yet): the next cycle starts here
            if hit:
                self.alpha_max *= 4.0
            self.observe_plain(current, trial)
            self.anchor = None if current.x is None else (current.x, current.lme)
            return True
        ok = trial.finite and trial.lme >= self.anchor[1] - self.crit
        if ok and hit:
            self.alpha_max *= 4.0
        elif not ok:
            self.alpha_max = max(1.0, self.alpha_max / 4.0)
        self.anchor = None
        return ok

    def reset(self) -> None:
        self.anchor = None

    def state_dict(self) -> dict:
        out = super().state_dict()
        out.update({"alpha_max": self.alpha_max,
                    "anchor": None if self.anchor is None else (self.anchor[0].cpu(), self.anchor[1])})
        return out

    def load_state_dict(self, state: dict, device=None) -> None:
        super().load_state_dict(state, device)
        self.alpha_max = state["alpha_max"]
        a = state["anchor"]
        self.anchor = None if a is None else (a[0].to(device), a[1])


class QuasiNewton(Accelerator):
    """Multisecant quasi-Newton steps on EM's fixed-point residual (type-II Anderson acceleration).

    With ``X`` and ``F`` the differences of the last ``memory`` evaluated
    points' vectors and residuals from the current point's (``x_c``, ``f_c``),
    the residual is modelled as ``F(x_c + X g) ~ f_c + F g``; the step is
    ``X g + f_c + F g`` with ``g`` the least-squares minimizer of
    ``|f_c + F g|``.  On a linear map this is Newton's step once ``memory``
    spans the space, so a rate near 1 costs no more E-steps than a fast one.

    Safeguards: the step's largest entry is capped at ``radius`` (starting at
    1, doubled after a kept step that reached it, halved after a rejection,
    never below 1/64); a step is kept when the residual norm does not rise
    and EM's map contracts along the step (:meth:`attracting`; a step along
    which it does not restarts the secant memory); after two rejections in a
    row a plain EM step is taken (always kept).  The Laplace evidence is no
    test of a step: EM's fixed point is not its maximum, and EM itself often
    lowers it on the way (the reference set with a covariate: by 0.3 nats per
    E-step).
    Where the last plain EM step's residual grew (EM is leaving a fixed point
    that attracts the root-finder but not EM), the step is ``expansion * F``
    along EM's own direction instead (``"expanded"``: from 2, doubled while
    kept, i.e. while the residual keeps its direction and the evidence does
    not fall by more than :meth:`slack`, halved after a rejection).
    ``remaining`` is the uncapped step, the quasi-Newton model's distance to the fixed point.
    """

    name = "quasi_newton"

    def __init__(self, memory: int = 10) -> None:
        super().__init__()
        self.memory = memory
        self.xs: list[torch.Tensor] = []
        self.fs: list[torch.Tensor] = []
        self.radius = 1.0
        self.rejections = 0
        self.expansion = 2.0

    def _step(self, current: Point) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The uncapped and the capped quasi-Newton step from ``current`` (``None``: no secant pair yet)."""
        if current.x is None:
            return None
        pairs = [(x, f) for x, f in zip(self.xs, self.fs) if not torch.equal(x, current.x)][-self.memory:]
        if not pairs:
            return None
        # solved in float64 on the CPU: a few numbers, identical on every rank
        xc, fc = current.x.detach().double().cpu(), current.f.detach().double().cpu()
        dX = torch.stack([x.double().cpu() - xc for x, _ in pairs], 1)
        dF = torch.stack([f.double().cpu() - fc for _, f in pairs], 1)
        scale = dF.norm(dim=0).clamp_min(1e-300)
        g = torch.linalg.lstsq(dF / scale, -fc[:, None], rcond=1e-10, driver="gelsd").solution[:, 0] / scale
        step = dX @ g + fc + dF @ g
        if not bool(torch.isfinite(step).all()):
            return None
        big = float(step.abs().max())
        capped = step * (self.radius / big) if big > self.radius else step
        return step.to(current.x), capped.to(current.x)

    def _receding(self) -> bool:
        """The last plain EM step's residual grew: EM is leaving a fixed point it does not converge to."""
        return bool(self.rates) and self.rates[-1] > 1.0

    def propose(self, current: Point) -> Proposal:
        if self._receding() and self.rejections < 2 and current.f is not None:
            theta = current.group.from_vector(current.x + self.expansion * current.f)
            if theta.valid():
                return Proposal(theta, "expanded", self.linear_remaining(current))
        steps = None if self.rejections >= 2 else self._step(current)
        if steps is None:
            return self.plain(current)
        full, capped = steps
        theta = current.group.from_vector(current.x + capped)
        if not theta.valid():
            return self.plain(current)
        return Proposal(theta, "quasi-newton", full)

    @staticmethod
    def slack(current: Point) -> float:
        """How far an expanded step may lower the summed Laplace evidence: 0.1 nats per 100 subjects (at least 0.1).

        Longer and longer steps along EM's direction end where they overshoot; a large loss of evidence is
        the sign of it that the residual's direction can miss.
        """
        return 0.1 * max(1.0, current.post.npl.numel() / 100.0)

    @staticmethod
    def attracting(current: Point, trial: Point) -> bool:
        """Whether EM's map contracts along the step: ``s . (F(trial) - F(current)) < 0``.

        A root-finder converges to any zero of the residual, also to a fixed point that EM moves away from
        (a variance at 0 that the data want larger: there the residual vanishes too).  Along the step
        ``s`` the residual changes by ``(J - I) s``; it points back against ``s`` only where EM's Jacobian
        ``J`` is below 1 in that direction, i.e. where plain EM would also go.
        """
        return float(((trial.x - current.x) * (trial.f - current.f)).sum()) < 0.0

    def _remember(self, point: Point) -> None:
        if point.x is None:
            return
        self.xs.append(point.x.detach().clone())
        self.fs.append(point.f.detach().clone())
        keep = self.memory + 1
        self.xs, self.fs = self.xs[-keep:], self.fs[-keep:]

    def judge(self, current: Point, trial: Point, proposal: Proposal) -> bool:
        if current.x is not None and not any(torch.equal(x, current.x) for x in self.xs):
            self._remember(current)
        if proposal.step == "em":
            self.observe_plain(current, trial)
            self.rejections = 0
            self._remember(trial)
            return True
        if proposal.step == "expanded":  # kept while it goes on in EM's direction without losing evidence
            ok = (trial.finite and trial.f is not None and float((trial.f * current.f).sum()) > 0.0
                  and trial.lme >= current.lme - self.slack(current))
            self.expansion = 2.0 * self.expansion if ok else max(2.0, self.expansion / 2.0)
            self.rejections = 0 if ok else self.rejections + 1
            if ok:
                self._remember(trial)
            return ok
        attracting = trial.f is not None and self.attracting(current, trial)
        ok = trial.finite and attracting and _norm(trial.f) <= _norm(current.f)
        reached = float((trial.x - current.x).abs().max()) >= 0.999 * self.radius
        if ok:
            self.rejections = 0
            if reached:
                self.radius *= 2.0
        else:
            self.rejections += 1
            self.radius = max(self.radius / 2.0, 1.0 / 64)
        if not attracting:  # the secant model heads for a fixed point EM leaves: restart it from plain EM steps
            self.reset()
        elif trial.finite and trial.f is not None:  # a rejected point's secant pair is still information
            self._remember(trial)
        return ok

    def reset(self) -> None:
        self.xs, self.fs, self.rejections = [], [], 0

    def state_dict(self) -> dict:
        out = super().state_dict()
        out.update({"xs": [x.cpu() for x in self.xs], "fs": [f.cpu() for f in self.fs], "radius": self.radius,
                    "rejections": self.rejections, "expansion": self.expansion})
        return out

    def load_state_dict(self, state: dict, device=None) -> None:
        super().load_state_dict(state, device)
        self.xs = [x.to(device) for x in state["xs"]]
        self.fs = [f.to(device) for f in state["fs"]]
        self.radius, self.rejections, self.expansion = state["radius"], state["rejections"], state["expansion"]


#: ``FitOptions.accelerate`` value -> accelerator class.
ACCELERATORS = {None: PlainEM, "squarem": Squarem, "quasi_newton": QuasiNewton}


def make_accelerator(options, family: GroupFamily | None = None) -> Accelerator:
    """The accelerator that :class:`torchem.options.FitOptions` asks for, for a fit of ``family``.

    ``"auto"``: :class:`QuasiNewton` for a Gaussian group (diagonal, full, or with covariates),
    :class:`Squarem` for the heavy-tailed groups, whose variational E-steps build each local prior from
    the previous E-step's moments: their EM map has a memory that the secant model does not see (on the
    reference set a Student-t group took 92 E-steps by quasi-Newton steps, 36 by SQUAREM).
    """
    kind = options.accelerate
    if kind == "auto":
        gaussian = family is None or family.name == "gaussian" or bool(getattr(family, "gaussian", False))
        kind = "quasi_newton" if gaussian else "squarem"
    if kind == "squarem":
        return Squarem(options.convergence_crit)
    return ACCELERATORS[kind]()
