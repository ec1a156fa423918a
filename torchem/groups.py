"""Group-level (population) distributions of the normalized parameters and their M-steps.

A group distribution is the empirical prior of the hierarchical model.  It
gives each subject's negative log prior, draws parameters, and is re-estimated
from the subjects' posterior moments (the M-step).  The Gaussian M-step of
Huys et al. (2011) uses each subject's posterior mean ``m_i`` and covariance
``V_i`` (the inverse Hessian at the MAP under the Laplace approximation):

    mu    = mean_i m_i
    Sigma = mean_i (m_i m_i^T + V_i) - mu mu^T      (diagonal: keep the diagonal)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["GaussianGroup", "make_group"]

_VAR_FLOOR = 1e-8


@dataclass
class GaussianGroup:
    """Gaussian group distribution in normalized space.

    Attributes
    ----------
    mu : Tensor
        ``(P,)`` group mean.
    cov : Tensor
        ``(P, P)`` group covariance (diagonal when ``diagonal``).
    diagonal : bool
        Whether the M-step keeps only the variances (pyEM's default).
    """

    mu: torch.Tensor
    cov: torch.Tensor
    diagonal: bool = True

    @classmethod
    def initial(cls, n_params: int, diagonal: bool = True, var: float = 100.0, *,
                dtype: torch.dtype = torch.float64, device: str | torch.device | None = None) -> "GaussianGroup":
        """A broad starting prior: mean 0, variance ``var`` (nearly flat)."""
        mu = torch.zeros(n_params, dtype=dtype, device=device)
        return cls(mu, var * torch.eye(n_params, dtype=dtype, device=device), diagonal)

    @property
    def var(self) -> torch.Tensor:
        """``(P,)`` group variances."""
        return self.cov.diagonal()

    def neg_log_prior(self, x: torch.Tensor) -> torch.Tensor:
        """``(S,)`` negative log density of ``x`` ``(S, P)``, normalizing constant included."""
        P = x.shape[-1]
        diff = x - self.mu
        chol = torch.linalg.cholesky(self.cov)
        z = torch.linalg.solve_triangular(chol, diff.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = 2.0 * chol.diagonal().log().sum()
        return 0.5 * (z * z).sum(-1) + 0.5 * logdet + 0.5 * P * math.log(2 * math.pi)

    @property
    def precision(self) -> torch.Tensor:
        """``(P, P)`` inverse covariance."""
        return torch.cholesky_inverse(torch.linalg.cholesky(self.cov))

    def grad_neg_log_prior(self, x: torch.Tensor) -> torch.Tensor:
        """``(S, P)`` gradient of :meth:`neg_log_prior` at ``x`` ``(S, P)``: ``Sigma^-1 (x - mu)``."""
        return (x - self.mu) @ self.precision

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, P)`` draws; the random stream comes from ``generator`` on the CPU."""
        P = self.mu.shape[0]
        z = torch.randn(n, P, generator=generator, dtype=self.mu.dtype).to(self.mu.device)
        return self.mu + z @ torch.linalg.cholesky(self.cov).T

    def mstep(self, m: torch.Tensor, second: torch.Tensor) -> "GaussianGroup":
        """Re-estimate from posterior means ``m`` ``(S, P)`` and covariances ``second`` ``(S, P, P)``.

        Variances are floored at 1e-8 so the prior stays proper.
        """
        mu = m.mean(0)
        outer = (m.unsqueeze(-1) * m.unsqueeze(-2) + second).mean(0) - torch.outer(mu, mu)
        if self.diagonal:
            cov = torch.diag(outer.diagonal().clamp_min(_VAR_FLOOR))
        else:
            cov = 0.5 * (outer + outer.T)
            evals, evecs = torch.linalg.eigh(cov)
            if evals.min() < _VAR_FLOOR:
                cov = (evecs * evals.clamp_min(_VAR_FLOOR)) @ evecs.T
        return GaussianGroup(mu, cov, self.diagonal)


def make_group(kind: str, n_params: int, *, dtype: torch.dtype, device: torch.device,
               var: float = 1.0) -> GaussianGroup:
    """Initial group distribution (mean 0, variance ``var``) for ``kind`` in ``{"diag", "full"}``."""
    if kind not in ("diag", "full"):
        raise ValueError(f"group must be 'diag' or 'full', got {kind!r}")
    return GaussianGroup.initial(n_params, diagonal=(kind == "diag"), var=var, dtype=dtype, device=device)
