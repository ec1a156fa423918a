"""Group-level (population) distributions of the normalized parameters and their M-steps.

A group family is the empirical prior of the hierarchical model: a
:class:`torchem.priors.Prior` (negative log density, Hessian, draws, mean and
variance) whose hyperparameters the M-step re-estimates from the subjects'
posterior moments, means ``m`` ``(S, P)`` and covariances ``V`` ``(S, P, P)``
(MAPs and inverse Hessians under the Laplace approximation), with optional
subject weights ``w`` ``(S,)``.  Every M-step is batched over parameters.

- ``gaussian`` (Huys et al. 2011), diagonal or full covariance::

      mu    = sum_i w_i m_i / sum_i w_i
      Sigma = sum_i w_i (m_i m_i^T + V_i) / sum_i w_i - mu mu^T   (diagonal: its diagonal)

- ``laplace``: per parameter, the location minimizes the expected absolute
  deviation ``sum_i w_i E|theta_i - loc|`` under each subject's Gaussian
  posterior ``N(m_i, V_i,pp)`` (a folded normal), solved by bisection on its
  monotone derivative ``-sum_i w_i erf((m_i - loc) / (s_i sqrt 2))``; the
  scale is the weighted mean expected absolute deviation at that location.
- ``student_t(df)``: the scale-mixture EM (iteratively reweighted) of a
  t-distribution with fixed ``df``, using each subject's posterior variance:
  ``u_i = (df + 1) / (df + ((m_i - loc)^2 + V_i,pp) / scale^2)``,
  ``loc = sum w u m / sum w u``, ``scale^2 = sum w u ((m - loc)^2 + V) / sum w u``,
  started at the median and 2.198 MAD^2 and iterated to a fixed point.
- ``cauchy``: ``student_t`` with one degree of freedom.
- :class:`CovariateGroup`: a family whose location follows subject
  covariates, ``theta_i = B^T x_i + e_i``, with a design ``X`` ``(S, K)``,
  coefficients ``B`` ``(K, P)`` (some fixed at 0 when a parameter uses only
  some covariates) and deviations ``e_i`` from a Gaussian or Student-t
  family at location 0.  Gaussian: the exact generalized least-squares
  M-step under the E-step moments: with ``G = sum_i w_i x_i x_i^T`` and
  ``Omega = Sigma^-1`` the free coefficients ``beta`` solve
  ``sum_i Z_i^T Omega Z_i beta = sum_i Z_i^T Omega m_i`` (``Z_i`` the
  ``(P, n_beta)`` design of subject ``i``), then
  ``Sigma = sum_i w_i ((m_i - B^T x_i)(m_i - B^T x_i)^T + V_i)`` (diagonal:
  its diagonal).  With a diagonal ``Sigma``, or the same covariates for every
  parameter, ``beta`` does not depend on ``Sigma`` (least squares per
  parameter) and one pass is exact; otherwise the two updates alternate to
  the joint maximum.  Student-t / Cauchy: per parameter, the t family's
  scale-mixture iteration with its location replaced by ``B^T x_i``
  (weighted least squares with weights ``u_i``).  A Laplace location
  regression (least absolute deviations under posterior uncertainty) has no
  closed-form update and is not offered.

The laplace, student_t and cauchy M-steps reproduce pyEM 1.0's numbers on
the same inputs (tests/test_groups.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .priors import GaussianPrior, LaplacePrior, Prior, StudentTPrior

__all__ = ["GroupFamily", "MStepInfo", "GaussianGroup", "LaplaceGroup", "StudentTGroup", "CauchyGroup",
           "CovariateGroup", "make_group", "group_from_state", "FAMILIES"]

_VAR_FLOOR = 1e-8


@dataclass
class MStepInfo:
    """Outcome of one M-step: whether its inner iterations converged, and a message if not."""

    converged: bool = True
    message: str = ""


class GroupFamily(Prior):
    """Interface of a group distribution: a prior plus an M-step.

    Besides the :class:`~torchem.priors.Prior` operations, a family provides

    - :meth:`mstep` ``(m, V, weights) -> (family, MStepInfo)``: the new group;
    - :attr:`n_hyper`: its number of free hyperparameters (the iBIC penalty);
    - :meth:`hyper`: named hyperparameter tensors (history, display, the
      ``"group"`` convergence rule);
    - :meth:`to_vector` / :meth:`from_vector`: the hyperparameters as one
      unconstrained vector (what EM acceleration extrapolates);
    - :meth:`state_dict` / :func:`group_from_state`: save and restore.
    """

    name: str = "group"

    def mstep(self, m: torch.Tensor, V: torch.Tensor,
              weights: torch.Tensor | None = None) -> tuple["GroupFamily", MStepInfo]:
        raise NotImplementedError

    @property
    def n_hyper(self) -> int:
        raise NotImplementedError

    def hyper(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def to_vector(self) -> torch.Tensor:
        raise NotImplementedError

    def from_vector(self, v: torch.Tensor) -> "GroupFamily":
        raise NotImplementedError

    def initial(self, n_params: int, var: float, *, dtype: torch.dtype, device) -> "GroupFamily":
        """A starting member of this family: location 0, variance ``var`` per parameter."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The family's fixed settings (not re-estimated), e.g. ``diagonal`` or ``df``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """``{"family": name, "config": {...}, "hyper": {name: tensor}}``: enough to rebuild it."""
        return {"family": self.name, "config": self.config(),
                "hyper": {k: v.detach().clone() for k, v in self.raw_hyper().items()}}

    def raw_hyper(self) -> dict[str, torch.Tensor]:
        """The tensors the constructor takes."""
        raise NotImplementedError

    def expected_neg_log_prior(self, m: torch.Tensor, v: torch.Tensor,
                               idx: torch.Tensor | None = None) -> torch.Tensor:
        """``(s,)`` expected negative log density under independent ``N(m_p, v_p)`` per parameter."""
        raise NotImplementedError

    def collapse(self, j: int) -> "GroupFamily":
        """A copy with parameter ``j``'s spread at the floor (1e-8 variance) and its correlations removed."""
        v = self.to_vector().clone()
        P = self.n_params
        v[P + j] = 0.5 * math.log(_VAR_FLOOR) if self.name != "gaussian" else math.log(_VAR_FLOOR)
        return self.from_vector(v)

    def valid(self) -> bool:
        """All hyperparameters finite and the spread positive definite."""
        ok = all(bool(torch.isfinite(v).all()) for v in self.raw_hyper().values())
        return ok and bool((self.spread.diagonal() > 0).all())


