"""Parameter recovery: how well fitted parameters match the ones that generated the data."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["RecoveryResult", "parameter_recovery"]


@dataclass
class RecoveryResult:
    """Per-parameter agreement of estimates with the generating values (pyEM's ``RecoveryResult``).

    Attributes
    ----------
    corr : ndarray
        ``(P,)`` Pearson correlation between true and estimated values.
    rmse : ndarray
        ``(P,)`` root mean squared error.
    est_params : ndarray
        ``(S, P)`` the estimates compared.
    """

    corr: np.ndarray
    rmse: np.ndarray
    est_params: np.ndarray


def parameter_recovery(true_params: ArrayLike, est_params: ArrayLike) -> RecoveryResult:
    """Pearson r and RMSE per parameter between ``true_params`` and ``est_params``, both ``(S, P)``.

    Raises
    ------
    ValueError
        If the two arrays differ in shape or are not ``(S, P)``.
    """
    true = np.asarray(true_params, dtype=float)
    est = np.asarray(est_params, dtype=float)
    if true.shape != est.shape or true.ndim != 2:
        raise ValueError(f"true_params and est_params must both be (subjects, parameters), got {true.shape} "
                         f"and {est.shape}")
    rmse = np.sqrt(((est - true) ** 2).mean(0))
    corr = np.array([np.corrcoef(true[:, j], est[:, j])[0, 1] for j in range(true.shape[1])])
    return RecoveryResult(corr=corr, rmse=rmse, est_params=est)
