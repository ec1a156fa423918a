"""pyEM's ``pyem.core.groupdist``: group M-step families with pyEM's interface and layouts.

``make_group(name, df=8.0)`` returns an object with pyEM's three methods on
pyEM's parameters-first arrays, computed by torchem's batched families
(:mod:`torchem.groups`):

- ``update(m (P, S), inv_h (P, P, S)) -> hyper``: the M-step; ``hyper`` is
  pyEM's ``(mu, sigma, flag)`` for ``"gaussian"`` and ``{"loc", "scale"}``
  (plus ``"df"``) for the others, as numpy arrays;
- ``moments(hyper) -> (mean, variance, flag)``;
- ``make_prior(hyper)``: the prior of the next E-step (a :mod:`torchem.priors` object).

In a fit, choose the family with ``EMModel.fit(mstep=...)``.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from .. import groups

__all__ = ["make_group", "GaussianGroup", "LaplaceGroup", "StudentTGroup", "CauchyGroup"]


class _PyEMGroup:
    """One family, pyEM's interface (see the module docstring)."""

    family = "gaussian"

    def __init__(self, df: float | None = None) -> None:
        self.df = df

    def _group(self, hyper: Any) -> groups.GroupFamily:
        """The torchem family with ``hyper``'s values."""
        if self.family == "gaussian":
            mu, sigma = hyper[0], hyper[1]
            return groups.GaussianGroup(np.asarray(mu, float), np.asarray(sigma, float))
        state = {"family": self.family, "config": {"df": float(hyper.get("df", self.df or 8.0))},
                 "hyper": {"loc": np.asarray(hyper["loc"], float), "scale": np.asarray(hyper["scale"], float)}}
        return groups.group_from_state(state, dtype=torch.float64)

    def update(self, m: ArrayLike, inv_h: ArrayLike) -> Any:
        """The M-step from MAPs ``m`` ``(P, S)`` and inverse Hessians ``inv_h`` ``(P, P, S)``."""
        mt = torch.as_tensor(np.asarray(m, dtype=float)).T.contiguous()
        V = torch.as_tensor(np.asarray(inv_h, dtype=float)).permute(2, 0, 1).contiguous()
        start = groups.make_group(self.family, mt.shape[1], dtype=torch.float64, device="cpu", df=self.df)
        new, info = start.mstep(mt, V)
        if not info.converged:
            warnings.warn(f"{type(self).__name__} M-step: {info.message}", RuntimeWarning, stacklevel=2)
        hyper = {k: v.detach().cpu().numpy() for k, v in new.hyper().items()}
        if self.family == "gaussian":
            var = new.var.detach().cpu().numpy()
            return new.mean.detach().cpu().numpy(), var, int(np.all(var >= 0))
        if self.family in ("student_t", "cauchy"):
            hyper["df"] = float(new.df)
        return hyper

    def moments(self, hyper: Any) -> tuple[np.ndarray, np.ndarray, int]:
        """``(mean, variance, flag)`` per parameter; ``flag`` 1 when the values are usable."""
        g = self._group(hyper)
        return g.mean.numpy(), g.var.numpy(), int(g.valid())

    def make_prior(self, hyper: Any):
        """The group as a prior (what the next E-step uses)."""
        return self._group(hyper)


class GaussianGroup(_PyEMGroup):
    """Gaussian group, diagonal covariance (pyEM's classic M-step)."""

    family = "gaussian"


class LaplaceGroup(_PyEMGroup):
    """Laplace group: location and scale from the expected absolute deviations."""

    family = "laplace"


class StudentTGroup(_PyEMGroup):
    """Student-t group with fixed ``df`` (scale-mixture IRLS M-step)."""

    family = "student_t"

    def __init__(self, df: float = 8.0) -> None:
        super().__init__(float(df))


class CauchyGroup(_PyEMGroup):
    """Cauchy group (Student-t with one degree of freedom)."""

    family = "cauchy"


def make_group(name: str, df: float = 8.0) -> _PyEMGroup:
    """The family ``name``: ``"gaussian"``, ``"laplace"``, ``"student_t"`` (with ``df``) or ``"cauchy"``."""
    if name == "student_t":
        return StudentTGroup(df)
    families = {"gaussian": GaussianGroup, "laplace": LaplaceGroup, "cauchy": CauchyGroup}
    if name not in families:
        raise ValueError(f"unknown mstep {name!r}; choose 'gaussian', 'laplace', 'student_t' or 'cauchy'")
    return families[name]()
