"""pyEM's ``pyem.core.optim``: ``OptimConfig``, the E-step optimizer settings, mapped onto torchem's fit options.

torchem's E-step is one batched L-BFGS with exact gradients for all subjects
(:func:`torchem.optim.minimize`), not scipy's BFGS per subject, so of
pyEM's settings only the restart budget, the gradient tolerance and the
iteration cap carry over (:meth:`OptimConfig.fit_options`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

__all__ = ["OptimConfig"]

_METHODS = ("BFGS", "L-BFGS", "L-BFGS-B")


@dataclass
class OptimConfig:
    """pyEM's per-subject optimizer settings.

    Attributes
    ----------
    method : str
        pyEM's scipy method; torchem always runs batched L-BFGS (a warning
        says so for a method other than BFGS / L-BFGS).
    options : dict, optional
        ``gtol`` and ``maxiter`` carry over (to ``gtol`` and ``estep_maxit``).
    max_restarts : int
        Restarts for subjects whose MAP search fails.
    tol, x_scale : float
        pyEM's function tolerance and random-start scale; not used (torchem
        warm-starts every E-step from the previous MAP).
    """

    method: str = "BFGS"
    options: dict | None = None
    max_restarts: int = 2
    tol: float = 1e-6
    x_scale: float = 0.1

    def fit_options(self) -> dict[str, Any]:
        """The :class:`~torchem.options.FitOptions` fields these settings stand for."""
        if self.method not in _METHODS:
            warnings.warn(f"OptimConfig(method={self.method!r}): torchem's E-step is always batched L-BFGS with "
                          "exact gradients", RuntimeWarning, stacklevel=3)
        out: dict[str, Any] = {"max_restarts": int(self.max_restarts)}
        opts = self.options or {}
        if "gtol" in opts:
            out["gtol"] = float(opts["gtol"])
        if "maxiter" in opts:
            out["estep_maxit"] = int(opts["maxiter"])
        return out
