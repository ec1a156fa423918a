"""pyEM's ``pyem.core.priors``: the prior objects of :mod:`torchem.priors` and ``default_prior``."""
from __future__ import annotations

import numpy as np

from ..priors import CauchyPrior, GaussianPrior, IndependentPrior, LaplacePrior, Prior, StudentTPrior, UniformPrior

__all__ = ["Prior", "GaussianPrior", "LaplacePrior", "StudentTPrior", "CauchyPrior", "UniformPrior",
           "IndependentPrior", "default_prior"]


def default_prior(nparams: int, seed: int | None = None) -> GaussianPrior:
    """pyEM's broad starting prior: mean 0, variance 100 for each of ``nparams`` parameters.

    ``seed`` is accepted for pyEM compatibility (the prior is not random).
    torchem's own default start is variance 1 (``fit(init_var=...)``); pass
    ``fit(prior=default_prior(P))`` to start where pyEM does.
    """
    return GaussianPrior(np.zeros(nparams), np.full(nparams, 100.0))