def _weights(m: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``(S,)`` weights normalized to sum to 1 (equal when ``None``)."""
    if weights is None:
        return torch.full((m.shape[0],), 1.0 / m.shape[0], dtype=m.dtype, device=m.device)
    w = weights.to(m)
    return w / w.sum()


@dataclass(repr=False)
class GaussianGroup(GaussianPrior, GroupFamily):
    """Gaussian group with diagonal (pyEM's default) or full covariance.

    Attributes
    ----------
    mu : Tensor
        ``(P,)`` group mean.
    sigma : Tensor
        ``(P, P)`` group covariance (diagonal when ``diagonal``); pyEM's name.
    diagonal : bool
        Whether the M-step keeps only the variances.
    """

    diagonal: bool = True
    name: str = field(default="gaussian", init=False)

    def initial(self, n_params, var, *, dtype, device):
        mu = torch.zeros(n_params, dtype=dtype, device=device)
        return GaussianGroup(mu, torch.full((n_params,), float(var), dtype=dtype, device=device), self.diagonal)

    def config(self):
        return {"diagonal": self.diagonal}

    def raw_hyper(self):
        return {"mu": self.mu, "sigma": self.sigma}

    @property
    def n_hyper(self) -> int:
        P = self.n_params
        return 2 * P if self.diagonal else P + P * (P + 1) // 2

    def hyper(self):
        out = {"mu": self.mu, "sd": self.var.sqrt()}
        if not self.diagonal:
            sd = self.var.sqrt()
            corr = self.sigma / (sd[:, None] * sd[None, :])
            i, j = torch.triu_indices(self.n_params, self.n_params, 1)
            out["corr"] = corr[i, j]
        return out

    def to_vector(self):
        if self.diagonal:
            return torch.cat([self.mu, self.var.log()])
        L = torch.linalg.cholesky(self.sigma)
        i, j = torch.tril_indices(self.n_params, self.n_params)
        vals = torch.where(i == j, L[i, j].log(), L[i, j])
        return torch.cat([self.mu, vals])

    def from_vector(self, v):
        P = self.n_params
        mu = v[:P]
        if self.diagonal:
            return GaussianGroup(mu, v[P:].exp().clamp_min(_VAR_FLOOR), True)
        i, j = torch.tril_indices(P, P)
        L = torch.zeros(P, P, dtype=v.dtype, device=v.device)
        L[i, j] = torch.where(i == j, v[P:].exp(), v[P:])
        return GaussianGroup(mu, _floor_cov(L @ L.T), False)

    def collapse(self, j):
        if self.diagonal:
            return GroupFamily.collapse(self, j)
        cov = self.sigma.clone()
        cov[j, :] = 0.0
        cov[:, j] = 0.0
        cov[j, j] = _VAR_FLOOR
        return GaussianGroup(self.mu, cov, False)

    def mstep(self, m, V, weights=None):
        w = _weights(m, weights)
        mu = w @ m
        outer = torch.einsum("s,sp,sq->pq", w, m, m) + torch.einsum("s,spq->pq", w, V) - torch.outer(mu, mu)
        if self.diagonal:
            cov = torch.diag(outer.diagonal().clamp_min(_VAR_FLOOR))
        else:
            cov = _floor_cov(0.5 * (outer + outer.T))
        return GaussianGroup(mu, cov, self.diagonal), MStepInfo()


def _floor_cov(cov: torch.Tensor) -> torch.Tensor:
    """Symmetric ``cov`` with eigenvalues floored at 1e-8, so the prior stays proper."""
    cov = 0.5 * (cov + cov.T)
    evals, evecs = torch.linalg.eigh(cov)
    if bool(evals.min() < _VAR_FLOOR):
        cov = (evecs * evals.clamp_min(_VAR_FLOOR)) @ evecs.T
    return cov


def _folded_abs_dev(d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``E|theta - loc|`` for ``theta ~ N(m, s^2)``, ``d = m - loc``: ``s sqrt(2/pi) exp(-d^2/2s^2) + d erf(d / s sqrt 2)``."""
    s = s.clamp_min(1e-12)
    return s * math.sqrt(2.0 / math.pi) * torch.exp(-0.5 * (d / s) ** 2) + d * torch.erf(d / (s * math.sqrt(2.0)))


def _expected_laplace_nlp(d: torch.Tensor, sd: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(s,)`` expected negative log Laplace density (scale ``b``) under ``N(loc + d, sd^2)`` per parameter."""
    return (_folded_abs_dev(d, sd) / scale + torch.log(2.0 * scale)).sum(-1)


def _rows(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Rows ``idx`` of a per-subject ``(S, P)`` tensor (all rows for ``None``); a ``(P,)`` tensor as it is."""
    return t if (idx is None or t.dim() == 1) else t[idx]


@dataclass(repr=False)
class LocalPrior(Prior):
    """A heavy-tailed group as one subject's E-step sees it, given that subject's last Gaussian posterior.

    The MAP under a Laplace or Student-t density is a poor posterior mean
    when the data inform a parameter weakly: a Laplace MAP sits on the kink
    at the location, and a t MAP's curvature makes the t M-step shrink the
    scale at every step.  Variational EM instead fits each subject a
    Gaussian ``q_i = N(m_i, V_i)`` (the likelihood taken as locally
    quadratic, as in the Laplace approximation) that maximizes
    ``E_q[log p(D_i | theta)] + E_q[log group(theta)] + H(q)``; the M-steps
    of the families (pyEM's) are the maximizers of ``sum_i E_q[log group]``
    given those ``q_i``.  The E-step keeps each subject's variances ``v``
    from its previous E-step and maximizes over the mean:

    - ``kind="laplace"``: the prior term is the Laplace log density averaged
      over ``N(theta_p, v_p)``: ``E|theta - loc| / b`` is a folded-normal
      mean, smooth everywhere (no kink) with curvature
      ``sqrt(2/pi) exp(-d^2 / 2v) / (b sqrt v)``;
    - ``kind="t"``: mean-field variational Bayes over the t's scale mixture:
      a Gaussian ``N(loc, scale^2 / u)`` with the subject's expected
      precision weight ``u = (df + 1) / (df + ((m - loc)^2 + v) / scale^2)``
      (the weight of the t M-step).

    Its MAP and Hessian are the subject's new ``m`` and ``V``.  A subject the
    data do not inform keeps the group's spread: its ``q`` has ``E|theta -
    loc| = b`` (Laplace) or a weight ``u = 1`` (t), so the M-step leaves the
    scale where it is instead of shrinking it.

    Attributes
    ----------
    group : GroupFamily
        The family (draws, location and spread for restarts and caps).
    loc : Tensor
        ``(P,)`` or per subject ``(S, P)`` locations.
    scale : Tensor
        ``(P,)`` scales (Laplace ``b``; t ``scale``).
    w : Tensor
        ``(S, P)`` per subject: the posterior SD ``sqrt v`` (Laplace) or the weight ``u`` (t).
    kind : str
        ``"laplace"`` or ``"t"``.
    """

    group: Prior
    loc: torch.Tensor
    scale: torch.Tensor
    w: torch.Tensor
    kind: str

    @property
    def mean(self):
        return self.group.mean

    @property
    def var(self):
        return self.group.var

    @property
    def spread(self):
        return self.group.spread

    def sample(self, n, generator=None, idx=None):
        return self.group.sample(n, generator, idx)

    def _parts(self, x, idx):
        return x - _rows(self.loc, idx), _rows(self.w, idx)

    def neg_log_prior(self, x, idx=None):
        d, w = self._parts(x, idx)
        if self.kind == "laplace":
            return _expected_laplace_nlp(d, w, self.scale)
        s2 = self.scale ** 2
        return (0.5 * w * d * d / s2 + 0.5 * torch.log(2.0 * math.pi * s2 / w)).sum(-1)

    def grad(self, x, idx=None):
        d, w = self._parts(x, idx)
        if self.kind == "laplace":
            return torch.erf(d / (w * math.sqrt(2.0))) / self.scale
        return w * d / self.scale ** 2

    def hessian(self, x, idx=None):
        d, w = self._parts(x, idx)
        if self.kind == "laplace":
            return torch.diag_embed(math.sqrt(2.0 / math.pi) * torch.exp(-0.5 * (d / w) ** 2) / (self.scale * w))
        return torch.diag_embed(w / self.scale ** 2)


class _LocationScale(GroupFamily):
    """Hyperparameters of a family with a location ``loc`` and a scale ``scale`` per parameter."""

    def _with(self, loc: torch.Tensor, scale: torch.Tensor) -> "GroupFamily":
        raise NotImplementedError

    def raw_hyper(self):
        return {"loc": self.loc, "scale": self.scale}

    @property
    def n_hyper(self) -> int:
        return 2 * self.n_params

    def hyper(self):
        return {"loc": self.loc, "scale": self.scale}

    def to_vector(self):
        return torch.cat([self.loc, self.scale.log()])

    def from_vector(self, v):
        P = self.n_params
        return self._with(v[:P], v[P:].exp().clamp_min(1e-12))


@dataclass(repr=False)
class LaplaceGroup(LaplacePrior, _LocationScale):
    """Laplace group (location ``loc``, scale ``scale`` per parameter); pyEM's ``LaplaceGroup``."""

    name: str = field(default="laplace", init=False)

    def initial(self, n_params, var, *, dtype, device):
        loc = torch.zeros(n_params, dtype=dtype, device=device)
        return LaplaceGroup(loc, torch.full((n_params,), math.sqrt(var / 2.0), dtype=dtype, device=device),
                            self.smooth)

    def config(self):
        return {"smooth": self.smooth}

    def _with(self, loc, scale):
        return LaplaceGroup(loc, scale, self.smooth)

    def local(self, m, v, loc=None):
        loc = self.loc if loc is None else loc
        sd = self.spread.diagonal().sqrt() if v is None else v.clamp_min(0.0).sqrt()
        if v is None and loc.dim() == 2:
            sd = sd.expand_as(loc)
        sd = sd.clamp_min(self.smooth * self.scale)
        return LocalPrior(self, loc, self.scale, sd, "laplace")

    def expected_neg_log_prior(self, m, v, idx=None, loc=None):
        d = m - (self.loc if loc is None else _rows(loc, idx))
        return _expected_laplace_nlp(d, v.clamp_min(0.0).sqrt(), self.scale)

    def mstep(self, m, V, weights=None):
        w = _weights(m, weights)[:, None]
        s = V.diagonal(dim1=-2, dim2=-1).clamp_min(0.0).sqrt()  # (S, P)
        lo = (m - 1.0).min(0).values
        hi = (m + 1.0).max(0).values
        for _ in range(200):  # bisection on the monotone derivative; 200 halvings reach rounding
            mid = 0.5 * (lo + hi)
            slope = -(w * torch.erf((m - mid) / (s.clamp_min(1e-12) * math.sqrt(2.0)))).sum(0)
            lo = torch.where(slope < 0, mid, lo)
            hi = torch.where(slope < 0, hi, mid)
        loc = 0.5 * (lo + hi)
        scale = (w * _folded_abs_dev(m - loc, s)).sum(0).clamp_min(1e-12)
        return self._with(loc, scale), MStepInfo()


@dataclass(repr=False)
class StudentTGroup(StudentTPrior, _LocationScale):
    """Student-t group with fixed ``df`` (default 8); pyEM's ``StudentTGroup``.

    The M-step's inner fixed-point iteration runs up to ``max_iter`` (100)
    rounds per parameter and stops a parameter once its location moves by
    less than 1e-8 and its squared scale by less than 1e-10 (pyEM's rule);
    parameters still moving after ``max_iter`` are reported.
    """

    max_iter: int = 100
    name: str = field(default="student_t", init=False)

    def initial(self, n_params, var, *, dtype, device):
        loc = torch.zeros(n_params, dtype=dtype, device=device)
        s2 = var * (self.df - 2.0) / self.df if self.df > 2 else var
        return type(self)._make(loc, torch.full((n_params,), math.sqrt(s2), dtype=dtype, device=device), self)

    @classmethod
    def _make(cls, loc, scale, like: "StudentTGroup") -> "StudentTGroup":
        if isinstance(like, CauchyGroup):
            return CauchyGroup(loc, scale, max_iter=like.max_iter)
        return StudentTGroup(loc, scale, like.df, like.max_iter)

    def config(self):
        return {"df": self.df, "max_iter": self.max_iter}

    def _with(self, loc, scale):
        return self._make(loc, scale, self)

    def local(self, m, v, loc=None):
        loc = self.loc if loc is None else loc
        s2 = self.scale ** 2
        if v is None:  # before any E-step: q = the group itself, weight 1
            u = torch.ones_like(loc if loc.dim() == 2 else s2)
        else:
            u = (self.df + 1.0) / (self.df + ((m - loc) ** 2 + v.clamp_min(0.0)) / s2)
        return LocalPrior(self, loc, self.scale, u, "t")

    def expected_neg_log_prior(self, m, v, idx=None, loc=None):
        """Exactly, from ``log(1 + x^2 / a^2) = int_0^inf (e^-t - e^-t(1 + x^2/a^2)) dt / t`` (Frullani).

        Under ``x ~ N(d, v)`` the inner expectation is Gaussian in closed form,
        ``E e^(-t x^2 / a^2) = (1 + 2tv/a^2)^(-1/2) exp(-t d^2 / (a^2 + 2tv))``,
        which leaves a smooth one-dimensional integral over ``y = log t``,
        summed by the trapezoidal rule on 96 nodes per element (relative
        error below 1e-9 for any ``d``, ``v``).
        """
        df, s2 = self.df, self.scale ** 2
        d = m - (self.loc if loc is None else _rows(loc, idx))
        d2, v = d * d, v.clamp_min(0.0)
        a2 = df * s2
        y0 = torch.log(a2 / (v + d2 + a2)) - 32.0
        n = 96
        h = (3.7 - y0) / (n - 1)
        total = torch.zeros_like(d)
        for k in range(n):  # node by node: the same rounding whatever the batch size
            t = torch.exp(y0 + k * h)
            log_c = -0.5 * torch.log1p(2.0 * t * v / a2) - t * d2 / (a2 + 2.0 * t * v)
            total = total + (0.5 if k in (0, n - 1) else 1.0) * torch.exp(-t) * -torch.expm1(log_c)
        const = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        return (0.5 * (df + 1) * h * total + torch.log(self.scale) - const).sum(-1)

    def mstep(self, m, V, weights=None):
        df = self.df
        w = _weights(m, weights)[:, None] * m.shape[0]
        v = V.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)  # (S, P)
        if weights is None:  # numpy's median (the mean of the two middle values), as pyEM
            loc = _median(m)
            mad_med = _median((m - loc).abs())
        else:
            loc = _weighted_median(m, w[:, 0])
            mad_med = _weighted_median((m - loc).abs(), w[:, 0])
        s2 = mad_med ** 2 * 2.198 + 1e-6
        running = torch.ones_like(loc, dtype=torch.bool)
        for _ in range(self.max_iter):
            u = w * (df + 1.0) / (df + ((m - loc) ** 2 + v) / s2)
            su = u.sum(0)
            loc_new = (u * m).sum(0) / su
            s2_new = ((u * ((m - loc_new) ** 2 + v)).sum(0) / su).clamp_min(1e-12)
            done = ((loc_new - loc).abs() < 1e-8) & ((s2_new - s2).abs() < 1e-10)
            loc = torch.where(running, loc_new, loc)
            s2 = torch.where(running, s2_new, s2)
            running = running & ~done
            if not bool(running.any()):
                break
        n_bad = int(running.sum())
        info = MStepInfo() if n_bad == 0 else MStepInfo(
            False, f"{self.name} M-step (df={df:g}): the fixed-point iteration did not converge within "
                   f"{self.max_iter} rounds for {n_bad} of {loc.numel()} parameter(s)")
        return self._make(loc, s2.sqrt(), self), info


def _median(x: torch.Tensor) -> torch.Tensor:
    """``(P,)`` column medians of ``x`` ``(S, P)``, averaging the two middle values for even ``S``."""
    srt = x.sort(0).values
    n = x.shape[0]
    return 0.5 * (srt[(n - 1) // 2] + srt[n // 2])


def _weighted_median(m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(P,)`` weighted median of the columns of ``m`` ``(S, P)`` with weights ``w`` ``(S,)``."""
    order = m.argsort(0)
    srt = m.gather(0, order)
    cw = w[order].cumsum(0)
    k = (cw < 0.5 * cw[-1]).sum(0, keepdim=True)
    return srt.gather(0, k).squeeze(0)


@dataclass(repr=False)
class CauchyGroup(StudentTGroup):
    """Cauchy group: Student-t with one degree of freedom (pyEM's ``CauchyGroup``).

    A Cauchy distribution has no variance: ``var`` reports pyEM's stand-in
    ``100 scale^2``; read ``scale`` for its width.
    """

    df: float = 1.0
    name: str = field(default="cauchy", init=False)

    def __post_init__(self) -> None:
        self.df = 1.0
        super().__post_init__()

    def config(self):
        return {"max_iter": self.max_iter}


@dataclass(repr=False)
class CovariateGroup(GroupFamily):
    """A group family whose location follows subject covariates: ``theta_i = B^T x_i + e_i``.

    The deviations ``e_i`` follow a ``base`` family at location 0: a
    Gaussian (``Sigma`` diagonal or full) or a Student-t / Cauchy (a scale per
    parameter, fixed ``df``).

    Attributes
    ----------
    X : Tensor
        ``(S, K)`` design (one row per subject, in the data's subject order).
    B : Tensor
        ``(K, P)`` coefficients; ``B[k, p]`` is the effect of covariate ``k``
        on parameter ``p``'s group location (normalized space).
    free : Tensor
        ``(K, P)`` bool, which coefficients are estimated (the others stay 0).
    base : GaussianGroup or StudentTGroup
        The distribution of the deviations (its location is 0).
    columns : list of str
        Names of the ``K`` design columns.
    max_iter : int
        Rounds of the inner fixed-point iterations of the M-step (full
        covariance with different covariates per parameter; Student-t).
    """

    X: torch.Tensor
    B: torch.Tensor
    free: torch.Tensor
    base: GroupFamily
    columns: list = field(default_factory=list)
    max_iter: int = 200
    name: str = field(default="covariates", init=False)

    def __post_init__(self) -> None:
        self.B = torch.as_tensor(self.B)
        self.X = torch.as_tensor(self.X).to(self.B)
        self.free = torch.as_tensor(self.free, dtype=torch.bool, device=self.B.device)
        K, P = self.B.shape
        if not isinstance(self.base, (GaussianGroup, StudentTGroup)):
            raise ValueError(f"covariates work with the gaussian, student_t and cauchy groups, not {self.base.name!r}")
        if self.X.dim() != 2 or self.X.shape[1] != K or self.free.shape != (K, P) or self.base.n_params != P:
            raise ValueError(f"covariate group shapes disagree: X {tuple(self.X.shape)}, B {tuple(self.B.shape)}, "
                             f"free {tuple(self.free.shape)}, {self.base.n_params} base parameters")
        if not self.columns:
            self.columns = [f"x{k}" for k in range(K)]
        self.name = f"{self.base.name}+covariates"

    @property
    def gaussian(self) -> bool:
        return isinstance(self.base, GaussianGroup)

    # ---------------------------------------------------------------- prior
    def means(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``(s, P)`` group locations ``B^T x_i`` of the subjects ``idx`` (all subjects when ``None``)."""
        X = self.X if idx is None else self.X[idx]
        return X @ self.B

    def _loc(self, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        if idx is not None:
            return self.means(idx)
        if x.shape[0] == self.X.shape[0]:
            return self.means()
        raise ValueError("a group with covariates needs the subjects (idx) of the points it scores")

    @property
    def mean(self) -> torch.Tensor:
        """``(P,)`` the group location averaged over the subjects' covariates."""
        return self.means().mean(0)

    @property
    def var(self) -> torch.Tensor:
        """``(P,)`` variances of the deviations (the spread of subjects with equal covariates)."""
        return self.base.var

    @property
    def cov(self) -> torch.Tensor:
        return self.base.cov

    @property
    def spread(self) -> torch.Tensor:
        return self.base.spread

    @property
    def sigma(self) -> torch.Tensor:
        """``(P, P)`` covariance of the Gaussian deviations (Gaussian base only)."""
        return self.base.sigma

    def neg_log_prior(self, x, idx=None):
        return self.base.neg_log_prior(x - self._loc(x, idx))

    def grad(self, x, idx=None):
        return self.base.grad(x - self._loc(x, idx))

    def hessian(self, x, idx=None):
        return self.base.hessian(x - self._loc(x, idx))

    def local(self, m, v):
        return self if self.gaussian else self.base.local(m, v, loc=self.means())

    def expected_neg_log_prior(self, m, v, idx=None):
        return self.base.expected_neg_log_prior(m, v, idx, loc=self.means())

    def sample(self, n, generator=None, idx=None):
        """``(n, P)`` draws: of the subjects ``idx`` ``(n,)`` around their own locations, else around :attr:`mean`."""
        return (self.mean if idx is None else self.means(idx)) + self.base.sample(n, generator)

    def to(self, device=None, dtype=None):
        return CovariateGroup(self.X.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype),
                              self.free.to(device=device), self.base.to(device, dtype), list(self.columns),
                              self.max_iter)

    def describe(self) -> str:
        return f"CovariateGroup({self.X.shape[1]} covariates {self.columns}, deviations {self.base.describe()})"

    # ---------------------------------------------------------------- family
    def _like(self, B: torch.Tensor, base: GroupFamily) -> "CovariateGroup":
        return CovariateGroup(self.X, B, self.free, base, list(self.columns), self.max_iter)

    def initial(self, n_params, var, *, dtype, device):
        K = self.X.shape[1]
        return CovariateGroup(self.X.to(device=device, dtype=dtype), torch.zeros(K, n_params, dtype=dtype, device=device),
                              self.free.to(device), self.base.initial(n_params, var, dtype=dtype, device=device),
                              list(self.columns), self.max_iter)

    def config(self):
        return {"columns": list(self.columns), "max_iter": self.max_iter, "base": self.base.state_dict()}

    def raw_hyper(self):
        return {"X": self.X, "B": self.B, "free": self.free}

    def valid(self) -> bool:
        return bool(torch.isfinite(self.B).all()) and self.base.valid()

    @property
    def n_hyper(self) -> int:
        return int(self.free.sum()) + self.base.n_hyper - self.n_params

    def hyper(self):
        out = {"mu": self.mean, "sd": self.var.sqrt(), "coef": self.B.reshape(-1)}
        out.update({k: v for k, v in self.base.hyper().items() if k not in ("mu", "loc", "sd")})
        return out

    def to_vector(self):
        """Free coefficients, then the base family's shape hyperparameters (its location part dropped)."""
        return torch.cat([self.B[self.free], self.base.to_vector()[self.n_params:]])

    def coefficients(self, v: torch.Tensor) -> torch.Tensor:
        """``B`` ``(K, P)`` from :meth:`to_vector`'s layout, built out of place (differentiable by ``torch.func``)."""
        fk, fp = self.free.nonzero(as_tuple=True)
        return torch.zeros(self.B.shape, dtype=v.dtype, device=v.device).index_put((fk, fp), v[:fk.numel()])

    def from_vector(self, v):
        nb = int(self.free.sum())
        zeros = torch.zeros(self.n_params, dtype=v.dtype, device=v.device)
        return self._like(self.coefficients(v), self.base.from_vector(torch.cat([zeros, v[nb:]])))

    def mstep(self, m, V, weights=None):
        if self.gaussian:
            return self._mstep_gaussian(m, V, _weights(m, weights))
        return self._mstep_student(m, V, _weights(m, weights))

    def _ls(self, G: torch.Tensor, XtY: torch.Tensor, p: int) -> torch.Tensor:
        """Least-squares coefficients of parameter ``p`` from ``G = X^T W X`` and ``X^T W y``."""
        b = torch.zeros_like(self.B[:, p])
        a = self.free[:, p].nonzero().squeeze(1)
        if a.numel():
            b[a] = torch.linalg.solve(G[a][:, a], XtY[a])
        return b

    def _mstep_gaussian(self, m, V, w):
        X, P = self.X, self.n_params
        G = torch.einsum("s,sk,sl->kl", w, X, X)  # (K, K)
        XtM = torch.einsum("s,sk,sp->kp", w, X, m)  # (K, P)
        VW = torch.einsum("s,spq->pq", w, V)
        diagonal = self.base.diagonal

        def deviations(B: torch.Tensor) -> GaussianGroup:
            r = m - X @ B
            cov = torch.einsum("s,sp,sq->pq", w, r, r) + VW
            cov = torch.diag(cov.diagonal().clamp_min(_VAR_FLOOR)) if diagonal else _floor_cov(cov)
            return GaussianGroup(torch.zeros_like(self.B[0]), cov, diagonal)

        if diagonal or bool((self.free == self.free[:, :1]).all()):  # beta does not depend on Sigma
            B = torch.stack([self._ls(G, XtM[:, p], p) for p in range(P)], 1)
            return self._like(B, deviations(B)), MStepInfo()
        fk, fp = self.free.nonzero(as_tuple=True)  # seemingly unrelated regressions with restrictions
        B, base = self.B, self.base
        for _ in range(self.max_iter):
            omega = base.precision
            beta = torch.linalg.solve(omega[fp][:, fp] * G[fk][:, fk], (XtM @ omega)[fk, fp])
            B_new = torch.zeros_like(B).index_put((fk, fp), beta)
            base = deviations(B_new)
            done = float((B_new - B).abs().max()) < 1e-10
            B = B_new
            if done:
                return self._like(B, base), MStepInfo()
        return self._like(B, base), MStepInfo(False, f"covariate M-step: the alternating GLS update did not "
                                                     f"converge within {self.max_iter} rounds")

    def _mstep_student(self, m, V, w):
        """Per parameter, the scale-mixture EM of a t regression with the posterior variances (as
        :meth:`StudentTGroup.mstep` with the location replaced by ``B^T x_i``), iterated to its fixed point."""
        df, X, P = self.base.df, self.X, self.n_params
        v = V.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
        ws = w * m.shape[0]
        B = torch.zeros_like(self.B)
        s2 = torch.empty(P, dtype=m.dtype, device=m.device)
        n_bad = 0
        for p in range(P):
            G = torch.einsum("s,sk,sl->kl", ws, X, X)
            b = self._ls(G, X.T @ (ws * m[:, p]), p)  # start: least squares, 2.198 MAD^2 (as the t family)
            r = m[:, p] - X @ b
            s2_p = _median((r - _median(r[:, None])).abs()[:, None])[0] ** 2 * 2.198 + 1e-6
            for _ in range(self.max_iter):
                u = ws * (df + 1.0) / (df + ((m[:, p] - X @ b) ** 2 + v[:, p]) / s2_p)
                b_new = self._ls(torch.einsum("s,sk,sl->kl", u, X, X), X.T @ (u * m[:, p]), p)
                s2_new = ((u * ((m[:, p] - X @ b_new) ** 2 + v[:, p])).sum() / u.sum()).clamp_min(1e-12)
                done = float((b_new - b).abs().max()) < 1e-8 and float((s2_new - s2_p).abs()) < 1e-10
                b, s2_p = b_new, s2_new
                if done:
                    break
            else:
                n_bad += 1
            B[:, p], s2[p] = b, s2_p
        base = StudentTGroup._make(torch.zeros_like(s2), s2.sqrt(), self.base)
        info = MStepInfo() if n_bad == 0 else MStepInfo(
            False, f"covariate {self.base.name} M-step: the fixed-point iteration did not converge within "
                   f"{self.max_iter} rounds for {n_bad} of {P} parameter(s)")
        return self._like(B, base), info


#: Group families by name (``fit(group=...)`` / pyEM's ``fit(mstep=...)``).
FAMILIES: dict[str, Any] = {
    "gaussian": lambda **kw: GaussianGroup(torch.zeros(1), torch.ones(1), diagonal=kw.get("diagonal", True)),
    "diag": lambda **kw: GaussianGroup(torch.zeros(1), torch.ones(1), diagonal=True),
    "full": lambda **kw: GaussianGroup(torch.zeros(1), torch.ones(1), diagonal=False),
    "laplace": lambda **kw: LaplaceGroup(torch.zeros(1), torch.ones(1)),
    "student_t": lambda **kw: StudentTGroup(torch.zeros(1), torch.ones(1), kw.get("df", 8.0),
                                            kw.get("max_iter", 100)),
    "cauchy": lambda **kw: CauchyGroup(torch.zeros(1), torch.ones(1), max_iter=kw.get("max_iter", 100)),
}


def make_group(spec: "str | GroupFamily", n_params: int, *, dtype: torch.dtype, device, var: float = 1.0,
               df: float | None = None) -> GroupFamily:
    """The starting group for ``spec``: a family name or a :class:`GroupFamily` instance.

    Names: ``"gaussian"``/``"diag"`` (diagonal Gaussian), ``"full"`` (full
    covariance), ``"laplace"``, ``"student_t"`` (``df``, default 8),
    ``"cauchy"``.  A name starts at location 0 with variance ``var``; an
    instance starts where it is (moved to ``dtype``/``device``) and must have
    ``n_params`` parameters.
    """
    if isinstance(spec, GroupFamily):
        if spec.n_params == n_params:
            return spec.to(device, dtype)
        return spec.initial(n_params, var, dtype=dtype, device=device)
    if not isinstance(spec, str) or spec not in FAMILIES:
        raise ValueError(f"group must be one of {sorted(FAMILIES)} or a GroupFamily instance, got {spec!r}")
    kw = {} if df is None else {"df": float(df)}
    return FAMILIES[spec](**kw).initial(n_params, var, dtype=dtype, device=device)


def group_from_state(state: dict[str, Any], *, device=None, dtype=None) -> GroupFamily:
    """Rebuild a family from :meth:`GroupFamily.state_dict`."""
    name, cfg, hyp = state["family"], dict(state.get("config", {})), state["hyper"]
    hyp = {k: torch.as_tensor(v).to(device=device, dtype=dtype) for k, v in hyp.items()}
    if name == "gaussian":
        return GaussianGroup(hyp["mu"], hyp["sigma"], diagonal=bool(cfg.get("diagonal", True)))
    if name == "laplace":
        return LaplaceGroup(hyp["loc"], hyp["scale"], float(cfg.get("smooth", 1e-3)))
    if name == "student_t":
        return StudentTGroup(hyp["loc"], hyp["scale"], float(cfg["df"]), int(cfg.get("max_iter", 100)))
    if name == "cauchy":
        return CauchyGroup(hyp["loc"], hyp["scale"], max_iter=int(cfg.get("max_iter", 100)))
    if name.endswith("+covariates"):
        return CovariateGroup(hyp["X"], hyp["B"], hyp["free"].to(torch.bool),
                              group_from_state(cfg["base"], device=device, dtype=dtype), list(cfg.get("columns", [])),
                              int(cfg.get("max_iter", 200)))
    raise ValueError(f"unknown group family {name!r} in saved state")
